"""Anomaly rules: the seed, the clean reference model, injected faults, and each rule on its own."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import reference_model.gpt as gpt
from pytest_gpttrace import markdown, trace_training
from pytest_gpttrace.anomalies import (
    ERROR,
    INFO,
    RULES,
    WARNING,
    Thresholds,
    detect,
    errors,
    parse_thresholds,
)
from pytest_gpttrace.cli import main
from pytest_gpttrace.markdown.render import anomaly_items
from pytest_gpttrace.report import anomaly_lines
from pytest_gpttrace.trace import Trace, dumps, replace_stats
from reference_model import GPT, optimizers, synthetic_batches
from tests.builders import make_iteration, make_stats
from tests.models import TINY_GOLDEN_CONFIG
from tests.paths import ROOT, SEED_REPORT


def traced(model_fn=None, opt_fn=None, iterations=3, micro_steps=1):
    model = GPT(TINY_GOLDEN_CONFIG, seed=42)
    if model_fn:
        model_fn(model)
    opts = opt_fn(model) if opt_fn else optimizers(model)
    return trace_training(model, synthetic_batches(TINY_GOLDEN_CONFIG, seed=42), opts, iterations=iterations,
                          micro_steps=micro_steps)


def by_severity(found, severity):
    return [a for a in found if a.severity == severity]


# ------------------------------------------------------------------ the seed report
def test_the_seed_report():
    found = detect(markdown.load(SEED_REPORT))
    (err,) = errors(found)
    assert err.rule == "stuck-loss"
    assert "11.090358" in err.symptom and "ln V = ln 65536" in err.symptom and "3 iterations" in err.symptom
    assert "micro-steps" in err.cause and "the LM head is not being updated" in err.cause
    assert "that lm_head is in a param group, and that the learning rate is not 0 at step 0" in err.cause
    infos = by_severity(found, INFO)
    zero_out = next(a for a in infos if "output exactly zero" in a.symptom)
    for i in range(4):
        assert f"blocks.{i}.attn.out" in zero_out.symptom and f"blocks.{i}.mlp.out" in zero_out.symptom
    assert "lm_head.logits" in zero_out.symptom and "zero-init" in zero_out.cause
    wte = next(a for a in infos if "wte.weight" in a.symptom)
    assert "LM head is still zero" in wte.cause
    assert not any(a.rule == "non-finite" for a in found)  # the one-element std `nan` is n/a


def test_gpttrace_check_on_the_seed_exits_1(capsys):
    assert main(["check", str(SEED_REPORT)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("1 errors, 0 warnings, 2 infos")
    assert out.index("1 error:") < out.index("2 infos:")


# ------------------------------------------------------------------ the clean reference model
@pytest.fixture(scope="module")
def clean():
    return traced()


def test_the_reference_model_has_only_the_expected_zeros(clean):
    found = detect(clean)
    assert not by_severity(found, ERROR) and not by_severity(found, WARNING)
    assert found and all(a.rule == "zero-schedule" for a in found)
    assert {a.iteration for a in found} == {0, 1}


def test_gpttrace_check_passes_on_the_clean_trace(tmp_path, capsys):
    p = tmp_path / "clean.json"
    p.write_text(dumps(traced(iterations=3)))
    assert main(["check", str(p), "-q"]) == 0
    assert "0 errors, 0 warnings" in capsys.readouterr().out


def test_micro_steps_with_an_unchanged_loss_are_info():
    found = detect(traced(iterations=2, micro_steps=2))
    stuck = [a for a in found if a.rule == "stuck-loss"]
    assert [a.severity for a in stuck] == [INFO] and "micro-steps" in stuck[0].cause
    assert not errors(found)


# ------------------------------------------------------------------ injected faults
def lr_zero(model):
    opts = optimizers(model)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = 0.0
    return opts


def head_left_out(model):
    scale = (model.config.n_embd / 768) ** -0.5
    return [torch.optim.AdamW([model.wte.weight], lr=0.2 * scale, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
            torch.optim.Muon([p for p in model.blocks.parameters() if p.ndim == 2], lr=0.02)]


def nan_in_block_1_mlp(model):
    def inject(module, args, out):
        out = out.clone()
        out[0, 0, 0] = float("nan")
        return out
    model.blocks[1].mlp.out.register_forward_hook(inject)


def detach_c_proj(model):
    lin = model.blocks[0].attn.c_proj
    lin.forward = lambda x: F.linear(x, lin.weight.detach())


def test_learning_rate_zero_is_a_stuck_loss_at_ln_v():
    (err,) = errors(detect(traced(opt_fn=lr_zero)))
    assert err.rule == "stuck-loss" and "exactly ln V = ln 256" in err.symptom
    assert "the logits are all zero: the LM head is not being updated" in err.cause


def test_head_left_out_of_the_optimizer_is_a_stuck_loss():
    found = detect(traced(opt_fn=head_left_out))
    (err,) = errors(found)
    assert err.rule == "stuck-loss" and "lm_head is in a param group" in err.cause
    # after each step: an info beside the error, which names the cause
    assert [(a.severity, a.iteration) for a in found if "lm_head.logits still outputs exactly zero" in a.symptom] \
        == [(INFO, 1), (INFO, 2)]


def test_nan_is_reported_at_the_stage_where_it_is_born():
    (err,) = errors(detect(traced(model_fn=nan_in_block_1_mlp)))
    assert err.rule == "non-finite" and err.stage == "blocks.1.mlp.out" and err.iteration == 0
    assert err.symptom.startswith("first NaN at blocks.1.mlp.out (forward), iteration 0")


def test_a_norm_replaced_by_an_identity(monkeypatch):
    monkeypatch.setattr(gpt, "norm", lambda x, _norm=gpt.norm: x if x.ndim == 4 else _norm(x))  # QK norm gone
    (err,) = errors(detect(traced()))
    assert err.rule == "norm-invariant" and err.stage == "blocks.0.attn.q_norm"


def test_a_detached_c_proj_is_a_dead_gradient_past_the_schedule():
    (err,) = errors(detect(traced(model_fn=detach_c_proj)))
    assert err.rule == "dead-gradient" and err.stage == "blocks.0.attn.c_proj.weight" and err.iteration == 2


def test_a_residual_stream_scaled_by_10_per_layer(monkeypatch):
    forward = gpt.Block.forward
    monkeypatch.setattr(gpt.Block, "forward", lambda self, x, cos, sin: 10 * forward(self, x, cos, sin))
    found = detect(traced())
    (err,) = errors(found)
    assert err.rule == "residual-growth" and "grows 10x" in err.symptom


# ------------------------------------------------------------------ rules one by one, on built traces
S = make_stats((1, 4, 8), mean=0.0, std=1.0, min=-2.0, max=2.0, rms=1.0, zero_frac=0.0)
LN_V = math.log(256)  # the loss of uniform logits over trace_of's vocabulary


def trace_of(forward=None, losses=(LN_V,), stepped=True, config=None, grads=None):
    """A trace with these losses; forward and grads (stage gradients) recorded at iteration 0."""
    its = tuple(make_iteration(i, loss, forward if i == 0 else None, grads if i == 0 else None, stepped=stepped)
                for i, loss in enumerate(losses))
    return Trace(config or {"vocab_size": 256, "softcap": 15.0}, {}, its, zero_params=())


def rules(trace, **th):
    return [(a.rule, a.severity) for a in detect(trace, Thresholds().updated(th))]


def test_loss_at_init_with_zero_logits_must_be_ln_v():
    zero = replace_stats(S, mean=0.0, std=0.0, min=0.0, max=0.0, rms=0.0, zero_frac=1.0)
    assert ("loss-at-init", ERROR) in rules(trace_of({"lm_head.logits": zero}, losses=(5.0,)))
    assert ("loss-at-init", ERROR) not in rules(trace_of({"lm_head.logits": zero}, losses=(LN_V,)))


def test_loss_at_init_with_a_random_head_must_be_near_ln_v():
    assert ("loss-at-init", ERROR) in rules(trace_of(losses=(20.0,)))
    assert rules(trace_of(losses=(LN_V * 1.05,))) == []


def divergences(trace, **th):
    return [(a.severity, a.iteration) for a in detect(trace, Thresholds().updated(th)) if a.rule == "divergence"]


def test_a_rise_over_one_optimizer_step_is_a_divergence_error():
    assert divergences(trace_of(losses=(5.0, 4.0, 9.0))) == [(ERROR, 2)]


def test_a_loss_above_twice_its_running_minimum_without_a_step_is_a_spike_warning():
    # no iteration stepped (micro-steps): 4.5 is no rise over a step, but above 2 x the minimum 2.0
    assert divergences(trace_of(losses=(5.0, 2.0, 2.5, 4.5), stepped=False), spike_factor=2.0) == [(WARNING, 3)]
    assert divergences(trace_of(losses=(5.0, 2.0, 2.5, 3.9), stepped=False), spike_factor=2.0) == []


def test_a_spike_right_after_a_step_is_the_rise_alone():
    # 4.5 is above 1.5 x the previous stepped loss 1.9 and above 2 x the minimum: one error, no warning
    assert divergences(trace_of(losses=(5.0, 2.0, 1.9, 4.5))) == [(ERROR, 3)]


def test_softcap_bounds_and_saturation():
    beyond = replace_stats(S, max=16.0)
    assert ("softcap", ERROR) in rules(trace_of({"lm_head.softcap": beyond}))
    saturated = replace_stats(S, min=-14.9, max=14.9, rms=12.0, std=12.0)
    assert ("softcap", WARNING) in rules(trace_of({"lm_head.softcap": saturated}))
    assert rules(trace_of({"lm_head.softcap": S})) == []


def test_dead_relu_thresholds():
    assert ("dead-relu", WARNING) in rules(trace_of({"blocks.0.mlp.relu2": replace_stats(S, zero_frac=0.95)}))
    assert ("dead-relu", ERROR) in rules(trace_of({"blocks.0.mlp.relu2": replace_stats(S, zero_frac=0.9999)}))
    assert rules(trace_of({"blocks.0.mlp.relu2": replace_stats(S, zero_frac=0.5)})) == []


def test_rope_invariant_uses_the_bf16_bound():
    q = replace_stats(S, rms=1.0)
    fine = {"blocks.0.attn.q": q, "blocks.0.attn.q_rope": replace_stats(S, rms=1.001)}
    broken = {"blocks.0.attn.q": q, "blocks.0.attn.q_rope": replace_stats(S, rms=1.05)}
    assert rules(trace_of(fine)) == []
    assert rules(trace_of(broken)) == [("rope-invariant", ERROR)]


def test_vanishing_residual_and_gradient_growth():
    fwd = {"blocks.0.mlp_resid": replace_stats(S, std=1.0), "blocks.1.mlp_resid": replace_stats(S, std=0.1)}
    grads = {"blocks.1.mlp_resid": replace_stats(S, rms=1.0), "blocks.0.mlp_resid": replace_stats(S, rms=100.0)}
    found = rules(trace_of(fwd, grads=grads))
    assert ("residual-growth", ERROR) in found and ("gradient-growth", WARNING) in found


def test_thresholds_and_allow():
    t = trace_of({"blocks.0.mlp.relu2": replace_stats(S, zero_frac=0.95)})
    assert rules(t, dead_relu_warn=0.99) == []
    found = detect(trace_of(losses=(5.0, 4.0, 9.0)), allow=["divergence"])
    assert [(a.rule, a.severity) for a in found] == [("divergence", INFO)] and "allowed" in found[0].cause
    with pytest.raises(ValueError, match="unknown anomaly rule nope"):
        detect(t, allow=["nope"])
    with pytest.raises(ValueError, match="unknown threshold bogus"):
        Thresholds().updated({"bogus": 1})
    assert parse_thresholds(["dead_relu_warn = 0.8", "# note", ""]) == {"dead_relu_warn": 0.8}
    with pytest.raises(ValueError, match="is not a number"):
        parse_thresholds(["dead_relu_warn = high"])


def test_every_rule_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for rule in RULES:
        assert f"`{rule}`" in readme, rule
    for name in Thresholds().names():
        assert f"`{name}`" in readme, name


def test_messages_read_as_sentences():
    found = detect(traced(opt_fn=lr_zero))
    for a in found:
        assert a.message.count("Likely cause:") == 1 and a.message.endswith(".")
    md = "\n".join(anomaly_items(found))
    assert "**ERROR** `stuck-loss`" in md
    assert anomaly_items([]) == ['<span style="color: #5faf00">No anomalies.</span>']
    assert anomaly_lines([]) == ["no anomalies"]
    assert anomaly_lines(found)[0] == f"{len(errors(found))} error{'s' if len(errors(found)) != 1 else ''}:"


def test_the_report_gets_an_anomalies_section(capsys):
    assert main(["show", str(SEED_REPORT)]) == 0
    out = capsys.readouterr().out
    assert "ANOMALIES" in out and "`stuck-loss`" in out
    assert out.index("ANOMALIES") < out.index("TRAINING COMPLETE")


def test_norm_invariant_allows_zero_rows_and_all_zero_inputs():
    half_zero = replace_stats(S, rms=math.sqrt(0.5), zero_frac=0.5)  # half the rows zero (padding), others rms 1
    all_zero = replace_stats(S, mean=0.0, std=0.0, min=0.0, max=0.0, rms=0.0, zero_frac=1.0)
    assert ("norm-invariant", ERROR) not in rules(trace_of({"blocks.0.attn.norm": half_zero}))
    assert ("norm-invariant", ERROR) not in rules(trace_of({"final_norm": all_zero}))
    unnormalised = replace_stats(S, rms=3.0, zero_frac=0.5)
    (err,) = [a for a in detect(trace_of({"final_norm": unnormalised})) if a.rule == "norm-invariant"]
    assert "has rms 3.000000, not 0.707107 (1 over its 50.0% nonzero entries)" in err.symptom


def test_a_zero_init_projection_left_out_of_the_optimizer_is_reported_once():
    def no_c_proj(model):
        head_and_embed = [model.wte.weight, model.lm_head.weight]
        others = [p for n, p in model.blocks.named_parameters() if "attn.c_proj" not in n]
        return [torch.optim.AdamW(head_and_embed + others, lr=1e-2)]

    found = detect(traced(opt_fn=no_c_proj, iterations=4))
    errs = errors(found)
    assert errs and all(a.rule == "zero-schedule" for a in errs)
    assert len({a.stage for a in errs}) == len(errs)  # each stuck projection once, not once per iteration
    assert {a.stage for a in errs} == {"blocks.0.attn.out", "blocks.1.attn.out"}


# ------------------------------------------------------------------ rules keyed on stage kinds
def kinds_trace(forward, kinds, inputs=None, grads=None):
    return dataclasses.replace(trace_of(forward, grads=grads), stage_kinds=kinds, stage_inputs=inputs or {})


def test_recorded_kinds_decide_which_stages_a_rule_checks():
    bad = replace_stats(S, rms=3.0)
    # a norm by kind, whatever its name; a stage named like a norm but recorded as another kind is not one
    assert rules(kinds_trace({"x/rms_norm#1": bad}, {"x/rms_norm#1": "norm"})) == [("norm-invariant", ERROR)]
    assert rules(kinds_trace({"final_norm": bad}, {"final_norm": "other"})) == []
    # a learnable-scale norm: not checked, and one info says so
    found = detect(kinds_trace({"ln_1": bad, "ln_2": bad}, {"ln_1": "norm_affine", "ln_2": "norm_affine"}))
    assert [(a.rule, a.severity, a.stage) for a in found] == [("norm-invariant", INFO, None)]
    assert found[0].symptom == ("2 norm stages with a learnable scale not checked (ln_1, ln_2); "
                                "0 norm stages without one checked")


def test_rope_invariant_compares_a_rotary_stage_with_its_recorded_input():
    fwd = {"a.c_q": replace_stats(S, rms=1.0), "a.c_k": replace_stats(S, rms=2.0), "a/rotary#1": replace_stats(S, rms=2.0)}
    kinds = {"a.c_q": "linear", "a.c_k": "linear", "a/rotary#1": "rotary"}
    (a,) = detect(kinds_trace(fwd, kinds, {"a/rotary#1": "a.c_q"}))
    assert a.rule == "rope-invariant" and a.stage == "a/rotary#1"
    assert a.symptom.startswith("RoPE changed the rms of c_q from 1.000000 to 2.000000 at a/rotary#1")
    assert rules(kinds_trace(fwd, kinds, {"a/rotary#1": "a.c_k"})) == []
    assert rules(kinds_trace(fwd, kinds)) == []  # no input recorded and no reference name: nothing to compare


def test_dead_relu_reports_a_chain_once_at_its_end_and_softcap_any_softcap_stage():
    dead = replace_stats(S, zero_frac=0.95)
    fwd = {"m/relu#1": dead, "m/square#1": dead}
    found = detect(kinds_trace(fwd, {"m/relu#1": "activation", "m/square#1": "activation"}))
    assert [(a.rule, a.stage) for a in found] == [("dead-relu", "m/square#1")]
    beyond = replace_stats(S, max=16.0)
    assert [(a.rule, a.stage) for a in detect(kinds_trace({"softcap#1": beyond}, {"softcap#1": "softcap"}))] \
        == [("softcap", "softcap#1")]


def test_residual_growth_takes_each_blocks_last_residual_stage():
    fwd = {"h.0/add#1": replace_stats(S, std=1.0), "h.0/add#2": replace_stats(S, std=1.0),
           "h.1/add#1": replace_stats(S, std=1.5), "h.1/add#2": replace_stats(S, std=10.0)}
    kinds = dict.fromkeys(fwd, "residual")
    (a,) = detect(kinds_trace(fwd, kinds))
    assert a.rule == "residual-growth" and a.stage == "h.1/add#2" and "from h.0/add#2 (1) to h.1/add#2 (10)" in a.symptom


def test_the_reference_model_gets_the_same_anomalies_from_its_kinds_as_from_its_names(monkeypatch):
    monkeypatch.setattr(gpt, "norm", lambda x, _norm=gpt.norm: x if x.ndim == 4 else _norm(x))  # QK norm gone
    trace = traced()
    assert trace.stage_kinds
    by_names = dataclasses.replace(trace, stage_kinds={}, stage_inputs={})
    assert detect(trace) == detect(by_names)
