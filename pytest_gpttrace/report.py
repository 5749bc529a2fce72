"""Rendering comparison results as text for a CI log: what broke first, a capped table, the remedy."""

from __future__ import annotations

from typing import Mapping, Sequence

from .compare import Comparison, Mismatch

MAX_ROWS = 20
_ENV_KEYS = ("torch", "device", "dtype", "threads", "stats_path", "platform")


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


def mismatch_row(m: Mismatch) -> list[str]:
    section = {"forward": "fwd", "stage_grads": "grad", "param_grads": "param", "loss": "loss"}[m.section]
    return [str(m.iteration), section, m.stage, m.stat, _fmt(m.golden), _fmt(m.obtained),
            _fmt(m.difference), _fmt(m.allowed)]


def environment_line(name: str, env: Mapping) -> str:
    parts = [f"{k} {env[k]}" for k in _ENV_KEYS if k in env]
    return f"{name}: " + (", ".join(parts) if parts else "not recorded")


def render_comparison(comparison: Comparison, *, golden_name: str, obtained_name: str | None = None,
                      accept_command: str | None = None, max_rows: int = MAX_ROWS) -> list[str]:
    """Lines of the failure report; the first says how many stages differ and where it starts."""
    if comparison.ok:
        return [f"trace matches {golden_name} (profile {comparison.profile.name})"]
    first = comparison.first
    n_stages, n_pairs = len(comparison.distinct_stages), len(comparison.stages_differing)
    across = f" in {n_pairs} stage-iterations" if n_pairs != n_stages else ""
    lines = [
        f"{n_stages} stage{'s' if n_stages != 1 else ''} out of tolerance{across} "
        f"(profile {comparison.profile.name}); first divergence: {first.where}, {first.stat}",
        f"golden: {golden_name}",
    ]
    rows = [mismatch_row(m) for m in comparison.mismatches[:max_rows]]
    lines += table(["iter", "pass", "stage", "stat", "golden", "obtained", "difference", "allowed"], rows)
    more = len(comparison.mismatches) - len(rows)
    if more > 0:
        lines.append(f"  (+{more} more)")
    lines.append(environment_line("golden environment", comparison.golden.environment))
    lines.append(environment_line("obtained environment", comparison.obtained.environment))
    if obtained_name:
        lines.append(f"obtained trace written to {obtained_name}")
    if accept_command:
        lines.append(f"if the change is intended, accept it: {accept_command}")
    return lines
