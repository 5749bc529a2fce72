"""A user's model of another architecture (LayerNorm with bias, fused qkv with bias, GELU, tied
embeddings, AdamW, 5 iterations), in float32 and under bf16 autocast: its calibrated golden passes
under 1 thread and under every kernel cap, and still fails on a dropped attention scale."""

import textwrap

import pytest

from tests.platforms import make_project, output, run_pytest, supported_caps

CONFTEST = textwrap.dedent('''
    import os

    import pytest
    import torch

    from tests.models import TiedGPT, tied_batches

    @pytest.fixture
    def gpt_model():
        return TiedGPT(autocast=os.environ["AUTOCAST"] == "1",
                       scale_attention=os.environ.get("DROP_SCALE") != "1")

    @pytest.fixture
    def gpt_batches():
        return tied_batches()

    @pytest.fixture
    def gpt_optimizers(gpt_model):
        return [torch.optim.AdamW(gpt_model.parameters(), lr=1e-3, weight_decay=0.1)]
''')

TEST = textwrap.dedent('''
    import pytest

    @pytest.mark.gpt_trace(iterations=5, seed=3)
    def test_user_model(gpt_trace, gpt_golden):
        assert gpt_trace == gpt_golden
''')


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "project", conftest=CONFTEST, test_user=TEST)


@pytest.mark.parametrize("autocast", ["0", "1"], ids=["float32", "bf16-autocast"])
def test_a_calibrated_user_golden_holds_across_platforms_and_catches_a_dropped_scale(project, autocast):
    done = run_pytest(project, "native", "--update-golden", AUTOCAST=autocast)
    assert done.returncode == 0, output(done)
    golden = next((project / "golden").rglob("*.json")).read_text()
    assert '"format": 2' in golden
    if autocast == "1":
        assert '"autocast": "cpu torch.bfloat16"' in golden  # the trace says what ran
    for cap in supported_caps():
        done = run_pytest(project, cap, AUTOCAST=autocast)
        assert done.returncode == 0, f"under {cap}:\n{output(done)}"
    done = run_pytest(project, "native", AUTOCAST=autocast, OMP_NUM_THREADS=1)
    assert done.returncode == 0, f"under 1 thread:\n{output(done)}"
    done = run_pytest(project, "native", AUTOCAST=autocast, DROP_SCALE=1)
    assert done.returncode == 1, output(done)
    assert "first divergence: h.0/scaled_dot_product_attention#1 (forward), iteration 0" in output(done)
