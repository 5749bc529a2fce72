"""Statistics of one tensor, computed on the tensor's device without a host synchronisation.

``stats_vector(x)`` returns a small float64 tensor on x's device holding the raw reductions. Nothing
is read back: ``StatsBatch`` gathers the vectors of one iteration and copies them to the host in
one transfer, then turns each row into a TensorStats. ``tensor_stats(x)`` is the one-tensor shortcut.

Two paths compute the same raw vector (``FIELDS``):

- ``compiled``: one fused kernel (the function ``_fused`` under ``torch.compile``, dynamic shapes)
  that reads the tensor once and produces every reduction (on a 2-core CPU about 2.5x the cost
  of one ``x.sum()``, against some 50x for the eager set of reductions). It runs for contiguous floating tensors of at least ``FUSED_MIN_NUMEL``
  elements; smaller ones, integer, bool, complex and strided tensors take the eager path, where a
  handful of tiny kernels costs less than a call into compiled code.
- ``eager``: plain torch reductions. It needs nothing but torch; it is the fallback where
  ``torch.compile`` cannot run (no C++ compiler for CPU code, an unsupported platform) and what
  ``GPTTRACE_STATS_PATH=eager`` selects.

``GPTTRACE_STATS_PATH`` = ``auto`` (default: compiled when it works, else eager, silently),
``compiled`` (an error when it cannot run) or ``eager``. The trace's environment says which ran.

Accuracy. Both paths sum d = x - c and d^2 with c close to the tensor's mean (the shifted-data
algorithm): the variance does not cancel when the mean is large against the spread or one element
lies far from the rest. The fused kernel takes c from a sample (``_shift``: an element, so an
all-equal tensor has a variance of exactly 0) and sums in float64. The eager path shifts by the
mean of the first chunk, scales d by a power of two (so float32 squares cannot overflow), and adds
chunks' pairwise float32 sums in float64. Counts are exact on both.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Generic, TypeVar

import torch

from .errors import CaptureError
from .trace import TensorStats

# The raw vector: mean = shift + sum/n, population variance = sumsq/n - (sum/n)^2.
FIELDS = ("shift", "sum", "sumsq", "min", "max", "zeros", "nan", "inf")

PATHS = ("auto", "compiled", "eager")
ENV_VAR = "GPTTRACE_STATS_PATH"
FUSED_MIN_NUMEL = 16384  # below this the eager kernels are cheaper than a compiled call
_MAX_INT32 = 2**31 - 1
_CHUNK = 1 << 22  # elements per step of the eager path's second pass
_SAMPLE = 4096  # elements the shift is chosen from
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str
    device: str
    numel: int
    values: int  # values summarised: numel, twice that for a complex tensor (real and imaginary parts)

    @classmethod
    def of(cls, x: torch.Tensor) -> TensorMeta:
        n = x.numel()
        return cls(tuple(x.shape), str(x.dtype), str(x.device), n, 2 * n if x.is_complex() else n)


# ------------------------------------------------------------------------------ the two kernels
def _shift(flat: torch.Tensor) -> torch.Tensor:
    """The shift c of the sums: the element of an evenly spread sample closest to the sample's
    mean (0 where the sample has no finite value).

    The variance comes out of sum(d^2)/n - (sum(d)/n)^2 with d = x - c, which loses the digits of
    (c - mean)^2 / variance: a shift from the tensor's first element lost 1e-5 of the std of a
    sparse embedding gradient (one hot row first, 99% zeros). An element near the mean keeps that
    ratio about 1/SAMPLE, and being an element of the tensor, an all-equal tensor's d is exactly 0.
    The sample is ``_SAMPLE`` reads whatever the tensor's size; the i-th element is i steps and i
    places in, so it walks across the columns of a row-major matrix instead of down one of them
    (a tensor smaller than the sample is read more than once, which changes nothing).
    """
    n = flat.numel()
    i = torch.arange(_SAMPLE, device=flat.device)
    index = (i * n // _SAMPLE + i) % n  # no branch on n: one compiled kernel serves every size
    sample = torch.take(flat, index).to(torch.float64)
    finite = sample.abs() < math.inf
    count = finite.sum().clamp(min=1)
    mu = torch.where(finite, sample, torch.zeros_like(sample)).sum() / count
    distance = torch.where(finite, (sample - mu).abs(), torch.full_like(sample, math.inf))
    c = torch.take(flat, torch.take(index, torch.argmin(distance).reshape(1))).reshape(())  # no host sync
    return torch.where(c.abs() < math.inf, c, torch.zeros_like(c))  # a non-finite shift would poison the sums


def _fused(x: torch.Tensor) -> torch.Tensor:
    """Every reduction of a 1-D floating tensor in one pass (written for torch.compile)."""
    xf = x if x.dtype == torch.float64 else x.to(torch.float32)
    c = _shift(xf)
    d = xf.to(torch.float64) - c.to(torch.float64)  # exact; float64 sums cost no extra memory traffic
    # x != x and |x| == inf rather than isnan/isinf: the comparisons vectorise, the calls do not
    parts = (
        c, d.sum(), (d * d).sum(), xf.amin(), xf.amax(),
        (xf == 0).sum(dtype=torch.int32), (xf != xf).sum(dtype=torch.int32),
        (xf.abs() == math.inf).sum(dtype=torch.int32),
    )
    return torch.stack([p.to(torch.float64) for p in parts])


def _eager(x: torch.Tensor) -> torch.Tensor:
    """The same reductions with plain torch kernels, in chunks: no temporary is larger than
    ``_CHUNK`` values (but for the copy that flattens a strided tensor)."""
    if x.is_complex():
        x = torch.view_as_real(x)  # statistics over the real and imaginary parts
    if not x.is_floating_point():
        x = x.to(torch.float64)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.reshape(-1)
    n = flat.numel()
    lo, hi = torch.aminmax(flat)
    # the shift: the mean of the first chunk, close enough to the mean that d = x - c does not cancel
    c = flat[:_CHUNK].to(acc).mean()
    c = torch.where(c.abs() < math.inf, c, torch.zeros_like(c))
    # d is scaled by a power of two (exact) so that its float32 squares cannot overflow
    big = torch.maximum(lo.abs(), hi.abs()).to(acc)
    big = torch.where((big < math.inf) & (big > 0), big, torch.ones_like(big))
    scale = torch.exp2(torch.ceil(torch.log2(big)).clamp(-126, 126))  # finite in float32
    s1 = s2 = nan = inf = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, n, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        d = (chunk.to(acc) - c) / scale
        s1 = s1 + torch.sum(d).to(torch.float64)
        s2 = s2 + torch.sum(d * d).to(torch.float64)  # pairwise float32 sums, added up in float64
        nan = nan + torch.count_nonzero(chunk != chunk)
        inf = inf + torch.count_nonzero(chunk.abs() == math.inf)
    scale64 = scale.to(torch.float64)
    parts = (c, s1 * scale64, s2 * scale64 * scale64, lo, hi, n - torch.count_nonzero(flat), nan, inf)
    return torch.stack([p.to(torch.float64) for p in parts])


# ------------------------------------------------------------------------------ path selection
class _Compiled:
    """The compiled fused kernel, built once per process; a dtype whose compile fails falls back."""

    def __init__(self) -> None:
        self._fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._lock = threading.Lock()
        self.failures: dict[tuple[str, torch.dtype], str] = {}  # (device type, dtype) -> why
        self.probed: dict[torch.device, str | None] = {}  # device -> why the probe failed, or None
        self._built: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) compiled already

    def function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        with self._lock:
            if self._fn is None:
                # a copy of _fused with its own code object: dynamo keeps compiled entries (and counts
                # them against its recompile limit) per code object, so other compiles of _fused (a
                # compiled model's graph inlines it) never push this kernel over the limit
                own = types.FunctionType(_fused.__code__.replace(), _fused.__globals__, _fused.__name__)
                self._fn = torch.compile(own, dynamic=True, fullgraph=True)
            return self._fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused vector of a contiguous 1-D tensor, or None if this dtype cannot be compiled."""
        key = (x.device.type, x.dtype)
        if key in self.failures:
            return None
        try:
            if key in self._built:
                with _compiler_logs_muted():  # a new shape may still recompile
                    return self.function()(x)
            # torch's compiler stack emits its own deprecation warnings while it builds a kernel;
            # under a test run's filterwarnings=error they would turn into a failed compile. Only
            # the first call per device and dtype compiles, so only it silences warnings.
            with warnings.catch_warnings(), _compiler_logs_muted(), _interrupt_kept():
                warnings.simplefilter("ignore")
                out = self.function()(x)
            self._built.add(key)
            return out
        except Exception as exc:  # no C++ compiler, an inductor limitation: eager is always correct
            self.failures[key] = f"{type(exc).__name__}: {_first_line(exc)}"
            return None


