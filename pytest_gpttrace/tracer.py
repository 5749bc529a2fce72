"""Capturing stage statistics through hooks, and the instrumented training loop.

    with capture(model) as cap:
        loss = model(idx, targets)
        loss.backward()
        cap.end_iteration(loss=loss, stepped=False)
    trace = cap.trace()

Stages follow the granularity: ``taps``, the model's taps (identity modules whose class is named
``Tap`` or ``HookPoint``, or that set ``gpttrace_tap = True``); ``modules``, every leaf module
(Embedding, Linear, ...) by qualified name; ``ops``, the leaf modules and the results of the
functional ops the modules' forwards call (``ops``: ``transformer.h.0.attn/rms_norm#1``). The
default, ``auto``, is ``taps`` for a model with taps, else ``ops``. Glob patterns narrow or widen
the set: a plain pattern keeps the default stages it matches (op stages too), ``+pattern`` adds any
module it matches, ``!pattern`` drops stages (op stages too).

Per stage output the forward hook computes statistics on the device and, when the output takes
part in autograd, registers a tensor hook that computes the statistics of its gradient (robust to
in-place ops, unlike module backward hooks). ``end_iteration`` adds every parameter gradient and
the loss, and copies the whole iteration to the host in one transfer. Nothing inside a hook reads a
value back to the host. A module called twice in one iteration is recorded as ``name`` and ``name#2``.

A forward that runs while autograd executes a backward is activation checkpointing's recomputation
(``torch.utils.checkpoint``): it is not recorded and is not a call (no ``name#2``). Under
``use_reentrant=False`` the gradient hooks of the first forward's outputs fire as usual. Under
``use_reentrant=True`` the first forward runs under ``torch.no_grad()``: a module stage called once
has its gradient hooked on the recomputed output instead; the others (a module called twice, op
stages) get none, listed in the trace's ``coverage.no_grad``. Selected stage modules that ran in
no iteration and stages missing from some iterations are the trace's ``coverage`` too.

Statistics run on the fused compiled kernel when it is available (see ``stats``); it is compiled
when the capture starts, not inside the first step, and the trace's environment says which path ran.

A ``torch.compile``'d model is traced inside its compiled graph under the eager model's names,
without tensor hooks or a host clock in the graph (``compiled``).

A model on the meta device is refused (its tensors have shapes but no values); a frozen model is
traced forward only by ``capture``, and refused by ``trace_training``, which has no backward to run.
The parts ``Capture`` is built from (the iteration in progress and the typed keys into its stats
batch, the host clock, the zero census, the statistics path) are in ``recording``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .compiled import CompiledCapture
from .coverage import Coverage, gaps, stage_module
from .dither import undithered
from .errors import CaptureError
from .kinds import StageKind, module_kind
from .ops import OpRecorder, records_inside, resolve_granularity, resolve_ops
from .recording import PendingIteration, StatsPathChoice, ZeroCensus
from .trace import EnvKey, Iteration, Trace
from .usermodel import LossFn, default_loss, model_config

TAP_CLASS_NAMES = ("Tap", "HookPoint")


def is_tap(module: nn.Module) -> bool:
    return getattr(module, "gpttrace_tap", False) or type(module).__name__ in TAP_CLASS_NAMES


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _recomputing() -> bool:
    """Autograd is executing a backward on this thread: a forward now is a checkpoint's recomputation.
    Not asked while dynamo traces a hook: the query is not traceable and would break the graph."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def has_taps(model: nn.Module) -> bool:
    return any(is_tap(m) for m in model.modules())


class StagePatterns:
    """Stage patterns split by kind: plain ones keep, ``+`` ones add modules, ``!`` ones drop."""

    def __init__(self, patterns: Sequence[str] | None) -> None:
        self.patterns = list(patterns or [])
        self.keep = [p for p in self.patterns if not p.startswith(("+", "!"))]
        self.add = [p[1:] for p in self.patterns if p.startswith("+")]
        self.drop = [p[1:] for p in self.patterns if p.startswith("!")]
        for p in self.keep + self.add + self.drop:
            if not p:
                raise CaptureError(f"empty stage pattern in {self.patterns!r}")

    @staticmethod
    def match(name: str, pats: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in pats)

    def keeps_op(self, name: str) -> bool:
        """An op stage (known only when it runs) is kept by the plain patterns and not dropped."""
        return (not self.keep or self.match(name, self.keep)) and not self.match(name, self.drop)


