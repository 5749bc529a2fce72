"""Capture overhead: traced training step vs plain training step, side by side in one process.

    python benchmarks/overhead.py                       # depths 4, 8, 12 at T 1024, V 65536
    python benchmarks/overhead.py --depths 4 --pairs 11

For each depth it builds the reference GPT with AdamW on every parameter, enters one capture (this
compiles the statistics kernel), warms up, then runs pairs of steps, one plain and one traced,
alternating which goes first so that drift (turbo, caches, other load) falls on both equally. A
step is forward, backward, optimizer step and zero_grad. A traced step does the same under full
capture: every stage's output, every stage's gradient and every parameter's gradient, read back to
the host once at the end of the step. A plain step runs with the capture paused: the hooks stay
registered and return at once, as in a loop that traces every k-th step.

Printed per depth: the median of the per-pair ratios traced/plain and their spread (min-max), the
median step times, the peak memory of each kind of step and their ratio, and the statistics path
in use; then two figures that steady the picture on a noisy machine: the ratio of the best traced
step to the best plain step, and the time the capture itself spends per step (its hooks and
end_iteration, measured inside the traced step) as a share of the plain step. Peak memory is the process's peak resident set during the step (Linux: reset through
/proc/self/clear_refs before each step), or the peak allocated device memory on CUDA.

``--granularity ops`` traces the same architecture as a model without taps is traced: its taps
dropped, every leaf module (Embedding, Linear) and every functional op of the op list (norms,
rotary, attention, ReLU², softcap, residual adds, the loss) as stages, the ops seen through the
TorchFunctionMode; ``modules`` the leaf modules alone; ``taps`` (default) the taps. Several
(``--granularity taps ops``) run one after the other in this process, each depth with its own
model and capture, for figures side by side.

The last line is machine-readable:
    overhead depth4=1.04 depth8=1.03 depth12=1.02 mem=1.01
where mem is the largest memory ratio over the depths; a granularity other than the first is
suffixed: ``depth4=1.04 depth4.ops=1.09``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_gpttrace.tracer import Capture, capture, is_tap
from reference_model import GPT, GPTConfig
from reference_model.train import synthetic_batches

Step = Callable[[bool], None]  # one training step, traced or not


# ------------------------------------------------------------------------------ peak memory
class PeakMemory:
    """Peak memory of a region: CUDA's allocator peak, else the process's peak RSS (Linux)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.available = self.cuda or self._can_reset_rss()

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.available:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def peak(self) -> float | None:
        """Peak since reset, in bytes."""
        if self.cuda:
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated())
        if not self.available:
            return None
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
        return None


# ------------------------------------------------------------------------------ steps
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class RunState:
    """What the traced steps of a run report: the statistics path, the tensors summarised, hook time."""

    capture: Capture
    path: str | None = None
    stats: int = 0
    direct: list[float] = field(default_factory=list)  # seconds inside the capture per traced step


