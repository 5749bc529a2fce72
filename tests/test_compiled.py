"""A torch.compile'd model is traced as compiled, under the eager model's names: the tool adds no
graph break and no warning, and the trace compares with the eager trace of the same model; a
one-line change in the compiled model is still caught against it.

Compiling is slow on a small CPU: one small model, a few iterations, each model compiled once
(the eager trace, the compiled run without the tool, the traced compiled run and the changed model).
"""

import json
import logging
import textwrap
import warnings
from typing import cast

import pytest
import torch
from torch._dynamo.utils import counters

from pytest_gpttrace import trace_training
from pytest_gpttrace.compare import compare
from pytest_gpttrace.compiled import ENV_KEY, TRACED_COMPILED, TRACED_EAGERLY
from pytest_gpttrace.errors import CaptureError
from pytest_gpttrace.tracer import capture
from tests.models import UserBlock, UserGPT, user_batches
from tests.platforms import make_project, output, run_pytest

ITERATIONS = 3


class ScaledResidual(UserBlock):
    """UserBlock with one line changed: the attention's residual branch scaled by 1.05."""

    def forward(self, x):
        C = x.shape[-1]
        q, k, v = self.qkv(self.ln(x)).split(C, dim=-1)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + 1.05 * self.proj(y)
        return x + self.ff(self.ln(x))


def model(bug: bool = False) -> UserGPT:
    m = UserGPT(layers=1)
    if bug:
        m.layers[0].__class__ = ScaledResidual
    return m


def compiled_(m: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """torch.compile(m) (typed as the module it is: an OptimizedModule)."""
    return cast(torch.nn.Module, torch.compile(m, **kwargs))


def train(m: torch.nn.Module, opt_of: torch.nn.Module | None = None, **kwargs):
    """trace_training of m (a model, or a compiled one: then opt_of is the model it compiled)."""
    # SGD: compared under the exact profile (AdamW's first step turns a gradient's last-bit noise into
    # a full step: see the calibrated golden below)
    opt = torch.optim.SGD((opt_of or m).parameters(), lr=0.1)
    return trace_training(m, user_batches(), opt, iterations=ITERATIONS, **kwargs)


def breaks() -> int:
    return sum(counters["graph_break"].values())


def untraced_steps(m: torch.nn.Module, steps: int) -> None:
    batches = user_batches()
    for _ in range(steps):
        _, loss = m(*next(batches))
        loss.backward()


@pytest.fixture(scope="module")
def runs():
    eager = train(model(), granularity="modules")
    # the compiled model without the tool: its own graph breaks, and torch's compiler warmed up (the
    # warnings torch's own imports raise when it first compiles are not the tool's)
    plain = model()
    compiled = compiled_(plain)
    before = breaks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untraced_steps(compiled, 2)
    own_breaks = breaks() - before
    plain.zero_grad(set_to_none=True)
    # the same compiled model, traced (a fresh copy of its weights: the untraced steps took none)
    fresh = model()
    compiled = compiled_(fresh)
    before = breaks()
    with warnings.catch_warnings(record=True) as seen, _torch_log_records() as logged:
        warnings.simplefilter("always")
        traced = train(compiled, fresh)
    return {"eager": eager, "traced": traced, "own_breaks": own_breaks, "tool_breaks": breaks() - before,
            "warnings": [str(w.message) for w in seen], "logged": logged}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.getMessage()}")


class _torch_log_records:
    """The WARNING and worse records torch's loggers emit inside the block."""

    def __enter__(self):
        self.handler = _Records()
        logging.getLogger("torch").addHandler(self.handler)
        return self.handler.records

    def __exit__(self, *exc):
        logging.getLogger("torch").removeHandler(self.handler)


def test_a_compiled_model_is_traced_under_the_eager_names(runs):
    eager, traced = runs["eager"], runs["traced"]
    assert traced.model == eager.model == "UserGPT"
    assert traced.parameters == eager.parameters and not any("_orig_mod" in n for n in traced.parameters)
    assert traced.config == eager.config
    for e, c in zip(eager.iterations, traced.iterations, strict=True):
        assert list(c.forward) == list(e.forward)
        assert sorted(c.stage_grads) == sorted(e.stage_grads) and len(c.stage_grads) == len(c.forward)
        assert list(c.param_grads) == list(e.param_grads)
    assert "layers.0.ln#2" in traced.iterations[0].forward  # a module called twice is a stage per call
    assert traced.environment[ENV_KEY] == TRACED_COMPILED and ENV_KEY not in eager.environment
    assert traced.stage_kinds == eager.stage_kinds and traced.stage_kinds["layers.0.ln"] == "norm_affine"
    assert not traced.coverage  # every stage fired, though the hooks ran inside the compiled graph


def test_the_tool_adds_no_graph_break_and_no_warning(runs):
    assert runs["own_breaks"] == 0  # the model compiles to one graph on its own
    assert runs["tool_breaks"] == runs["own_breaks"]
    assert runs["warnings"] == []
    assert runs["logged"] == []


def test_the_compiled_trace_matches_the_eager_trace(runs):
    result = compare(runs["eager"], runs["traced"])
    assert not result.mismatches, result.mismatches[:3]
    # the compiled kernels differ from the eager ones in the last bits, far inside the tolerances
    assert result.worst is not None and result.worst.fraction < 0.5, result.worst


