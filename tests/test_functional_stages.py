"""Functional stages: a model written with functions and no taps is traced per leaf module and per
functional op (``blocks.0.attn/rms_norm#1``), with gradients, and a one-line bug in a function is
first reported at the op it changes."""

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pytest_gpttrace import capture, ops, trace_training
from pytest_gpttrace.compare import compare
from pytest_gpttrace.errors import CaptureError
from pytest_gpttrace.settings import GRANULARITIES
from pytest_gpttrace.tracer import select_stages
from tests.functional_models import Bugs, FunctionalGPT, functional_batches, functional_optimizer
from tests.models import UserGPT, tiny_reference, user_batches
from tests.projects import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 2


def trace_functional(bugs=None, iterations=3, **kwargs):
    model = FunctionalGPT(layers=LAYERS, bugs=bugs or Bugs())
    return trace_training(model, functional_batches(), functional_optimizer(model), iterations=iterations, **kwargs)


@pytest.fixture(scope="module")
def healthy():
    return trace_functional()


BLOCK_STAGES = [
    "blocks.{i}/rms_norm#1",                               # pre-attention norm
    "blocks.{i}.attn.c_q", "blocks.{i}.attn.c_k", "blocks.{i}.attn.c_v",
    "blocks.{i}.attn/rotary#1", "blocks.{i}.attn/rotary#2",  # q and k rotated
    "blocks.{i}.attn/rms_norm#1", "blocks.{i}.attn/rms_norm#2",  # QK norm
    "blocks.{i}.attn/scaled_dot_product_attention#1",
    "blocks.{i}.attn.c_proj",
    "blocks.{i}/add#1",                                    # x + attn
    "blocks.{i}/rms_norm#2",                               # pre-MLP norm
    "blocks.{i}.mlp.c_fc", "blocks.{i}.mlp/relu#1", "blocks.{i}.mlp/square#1", "blocks.{i}.mlp.c_proj",
    "blocks.{i}/add#2",                                    # x + mlp
]


def test_every_op_of_every_block_is_a_stage_in_execution_order(healthy):
    it = healthy.iterations[0]
    expected = ["wte", "rms_norm#1"]
    for i in range(LAYERS):
        expected += [s.format(i=i) for s in BLOCK_STAGES]
    expected += ["rms_norm#2", "lm_head", "softcap#1", "cross_entropy#1"]
    assert list(it.forward) == expected
    # the stages are what their names say
    assert it.forward["blocks.0.attn/rotary#1"].shape == (2, 16, 2, 16)
    assert it.forward["blocks.0.attn/rms_norm#1"].rms == pytest.approx(1.0, abs=1e-3)
    assert it.forward["blocks.0.attn/scaled_dot_product_attention#1"].shape == (2, 2, 16, 16)
    assert it.forward["blocks.0.mlp/square#1"].min >= 0
    assert it.forward["softcap#1"].all_zero  # lm_head starts at zero
    assert it.forward["cross_entropy#1"].mean == pytest.approx(healthy.iterations[0].loss)


def test_op_stages_have_gradients_in_backward_order(healthy):
    # zero-init lm_head and c_proj: gradients reach into the blocks' attention from iteration 2 on
    grads = list(healthy.iterations[2].stage_grads)
    assert grads[:4] == ["cross_entropy#1", "softcap#1", "lm_head", "rms_norm#2"]
    for name in ("blocks.0.attn/rotary#1", "blocks.0.attn/rms_norm#2", "blocks.1.mlp/square#1", "blocks.0/add#1",
                 "blocks.1.attn/scaled_dot_product_attention#1"):
        assert name in grads
        assert not healthy.iterations[2].stage_grads[name].all_zero, name
    assert grads.index("blocks.1/add#2") < grads.index("blocks.0/add#2")


def test_the_unbroken_model_matches_itself(healthy):
    assert compare(healthy, trace_functional()).ok


