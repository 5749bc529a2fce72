"""Rendering comparison results as text for a CI log: what broke first, a capped table, the remedy."""

from __future__ import annotations

from typing import Mapping, Sequence

from .calibrate import summary as calibration_summary
from .compare import Comparison, Mismatch

MAX_ROWS = 20
_ENV_KEYS = ("torch", "device", "device_name", "cpu_capability", "dtype", "autocast", "matmul_precision",
             "threads", "stats_path", "platform")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(headers)] + [line(r) for r in rows]


def _in_bands(m: Mismatch) -> str:
    if m.band is None or m.difference is None:
        return "-"
    if m.band == 0:
        return "no noise" if m.difference else "0"
    return f"{m.difference / m.band:.3g}"


def mismatch_row(m: Mismatch, calibrated: bool = False) -> list[str]:
    section = {"forward": "fwd", "stage_grads": "grad", "param_grads": "param", "loss": "loss"}[m.section]
    row = [str(m.iteration), section, m.stage, m.stat, _fmt(m.golden), _fmt(m.obtained),
           _fmt(m.difference), _fmt(m.allowed)]
    if calibrated:
        row += [_fmt(m.band), _in_bands(m)]
    return row


def headers(calibrated: bool) -> list[str]:
    out = ["iter", "pass", "stage", "stat", "golden", "obtained", "difference", "allowed"]
    return out + (["band", "x band"] if calibrated else [])


def environment_line(name: str, env: Mapping) -> str:
    parts = [f"{k} {env[k]}" for k in _ENV_KEYS if k in env]
    return f"{name}: " + (", ".join(parts) if parts else "not recorded")


def traced_tensors(comparison: Comparison) -> int:
    """How many tensors the traces record: forward stages, stage and parameter gradients, and the loss,
    each counted once however many iterations it appears in; the unit the headline counts in."""
    keys = set()
    for trace in (comparison.golden, comparison.obtained):
        for it in trace.iterations:
            for section in ("forward", "stage_grads", "param_grads"):
                keys.update((section, name) for name in getattr(it, section))
            if it.loss is not None:
                keys.add(("loss", "loss"))
    return len(keys | set(comparison.distinct_stages))


def out_of_tolerance(comparison: Comparison) -> str:
    """'75 of 120 traced tensors out of tolerance': the count, and what it counts."""
    total = traced_tensors(comparison)
    return f"{len(comparison.distinct_stages)} of {total} traced tensor{'s' if total != 1 else ''} out of tolerance"


def render_comparison(comparison: Comparison, *, golden_name: str, obtained_name: str | None = None,
                      accept_command: str | None = None, max_rows: int = MAX_ROWS) -> list[str]:
    """Lines of the failure report; the first says how many traced tensors differ and where it starts."""
    if comparison.ok:
        worst = f"; {comparison.worst.describe()}" if comparison.worst else ""
        return [f"trace matches {golden_name} (profile {comparison.profile.name}){worst}"]
    calibrated = comparison.profile.calibrated
    first = comparison.first
    n_tensors, n_pairs = len(comparison.distinct_stages), len(comparison.stages_differing)
    across = f" in {n_pairs} tensor-iterations" if n_pairs != n_tensors else ""
    lines = [
        f"{out_of_tolerance(comparison)}{across} "
        f"(profile {comparison.profile.name}); first divergence: {first.where}, {first.stat}",
        f"golden: {golden_name}",
    ]
    rows = [mismatch_row(m, calibrated) for m in comparison.mismatches[:max_rows]]
    lines += table(headers(calibrated), rows)
    more = len(comparison.mismatches) - len(rows)
    if more > 0:
        lines.append(f"  (+{more} more: gpttrace diff GOLDEN OBTAINED lists them all)")
    lines.append(environment_line("golden environment", comparison.golden.environment))
    lines.append(environment_line("obtained environment", comparison.obtained.environment))
    if comparison.golden.calibration is not None:
        lines.append(f"golden calibration: {calibration_summary(comparison.golden.calibration)}")
    if obtained_name:
        lines.append(f"obtained trace written to {obtained_name}")
    if accept_command:
        lines.append(f"if the change is intended, accept it: {accept_command}")
    return lines


def render_drift(comparison: Comparison, *, max_rows: int = 5) -> list[str]:
    """How far an old golden lay from the new run, worst rows first, in units of the old band:
    an intended change reads as thousands of bands, a drifted machine as a few."""
    if comparison.ok:
        return ["the old golden matched the new run"]
    def severity(m: Mismatch) -> float:
        if m.difference is None or not m.allowed:
            return float("inf")  # a shape, presence, NaN or zero-ness change, or no allowance at all
        return m.difference / m.allowed

    ranked = sorted(comparison.mismatches, key=lambda m: -severity(m))
    total = traced_tensors(comparison)
    first = comparison.first
    unit = "x band" if comparison.profile.calibrated else "x allowed"
    lines = [f"the old golden differs in {len(comparison.distinct_stages)} of {total} traced "
             f"tensor{'s' if total != 1 else ''} "
             f"(profile {comparison.profile.name}), first at {first.where}, {first.stat}; worst rows:"]
    rows = []
    for m in ranked[:max_rows]:
        row = mismatch_row(m, comparison.profile.calibrated)
        if not comparison.profile.calibrated:
            ratio = m.difference / m.allowed if m.difference is not None and m.allowed else None
            row.append("-" if ratio is None else f"{ratio:.3g}")
        rows.append(row)
    lines += table(headers(comparison.profile.calibrated) + ([] if comparison.profile.calibrated else [unit]), rows)
    return lines