@contextlib.contextmanager
def _interrupt_kept() -> Iterator[None]:
    """A Ctrl-C while the kernel compiles is raised after the compile: torch's compiler swallows a
    KeyboardInterrupt raised inside it, and the run would go on as if nothing had been pressed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    previous = signal.getsignal(signal.SIGINT)

    def remember(signum: int, frame: FrameType | None) -> None:
        pressed.append(signum)
        if callable(previous):
            previous(signum, frame)  # the default handler raises KeyboardInterrupt here, as always

    signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed and previous is not signal.SIG_IGN:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _compiler_logs_muted() -> Iterator[None]:
    """Keep the compiler's trace records (empty DEBUG lines of ``torch.__trace``) out of the log
    a test run captures and shows with a failure; the logger's own settings come back afterwards."""
    logger = logging.getLogger("torch.__trace")
    propagate, disabled = logger.propagate, logger.disabled
    logger.propagate, logger.disabled = False, True
    try:
        yield
    finally:
        logger.propagate, logger.disabled = propagate, disabled


def _first_line(exc: BaseException) -> str:
    """The gist of an exception: its first lines, up to the one that names the cause."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return text[:300]


_COMPILED = _Compiled()


def requested_path(path: str | None = None) -> str:
    """The path asked for: the argument, else GPTTRACE_STATS_PATH, else auto."""
    if path is None:
        path = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        origin = f"{ENV_VAR}={path!r}"
    else:
        origin = f"stats_path={path!r}"
    if path not in PATHS:
        raise CaptureError(f"{origin} is not a statistics path: use one of {', '.join(PATHS)}")
    return path


def prepare(path: str | None = None, device: torch.device | str = "cpu") -> tuple[str, str | None]:
    """Resolve the path for tensors on ``device`` and compile the fused kernel now (not inside a step).

    Returns (path that will run, why the compiled path is not used or None). ``auto`` falls back to
    eager without error; ``compiled`` raises CaptureError when it cannot run.
    """
    want = requested_path(path)
    if want == "eager":
        return "eager", None
    device = torch.device(device)
    if _dynamo_disabled():
        # the "compiled" function would run as plain Python: float64 copies of every tensor
        why = "torch.compile is disabled (TORCH_COMPILE_DISABLE=1)"
        if want == "compiled":
            raise CaptureError(f"{ENV_VAR}=compiled, but {why}")
        return "eager", why
    if _dispatch_mode_active():  # eager for this capture; the probe waits for a run without the mode
        why = "a TorchDispatchMode is active"
        if want == "compiled":
            raise CaptureError(f"{ENV_VAR}=compiled, but {why}: torch.compile cannot run under it")
        return "eager", why
    reason: str | None = _COMPILED.probed.get(device)
    if device not in _COMPILED.probed:  # once per device and process
        probe = torch.linspace(-1.0, 1.0, FUSED_MIN_NUMEL, device=device)
        with torch.no_grad():
            got = _COMPILED(probe)
            reason = _COMPILED.failures.get((device.type, probe.dtype))
            if got is not None and not _agree(probe, got, _eager(probe)):
                reason = "the compiled kernel disagreed with the eager one on a probe tensor"
                _COMPILED.failures[(device.type, probe.dtype)] = reason
        _COMPILED.probed[device] = reason
    if reason is None:
        return "compiled", None
    if want == "compiled":
        raise CaptureError(f"{ENV_VAR}=compiled, but torch.compile cannot build the statistics kernel: {reason}")
    return "eager", f"torch.compile unavailable ({reason})"


def _agree(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    meta = TensorMeta.of(x)
    sa, sb = from_row(meta, a.cpu().tolist()), from_row(meta, b.cpu().tolist())
    return all(math.isclose(getattr(sa, k), getattr(sb, k), rel_tol=1e-5, abs_tol=1e-6)
               for k in ("mean", "std", "min", "max", "rms", "zero_frac", "nan", "inf"))


def _dynamo_disabled() -> bool:
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:  # a torch without dynamo
        return True
    try:
        return bool(dynamo_config.disable)
    except AttributeError:  # a torch without this switch
        return False


def compiled_failures() -> dict[str, str]:
    """"<dtype> on <device type>" -> why the fused kernel could not run for it (this process)."""
    return {f"{dtype} on {device}": v for (device, dtype), v in _COMPILED.failures.items()}


def _dispatch_mode_active() -> bool:
    """A TorchDispatchMode is on the stack (the dither of a calibration replay): torch.compile
    refuses to run under one, and that says nothing about whether it can run without."""
    return torch._C._len_torch_dispatch_stack() > 0


def _use_fused(x: torch.Tensor) -> bool:
    return (x.dtype in _FUSED_DTYPES and x.is_contiguous() and FUSED_MIN_NUMEL <= x.numel() <= _MAX_INT32
            and not torch.compiler.is_compiling() and not _dispatch_mode_active())


def stats_vector(x: torch.Tensor, path: str = "eager") -> torch.Tensor | None:
    """The raw reductions of x (``FIELDS``) as a float64 vector on x's device; None for an empty tensor.

    ``path="compiled"`` uses the fused kernel where it applies (see the module docstring); anything
    it does not apply to, and a dtype it failed to compile for, goes the eager way.
    """
    if x.numel() == 0:
        return None
    with torch.no_grad():
        x = x.detach()
        if path == "compiled" and _use_fused(x):
            v = _COMPILED(x.view(-1))
            if v is not None:
                return v
        return _eager(x)


def from_row(meta: TensorMeta, row: Sequence[float] | None) -> TensorStats:
    """Turn one host row of raw reductions into TensorStats."""
    n = meta.values
    if row is None or n == 0:
        return TensorStats(meta.shape, meta.dtype, meta.device, meta.numel)
    shift, s1, s2, lo, hi, zeros, nan, inf = (float(v) for v in row)
    m1 = s1 / n
    mean = shift + m1
    var = s2 / n - m1 * m1  # population variance; rounding can leave it a hair below zero
    if var < 0:
        var = 0.0
    if n == 1:
        std = 0.0 if math.isfinite(mean) else float("nan")
    else:
        std = math.sqrt(var * n / (n - 1)) if var == var else float("nan")
    ms = mean * mean + var
    if inf and not nan:
        ms = math.inf  # the variance is NaN (inf - inf), the mean square is not
    return TensorStats(
        shape=meta.shape,
        dtype=meta.dtype,
        device=meta.device,
        numel=meta.numel,
        mean=mean,
        std=std,
        min=lo,
        max=hi,
        rms=math.sqrt(ms) if ms == ms else float("nan"),
        zero_frac=zeros / n,
        nan=int(nan),
        inf=int(inf),
    )


# the key of a summarised tensor, and of a value read back with the batch; any hashable unless typed
K = TypeVar("K", bound=Hashable)
E = TypeVar("E", bound=Hashable)


class StatsBatch(Generic[K, E]):
    """Gathers stats vectors and reads them back to the host in one copy per device.

    Tensors are added under keys of type K (the tracer's are typed: section and stage), values read
    back with them (the loss) under keys of type E."""

    def __init__(self, path: str = "eager"):
        self.path = path
        self._items: list[tuple[K, TensorMeta | None, torch.Tensor | None]] = []
        self._extras: list[tuple[E, torch.Tensor, bool]] = []  # (key, float64 values, read as a scalar)
        # the same tensor object seen twice (a tap on a block's input is the previous block's output,
        # and its gradient is one tensor too): id -> (weak reference, version, vector)
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: K, x: torch.Tensor) -> None:
        reusable = not x.is_inference()  # inference tensors have no version counter
        hit = self._seen.get(id(x)) if reusable else None
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            vector = hit[2]
        else:
            vector = stats_vector(x, self.path)
            if reusable:
                with contextlib.suppress(TypeError):  # a tensor type without weak references: no reuse
                    self._seen[id(x)] = (weakref.ref(x), x._version, vector)
        self._items.append((key, TensorMeta.of(x), vector))

    def add_vector(self, key: K, meta: TensorMeta, vector: torch.Tensor | None) -> None:
        """A tensor summarised already (``stats_vector``'s result, computed elsewhere: in a compiled graph)."""
        self._items.append((key, meta, vector))

    def add_missing(self, key: K) -> None:
        """A slot for a tensor that does not exist (a parameter without a gradient)."""
        self._items.append((key, None, None))

    def add_scalar(self, key: E, x: torch.Tensor) -> None:
        """A scalar read back with the batch (the loss), as a float."""
        self._extras.append((key, x.detach().reshape(1).to(torch.float64), True))

    def add_values(self, key: E, values: torch.Tensor) -> None:
        """A 1-D tensor of values read back with the batch, as a list of floats."""
        self._extras.append((key, values.detach().reshape(-1).to(torch.float64), False))

    def finish(self) -> tuple[list[tuple[K, TensorStats | None]], dict[E, float | list[float]]]:
        """One host copy per device. Returns [(key, TensorStats or None)] in the order added, and
        a dict of the scalars (floats) and value vectors (lists of floats)."""
        flat: list[torch.Tensor] = [v for _, _, v in self._items if v is not None]
        flat += [v for _, v, _ in self._extras]
        sizes = [v.numel() for v in flat]
        host: list[list[float]] = [[] for _ in flat]
        by_device: dict[torch.device, list[int]] = {}
        for i, v in enumerate(flat):
            by_device.setdefault(v.device, []).append(i)
        for idxs in by_device.values():
            values = torch.cat([flat[i].reshape(-1) for i in idxs]).cpu().tolist()  # the one copy
            at = 0
            for i in idxs:
                host[i] = values[at:at + sizes[i]]
                at += sizes[i]
        out: list[tuple[K, TensorStats | None]] = []
        k = 0
        for key, meta, vector in self._items:
            if meta is None:
                out.append((key, None))
            elif vector is None:
                out.append((key, from_row(meta, None)))
            else:
                out.append((key, from_row(meta, host[k])))
                k += 1
        extra: dict[E, float | list[float]] = {}
        for j, (extra_key, _, scalar) in enumerate(self._extras):
            extra[extra_key] = host[k + j][0] if scalar else host[k + j]
        self._items, self._extras, self._seen = [], [], {}
        return out, extra


def tensor_stats(x: torch.Tensor, path: str = "eager") -> TensorStats:
    """Statistics of one tensor (reads back to the host: for use outside a traced step)."""
    batch: StatsBatch[int, int] = StatsBatch(path)
    batch.add(0, x)
    (_, stats), = batch.finish()[0]
    assert stats is not None  # None only for a slot added as missing
    return stats