def select_stages(model: nn.Module, patterns: Sequence[str] | None = None,
                  granularity: str | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to hook, in module order. See the module docstring for patterns
    and granularities. Under ``ops`` the list may be empty: op stages may still match."""
    grain = resolve_granularity(granularity, has_taps(model), type(model).__name__)
    modules = [(n, m) for n, m in model.named_modules() if n]
    if grain == "taps":
        default = [(n, m) for n, m in modules if is_tap(m)]
    else:
        default = [(n, m) for n, m in modules if _is_leaf(m)]
    if not default and grain != "ops":  # under ops, a model of plain functions has its op stages
        raise CaptureError(
            f"{type(model).__name__} has no stages to trace at granularity {grain!r}: no taps and no leaf "
            "modules (granularity='ops' traces the functions its forward calls)"
        )
    pats = StagePatterns(patterns)
    keep, add, drop, match = pats.keep, pats.add, pats.drop, pats.match
    chosen = {n for n, _ in default if not keep or match(n, keep)}
    chosen |= {n for n, _ in modules if match(n, add)}
    chosen -= {n for n, _ in modules if match(n, drop)}
    selected = [(n, m) for n, m in modules if n in chosen]
    if not selected and grain != "ops":
        sample = ", ".join(n for n, _ in default[:5])
        raise CaptureError(
            f"stage patterns {pats.patterns!r} select none of the {len(default)} stages of "
            f"{type(model).__name__} (they start: {sample})"
        )
    return selected


def _tensors(output: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(suffix, tensor) for a module output: a tensor, or tensors inside a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        yield prefix, output
    elif isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            yield from _tensors(item, f"{prefix}[{i}]")
    elif isinstance(output, dict):
        for k, item in output.items():
            yield from _tensors(item, f"{prefix}[{k}]")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_provenance(device: torch.device) -> dict[str, str | bool]:
    """The device's name and kernel level: the CPU model and the ISA torch dispatches to, or the GPU
    name and compute capability, and the matmul precision flags that change what kernels compute."""
    out: dict[str, str | bool] = {EnvKey.MATMUL_PRECISION.value: torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        out.update({EnvKey.DEVICE_NAME.value: torch.cuda.get_device_name(device),
                    EnvKey.CPU_CAPABILITY.value: f"sm_{major}{minor}",
                    EnvKey.TF32.value: bool(torch.backends.cuda.matmul.allow_tf32),
                    EnvKey.CUDNN_TF32.value: bool(torch.backends.cudnn.allow_tf32)})
    else:
        out.update({EnvKey.DEVICE_NAME.value: _cpu_name(),
                    EnvKey.CPU_CAPABILITY.value: torch.backends.cpu.get_cpu_capability()})
    return out


def environment(model: nn.Module, stats_path: str = "eager", stats_note: str | None = None,
                autocast: Sequence[str] = (), granularity: str | None = None) -> dict[str, str | int | bool]:
    param = next(model.parameters(), None)
    floating = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    return {
        EnvKey.TORCH.value: torch.__version__.split("+")[0],
        EnvKey.PYTHON.value: platform.python_version(),
        EnvKey.PLATFORM.value: f"{sys.platform}-{platform.machine()}",
        EnvKey.DEVICE_TYPE.value: device.type,
        EnvKey.DEVICE.value: str(device),
        **device_provenance(device),
        EnvKey.DTYPE.value: str(floating.dtype) if floating is not None else "n/a",
        **({EnvKey.AUTOCAST.value: ", ".join(sorted(autocast))} if autocast else {}),
        EnvKey.THREADS.value: torch.get_num_threads(),
        EnvKey.STATS_PATH.value: stats_path,
        **({EnvKey.STATS_NOTE.value: stats_note} if stats_note else {}),
        **({EnvKey.GRANULARITY.value: granularity} if granularity else {}),
    }


class Capture:
    """Hooks on a model's stages; builds one Iteration per forward/backward. Use through ``capture``.

    The hooks queue statistics on the iteration in progress (``recording.PendingIteration``);
    ``end_iteration`` adds the parameter gradients and turns it into an Iteration with one host copy.
    """

    def __init__(self, model: nn.Module, stages: Sequence[str] | None = None, *,
                 grads: bool = True, param_grads: bool = True, stats_path: str | None = None,
                 granularity: str | None = None, ops: Sequence[str] | None = None):
        _refuse_meta(model)
        # a torch.compile'd model: traced under its eager module's names, the hooks inside its graph
        self._compiled = CompiledCapture.of(model, granularity, has_taps)
        if self._compiled is not None:
            model, granularity = self._compiled.model, self._compiled.granularity
        _refuse_compiled_parts(model)
        self.model = model
        self.grads = grads
        self.param_grads = param_grads
        self._requested_granularity = granularity
        self.granularity = resolve_granularity(granularity, has_taps(model), type(model).__name__)
        self.stages = select_stages(model, stages, self.granularity)
        # the functional ops recorded (``ops`` granularity only); the stage patterns filter them too
        self.ops: tuple[str, ...] = resolve_ops(ops) if self.granularity == "ops" else ()
        self._patterns = StagePatterns(stages)
        self._op_kept: dict[str, bool] = {}
        self.stage_kinds: dict[str, str] = {}  # stage -> kinds.StageKind value, as first recorded
        self.stage_inputs: dict[str, str] = {}  # rotary stage -> the stage it rotates (kinds.StageSources)
        self._recorder: OpRecorder | None = None
        self.iterations: list[Iteration] = []
        self.autocast: set[str] = set()  # autocast dtypes seen active in a traced forward
        self.last_overhead_s: float | None = None  # host seconds the capture added to the last iteration
        self._path = StatsPathChoice(stats_path)
        self._census = ZeroCensus()
        self._pending = PendingIteration(self._path.path)
        self._module_hooks: list[RemovableHandle] = []
        self._active = False
        self._device = _device_of(model)
        self._fired: set[str] = set()  # stage modules whose forward ran (not counting recomputations)
        self._no_grad: dict[str, None] = {}  # stages whose gradient could not be recorded

    @property
    def requested_path(self) -> str:
        return self._path.requested

    @property
    def stats_path(self) -> str:
        """The statistics path that runs (resolved when the capture starts)."""
        return self._path.path

    @property
    def stats_note(self) -> str | None:
        return self._path.note

    @property
    def zero_params(self) -> tuple[str, ...] | None:
        """The parameters that were exactly zero when the capture began (None until the first iteration)."""
        return self._census.zero_params

    # -- hooks -----------------------------------------------------------------
    def _forward_hook(self, name: str, kind: StageKind) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._active:
                return
            if _recomputing():
                self._recomputed(name, output)
                return
            self._fired.add(name)
            pending = self._pending
            recorder = self._recorder
            with pending.clock, (recorder.suspended() if recorder is not None else contextlib.nullcontext()):
                for suffix, t in _tensors(output):
                    self._record(name + suffix, t, kind)
        return hook

    def _record(self, name: str, t: torch.Tensor, kind: StageKind, module: str | None = None) -> None:
        """Queue one stage output's statistics and hook its gradient (inside the pending clock);
        kind: what the stage is; module: the module of an op stage."""
        pending, device_type = self._pending, self._device.type
        if torch.is_autocast_enabled(device_type):
            self.autocast.add(f"{device_type} {torch.get_autocast_dtype(device_type)}")
        with undithered():
            stage = pending.forward(name, t)
        self._record_kind(stage, t, kind)
        if self.grads and t.requires_grad:
            self._hook_grad(stage, t)
        elif self.grads and not torch.is_grad_enabled() and t.is_floating_point():
            pending.await_grad(name, stage, module)  # a reentrant checkpoint's recomputation may hook it

    def _hook_grad(self, stage: str, t: torch.Tensor) -> None:
        # torch leaves Tensor.register_hook unannotated
        handle = t.register_hook(self._grad_hook(stage))  # type: ignore[no-untyped-call]
        self._pending.keep_hook(handle)

    def _recomputed(self, name: str, output: Any) -> None:
        """A stage module's forward run again in the backward: nothing is recorded; a stage first
        computed under no_grad (a reentrant checkpoint) has its gradient hooked here."""
        if not self.grads:
            return
        pending = self._pending
        with pending.clock:
            for suffix, t in _tensors(output):
                stage = pending.recomputed(name + suffix)
                if stage is None:
                    continue
                if t.requires_grad:
                    self._hook_grad(stage, t)

    def _record_kind(self, stage: str, t: torch.Tensor, kind: StageKind) -> None:
        """The stage's kind, and a rotary's input stage (host-side: no value is read)."""
        if stage not in self.stage_kinds:
            self.stage_kinds[stage] = kind.value
        if torch.compiler.is_compiling():
            return
        sources = self._pending.sources
        if kind == StageKind.ROTARY and stage not in self.stage_inputs:
            source = sources.source_of(t)
            if source is not None:
                self.stage_inputs[stage] = source
        sources.note(stage, t)

    def _record_op(self, module: str, op: str, t: torch.Tensor, kind: StageKind) -> None:
        """An op result seen by the recorder (its handler runs with the mode off the stack)."""
        if not self._active or _recomputing():
            return
        pending = self._pending
        with pending.clock:
            name = pending.op_stage(module, op)
            kept = self._op_kept.get(name)
            if kept is None:
                kept = self._op_kept[name] = self._patterns.keeps_op(name)
            if kept:
                self._record(name, t, kind, module)

    def _context_hooks(self, recorder: OpRecorder) -> None:
        """Forward pre-hooks and hooks on every module: the stack of running modules, and on the
        root module the mode pushed for its forward and popped after it (also when it raises)."""
        for name, module in self.model.named_modules():
            root, records, leaf = module is self.model, records_inside(module, is_tap), _is_leaf(module)

            def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, _name: str = name,
                    _root: bool = root, _records: bool = records, _leaf: bool = leaf) -> None:
                if not self._active:
                    return
                if _recomputing():  # a checkpoint's recomputation: no frame, no mode, no op recorded
                    if self.grads:
                        self._pending.recomputed_module(_name)
                    return
                recorder.enter_module(_name, _records, args, kwargs, _root, _leaf)

            def post(mod: nn.Module, args: tuple[Any, ...], output: Any, *, _root: bool = root) -> None:
                if self._active and not _recomputing():
                    recorder.exit_module(_root, output)

            self._module_hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._module_hooks.append(module.register_forward_hook(post, always_call=True))

    def _grad_hook(self, stage: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self._active:
                pending = self._pending
                with pending.clock, undithered():
                    pending.stage_grad(stage, grad)
        return hook

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> Capture:
        if self._module_hooks:
            raise CaptureError("this capture is already active: enter it once (nested `with cap:` would "
                               "record every stage twice)")
        self._device = _device_of(self.model)
        self._path.resolve(self._device)
        self._next_iteration()
        self._census.take(self.model)
        self._active = True
        try:
            compiled = self._compiled is not None and self._compiled.enter(
                self.stages, self.granularity, self.grads, self._device, lambda: self._active)
            for name, module in self.stages:
                kind = module_kind(module, name)
                if compiled:  # the compiled capture's hooks record the statistics; the kind is known here
                    self.stage_kinds.setdefault(name, kind.value)
                    continue
                self._module_hooks.append(module.register_forward_hook(self._forward_hook(name, kind)))
            if self.ops:
                self._recorder = OpRecorder(self.ops, self._record_op)
                self._context_hooks(self._recorder)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        self._active = False
        for handle in self._module_hooks:
            handle.remove()
        self._module_hooks = []
        if self._compiled is not None:
            self._compiled.exit()
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        self._pending.close()

    def _next_iteration(self) -> None:
        """Close the iteration in progress (its tensor hooks removed) and start an empty one."""
        self._pending.close()
        self._pending = PendingIteration(self._path.path)
        if self._compiled is not None:
            self._compiled.discard()

    def discard_iteration(self) -> None:
        """Drop what the current iteration has recorded so far (a step that raised and was skipped)."""
        self._next_iteration()

    @contextlib.contextmanager
    def paused(self) -> Iterator[Capture]:
        """Steps inside this block are not traced: the hooks stay registered and return at once.
        Use it between iterations (to trace every k-th step of a long run, say)."""
        if not self._pending.empty:
            raise CaptureError("paused() inside an iteration: call end_iteration() first")
        was, self._active = self._active, False
        try:
            yield self
        finally:
            self._active = was
            self._next_iteration()

    def end_iteration(self, loss: torch.Tensor | float | None = None, stepped: bool | None = None,
                      lr: Mapping[str, float] | None = None) -> Iteration:
        """Close the current iteration: record parameter gradients, copy to the host once."""
        with undithered():
            return self._end_iteration(loss, stepped, lr or {})

    def _end_iteration(self, loss: torch.Tensor | float | None, stepped: bool | None,
                       lr: Mapping[str, float]) -> Iteration:
        pending = self._pending
        with pending.clock:
            if self.param_grads:
                for name, p in self.model.named_parameters():
                    if p.requires_grad:  # a frozen one has no gradient by design (the trace's frozen_params)
                        pending.param_grad(name, p.grad)
            if self._compiled is not None:
                self._compiled.flush(pending, self.autocast)
            self._census.send(pending.batch)
            it, extras = pending.finish(len(self.iterations), loss, stepped, lr)
            if not it.forward and not self.stages and not self.iterations:
                pending.close()
                raise CaptureError(
                    f"{type(self.model).__name__} has no stages to trace: no taps, no leaf modules, and its forward "
                    f"called none of the ops in the op list ({', '.join(self.ops) or 'empty'}): add taps, or "
                    "ops of your own (ops.register_op)"
                )
            self._census.receive(extras)
            self._no_grad.update(dict.fromkeys(pending.no_grad))
            self.iterations.append(it)
            pending.close()
        # host time the capture added to this iteration: its hooks and this call (on a GPU, hooks
        # only launch kernels, so this is the launch cost, not the kernels' device time)
        self.last_overhead_s = pending.clock.seconds
        self._next_iteration()
        return it

    def granularity_note(self) -> str:
        """The granularity that ran; for taps chosen by ``auto``, what it leaves out and how to get it."""
        if self.granularity != "taps" or self._requested_granularity not in (None, "auto"):
            return self.granularity
        taps = sum(1 for _, m in self.model.named_modules() if is_tap(m))
        others = sum(1 for n, m in self.model.named_modules() if n and _is_leaf(m) and not is_tap(m))
        if not others:
            return "taps"
        return (f"taps (auto: the model has {taps} tap{'s' if taps != 1 else ''}; its {others} other leaf modules "
                "and its functional ops are traced too with granularity='ops')")

    def path_note(self) -> str | None:
        """Why statistics ran (partly) eager: the fallback reason, or the dtypes that failed to compile."""
        return self._path.explain()

    def coverage(self) -> Coverage:
        """Stages missing from some iterations, selected stage modules that never ran, gradients
        not recorded (empty for a model whose every stage fires in every iteration)."""
        # fired: seen by the eager hooks, or recorded (a compiled model's hooks run inside its graph)
        recorded = {stage_module(n) for it in self.iterations for n in it.forward}
        never = tuple(n for n, _ in self.stages if n not in self._fired and n not in recorded) \
            if self.iterations else ()
        return Coverage(gaps([it.forward for it in self.iterations]), never, tuple(self._no_grad))

    def _kinds_by_stage(self) -> dict[str, str]:
        """Every recorded stage's kind; a later call (``name#2``, which a compiled model's hooks name
        only at the host copy) has its first call's."""
        kinds = dict(self.stage_kinds)
        for it in self.iterations:
            for name in it.forward:
                if name not in kinds:
                    base = stage_module(name)
                    if base in kinds:
                        kinds[name] = kinds[base]
        recorded = {n for it in self.iterations for n in it.forward}
        return {n: k for n, k in kinds.items() if n in recorded}

    def trace(self) -> Trace:
        return Trace(
            config=model_config(self.model),
            environment=environment(self.model, self.stats_path, self.path_note(), sorted(self.autocast),
                                    self.granularity_note())
            | (self._compiled.environment() if self._compiled is not None else {}),
            iterations=tuple(self.iterations),
            parameters={n: tuple(p.shape) for n, p in self.model.named_parameters()},
            model=type(self.model).__name__,
            zero_params=self.zero_params,
            frozen_params=tuple(n for n, p in self.model.named_parameters() if not p.requires_grad),
            coverage=self.coverage(),
            stage_kinds=self._kinds_by_stage(),
            stage_inputs=dict(self.stage_inputs),
        )


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _refuse_compiled_parts(model: nn.Module) -> None:
    """A submodule compiled on its own (``blocks[i] = torch.compile(block)``) runs the tool's eager
    hooks inside its compiled region and names its stages ``..._orig_mod...``: refused in one line."""
    from .compiled import is_compiled

    for name, module in model.named_modules():
        if name and is_compiled(module):
            raise CaptureError(
                f"{type(model).__name__}.{name} is compiled on its own (torch.compile of a submodule): trace the "
                "model compiled as a whole (torch.compile(model)) or uncompiled; the tool traces a compiled "
                "region only from its root"
            )