def make_run(depth: int, args: argparse.Namespace, device: torch.device) -> tuple[GPTConfig, GPT, Step, RunState]:
    config = GPTConfig.from_depth(depth, vocab_size=args.vocab_size, sequence_len=args.sequence_len)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    idx, targets = next(synthetic_batches(config, seed=0, batch_size=args.batch_size, device=device))
    model.train()
    # One capture for the whole run, as in a training loop that traces every step: its setup (hook
    # registration, the zero-parameter census, compiling the kernel) is paid once, not per step.
    # without taps: the architecture as a user writes it (its taps are identities, dropped by name)
    no_taps = [f"!{name}" for name, m in model.named_modules() if is_tap(m)] if args.granularity != "taps" else None
    cap = capture(model, no_taps, stats_path=args.stats_path, granularity=args.granularity).__enter__()
    state = RunState(cap)

    def train_step() -> torch.Tensor:
        loss: torch.Tensor = model(idx, targets)
        loss.backward()
        return loss

    def step(traced: bool) -> None:
        if traced:
            loss = train_step()
            it = cap.end_iteration(loss=loss, stepped=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            note = cap.path_note()
            state.path = cap.stats_path + (f" ({note})" if note else "")
            state.stats = len(it.forward) + len(it.stage_grads) + len(it.param_grads)
            if cap.last_overhead_s is not None:
                state.direct.append(cap.last_overhead_s)
            cap.iterations.clear()  # statistics are not what is measured here: do not accumulate them
        else:
            with cap.paused():  # the hooks stay registered and return at once
                train_step()
                opt.step()
                opt.zero_grad(set_to_none=True)

    return config, model, step, state


def measure(step: Step, traced: bool, memory: PeakMemory, device: torch.device) -> tuple[float, float | None]:
    gc.collect()
    sync(device)
    memory.reset()
    t0 = time.perf_counter()
    step(traced)
    sync(device)
    elapsed = time.perf_counter() - t0
    return elapsed, memory.peak()


def run_depth(depth: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    config, model, step, state = make_run(depth, args, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"depth {depth}: d_model {config.n_embd}, {config.n_head} heads, {n_params / 1e6:.1f}M parameters, "
          f"T {config.sequence_len}, V {config.vocab_size}, batch {args.batch_size}, "
          f"granularity {args.granularity}", flush=True)
    memory = PeakMemory(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(False)
        step(True)
    print(f"  warm-up: {args.warmup} plain + {args.warmup} traced steps in {time.perf_counter() - t0:.1f} s "
          f"(includes compiling the statistics kernel on first use)", flush=True)
    plain, traced, ratios, mem_plain, mem_traced = [], [], [], [], []
    state.direct.clear()
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        got: dict[bool, tuple[float, float | None]] = {}
        for kind in order:
            got[kind] = measure(step, kind, memory, device)
        (tp, mp), (tt, mt) = got[False], got[True]
        plain.append(tp)
        traced.append(tt)
        ratios.append(tt / tp)
        if mp is not None and mt is not None:
            mem_plain.append(mp)
            mem_traced.append(mt)
        print(f"  pair {i + 1}/{args.pairs}: plain {tp:.3f} s, traced {tt:.3f} s, ratio {tt / tp:.3f}", flush=True)
    result: dict[str, Any] = {
        "depth": depth,
        "ratio": statistics.median(ratios),
        "spread": (min(ratios), max(ratios)),
        "plain_s": statistics.median(plain),
        "traced_s": statistics.median(traced),
        "path": state.path,
        "stats": state.stats,
        "mem_plain": max(mem_plain) if mem_plain else None,
        "mem_traced": max(mem_traced) if mem_traced else None,
    }
    result["mem_ratio"] = (result["mem_traced"] / result["mem_plain"]) if mem_plain else None
    result["best"] = min(traced) / min(plain)
    result["direct_s"] = statistics.median(state.direct)
    mem = ("peak memory n/a" if result["mem_ratio"] is None else
           f"peak memory plain {result['mem_plain'] / 2**20:.0f} MiB, traced {result['mem_traced'] / 2**20:.0f} MiB, "
           f"ratio {result['mem_ratio']:.3f}")
    print(f"  depth {depth}: overhead {result['ratio']:.3f} (median of {args.pairs} pairs, spread "
          f"{result['spread'][0]:.3f}-{result['spread'][1]:.3f}); step plain {result['plain_s']:.3f} s, "
          f"traced {result['traced_s']:.3f} s; {mem}; {result['stats']} tensors summarised per step; "
          f"statistics path: {result['path']}", flush=True)
    print(f"  depth {depth}: best traced / best plain {result['best']:.3f}; time inside the capture's hooks and "
          f"end_iteration {result['direct_s'] * 1e3:.0f} ms per step = "
          f"{result['direct_s'] / result['plain_s']:.1%} of the plain step (median; not subject to the "
          f"machine's step-to-step noise)", flush=True)
    state.capture.__exit__(None, None, None)
    del model, step, state
    gc.collect()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 12])
    p.add_argument("--pairs", type=int, default=9, help="timed (plain, traced) pairs per depth (default 9)")
    p.add_argument("--warmup", type=int, default=1, help="untimed (plain, traced) pairs first (default 1)")
    p.add_argument("--sequence-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stats-path", choices=("auto", "compiled", "eager"), default=None,
                   help="statistics path (default: GPTTRACE_STATS_PATH, else auto)")
    p.add_argument("--granularity", choices=("taps", "modules", "ops"), nargs="+", default=["taps"],
                   help="stages traced: the taps (default), the leaf modules of the model without its taps, "
                        "or those plus its functional ops; several run one after the other")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.warmup < 1:
        p.error("--pairs and --warmup must be at least 1")
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"python {sys.version.split()[0]}, pid {os.getpid()}", flush=True)
    grains = list(dict.fromkeys(args.granularity))
    results = []
    for grain in grains:
        for d in args.depths:
            results.append({**run_depth(d, argparse.Namespace(**{**vars(args), "granularity": grain}), device),
                            "granularity": grain})
    mems = [r["mem_ratio"] for r in results if r["mem_ratio"] is not None]
    summary = " ".join(f"depth{r['depth']}{'' if r['granularity'] == grains[0] else '.' + r['granularity']}"
                       f"={r['ratio']:.2f}" for r in results)
    summary += f" mem={max(mems):.2f}" if mems else " mem=n/a"
    print(f"overhead {summary}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