def first(result):
    assert result.first is not None, "no divergence found"
    return result.first.iteration, str(result.first.section), result.first.stage


def test_a_flipped_rope_sin_is_first_reported_at_block_0s_rotary_in_iteration_0(healthy):
    assert first(compare(healthy, trace_functional(Bugs(flipped_sin=True)))) == (0, "forward", "blocks.0.attn/rotary#1")


def test_removed_qk_norm_is_first_reported_at_the_norm_stage_after_the_rotary(healthy):
    result = compare(healthy, trace_functional(Bugs(no_qk_norm=True)))
    assert first(result) == (0, "forward", "blocks.0.attn/rms_norm#1")
    assert result.first is not None and result.first.stat == "presence"  # the stage is gone, not changed


def test_a_dropped_attention_scale_is_first_reported_at_the_attention_stage(healthy):
    result = compare(healthy, trace_functional(Bugs(no_attn_scale=True)))
    assert first(result) == (0, "forward", "blocks.0.attn/scaled_dot_product_attention#1")


def test_a_changed_softcap_is_first_reported_at_the_softcap_stage_in_iteration_1(healthy):
    # iteration 0 matches: the logits are exactly zero, so the cap cannot act there (and at the
    # logits of one AdamW step, about 0.06, 15 and 15.5 differ below the exact profile's tolerance)
    assert first(compare(healthy, trace_functional(Bugs(softcap=5.0)))) == (1, "forward", "softcap#1")


def test_without_ops_the_same_bug_is_only_seen_at_a_linear_layer():
    healthy = trace_functional(granularity="modules")
    result = compare(healthy, trace_functional(Bugs(flipped_sin=True), granularity="modules"))
    # zero-init c_proj hides attention until its weight's gradient in iteration 1, far from the rotation
    assert first(result) == (1, "param_grads", "blocks.0.attn.c_proj.weight")
    assert not any("/" in name for name in healthy.iterations[0].forward)


