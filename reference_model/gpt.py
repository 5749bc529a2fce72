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
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 4
    n_head: int = 2
    n_kv_head: int = 2
    n_embd: int = 256
    softcap: float = 15.0
    rope_base: float = 10000.0

    def __post_init__(self):
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
    def from_depth(cls, depth: int, vocab_size: int = 65536, sequence_len: int = 1024, **kwargs):
        """nanochat's scaling rule: width 64 per layer, heads of at most 128 dims."""
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        n_embd = 64 * depth
        n_head = max(1, math.ceil(n_embd / 128))
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head,
            n_embd=n_embd,
            **kwargs,
        )


class Tap(nn.Module):
    """An identity whose output hooks can observe or replace; the model continues with what it returns."""

    def forward(self, x):
        return x


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def softcap(logits, cap):
    """A smooth clamp of the logits to (-cap, cap), computed in float32."""
    logits = logits.float()
    return cap * torch.tanh(logits / cap)


def rotary_tables(positions, head_dim, base=10000.0, dtype=torch.bfloat16):
    """cos and sin for the given positions, shaped (1, T, 1, head_dim/2) to broadcast over (B, T, H, D/2)."""
    positions = torch.as_tensor(positions)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = torch.outer(positions.to(torch.float32), inv_freq)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return cos[None, :, None, :], sin[None, :, None, :]


def apply_rotary_emb(x, cos, sin):
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
        for name in ("norm", "q", "k", "v", "q_rope", "k_rope", "q_norm", "k_norm", "sdpa", "heads", "out"):
            setattr(self, name, Tap())

    def forward(self, x, cos, sin):
        B, T, C = x.size()
        x = self.norm(norm(x))
        q = self.q(self.c_q(x).view(B, T, self.n_head, self.head_dim))  # (B, T, H, D)
        k = self.k(self.c_k(x).view(B, T, self.n_kv_head, self.head_dim))  # (B, T, Hkv, D)
        v = self.v(self.c_v(x).view(B, T, self.n_kv_head, self.head_dim))  # (B, T, Hkv, D)
        q = self.q_rope(apply_rotary_emb(q, cos, sin))
        k = self.k_rope(apply_rotary_emb(k, cos, sin))
        q = self.q_norm(norm(q))
        k = self.k_norm(norm(k))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_head < self.n_head
        )
        y = self.sdpa(y)  # (B, H, T, D)
        y = self.heads(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)
        return self.out(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        for name in ("norm", "fc", "relu", "relu2", "out"):
            setattr(self, name, Tap())

    def forward(self, x):
        x = self.norm(norm(x))
        x = self.fc(self.c_fc(x))
        x = self.relu(F.relu(x))
        x = self.relu2(x.square())
        return self.out(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.input = Tap()
        self.attn = CausalSelfAttention(config)
        self.attn_resid = Tap()
        self.mlp = MLP(config)
        self.mlp_resid = Tap()

    def forward(self, x, cos, sin):
        x = self.input(x)
        x = self.attn_resid(x + self.attn(x, cos, sin))
        x = self.mlp_resid(x + self.mlp(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int = 42):
        super().__init__()
        self.config = config
        self.inputs = nn.ModuleDict({"idx": Tap(), "targets": Tap()})
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.embed = nn.ModuleDict({"wte": Tap(), "norm": Tap()})
        self.rope = nn.ModuleDict({"cos": Tap(), "sin": Tap()})
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.final_norm = Tap()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # taps hang under lm_head so that their names read lm_head.logits and lm_head.softcap
        self.lm_head.logits = Tap()
        self.lm_head.softcap = Tap()
        self.loss = Tap()
        cos, sin = rotary_tables(torch.arange(config.sequence_len), config.head_dim, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int = 42):
        """Seeded from a private generator: the same seed gives bitwise the same weights."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                _normal_(module.weight, std, gen)
            elif isinstance(module, nn.Embedding):
                _normal_(module.weight, 1.0, gen)
        self.lm_head.weight.zero_()
        for block in self.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.sequence_len:
            raise ValueError(
                f"sequence length {T} exceeds the model's sequence_len {self.config.sequence_len}"
            )
        idx = self.inputs.idx(idx)
        if targets is not None:
            targets = self.inputs.targets(targets)
        x = self.embed.wte(self.wte(idx))
        x = self.embed.norm(norm(x))
        cos = self.rope.cos(self.cos[:, :T])  # (1, T, 1, D/2)
        sin = self.rope.sin(self.sin[:, :T])
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.final_norm(norm(x))
        logits = self.lm_head.logits(self.lm_head(x))
        logits = self.lm_head.softcap(softcap(logits, self.config.softcap))
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.view(-1).long(), ignore_index=-1
        )
        return self.loss(loss)


def _normal_(tensor, std, generator):
    # drawn on the CPU and copied, so the weights do not depend on the device
    tensor.copy_(torch.empty(tensor.shape).normal_(0.0, std, generator=generator))