def test_a_one_line_change_in_the_compiled_model_is_caught_against_the_eager_trace(runs):
    bad = model(bug=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = train(compiled_(bad), bad)
    result = compare(runs["eager"], traced)
    assert result.mismatches
    first = result.mismatches[0]
    assert (first.iteration, first.stage) == (0, "layers.0.ln#2"), first


def test_the_ops_granularity_runs_a_compiled_model_eagerly_and_says_so():
    eager = train(model(), granularity="ops")
    fresh = model()
    compiled = compiled_(fresh)
    before = breaks()
    traced = train(compiled, fresh, granularity="ops")
    assert breaks() == before
    assert traced.environment[ENV_KEY] == TRACED_EAGERLY
    assert list(traced.iterations[0].forward) == list(eager.iterations[0].forward)
    assert "layers.0/scaled_dot_product_attention#1" in traced.iterations[0].forward
    assert not compare(eager, traced).mismatches


def test_auto_on_a_compiled_model_without_taps_is_modules_and_paused_steps_are_not_recorded():
    fresh = model()
    compiled = compiled_(fresh, backend="aot_eager")  # no kernels to build: the hooks are what is tested
    batches = user_batches()
    with capture(compiled) as cap:
        assert cap.granularity == "modules"
        with cap.paused():
            _, loss = compiled(*next(batches))
            loss.backward()
        fresh.zero_grad(set_to_none=True)
        _, loss = compiled(*next(batches))
        loss.backward()
        it = cap.end_iteration(loss=loss)
    assert len(cap.iterations) == 1 and len(it.forward) == len(it.stage_grads) == 10


# ------------------------------------------------------------------------------ against an eager golden
CONFTEST = textwrap.dedent('''
    import json
    import os
    import warnings

    import pytest
    import torch
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    from tests.models import UserBlock, UserGPT, user_batches

    with warnings.catch_warnings():  # torch's own deprecation warnings as it first imports its compiler
        warnings.simplefilter("ignore")
        import torch._inductor.compile_fx

    class ScaledResidual(UserBlock):
        def forward(self, x):
            C = x.shape[-1]
            q, k, v = self.qkv(self.ln(x)).split(C, dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + 1.05 * self.proj(y)
            return x + self.ff(self.ln(x))

    @pytest.fixture
    def gpt_model():
        model = UserGPT(layers=1)
        if os.environ.get("BUG") == "1":
            model.layers[0].__class__ = ScaledResidual
        return torch.compile(model) if os.environ.get("COMPILE") == "1" else model

    @pytest.fixture
    def gpt_batches():
        return user_batches()

    def pytest_sessionfinish(session):
        with open(os.environ["BREAKS_FILE"], "w") as f:
            json.dump(sum(counters["graph_break"].values()), f)
''')

TEST = textwrap.dedent('''
    import pytest

    @pytest.mark.gpt_trace(iterations=3, seed=3)
    def test_user_model(gpt_trace, gpt_golden):
        assert gpt_trace == gpt_golden
''')


def test_a_compiled_model_passes_the_calibrated_golden_of_its_eager_model(tmp_path):
    ini = "[pytest]\ngpt_trace = true\ngpt_trace_granularity = modules\nfilterwarnings = error\n"
    project = make_project(tmp_path / "project", ini=ini, conftest=CONFTEST, test_user=TEST)
    breaks = tmp_path / "breaks.json"
    env = {"BREAKS_FILE": breaks, "TORCHINDUCTOR_CACHE_DIR": tmp_path / "inductor"}
    done = run_pytest(project, "native", "--update-golden", **env)
    assert done.returncode == 0, output(done)
    golden = json.loads(next((project / "golden").rglob("*.json")).read_text())
    assert golden["model"] == "UserGPT" and "calibration" in golden
    done = run_pytest(project, "native", COMPILE=1, **env)
    assert done.returncode == 0, output(done)
    assert json.loads(breaks.read_text()) == 0
    assert "warnings summary" not in output(done) and "Warning:" not in output(done)
    done = run_pytest(project, "native", COMPILE=1, BUG=1, **env)
    assert done.returncode == 1, output(done)
    assert "first divergence: layers.0.ln#2 (forward), iteration 0" in output(done)


def test_autocast_inside_a_compiled_model_is_recorded_without_a_graph_break():
    class Autocast(UserGPT):
        def forward(self, idx, targets):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super().forward(idx, targets)

    fresh = Autocast(layers=1)
    before = breaks()
    traced = train(compiled_(fresh, backend="aot_eager"), fresh)
    assert breaks() == before
    assert traced.environment["autocast"] == "cpu torch.bfloat16"
    assert traced.iterations[0].forward["layers.0.qkv"].dtype == "torch.bfloat16"


def test_a_stage_output_modified_in_place_keeps_its_gradient():
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.relu, self.b = torch.nn.Linear(8, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 1)

        def forward(self, x):
            return self.b(self.relu(self.a(x))).sum()

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    traces = []
    for m in (InPlace(), compiled_(InPlace(), backend="aot_eager")):
        with capture(m, granularity="modules") as cap:
            loss = m(x)
            loss.backward()
            traces.append(cap.end_iteration(loss=loss))
    eager, traced = traces
    assert list(traced.forward) == list(eager.forward) == ["a", "relu", "b"]
    assert sorted(traced.stage_grads) == sorted(eager.stage_grads) == ["a", "b", "relu"]
    for name, s in eager.stage_grads.items():
        assert traced.stage_grads[name].mean == pytest.approx(s.mean, rel=1e-5, abs=1e-7)


def test_a_submodule_compiled_on_its_own_is_refused_in_one_line():
    m = model()
    m.layers[0] = cast(torch.nn.Module, torch.compile(m.layers[0]))
    with pytest.raises(CaptureError, match=r"^UserGPT\.layers\.0 is compiled on its own .*torch\.compile\(model\)"):
        capture(m)
