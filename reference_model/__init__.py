"""The reference nanochat-style GPT that pytest-gpttrace is built and tested on."""

from .gpt import GPT, GPTConfig, Tap, apply_rotary_emb, norm, rotary_tables
from .train import optimizers, synthetic_batches, zipf_probs

__all__ = [
    "GPT",
    "GPTConfig",
    "Tap",
    "apply_rotary_emb",
    "norm",
    "optimizers",
    "rotary_tables",
    "synthetic_batches",
    "zipf_probs",
]