def test_stage_names_are_the_same_in_another_process(healthy):
    script = textwrap.dedent("""
        import json
        from tests.test_functional_stages import trace_functional
        trace = trace_functional()
        print(json.dumps([list(it.forward) + ["|"] + list(it.stage_grads) for it in trace.iterations]))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    names = json.loads(out.stdout.strip().splitlines()[-1])
    assert names == [[*it.forward, "|", *it.stage_grads] for it in healthy.iterations]


# ------------------------------------------------------------------------------ granularity
def test_granularities_of_the_ini_and_of_the_tracer_are_the_same():
    assert GRANULARITIES == ops.GRANULARITIES


def test_a_model_with_taps_keeps_its_taps_by_default():
    model, batches, _ = tiny_reference()
    with capture(model) as cap:
        model(*next(batches))
        it = cap.end_iteration()
    assert cap.granularity == "taps" and cap.ops == ()
    assert not any("/" in name or name.endswith("#1") for name in it.forward)
    assert "blocks.0.attn.q_rope" in it.forward


def test_ops_on_a_model_with_taps_adds_its_leaf_modules_and_functions():
    model, batches, _ = tiny_reference()
    with capture(model, granularity="ops") as cap:
        model(*next(batches))
        it = cap.end_iteration()
    assert "blocks.0.attn.q_rope" in it.forward and "blocks.0.attn.c_q" in it.forward
    assert "blocks.0.attn/rms_norm#1" in it.forward and "blocks.0.attn/scaled_dot_product_attention#1" in it.forward


def test_a_model_without_taps_gets_modules_plus_ops_by_default_and_modules_on_request():
    model = UserGPT()
    with capture(model) as cap:
        model(*next(user_batches()))
        it = cap.end_iteration()
    assert cap.granularity == "ops"
    assert list(it.forward)[:2] == ["tok_emb", "pos_emb"]
    assert "layers.0/scaled_dot_product_attention#1" in it.forward and "layers.0/add#1" in it.forward
    assert "layers.0.ff.1" in it.forward and "layers.0.ff/gelu#1" not in it.forward  # nn.GELU is the stage
    assert "cross_entropy#1" in it.forward
    with capture(model, granularity="modules") as cap:
        model(*next(user_batches()))
        it = cap.end_iteration()
    assert not any("#1" in name for name in it.forward)


def test_taps_granularity_on_a_model_without_taps_is_refused_in_one_line():
    with pytest.raises(CaptureError) as info:
        capture(UserGPT(), granularity="taps")
    assert str(info.value) == ("granularity='taps', but UserGPT has no taps (modules named Tap or HookPoint, or with "
                               "gpttrace_tap = True): use 'modules' or 'ops', or add taps")
    with pytest.raises(CaptureError, match=r"granularity='layers' is not a granularity: use one of auto, taps"):
        capture(UserGPT(), granularity="layers")


def test_stage_patterns_filter_op_stages_too():
    model = FunctionalGPT(layers=LAYERS)
    with capture(model, ["blocks.0.*", "!*/rotary#2"]) as cap:
        model(*next(functional_batches()))
        it = cap.end_iteration()
    names = list(it.forward)
    assert "blocks.0.attn/rotary#1" in names and "blocks.0.attn/rotary#2" not in names
    assert all(n.startswith("blocks.0.") for n in names)
    assert "blocks.0/add#1" not in names  # "blocks.0.*" does not match "blocks.0/add#1"
    # a pattern that only op stages match is accepted under ops (they are known only when they run)
    assert select_stages(model, ["*/rms_norm#*"], "ops") == []
    with capture(model, ["*/rms_norm#*"]) as cap:
        model(*next(functional_batches()))
        it = cap.end_iteration()
    assert list(it.forward) and all("/rms_norm#" in n for n in it.forward)


# ------------------------------------------------------------------------------ the op list
def test_the_op_list_can_be_changed():
    assert ops.resolve_ops(None) == ops.DEFAULT_OPS
    assert ops.resolve_ops(["rms_norm", "rotary"]) == ("rms_norm", "rotary")
    changed = ops.resolve_ops(["!matmul", "+tanh"])
    assert "matmul" not in changed and changed[-1] == "tanh"
    with pytest.raises(CaptureError, match=r"^ini gpt_trace_ops: unknown op 'rmsnorm'; known ops: rms_norm, "):
        ops.resolve_ops(["rmsnorm"], origin="ini gpt_trace_ops")
    model = FunctionalGPT(layers=LAYERS)
    with capture(model, ops=["rotary", "softcap"]) as cap:
        model(*next(functional_batches()))
        it = cap.end_iteration()
    assert [n for n in it.forward if "#" in n] == ["blocks.0.attn/rotary#1", "blocks.0.attn/rotary#2",
                                                    "blocks.1.attn/rotary#1", "blocks.1.attn/rotary#2", "softcap#1"]
    with capture(model, ops=["+tanh"]) as cap:
        model(*next(functional_batches()))
        it = cap.end_iteration()
    assert list(it.forward)[-3:] == ["tanh#1", "softcap#1", "cross_entropy#1"]


def test_an_op_rule_of_ones_own_can_be_registered(monkeypatch):
    monkeypatch.setitem(ops.OPS, "transpose", ops.OpRule("transpose", (torch.Tensor.transpose,)))
    model = FunctionalGPT(layers=1)
    with capture(model, ops=["transpose"]) as cap:
        model(*next(functional_batches()))
        it = cap.end_iteration()
    assert [n for n in it.forward if "#" in n] == [f"blocks.0.attn/transpose#{k}" for k in range(1, 5)]
    with pytest.raises(CaptureError, match="a name without"):
        ops.register_op(ops.OpRule("a/b", (torch.Tensor.transpose,)))


class Norm(torch.nn.Module):
    """A norm of one's own: a leaf module whose forward calls a function."""

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),))


