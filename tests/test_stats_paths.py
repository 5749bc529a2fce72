"""The two statistics paths (fused compiled kernel, eager fallback): agreement with float64, no host
synchronisation inside a step, and the fallback when torch.compile cannot run."""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pytest_gpttrace import capture, stats, trace_training
from pytest_gpttrace.compare import EXACT, compare_stats
from pytest_gpttrace.errors import CaptureError
from pytest_gpttrace.trace import TensorStats
from tests.functional_models import FunctionalGPT, functional_batches
from tests.models import tiny_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fused_everywhere(monkeypatch):
    """The fused kernel for every tensor of 2+ elements (it normally starts at FUSED_MIN_NUMEL), and
    a failure if it cannot run here: the fast path must be tested, not silently replaced."""
    path, note = stats.prepare("auto")
    assert path == "compiled", f"torch.compile cannot build the statistics kernel on this machine: {note}"
    monkeypatch.setattr(stats, "FUSED_MIN_NUMEL", 2)
    calls = []
    real = stats._COMPILED.__call__

    def counted(self, x):
        calls.append(x.numel())
        return real(x)

    monkeypatch.setattr(stats._Compiled, "__call__", counted)
    return calls


def oracle(a: np.ndarray, dtype: torch.dtype) -> TensorStats:
    """float64 statistics of the values a holds, with numpy's NaN/Inf semantics."""
    x = a.astype(np.float64).ravel()
    n = x.size
    with np.errstate(all="ignore"):
        return TensorStats(
            shape=a.shape, dtype=str(dtype), device="cpu", numel=n,
            mean=float(x.mean()), std=float(x.std(ddof=1)) if n > 1 else (0.0 if np.isfinite(x).all() else math.nan),
            min=float(x.min()), max=float(x.max()), rms=float(np.sqrt((x * x).mean())),
            zero_frac=float((x == 0).mean()), nan=int(np.isnan(x).sum()), inf=int(np.isinf(x).sum()),
        )


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
BOUND = {"float32": 1e4, "float64": 1e4, "bfloat16": 1e4, "float16": 6e4 ** 0.5}  # float16: squares stay finite

values = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
specials = st.sampled_from([0.0, 0.0, float("nan"), float("inf"), float("-inf")])


@st.composite
def tensors(draw):
    """A tensor as the model produces them: any floating dtype, a mean possibly far from zero, runs
    of exact zeros, and now and then NaN or Inf."""
    name = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=24))
    a = draw(hnp.arrays(np.float64, shape, elements=values))
    a = a / 1e4 * BOUND[name] + draw(st.sampled_from([0.0, 0.0, 1.0, -300.0, BOUND[name] * 0.9]))
    if draw(st.booleans()):
        flat = a.reshape(-1)
        for i in draw(st.lists(st.integers(0, flat.size - 1), max_size=4)):
            flat[i] = draw(specials)
    t = torch.from_numpy(a).to(DTYPES[name])
    return t


def assert_matches_oracle(t: torch.Tensor, path: str):
    got = stats.tensor_stats(t, path)
    ref = oracle(t.to(torch.float64).numpy() if t.dtype != torch.float64 else t.numpy(), t.dtype)
    assert got.shape == tuple(t.shape) and got.numel == t.numel()
    mismatches = compare_stats(0, "forward", "x", ref, got, EXACT)
    assert not mismatches, "\n".join(f"{m.stat}: float64 {m.golden!r}, {path} {m.obtained!r}" for m in mismatches)


