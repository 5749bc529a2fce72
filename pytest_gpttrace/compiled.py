"""Tracing a ``torch.compile``'d model: the compiled program, under the eager model's names.

A compiled model (``torch.compile(model)``, an ``OptimizedModule``) is traced through the module it
wraps: stages, parameters, config and model type are the eager model's (no ``_orig_mod.``), so its
trace compares stage by stage with an eager golden of the same model.

What runs is the compiled program. The forward hooks on the stage modules are inlined by dynamo into
the compiled graph, and nothing in them breaks it:

- a stage output's statistics are computed inside the graph (the fused reductions of ``stats``),
  and the vector is appended to a list (a side effect dynamo replays after the graph runs);
- its gradient's statistics come from a probe: the hook returns ``Probe.apply(output, sink, row)``,
  an identity whose backward also returns the gradient's statistics, in row ``row``, as the
  gradient of ``sink``, a leaf tensor of the capture with one row per stage call. They accumulate
  in ``sink.grad``, read with the rest of the iteration in its one host copy. No tensor hook is registered (a
  ``register_hook`` inside a compiled region is a graph break per stage);
- the host clock is not read inside the graph (``time.perf_counter`` there is a dynamo warning):
  the capture's overhead counts ``end_iteration`` only.

``sink`` has room for ``4 x`` the stage count of calls per forward (a module called several times is
a row per call); a forward with more calls grows it for the next iteration, and the calls past the
room have no gradient in the one where it grew. The hooks are part of the compiled graph, and
dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): the
capture drops the process's compiled code when it starts and when it ends, and the model compiles
again, with its hooks, then without.

The ``ops`` granularity records functional ops through a ``TorchFunctionMode``; a compiled model is
then run eagerly for the capture (``torch.compiler.set_stance("force_eager")``) and the trace's
environment says ``compiled: traced eagerly``. ``auto`` on a compiled model is ``taps`` where it has
them, else ``modules``: record the eager golden at the same granularity.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .recording import Extra, Extras, PendingIteration
from .stats import _FUSED_DTYPES, FIELDS, TensorMeta, _eager, _fused, from_row
from .trace import TensorStats

ENV_KEY = "compiled"  # the trace environment's key saying how a compiled model was traced
TRACED_COMPILED = "traced compiled (statistics inside the compiled graph)"
TRACED_EAGERLY = "traced eagerly (the ops granularity records eager ops)"
ROOM_PER_STAGE = 4  # sink rows per stage: calls of stage modules per forward before the sink grows
_WIDTH = len(FIELDS) + 1  # a sink row: the gradient's raw statistics and a count of the backwards that wrote it

# dynamo builds a FunctionCtx for an autograd.Function it traces and means to drop torch's
# deprecation warning about it (``catch_warnings(record=True)``), which still raises under
# ``-W error``: the probe's capture filters that one message while it is active
_CTX_WARNING = r".*autograd\.function\.Function'> should not be instantiated"


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (an ``OptimizedModule``)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # a torch without dynamo
        return False
    return isinstance(model, OptimizedModule)


def eager_module(model: nn.Module) -> nn.Module:
    """The module a compiled model wraps (the model itself when it is not compiled)."""
    if is_compiled(model):
        inner = model._orig_mod
        assert isinstance(inner, nn.Module)
        return inner
    return model


def granularity(requested: str | None, has_taps: bool) -> str | None:
    """The granularity asked for on a compiled model: ``auto`` (or None) is taps where the model has
    them, else modules (the ops granularity runs the model eagerly, so it is asked for by name)."""
    if (requested or "auto").strip().lower() == "auto":
        return "taps" if has_taps else "modules"
    return requested


def vector(x: torch.Tensor) -> torch.Tensor:
    """A tensor's raw statistics (``stats.FIELDS``), written to be traced into a compiled graph."""
    with torch.no_grad():
        x = x.detach()
        if x.dtype in _FUSED_DTYPES:
            return _fused(x.reshape(-1))
        return _eager(x)


