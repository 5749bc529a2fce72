"""Anomaly rules over a Trace: diagnoses a person can act on (pure: no pytest, no torch).

Every rule applies to any Trace (captured from the reference model, from a user model, or parsed
from a seed-format Markdown report) and returns ``Anomaly`` records: a rule id, a severity, the
iteration and stage, a one-line symptom, a likely cause and a suggested fix. Rules that need a
stage the trace does not have stay silent.

The invariant and growth rules key on what a stage is, not on its name: its kind
(``kinds.StageKind``, recorded in ``Trace.stage_kinds``). norm-invariant checks every ``norm``
stage (a ``norm_affine`` one, after a learnable scale, is not checked, and one info says so);
rope-invariant every ``rotary`` stage against its input (``Trace.stage_inputs``); dead-relu every
``activation`` stage (a chain such as ReLU then its square once, at its end); softcap every
``softcap`` stage; residual-growth and gradient-growth the last ``residual`` stage of each block.
A trace without kinds (older files, a parsed report) gets the kinds the reference model's names
imply (``kinds.kind_by_name``), so its anomalies are the ones it always had.

The expected-zero schedule is derived, not hard-coded. A zero-initialised projection (lm_head and
every c_proj in nanochat) outputs exactly zero until an optimizer step has moved its weights, and
while one is still zero no gradient flows back through it: the parameters behind it see exactly
zero gradients. So at each iteration the zero-init parameters whose output is still zero are
"pending", and zeros are expected while anything is pending; once nothing is pending, every stage
output and every gradient must be nonzero. A projection whose gradient was nonzero before a step
but whose output is still zero after it, or one that never gets a gradient while every other has
moved, is an error. The zero-init parameters are those the capture saw exactly zero when it began
(``Trace.zero_params``); for a parsed report, the nanochat names (lm_head, *.c_proj).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields, make_dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, SupportsFloat, SupportsIndex, TypeVar

from . import kinds as _kinds
from .kinds import StageKind
from .trace import Iteration, Section, TensorStats, Trace


class Severity(str, Enum):
    """How much an anomaly matters; str-valued, so it prints and compares as "error" etc."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO
SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}


def with_where(symptom: str, where: str | None) -> str:
    """The symptom, then " (where)" unless the symptom already names it."""
    return symptom + (f" ({where})" if where and where not in symptom else "")


@dataclass(frozen=True)
class Anomaly:
    rule: str
    severity: Severity
    iteration: int | None
    stage: str | None
    symptom: str
    cause: str
    fix: str

    @property
    def message(self) -> str:
        return f"{self.symptom}. Likely cause: {self.cause}. Fix: {self.fix}."

    @property
    def where(self) -> str:
        parts = []
        if self.stage:
            parts.append(self.stage)
        if self.iteration is not None:
            parts.append(f"iteration {self.iteration}")
        return ", ".join(parts)

    @property
    def located(self) -> str:
        return with_where(self.symptom, self.where)


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Rule:
    """One anomaly rule: its id, what it reports, the severities it can report, its thresholds
    (name -> default) and the function that finds it in a ``Context``."""

    id: str
    description: str
    severities: tuple[Severity, ...]
    thresholds: Mapping[str, float]
    check: Check


Check = Callable[["Context"], list[Anomaly]]  # a rule's function
REGISTRY: dict[str, Rule] = {}  # in detection order


def rule(*, id: str, description: str, severity: Severity | Sequence[Severity],
         thresholds: Mapping[str, float] | None = None) -> Callable[[Check], Check]:
    """Register the decorated ``function(ctx) -> list[Anomaly]`` as the rule ``id``."""
    severities = (severity,) if isinstance(severity, Severity) else tuple(severity)
    defaults = dict(thresholds or {})

    def register(function: Check) -> Check:
        if id in REGISTRY:
            raise ValueError(f"anomaly rule {id!r} is registered twice")
        for name, default in defaults.items():
            for other in REGISTRY.values():
                if other.thresholds.get(name, default) != default:
                    raise ValueError(f"threshold {name!r}: default {default!r} in rule {id!r}, "
                                     f"{other.thresholds[name]!r} in rule {other.id!r}")
        REGISTRY[id] = Rule(id, description, severities, defaults, function)
        return function

    return register


