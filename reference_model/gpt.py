"""
The reference GPT: the nanochat model as it stood in October 2025.

Notable choices:
- rotary position embeddings (half-split pairs, bf16 tables), no learned positions
- QK norm: queries and keys are RMS-normalised per head after RoPE
- RMSNorm without learnable parameters, pre-norm blocks, no biases anywhere
- ReLU² MLP, 4x wide
- untied token embedding and LM head; logits softcapped with tanh
- lm_head and every c_proj start at zero, so at step 0 each block is the identity
- every intermediate result passes through a named Tap, so hooks can read or replace it

Shapes: B batch, T time, C = n_embd, H query heads, Hkv key/value heads, D = head_dim, V vocab.
A tap's qualified name (``blocks.0.attn.q_rope``) is its stage name in a trace: renaming or
reordering the taps changes every golden file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pytest_gpttrace.kinds import StageKind
from pytest_gpttrace.scaling import width_for_depth


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024  # T at most: the length of the rotary tables
    vocab_size: int = 65536  # V: rows of the token embedding and of lm_head
    n_layer: int = 4  # number of blocks
    n_head: int = 2  # H: query heads
    n_kv_head: int = 2  # Hkv: key/value heads (grouped-query attention when fewer than n_head)
    n_embd: int = 256  # C: width of the residual stream; head_dim = n_embd / n_head
    softcap: float = 15.0  # the logits are squashed into (-softcap, softcap) by a tanh
    rope_base: float = 10000.0  # rotary base: pair i turns at rope_base^(-2i/D) radians per position

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"GPTConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"GPTConfig.n_embd / n_head (head_dim = {self.head_dim}) must be even for RoPE"
            )
        if not self.softcap > 0:
            raise ValueError(f"GPTConfig.softcap must be positive, got {self.softcap!r}")
        if not self.rope_base > 0:
            raise ValueError(f"GPTConfig.rope_base must be positive, got {self.rope_base!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(
        cls,
        depth: int,
        vocab_size: int = 65536,
        sequence_len: int = 1024,
        *,
        softcap: float = 15.0,
        rope_base: float = 10000.0,
    ) -> GPTConfig:
        """nanochat's depth-``depth`` model; its width and heads follow ``scaling.width_for_depth``
        (width 64 per layer, heads of at most 128 dims)."""
        n_embd, n_head = width_for_depth(depth)
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head,
            n_embd=n_embd,
            softcap=softcap,
            rope_base=rope_base,
        )


class Tap(nn.Module):
    """An identity whose output hooks can observe or replace; the model continues with what it returns.

    ``gpttrace_kind`` says what the tapped result is (a norm's output, the rotated queries, ...):
    the trace records it as the stage's kind, and the anomaly rules read it. The model sets it from
    ``TAP_KINDS``."""

    gpttrace_kind: StageKind = StageKind.OTHER

    def forward(self, x: Tensor) -> Tensor:
        return x

    if TYPE_CHECKING:  # nn.Module.__call__ returns Any; a tap returns a tensor like its input

        def __call__(self, x: Tensor) -> Tensor: ...


# what each tap shows, by its attribute name (a tap not listed is "other"): its stage kind
TAP_KINDS: dict[str, StageKind] = {
    "wte": StageKind.EMBEDDING,
    "norm": StageKind.NORM, "q_norm": StageKind.NORM, "k_norm": StageKind.NORM, "final_norm": StageKind.NORM,
    "q": StageKind.LINEAR, "k": StageKind.LINEAR, "v": StageKind.LINEAR, "fc": StageKind.LINEAR,
    "out": StageKind.LINEAR, "logits": StageKind.LINEAR,
    "q_rope": StageKind.ROTARY, "k_rope": StageKind.ROTARY,
    "sdpa": StageKind.ATTENTION,
    "relu": StageKind.ACTIVATION, "relu2": StageKind.ACTIVATION,
    "input": StageKind.RESIDUAL, "attn_resid": StageKind.RESIDUAL, "mlp_resid": StageKind.RESIDUAL,
    "softcap": StageKind.SOFTCAP,
    "loss": StageKind.LOSS,
}


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def softcap(logits: Tensor, cap: float) -> Tensor:
    """A smooth clamp of the logits to (-cap, cap), computed in float32."""
    logits = logits.float()
    return cap * torch.tanh(logits / cap)


def rotary_tables(
    positions: Tensor | Sequence[int],
    head_dim: int,
    base: float = 10000.0,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[Tensor, Tensor]:
    """cos and sin for the given positions, shaped (1, T, 1, head_dim/2) to broadcast over (B, T, H, D/2)."""
    positions = torch.as_tensor(positions)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = torch.outer(positions.to(torch.float32), inv_freq)  # (T, D/2)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return cos[None, :, None, :], sin[None, :, None, :]


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # half-split pairs: dim i rotates with dim i + D/2
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # the taps, in the order the forward passes them
        self.norm = Tap()  # (B, T, C) the block input after RMSNorm
        self.q = Tap()  # (B, T, H, D) queries
        self.k = Tap()  # (B, T, Hkv, D) keys
        self.v = Tap()  # (B, T, Hkv, D) values
        self.q_rope = Tap()  # (B, T, H, D) queries after rotary
        self.k_rope = Tap()  # (B, T, Hkv, D) keys after rotary
        self.q_norm = Tap()  # (B, T, H, D) queries after QK norm
        self.k_norm = Tap()  # (B, T, Hkv, D) keys after QK norm
        self.sdpa = Tap()  # (B, H, T, D) attention output per head
        self.heads = Tap()  # (B, T, C) the heads side by side
        self.out = Tap()  # (B, T, C) after c_proj: zero at init

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.size()
        x = self.norm(norm(x))
        q = self.q(self.c_q(x).view(B, T, self.n_head, self.head_dim))
        k = self.k(self.c_k(x).view(B, T, self.n_kv_head, self.head_dim))
        v = self.v(self.c_v(x).view(B, T, self.n_kv_head, self.head_dim))
        q = self.q_rope(apply_rotary_emb(q, cos, sin))
        k = self.k_rope(apply_rotary_emb(k, cos, sin))
        q = self.q_norm(norm(q))
        k = self.k_norm(norm(k))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head < self.n_head)
        y = self.sdpa(y)
        y = self.heads(y.transpose(1, 2).contiguous().view(B, T, C))
        return self.out(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        # the taps, in the order the forward passes them
        self.norm = Tap()  # (B, T, C) the input after RMSNorm
        self.fc = Tap()  # (B, T, 4C) after c_fc
        self.relu = Tap()  # (B, T, 4C) after ReLU
        self.relu2 = Tap()  # (B, T, 4C) after squaring: ReLU²
        self.out = Tap()  # (B, T, C) after c_proj: zero at init

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(norm(x))
        x = self.fc(self.c_fc(x))
        x = self.relu(F.relu(x))
        x = self.relu2(x.square())
        return self.out(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.input = Tap()  # (B, T, C) the residual stream entering the block
        self.attn = CausalSelfAttention(config)
        self.attn_resid = Tap()  # (B, T, C) x + attention
        self.mlp = MLP(config)
        self.mlp_resid = Tap()  # (B, T, C) x + MLP: the block's output

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = self.input(x)
        x = self.attn_resid(x + self.attn(x, cos, sin))
        x = self.mlp_resid(x + self.mlp(x))
        return x


class InputTaps(nn.Module):
    """The batch as the model receives it."""

    def __init__(self) -> None:
        super().__init__()
        self.idx = Tap()  # (B, T) token ids
        self.targets = Tap()  # (B, T) next-token ids (only when the forward gets targets)


class EmbedTaps(nn.Module):
    """The token embedding (the wte lookup itself hangs on the model, as wte.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = Tap()  # (B, T, C) rows of wte
        self.norm = Tap()  # (B, T, C) after RMSNorm: the residual stream entering block 0


class RopeTaps(nn.Module):
    """The rotary tables cut to the batch's length."""

    def __init__(self) -> None:
        super().__init__()
        self.cos = Tap()  # (1, T, 1, D/2) bf16
        self.sin = Tap()  # (1, T, 1, D/2) bf16


class LMHead(nn.Module):
    """The unembedding (logits = x @ weight.T, a bias-free linear layer) and the softcap.

    Not an nn.Linear: the head holds the weight itself so that the parameter reads
    ``lm_head.weight`` and its taps read ``lm_head.logits`` and ``lm_head.softcap``, the stage
    names of every golden file (an nn.Linear cannot hold taps of its own).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.cap = config.softcap
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.n_embd))  # (V, C), set by init_weights
        self.logits = Tap()  # (B, T, V) x @ weight.T: zero at init
        self.softcap = Tap()  # (B, T, V) float32, squashed into (-softcap, softcap)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.logits(F.linear(x, self.weight))
        return self.softcap(softcap(logits, self.cap))


class GPT(nn.Module):
    cos: Tensor  # the rotary tables, buffers registered in __init__
    sin: Tensor

    def __init__(self, config: GPTConfig, seed: int = 42):
        super().__init__()
        self.config = config
        # registered in the order the forward uses them: named_modules() and named_parameters() follow it
        self.inputs = InputTaps()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.embed = EmbedTaps()
        self.rope = RopeTaps()
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.final_norm = Tap()  # (B, T, C) the last residual stream after RMSNorm
        self.lm_head = LMHead(config)
        self.loss = Tap()  # () mean cross-entropy (only when the forward gets targets)
        cos, sin = rotary_tables(torch.arange(config.sequence_len), config.head_dim, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)  # (1, sequence_len, 1, D/2) bf16
        self.register_buffer("sin", sin, persistent=False)
        for name, module in self.named_modules():
            if isinstance(module, Tap):
                module.gpttrace_kind = TAP_KINDS.get(name.rsplit(".", 1)[-1], StageKind.OTHER)
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int = 42) -> None:
        """Every parameter, from a private generator: the same seed gives bitwise the same weights.

        ===========================  ==========  =====================================
        parameter                    shape       starts as
        ===========================  ==========  =====================================
        wte.weight                   (V, C)      normal, std 1
        blocks.i.attn.c_q.weight     (H·D, C)    normal, std 1/√C
        blocks.i.attn.c_k.weight     (Hkv·D, C)  normal, std 1/√C · min(1, √(Hkv·D/C))
        blocks.i.attn.c_v.weight     (Hkv·D, C)  normal, std 1/√C · min(1, √(Hkv·D/C))
        blocks.i.attn.c_proj.weight  (C, C)      zeros
        blocks.i.mlp.c_fc.weight     (4C, C)     normal, std 1/√C
        blocks.i.mlp.c_proj.weight   (C, 4C)     zeros
        lm_head.weight               (V, C)      zeros
        ===========================  ==========  =====================================

        (std = 1/√fan_in · min(1, √(fan_out / fan_in)) for every block matrix.) The draws run in
        the order of the table, block by block; the c_proj weights take their draw too before they
        are zeroed, so each weight's values depend only on the seed and the shapes before it.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        _normal_(self.wte.weight, 1.0, gen)
        for block in cast("Iterable[Block]", self.blocks):
            attn, mlp = block.attn, block.mlp
            for linear in (attn.c_q, attn.c_k, attn.c_v, attn.c_proj, mlp.c_fc, mlp.c_proj):
                _normal_(linear.weight, _matrix_std(linear.weight), gen)
            attn.c_proj.weight.zero_()
            mlp.c_proj.weight.zero_()
        self.lm_head.weight.zero_()

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        """The logits (B, T, V) float32, or with targets the mean cross-entropy."""
        _, T = idx.size()
        if T > self.config.sequence_len:  # noqa: SIM300 (T is the sequence length, not a constant)
            raise ValueError(
                f"sequence length {T} exceeds the model's sequence_len {self.config.sequence_len}"
            )
        idx = self.inputs.idx(idx)
        if targets is not None:
            targets = self.inputs.targets(targets)
        x = self.embed.wte(self.wte(idx))
        x = self.embed.norm(norm(x))
        cos = self.rope.cos(self.cos[:, :T])
        sin = self.rope.sin(self.sin[:, :T])
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.final_norm(norm(x))
        logits: Tensor = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.view(-1).long(), ignore_index=-1
        )
        return self.loss(loss)


def _matrix_std(weight: Tensor) -> float:
    fan_out, fan_in = weight.shape
    return 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))


def _normal_(tensor: Tensor, std: float, generator: torch.Generator) -> None:
    # drawn on the CPU and copied, so the weights do not depend on the device
    tensor.copy_(torch.empty(tensor.shape).normal_(0.0, std, generator=generator))
