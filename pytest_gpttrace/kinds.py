"""Stage kinds: what a stage is (a norm, a rotary, a residual add, ...), so the rules need no names.

Each stage of a trace records its kind (``Trace.stage_kinds``, stage name -> kind) from what
produced it:

- an op stage (``blocks.0.attn/rms_norm#1``) from its op rule (``ops.OpRule.kind``): ``F.rms_norm``,
  ``F.layer_norm`` and ``F.group_norm`` are ``norm`` without a weight or bias and ``norm_affine``
  with one; a rule of one's own (``ops.register_op``) is ``other`` unless it says otherwise;
- a module stage from its type (``module_kind``): a ``gpttrace_kind`` attribute first (how a tap says
  what it shows; the reference model sets its taps' from ``TAP_KINDS``), then ``nn.LayerNorm`` /
  ``nn.RMSNorm`` / ``nn.GroupNorm`` (``norm_affine`` with a learnable weight or bias, else ``norm``), a class named
  ``...RMSNorm`` / ``...LayerNorm`` (Hugging Face's ``LlamaRMSNorm``: ``norm_affine`` when it has a
  ``weight`` parameter), ``nn.Linear`` (and Hugging Face's ``Conv1D``), ``nn.Embedding``, the
  activation modules (``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``, ..., classes named ``...Activation``);
  anything else is ``other``.

A trace without kinds (written before they were recorded, or parsed from a Markdown report) is
read by the reference model's names instead (``kind_by_name``), so its anomalies stay the same.

The rotary rule also needs the rotary's input (its rms must not change). The capture finds it
from the autograd graph: walking back from the rotary's output through the operations that made it
(slices, products with the tables, sums) to the nearest recorded stage of the same number of
elements (``blocks.0.attn.c_q`` for ``blocks.0.attn/rotary#1``, ``blocks.0.attn.q`` for the
reference's ``q_rope``), recorded as ``Trace.stage_inputs``. It costs a few attribute reads per
rotary stage and reads no value; a forward without autograd (``torch.no_grad``) records none, and
the rule then falls back to the reference names (``q_rope`` after ``q``).

This module is pure (no torch at import): the rules import it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection
from enum import Enum
from typing import TYPE_CHECKING, Any

from .errors import CaptureError

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


class StageKind(str, Enum):
    """What a stage is. str-valued: a member equals, hashes and prints as its JSON value."""

    NORM = "norm"                # a normalisation without a learnable scale: its output has rms 1
    NORM_AFFINE = "norm_affine"  # a normalisation with a learnable scale (or shift) applied: not checkable by rms
    ROTARY = "rotary"            # the rotary rotation of queries or keys
    ATTENTION = "attention"      # scaled dot-product attention; the softmax of attention scores
    ACTIVATION = "activation"    # relu, gelu, silu, square (relu²), tanh, sigmoid
    RESIDUAL = "residual"        # the residual stream: x + f(x), a block's input
    SOFTCAP = "softcap"          # cap * tanh(logits / cap)
    LOSS = "loss"                # cross-entropy, nll
    LINEAR = "linear"            # a linear layer (or a view of its output)
    EMBEDDING = "embedding"      # an embedding lookup
    MATMUL = "matmul"            # x @ y
    MASK = "mask"                # masked_fill / where of attention scores: -inf entries are the mask
    OTHER = "other"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


KINDS = tuple(k.value for k in StageKind)


def parse_kind(value: object, where: str) -> StageKind:
    """A kind from its value; ValueError naming ``where`` and the known kinds."""
    try:
        return StageKind(value)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a stage kind; use one of {', '.join(KINDS)}") from None


# --------------------------------------------------------------------------- modules
_ACTIVATION_MODULES = frozenset({
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "GELU", "SiLU", "Mish", "ELU", "CELU", "SELU", "GLU",
    "Tanh", "Sigmoid", "Hardtanh", "Hardswish", "Hardsigmoid", "Softplus", "Softsign", "Tanhshrink",
})


def module_kind(module: nn.Module, name: str = "") -> StageKind:
    """The kind of a module's output (see the module docstring); CaptureError naming the module
    for a ``gpttrace_kind`` that is not a kind."""
    declared = getattr(module, "gpttrace_kind", None)
    if declared is not None:
        try:
            return parse_kind(declared, f"module {name or '<root>'} ({type(module).__name__}): gpttrace_kind")
        except ValueError as exc:
            raise CaptureError(str(exc)) from None
    import torch.nn as nn

    name = type(module).__name__
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        affine = getattr(module, "weight", None) is not None or getattr(module, "bias", None) is not None
        return StageKind.NORM_AFFINE if affine else StageKind.NORM
    if name.endswith(("RMSNorm", "LayerNorm", "Norm")) and not name.endswith("BatchNorm"):
        # a norm of one's own: any parameter of its own is a learnable scale or shift, whatever its
        # name (weight, scale, gamma, g); gpttrace_kind says otherwise where that is wrong
        has_scale = next(module.parameters(recurse=False), None) is not None
        return StageKind.NORM_AFFINE if has_scale else StageKind.NORM
    if isinstance(module, (nn.Linear, nn.Bilinear)) or name == "Conv1D":
        return StageKind.LINEAR
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return StageKind.EMBEDDING
    if name in _ACTIVATION_MODULES or name.endswith("Activation"):
        return StageKind.ACTIVATION
    if isinstance(module, nn.Softmax):
        return StageKind.ATTENTION
    if isinstance(module, nn.MultiheadAttention):
        return StageKind.ATTENTION
    return StageKind.OTHER


# --------------------------------------------------------------------------- the rotary's input
class StageSources:
    """Which recorded stage a tensor was computed from, by its autograd node (one iteration's map).

    ``note`` remembers each recorded stage's autograd node; ``source_of`` walks back from a tensor's
    node through the operations that made it and returns the nearest noted stage with as many
    elements as the tensor. Host-side only: it reads no tensor value."""

    MAX_NODES = 64  # nodes visited per look-up: a rotation is a handful of operations

    def __init__(self) -> None:
        self._nodes: dict[object, tuple[str, int]] = {}

    def note(self, stage: str, t: torch.Tensor) -> None:
        node = t.grad_fn
        if node is not None:
            self._nodes.setdefault(node, (stage, t.numel()))

    def source_of(self, t: torch.Tensor) -> str | None:
        start = t.grad_fn
        if start is None:
            return None
        numel = t.numel()
        seen: set[int] = {id(start)}
        frontier: list[Any] = [start]
        visited = 0
        while frontier and visited < self.MAX_NODES:
            nxt: list[Any] = []
            for node in frontier:
                visited += 1
                for parent, _ in getattr(node, "next_functions", ()):
                    if parent is None or id(parent) in seen:
                        continue
                    seen.add(id(parent))
                    found = self._nodes.get(parent)
                    if found is not None:
                        if found[1] == numel:
                            return found[0]
                        continue  # a recorded stage of another size: not this path's input
                    nxt.append(parent)
            frontier = nxt
        return None


# --------------------------------------------------------------------------- traces without kinds
NORM_PATTERNS = ("*.norm", "*_norm", "final_norm")  # the reference model's norm taps
ROPE_PAIRS = (("q_rope", "q"), ("k_rope", "k"))      # the reference's rotary taps and their inputs


def kind_by_name(name: str, parameters: Collection[str] = ()) -> StageKind | None:
    """The kind the reference model's names imply, for a trace that records none (None: no rule's)."""
    if any(fnmatch.fnmatchcase(name, p) for p in NORM_PATTERNS):
        # a module's output after its learnable scale (Hugging Face's RMSNorm): rms 1 is not expected
        return StageKind.NORM_AFFINE if f"{name}.weight" in parameters else StageKind.NORM
    if any(name.endswith("." + rope) for rope, _ in ROPE_PAIRS):
        return StageKind.ROTARY
    if name.endswith("relu2"):
        return StageKind.ACTIVATION
    if name == "lm_head.softcap":
        return StageKind.SOFTCAP
    if name.endswith(("mlp_resid", ".input")):
        return StageKind.RESIDUAL
    return None


def rope_input_by_name(name: str) -> str | None:
    """The reference's input of a rotary tap: ``blocks.0.attn.q`` for ``blocks.0.attn.q_rope``."""
    for rope, src in ROPE_PAIRS:
        if name.endswith("." + rope):
            return name[: -len(rope)] + src
    return None
