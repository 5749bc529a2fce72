"""Capturing stage statistics through hooks, and the instrumented training loop.

    with capture(model) as cap:
        loss = model(idx, targets)
        loss.backward()
        cap.end_iteration(loss=loss, stepped=False)
    trace = cap.trace()

Stages are the model's taps (identity modules whose class is named ``Tap`` or ``HookPoint``, or
that set ``gpttrace_tap = True``); a model with no taps is traced per leaf module (Embedding,
Linear, ...) by qualified name. Glob patterns narrow or widen the set: a plain pattern keeps the
default stages it matches, ``+pattern`` adds any module it matches, ``!pattern`` drops stages.

Per stage output the forward hook computes statistics on the device and, when the output takes
part in autograd, registers a tensor hook that computes the statistics of its gradient (robust to
in-place ops, unlike module backward hooks). ``end_iteration`` adds every parameter gradient and
the loss, and copies the whole iteration to the host in one transfer. Nothing inside a hook reads a
value back to the host. A module called twice in one iteration is recorded as ``name`` and ``name#2``.

Statistics run on the fused compiled kernel when it is available (see ``stats``); it is compiled
when the capture starts, not inside the first step, and the trace's environment says which path ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import platform
import sys
import time
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .errors import CaptureError
from . import stats as _stats
from .dither import undithered
from .stats import StatsBatch
from .trace import Iteration, Trace

TAP_CLASS_NAMES = ("Tap", "HookPoint")


def is_tap(module: nn.Module) -> bool:
    return getattr(module, "gpttrace_tap", False) or type(module).__name__ in TAP_CLASS_NAMES


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def select_stages(model: nn.Module, patterns: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to hook, in module order. See the module docstring for patterns."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    taps = [(n, m) for n, m in modules if is_tap(m)]
    default = taps or [(n, m) for n, m in modules if _is_leaf(m)]
    if not default:
        raise CaptureError(
            f"{type(model).__name__} has no stages to trace: no taps and no leaf modules "
            "(a model built from plain functions needs Tap modules, or trace its submodules)"
        )
    patterns = list(patterns or [])
    keep = [p for p in patterns if not p.startswith(("+", "!"))]
    add = [p[1:] for p in patterns if p.startswith("+")]
    drop = [p[1:] for p in patterns if p.startswith("!")]
    for p in keep + add + drop:
        if not p:
            raise CaptureError(f"empty stage pattern in {patterns!r}")

    def match(name, pats):
        return any(fnmatch.fnmatchcase(name, p) for p in pats)

    chosen = {n for n, _ in default if not keep or match(n, keep)}
    chosen |= {n for n, _ in modules if match(n, add)}
    chosen -= {n for n, _ in modules if match(n, drop)}
    selected = [(n, m) for n, m in modules if n in chosen]
    if not selected:
        sample = ", ".join(n for n, _ in default[:5])
        raise CaptureError(
            f"stage patterns {patterns!r} select none of the {len(default)} stages of "
            f"{type(model).__name__} (they start: {sample})"
        )
    return selected


def _tensors(output, prefix=""):
    """(suffix, tensor) for a module output: a tensor, or tensors inside a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        yield prefix, output
    elif isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            yield from _tensors(item, f"{prefix}[{i}]")
    elif isinstance(output, dict):
        for k, item in output.items():
            yield from _tensors(item, f"{prefix}[{k}]")


def model_config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    return {}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_provenance(device: torch.device) -> dict:
    """The device's name and kernel level: the CPU model and the ISA torch dispatches to, or the GPU
    name and compute capability, and the matmul precision flags that change what kernels compute."""
    out = {"matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        out.update(device_name=torch.cuda.get_device_name(device), cpu_capability=f"sm_{major}{minor}",
                   tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                   cudnn_tf32=bool(torch.backends.cudnn.allow_tf32))
    else:
        out.update(device_name=_cpu_name(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    return out


def environment(model: nn.Module, stats_path: str = "eager", stats_note: str | None = None,
                autocast: Sequence[str] = ()) -> dict:
    param = next(model.parameters(), None)
    floating = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    return {
        "torch": torch.__version__.split("+")[0],
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "device_type": device.type,
        "device": str(device),
        **device_provenance(device),
        "dtype": str(floating.dtype) if floating is not None else "n/a",
        **({"autocast": ", ".join(sorted(autocast))} if autocast else {}),
        "threads": torch.get_num_threads(),
        "stats_path": stats_path,
        **({"stats_note": stats_note} if stats_note else {}),
    }


class Capture:
    """Hooks on a model's stages; builds one Iteration per forward/backward. Use through ``capture``."""

    def __init__(self, model: nn.Module, stages: Sequence[str] | None = None, *,
                 grads: bool = True, param_grads: bool = True, stats_path: str | None = None):
        self.model = model
        self.grads = grads
        self.param_grads = param_grads
        self.stages = select_stages(model, stages)
        self.requested_path = _stats.requested_path(stats_path)
        self.stats_path = "eager"
        self.stats_note: str | None = None
        self.iterations: list[Iteration] = []
        self.zero_params: tuple[str, ...] | None = None
        self._zero_counts: torch.Tensor | None = None
        self._zero_names: list[str] = []
        self.last_overhead_s: float | None = None  # host seconds the capture added to the last iteration
        self._handles: list = []
        self._tensor_handles: list = []
        self._active = False
        self.autocast: set[str] = set()  # autocast dtypes seen active in a traced forward
        self._device_type = next((p.device.type for p in model.parameters()), "cpu")
        self._reset()

    def _reset(self):
        self._hook_seconds = 0.0
        self._batch = StatsBatch(self.stats_path)
        self._seen: dict[str, int] = {}
        self._grad_seen: dict[str, int] = {}

    # -- hooks -----------------------------------------------------------------
    def _unique(self, name: str, seen: dict) -> str:
        n = seen.get(name, 0) + 1
        seen[name] = n
        return name if n == 1 else f"{name}#{n}"

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            if not self._active:
                return None
            start = time.perf_counter()
            if torch.is_autocast_enabled(self._device_type):
                self.autocast.add(f"{self._device_type} {torch.get_autocast_dtype(self._device_type)}")
            for suffix, t in _tensors(output):
                stage = self._unique(name + suffix, self._seen)
                with undithered():
                    self._batch.add(("forward", stage), t)
                if self.grads and t.requires_grad:
                    self._tensor_handles.append(t.register_hook(self._grad_hook(stage)))
            self._hook_seconds += time.perf_counter() - start
            return None
        return hook

    def _grad_hook(self, stage: str):
        def hook(grad):
            if self._active:
                start = time.perf_counter()
                with undithered():
                    self._batch.add(("stage_grads", self._unique(stage, self._grad_seen)), grad)
                self._hook_seconds += time.perf_counter() - start
            return None
        return hook

    # -- lifecycle -------------------------------------------------------------
    def _count_nonzero_params(self) -> None:
        """Count each parameter's non-zero entries now, before any step (zero-init choices); the
        counts travel to the host with the first iteration's statistics."""
        params = [(name, p) for name, p in self.model.named_parameters() if p.numel()]
        self._zero_names = [name for name, _ in params]
        self._zero_counts = None
        if not params:
            self.zero_params = ()
            return
        with torch.no_grad():
            device = params[0][1].device
            self._zero_counts = torch.stack([torch.count_nonzero(p.detach()).to(device) for _, p in params])

    def _read_zero_params(self, counts) -> None:
        self.zero_params = tuple(name for name, n in zip(self._zero_names, counts) if n == 0)

    def __enter__(self) -> "Capture":
        if self._handles:
            raise CaptureError("this capture is already active: enter it once (nested `with cap:` would "
                               "record every stage twice)")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.stats_path, self.stats_note = _stats.prepare(self.requested_path, device)
        self._reset()
        self._count_nonzero_params()
        self._active = True
        try:
            for name, module in self.stages:
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self):
        self._active = False
        for h in self._handles + self._tensor_handles:
            h.remove()
        self._handles, self._tensor_handles = [], []

    def discard_iteration(self) -> None:
        """Drop what the current iteration has recorded so far (a step that raised and was skipped)."""
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles = []
        self._reset()

    @contextlib.contextmanager
    def paused(self):
        """Steps inside this block are not traced: the hooks stay registered and return at once.
        Use it between iterations (to trace every k-th step of a long run, say)."""
        if len(self._batch) or self._seen:
            raise CaptureError("paused() inside an iteration: call end_iteration() first")
        was, self._active = self._active, False
        try:
            yield self
        finally:
            self._active = was
            self._reset()

    def end_iteration(self, loss: torch.Tensor | float | None = None, stepped: bool | None = None,
                      lr: dict | None = None) -> Iteration:
        """Close the current iteration: record parameter gradients, copy to the host once."""
        with undithered():
            return self._end_iteration(loss, stepped, lr)

    def _end_iteration(self, loss, stepped, lr) -> Iteration:
        start = time.perf_counter()
        batch = self._batch
        if self.param_grads:
            for name, p in self.model.named_parameters():
                if not p.requires_grad:
                    continue  # frozen: no gradient by design (listed in the trace's frozen_params)
                if p.grad is None:
                    batch.add_missing(("param_grads", name))
                else:
                    batch.add(("param_grads", name), p.grad)
        if isinstance(loss, torch.Tensor):
            batch.add_scalar("loss", loss)
        if self._zero_counts is not None:
            batch.add_values("zero_counts", self._zero_counts)
            self._zero_counts = None
        rows, extra = batch.finish()
        if "zero_counts" in extra:
            self._read_zero_params(extra["zero_counts"])
        sections: dict[str, dict] = {"forward": {}, "stage_grads": {}, "param_grads": {}}
        for (section, stage), stats in rows:
            sections[section][stage] = stats
        loss_value = extra.get("loss", loss if isinstance(loss, (int, float)) else None)
        it = Iteration(
            index=len(self.iterations),
            loss=None if loss_value is None else float(loss_value),
            stepped=stepped,
            lr=dict(lr or {}),
            forward=sections["forward"],
            stage_grads=sections["stage_grads"],
            param_grads=sections["param_grads"],
        )
        self.iterations.append(it)
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles = []
        # host time the capture added to this iteration: its hooks and this call (on a GPU, hooks
        # only launch kernels, so this is the launch cost, not the kernels' device time)
        self.last_overhead_s = self._hook_seconds + (time.perf_counter() - start)
        self._reset()
        return it

    def path_note(self) -> str | None:
        """Why statistics ran (partly) eager: the fallback reason, or the dtypes that failed to compile."""
        if self.stats_path != "compiled":
            return self.stats_note
        failed = _stats.compiled_failures()
        if not failed:
            return None
        return "eager for " + "; ".join(f"{dtype} ({why})" for dtype, why in failed.items())

    def trace(self) -> Trace:
        return Trace(
            config=model_config(self.model),
            environment=environment(self.model, self.stats_path, self.path_note(), sorted(self.autocast)),
            iterations=tuple(self.iterations),
            parameters={n: tuple(p.shape) for n, p in self.model.named_parameters()},
            model=type(self.model).__name__,
            zero_params=self.zero_params,
            frozen_params=tuple(n for n, p in self.model.named_parameters() if not p.requires_grad),
        )


def capture(model: nn.Module, stages: Sequence[str] | None = None, *, grads: bool = True,
            param_grads: bool = True, stats_path: str | None = None) -> Capture:
    """Context manager hooking every stage of ``model``; hooks are removed on exit, also on error.

    stats_path: "auto", "compiled" or "eager" (default: the GPTTRACE_STATS_PATH variable, else auto).
    """
    return Capture(model, stages, grads=grads, param_grads=param_grads, stats_path=stats_path)


# ------------------------------------------------------------------------------ training loop
def _as_list(optimizers) -> list:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    return list(optimizers)


def learning_rates(optimizers) -> dict[str, float]:
    """Every param group's current lr, keyed "<Optimizer>[group]" (an index prefix when types repeat)."""
    opts = _as_list(optimizers)
    names = [type(o).__name__ for o in opts]
    out = {}
    for i, (opt, name) in enumerate(zip(opts, names)):
        label = name if names.count(name) == 1 else f"{i}:{name}"
        for g, group in enumerate(opt.param_groups):
            out[f"{label}[{g}]"] = float(group["lr"])
    return out


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """model(*batch) when it returns the loss; the scalar element when it returns (logits, loss)."""
    out = model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor) and item.numel() == 1 and item.is_floating_point():
                return item
    raise CaptureError(
        f"{type(model).__name__}(*batch) returned {type(out).__name__}, not a scalar loss: "
        "pass loss_fn=lambda model, batch: ... to trace_training"
    )


def trace_training(
    model: nn.Module,
    batches: Iterable,
    optimizers=None,
    iterations: int = 3,
    *,
    micro_steps: int = 1,
    stages: Sequence[str] | None = None,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    grads: bool = True,
    stats_path: str | None = None,
) -> Trace:
    """Run the usual loop (forward, backward, step, zero_grad) for ``iterations`` forward/backward
    passes under capture, and return the Trace.

    micro_steps=k accumulates gradients over k iterations (each backward on loss / k) and steps
    the optimizers after every k-th; an Iteration's ``stepped`` says whether a step followed it.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if micro_steps < 1:
        raise ValueError(f"micro_steps must be at least 1, got {micro_steps}")
    opts = _as_list(optimizers)
    loss_fn = loss_fn or default_loss
    batches = iter(batches)
    model.train()
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    with capture(model, stages, grads=grads, stats_path=stats_path) as cap:
        for i in range(iterations):
            try:
                batch = next(batches)
            except StopIteration:
                raise CaptureError(f"the batches ran out after {i} of {iterations} iterations") from None
            loss = loss_fn(model, batch)
            (loss / micro_steps if micro_steps > 1 else loss).backward()
            stepped = bool(opts) and (i + 1) % micro_steps == 0
            lr = learning_rates(opts)
            cap.end_iteration(loss=loss, stepped=stepped, lr=lr)
            if stepped:
                for opt in opts:
                    opt.step()
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)
        trace = cap.trace()
    return trace
