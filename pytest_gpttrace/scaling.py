"""Parameter and FLOP arithmetic for nanochat-style GPTs (pure functions: no torch).

A GPT here has an untied token embedding ``wte`` (V x d) and head ``lm_head`` (V x d), and L
blocks of bias-free linear layers:

- attention: c_q (d x H*D), c_k and c_v (d x Hkv*D each, grouped-query attention when Hkv < H)
  and c_proj (d x d), so 2*d^2 + 2*d*Hkv*D per block; with Hkv = H that is 4*d^2
- MLP: c_fc (d x 4d) and c_proj (4d x d), 8*d^2 per block

so with Hkv = H the total is 2*V*d + 12*L*d^2 (36,700,160 at depth 4, d 256, V 65536).

FLOPs per token (forward + backward), as nanochat estimates them: 6 per non-embedding parameter
(the embedding is a lookup, lm_head is a matmul and counts) plus the attention scores and
mixing, 12*L*H*D*T. Depth sweeps follow nanochat's rule n_embd = 64*depth, n_head =
ceil(n_embd / 128) (``width_for_depth``, which the reference model's ``GPTConfig.from_depth`` uses too).

Parameter names are grouped into components: ``wte``, ``attention`` and ``mlp`` (per block),
``lm_head`` and ``other``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_DEPTHS = (4, 8, 12, 16, 20, 26)
REQUIRED_KEYS = ("n_layer", "n_embd", "n_head", "vocab_size", "sequence_len")
COMPONENTS = ("wte", "attention", "mlp", "lm_head", "other")
WIDTH_PER_LAYER = 64  # nanochat's aspect ratio: n_embd = 64 * depth
MAX_HEAD_DIM = 128  # heads are at most this wide: n_head = ceil(n_embd / 128)

_BLOCK = re.compile(r"(?:^|\.)(?:blocks|h|layers)\.(\d+)\.(.+)$")
_ATTENTION = re.compile(r"(?:^|\.)(?:attn|attention|self_attn)(?:\.|$)")
_MLP = re.compile(r"(?:^|\.)(?:mlp|ffn|feed_forward)(?:\.|$)")
_WTE = re.compile(r"(?:^|\.)(?:wte|tok_emb|tok_embeddings|embed_tokens)(?:\.|$)")
_LM_HEAD = re.compile(r"(?:^|\.)lm_head(?:\.|$)")


def width_for_depth(depth: int) -> tuple[int, int]:
    """(n_embd, n_head) of nanochat's depth-``depth`` model: width 64 per layer, heads of at most 128 dims."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    n_embd = WIDTH_PER_LAYER * depth
    return n_embd, math.ceil(n_embd / MAX_HEAD_DIM)


@dataclass(frozen=True)
class GPTShape:
    """The dimensions that fix a nanochat-style GPT's parameter count and FLOPs."""

    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    vocab_size: int
    sequence_len: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int) -> GPTShape:
        """nanochat's depth-``depth`` model (see ``width_for_depth``)."""
        n_embd, n_head = width_for_depth(depth)
        return cls(depth, n_embd, n_head, n_head, vocab_size, sequence_len)


@dataclass(frozen=True)
class Component:
    """Parameters of one component; per_block holds the count of each block (block components)."""

    name: str
    total: int
    per_block: tuple[int, ...] = ()

    @property
    def uniform_per_block(self) -> int | None:
        """The count of one block when every block has the same, else None."""
        if self.per_block and len(set(self.per_block)) == 1:
            return self.per_block[0]
        return None


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def missing_keys(config: Mapping[str, Any]) -> list[str]:
    """The keys of REQUIRED_KEYS that config lacks (or holds as something other than a positive int)."""
    return [k for k in REQUIRED_KEYS if not _positive_int(config.get(k))]


def shape_from_config(config: Mapping[str, Any]) -> GPTShape | None:
    """The GPTShape of a GPTConfig-like mapping; None when a key is missing or the heads do not divide."""
    if missing_keys(config):
        return None
    n_kv_head = config.get("n_kv_head", config["n_head"])
    if not _positive_int(n_kv_head) or config["n_embd"] % config["n_head"]:
        return None
    return GPTShape(config["n_layer"], config["n_embd"], config["n_head"], n_kv_head,
                    config["vocab_size"], config["sequence_len"])


