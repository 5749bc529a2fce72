"""Stage kinds: every stage records what it is, and the invariant rules key on kinds, so each rule
that runs on the reference model runs on a model written with functions, and a learnable-scale norm
is not judged by its rms (and the report says so)."""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tests.functional_models as fm
from pytest_gpttrace import capture, ops, trace_training
from pytest_gpttrace.anomalies import ERROR, INFO, WARNING, detect, errors
from pytest_gpttrace.compare import compare
from pytest_gpttrace.errors import CaptureError
from pytest_gpttrace.kinds import KINDS, StageKind, module_kind
from pytest_gpttrace.trace import dumps, loads
from tests.functional_models import Bugs, FunctionalGPT, functional_batches, functional_optimizer
from tests.models import tiny_reference

LAYERS = 2
KIND_RULES = ("norm-invariant", "rope-invariant", "softcap", "dead-relu", "residual-growth", "gradient-growth")


def trace_functional(bugs=None, iterations=3, model_fn=None):
    model = FunctionalGPT(layers=LAYERS, bugs=bugs or Bugs())
    if model_fn:
        model_fn(model)
    return trace_training(model, functional_batches(), functional_optimizer(model), iterations=iterations)


def found(trace, rule):
    return [(a.severity, a.iteration, a.stage) for a in detect(trace) if a.rule == rule]


@pytest.fixture(scope="module")
def healthy():
    return trace_functional()


# ------------------------------------------------------------------------------ what is recorded
def test_each_op_stage_of_the_functional_model_records_its_kind(healthy):
    kinds = healthy.stage_kinds
    assert set(kinds) == set(healthy.stage_names)
    for i in range(LAYERS):
        b = f"blocks.{i}"
        assert [kinds[f"{b}/rms_norm#1"], kinds[f"{b}.attn/rms_norm#1"], kinds[f"{b}.attn/rms_norm#2"]] == ["norm"] * 3
        assert kinds[f"{b}.attn/rotary#1"] == kinds[f"{b}.attn/rotary#2"] == "rotary"
        assert kinds[f"{b}.attn/scaled_dot_product_attention#1"] == "attention"
        assert kinds[f"{b}.mlp/relu#1"] == kinds[f"{b}.mlp/square#1"] == "activation"
        assert kinds[f"{b}/add#1"] == kinds[f"{b}/add#2"] == "residual"
        assert kinds[f"{b}.attn.c_q"] == "linear"
        # the rotary's input, from the autograd graph: the projection it rotates
        assert healthy.stage_inputs[f"{b}.attn/rotary#1"] == f"{b}.attn.c_q"
        assert healthy.stage_inputs[f"{b}.attn/rotary#2"] == f"{b}.attn.c_k"
    assert (kinds["wte"], kinds["softcap#1"], kinds["cross_entropy#1"]) == ("embedding", "softcap", "loss")
    assert set(healthy.stage_inputs) == {n for n, k in kinds.items() if k == "rotary"}


def test_the_reference_taps_record_their_kinds_and_the_rotary_inputs():
    model, batches, opts = tiny_reference()
    trace = trace_training(model, batches, opts, iterations=1)
    kinds = trace.stage_kinds
    assert kinds["blocks.0.attn.q_rope"] == kinds["blocks.0.attn.k_rope"] == "rotary"
    norms = sorted(n for n, k in kinds.items() if k == "norm")
    assert norms == sorted(n for n in trace.stage_names if n.endswith(("_norm", ".norm")) or n == "final_norm")
    assert (kinds["blocks.1.mlp_resid"], kinds["blocks.1.attn_resid"], kinds["blocks.1.input"]) == ("residual",) * 3
    assert (kinds["blocks.0.mlp.relu2"], kinds["lm_head.softcap"], kinds["loss"]) == ("activation", "softcap", "loss")
    assert trace.stage_inputs["blocks.0.attn.q_rope"] == "blocks.0.attn.q"
    assert trace.stage_inputs["blocks.1.attn.k_rope"] == "blocks.1.attn.k"


def test_every_rule_that_runs_on_the_reference_model_has_its_stages_in_the_functional_model(healthy):
    model, batches, opts = tiny_reference()
    reference = trace_training(model, batches, opts, iterations=1)

    def kinds_per_block(trace):
        out: dict[str, set[int]] = {}
        for name, kind in trace.stage_kinds.items():
            if name.startswith("blocks."):
                out.setdefault(kind, set()).add(int(name.split(".")[1].split("/")[0]))
        return out

    ref, fun = kinds_per_block(reference), kinds_per_block(healthy)
    for kind in ("norm", "rotary", "activation", "residual", "attention"):
        assert ref[kind] == fun[kind] == set(range(len(ref[kind]))), kind
    assert "softcap" in reference.stage_kinds.values() and "softcap" in healthy.stage_kinds.values()


def test_kinds_are_metadata_a_golden_without_them_matches(healthy):
    old = dataclasses.replace(healthy, stage_kinds={}, stage_inputs={})
    assert compare(old, healthy).ok and compare(healthy, old).ok
    assert '"stage_kinds"' not in dumps(old) and loads(dumps(healthy)).stage_kinds == healthy.stage_kinds


