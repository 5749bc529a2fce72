"""A model in the style of karpathy's nanoGPT ``model.py``, written for these tests: LayerNorm
modules with an optional bias (``F.layer_norm`` inside), a fused qkv projection, attention either
through ``F.scaled_dot_product_attention(is_causal=True)`` or by hand (``q @ k^T`` scaled, the
causal mask by ``masked_fill(-inf)``, softmax, ``@ v``), GELU, residual adds in the block, weight
tying, ``forward(idx, targets) -> (logits, loss)``. ``Faults`` switches one-line bugs on."""

from __future__ import annotations

import dataclasses
import math
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class NanoConfig:
    block_size: int = 32  # context length
    vocab_size: int = 96
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True  # biases in the Linears and LayerNorms
    flash: bool = False  # F.scaled_dot_product_attention, else attention by hand


@dataclasses.dataclass(frozen=True)
class Faults:
    no_attn_residual_in: int | None = None  # the block whose attention residual is dropped: x = attn(ln_1(x))
    no_mask: bool = False  # the causal mask left out (attention by hand)
    no_scale: bool = False  # the 1/sqrt(head_dim) left out (attention by hand)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nn.LayerNorm has none to switch off)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    bias: torch.Tensor  # the causal mask, a buffer

    def __init__(self, config: NanoConfig, faults: Faults) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.flash, self.faults = config.n_head, config.n_embd, config.flash, faults
        self.register_buffer("bias", torch.tril(torch.ones(config.block_size, config.block_size))
                             .view(1, 1, config.block_size, config.block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
        else:
            scale = 1.0 if self.faults.no_scale else 1.0 / math.sqrt(k.size(-1))
            att = (q @ k.transpose(-2, -1)) * scale
            if not self.faults.no_mask:
                att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: NanoConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: NanoConfig, faults: Faults, index: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, faults)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.attn_residual = faults.no_attn_residual_in != index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x)) if self.attn_residual else self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class NanoStyleGPT(nn.Module):
    def __init__(self, config: NanoConfig | None = None, faults: Faults | None = None) -> None:
        super().__init__()
        self.config = config = config or NanoConfig()
        faults = faults or Faults()
        wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.transformer = nn.ModuleDict({
            "wte": wte,
            "wpe": nn.Embedding(config.block_size, config.n_embd),
            "drop": nn.Dropout(config.dropout),
            "h": nn.ModuleList([Block(config, faults, i) for i in range(config.n_layer)]),
            "ln_f": LayerNorm(config.n_embd, bias=config.bias),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        t_ = self.transformer
        x = t_["drop"](t_["wte"](idx) + t_["wpe"](pos))
        for block in cast(nn.ModuleList, t_["h"]):
            x = block(x)
        x = t_["ln_f"](x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss
