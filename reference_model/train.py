"""Optimizers, synthetic batches and a small training loop for the reference GPT."""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Iterator, Sequence

import torch

from .gpt import GPT, GPTConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # (idx int32, targets int64), each (batch_size, sequence_len)


def optimizers(model: GPT) -> list[torch.optim.Optimizer]:
    """nanochat's split: AdamW for the embedding and the head, Muon for every 2-D block matrix."""
    scale = (model.config.n_embd / 768) ** -0.5
    adamw = torch.optim.AdamW(
        [
            {"params": [model.wte.weight], "lr": 0.2 * scale},
            {"params": [model.lm_head.weight], "lr": 0.004 * scale},
        ],
        betas=(0.8, 0.95),
        eps=1e-10,
        weight_decay=0.0,
    )
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    muon = torch.optim.Muon(matrices, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)
    for group in adamw.param_groups + muon.param_groups:
        group["initial_lr"] = group["lr"]
    return [adamw, muon]


def zipf_probs(vocab_size: int, exponent: float = 1.1, offset: float = 3.0) -> torch.Tensor:
    """Zipf-Mandelbrot: token id r has probability ∝ (r + offset)^-exponent, so low ids are frequent
    as in a BPE vocabulary. The defaults give the repetition rate that puts attention outputs where a
    tokenized text puts them (std near 0.18 at init; uniform ids give 0.13)."""
    ranks = torch.arange(vocab_size, dtype=torch.float64)
    p = (ranks + offset).pow(-exponent)
    return (p / p.sum()).to(torch.float32)


def synthetic_batches(
    config: GPTConfig,
    seed: int = 0,
    batch_size: int = 1,
    *,
    fresh: bool = False,
    exponent: float = 1.1,
    device: torch.device | str = "cpu",
) -> Iterator[Batch]:
    """Endless deterministic (idx int32, targets int64) batches of shape (batch_size, sequence_len).

    Each batch is cut from one Zipf-distributed token stream; targets are the next tokens.
    By default the same batch repeats (a model that trains must overfit it); fresh=True draws new ones.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    probs = zipf_probs(config.vocab_size, exponent)
    T = config.sequence_len

    def draw() -> Batch:
        stream = torch.multinomial(probs, batch_size * T + 1, replacement=True, generator=gen)
        idx = stream[:-1].view(batch_size, T).to(torch.int32)
        targets = stream[1:].view(batch_size, T).to(torch.int64)
        return idx.to(device), targets.to(device)

    if not fresh:
        batch = draw()
        return itertools.repeat(batch)
    return (draw() for _ in itertools.count())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_model", description=__doc__)
    parser.add_argument("--depth", type=int, default=4, help="number of layers (default 4)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--sequence-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size (default 65536)")
    parser.add_argument("--seed", type=int, default=42, help="init and data seed (default 42)")
    parser.add_argument("--fresh", action="store_true", help="a new batch every step instead of one repeated batch")
    args = parser.parse_args(argv)
    try:
        config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.sequence_len)
    except ValueError as exc:
        parser.error(str(exc))
    model = GPT(config, seed=args.seed)
    opts = optimizers(model)
    batches = synthetic_batches(config, seed=args.seed, fresh=args.fresh)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"depth {config.n_layer}, n_embd {config.n_embd}, heads {config.n_head}, "
          f"vocab {config.vocab_size}, T {config.sequence_len}, {n_params:,} parameters")
    print(f"ln(vocab) = {math.log(config.vocab_size):.6f}")
    for step in range(args.steps):
        idx, targets = next(batches)
        loss = model(idx, targets)
        loss.backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        print(f"step {step:4d} | loss {loss.item():.6f}", flush=True)
    return 0
