"""Models as users write them: how the default loss calls a forward, what the batches look like,
which config the trace records.

The default loss (``default_loss``) takes a batch ``(idx, targets)``, targets already shifted (the
token after each input token), and reads the model's forward signature:

- a forward with a targets parameter (``targets``, ``target``, ``y``, or a second positional one)
  gets ``idx`` and ``targets``: positionally where they are its first two parameters, else by
  keyword (a keyword-only ``forward(*, idx, targets)``);
- a forward with a ``labels`` parameter and none of those follows the Hugging Face convention
  (labels aligned with the inputs, shifted inside the model): it gets only the inputs
  (``input_ids=idx``), and the loss is the cross-entropy of its logits against ``targets``, the
  same next-token loss over all T positions, shifted once. A model whose ``labels`` is required
  gets ``labels=idx`` and its own loss is set aside for the same cross-entropy;
- a forward with only an input parameter gets ``idx``; the loss is computed from its logits.

From what the forward returns, the loss is: a one-element tensor; the one-element floating tensor
in a tuple (nanoGPT's ``(logits, loss)``); the ``loss`` of a dict or ``ModelOutput``; else the
cross-entropy of the logits (a tensor, a dict's ``logits``, or the tuple element of shape
``targets.shape + (V,)``) against ``targets``. A batch that is a dict is passed as keywords, and
the output must carry its loss. Anything else is a one-line ``CaptureError`` naming the fixture
to override (``gpt_loss_fn``).

``default_batches`` draws the reference model's synthetic batches at the user model's vocabulary
and context length (at most ``MAX_SEQUENCE_LEN``), read from its config or attributes
(``batch_geometry``); ``model_config`` turns a dataclass, dict or Hugging Face config into the
JSON-safe mapping the trace records.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CaptureError

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
JSON: TypeAlias = "bool | int | float | str | list[JSON] | dict[str, JSON] | None"

INPUT_NAMES = ("idx", "input_ids", "tokens", "input", "inputs", "x")
TARGET_NAMES = ("targets", "target", "y")
LABEL_NAMES = ("labels",)  # the Hugging Face convention: aligned with the inputs, shifted inside
VOCAB_KEYS = ("vocab_size", "n_vocab")
CONTEXT_KEYS = ("sequence_len", "block_size", "n_positions", "max_position_embeddings", "n_ctx", "max_seq_len",
                "context_length", "seq_len")
MAX_SEQUENCE_LEN = 1024  # the default batches' length at most (the seed config's sequence_len)
# keys of a Hugging Face config that say which library wrote it, not what the model is
_HF_NOISE = ("transformers_version",)

_LOSS_ADVICE = "override the gpt_loss_fn fixture (loss_fn= for trace_training)"
_BATCH_ADVICE = "override the gpt_batches fixture"


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (its signature and config are the model's)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


# ------------------------------------------------------------------------------ calling the forward
@dataclasses.dataclass(frozen=True)
class CallPlan:
    """How ``default_loss`` passes a batch (idx, targets) to a forward."""

    input_kw: str | None     # the keyword idx goes by; None: positional
    targets: bool            # whether targets are passed at all
    targets_kw: str | None   # the keyword targets go by; None: positional (after idx)
    labels_kw: str | None    # a required Hugging Face ``labels``: passed idx (labels aligned with inputs)
    hf_labels: bool          # the forward follows the label-shift convention: the loss comes from the logits

    def arguments(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[tuple[torch.Tensor, ...],
                                                                            dict[str, torch.Tensor]]:
        args: list[torch.Tensor] = []
        kwargs: dict[str, torch.Tensor] = {}
        if self.input_kw is None:
            args.append(idx)
        else:
            kwargs[self.input_kw] = idx
        if self.targets:
            if self.targets_kw is None:
                args.append(targets)
            else:
                kwargs[self.targets_kw] = targets
        if self.labels_kw is not None:
            kwargs[self.labels_kw] = idx
        return tuple(args), kwargs


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(unwrapped(model).forward)
    except (TypeError, ValueError):  # a builtin or C-implemented forward: call it positionally
        return None


def _shown(model: nn.Module, sig: inspect.Signature) -> str:
    return f"{type(unwrapped(model)).__name__}.forward{sig}".replace("\n", " ")


def call_plan(model: nn.Module) -> CallPlan:
    """How to call ``model`` with (idx, targets), from its forward signature (see the module docstring)."""
    legacy = CallPlan(None, True, None, None, False)
    sig = _signature(model)
    if sig is None:
        return legacy
    params = list(sig.parameters.values())
    named = {p.name: p for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                          inspect.Parameter.VAR_KEYWORD)}
    positional = [p for p in params if p.kind in _POSITIONAL]
    if not named and any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return legacy  # forward(*args): the batch as it comes
    inp = next((named[n] for n in INPUT_NAMES if n in named), None)
    if inp is None and positional:
        inp = positional[0]
    if inp is None:
        raise CaptureError(f"{_shown(model, sig)} takes no input ids (a parameter named {', '.join(INPUT_NAMES)}, "
                           f"or a positional one): {_LOSS_ADVICE}")
    tgt = next((named[n] for n in TARGET_NAMES if n in named), None)
    labels = next((named[n] for n in LABEL_NAMES if n in named), None)
    if tgt is None and labels is None and len(positional) > 1 and positional[0] is inp:
        tgt = positional[1]  # forward(inp, tgt): the second positional parameter takes the targets
    input_kw = None if _at(positional, inp, 0) else _keyword(model, sig, inp)
    if tgt is not None:
        targets_kw = None if input_kw is None and _at(positional, tgt, 1) else _keyword(model, sig, tgt)
        plan = CallPlan(input_kw, True, targets_kw, None, False)
    else:
        required_labels = labels is not None and labels.default is inspect.Parameter.empty
        plan = CallPlan(input_kw, False, None, labels.name if labels is not None and required_labels else None,
                        labels is not None)
    _check_binds(model, sig, plan)
    return plan


def _at(positional: Sequence[inspect.Parameter], p: inspect.Parameter, index: int) -> bool:
    return len(positional) > index and positional[index] is p


def _keyword(model: nn.Module, sig: inspect.Signature, p: inspect.Parameter) -> str:
    if p.kind == inspect.Parameter.POSITIONAL_ONLY:
        raise CaptureError(f"{_shown(model, sig)}: the positional-only parameter {p.name!r} cannot be passed where "
                           f"the batch (idx, targets) goes: {_LOSS_ADVICE}")
    return p.name


def _check_binds(model: nn.Module, sig: inspect.Signature, plan: CallPlan) -> None:
    dummy = torch.empty(0)
    args, kwargs = plan.arguments(dummy, dummy)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError(f"cannot call {_shown(model, sig)} with a batch (idx, targets) ({exc}): "
                           f"{_LOSS_ADVICE}") from None


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The training loss of ``model`` on ``batch``, for models as users write them (module docstring)."""
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = _loss_in(out)
        if loss is None:
            raise CaptureError(f"{type(unwrapped(model)).__name__}(**batch) returned {_what(out)} without a loss "
                               f"(a dict batch is passed as keywords and must yield one): {_LOSS_ADVICE}")
        return loss
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        out = model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
        loss = _loss_in(out)
        if loss is None:
            raise CaptureError(f"{type(unwrapped(model)).__name__}(*batch) returned {_what(out)}, not a loss: "
                               f"{_LOSS_ADVICE}")
        return loss
    idx, targets = batch
    plan = call_plan(model)
    args, kwargs = plan.arguments(idx, targets)
    out = model(*args, **kwargs)
    if not plan.hf_labels:
        loss = _loss_in(out)
        if loss is not None:
            return loss
    logits = _logits_in(out, targets)
    if logits is None:
        raise CaptureError(f"{type(unwrapped(model)).__name__} returned {_what(out)}: neither a loss nor logits of "
                           f"shape {(*targets.shape, 'V')} for targets of shape {tuple(targets.shape)}: {_LOSS_ADVICE}")
    return next_token_loss(logits, targets)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V) against targets that are already the next tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1).long())


