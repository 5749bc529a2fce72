"""Small models for the tests: the reference GPT at tiny sizes, and a user GPT with no taps."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from reference_model import GPT, GPTConfig, optimizers, synthetic_batches

TINY = GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)


def tiny_reference(seed=42, config=TINY):
    model = GPT(config, seed=seed)
    return model, synthetic_batches(config, seed=seed), optimizers(model)


class UserBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, C = x.shape
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
