"""Small models for the tests: the reference GPT at tiny sizes, and a user GPT with no taps."""

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_gpttrace import trace_training
from pytest_gpttrace.trace import Trace
from reference_model import GPT, GPTConfig, optimizers, synthetic_batches

Batch = tuple[torch.Tensor, torch.Tensor]  # (idx, targets)

# The model of the shipped tiny goldens (tests/test_traces.py, golden/tests/test_traces/*[tiny].json):
# a changed value is another model, and those goldens no longer hold.
TINY_GOLDEN_CONFIG = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
# A smaller reference model for tests that trace without a golden (half the sequence, half the vocabulary).
SMALL_CONFIG = GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)


def tiny_reference(
    seed: int = 42, config: GPTConfig = SMALL_CONFIG,
) -> tuple[GPT, Iterator[Batch], list[torch.optim.Optimizer]]:
    """The reference model at ``config``, its synthetic batches and its optimizers."""
    model = GPT(config, seed=seed)
    return model, synthetic_batches(config, seed=seed), optimizers(model)


def trace_reference(config: GPTConfig, iterations: int, seed: int = 42) -> Trace:
    """The reference model at ``config`` traced for ``iterations``; the optimizers are built only
    where a step can show (the step after the last iteration changes nothing a trace sees)."""
    model = GPT(config, seed=seed)
    opts = optimizers(model) if iterations > 1 else None
    return trace_training(model, synthetic_batches(config, seed=seed), opts, iterations=iterations)


class UserBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        C = x.shape[-1]
        q, k, v = self.qkv(self.ln(x)).split(C, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y)
        return x + self.ff(self.ln(x))  # ln used twice on purpose: a module called twice


class UserGPT(nn.Module):
    """A nanoGPT-flavoured model with other module names, learned positions and no taps."""

    def __init__(self, vocab=64, d=16, T=16, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(T, d)
        self.layers = nn.ModuleList([UserBlock(d) for _ in range(layers)])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1])
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def user_batches(vocab=64, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, vocab, (T + 1,), generator=g)
    while True:
        yield stream[:-1].view(1, T), stream[1:].view(1, T)


class TiedBlock(nn.Module):
    """GPT-2's block: LayerNorm with bias, one fused qkv projection with bias, GELU MLP."""

    def __init__(self, d, n_head, scale_attention=True):
        super().__init__()
        self.n_head, self.scale_attention = n_head, scale_attention
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=None if self.scale_attention else 1.0)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class TiedGPT(nn.Module):
    """A GPT-2-style model unlike the reference one: learned positions, tied embedding and head,
    biases everywhere, GELU; optionally under bf16 autocast, as mixed-precision training runs it."""

    def __init__(self, vocab=128, d=32, T=32, layers=2, n_head=2, autocast=False, scale_attention=True):
        super().__init__()
        self.autocast = autocast
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(T, d)
        self.h = nn.ModuleList([TiedBlock(d, n_head, scale_attention) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def tied_batches(vocab=128, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        stream = torch.randint(0, vocab, (2, T + 1), generator=g)
        yield stream[:, :-1], stream[:, 1:]
