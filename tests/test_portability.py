"""A golden recorded on one machine holds on another: recorded under one kernel cap (with its
calibration band), compared under every other cap this CPU supports, in both directions, each run
in a fresh process. And the shipped goldens hold under every cap."""

import pytest

from tests.paths import ROOT
from tests.platforms import TINY_TEST, cap_param, make_project, output, run_pytest, supported_caps


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "project", test_tiny=TINY_TEST)


@pytest.mark.parametrize("recorded", [cap_param("default"), cap_param("avx2"), cap_param("avx512")])
def test_a_golden_recorded_under_one_cap_passes_under_every_other(project, recorded):
    done = run_pytest(project, recorded, "--update-golden")
    assert done.returncode == 0, output(done)
    assert "golden created: " in output(done) and " (band of" in output(done)
    others = [cap for cap in supported_caps() if cap != recorded]
    assert len(others) >= 2
    for cap in others:
        done = run_pytest(project, cap)
        text = output(done)
        assert done.returncode == 0, f"recorded under {recorded}, compared under {cap}:\n{text}"
        assert " traced tensors out of tolerance (calibrated; " in text


@pytest.mark.parametrize("cap", [cap_param("default"), cap_param("avx2"), cap_param("avx512")])
def test_the_shipped_tiny_goldens_pass_under_every_cap(cap):
    done = run_pytest(ROOT, cap, "tests/test_traces.py", "-k", "tiny")
    assert done.returncode == 0, output(done)
    assert output(done).count(" traced tensors out of tolerance (calibrated; ") == 2
