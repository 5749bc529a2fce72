"""The parts a ``Capture`` is built from, each knowing one thing and nothing about hooks.

- ``StageKey`` (a ``Section`` and a stage name) and ``Extra``: the typed keys into the stats batch.
- ``PendingIteration``: what the hooks recorded since the last iteration ended: the stats batch,
  the numbering of a stage seen twice (``name#2``) and of an op's calls in a module
  (``module/op#k``), the tensor hooks still registered, the stages whose gradient waits for a
  recomputation (a reentrant checkpoint), and the assembly of the batch's one host copy into an
  ``Iteration``.
- ``HostClock``: host seconds spent in the capture's own code (what the overhead benchmark reads).
- ``ZeroCensus``: which parameters are exactly zero when the capture begins (zero-init choices).
- ``StatsPathChoice``: the statistics path asked for, the one that runs, and why they differ.

Inside a step none of them reads a value back to the host: ``PendingIteration.finish`` makes the
iteration's one copy (the path's probe reads its own small tensor once, when the capture starts).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from . import stats as _stats
from .kinds import StageSources
from .stats import StatsBatch, TensorMeta
from .trace import STAGE_SECTIONS, Iteration, Section, TensorStats


class StageKey(NamedTuple):
    """The key of one summarised tensor in the stats batch."""

    section: Section
    name: str


class Extra(enum.Enum):
    """The values read back with the batch besides tensor statistics."""

    LOSS = "loss"
    ZERO_COUNTS = "zero_counts"
    STAGE_GRAD_ROWS = "stage_grad_rows"  # a compiled model's stage gradients (``compiled``)


Batch = StatsBatch[StageKey, Extra]
Extras = Mapping[Extra, float | list[float]]


class HostClock:
    """Host seconds spent inside ``with clock:`` blocks since it was made. On a GPU the hooks only
    launch kernels, so this is the launch cost, not the kernels' device time."""

    __slots__ = ("_start", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.seconds += time.perf_counter() - self._start


class _Occurrences:
    """Numbers the calls of one stage within an iteration: ``name``, ``name#2``, ``name#3``, ..."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}

    def __call__(self, name: str) -> str:
        n = self._count.get(name, 0) + 1
        self._count[name] = n
        return name if n == 1 else f"{name}#{n}"

    def __bool__(self) -> bool:
        return bool(self._count)


class PendingIteration:
    """One iteration in progress: statistics queued on the device, not yet read back."""

    def __init__(self, path: str) -> None:
        self.batch: Batch = StatsBatch(path)
        self.clock = HostClock()
        self._forward_names = _Occurrences()
        self._grad_names = _Occurrences()
        self._op_calls: dict[tuple[str, str], int] = {}
        self._tensor_hooks: list[RemovableHandle] = []
        # stages recorded under torch.no_grad(), by stage (module stages) or by module (op stages)
        self._awaiting: dict[str, list[str]] = {}
        self._awaiting_ops: dict[str, list[str]] = {}
        self._no_grad: dict[str, None] = {}
        self.sources = StageSources()  # the stages recorded so far, by autograd node (a rotary's input)
        # stage gradients known only once the batch is on the host (a compiled model's: ``compiled``)
        self.late_stage_grads: Callable[[Extras], dict[str, TensorStats]] | None = None

    @property
    def empty(self) -> bool:
        """Nothing was recorded yet (no stage ran)."""
        return not len(self.batch) and not self._forward_names

    def forward(self, stage: str, output: torch.Tensor) -> str:
        """Queue a stage output's statistics; returns its name in this iteration (``name#2`` for a
        second call)."""
        name = self._forward_names(stage)
        self.batch.add(StageKey(Section.FORWARD, name), output)
        return name

    def forward_vector(self, stage: str, meta: TensorMeta, vector: torch.Tensor | None) -> str:
        """``forward`` for statistics computed already (inside a compiled graph)."""
        name = self._forward_names(stage)
        self.batch.add_vector(StageKey(Section.FORWARD, name), meta, vector)
        return name

    def op_stage(self, module: str, op: str) -> str:
        """The name of an op's next call in ``module`` this iteration: ``module/op#k``, k from 1
        (``op#k`` for the root module's own forward)."""
        k = self._op_calls.get((module, op), 0) + 1
        self._op_calls[(module, op)] = k
        return f"{module}/{op}#{k}" if module else f"{op}#{k}"

    # -- activation checkpointing: a forward run again in the backward is not a call ----------
    def await_grad(self, stage: str, name: str, module: str | None = None) -> None:
        """``name`` (the recorded name of ``stage``) was computed under ``torch.no_grad()``, so its
        gradient cannot be hooked now; a recomputation in the backward may provide it. ``module``:
        the module of an op stage."""
        if module is None:
            self._awaiting.setdefault(stage, []).append(name)
        else:
            self._awaiting_ops.setdefault(module, []).append(name)

    def recomputed(self, stage: str) -> str | None:
        """A module stage's forward ran again during the backward (a reentrant checkpoint): the name
        whose gradient the recomputed output carries, when the stage was recorded under no_grad by
        one call only. More calls cannot be told apart (the backward recomputes segments in reverse
        order): their gradients are noted as not recorded. None when nothing awaits it."""
        names = self._awaiting.pop(stage, None)
        if not names:
            return None
        if len(names) == 1:
            return names[0]
        self._no_grad.update(dict.fromkeys(names))
        return None

    def recomputed_module(self, module: str) -> None:
        """A module's forward ran again during the backward: the op stages it recorded under
        no_grad get no gradient (ops are not seen in the recomputation)."""
        self._no_grad.update(dict.fromkeys(self._awaiting_ops.pop(module, ())))

    def no_gradient(self, name: str) -> None:
        """A stage whose gradient could not be recorded."""
        self._no_grad[name] = None

    @property
    def no_grad(self) -> tuple[str, ...]:
        """The stages whose gradient could not be recorded this iteration (``Coverage.no_grad``)."""
        return tuple(self._no_grad)

    def stage_grad(self, stage: str, grad: torch.Tensor) -> None:
        self.batch.add(StageKey(Section.STAGE_GRADS, self._grad_names(stage)), grad)

    def param_grad(self, name: str, grad: torch.Tensor | None) -> None:
        key = StageKey(Section.PARAM_GRADS, name)
        if grad is None:
            self.batch.add_missing(key)
        else:
            self.batch.add(key, grad)

    def keep_hook(self, handle: RemovableHandle) -> None:
        """A tensor hook registered for this iteration's backward, removed when it closes."""
        self._tensor_hooks.append(handle)

    def close(self) -> None:
        """Remove this iteration's tensor hooks (the one place they are removed)."""
        for handle in self._tensor_hooks:
            handle.remove()
        self._tensor_hooks = []

    def finish(self, index: int, loss: torch.Tensor | float | None, stepped: bool | None,
               lr: Mapping[str, float]) -> tuple[Iteration, Extras]:
        """Read the batch back to the host (the one copy) with the loss, and assemble the Iteration;
        the values read back besides (the zero counts) are returned for their owners."""
        if isinstance(loss, torch.Tensor):
            self.batch.add_scalar(Extra.LOSS, loss)
        rows, extras = self.batch.finish()
        sections: dict[Section, dict[str, TensorStats | None]] = {section: {} for section in STAGE_SECTIONS}
        for (section, name), stats in rows:
            sections[section][name] = stats
        read = extras.get(Extra.LOSS)
        if isinstance(read, float):
            loss_value: float | None = read
        else:
            loss_value = float(loss) if isinstance(loss, (int, float)) else None
        it = Iteration(
            index=index,
            loss=loss_value,
            stepped=stepped,
            lr=dict(lr),
            forward=_measured(sections[Section.FORWARD]),
            stage_grads=_measured(sections[Section.STAGE_GRADS]) | (
                self.late_stage_grads(extras) if self.late_stage_grads is not None else {}),
            param_grads=sections[Section.PARAM_GRADS],
        )
        return it, extras


def _measured(rows: dict[str, TensorStats | None]) -> dict[str, TensorStats]:
    """A section whose every slot holds a tensor (only parameter gradients can be missing)."""
    return {name: stats for name, stats in rows.items() if stats is not None}


class ZeroCensus:
    """Which parameters are exactly zero when the capture begins (the zero-init choices).

    ``take`` counts each parameter's non-zero entries on its device, before any step; ``send``
    queues the counts on the first iteration's batch, so they travel to the host with its one copy,
    and ``receive`` reads them from there. ``zero_params`` is None until then."""

    def __init__(self) -> None:
        self.zero_params: tuple[str, ...] | None = None
        self._names: list[str] = []
        self._counts: torch.Tensor | None = None

    def take(self, model: nn.Module) -> None:
        params = [(name, p) for name, p in model.named_parameters() if p.numel()]
        self._names = [name for name, _ in params]
        self._counts = None
        if not params:
            self.zero_params = ()
            return
        with torch.no_grad():
            device = params[0][1].device
            self._counts = torch.stack([torch.count_nonzero(p.detach()).to(device) for _, p in params])

    def send(self, batch: Batch) -> None:
        if self._counts is not None:
            batch.add_values(Extra.ZERO_COUNTS, self._counts)
            self._counts = None

    def receive(self, extras: Extras) -> None:
        counts = extras.get(Extra.ZERO_COUNTS)
        if isinstance(counts, list):
            self.zero_params = tuple(name for name, n in zip(self._names, counts, strict=True) if n == 0)


class StatsPathChoice:
    """The statistics path: asked for (the argument, else GPTTRACE_STATS_PATH, else auto; checked
    when made), resolved for the model's device when the capture starts (``resolve`` compiles the
    fused kernel then, not inside the first step), and why it is (partly) eager."""

    def __init__(self, requested: str | None) -> None:
        self.requested = _stats.requested_path(requested)
        self.path = "eager"
        self.note: str | None = None

    def resolve(self, device: torch.device) -> None:
        self.path, self.note = _stats.prepare(self.requested, device)

    def explain(self) -> str | None:
        """Why statistics ran (partly) eager: the fallback reason, or the dtypes that failed to compile."""
        if self.path != "compiled":
            return self.note
        failed = _stats.compiled_failures()
        if not failed:
            return None
        return "eager for " + "; ".join(f"{dtype} ({why})" for dtype, why in failed.items())

