import os

import pytest
from hypothesis import settings

from tests.projects import user_project

# the plugin tests build user projects with pytester (tests/projects.py)
pytest_plugins = ["pytester"]

# Deterministic in CI: the same examples every run, no example database, no flaky deadlines.
settings.register_profile("ci", derandomize=True, deadline=None, database=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    # Under xdist each worker gets one torch thread: two workers on two cores, not four threads.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def torch_warmed() -> None:
    """torch imported, with what it imports lazily on a first training step.

    In-process pytester runs unload the modules a run imported, and torch cannot be imported twice:
    every test with pytester gets this first (a session fixture is set up before pytester takes its
    snapshot of the loaded modules), and only those tests pay for it.
    """
    import pytest_gpttrace.golden  # noqa: F401  what the plugin imports
    from pytest_gpttrace.tracer import trace_training
    from tests.models import UserGPT, tiny_reference, user_batches

    trace_training(*tiny_reference(), iterations=1)
    trace_training(UserGPT(), user_batches(), None, iterations=1)


@pytest.fixture
def pytester(torch_warmed: None, pytester: pytest.Pytester) -> pytest.Pytester:
    """pytester, after torch_warmed."""
    return pytester


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A user project with one traced test (tests/projects.py), run in this process with run()."""
    return user_project(pytester, monkeypatch)