class TwiceNormed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = Norm()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.norm(self.proj(self.norm(x))).sum()


def test_a_module_called_twice_continues_its_op_count():
    model = TwiceNormed()
    with capture(model) as cap:
        model(torch.randn(2, 4))
        it = cap.end_iteration()
    # its own leaf module: both its output (norm, norm#2) and the op inside it are stages
    assert list(it.forward) == ["norm/rms_norm#1", "norm", "proj", "norm/rms_norm#2", "norm#2"]


def test_residual_rule_only_takes_adds_of_the_blocks_shape():
    accepts = ops.OPS["add"].accepts
    assert accepts is not None
    x = torch.randn(2, 3, 4)
    call = ops.OpCall(torch.add, (x, x), {}, x + x, ops.Frame("b", True, (2, 3, 4)), lambda t: None)
    assert accepts(call)
    half = x[..., :2]
    assert not accepts(ops.OpCall(torch.add, (half, half), {}, half + half, call.frame, lambda t: None))
    assert not accepts(ops.OpCall(torch.add, (x, 1.0), {}, x + 1, call.frame, lambda t: None))


# ------------------------------------------------------------------------------ lifecycle, no host sync
def test_the_mode_and_hooks_are_gone_after_a_forward_that_raises():
    model = FunctionalGPT(layers=1)
    idx, targets = next(functional_batches())
    with pytest.raises(ValueError, match="batch_size"), capture(model):
        model(idx, targets[:, :3])  # wrong target shape: cross_entropy raises inside the forward
    assert torch._C._len_torch_function_stack() == 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with capture(model) as cap:  # and a capture after it records from the start
        model(idx, targets)
        assert torch._C._len_torch_function_stack() == 0  # only while the forward runs
        it = cap.end_iteration()
    assert list(it.forward)[:2] == ["wte", "rms_norm#1"]


def test_the_mode_is_only_on_while_the_model_runs():
    model = FunctionalGPT(layers=1)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(torch._C._len_torch_function_stack()))
    with capture(model) as cap:
        loss = model(*next(functional_batches()))
        outside = F.relu(torch.randn(3, 3))  # not in a forward: not a stage
        loss.backward()
        it = cap.end_iteration(loss)
    assert seen == [1] and outside is not None
    assert "relu#1" not in it.forward and len(it.forward) == 2 + len(BLOCK_STAGES) + 4


def test_a_paused_capture_records_no_ops():
    model = FunctionalGPT(layers=1)
    with capture(model) as cap:
        with cap.paused():
            model(*next(functional_batches()))
        assert cap._pending.empty


# ------------------------------------------------------------------------------ the marker, the option, the CLI
def _settings(tmp_path, **kwargs):
    from pytest_gpttrace.settings import Settings

    return Settings(enabled=True, update=False, recalibrate=False, golden_dir=tmp_path, results_dir=tmp_path,
                    report_dir=None, rootdir=tmp_path, profile="auto", tolerances=(), iterations=3,
                    calibration=False, dithers=2, replay=None, allow=(), thresholds={}, **kwargs)


def test_the_markers_ops_change_the_ini_list_or_replace_it(tmp_path):
    from pytest_gpttrace.markers import parse_marker

    settings = _settings(tmp_path, ops=("!matmul",))
    assert parse_marker((), {}, settings).ops == ("!matmul",)
    assert parse_marker((), {"ops": "+tanh"}, settings).ops == ("!matmul", "+tanh")
    assert parse_marker((), {"ops": ["rms_norm", "+tanh"]}, settings).ops == ("rms_norm", "+tanh")
    for bad in (3, [""], [], "!"):
        with pytest.raises(ValueError, match=r"^@pytest.mark.gpt_trace\(ops="):
            parse_marker((), {"ops": bad}, settings)


