"""A nanochat-style GPT written with functions and no taps: functional RMSNorm (QK norm too),
half-split rotary, SDPA, ReLU², a tanh softcap and the residual adds in each block.

Its behaviour switches (``Bugs``) are the one-line bugs the functional-stage tests look for."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Bugs:
    flipped_sin: bool = False      # x1 * (-sin) flipped to x1 * sin in the rotation's second half
    no_qk_norm: bool = False       # queries and keys not RMS-normalised after the rotation
    no_attn_scale: bool = False    # SDPA with scale=1 instead of 1/sqrt(D)
    softcap: float = 15.0          # the cap of the logits


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flipped: bool = False) -> torch.Tensor:
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (sin if flipped else -sin) + x2 * cos
    return torch.cat([y1, y2], 3)


class Attention(nn.Module):
    def __init__(self, d: int, n_head: int, bugs: Bugs):
        super().__init__()
        self.n_head, self.head_dim, self.bugs = n_head, d // n_head, bugs
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, d, bias=False)
        self.c_v = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        q = rotary(q, cos, sin, self.bugs.flipped_sin)
        k = rotary(k, cos, sin, self.bugs.flipped_sin)
        if not self.bugs.no_qk_norm:
            q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 if self.bugs.no_attn_scale else None)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.c_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, bugs: Bugs):
        super().__init__()
        self.attn = Attention(d, n_head, bugs)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class FunctionalGPT(nn.Module):
    """nanochat's architecture at a tiny size, written as most people write it: functions between
    the Linear layers, no taps. lm_head and every c_proj start at zero, as in nanochat."""

    cos: torch.Tensor  # rotary tables (buffers), (1, T, 1, D/2)
    sin: torch.Tensor

    def __init__(self, vocab: int = 64, d: int = 32, T: int = 16, layers: int = 2, n_head: int = 2,
                 bugs: Bugs = Bugs(), seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.softcap = bugs.softcap
        self.wte = nn.Embedding(vocab, d)
        blocks = [Block(d, n_head, bugs) for _ in range(layers)]
        self.blocks = nn.ModuleList(blocks)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for block in blocks:
                block.attn.c_proj.weight.zero_()
                block.mlp.c_proj.weight.zero_()
        head_dim = d // n_head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", freqs.sin()[None, :, None, :], persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(norm(x)).float()
        logits = self.softcap * torch.tanh(logits / self.softcap)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def functional_batches(vocab: int = 64, T: int = 16, batch: int = 2, seed: int = 0) -> Iterator[tuple[torch.Tensor,
                                                                                                       torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        stream = torch.randint(0, vocab, (batch, T + 1), generator=g)
        yield stream[:, :-1], stream[:, 1:]


def functional_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)