# ------------------------------------------------------------------------------ healthy: nothing
def test_the_healthy_functional_model_raises_no_kind_rule(healthy):
    assert [a for a in detect(healthy) if a.rule in KIND_RULES] == []
    assert errors(detect(healthy)) == []


# ------------------------------------------------------------------------------ broken: named at the stage
def test_a_norm_with_a_large_eps_is_a_norm_invariant_error_at_the_norm_op(monkeypatch):
    # (normalising over another dimension keeps the overall rms at 1: no rms test can see it)
    monkeypatch.setattr(fm, "norm", lambda x: F.rms_norm(x, (x.size(-1),), eps=0.1))  # was: eps=None
    errs = [a for a in errors(detect(trace_functional())) if a.rule == "norm-invariant"]
    assert errs and (errs[0].iteration, errs[0].stage) == (0, "rms_norm#1")
    assert "rms_norm#1 has rms 0.9" in errs[0].symptom


def test_a_flipped_rope_sin_is_a_rope_invariant_error_at_a_rotary_stage():
    hits = found(trace_functional(Bugs(flipped_sin=True)), "rope-invariant")
    assert hits and all(sev == ERROR and stage is not None and "/rotary#" in stage for sev, _, stage in hits)
    assert hits[0][1] == 0  # seen in the first iteration
    (a, *_) = [a for a in detect(trace_functional(Bugs(flipped_sin=True))) if a.rule == "rope-invariant"]
    assert a.stage is not None and f"RoPE changed the rms of {'c_q' if a.stage.endswith('#1') else 'c_k'} from" \
        in a.symptom


def big_head(model):
    with torch.no_grad():  # logits of std about 11: beyond ±15 unless the cap holds them
        model.lm_head.weight.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))


def test_a_bigger_softcap_is_a_softcap_error_at_the_softcap_stage():
    assert (ERROR, 0, "softcap#1") in found(trace_functional(Bugs(softcap=30.0), model_fn=big_head), "softcap")
    # the cap of 15 holds the same logits (saturated, so a warning, never an error)
    assert all(sev != ERROR for sev, _, _ in found(trace_functional(model_fn=big_head), "softcap"))


def test_a_relu_with_a_large_negative_bias_is_dead_at_the_end_of_its_chain(monkeypatch):
    monkeypatch.setattr(fm.MLP, "forward", lambda self, x: self.c_proj(F.relu(self.c_fc(x) - 1.5).square()))
    hits = found(trace_functional(), "dead-relu")
    assert (WARNING, 0, "blocks.0.mlp/square#1") in hits or (ERROR, 0, "blocks.0.mlp/square#1") in hits
    assert not any(stage.endswith("/relu#1") for _, _, stage in hits)  # the chain relu -> square: once


def test_a_residual_scaled_by_10_is_residual_growth_in_the_next_block(monkeypatch):
    def forward(self, x, cos, sin):
        x = x + self.attn(fm.norm(x), cos, sin)
        return 10 * (x + self.mlp(fm.norm(x)))  # was: x + self.mlp(norm(x))

    monkeypatch.setattr(fm.Block, "forward", forward)
    hits = found(trace_functional(), "residual-growth")
    assert hits and hits[0][0] == ERROR and hits[0][2] == "blocks.1/add#2" and hits[0][1] == 0


# ------------------------------------------------------------------------------ learnable-scale norms
class LlamaishRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm, written out: the normalisation by hand, then the learnable weight."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * x


class LlamaishBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = LlamaishRMSNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.proj(F.silu(self.fc(self.norm(x))))


class Llamaish(nn.Module):
    def __init__(self, vocab=64, d=32, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([LlamaishBlock(d) for _ in range(layers)])
        self.final_norm = LlamaishRMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.final_norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def test_a_norm_with_a_learnable_weight_is_not_checked_and_the_report_says_so():
    model = Llamaish()
    trace = trace_training(model, functional_batches(), torch.optim.AdamW(model.parameters(), lr=0.1), iterations=3)
    assert trace.stage_kinds["blocks.0.norm"] == trace.stage_kinds["final_norm"] == "norm_affine"
    # one step of AdamW at lr 0.1 moved the weights: the norm's output is no longer rms 1
    rms = trace.iterations[2].forward["final_norm"].rms
    assert rms is not None and abs(rms - 1) > 1e-2
    found_ = detect(trace)
    assert not [a for a in found_ if a.rule == "norm-invariant" and a.severity != INFO]
    (note,) = [a for a in found_ if a.rule == "norm-invariant"]
    assert note.symptom.startswith("3 norm stages with a learnable scale not checked (blocks.0.norm, blocks.1.norm, "
                                   "final_norm); 0 norm stages without one checked")
    assert "learnable weight" in note.cause
    # a trace without kinds (an older golden) skips them by name, as before: silently
    assert [a for a in detect(dataclasses.replace(trace, stage_kinds={})) if a.rule == "norm-invariant"] == []


def test_hugging_face_llama_passes_norm_invariant_and_its_norms_are_listed():
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=0))
    trace = trace_training(model, functional_batches(), torch.optim.AdamW(model.parameters(), lr=1e-2), iterations=2)
    norms = [n for n, k in trace.stage_kinds.items() if k == "norm_affine"]
    assert "model.layers.0.input_layernorm" in norms and "model.norm" in norms
    found_ = detect(trace)
    assert not [a for a in found_ if a.rule in KIND_RULES and a.severity != INFO]
    (note,) = [a for a in found_ if a.rule == "norm-invariant"]
    assert note.severity == INFO and f"{len(norms)} norm stages with a learnable scale not checked" in note.symptom


