"""The ``gpt-trace`` section of pytest's terminal summary, from the per-test summaries (plain data:
they cross processes under xdist).

``summarize`` makes a test's summary where the test ran, from its trace, its golden check's
``GoldenResult`` and its anomalies; ``summary_lines`` renders the summaries the controller gathered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from .anomalies import INFO, Anomaly, with_where
from .outcome import GoldenResult
from .report import drift_lines, summary_outcome
from .trace import Trace

BARS = "▁▂▃▄▅▆▇█"


class TracedTestSummary(TypedDict):
    """One traced test's line (and the lines under it) in the terminal summary."""

    nodeid: str
    stages: int
    iterations: int
    loss: tuple[float, float] | None            # first and last loss; None: none recorded
    status: str | None                          # the golden check's ``GoldenStatus`` value; None: no check
    outcome: str                                # the golden check's words (``report.summary_outcome``)
    golden: str | None                          # the golden file as the user reads it; None: no check
    residual_std: list[float]                   # the residual stream's std by layer, iteration 0
    drift: list[str]                            # update mode: how far the rewritten golden lay from the run
    anomalies: list[tuple[str, str, str, str]]  # (severity, rule, symptom, where) of warnings and errors
    infos: int                                  # how many infos were left out


def summarize(nodeid: str, trace: Trace, result: GoldenResult | None,
              anomalies: Sequence[Anomaly]) -> TracedTestSummary:
    """A traced test's summary; ``result`` is its golden check's (None when it compared nothing)."""
    losses = [it.loss for it in trace.iterations if it.loss is not None]
    resid = [s.std for name, s in (trace.iterations[0].forward.items() if trace.iterations else [])
             if name.endswith("mlp_resid") and s.std is not None]
    return {
        "nodeid": nodeid,
        "stages": len(trace.stage_names),
        "iterations": len(trace.iterations),
        "loss": (losses[0], losses[-1]) if losses else None,
        "status": result.status.value if result is not None else None,
        "outcome": summary_outcome(result),
        "golden": result.shown(result.golden_path) if result is not None else None,
        "residual_std": resid,
        "drift": drift_lines(result) if result is not None else [],
        "anomalies": [(a.severity.value, a.rule, a.symptom, a.where) for a in anomalies if a.severity != INFO],
        "infos": sum(1 for a in anomalies if a.severity == INFO),
    }


def sparkline(values: Sequence[float]) -> str:
    """One bar per value, scaled from the smallest to the largest; flat values give a flat line."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return BARS[3] * len(values)
    return "".join(BARS[min(7, int((v - lo) / (hi - lo) * 7.999))] for v in values)


def summary_lines(summaries: Sequence[TracedTestSummary], written: Sequence[tuple[str, str]], *,
                  verbose: bool) -> list[str]:
    """One line per traced test (then its anomalies, drift and, when verbose, the residual std by
    layer), then one line per golden written."""
    lines = []
    for s in summaries:
        loss = f"loss {s['loss'][0]:.6f} -> {s['loss'][1]:.6f}" if s["loss"] else "no loss"
        lines.append(f"{s['nodeid']}: {s['stages']} stages, {s['iterations']} iterations, {loss}, {s['outcome']}, "
                     f"{len(s['anomalies'])} warnings/errors, {s['infos']} infos")
        for severity, rule, symptom, where in s["anomalies"]:
            lines.append(f"    {severity} [{rule}] {with_where(symptom, where)}")
        for line in s["drift"]:
            lines.append(f"    {line}")
        if verbose and s["residual_std"]:
            lines.append(f"    residual std by layer {sparkline(s['residual_std'])} "
                         f"({s['residual_std'][0]:.3g} .. {s['residual_std'][-1]:.3g})")
    for action, path in written:
        lines.append(f"golden {action}: {path}")
    return lines
