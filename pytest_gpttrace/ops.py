"""Functional stages: the results of the torch functions a module's forward calls, named by module.

A model written with functions (``F.rms_norm``, ``F.scaled_dot_product_attention``, ``x.square()``,
``x + self.attn(x)``) has few leaf modules, and everything between them is invisible to module
hooks. Under the ``ops`` granularity a ``torch.overrides.TorchFunctionMode`` is active while the
traced model's forward runs (pushed by a forward pre-hook on the root module, popped by its forward
hook, which also runs when the forward raises); forward pre-hooks and hooks on every module keep
the stack of modules whose forward is running. Each call of a function in the op list made
directly inside a module's forward (or a plain function it calls) is a stage:

    <module>/<op>#<k>           transformer.h.0.attn/rms_norm#2
    <op>#<k>                    cross_entropy#1 (called in the root module's own forward)

``<module>`` is the innermost running module's qualified name, ``<op>`` the op's name in the list,
``<k>`` counts that op's calls in that module within one iteration, from 1 (a module called twice
continues the count). The names follow the model's code and the order of its calls, so they are
the same in every run and process of the same code (no ids, no hashes). Ops inside a leaf module
that torch provides (the ``F.linear`` inside ``nn.Linear``, the ``F.layer_norm`` inside
``nn.LayerNorm``, or a subclass of one) and inside taps are not recorded: the module's own output
is that stage.

Which functions count is ``OPS`` (every op this module knows) and ``DEFAULT_OPS`` (the names on by
default); ``resolve_ops`` changes the list with the same grammar as stage patterns: plain names
replace the default list, ``+name`` adds, ``!name`` removes. ``register_op`` adds a rule of one's
own. Rules look at shapes and dtypes only, never at values: the mode never reads a tensor back to
the host.

The rules that are more than "this function was called":

- ``add``: the residual add, ``x + f(x)`` (``torch.add``, ``Tensor.add``, ``+``, ``+=``) of two
  floating tensors of the same shape as the running module's first floating tensor argument (a
  block's residual stream), in a module with submodules (a leaf module's adds, GELU's
  ``x + 0.044715 * x**3``, are not a stream's); the adds inside a rotation or a mask are not its
  shape and do not count.
  The root module takes token ids: its residual shape is that of the first floating tensor a module
  it calls returns (the embedding's), so ``x = x + block(x)`` in the root's forward is ``add#k``.
- ``rotary``: the rotated tensor, in either of the two ways RoPE is written. The join form:
  ``torch.cat`` / ``torch.stack`` along the last dimension of two or more floating tensors of one
  shape, each computed from slices of a tensor (a product or sum with one),
  ``cat([x1*cos + x2*sin, -x1*sin + x2*cos], -1)`` (nanochat); a join of other tensors (the heads
  of an attention, ``cat([h(x) for h in heads], -1)``) is not a rotation. The ``rotate_half`` form
  (Hugging Face, GPT-NeoX): ``x*cos + rotate_half(x)*sin`` (or ``-``), where ``rotate_half`` joins halves of
  ``x`` (slices, ``chunk``, and their negations) along the last dimension; the join of plain halves
  is the rotated copy and not a stage, the sum after it is. A tensor joined to itself
  (``cat((freqs, freqs), -1)``, a cos/sin table) is not a rotation.
- ``mask``: ``masked_fill`` (``x.masked_fill(mask, -inf)``, nanoGPT's causal mask) and
  ``torch.where`` with a boolean condition, filling with a number at or below ``MASK_FILL``
  (``-inf``, ``finfo.min``, ``-1e9``); its ``-inf`` entries are the mask working, not an overflow.
  ``torch.where(h > 0, h, 0.01 * h)`` is not a mask.
- ``softcap``: a tensor returned by ``tanh`` in this forward multiplied by a number
  (``cap * torch.tanh(logits / cap)``). A bare ``tanh`` is not on by default (``+tanh`` adds it).

Cost: every torch call inside the forward passes through the mode's Python handler (a dictionary
look-up for calls not in the list); see the README's Performance section for the measured figure.
"""

from __future__ import annotations

import contextlib
import numbers
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _pop_mode_temporarily

from .errors import CaptureError
from .kinds import StageKind

GRANULARITIES = ("auto", "taps", "modules", "ops")


@dataclass
class Frame:
    """One running module forward: its name, whether ops inside it are stages, and the shape of its
    first floating tensor argument (the residual stream's, for a block)."""

    name: str
    records: bool
    residual: tuple[int, ...] | None