def sparse_gradient() -> torch.Tensor:
    """An embedding table's gradient: 1% of its rows touched, its first element far from the rest
    (a shift from the first element lost 5e-6 of the std in float64 sums)."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(16384, 256)
    rows = torch.randint(0, 16384, (160,), generator=g)
    x[rows] = torch.randn(160, 256, generator=g) * 1e-3
    x[0, 0] = 0.2
    return x


EDGE_CASES = [
    torch.full((5000,), 3.25),  # all equal: std exactly 0
    torch.zeros(300, 7),  # all zero
    torch.tensor([1e4, 1e4 + 2 ** -10 * 8] * 40),  # large mean, tiny spread
    torch.tensor([1e4] + [1e-3] * 999),  # the shift (the first element) is an outlier
    sparse_gradient(),  # an embedding gradient: one hot row first, the rest mostly zero
    torch.tensor([float("nan")] + [1.0] * 99),
    torch.tensor([float("inf"), 2.0, -1.0] * 30),
    torch.tensor([float("inf"), float("-inf"), 0.0] * 30),
    torch.linspace(-1, 1, 4097).to(torch.bfloat16),
    torch.randn(64, 129, dtype=torch.float64) * 1e-30,
    torch.randn(3000) * 1e30,  # blown-up logits: squares overflow float32, not float64
    torch.tensor([3e38, -3e38, 1e37] * 50),
    torch.tensor([float("nan")]),  # one element: std NaN, not 0
]


@pytest.mark.parametrize("path, rtol", [("compiled", 1e-9), ("eager", 1e-6)])  # float64 / float32 sums
def test_a_far_first_element_costs_no_digits_of_the_std(path, rtol, fused_everywhere):
    """The shift comes from near the mean, so the sums keep their digits (a shift from the first
    element left the compiled std 4.5e-6 off)."""
    x = sparse_gradient()
    exact = x.to(torch.float64).std().item()
    std = stats.tensor_stats(x, path).std
    assert std is not None and abs(std - exact) <= rtol * exact


@pytest.mark.parametrize("t", EDGE_CASES, ids=lambda t: f"{t.dtype}-{t.numel()}")
def test_both_paths_agree_with_float64_on_edge_cases(t, fused_everywhere):
    assert_matches_oracle(t, "compiled")
    assert fused_everywhere or t.numel() < 2, "the fused kernel did not run"
    assert_matches_oracle(t, "eager")


@given(tensors())
@example(torch.full((7,), 3.0))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the patch holds for every example
def test_fused_path_agrees_with_float64(fused_everywhere, t):
    if t.numel() >= 2:
        fused_everywhere.clear()
    assert_matches_oracle(t, "compiled")
    assert t.numel() < 2 or fused_everywhere == [t.numel()]


@given(tensors())
def test_eager_path_agrees_with_float64(t):
    assert_matches_oracle(t, "eager")


def test_large_tensors_take_the_fused_path_and_agree_with_eager():
    path, note = stats.prepare("auto")
    assert path == "compiled", note
    x = torch.randn(1 << 20) * 3 + 0.5
    x[::97] = 0.0
    a, b = stats.tensor_stats(x, "compiled"), stats.tensor_stats(x, "eager")
    assert not compare_stats(0, "forward", "x", b, a, EXACT)
    assert stats._use_fused(x) and not stats._use_fused(x[::2]) and not stats._use_fused(x.to(torch.int32))


# ------------------------------------------------------------------------------ no host sync in a step
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


@pytest.fixture
def host_reads(monkeypatch):
    """Records every call that brings a tensor's value to the host, by method name."""
    calls = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def two_steps_each_read_back_once(model, idx, targets, host_reads):
    """Two traced steps: nothing read back inside a step, one copy (cpu, tolist) at its end."""
    with capture(model) as cap:
        for i in range(2):
            host_reads.clear()
            loss = model(idx, targets)
            loss.backward()
            assert host_reads == [], f"read back inside the step: {host_reads}"
            cap.end_iteration(loss=loss)
            assert sorted(host_reads) == ["cpu", "tolist"], f"iteration {i}: {host_reads}"
            model.zero_grad(set_to_none=True)
    return cap


@pytest.mark.parametrize("path", ["compiled", "eager"])
def test_a_step_with_functional_stages_reads_back_to_the_host_once(path, host_reads, monkeypatch, fused_everywhere):
    if path == "eager":
        monkeypatch.setenv(stats.ENV_VAR, "eager")
    model = FunctionalGPT()
    idx, targets = next(functional_batches())
    cap = two_steps_each_read_back_once(model, idx, targets, host_reads)
    it = cap.iterations[1]
    assert cap.granularity == "ops" and "blocks.0.attn/scaled_dot_product_attention#1" in it.stage_grads
    assert sum("/" in name for name in it.forward) > 20
    assert (len(fused_everywhere) > 50) == (path == "compiled")


