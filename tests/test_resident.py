"""tools/resident.py: the CPU's peak memory is this process's own, not a parent's peak carried over fork and exec
(train.py started by a bench that holds a model measured "0.00 GB" with getrusage's ru_maxrss)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import subprocess_env
from test_bench import ROOT

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM needs Linux's /proc")

CHILD = ("import resource; from tools.resident import peak_rss_bytes; "
         "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


def test_a_child_of_a_large_process_reports_its_own_peak_not_the_parents():
    held = torch.ones(100 * 2**20)  # 400 MiB, every page touched: the parent's peak is at least this
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=subprocess_env())
    own, rusage = map(int, out.stdout.split())
    assert held.sum().item() == held.numel()
    assert own < 100 * 2**20, f"a python that imported nothing large peaked at {own / 2**20:.0f} MiB"
    # what the bug was: on Linux getrusage carries the parent's peak into the child
    assert rusage > 400 * 2**20


def test_the_peak_grows_by_the_bytes_a_process_touches():
    code = ("from tools.resident import peak_rss_bytes; import numpy as np; before = peak_rss_bytes(); "
            "a = np.ones(64 * 2**20 // 8 * 4); print(peak_rss_bytes() - before)")  # 256 MiB of float64, all written
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=subprocess_env())
    grown = int(out.stdout)
    assert 250 * 2**20 <= grown <= 300 * 2**20