OPTION_CONFTEST = """
import pytest
from tests.functional_models import FunctionalGPT, functional_batches

@pytest.fixture
def gpt_model():
    return FunctionalGPT(layers=1)

@pytest.fixture
def gpt_batches():
    return functional_batches()
"""

OPTION_TESTS = """
import pytest

def test_default(gpt_trace):
    print("STAGES", sorted({n.split("#")[0] for n in gpt_trace.iterations[0].forward if "#" in n}))

@pytest.mark.gpt_trace(ops=["+tanh", "!matmul"])
def test_ops(gpt_trace):
    print("STAGES", sorted({n.split("#")[0] for n in gpt_trace.iterations[0].forward if "#" in n}))

@pytest.mark.gpt_trace(ops="+nope")
def test_unknown(gpt_trace):
    pass
"""


def test_the_granularity_option_and_the_markers_ops_reach_the_tracer(pytester, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    pytester.makeconftest(OPTION_CONFTEST)
    pytester.makepyfile(test_option=OPTION_TESTS)
    result = run(pytester, "--gpt-trace", "-s", "--gpt-trace-granularity", "modules", "-k", "default")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*STAGES []*"])  # modules: no op stages
    result = run(pytester, "--gpt-trace", "-s", "-k", "ops or unknown")
    result.assert_outcomes(passed=1, errors=1)  # a marker that cannot work errors its test
    result.stdout.fnmatch_lines(["*STAGES *'softcap', 'tanh'*", "*test_unknown*ops=?'+nope'?)*unknown op 'nope'*"])
    result = run(pytester, "--gpt-trace", "--gpt-trace-granularity", "leaves")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpt-trace-granularity: unknown granularity 'leaves'*"])


def test_gpttrace_run_takes_a_granularity(tmp_path):
    from pytest_gpttrace.cli import main as gpttrace
    from pytest_gpttrace.traceio import read_trace

    out = tmp_path / "t.json"
    args = ["run", "--depth", "1", "--sequence-len", "16", "--vocab-size", "64", "--iterations", "1",
            "--json", str(out)]
    assert gpttrace([*args, "--granularity", "ops", "--ops", "!matmul"]) == 0
    names = list(read_trace(out).iterations[0].forward)
    assert "blocks.0.attn/scaled_dot_product_attention#1" in names and "blocks.0.attn.q_rope" in names
    assert not any("/matmul#" in n for n in names)
    with pytest.raises(SystemExit) as exc:
        gpttrace([*args, "--granularity", "ops", "--ops", "nope"])
    assert exc.value.code == 2


class OneTap(torch.nn.Module):
    gpttrace_tap = True

    def forward(self, x):
        return x


def test_one_tap_of_ones_own_is_said_to_leave_the_rest_out_and_ops_keeps_both():
    model = FunctionalGPT(layers=1)
    attn: Any = model.blocks[0].attn
    attn.scores = OneTap()
    original = attn.forward

    def forward(x, *args, **kwargs):  # the tap sees the attention's output
        return attn.scores(original(x, *args, **kwargs))

    attn.forward = forward
    only_taps = trace_training(model, functional_batches(), functional_optimizer(model), iterations=1)
    assert list(only_taps.iterations[0].forward) == ["blocks.0.attn.scores"]
    note = only_taps.environment["granularity"]
    assert note.startswith("taps (auto: the model has 1 tap; its ") and "granularity='ops'" in note
    both = trace_training(model, functional_batches(), functional_optimizer(model), iterations=1,
                          granularity="ops")
    assert "blocks.0.attn.scores" in both.iterations[0].forward and "blocks.0.attn/rotary#1" in both.iterations[0].forward
    assert both.environment["granularity"] == "ops"
    reference, batches, _ = tiny_reference()
    with capture(reference) as cap:
        reference(*next(batches))
        cap.end_iteration()
    assert cap.trace().environment["granularity"].startswith("taps (auto: the model has ")


class RootResidualGPT(torch.nn.Module):
    """The residual adds in the root's forward, around blocks that return their branch only."""

    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(64, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))
        self.lm_head = torch.nn.Linear(16, 64)

    def forward(self, idx, targets):
        x = self.wte(idx)
        for block in self.blocks:
            x = x + block(F.rms_norm(x, (16,)))
        logits = self.lm_head(x)
        return F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1))