@pytest.mark.parametrize("path", ["compiled", "eager"])
def test_a_traced_step_reads_back_to_the_host_once(path, host_reads, monkeypatch, fused_everywhere):
    if path == "eager":
        monkeypatch.setenv(stats.ENV_VAR, "eager")
    model, batches, _ = tiny_reference()
    idx, targets = next(batches)
    cap = two_steps_each_read_back_once(model, idx, targets, host_reads)
    it = cap.iterations[1]
    assert len(it.forward) > 40 and len(it.stage_grads) > 40 and len(it.param_grads) > 10
    assert cap.zero_params and it.loss == pytest.approx(math.log(128), rel=1e-6)
    assert cap.trace().environment["stats_path"] == path
    assert (len(fused_everywhere) > 100) == (path == "compiled")


# ------------------------------------------------------------------------------ choosing and falling back
def test_the_environment_variable_chooses_the_path(monkeypatch):
    model, batches, opts = tiny_reference()
    monkeypatch.setenv(stats.ENV_VAR, "eager")
    trace = trace_training(model, batches, opts, iterations=1)
    assert trace.environment["stats_path"] == "eager" and "stats_note" not in trace.environment
    monkeypatch.setenv(stats.ENV_VAR, "fast")
    with pytest.raises(CaptureError, match="GPTTRACE_STATS_PATH='fast' is not a statistics path: use one of auto"):
        trace_training(model, batches, opts, iterations=1)
    with pytest.raises(CaptureError, match="stats_path='gpu'"):
        capture(model, stats_path="gpu")


class Broken(stats._Compiled):
    def function(self):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")


def test_auto_falls_back_to_eager_and_says_why(monkeypatch):
    monkeypatch.setattr(stats, "_COMPILED", Broken())
    assert stats.prepare("auto") == ("eager", "torch.compile unavailable (RuntimeError: InvalidCxxCompiler: "
                                              "No working C++ compiler found)")
    with pytest.raises(CaptureError, match=r"GPTTRACE_STATS_PATH=compiled, but torch\.compile cannot build"):
        stats.prepare("compiled")
    model, batches, opts = tiny_reference()
    trace = trace_training(model, batches, opts, iterations=1)
    assert trace.environment["stats_path"] == "eager"
    assert "No working C++ compiler" in trace.environment["stats_note"]


def test_a_dtype_that_fails_to_compile_mid_run_falls_back_for_that_dtype(monkeypatch):
    monkeypatch.setattr(stats, "FUSED_MIN_NUMEL", 2)
    broken = stats._Compiled()
    real = broken.function()

    def flaky(x):
        if x.dtype == torch.bfloat16:
            raise RuntimeError("no bf16 kernel")
        return real(x)

    broken._fn = flaky
    monkeypatch.setattr(stats, "_COMPILED", broken)
    model, batches, opts = tiny_reference()
    trace = trace_training(model, batches, opts, iterations=1)
    env = trace.environment
    assert env["stats_path"] == "compiled" and env["stats_note"] == "eager for torch.bfloat16 on cpu (RuntimeError: no bf16 kernel)"
    assert trace.iterations[0].forward["rope.cos"].dtype == "torch.bfloat16"  # still recorded