def _is_loss(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point()


def _loss_in(out: object) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.numel() == 1 else None
    if isinstance(out, Mapping):
        loss = out.get("loss")
        return loss if _is_loss(loss) else None
    if isinstance(out, (tuple, list)):
        return next((t for t in out if _is_loss(t)), None)
    return None


def _logits_in(out: object, targets: torch.Tensor) -> torch.Tensor | None:
    def fits(t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == targets.dim() + 1 \
            and tuple(t.shape[:-1]) == tuple(targets.shape)

    if isinstance(out, Mapping):
        out = out.get("logits")
    if isinstance(out, torch.Tensor):
        return out if fits(out) else None
    if isinstance(out, (tuple, list)):
        return next((t for t in out if fits(t)), None)
    return None


def _what(out: object) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {', '.join(map(str, out)) or 'none'}"
    return f"a {type(out).__name__}"


# ------------------------------------------------------------------------------ batches
def _lookup(source: object, keys: Sequence[str]) -> tuple[str, int] | None:
    for key in keys:
        value = source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def batch_geometry(model: nn.Module) -> tuple[int, int]:
    """(vocab_size, sequence_len) of the default batches for ``model``: from its config (the reference
    GPTConfig, a Hugging Face config, a dataclass or dict) or its attributes; the sequence length at
    most ``MAX_SEQUENCE_LEN``. A one-line CaptureError naming ``gpt_batches`` when either is not found."""
    inner = unwrapped(model)
    config = getattr(inner, "config", None)
    sources = [s for s in (config, inner) if s is not None]
    name = type(inner).__name__
    vocab = next((found for s in sources if (found := _lookup(s, VOCAB_KEYS))), None)
    context = next((found for s in sources if (found := _lookup(s, CONTEXT_KEYS))), None)
    where = f"{name} or its config" if config is not None else f"{name} (it has no config)"
    if vocab is None:
        raise CaptureError(f"gpt_batches: cannot tell the vocabulary size of {name}: no {' or '.join(VOCAB_KEYS)} "
                           f"on {where}: {_BATCH_ADVICE}")
    if context is None:
        raise CaptureError(f"gpt_batches: cannot tell the context length of {name}: no {', '.join(CONTEXT_KEYS)} "
                           f"on {where}: {_BATCH_ADVICE}")
    return vocab[1], min(context[1], MAX_SEQUENCE_LEN)


def default_batches(model: nn.Module, seed: int) -> Iterator[Batch]:
    """The reference model's synthetic batches: at its own config for the reference GPT (int32 idx),
    at ``batch_geometry`` for any other model (int64 idx, as embeddings and Hugging Face expect),
    on the model's device."""
    from reference_model import GPT, GPTConfig, synthetic_batches

    inner = unwrapped(model)
    device = next((p.device for p in inner.parameters()), torch.device("cpu"))
    if isinstance(inner, GPT):
        return synthetic_batches(inner.config, seed=seed, device=device)
    vocab, seq = batch_geometry(inner)
    base = synthetic_batches(GPTConfig(sequence_len=seq, vocab_size=vocab), seed=seed, device=device)
    idx, targets = next(base)  # the same batch repeats (synthetic_batches' default)
    return itertools.repeat((idx.long(), targets))


# ------------------------------------------------------------------------------ the recorded config
class _Drop(enum.Enum):
    DROP = "drop"


_DROP = _Drop.DROP


def _json_safe(value: object) -> JSON | _Drop:
    """value as JSON holds it (equal to its own round trip), or _DROP."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _DROP
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (list, tuple)):
        items = [_json_safe(v) for v in value]
        kept = [v for v in items if not isinstance(v, _Drop)]
        return kept if len(kept) == len(items) else _DROP
    if isinstance(value, Mapping):
        out: dict[str, JSON] = {}
        for k, v in value.items():
            safe = _json_safe(v)
            if not isinstance(safe, _Drop):
                out[str(k)] = safe
        return out
    return _DROP


def _raw_config(config: object) -> tuple[dict[str, Any], bool] | None:
    """(fields, sort them) of a config object, or None when it is none of the kinds recorded."""
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and not isinstance(config, (Mapping, type)):  # a Hugging Face PretrainedConfig
        raw = to_dict()
        if isinstance(raw, Mapping):
            return {str(k): v for k, v in raw.items() if not str(k).startswith("_") and k not in _HF_NOISE}, True
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config), False
    if isinstance(config, Mapping):
        return dict(config), False
    return None


def model_config(model: nn.Module) -> dict[str, JSON]:
    """The model's config as the trace records it: a dataclass (the reference GPTConfig, a nanoGPT-style
    config) in field order, a dict in its order, a Hugging Face config by sorted key (without the
    version that wrote it); JSON-safe values only (others are left out). {} for a model without one."""
    raw = _raw_config(getattr(unwrapped(model), "config", None))
    if raw is None:
        return {}
    fields, by_key = raw
    items = sorted(fields.items()) if by_key else list(fields.items())
    out: dict[str, JSON] = {}
    for key, value in items:
        safe = _json_safe(value)
        if not isinstance(safe, _Drop):
            out[str(key)] = safe
    return out
