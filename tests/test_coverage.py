"""Coverage: a checkpoint's recomputation is not recorded, and a stage that fired otherwise (missing in
an iteration, twice, never) is said so in the trace and in a comparison, apart from the numbers."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pytest_gpttrace import capture, trace_training
from pytest_gpttrace.compare import compare
from pytest_gpttrace.coverage import Coverage, calls, gaps, iterations_text, site
from pytest_gpttrace.errors import TraceFormatError
from pytest_gpttrace.report import render_comparison
from pytest_gpttrace.trace import Trace, dumps, loads
from reference_model import GPT, optimizers, synthetic_batches
from tests.builders import make_iteration as it
from tests.builders import make_stats
from tests.functional_models import FunctionalGPT, functional_batches, functional_optimizer, norm
from tests.models import SMALL_CONFIG

ITERATIONS = 2  # the second iteration follows a step: the recomputation runs on moved weights
S = make_stats((4,), mean=0.5, std=1.0, min=-1.0, max=2.0, rms=1.2, zero_frac=0.25)


class CheckpointedGPT(FunctionalGPT):
    """FunctionalGPT with every block called through torch.utils.checkpoint (as Hugging Face's
    gradient checkpointing does: the block's own hooks run again in the recomputation)."""

    def __init__(self, reentrant: bool, **kwargs):
        super().__init__(**kwargs)
        self.reentrant = reentrant

    def forward(self, idx, targets):
        T = idx.shape[1]
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))
        for block in self.blocks:
            x = checkpoint(block, x, cos, sin, use_reentrant=self.reentrant)
        logits = self.lm_head(norm(x)).float()
        logits = self.softcap * torch.tanh(logits / self.softcap)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def trace_functional(model, granularity):
    return trace_training(model, functional_batches(), functional_optimizer(model), iterations=ITERATIONS,
                          granularity=granularity)


def assert_same_trace(plain: Trace, other: Trace, *, stage_grads: bool = True):
    assert len(plain.iterations) == len(other.iterations)
    for a, b in zip(plain.iterations, other.iterations, strict=True):
        assert list(b.forward) == list(a.forward)  # names and order: no name#2 from the recomputation
        assert b.forward == a.forward
        assert b.loss == a.loss
        assert b.param_grads == a.param_grads
        if stage_grads:
            assert list(b.stage_grads) == list(a.stage_grads)
            assert b.stage_grads == a.stage_grads


@pytest.fixture(scope="module", params=["modules", "ops"])
def plain(request):
    return request.param, trace_functional(FunctionalGPT(), request.param)


def test_non_reentrant_checkpoint_gives_the_same_stages_and_statistics(plain):
    granularity, expected = plain
    got = trace_functional(CheckpointedGPT(reentrant=False), granularity)
    assert_same_trace(expected, got)
    assert not expected.coverage and not got.coverage
    assert "blocks.0.attn.c_q" in got.iterations[0].stage_grads  # gradients came from the first forward


def test_reentrant_checkpoint_gives_the_same_forward_and_says_which_gradients_it_lacks(plain):
    granularity, expected = plain
    got = trace_functional(CheckpointedGPT(reentrant=True), granularity)
    assert_same_trace(expected, got, stage_grads=False)
    for a, b in zip(expected.iterations, got.iterations, strict=True):
        # a module stage called once has its gradient hooked on the recomputed output
        modules = [s for s in a.stage_grads if "/" not in s]
        assert {s: b.stage_grads[s] for s in modules} == {s: a.stage_grads[s] for s in modules}
        lacking = [s for s in a.stage_grads if s not in b.stage_grads]
        assert lacking == [s for s in a.stage_grads if s in got.coverage.no_grad]
    if granularity == "ops":  # ops are not seen in the recomputation: their gradients are noted
        assert "blocks.0.attn/rotary#1" in got.coverage.no_grad
        assert "blocks.0.attn/rotary#1" in got.iterations[0].forward
        assert not any(s.startswith("blocks.") for s in got.iterations[0].stage_grads if "/" in s)
    else:
        assert got.coverage == Coverage()