def test_without_a_cxx_compiler_the_trace_runs_eager(tmp_path):
    """A real fallback: no compiler on PATH and an empty inductor cache."""
    script = textwrap.dedent("""
        from pytest_gpttrace import trace_training
        from tests.models import tiny_reference
        model, batches, opts = tiny_reference()
        trace = trace_training(model, batches, opts, iterations=1)
        print(trace.environment["stats_path"], "|", trace.environment.get("stats_note"))
    """)
    env = {**os.environ, "PATH": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "CXX": str(tmp_path / "no-such-compiler"), "CC": str(tmp_path / "no-such-compiler"),
           "GPTTRACE_STATS_PATH": "auto", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    path, note = done.stdout.strip().splitlines()[-1].split(" | ")
    assert path == "eager" and note.startswith("torch.compile unavailable ("), done.stdout


def test_a_disabled_torch_compile_means_eager():
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(disable=True):  # what TORCH_COMPILE_DISABLE=1 sets
        assert stats.prepare("auto") == ("eager", "torch.compile is disabled (TORCH_COMPILE_DISABLE=1)")
        with pytest.raises(CaptureError, match=r"GPTTRACE_STATS_PATH=compiled, but torch\.compile is disabled"):
            stats.prepare("compiled")
    assert stats.prepare("auto")[0] == "compiled"


def test_complex_tensors_are_summarised_over_real_and_imaginary_parts():
    x = torch.tensor([1 + 2j, 3 - 4j, 0j], dtype=torch.complex64)
    s = stats.tensor_stats(x)
    parts = np.array([1, 2, 3, -4, 0, 0], dtype=np.float64)
    assert (s.numel, s.shape, s.dtype) == (3, (3,), "torch.complex64")
    assert s.mean == pytest.approx(parts.mean()) and s.std == pytest.approx(parts.std(ddof=1))
    assert s.rms == pytest.approx(math.sqrt((parts ** 2).mean())) and s.zero_frac == pytest.approx(2 / 6)
    assert (s.min, s.max) == (-4.0, 3.0)


def test_a_step_under_inference_mode_is_traced():
    model, batches, _ = tiny_reference()
    idx, targets = next(batches)
    with capture(model) as cap:
        with torch.inference_mode():
            model(idx, targets)
        it = cap.end_iteration()
    assert it.forward["blocks.0.input"].mean == it.forward["embed.norm"].mean and not it.stage_grads


def test_a_capture_cannot_be_entered_twice_and_a_failed_step_can_be_discarded():
    model, batches, _ = tiny_reference()
    idx, targets = next(batches)
    with capture(model) as cap:
        with pytest.raises(CaptureError, match="already active"):
            cap.__enter__()
        model(idx, targets)  # a step that "fails" before its backward
        cap.discard_iteration()
        with cap.paused():  # allowed again: nothing pending
            model(idx, targets)
        loss = model(idx, targets)
        loss.backward()
        it = cap.end_iteration(loss=loss)
    assert "loss#2" not in it.forward and "loss" in it.stage_grads and len(cap.iterations) == 1


def test_a_ctrl_c_while_the_kernel_compiles_is_not_lost(monkeypatch):
    """torch's compiler can swallow a KeyboardInterrupt raised inside it (a cold cache, Ctrl-C while
    g++ builds the kernel: ``gpttrace run`` then trained on); the press is raised after the compile."""
    import contextlib
    import signal

    monkeypatch.setattr(stats, "_COMPILED", stats._Compiled())
    monkeypatch.setattr(stats, "_dynamo_disabled", lambda: False)

    def swallowing_compiler(x):
        with contextlib.suppress(BaseException):  # as the compiler's own fallback does
            signal.raise_signal(signal.SIGINT)
        return stats._eager(x)

    monkeypatch.setattr(stats._COMPILED, "function", lambda: swallowing_compiler)
    with pytest.raises(KeyboardInterrupt):
        stats.prepare("auto")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_the_kernel_keeps_its_own_compiled_entries_when_other_code_compiles_the_same_function(caplog):
    # dynamo counts compiled entries per code object against its recompile limit (8): other compiles
    # of the same function (a compiled model's graph, other kernels) must not push ours past it
    import torch._dynamo

    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) * 3:
        others = torch.compile(stats._fused, dynamic=False)
        others(torch.randn(7 + len(caplog.records), dtype=dtype))
    caplog.clear()
    with caplog.at_level("WARNING", logger="torch._dynamo"):
        fresh = stats._Compiled()
        assert fresh(torch.randn(20000)) is not None and not fresh.failures
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    torch._dynamo.reset_code_caches()
