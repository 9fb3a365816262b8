"""This process's peak resident set size: the CPU's stand-in for a peak-memory counter.

getrusage's ru_maxrss is the wrong number in a child process on Linux: the kernel carries the high-water mark over
fork and exec (exec keeps the larger of the old and new address space's peaks), so a train.py started by a process
that held a model begins with that process's peak, and "peak minus the peak before the model" reads zero. The
kernel's VmHWM in /proc/self/status belongs to the current address space, which exec replaces: it starts at the new
program's own pages. Elsewhere (macOS, no /proc) ru_maxrss is what there is.
"""
import resource
import sys


def status_kib(field):
    """A field of /proc/self/status in KiB (Linux): 'VmHWM' (peak resident), 'VmRSS' (resident now). OSError where
    there is no such file or field."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    raise OSError(f"/proc/self/status has no {field}")


def peak_rss_bytes():
    """The peak resident set size of this process's own address space, in bytes."""
    try:
        return status_kib("VmHWM") * 1024
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