@dataclass(frozen=True)
class OpCall:
    """What a rule sees of one call: the function, its arguments and result, the running module,
    and ``tag(t)``: what the mode knows of where a tensor of this forward came from (``"tanh"``: a
    tanh result; ``"half"``: a slice of a tensor, or its negation; ``"rotate_half"``: halves joined
    along the last dimension; ``"rotated"``: a product with a rotate_half result; None)."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    result: Any
    frame: Frame
    tag: Callable[[object], str | None]


@dataclass(frozen=True)
class OpRule:
    """An op of the list: its stage name, the torch callables it covers, an optional test of the
    call (shapes and dtypes only; never a value), and the kind of its stages (``kinds.StageKind``,
    or a function of the call that returns one: a norm with or without its weight)."""

    name: str
    functions: tuple[Callable[..., Any], ...]
    accepts: Callable[[OpCall], bool] | None = None
    what: str = ""
    kind: StageKind | Callable[[OpCall], StageKind] = StageKind.OTHER

    def kind_of(self, call: OpCall) -> StageKind:
        return self.kind if isinstance(self.kind, StageKind) else self.kind(call)


def _floating(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _residual_add(call: OpCall) -> bool:
    if len(call.args) < 2 or call.frame.residual is None:
        return False
    a, b = call.args[0], call.args[1]
    return (_floating(a) and _floating(b) and tuple(a.shape) == tuple(b.shape) == call.frame.residual
            and "alpha" not in call.kwargs)


def _join_parts(call: OpCall) -> list[torch.Tensor] | None:
    parts = call.args[0] if call.args else call.kwargs.get("tensors")
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or not all(_floating(p) for p in parts):
        return None
    return list(parts)


def _last_dim_join(call: OpCall) -> bool:
    parts = _join_parts(call)
    if parts is None:
        return False
    shape = tuple(parts[0].shape)
    if len(shape) < 1 or any(tuple(p.shape) != shape for p in parts):
        return False
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", 0)
    if not isinstance(dim, int):
        return False
    out = call.result
    ndim = out.dim() if isinstance(out, torch.Tensor) else len(shape)
    return dim in (-1, ndim - 1) and len(shape) >= 2


def _norm_kind(*positions: int) -> Callable[[OpCall], StageKind]:
    """``norm_affine`` when the call passes a weight or a bias (at these positions or by keyword),
    else ``norm``."""
    def kind(call: OpCall) -> StageKind:
        given = [call.args[i] for i in positions if i < len(call.args)]
        given += [call.kwargs.get(k) for k in ("weight", "bias")]
        return StageKind.NORM_AFFINE if any(v is not None for v in given) else StageKind.NORM
    return kind


def _scaled_tanh(call: OpCall) -> bool:
    if len(call.args) < 2:
        return False
    a, b = call.args[0], call.args[1]
    return ((call.tag(a) == "tanh" and isinstance(b, numbers.Number))
            or (call.tag(b) == "tanh" and isinstance(a, numbers.Number)))


T = torch.Tensor
TANH: tuple[Callable[..., Any], ...] = (torch.tanh, T.tanh, F.tanh)
JOINS: tuple[Callable[..., Any], ...] = (torch.cat, torch.concat, torch.concatenate, torch.stack)
ADDS: tuple[Callable[..., Any], ...] = (torch.add, T.add, T.__add__, T.__radd__, T.add_, T.__iadd__)
MULS: tuple[Callable[..., Any], ...] = (torch.mul, T.mul, T.__mul__, T.__rmul__)
SLICES: tuple[Callable[..., Any], ...] = (T.__getitem__, T.narrow, torch.narrow, T.chunk, torch.chunk,
                                          T.split, torch.split, T.unbind, torch.unbind)
NEGS: tuple[Callable[..., Any], ...] = (torch.neg, T.neg, T.__neg__, torch.negative, T.negative)
SUBS: tuple[Callable[..., Any], ...] = (torch.sub, T.sub, T.__sub__, T.__rsub__)
HALVES = ("half", "mixed")  # a slice of a tensor; a product or sum of one


def _rotation(call: OpCall) -> bool:
    """The rotated tensor of RoPE: a last-dimension join of computed halves (not of plain halves:
    that is ``rotate_half``'s copy), or ``x*cos + rotate_half(x)*sin``."""
    if call.func in JOINS:
        parts = _join_parts(call)
        # parts computed from halves of a tensor (x1*cos + x2*sin): not a copy of plain halves
        # (rotate_half's), not a tensor joined to itself (a cos/sin table), not unrelated outputs
        # joined (the heads of an attention)
        return (_last_dim_join(call) and parts is not None and all(call.tag(p) == "mixed" for p in parts)
                and not all(p is parts[0] for p in parts))
    if len(call.args) < 2 or "alpha" in call.kwargs:
        return False
    a, b = call.args[0], call.args[1]
    return (_floating(a) and _floating(b) and tuple(a.shape) == tuple(b.shape)
            and "rotated" in (call.tag(a), call.tag(b)))


MASK_FILL = -1e4  # a fill at or below this (-inf, finfo.min, -1e9, fp16's -1e4) masks a score out


def _masking(call: OpCall) -> bool:
    """A score masked out: ``masked_fill(mask, v)`` or ``where(bool, x, v)`` / ``where(bool, v, x)``
    with a number ``v`` at or below MASK_FILL (read from the call's arguments, never from a tensor)."""
    if not _floating(call.result):
        return False
    args = call.args
    fills: tuple[object, ...]
    if call.func is torch.where:
        if len(args) != 3 or not isinstance(args[0], torch.Tensor) or args[0].dtype != torch.bool:
            return False
        fills = (args[1], args[2])
    else:
        fills = (args[2] if len(args) > 2 else call.kwargs.get("value"),)
    return any(isinstance(v, (int, float)) and float(v) <= MASK_FILL for v in fills)


def _provenance(call: OpCall) -> str | None:
    """The tag of a call's tensor result (see ``OpCall``), from its function and its inputs' tags."""
    func, args = call.func, call.args
    if func in TANH:
        return "tanh"
    if func in SLICES:
        return "half"
    if func in NEGS:
        return "half" if args and call.tag(args[0]) == "half" else None
    if func in JOINS:
        parts = _join_parts(call)
        return "rotate_half" if parts is not None and all(call.tag(p) == "half" for p in parts) \
            and _last_dim_join(call) else None
    if func in (*MULS, *ADDS, *SUBS) and len(args) >= 2:
        tags = (call.tag(args[0]), call.tag(args[1]))
        if func in MULS and "rotate_half" in tags:
            return "rotated"
        return "mixed" if any(t in HALVES for t in tags) else None
    return None


TAGGED: tuple[Callable[..., Any], ...] = (*TANH, *SLICES, *NEGS, *JOINS, *MULS, *ADDS, *SUBS)

OPS: dict[str, OpRule] = {rule.name: rule for rule in (
    OpRule("rms_norm", (F.rms_norm,), what="F.rms_norm", kind=_norm_kind(2)),
    OpRule("layer_norm", (F.layer_norm,), what="F.layer_norm", kind=_norm_kind(2, 3)),
    OpRule("group_norm", (F.group_norm,), what="F.group_norm", kind=_norm_kind(2, 3)),
    OpRule("rotary", (*JOINS, torch.add, T.add, T.__add__, T.__radd__, torch.sub, T.sub, T.__sub__), _rotation,
           "torch.cat / torch.stack along the last dimension of equal-shape floating tensors, or "
           "x*cos + rotate_half(x)*sin", StageKind.ROTARY),
    OpRule("mask", (T.masked_fill, T.masked_fill_, torch.masked_fill, torch.where), _masking,
           "x.masked_fill(mask, value), torch.where(bool_mask, x, y)", StageKind.MASK),
    OpRule("scaled_dot_product_attention", (F.scaled_dot_product_attention,),
           what="F.scaled_dot_product_attention", kind=StageKind.ATTENTION),
    OpRule("softmax", (F.softmax, torch.softmax, T.softmax), what="F.softmax, torch.softmax, x.softmax()",
           kind=StageKind.ATTENTION),
    OpRule("relu", (F.relu, torch.relu, T.relu), what="F.relu, torch.relu, x.relu()", kind=StageKind.ACTIVATION),
    OpRule("gelu", (F.gelu,), what="F.gelu", kind=StageKind.ACTIVATION),
    OpRule("silu", (F.silu,), what="F.silu", kind=StageKind.ACTIVATION),
    OpRule("square", (torch.square, T.square), what="torch.square, x.square()", kind=StageKind.ACTIVATION),
    OpRule("softcap", MULS, _scaled_tanh, "a number times a tanh result of this forward", StageKind.SOFTCAP),
    OpRule("add", ADDS, _residual_add, "x + y of two floating tensors of the running module's residual shape",
           StageKind.RESIDUAL),
    OpRule("matmul", (torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm, torch.mm, T.mm),
           what="x @ y, torch.matmul, bmm, mm", kind=StageKind.MATMUL),
    OpRule("linear", (F.linear,), what="F.linear (outside nn.Linear)", kind=StageKind.LINEAR),
    OpRule("cross_entropy", (F.cross_entropy,), what="F.cross_entropy", kind=StageKind.LOSS),
    # known, not on by default
    OpRule("tanh", TANH, what="torch.tanh, x.tanh(), F.tanh", kind=StageKind.ACTIVATION),
    OpRule("sigmoid", (torch.sigmoid, T.sigmoid, F.sigmoid), what="torch.sigmoid, x.sigmoid()", kind=StageKind.ACTIVATION),
    OpRule("log_softmax", (F.log_softmax, torch.log_softmax, T.log_softmax), what="F.log_softmax"),
    OpRule("nll_loss", (F.nll_loss,), what="F.nll_loss", kind=StageKind.LOSS),
)}

DEFAULT_OPS: tuple[str, ...] = (
    "rms_norm", "layer_norm", "group_norm", "rotary", "mask", "scaled_dot_product_attention", "softmax", "relu",
    "gelu", "silu", "square", "softcap", "add", "matmul", "linear", "cross_entropy",
)


def register_op(rule: OpRule) -> None:
    """Make ``rule`` known (by its name; a known name is replaced), to be selected with ``+name``."""
    if not rule.name or any(c in rule.name for c in "/#") or not rule.functions:
        raise CaptureError(f"op rule {rule.name!r}: a name without '/' or '#' and at least one function")
    OPS[rule.name] = rule


def resolve_ops(spec: Iterable[str] | None, origin: str = "ops") -> tuple[str, ...]:
    """The op names in effect: ``DEFAULT_OPS`` changed by ``spec`` (plain names replace the default
    list, ``+name`` adds, ``!name`` removes); an unknown or empty name raises CaptureError."""
    lines = [s.strip() for s in (spec or ()) if s.strip()]
    for line in lines:
        name = line.lstrip("+!")
        if name not in OPS:
            raise CaptureError(f"{origin}: unknown op {name!r}; known ops: {', '.join(OPS)}")
    keep = [s for s in lines if not s.startswith(("+", "!"))]
    chosen = list(dict.fromkeys(keep)) if keep else list(DEFAULT_OPS)
    chosen += [s[1:] for s in lines if s.startswith("+") and s[1:] not in chosen]
    drop = {s[1:] for s in lines if s.startswith("!")}
    return tuple(name for name in chosen if name not in drop)


def _first_floating_shape(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[int, ...] | None:
    for value in (*args, *kwargs.values()):
        if _floating(value):
            return tuple(value.shape)
    return None


def records_inside(module: nn.Module, is_tap: Callable[[nn.Module], bool]) -> bool:
    """Ops inside this module are stages, unless it is a tap or a leaf module torch provides (or a
    subclass of one: nanochat's ``Linear(nn.Linear)`` whose forward casts the weight is a linear)."""
    if is_tap(module):
        return False
    leaf = next(module.children(), None) is None
    return not (leaf and any(cls.__module__.startswith("torch.") and cls is not nn.Module
                             for cls in type(module).__mro__[:-1]))


Record = Callable[[str, str, torch.Tensor, StageKind], None]  # (module name, op name, result, its kind)


class OpRecorder(TorchFunctionMode):
    """The mode that sees every torch call of the traced forward and records those in the op list.

    ``record(module, op, tensor, kind)`` is called from the handler, where the mode is off the stack
    (torch pops a mode while its handler runs), so what it computes is not seen again; the
    capture's other work inside a forward (module hooks) runs under ``suspended()``."""

    def __init__(self, ops: Sequence[str], record: Record) -> None:
        super().__init__()
        self.ops = tuple(ops)
        self._rules: dict[Callable[..., Any], list[OpRule]] = {}
        for name in self.ops:
            rule = OPS[name]
            for fn in rule.functions:
                self._rules.setdefault(fn, []).append(rule)  # in the list's order: the first that accepts
        # the calls whose results are tagged (OpCall.tag), only for the rules that read the tags
        tagged: set[Callable[..., Any]] = set()
        if "softcap" in self.ops:
            tagged.update(TANH)
        if "rotary" in self.ops:
            tagged.update((*SLICES, *NEGS, *JOINS, *MULS, *ADDS, *SUBS))
        self._tagged = frozenset(tagged)
        self._tags: dict[int, tuple[str, weakref.ref[torch.Tensor]]] = {}
        self._record = record
        self.frames: list[Frame] = []
        self.depth = 0  # root forwards running (the mode is on the stack while > 0)

    def _tag_of(self, t: object) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._tags.get(id(t))
        return entry[0] if entry is not None and entry[1]() is t else None

    def _tag(self, result: object, tag: str) -> None:
        for t in (result if isinstance(result, (tuple, list)) else (result,)):
            if isinstance(t, torch.Tensor):
                self._tags[id(t)] = (tag, weakref.ref(t))

    def __torch_function__(self, func: Callable[..., Any], types: Iterable[type], args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        rules = self._rules.get(func)
        if rules is None and func not in self._tagged:
            return result
        frame = self.frames[-1] if self.frames else None
        call = OpCall(func, tuple(args), kwargs, result, frame or Frame("", False, None), self._tag_of)
        if func in self._tagged:
            tag = _provenance(call)
            if tag is not None:
                self._tag(result, tag)
        if rules is None or frame is None or not frame.records or not isinstance(result, torch.Tensor):
            return result
        for rule in rules:
            if rule.accepts is None or rule.accepts(call):
                self._record(frame.name, rule.name, result, rule.kind_of(call))
                break
        return result

    # -- the module stack, from forward pre-hooks and hooks ---------------------------------
    def enter_module(self, name: str, records: bool, args: Sequence[Any], kwargs: Mapping[str, Any],
                     root: bool, leaf: bool = False) -> None:
        """A module's forward starts; a leaf module (no children: an activation, a norm of one's
        own) holds no residual stream, so its adds (GELU's ``x + 0.044715 * x**3``) are not residual."""
        if root:
            if self.depth == 0:
                self._push()
            self.depth += 1
        stream = None if leaf and not root else _first_floating_shape(args, kwargs)
        self.frames.append(Frame(name, records, stream))

    def exit_module(self, root: bool, output: object = None) -> None:
        if self.frames:
            self.frames.pop()
            # a root forward that takes token ids has no residual shape of its own: its stream is the
            # shape of the first floating output of a module it calls (the embedding's (B, T, C))
            if len(self.frames) == 1 and self.frames[0].residual is None:
                t = next((x for x in (output if isinstance(output, (tuple, list)) else (output,)) if _floating(x)),
                         None)
                if t is not None and t.dim() >= 2:
                    self.frames[0].residual = tuple(t.shape)
        if root and self.depth > 0:
            self.depth -= 1
            if self.depth == 0:
                self._tags.clear()
                self._pop()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """The capture's own work (statistics) with the mode off the stack: popped when it is on top
        (the statistics kernel then runs as compiled, without a recompile for the mode), else with
        torch functions' overrides disabled."""
        n = torch._C._len_torch_function_stack()
        stack = [torch._C._get_function_stack_at(i) for i in range(n)] if self.depth else []
        if not any(mode is self for mode in stack):  # not entered, or inside its own handler
            yield
        elif stack[-1] is self:
            with _pop_mode_temporarily():
                yield
        else:
            with torch._C.DisableTorchFunction():
                yield

    def close(self) -> None:
        """Take the mode off the stack if a forward left it there (the capture is closing)."""
        self.frames.clear()
        self._tags.clear()
        if self.depth > 0:
            self.depth = 0
            self._pop()

    def _push(self) -> None:
        self.__enter__()  # type: ignore[no-untyped-call]  # torch leaves TorchFunctionMode.__enter__ unannotated

    def _pop(self) -> None:
        self.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # likewise __exit__


def resolve_granularity(requested: str | None, has_taps: bool, model_name: str) -> str:
    """``taps``, ``modules`` or ``ops``: the requested one, or for ``auto`` / None taps where the
    model has them, else ``ops`` (leaf modules plus functional ops)."""
    value = (requested or "auto").strip().lower()
    if value not in GRANULARITIES:
        raise CaptureError(f"granularity={requested!r} is not a granularity: use one of {', '.join(GRANULARITIES)}")
    if value == "auto":
        return "taps" if has_taps else "ops"
    if value == "taps" and not has_taps:
        raise CaptureError(f"granularity='taps', but {model_name} has no taps (modules named Tap or HookPoint, or "
                           "with gpttrace_tap = True): use 'modules' or 'ops', or add taps")
    return value