class Probe(torch.autograd.Function):
    """The identity on ``x`` (a copy); its backward passes the gradient on and writes the gradient's
    statistics in row ``row`` of ``sink``'s gradient (with a 1 in the last column: the row fired)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sink: torch.Tensor, row: int) -> torch.Tensor:
        ctx.row, ctx.rows = row, sink.shape[0]
        # a copy, not a view: the model may modify a stage output in place (ReLU(inplace=True)), which
        # autograd forbids on a view a custom Function returns; in the compiled graph the copy fuses
        # into the kernels that produce and read the output where they are inductor's own
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        v = vector(grad) if grad.numel() else torch.zeros(len(FIELDS), dtype=torch.float64, device=grad.device)
        line = torch.cat([v, torch.ones(1, dtype=torch.float64, device=v.device)])
        rows = torch.nn.functional.pad(line.reshape(1, -1), (0, 0, ctx.row, ctx.rows - ctx.row - 1))
        return grad, rows, None


class Call(NamedTuple):
    """One stage output seen in a compiled forward: its statistics and the sink row of its gradient."""

    stage: str
    meta: tuple[tuple[int, ...], torch.dtype, torch.device, bool]  # shape, dtype, device, complex
    vector: torch.Tensor | None  # None for an empty tensor
    row: int  # the sink row of its gradient, -1 for none


def tensor_meta(meta: tuple[tuple[int, ...], torch.dtype, torch.device, bool]) -> TensorMeta:
    shape, dtype, device, complex_ = meta
    n = 1
    for size in shape:
        n *= size
    return TensorMeta(shape, str(dtype), str(device), n, 2 * n if complex_ else n)


def _recompile() -> None:
    """Drop the compiled code of this process (dynamo's code caches; its counters and the on-disk
    kernel caches stay): the next call of a compiled function compiles it again."""
    import torch._dynamo

    torch._dynamo.reset_code_caches()


class CompiledCapture:
    """What a ``Capture`` of a compiled model does differently: the eager module it names stages by,
    the granularity, the in-graph hooks (or the eager run of the ops granularity), and the calls
    and sink gradient each iteration adds to the pending one."""

    def __init__(self, model: nn.Module, requested: str | None, has_taps: Callable[[nn.Module], bool]) -> None:
        self.model = eager_module(model)
        self.granularity = granularity(requested, has_taps(self.model))
        self.autocast: set[str] = set()
        self.calls: list[Call] = []
        self.sink: torch.Tensor | None = None
        self._rows_used = 0
        self._overflow = False
        self._grads = True
        self._active: Callable[[], bool] = lambda: False
        self._handles: list[RemovableHandle] = []
        self._stack: contextlib.ExitStack | None = None
        self.eagerly = False

    @classmethod
    def of(cls, model: nn.Module, requested: str | None,
           has_taps: Callable[[nn.Module], bool]) -> CompiledCapture | None:
        return cls(model, requested, has_taps) if is_compiled(model) else None

    # -- lifecycle -------------------------------------------------------------
    def enter(self, stages: list[tuple[str, nn.Module]], resolved: str, grads: bool, device: torch.device,
              active: Callable[[], bool]) -> bool:
        """Start: True when the in-graph hooks are registered; False when the capture's own eager
        hooks are to be (the ops granularity: the compiled model runs eagerly until ``exit``)."""
        self._stack = contextlib.ExitStack()
        # dynamo does not guard on module hooks: code compiled before they were added (or after they
        # are removed) would run on as it was, so the compiled code is dropped when the capture starts
        # and when it ends, and the model compiles again with its hooks (then without)
        _recompile()
        self._stack.callback(_recompile)
        if resolved == "ops":
            self.eagerly = True
            self._stack.enter_context(torch.compiler.set_stance("force_eager"))
            return False
        self._stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=_CTX_WARNING, category=DeprecationWarning)
        self._grads, self._active, self._device = grads, active, device
        self.sink = self._new_sink(max(1, ROOM_PER_STAGE * len(stages)))
        for name, module in stages:
            self._handles.append(module.register_forward_hook(self._hook(name, device.type)))
        return True

    def exit(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def environment(self) -> dict[str, str]:
        return {ENV_KEY: TRACED_EAGERLY if self.eagerly else TRACED_COMPILED}

    # -- the hooks (traced into the compiled graph) ----------------------------
    def _new_sink(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, _WIDTH, dtype=torch.float64, device=self._device, requires_grad=True)

    def _hook(self, name: str, device_type: str) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if not self._active():
                return None
            if torch.is_autocast_enabled(device_type):
                self.autocast.add(f"{device_type} {torch.get_autocast_dtype(device_type)}")
            return self._probe(name, output)
        return hook

    def _probe(self, name: str, output: Any) -> Any:
        """The output with each tensor recorded and, where it takes part in autograd, probed."""
        if isinstance(output, torch.Tensor):
            row = -1
            sink = self.sink
            if sink is not None and self._grads and output.requires_grad and torch.is_grad_enabled():
                if self._rows_used < sink.shape[0]:
                    row = self._rows_used
                    self._rows_used += 1
                else:
                    self._overflow = True  # no room left this forward: the sink grows when it ends
            meta = (tuple(output.shape), output.dtype, output.device, output.is_complex())
            self.calls.append(Call(name, meta, vector(output) if output.numel() else None, row))
            if row < 0:
                return output
            return Probe.apply(output, sink, row)  # type: ignore[no-untyped-call]  # torch leaves apply unannotated
        if isinstance(output, tuple) and hasattr(output, "_fields"):  # a named tuple
            return type(output)(*(self._probe(f"{name}[{i}]", o) for i, o in enumerate(output)))
        if isinstance(output, (tuple, list)):
            return type(output)(self._probe(f"{name}[{i}]", o) for i, o in enumerate(output))
        if isinstance(output, dict):
            return type(output)((k, self._probe(f"{name}[{k}]", o)) for k, o in output.items())
        return output

    # -- the end of an iteration (outside the graph) ---------------------------
    def discard(self) -> tuple[list[Call], torch.Tensor | None]:
        """The calls of the iteration that ends and the sink's gradient (None when no backward ran),
        leaving both empty for the next; a sink that had no room grows here."""
        calls, self.calls = self.calls, []
        self._rows_used = 0
        sink = self.sink
        if sink is None:
            return calls, None
        grad, sink.grad = sink.grad, None
        if self._overflow:
            self.sink = self._new_sink(2 * sink.shape[0])
            self._overflow = False
        return calls, grad

    def flush(self, pending: PendingIteration, autocast: set[str]) -> None:
        """Queue the iteration's stage outputs and gradients on the pending iteration's batch (the
        gradients' rows travel with its one host copy; which rows fired is read from there), and
        add the autocast dtypes its forward saw to ``autocast``."""
        autocast |= self.autocast
        self.autocast = set()
        calls, grad = self.discard()
        probed: list[tuple[str, TensorMeta, int]] = []
        for call in calls:
            meta = tensor_meta(call.meta)
            name = pending.forward_vector(call.stage, meta, call.vector)
            if call.row >= 0:
                probed.append((name, meta, call.row))
        if grad is None or not probed:
            return
        pending.batch.add_values(Extra.STAGE_GRAD_ROWS, grad)

        def stage_grads(extras: Extras) -> dict[str, TensorStats]:
            values = extras.get(Extra.STAGE_GRAD_ROWS)
            out: dict[str, TensorStats] = {}
            if not isinstance(values, list):
                return out
            for name, meta, row in reversed(probed):  # backward order
                line = values[row * _WIDTH:(row + 1) * _WIDTH]
                if line[-1] >= 1:  # the backward reached this stage
                    out[name] = from_row(meta, line[:-1] if meta.numel else None)
            return out

        pending.late_stage_grads = stage_grads