def _refuse_meta(model: nn.Module) -> None:
    """A model on the meta device has shapes but no values: there is nothing to summarise."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise CaptureError(
                f"{type(model).__name__} is on the meta device ({name!r} has a shape but no values): "
                "materialise it before tracing (model.to_empty(device=...), then initialise its weights)"
            )


def capture(model: nn.Module, stages: Sequence[str] | None = None, *, grads: bool = True,
            param_grads: bool = True, stats_path: str | None = None, granularity: str | None = None,
            ops: Sequence[str] | None = None) -> Capture:
    """Context manager hooking every stage of ``model``; hooks are removed on exit, also on error.

    stats_path: "auto", "compiled" or "eager" (default: the GPTTRACE_STATS_PATH variable, else auto).
    granularity: "auto" (default: taps where the model has them, else ops), "taps", "modules" or "ops".
    ops: changes to the op list of the ``ops`` granularity (``ops.resolve_ops``: ``["+sigmoid", "!matmul"]``).
    """
    return Capture(model, stages, grads=grads, param_grads=param_grads, stats_path=stats_path,
                   granularity=granularity, ops=ops)


# ------------------------------------------------------------------------------ training loop
Optimizers = torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None


def _as_list(optimizers: Optimizers) -> list[torch.optim.Optimizer]:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    return list(optimizers)


def learning_rates(optimizers: Optimizers) -> dict[str, float]:
    """Every param group's current lr, keyed "<Optimizer>[group]" (an index prefix when types repeat)."""
    opts = _as_list(optimizers)
    names = [type(o).__name__ for o in opts]
    out = {}
    for i, (opt, name) in enumerate(zip(opts, names, strict=True)):
        label = name if names.count(name) == 1 else f"{i}:{name}"
        for g, group in enumerate(opt.param_groups):
            out[f"{label}[{g}]"] = float(group["lr"])
    return out