def test_a_module_called_twice_under_reentrant_checkpoint_gets_no_gradient_rather_than_a_wrong_one():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.Linear(8, 8)

        def forward(self, x):
            return checkpoint(lambda y: self.ln(self.ln(y)), x, use_reentrant=True).sum()

    model = Twice()
    with capture(model, granularity="modules") as cap:
        x = torch.randn(2, 8, requires_grad=True)
        model(x).backward()
        cap.end_iteration()
    trace = cap.trace()
    assert list(trace.iterations[0].forward) == ["ln", "ln#2"]
    assert trace.iterations[0].stage_grads == {}
    assert trace.coverage.no_grad == ("ln", "ln#2")


def test_the_reference_model_with_checkpointed_blocks_gives_the_same_taps_trace(monkeypatch):
    def run():
        model = GPT(SMALL_CONFIG, seed=3)
        return model, trace_training(model, synthetic_batches(SMALL_CONFIG, seed=3), optimizers(model),
                                     iterations=ITERATIONS)

    _, expected = run()
    assert not expected.coverage  # every tap fires in every iteration: the goldens get no coverage field
    from reference_model import gpt

    forward = gpt.Block.forward

    def checkpointed(self, x, cos, sin):
        return checkpoint(forward, self, x, cos, sin, use_reentrant=False)

    monkeypatch.setattr(gpt.Block, "forward", checkpointed)
    _, got = run()
    assert "blocks.0.attn.q_rope" in got.iterations[0].forward
    assert_same_trace(expected, got)
    assert not got.coverage


def test_a_forward_only_capture_under_no_grad_notes_nothing():
    model = CheckpointedGPT(reentrant=False)
    idx, targets = next(functional_batches())
    with torch.no_grad(), capture(model, granularity="ops") as cap:
        model(idx, targets)
        cap.end_iteration()
    assert cap.trace().coverage == Coverage()