def check_rules(ids: Iterable[str], *, noun: str = "rule", show: Callable[[str], str] = str) -> list[str]:
    """The rule ids as a list; ValueError naming the unknown ones and the known ones."""
    listed = list(ids)
    unknown = [r for r in listed if r not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown {noun} {', '.join(map(show, unknown))}; known: {', '.join(REGISTRY)}")
    return listed


def _threshold_defaults() -> dict[str, float]:
    out: dict[str, float] = {}
    for r in REGISTRY.values():
        out.update(r.thresholds)
    return out


_Th = TypeVar("_Th", bound="_ThresholdMethods")


class _ThresholdMethods:
    """The methods of ``Thresholds``, a frozen dataclass whose fields the rules declare."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # set on Thresholds by make_dataclass

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def updated(self: _Th, values: Mapping[str, object]) -> _Th:
        """These thresholds with ``values`` replacing some; ValueError for an unknown name or a
        value that is not a finite number."""
        unknown = set(values) - set(self.names())
        if unknown:
            raise ValueError(f"unknown threshold {', '.join(sorted(unknown))}; known: {', '.join(self.names())}")
        parsed = {}
        for name, value in values.items():
            number = _finite(value)
            if number is None:
                raise ValueError(f"threshold {name} must be a finite number, got {value!r}")
            parsed[name] = number
        return replace(self, **parsed)


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (SupportsFloat, SupportsIndex, str)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def parse_thresholds(lines: Iterable[str]) -> dict[str, float]:
    """'name = value' lines (ini) into a dict; errors name the line."""
    out: dict[str, float] = {}
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"threshold line {line!r}: expected 'name = value'")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"threshold line {line!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"threshold line {line!r}: {value.strip()!r} is not a finite number")
        out[name.strip()] = number
    Thresholds().updated(out)  # validates the names
    return out


# --------------------------------------------------------------------------- helpers
# a block's index in a stage name: blocks.3.attn.q, transformer.h.3/add#1, model.layers.3.mlp
_BLOCK = re.compile(r"^(?:.*\.)?(?:blocks|layers|h)\.(\d+)(?:[./#]|$)")


def _block_index(name: str) -> int | None:
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def _known_zero(s: TensorStats | None) -> bool:
    return s is not None and s.all_zero


def _vocab_size(trace: Trace) -> int | None:
    v = trace.config.get("vocab_size")
    if isinstance(v, int) and v > 1:
        return v
    for it in trace.iterations:
        for name in ("lm_head.logits", "lm_head.softcap"):
            s = it.forward.get(name)
            if s is not None and s.shape:
                return s.shape[-1]
    return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt_names(names: Sequence[str], limit: int = 6) -> str:
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" and {len(names) - limit} more"


# --------------------------------------------------------------------------- the rule context
@dataclass(frozen=True)
class Context:
    """What the rules share, computed once per ``detect`` call."""

    trace: Trace
    th: Thresholds
    vocab: int | None                       # the vocabulary size, from the config or the logits' shape
    zero_init: Mapping[str, str | None]     # zero-init parameter -> the stage that shows its output
    stuck_loss: tuple[Anomaly, ...]         # the stuck-loss findings (the zero schedule reads them)
    stuck_head: bool                        # the loss is stuck at ln V: the LM head never moved
    zero_schedule: tuple[Anomaly, ...]      # the zero-schedule and dead-gradient findings
    kinds: Mapping[str, StageKind | None] = field(default_factory=dict)  # stage -> kind (None: no rule's)
    recorded_kinds: bool = False            # the kinds are the trace's own (else implied by reference names)
    stage_order: tuple[str, ...] = ()       # every forward stage of the trace, first seen first

    @classmethod
    def of(cls, trace: Trace, th: Thresholds) -> Context:
        vocab = _vocab_size(trace)
        zero_init = _zero_init(trace)
        stuck = tuple(_stuck_loss(trace, th, vocab))
        stuck_head = any(a.severity == ERROR and a.iteration is not None
                         and _loss_is_ln_v(trace.iterations[a.iteration].loss, vocab, th) for a in stuck)
        order = tuple(dict.fromkeys(n for it in trace.iterations for sec in (it.forward, it.stage_grads) for n in sec))
        recorded = bool(trace.stage_kinds)
        if recorded:
            kinds: dict[str, StageKind | None] = {n: StageKind(k) for n, k in trace.stage_kinds.items()}
        else:
            kinds = {n: _kinds.kind_by_name(n, trace.parameters) for n in order}
        forward = tuple(n for n in order if any(n in it.forward for it in trace.iterations))
        return cls(trace, th, vocab, zero_init, stuck, stuck_head,
                   tuple(_zero_schedule(trace, zero_init, stuck_head)), kinds, recorded, forward)

    def kind(self, stage: str) -> StageKind | None:
        """The stage's kind (None: unknown, or of no rule's concern in a trace without kinds)."""
        return self.kinds.get(stage)


# --------------------------------------------------------------------------- zero schedule
def _output_stage(trace: Trace, param: str) -> str | None:
    """The stage that shows a parameter's module output: the module itself (a per-module trace),
    or the reference taps (X.c_proj -> X.out, lm_head -> lm_head.logits)."""
    module = param.rsplit(".", 1)[0]
    stages = set(trace.stage_names)
    if module in stages:
        return module
    if module.endswith(".c_proj") and module[: -len(".c_proj")] + ".out" in stages:
        return module[: -len(".c_proj")] + ".out"
    if module + ".logits" in stages:
        return module + ".logits"
    if module + ".out" in stages:
        return module + ".out"
    return None


def _zero_init(trace: Trace) -> dict[str, str | None]:
    """zero-init parameter -> its output stage."""
    if trace.zero_params is not None:
        return {p: _output_stage(trace, p) for p in trace.zero_params}
    # a parsed report: nanochat's zero-init choices, seen as stages that are exactly zero at iteration 0
    out: dict[str, str | None] = {}
    first = trace.iterations[0] if trace.iterations else None
    if first is None:
        return out
    for stage, s in first.forward.items():
        if not s.all_zero:
            continue
        if stage == "lm_head.logits":
            out["lm_head.weight"] = stage
        elif stage.endswith((".attn.out", ".mlp.out")):
            out[stage[: -len(".out")] + ".c_proj.weight"] = stage
    return out


def _pending(trace: Trace, zero_init: Mapping[str, str | None], i: int) -> list[str]:
    """Zero-init parameters whose output is still exactly zero at iteration i (or unknown as moved)."""
    it = trace.iterations[i]
    pending = []
    for param, stage in zero_init.items():
        if stage is None:
            # no stage shows its output: judge by whether it has moved before (a gradient and a step)
            moved = any(_grad_nonzero(trace.iterations[j], param) and trace.iterations[j].stepped
                        for j in range(i))
            if not moved:
                pending.append(param)
        elif (stage not in it.forward or it.forward[stage].all_zero) and (
                stage in it.forward or not any(stage in trace.iterations[j].forward and
                                               not trace.iterations[j].forward[stage].all_zero for j in range(i))):
            pending.append(param)
    return pending


def _grad_nonzero(it: Iteration, param: str) -> bool:
    s = it.param_grads.get(param)
    return s is not None and s.zero_frac is not None and not s.all_zero


def _zero_schedule(trace: Trace, zero_init: Mapping[str, str | None], stuck_head: bool) -> list[Anomaly]:
    """The findings of the zero-schedule and dead-gradient rules (one analysis, two rule ids)."""
    out: list[Anomaly] = []
    for i, it in enumerate(trace.iterations):
        if not it.forward and not it.param_grads and not it.stage_grads:
            continue  # a loss-only iteration of a parsed report
        pending = _pending(trace, zero_init, i)
        zero_out = [n for n, s in it.forward.items() if s.all_zero and not n.startswith("inputs.")]
        zero_sgrads = [n for n, s in it.stage_grads.items() if s.all_zero]
        none_pgrads = [n for n, s in it.param_grads.items() if s is None]
        zero_pgrads = [n for n, s in it.param_grads.items() if _known_zero(s)]
        if pending:
            init_outputs = [stage for p, stage in zero_init.items()
                            if p in pending and stage is not None and stage in zero_out]
            if init_outputs:
                out.append(Anomaly(
                    "zero-schedule", INFO, i, None,
                    f"{_fmt_names(init_outputs, 9)} output exactly zero",
                    f"the zero-init pattern: {_fmt_names(pending, 4)} start at zero and have not been "
                    "moved by an optimizer step yet",
                    "nothing to do while it lasts; it is a bug if it outlasts the first optimizer steps"))
            explained = zero_pgrads + zero_sgrads
            if explained:
                head = [p for p in pending if p.startswith("lm_head")]
                because = ("the LM head is still zero, so no gradient flows back through it"
                           if head else f"{_fmt_names(pending, 4)} are still zero, so no gradient flows back through them")
                out.append(Anomaly(
                    "zero-schedule", INFO, i, None,
                    f"{_count(len(zero_pgrads), 'parameter gradient')} ({_fmt_names(zero_pgrads, 4)}) and "
                    f"{_count(len(zero_sgrads), 'stage gradient')} exactly zero",
                    f"expected: {because}",
                    "nothing to do; these become nonzero once the zero-init projections have moved"))
        # overdue: a zero-init projection that had a gradient and a step, yet still outputs zero
        for p in pending:
            stage = zero_init.get(p)
            had = [j for j in range(i) if _grad_nonzero(trace.iterations[j], p) and trace.iterations[j].stepped]
            if had and stage is not None:
                severity = INFO if (stuck_head and p.startswith("lm_head")) else ERROR
                out.append(Anomaly(
                    "zero-schedule", severity, i, stage,
                    f"{stage} still outputs exactly zero although {p} had a nonzero gradient and an "
                    f"optimizer step followed (iteration {had[0]})",
                    "the optimizer did not update it: it is missing from every param group, its learning "
                    "rate is 0, or the step is skipped" + ("; see stuck-loss" if severity == INFO else ""),
                    f"check that {p} is in an optimizer param group with lr > 0 and that optimizer.step() runs"))
        if not pending:
            dead = zero_pgrads + none_pgrads
            if dead:
                out.append(Anomaly(
                    "dead-gradient", ERROR, i, dead[0],
                    f"{len(dead)} parameters have {'no' if none_pgrads else 'exactly zero'} gradient at "
                    f"iteration {i} ({_fmt_names(dead, 4)}) after every zero-init projection has moved",
                    "the parameter is detached from the loss (a .detach(), torch.no_grad(), an unused "
                    "module or requires_grad=False), or the path to it is blocked by a dead unit",
                    "follow the graph from the loss to this parameter; look for .detach(), .data or no_grad"))
            elif zero_out or zero_sgrads:
                stage = (zero_out or zero_sgrads)[0]
                kind = "output" if zero_out else "gradient"
                out.append(Anomaly(
                    "zero-schedule", ERROR, i, stage,
                    f"{stage} {kind} is exactly zero at iteration {i}, after every zero-init projection "
                    f"has moved ({len(zero_out)} outputs, {len(zero_sgrads)} stage gradients zero)",
                    "a projection that never leaves zero, or a stage cut from the loss",
                    "find what writes this stage: a zero weight the optimizer does not update, a mask, or a detach"))
        elif i > 0 and zero_init:
            # pending: zero-init parameters that never got a gradient while every other one has moved
            others_moved = [p for p in zero_init if p not in pending]
            stuck = [p for p in pending
                     if not any(_grad_nonzero(trace.iterations[j], p) for j in range(i + 1))]
            if others_moved and stuck and len(stuck) == len(pending) and \
                    all(_moved_before(trace, zero_init, o, i) for o in others_moved):
                out.append(Anomaly(
                    "dead-gradient", ERROR, i, stuck[0],
                    f"{_fmt_names(stuck, 4)} never received a gradient while every other zero-init "
                    f"projection has moved ({_fmt_names(others_moved, 3)})",
                    "the parameter is detached from the loss, so it stays zero and so does its output",
                    "follow the graph from the loss to this parameter; look for .detach(), .data or no_grad"))
    # infos describe each iteration; a warning or error is reported where it starts, not again each iteration
    seen, kept = set(), []
    for a in out:
        key = (a.rule, a.stage, a.severity)
        if a.severity == INFO or key not in seen:
            seen.add(key)
            kept.append(a)
    return kept


def _moved_before(trace: Trace, zero_init: Mapping[str, str | None], param: str, i: int) -> bool:
    stage = zero_init.get(param)
    for j in range(i + 1):
        it = trace.iterations[j]
        if stage is not None and stage in it.forward and not it.forward[stage].all_zero:
            return True
    return stage is None


# --------------------------------------------------------------------------- stage rules
@rule(id="non-finite", severity=ERROR,
      description="NaN or Inf in a stage, a gradient or the loss (first occurrence)")
def non_finite(ctx: Context) -> list[Anomaly]:
    trace = ctx.trace

    def masked(name: str, s: TensorStats) -> bool:  # a mask's -inf entries are the mask working
        return (ctx.kind(name) == StageKind.MASK and s.nan == 0 and s.max is not None
                and math.isfinite(s.max))

    for i, it in enumerate(trace.iterations):
        ordered = [(Section.FORWARD.label, n, s) for n, s in it.forward.items() if not masked(n, s)]
        ordered += [(Section.STAGE_GRADS.label, n, s) for n, s in it.stage_grads.items()]
        ordered += [(Section.PARAM_GRADS.label, n, s) for n, s in it.param_grads.items() if s is not None]
        for kind, name, s in ordered:
            if s.nan or s.inf:
                what = "NaN" if s.nan else "Inf"
                total = sum(1 for _, _, t in ordered if t.nan or t.inf)
                return [Anomaly("non-finite", ERROR, i, name,
                                f"first {what} at {name} ({kind}), iteration {i}: {s.nan} NaN, {s.inf} Inf "
                                f"of {s.numel}; {total} stages non-finite in this iteration",
                                "an overflow or an invalid operation at or just before this stage "
                                "(a division by zero, log/sqrt of a non-positive value, an fp16 overflow, or a NaN input)",
                                f"inspect the inputs of {name}; everything after it in execution order inherits the NaN")]
        if it.loss is not None and not math.isfinite(it.loss):
            return [Anomaly("non-finite", ERROR, i, Section.LOSS, f"the loss is {it.loss} at iteration {i}",
                            "an overflow or an invalid value in the logits or the targets",
                            "check the targets' range and the logits' magnitude")]
    return []


# --------------------------------------------------------------------------- loss rules
def _loss_is_ln_v(loss: float | None, v: int | None, th: Thresholds) -> bool:
    return v is not None and loss is not None and abs(loss - math.log(v)) <= th.ln_v_rtol * math.log(v)


def _steady(a: float | None, b: float | None, rtol: float) -> bool:
    """Both losses known and b within rtol of a."""
    return a is not None and b is not None and abs(b - a) <= rtol * max(abs(a), 1e-12)


def _stuck_loss(trace: Trace, th: Thresholds, v: int | None) -> list[Anomaly]:
    out = []
    its = trace.iterations
    runs = []  # (start, end) of each run of steady losses
    i = 0
    while i < len(its) - 1:
        j = i
        while j + 1 < len(its) and _steady(its[j].loss, its[j + 1].loss, th.stuck_loss_rtol):
            j += 1
        if j > i:
            runs.append((i, j))
            i = j
        else:
            i += 1
    for a, b in runs:
        between = [its[k].stepped for k in range(a, b)]
        loss = its[a].loss
        n = b - a + 1
        ln_v = _loss_is_ln_v(loss, v, th)
        what = f"the loss is {loss:.6f} at iterations {a}..{b} ({n} iterations)"
        if ln_v:
            what += f", exactly ln V = ln {v}"
        head = ("the logits are all zero: the LM head is not being updated: check that optimizer.step() runs, "
                "that lm_head is in a param group, and that the learning rate is not 0 at step 0")
        if all(s is False for s in between):
            out.append(Anomaly("stuck-loss", INFO, b, Section.LOSS, what,
                               "expected: these are gradient-accumulation micro-steps (no optimizer step between them)",
                               "nothing to do"))
        elif all(s is True for s in between):
            cause = head if ln_v else ("the optimizer steps do not change the model: learning rate 0, "
                                       "parameters missing from the optimizer, or gradients zeroed before the step")
            out.append(Anomaly("stuck-loss", ERROR, b, Section.LOSS, what + " across optimizer steps", cause,
                               "check the param groups and learning rates, and that step() runs after backward()"))
        else:
            unknown = " (the trace does not say whether optimizer steps ran between them)" \
                if any(s is None for s in between) else ""
            cause = ("either these are gradient-accumulation micro-steps with no optimizer step between them "
                     "(then this is expected), or the loop never steps" + (f"; if it does step, {head}" if ln_v else ""))
            out.append(Anomaly("stuck-loss", ERROR, b, Section.LOSS, what + unknown, cause,
                               "record optimizer steps in the trace (trace_training does), and make sure "
                               "optimizer.step() runs with lm_head in a param group and lr > 0"))
    return out


@rule(id="stuck-loss", severity=(ERROR, INFO), thresholds={"stuck_loss_rtol": 1e-6, "ln_v_rtol": 1e-5},
      description="the loss does not move across optimizer steps")
def stuck_loss(ctx: Context) -> list[Anomaly]:
    return list(ctx.stuck_loss)


@rule(id="loss-at-init", severity=ERROR, thresholds={"ln_v_rtol": 1e-5, "init_loss_rtol": 0.25},
      description="the first loss is not ln V (zero-init head) or far from it (random head)")
def loss_at_init(ctx: Context) -> list[Anomaly]:
    trace, th = ctx.trace, ctx.th
    if not trace.iterations or trace.iterations[0].loss is None:
        return []
    v = ctx.vocab
    if v is None:
        return []
    first = trace.iterations[0]
    loss, ln_v = first.loss, math.log(v)
    if loss is None:
        return []
    logits = first.forward.get("lm_head.logits")
    zero_head = (trace.zero_params is not None and any(p.startswith("lm_head") for p in trace.zero_params)) \
        or (logits is not None and logits.all_zero)
    if zero_head:
        if abs(loss - ln_v) > th.ln_v_rtol * ln_v:
            return [Anomaly("loss-at-init", ERROR, 0, Section.LOSS,
                            f"the first loss is {loss:.6f} but the logits are all zero, so it must be ln {v} = {ln_v:.6f}",
                            "the loss is not a mean cross-entropy over the vocabulary: a wrong reduction, "
                            "label smoothing, ignore_index masking most targets, or the wrong vocabulary size",
                            "compute F.cross_entropy(logits.view(-1, V), targets.view(-1)) with reduction='mean'")]
        return []
    if abs(loss - ln_v) > th.init_loss_rtol * ln_v:
        return [Anomaly("loss-at-init", ERROR, 0, Section.LOSS,
                        f"the first loss is {loss:.6f}, far from ln {v} = {ln_v:.6f} expected of an untrained model",
                        "a broken init (logits far from uniform: a large head init or a missing softcap/scale) "
                        "or a broken loss", "verify the loss at init (Karpathy): it should be close to ln V")]
    return []


@rule(id="divergence", severity=(ERROR, WARNING), thresholds={"divergence_factor": 1.5, "spike_factor": 2.0},
      description="the loss rising over optimizer steps, or spiking above its running minimum")
def divergence(ctx: Context) -> list[Anomaly]:
    trace, th = ctx.trace, ctx.th
    out = []
    its = trace.iterations
    best = None
    for i, it in enumerate(its):
        if it.loss is None or not math.isfinite(it.loss):
            continue
        prev = its[i - 1] if i else None
        if prev is not None and prev.stepped and prev.loss is not None and prev.loss > 0 \
                and it.loss > th.divergence_factor * prev.loss:
            out.append(Anomaly("divergence", ERROR, i, Section.LOSS,
                               f"the loss rose from {prev.loss:.6f} to {it.loss:.6f} over one optimizer step "
                               f"(more than {th.divergence_factor:g}x)",
                               "the learning rate is too high, or a warmup is missing",
                               "lower the learning rate or add warmup; check the gradient norms of that step"))
        elif best is not None and best > 0 and it.loss > th.spike_factor * best:
            out.append(Anomaly("divergence", WARNING, i, Section.LOSS,
                               f"the loss {it.loss:.6f} spiked above {th.spike_factor:g}x its running minimum {best:.6f}",
                               "an unstable step (learning rate, a bad batch, or attention logit growth)",
                               "look at the gradient norms at that iteration; consider clipping or a lower lr"))
        best = it.loss if best is None else min(best, it.loss)
    return out


# --------------------------------------------------------------------------- zero-schedule rules
@rule(id="zero-schedule", severity=(INFO, ERROR),
      description="zeros the zero-init schedule expects (info) or zeros it does not (error)")
def zero_schedule(ctx: Context) -> list[Anomaly]:
    return [a for a in ctx.zero_schedule if a.rule == "zero-schedule"]


@rule(id="dead-gradient", severity=ERROR,
      description="a parameter or stage gradient exactly zero where a gradient must flow")
def dead_gradient(ctx: Context) -> list[Anomaly]:
    return [a for a in ctx.zero_schedule if a.rule == "dead-gradient"]


# --------------------------------------------------------------------------- invariants and growth
# The rules below key on stage kinds (``kinds``): the trace's own, or for a trace without them the
# kinds the reference model's names imply (``kinds.kind_by_name``), so old traces read as before.
NORM_PATTERNS = _kinds.NORM_PATTERNS


@rule(id="norm-invariant", severity=(ERROR, INFO), thresholds={"norm_rms_tol": 1e-3},
      description="a norm output without a learnable scale whose rms is not 1")
def norm_invariant(ctx: Context) -> list[Anomaly]:
    trace, th = ctx.trace, ctx.th
    out = []
    for i, it in enumerate(trace.iterations):
        for name, s in it.forward.items():
            if ctx.kind(name) != StageKind.NORM or not s.finite or s.all_zero:
                continue  # an all-zero input normalises to zero: the stage feeding it is the story
            rms = s.rms_estimate
            tol = th.norm_rms_tol * (10 if s.dtype in ("torch.bfloat16", "torch.float16") else 1)
            # rows that are exactly zero (padding, a zeroed position) stay zero: rms^2 = share of nonzero rows
            expected = math.sqrt(max(0.0, 1.0 - (s.zero_frac or 0.0)))
            if rms is not None and abs(rms - expected) > tol:
                want = "1" if expected == 1.0 else \
                    f"{expected:.6f} (1 over its {1 - (s.zero_frac or 0.0):.1%} nonzero entries)"
                out.append(Anomaly("norm-invariant", ERROR, i, name,
                                   f"{name} has rms {rms:.6f}, not {want} (tolerance {tol:g})",
                                   "the norm does not normalise: replaced by an identity, normalising over the "
                                   "wrong dim, or carrying a learnable scale that moved",
                                   f"check the norm that produces {name}: F.rms_norm(x, (x.size(-1),))"))
                break  # one per iteration: later norms usually inherit the cause
    out = _first_per_stage(out)
    affine = [n for n in ctx.stage_order if ctx.kind(n) == StageKind.NORM_AFFINE]
    if affine and ctx.recorded_kinds:
        checked = sum(ctx.kind(n) == StageKind.NORM for n in ctx.stage_order)
        out.append(Anomaly("norm-invariant", INFO, None, None,
                           f"{_count(len(affine), 'norm stage')} with a learnable scale not checked "
                           f"({_fmt_names(affine, 4)}); {_count(checked, 'norm stage')} without one checked",
                           "a learnable weight or bias is applied before the stage's output, so its rms need "
                           "not be 1", "nothing to do; a norm's own normalisation is checked where it is a "
                           "stage without the scale (F.rms_norm(x, shape) before * weight)"))
    return out


def _relative(name: str, other: str) -> str:
    """``other`` without the module prefix it shares with ``name`` (``q`` beside ``blocks.0.attn.q_rope``)."""
    prefix = name.rsplit("/", 1)[0] + "." if "/" in name else name.rsplit(".", 1)[0] + "."
    return other[len(prefix):] if other.startswith(prefix) and len(other) > len(prefix) else other


@rule(id="rope-invariant", severity=ERROR, thresholds={"rope_rtol": 2.0**-8},
      description="RoPE changed the rms of q or k beyond the bf16 bound")
def rope_invariant(ctx: Context) -> list[Anomaly]:
    trace, th = ctx.trace, ctx.th
    out = []
    for i, it in enumerate(trace.iterations):
        for name, s in it.forward.items():
            if ctx.kind(name) != StageKind.ROTARY:
                continue
            src = trace.stage_inputs.get(name) or _kinds.rope_input_by_name(name)
            before = it.forward.get(src) if src else None
            if src is None or before is None:
                continue
            a, b = before.rms_estimate, s.rms_estimate
            if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
                continue
            if abs(b - a) > th.rope_rtol * a + 1e-12:
                label = _relative(name, src)
                out.append(Anomaly("rope-invariant", ERROR, i, name,
                                   f"RoPE changed the rms of {label} from {a:.6f} to {b:.6f} at {name} "
                                   f"(allowed {th.rope_rtol:.3g} relative: bf16 tables)",
                                   "the rotation is not a rotation: a flipped sign of sin in one half, "
                                   "mismatched pair layout (interleaved vs half-split) or wrong tables",
                                   "run pytest_gpttrace.properties.check_rope on your rotary function"))
    return _first_per_stage(out)


DEFAULT_SOFTCAP = 15.0  # nanochat's cap, for a trace whose config names none
SOFTCAP_KEYS = ("softcap", "final_logit_softcapping")  # the reference config's, Hugging Face's (Gemma 2)


def _softcap_of(config: Mapping[str, Any]) -> float:
    for key in SOFTCAP_KEYS:
        cap = config.get(key)
        if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0:
            return float(cap)
    return DEFAULT_SOFTCAP


@rule(id="softcap", severity=(ERROR, WARNING, INFO), thresholds={"softcap_saturation": 0.5},
      description="logits outside ±softcap, or saturated near the cap")
def softcap(ctx: Context) -> list[Anomaly]:
    trace, th = ctx.trace, ctx.th
    cap = _softcap_of(trace.config)
    out = []
    for i, it in enumerate(trace.iterations):
        for name, s in it.forward.items():
            if ctx.kind(name) != StageKind.SOFTCAP:
                continue
            if s.min is None or s.max is None or not s.finite:
                continue
            peak = max(abs(s.min), abs(s.max))
            if peak > cap * (1 + 1e-6):
                out.append(Anomaly("softcap", ERROR, i, name,
                                   f"logits after the softcap reach {peak:.4f}, beyond ±{cap:g}",
                                   "the cap is not applied (or applied before another scaling)",
                                   "apply logits = cap * tanh(logits / cap) last"))
                continue
            rms = s.rms_estimate
            if rms is not None and rms / cap > th.softcap_saturation:
                out.append(Anomaly("softcap", WARNING, i, name,
                                   f"the softcapped logits are saturated: rms {rms:.3f} is {rms / cap:.0%} of the "
                                   f"cap ±{cap:g} (peak {peak:.3f})",
                                   "the logits grow too large; the tanh squashes most of them near the cap",
                                   "lower the LM head learning rate, or check the final norm"))
            elif peak / cap > 0.9:
                out.append(Anomaly("softcap", INFO, i, name,
                                   f"the largest logits reach {peak / cap:.0%} of the cap ±{cap:g}",
                                   "some logits are near saturation", "nothing to do unless it grows"))
    return out


def _layer_series(ctx: Context, it: Iteration, section: Section) -> list[tuple[int, str, TensorStats]]:
    """Per block, the residual stream after the block: its last residual stage in forward order
    (mlp_resid; the second add, ``blocks.0/add#2``; a block's input where nothing later is traced)."""
    stats = it.section(section)
    by_block: dict[int, tuple[str, TensorStats]] = {}
    for name in dict.fromkeys([*it.forward, *stats]):
        b = _block_index(name)
        s = stats.get(name)
        if b is None or s is None or ctx.kind(name) != StageKind.RESIDUAL:
            continue
        if ctx.recorded_kinds or name.endswith("mlp_resid") or b not in by_block:
            by_block[b] = (name, s)
    return [(b, *by_block[b]) for b in sorted(by_block)]


@rule(id="residual-growth", severity=ERROR, thresholds={"residual_factor": 2.0},
      description="residual-stream std exploding or collapsing across layers")
def residual_growth(ctx: Context) -> list[Anomaly]:
    trace, th = ctx.trace, ctx.th
    out = []
    for i, it in enumerate(trace.iterations):
        series = _layer_series(ctx, it, Section.FORWARD)
        for (_, n0, s0), (_, n1, s1) in itertools.pairwise(series):
            a, c = s0.std, s1.std
            if not a or c is None or not (math.isfinite(a) and math.isfinite(c)):
                continue
            ratio = c / a
            if ratio > th.residual_factor or ratio < 1 / th.residual_factor:
                grows = ratio > 1
                out.append(Anomaly("residual-growth", ERROR, i, n1,
                                   f"the residual stream std {'grows' if grows else 'shrinks'} {ratio:.3g}x from "
                                   f"{n0} ({a:.4g}) to {n1} ({c:.4g}) (limit {th.residual_factor:g}x per layer)",
                                   "a residual branch scaled up (exploding activations)" if grows else
                                   "a residual stream being overwritten or scaled down (vanishing activations)",
                                   "check the residual additions x = x + f(norm(x)) and the output projection init"))
                break
    return _first_per_stage(out)


@rule(id="gradient-growth", severity=WARNING, thresholds={"grad_factor": 10.0},
      description="residual-stream gradients exploding or vanishing across layers")
def gradient_growth(ctx: Context) -> list[Anomaly]:
    trace, th = ctx.trace, ctx.th
    out = []
    for i, it in enumerate(trace.iterations):
        series = _layer_series(ctx, it, Section.STAGE_GRADS)
        for (_, n0, s0), (_, n1, s1) in itertools.pairwise(series):
            a, c = s0.rms_estimate, s1.rms_estimate
            if not a or not c or not (math.isfinite(a) and math.isfinite(c)):
                continue
            ratio = a / c  # gradients flow from later to earlier layers
            if ratio > th.grad_factor or ratio < 1 / th.grad_factor:
                out.append(Anomaly("gradient-growth", WARNING, i, n0,
                                   f"the residual gradient rms changes {ratio:.3g}x from {n1} to {n0} "
                                   f"(limit {th.grad_factor:g}x per layer)",
                                   "exploding or vanishing gradients across layers",
                                   "check residual scaling and norms; consider gradient clipping"))
                break
    return _first_per_stage(out)


@rule(id="dead-relu", severity=(WARNING, ERROR), thresholds={"dead_relu_warn": 0.9, "dead_relu_error": 0.999},
      description="activation outputs (ReLU, ReLU²) (almost) all zero")
def dead_relu(ctx: Context) -> list[Anomaly]:
    trace, th = ctx.trace, ctx.th
    out = []
    for i, it in enumerate(trace.iterations):
        names = list(it.forward)
        for n, (name, s) in enumerate(it.forward.items()):
            if ctx.kind(name) != StageKind.ACTIVATION or s.zero_frac is None or s.all_zero:
                continue
            after = it.forward[names[n + 1]] if n + 1 < len(names) else None
            if after is not None and ctx.kind(names[n + 1]) == StageKind.ACTIVATION and after.numel == s.numel:
                continue  # a chain (ReLU then its square): reported once, at its end
            if s.zero_frac >= th.dead_relu_error:
                sev = ERROR
            elif s.zero_frac >= th.dead_relu_warn:
                sev = WARNING
            else:
                continue
            out.append(Anomaly("dead-relu", sev, i, name,
                               f"{s.zero_frac:.1%} of {name} is exactly zero (about half is normal at init)",
                               "dead units: the pre-activations went negative (a large negative bias, a large "
                               "learning rate, or a broken c_fc init)",
                               "check the c_fc init and the learning rate of the MLP weights"))
    return _first_per_stage(out)


@rule(id="coverage", severity=(WARNING, INFO),
      description="a stage that fired in some iterations and not in others, or a selected module that never ran")
def coverage(ctx: Context) -> list[Anomaly]:
    cov = ctx.trace.coverage
    out = []
    for stage, missing in cov.missing.items():
        its = ", ".join(str(i) for i in missing)
        out.append(Anomaly("coverage", WARNING, missing[0], stage,
                           f"{stage} did not fire in iteration{'s' if len(missing) > 1 else ''} {its} "
                           "(it did in the others)",
                           "the forward takes another path in some steps: data-dependent control flow, a "
                           "branch on the step count, or a module skipped (layer drop)",
                           "compare the iterations' stage lists; a golden of such a model holds each path"))
    if cov.never_fired:
        out.append(Anomaly("coverage", INFO, None, None,
                           f"{_count(len(cov.never_fired), 'selected module')} never ran: "
                           f"{_fmt_names(cov.never_fired)}",
                           "modules the forward does not call (a dropout the fused attention replaces, an "
                           "unused head): they have no stage",
                           "nothing to do unless one of them should run"))
    return out


def _first_per_stage(anomalies: list[Anomaly]) -> list[Anomaly]:
    """Keep the first iteration at which a (rule, stage) fires: later ones repeat it."""
    seen, out = set(), []
    for a in anomalies:
        key = (a.rule, a.stage, a.severity)
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


# --------------------------------------------------------------------------- entry point
# Thresholds and RULES are built here, once, from the rules registered above: a new rule is a
# decorated function placed above this line (in this module), and its row in the README's table.
if TYPE_CHECKING:
    class Thresholds(_ThresholdMethods):
        """What a type checker sees of the class below: one float field per declared threshold."""

        def __init__(self, **values: float) -> None: ...

        def __getattr__(self, name: str) -> float: ...
else:
    Thresholds = make_dataclass(
        "Thresholds", [(name, float, field(default=value)) for name, value in _threshold_defaults().items()],
        bases=(_ThresholdMethods,), frozen=True, namespace={"__module__": __name__},
    )
    Thresholds.__doc__ = ("Named, configurable thresholds (ini gpt_trace_thresholds, marker thresholds=...), "
                          "gathered from the rules' declarations; see the README's rule table.")
RULES = {r.id: r.description for r in REGISTRY.values()}  # rule id -> description


def detect(trace: Trace, thresholds: Thresholds | None = None, allow: Iterable[str] = ()) -> list[Anomaly]:
    """Every anomaly of the trace, most important first (errors, warnings, infos; then execution order).

    ``allow``: rule ids whose errors and warnings are downgraded to info (still reported).
    """
    allow = set(check_rules(allow, noun="anomaly rule"))
    ctx = Context.of(trace, thresholds or Thresholds())
    found = [a for r in REGISTRY.values() for a in r.check(ctx)]
    found = [replace(a, severity=INFO, cause=a.cause + " (allowed for this test)") if a.rule in allow and
             a.severity != INFO else a for a in found]
    return sorted(found, key=lambda a: (SEVERITY_ORDER[a.severity],
                                        a.iteration if a.iteration is not None else -1))


def errors(anomalies: Iterable[Anomaly]) -> list[Anomaly]:
    return [a for a in anomalies if a.severity == ERROR]