def _differentiable(model: nn.Module, loss: object) -> torch.Tensor:
    """The loss, if backward() can run on it; else the one-line reason why not (a frozen model)."""
    name = type(model).__name__
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
        raise CaptureError(f"the loss of {name} is {what}, not a scalar tensor: trace_training needs a loss "
                           "to call backward() on")
    if not loss.requires_grad:
        params = list(model.parameters())
        if params and not any(p.requires_grad for p in params):
            raise CaptureError(
                f"every parameter of {name} is frozen (requires_grad=False), so trace_training has no backward "
                "to run: unfreeze what should train (model.requires_grad_(True)), or trace a forward pass with "
                "capture(model)"
            )
        raise CaptureError(f"the loss of {name} does not require grad (computed under torch.no_grad(), or "
                           "detached), so trace_training cannot call backward() on it")
    return loss


def trace_training(
    model: nn.Module,
    batches: Iterable[Any],
    optimizers: Optimizers = None,
    iterations: int = 3,
    *,
    micro_steps: int = 1,
    stages: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    grads: bool = True,
    stats_path: str | None = None,
    granularity: str | None = None,
    ops: Sequence[str] | None = None,
) -> Trace:
    """Run the usual loop (forward, backward, step, zero_grad) for ``iterations`` forward/backward
    passes under capture, and return the Trace.

    micro_steps=k accumulates gradients over k iterations (each backward on loss / k) and steps
    the optimizers after every k-th; an Iteration's ``stepped`` says whether a step followed it.
    loss_fn(model, batch) -> loss; default ``usermodel.default_loss`` (a loss, (logits, loss), a
    ModelOutput or dict, Hugging Face labels: see ``usermodel``). granularity and ops: as for ``capture``.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if micro_steps < 1:
        raise ValueError(f"micro_steps must be at least 1, got {micro_steps}")
    opts = _as_list(optimizers)
    loss_fn = loss_fn or default_loss
    stream = iter(batches)
    model.train()
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    with capture(model, stages, grads=grads, stats_path=stats_path, granularity=granularity, ops=ops) as cap:
        for i in range(iterations):
            try:
                batch = next(stream)
            except StopIteration:
                raise CaptureError(f"the batches ran out after {i} of {iterations} iterations") from None
            loss = _differentiable(model, loss_fn(model, batch))
            # torch leaves Tensor.backward unannotated
            (loss / micro_steps if micro_steps > 1 else loss).backward()  # type: ignore[no-untyped-call]
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