# ------------------------------------------------------------------------------------ in the trace
class Branchy(nn.Module):
    """A stage that fires in iteration 0 only, one that fires twice in iteration 1, one never."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.sometimes = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = self.a(x)
        if self.calls == 1:
            y = self.sometimes(y)
        else:
            y = self.a(y)
        return y.square().mean()


def trace_branchy():
    model = Branchy()
    torch.manual_seed(0)
    return trace_training(model, iter([torch.randn(2, 4)] * 2), iterations=2, granularity="modules",
                          loss_fn=lambda m, x: m(x))


def test_the_trace_records_stages_missing_from_an_iteration_and_selected_stages_that_never_fired():
    trace = trace_branchy()
    assert list(trace.iterations[0].forward) == ["a", "sometimes"]
    assert list(trace.iterations[1].forward) == ["a", "a#2"]
    assert trace.coverage == Coverage(missing={"sometimes": (1,), "a#2": (0,)}, never_fired=("unused",))
    text = dumps(trace)
    assert json.loads(text)["coverage"] == {"missing": {"sometimes": [1], "a#2": [0]}, "never_fired": ["unused"]}
    assert loads(text) == trace


def test_the_coverage_rule_warns_of_a_stage_missing_in_an_iteration_and_notes_modules_that_never_ran():
    from pytest_gpttrace.anomalies import detect

    found = [(a.severity.value, a.iteration, a.stage, a.symptom) for a in detect(trace_branchy()) if a.rule == "coverage"]
    assert found == [
        ("warning", 0, "a#2", "a#2 did not fire in iteration 0 (it did in the others)"),
        ("warning", 1, "sometimes", "sometimes did not fire in iteration 1 (it did in the others)"),
        ("info", None, None, "1 selected module never ran: unused"),
    ]


def test_a_trace_that_covers_every_stage_writes_no_coverage_field():
    trace = Trace({}, {}, (it(0, forward={"x": S}),))
    assert '"coverage"' not in dumps(trace)
    assert loads(dumps(trace)).coverage == Coverage()


@pytest.mark.parametrize("value, message", [
    ({"missing": {"x": ["1"]}}, "missing: expected an object of stage name -> list of iteration indices"),
    ({"never_fired": "x"}, "never_fired: expected a list of stage names"),
    ({"skipped": []}, "unknown key 'skipped'"),
])
def test_a_malformed_coverage_names_its_json_path(value, message):
    doc = json.loads(dumps(Trace({}, {}, (it(0, forward={"x": S}),))))
    doc["coverage"] = value
    with pytest.raises(TraceFormatError, match=r"\$\.coverage") as info:
        loads(json.dumps(doc))
    assert message in str(info.value)


def test_call_sites_and_their_counts():
    assert site("ln#2") == ("ln", 2) and site("ln") == ("ln", 1) and site("m/add#1") == ("m/add", 1)
    assert calls(["ln", "ln#2", "m/add#1", "m/add#2", "x[0]"]) == {"ln": 2, "m/add": 2, "x[0]": 1}
    assert gaps([["a", "b"], ["a"], ["a", "c"]]) == {"b": (1, 2), "c": (0, 1)}
    assert iterations_text((1,)) == "iteration 1"
    assert iterations_text((0, 2)) == "iterations 0, 2"
    assert iterations_text((0, 1, 2)) == "iterations 0-2"


# ------------------------------------------------------------------------------------ in a comparison
def test_a_stage_missing_in_one_iteration_is_a_coverage_finding_that_names_the_iteration():
    golden = Trace({}, {}, (it(0, forward={"x": S, "y": S}), it(1, forward={"x": S, "y": S})))
    obtained = Trace({}, {}, (it(0, forward={"x": S, "y": S}), it(1, forward={"x": S})))
    result = compare(golden, obtained)
    assert [m.stat for m in result.mismatches] == ["presence"]  # it still fails the check
    assert [f.message for f in result.coverage] == ["y (forward) missing in iteration 1"]
    lines = render_comparison(result, golden_name="g.json")
    at = lines.index("stages that fired otherwise than in the golden (coverage, not numeric differences):")
    assert lines[at + 1] == "  y (forward) missing in iteration 1"
    assert lines[at + 2].split() == ["iter", "pass", "stage", "stat", "golden", "obtained", "difference", "allowed"]


def test_a_stage_that_fired_twice_is_reported_as_such():
    golden = Trace({}, {}, tuple(it(i, forward={"ln": S}, stage_grads={"ln": S}) for i in range(3)))
    obtained = Trace({}, {}, tuple(it(i, forward={"ln": S, "ln#2": S}, stage_grads={"ln": S}) for i in range(3)))
    result = compare(golden, obtained)
    assert [f.message for f in result.coverage] == ["ln (forward) fired twice in iterations 0-2, the golden once"]
    assert [f.kind for f in result.coverage] == ["calls"]


def test_a_stage_the_golden_lacks_and_a_stage_that_never_fired_are_reported():
    golden = Trace({}, {}, (it(0, forward={"x": S}),))
    obtained = Trace({}, {}, (it(0, forward={"x": S, "new": S}),), coverage=Coverage(never_fired=("unused",)))
    result = compare(golden, obtained)
    assert [f.message for f in result.coverage] == [
        "new (forward) fired in iteration 0, not in the golden",
        "unused (forward) never fired: selected, but its module ran in no iteration",
    ]
    lines = render_comparison(result, golden_name="g.json")
    assert "selected but never fired in the obtained run: unused" in lines


def test_the_missing_recomputed_gradients_are_noted_in_a_failure():
    golden = Trace({}, {}, (it(0, forward={"x": S}, stage_grads={"x": S}),))
    obtained = Trace({}, {}, (it(0, forward={"x": S}),), coverage=Coverage(no_grad=("x",)))
    result = compare(golden, obtained)
    assert [f.message for f in result.coverage] == ["x (stage gradient) missing in iteration 0"]
    assert any(line.startswith("gradients not recorded") and line.endswith(": x")
               for line in render_comparison(result, golden_name="g.json"))


def test_matching_traces_have_no_coverage_findings():
    golden = Trace({}, {}, (it(0, forward={"x": S, "x#2": S}),))
    assert compare(golden, golden).coverage == ()
