"""A nanoGPT-style model (LayerNorm modules, fused qkv, GELU, attention by hand or through SDPA)
returned as it is: its attention, mask and residual stages are traced per block, one-line bugs are
first reported where they act, and a healthy run is free of anomalies."""

import dataclasses
import math

import pytest
import torch

from pytest_gpttrace import trace_training
from pytest_gpttrace.anomalies import detect, errors
from pytest_gpttrace.compare import compare
from pytest_gpttrace.usermodel import default_batches
from tests.nanogpt_style import Faults, NanoConfig, NanoStyleGPT


def trace_nano(config=None, faults=None, iterations=2):
    torch.manual_seed(0)
    model = NanoStyleGPT(config, faults)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return trace_training(model, default_batches(model, seed=0), [optimizer], iterations=iterations)


@pytest.fixture(scope="module")
def healthy():
    return trace_nano()


def first(result):
    assert result.first is not None, "no divergence found"
    return result.first.iteration, str(result.first.section), result.first.stage


def test_attention_by_hand_has_scores_mask_softmax_and_values_stages_per_block(healthy):
    forward = healthy.iterations[0].forward
    for i in range(2):
        attn = f"transformer.h.{i}.attn"
        assert [n for n in forward if n.startswith(attn + "/")] == [
            f"{attn}/matmul#1", f"{attn}/mask#1", f"{attn}/softmax#1", f"{attn}/matmul#2"]
        mask = forward[f"{attn}/mask#1"]
        assert mask.inf == mask.shape[0] * 2 * (32 * 31 // 2)  # the upper triangle, per sequence and head
        assert [n for n in forward if n.startswith(f"transformer.h.{i}/")] == [
            f"transformer.h.{i}/add#1", f"transformer.h.{i}/add#2"]  # x + attn, x + mlp
        assert f"transformer.h.{i}.ln_1/layer_norm#1" in forward and f"transformer.h.{i}.mlp.gelu" in forward
    assert list(forward)[-1] == "cross_entropy#1"  # the loss inside the model's forward


def test_flash_attention_is_one_stage_per_block():
    forward = trace_nano(NanoConfig(flash=True), iterations=1).iterations[0].forward
    assert [n for n in forward if n.startswith("transformer.h.0.attn/")] == [
        "transformer.h.0.attn/scaled_dot_product_attention#1"]


def test_a_healthy_run_has_no_anomaly_errors(healthy):
    assert errors(detect(healthy)) == []


def test_a_removed_residual_is_named_in_its_own_block(healthy):
    stage = first(compare(healthy, trace_nano(faults=Faults(no_attn_residual_in=1))))
    assert stage == (0, "forward", "transformer.h.1/add#1")


def test_a_removed_mask_is_first_reported_at_the_mask_stage(healthy):
    result = compare(healthy, trace_nano(faults=Faults(no_mask=True)))
    assert first(result) == (0, "forward", "transformer.h.0.attn/mask#1")
    assert result.first is not None and result.first.stat == "presence"


def test_a_dropped_attention_scale_is_first_reported_at_the_masked_scores(healthy):
    assert first(compare(healthy, trace_nano(faults=Faults(no_scale=True)))) == \
        (0, "forward", "transformer.h.0.attn/mask#1")


def test_a_mask_stage_with_nan_or_positive_inf_is_still_non_finite(healthy):
    name = "transformer.h.0.attn/mask#1"
    it = healthy.iterations[0]
    for broken in (dataclasses.replace(it.forward[name], nan=1), dataclasses.replace(it.forward[name], max=math.inf)):
        trace = dataclasses.replace(healthy, iterations=(dataclasses.replace(it, forward={**it.forward, name: broken}),
                                                         *healthy.iterations[1:]))
        found = [a for a in detect(trace) if a.rule == "non-finite"]
        assert [a.stage for a in found] == [name]