# ------------------------------------------------------------------------------ kinds from ops and modules
def test_a_functional_norm_with_a_weight_is_norm_affine_and_one_without_is_norm():
    class TwoNorms(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            x = self.lin(x)
            return F.rms_norm(x, (4,), self.w) + F.layer_norm(x, (4,)) + F.layer_norm(x, (4,), bias=self.w)

    model = TwoNorms()
    with capture(model, ops=["rms_norm", "layer_norm"]) as cap:
        model(torch.randn(2, 4))
        cap.end_iteration()
    assert cap.trace().stage_kinds == {"lin": "linear", "rms_norm#1": "norm_affine", "layer_norm#1": "norm",
                                       "layer_norm#2": "norm_affine"}


class RMSNorm(nn.Module):  # a parameter-free norm of one's own, named as such
    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),))


class ScaledNorm(nn.Module):  # a learnable scale under another name than `weight`
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),)) * self.scale


@pytest.mark.parametrize(("module", "kind"), [
    (ScaledNorm(4), "norm_affine"),
    (nn.LayerNorm(4), "norm_affine"), (nn.LayerNorm(4, elementwise_affine=False), "norm"),
    (nn.RMSNorm(4), "norm_affine"), (nn.RMSNorm(4, elementwise_affine=False), "norm"),
    (LlamaishRMSNorm(4), "norm_affine"), (RMSNorm(), "norm"),
    (nn.Linear(2, 2), "linear"), (nn.Embedding(3, 2), "embedding"), (nn.GELU(), "activation"),
    (nn.ReLU(), "activation"), (nn.Dropout(), "other"),
])
def test_a_module_stage_gets_its_kind_from_its_type(module, kind):
    assert module_kind(module) == kind


def test_a_tap_says_its_kind_and_a_wrong_one_is_refused_in_one_line():
    class Probe(nn.Module):
        gpttrace_tap = True

        def __init__(self, kind):
            super().__init__()
            self.gpttrace_kind = kind

        def forward(self, x):
            return x

    class Model(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.rotated = Probe(kind)

        def forward(self, x):
            return self.rotated(self.lin(x)).sum()

    model = Model("rotary")
    with capture(model) as cap:
        model(torch.randn(2, 4))
        cap.end_iteration()
    assert cap.trace().stage_kinds == {"rotated": "rotary"}
    with pytest.raises(CaptureError) as info:
        capture(Model("rope")).__enter__()
    assert str(info.value) == (f"module rotated (Probe): gpttrace_kind: 'rope' is not a stage kind; "
                               f"use one of {', '.join(KINDS)}")


def test_an_op_rule_of_ones_own_is_other_unless_it_says(monkeypatch):
    monkeypatch.setitem(ops.OPS, "transpose", ops.OpRule("transpose", (torch.Tensor.transpose,)))
    monkeypatch.setitem(ops.OPS, "sub", ops.OpRule("sub", (torch.Tensor.__sub__, torch.Tensor.sub, torch.sub),
                                                      kind=StageKind.RESIDUAL))
    assert ops.OPS["transpose"].kind == StageKind.OTHER

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return (self.lin(x).transpose(0, 1) - 1.0).sum()

    model = M()
    with capture(model, ops=["transpose", "sub"]) as cap:
        model(torch.randn(2, 3))
        cap.end_iteration()
    assert cap.trace().stage_kinds == {"lin": "linear", "transpose#1": "other", "sub#1": "residual"}


def test_without_autograd_no_rotary_input_is_recorded_and_the_rule_is_silent():
    model = FunctionalGPT(layers=1, bugs=Bugs(flipped_sin=True))
    with torch.no_grad(), capture(model) as cap:
        model(*next(functional_batches()))
        cap.end_iteration()
    trace = cap.trace()
    assert trace.stage_kinds["blocks.0.attn/rotary#1"] == "rotary" and trace.stage_inputs == {}
    assert found(trace, "rope-invariant") == []


def test_the_kind_vocabulary_is_its_documented_list():
    assert KINDS == ("norm", "norm_affine", "rotary", "attention", "activation", "residual", "softcap", "loss",
                     "linear", "embedding", "matmul", "mask", "other")
    assert [str(k) for k in StageKind] == list(KINDS)
