"""A golden recorded on one machine holds on another: recorded under one kernel cap (with its
calibration band), compared under every other cap this CPU supports, in both directions, each run
in a fresh process. And the shipped goldens hold under every cap."""

import textwrap

import pytest

from tests.platforms import ROOT, cap_param, output, run_pytest, supported_caps

TEST = textwrap.dedent('''
    import pytest
    from reference_model import GPTConfig

    TINY = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)

    @pytest.mark.gpt_trace(iterations=3, seed=42)
    @pytest.mark.parametrize("gpt_config", [TINY], ids=["tiny"])
    def test_tiny(gpt_trace, gpt_golden):
        assert gpt_trace == gpt_golden
''')


@pytest.fixture
def project(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "pytest.ini").write_text("[pytest]\ngpt_trace = true\n")
    (folder / "test_tiny.py").write_text(TEST)
    return folder


@pytest.mark.parametrize("recorded", [cap_param("default"), cap_param("avx2"), cap_param("avx512")])
def test_a_golden_recorded_under_one_cap_passes_under_every_other(project, recorded):
    done = run_pytest(project, recorded, "--update-golden")
    assert done.returncode == 0, output(done)
    assert "golden created (band of" in output(done)
    others = [cap for cap in supported_caps() if cap != recorded]
    assert len(others) >= 2
    for cap in others:
        done = run_pytest(project, cap)
        text = output(done)
        assert done.returncode == 0, f"recorded under {recorded}, compared under {cap}:\n{text}"
        assert "0 out of tolerance (calibrated; " in text


@pytest.mark.parametrize("cap", [cap_param("default"), cap_param("avx2"), cap_param("avx512")])
def test_the_shipped_tiny_goldens_pass_under_every_cap(cap):
    done = run_pytest(ROOT, cap, "tests/test_traces.py", "-k", "tiny")
    assert done.returncode == 0, output(done)
    assert output(done).count("0 out of tolerance (calibrated; ") == 2
