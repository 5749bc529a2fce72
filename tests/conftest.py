import os

from hypothesis import settings

# Deterministic in CI: the same examples every run, no example database, no flaky deadlines.
settings.register_profile("ci", derandomize=True, deadline=None, database=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    # Under xdist each worker gets one torch thread: two workers on two cores, not four threads.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