def attention_params_per_block(shape: GPTShape) -> int:
    d, kv = shape.n_embd, shape.n_kv_head * shape.head_dim
    return d * d + 2 * d * kv + d * d


def mlp_params_per_block(shape: GPTShape) -> int:
    return 8 * shape.n_embd * shape.n_embd


def components_from_config(shape: GPTShape) -> list[Component]:
    embedding = shape.vocab_size * shape.n_embd
    blocks = shape.n_layer
    attn, mlp = attention_params_per_block(shape), mlp_params_per_block(shape)
    return [
        Component("wte", embedding),
        Component("attention", attn * blocks, (attn,) * blocks),
        Component("mlp", mlp * blocks, (mlp,) * blocks),
        Component("lm_head", embedding),
    ]


def component_of(name: str) -> tuple[str, int | None]:
    """(component, block index or None) of a parameter name."""
    block = _BLOCK.search(name)
    if block is not None:
        rest = block.group(2)
        if _ATTENTION.search(rest):
            return "attention", int(block.group(1))
        if _MLP.search(rest):
            return "mlp", int(block.group(1))
        return "other", None
    if _WTE.search(name):
        return "wte", None
    if _LM_HEAD.search(name):
        return "lm_head", None
    return "other", None


def components_from_parameters(parameters: Mapping[str, tuple[int, ...]]) -> list[Component]:
    """Group parameter shapes into components (those with at least one parameter), in COMPONENTS order."""
    totals = dict.fromkeys(COMPONENTS, 0)
    blocks: dict[str, dict[int, int]] = {"attention": {}, "mlp": {}}
    for name, shape in parameters.items():
        count = math.prod(shape)
        component, index = component_of(name)
        totals[component] += count
        if index is not None:
            blocks[component][index] = blocks[component].get(index, 0) + count
    out = []
    for c in COMPONENTS:
        if totals[c] or blocks.get(c):
            per_block = tuple(v for _, v in sorted(blocks.get(c, {}).items()))
            out.append(Component(c, totals[c], per_block))
    return out


def choose_components(
    config: Mapping[str, Any], parameters: Mapping[str, tuple[int, ...]]
) -> tuple[list[Component], Literal["parameters", "config"] | None]:
    """(components, source): from parameters when they list the model's blocks, else from the config.

    A report parsed from Markdown lists only the parameters it shows gradients of (wte and lm_head
    in the seed); such a partial listing defers to the config. source is "parameters", "config"
    or None when neither is available.
    """
    shape = shape_from_config(config)
    from_params = components_from_parameters(parameters) if parameters else []
    has_blocks = any(c.per_block for c in from_params)
    if from_params and (has_blocks or shape is None):
        return from_params, "parameters"
    if shape is not None:
        return components_from_config(shape), "config"
    return [], None


def total_params(components: list[Component]) -> int:
    return sum(c.total for c in components)


def embedding_params(components: list[Component]) -> int:
    return sum(c.total for c in components if c.name == "wte")


def count_params(shape: GPTShape) -> int:
    return total_params(components_from_config(shape))


def attention_flops_per_token(shape: GPTShape) -> int:
    return 12 * shape.n_layer * shape.n_head * shape.head_dim * shape.sequence_len


def flops_per_token(shape: GPTShape, components: list[Component] | None = None) -> int:
    """6 * (params - embedding params) + 12*L*H*D*T; components default to the config's."""
    components = components_from_config(shape) if components is None else components
    non_embedding = total_params(components) - embedding_params(components)
    return 6 * non_embedding + attention_flops_per_token(shape)


@dataclass(frozen=True)
class SweepRow:
    depth: int
    n_embd: int
    n_head: int
    params: int
    flops_per_token: int


def depth_sweep(vocab_size: int, sequence_len: int, depths: Iterable[int] = DEFAULT_DEPTHS) -> list[SweepRow]:
    """Parameters and FLOPs per token of nanochat's depth-d models at the given vocab and length."""
    rows = []
    for depth in depths:
        shape = GPTShape.from_depth(depth, vocab_size, sequence_len)
        rows.append(SweepRow(depth, shape.n_embd, shape.n_head, count_params(shape), flops_per_token(shape)))
    return rows
