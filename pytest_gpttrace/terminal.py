"""The ``gpt-trace`` section of pytest's terminal summary, from the per-test summaries (plain data:
they cross processes under xdist)."""

from __future__ import annotations

from typing import Mapping, Sequence

from .anomalies import with_where

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float]) -> str:
    """One bar per value, scaled from the smallest to the largest; flat values give a flat line."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return BARS[3] * len(values)
    return "".join(BARS[min(7, int((v - lo) / (hi - lo) * 7.999))] for v in values)


def summary_lines(summaries: Sequence[Mapping], written: Sequence[tuple[str, str]], *, verbose: bool) -> list[str]:
    """One line per traced test (then its anomalies, drift and, when verbose, the residual std by
    layer), then one line per golden written."""
    lines = []
    for s in summaries:
        loss = f"loss {s['loss'][0]:.6f} -> {s['loss'][1]:.6f}" if s["loss"] else "no loss"
        golden = f"golden {s['golden']}" if s["golden"] else "no golden"
        status = s["out_of_tolerance"]
        if status.startswith("golden "):  # created, updated, missing, ...: the status names the file itself
            golden = None
        lines.append(f"{s['nodeid']}: {s['stages']} stages, {s['iterations']} iterations, {loss}, "
                     f"{', '.join(filter(None, (status, golden)))}, "
                     f"{len(s.get('anomalies', ()))} warnings/errors, {s.get('infos', 0)} infos")
        for severity, rule, symptom, where in s.get("anomalies", ()):
            lines.append(f"    {severity} [{rule}] {with_where(symptom, where)}")
        for line in s.get("drift", ()):
            lines.append(f"    {line}")
        if verbose and s["residual_std"]:
            lines.append(f"    residual std by layer {sparkline(s['residual_std'])} "
                         f"({s['residual_std'][0]:.3g} .. {s['residual_std'][-1]:.3g})")
    for action, path in written:
        lines.append(f"golden {action}: {path}")
    return lines
