import os

DDP_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env():
    """os.environ for a child `python` or `torchrun` a test starts: no DDP variables inherited from a run around
    the tests, and one thread per process (two processes share CI's two cores)."""
    env = {k: v for k, v in os.environ.items() if k not in DDP_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    return env


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slower test (still run in CI); deselect with -m 'not slow'")