def test_residual_adds_in_the_root_forward_are_stages():
    model = RootResidualGPT()
    with capture(model) as cap:
        model(*next(functional_batches()))
        it = cap.end_iteration()
    assert list(it.forward) == ["wte", "rms_norm#1", "blocks.0", "add#1", "rms_norm#2", "blocks.1", "add#2",
                                "lm_head", "cross_entropy#1"]


class CastingLinear(torch.nn.Linear):
    """nanochat's Linear: casts its weight to the input's dtype in forward."""

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))


def test_a_subclass_of_a_torch_leaf_module_is_one_stage():
    model = torch.nn.Sequential(CastingLinear(8, 8), torch.nn.ReLU())
    with capture(model, granularity="ops") as cap:
        model(torch.randn(2, 8))
        it = cap.end_iteration()
    assert list(it.forward) == ["0", "1"]


# ------------------------------------------------------------------------------ rules that must not misfire
class Pure(torch.nn.Module):
    """No submodules at all: parameters and functions."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Parameter(torch.randn(64, 16))
        self.w = torch.nn.Parameter(torch.randn(16, 64) * 0.1)

    def forward(self, idx, targets):
        x = F.rms_norm(self.emb[idx], (16,))
        logits = F.relu(x) @ self.w
        return F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1))


def test_a_model_of_plain_functions_is_traced_by_its_ops_and_refused_per_module():
    model = Pure()
    trace = trace_training(model, functional_batches(), [torch.optim.SGD(model.parameters(), lr=0.1)], iterations=1)
    assert list(trace.iterations[0].forward) == ["rms_norm#1", "relu#1", "matmul#1", "cross_entropy#1"]
    with pytest.raises(CaptureError, match=r"^Pure has no stages to trace at granularity 'modules': .*'ops'"):
        capture(model, granularity="modules")


class Heads(torch.nn.Module):
    """Multi-head attention written as a list of heads joined along the last dimension."""

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 4) for _ in range(2))
        self.act = NewGELU()

    def forward(self, x):
        y = torch.cat([h(x) for h in self.heads], dim=-1)
        y = torch.where(y > 0, y, 0.01 * y)  # a leaky activation, not a mask
        return x + self.act(y)


class NewGELU(torch.nn.Module):
    """Hugging Face's GPT-2 activation: a leaf module with an add of its input's shape."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))


def test_joined_heads_a_leaky_where_and_an_activations_add_are_not_rotary_mask_or_residual():
    model = torch.nn.Sequential(Heads())
    with capture(model, granularity="ops") as cap:
        model(torch.randn(2, 3, 8))
        it = cap.end_iteration()
    assert list(it.forward) == ["0.heads.0", "0.heads.1", "0.act", "0/add#1"]
    assert cap.trace().stage_kinds["0/add#1"] == "residual"


class Masker(torch.nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, scores):
        return self.fill(scores)


CAUSAL = torch.ones(4, 4, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("fill", [
    lambda s: s.masked_fill(CAUSAL, float("-inf")),
    lambda s: s.masked_fill(CAUSAL, -1e9),
    lambda s: torch.where(CAUSAL, torch.finfo(s.dtype).min, s),
], ids=["masked_fill -inf", "masked_fill -1e9", "where finfo.min"])
def test_a_mask_is_a_large_negative_fill(fill):
    model = torch.nn.Sequential(Masker(fill))
    with capture(model, granularity="ops") as cap:
        model(torch.randn(1, 4, 4))
        it = cap.end_iteration()
    assert list(it.forward) == ["0/mask#1", "0"]  # the op, then the leaf module of its own
