"""Rendering comparison results as text for a CI log: what broke first, a capped table, the remedy.

A failure lists the stages that fired otherwise than in the golden (``stage X missing in iteration
1``, ``fired twice``: the comparison's coverage findings) apart from the numeric table, and notes
the obtained trace's own coverage: selected stages that never fired, gradients not recorded.

Every text a golden check shows lives here: ``failure_lines`` renders a ``GoldenResult`` into the
assertion message, ``summary_outcome`` into its part of the terminal summary, ``drift_lines`` and
``calibration_note`` what an update reports; ``anomaly_failure_lines`` the anomalies that fail a test.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .anomalies import ERROR, INFO, WARNING, Anomaly
from .calibrate import summary as calibration_summary
from .compare import LOSS, Comparison, CoverageFinding, Mismatch
from .errors import TraceFormatError
from .outcome import WRITTEN, Band, GoldenResult, GoldenStatus
from .trace import STAGE_SECTIONS, EnvKey, Section, Trace

MAX_ROWS = 20
_SECTION_ABBREVIATIONS = {Section.FORWARD: "fwd", Section.STAGE_GRADS: "grad", Section.PARAM_GRADS: "param",
                          Section.LOSS: "loss"}
_ENV_KEYS = (EnvKey.TORCH, EnvKey.DEVICE, EnvKey.DEVICE_NAME, EnvKey.CPU_CAPABILITY, EnvKey.DTYPE,
             EnvKey.AUTOCAST, EnvKey.MATMUL_PRECISION, EnvKey.THREADS, EnvKey.STATS_PATH, EnvKey.PLATFORM)


def _fmt(value: object) -> str:
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

    def line(cells: Sequence[str]) -> str:
        return indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _in_bands(m: Mismatch) -> str:
    if m.band is None or m.difference is None:
        return "-"
    if m.band == 0:
        return "no noise" if m.difference else "0"
    return f"{m.difference / m.band:.3g}"


def mismatch_row(m: Mismatch, calibrated: bool = False) -> list[str]:
    section = _SECTION_ABBREVIATIONS[m.section]
    row = [str(m.iteration), section, m.stage, m.stat, _fmt(m.golden), _fmt(m.obtained),
           _fmt(m.difference), _fmt(m.allowed)]
    if calibrated:
        row += [_fmt(m.band), _in_bands(m)]
    return row


def headers(calibrated: bool) -> list[str]:
    out = ["iter", "pass", "stage", "stat", "golden", "obtained", "difference", "allowed"]
    return out + (["band", "x band"] if calibrated else [])


def environment_line(name: str, env: Mapping[str, Any]) -> str:
    parts = [f"{k} {env[k]}" for k in _ENV_KEYS if k in env]
    return f"{name}: " + (", ".join(parts) if parts else "not recorded")


def traced_tensors(comparison: Comparison) -> int:
    """How many tensors the traces record: forward stages, stage and parameter gradients, and the loss,
    each counted once however many iterations it appears in; the unit the headline counts in."""
    keys: set[tuple[str, str]] = set()
    for trace in (comparison.golden, comparison.obtained):
        for it in trace.iterations:
            for section in STAGE_SECTIONS:
                keys.update((section, name) for name in it.section(section))
            if it.loss is not None:
                keys.add((Section.LOSS, LOSS))
    return len(keys | set(comparison.distinct_stages))


def out_of_tolerance(comparison: Comparison) -> str:
    """'75 of 120 traced tensors out of tolerance': the count, and what it counts."""
    total = traced_tensors(comparison)
    return f"{len(comparison.distinct_stages)} of {total} traced tensor{'s' if total != 1 else ''} out of tolerance"


def coverage_lines(comparison: Comparison, max_rows: int = MAX_ROWS) -> list[str]:
    """The stages that fired otherwise than in the golden, one line each (capped), then the obtained
    trace's notes: selected stages that never fired, gradients that could not be recorded."""
    differ = [f for f in comparison.coverage if f.golden is not None]
    never: list[CoverageFinding] = [f for f in comparison.coverage if f.golden is None]
    lines = []
    if differ:
        lines.append("stages that fired otherwise than in the golden (coverage, not numeric differences):")
        lines += [f"  {f.message}" for f in differ[:max_rows]]
        if len(differ) > max_rows:
            lines.append(f"  (+{len(differ) - max_rows} more)")
    if never:
        lines.append(f"selected but never fired in the obtained run: {_names(f.stage for f in never)}")
    no_grad = comparison.obtained.coverage.no_grad
    if no_grad:
        lines.append(f"gradients not recorded (computed under no_grad, recomputed in the backward: a reentrant "
                     f"checkpoint): {_names(no_grad)}")
    return lines


def granularity_lines(comparison: Comparison) -> list[str]:
    """A line when the two traces' stages were chosen otherwise (taps / modules / ops): their stage
    lists cannot line up, whatever the numbers."""
    def grain(trace: Trace) -> str | None:
        value = trace.environment.get(EnvKey.GRANULARITY)
        return str(value).split(" ", 1)[0] if value else None

    golden, obtained = grain(comparison.golden), grain(comparison.obtained)
    if golden is None or obtained is None or golden == obtained:
        return []
    if str(comparison.obtained.environment.get("compiled", "")).startswith("traced compiled"):
        how = (f"a compiled model is traced at {obtained}: record the eager golden at {obtained} "
               f"(granularity={obtained!r}; at 'ops' the compiled model would run eagerly)")
    else:
        how = f"trace both at one granularity (granularity={golden!r} in the marker, or record the golden again)"
    return [f"the golden's stages are {golden}, this run's {obtained}: their stage lists differ by design; {how}"]


def _names(names: Iterable[str], limit: int = 6) -> str:
    listed = list(names)
    shown = ", ".join(listed[:limit])
    return shown + (f" (+{len(listed) - limit} more)" if len(listed) > limit else "")


def render_comparison(comparison: Comparison, *, golden_name: str, obtained_name: str | None = None,
                      accept_line: str | None = None, max_rows: int = MAX_ROWS,
                      obtained_line: str | None = None, more_hint: str | None = None) -> list[str]:
    """Lines of the failure report; the first says how many traced tensors differ and where it starts."""
    if comparison.ok:
        worst = f"; {comparison.worst.describe()}" if comparison.worst else ""
        return [f"trace matches {golden_name} (profile {comparison.profile.name}){worst}"]
    calibrated = comparison.profile.calibrated
    first = comparison.first
    assert first is not None  # not ok: there is a mismatch
    n_tensors, n_pairs = len(comparison.distinct_stages), len(comparison.stages_differing)
    across = f" in {n_pairs} tensor-iterations" if n_pairs != n_tensors else ""
    lines = [
        f"{out_of_tolerance(comparison)}{across} "
        f"(profile {comparison.profile.name}); first divergence: {first.where}, {first.stat}",
        f"golden: {golden_name}",
    ]
    lines += granularity_lines(comparison)
    lines += coverage_lines(comparison, max_rows)
    rows = [mismatch_row(m, calibrated) for m in comparison.mismatches[:max_rows]]
    lines += table(headers(calibrated), rows)
    more = len(comparison.mismatches) - len(rows)
    if more > 0:
        hint = more_hint or f"gpttrace diff {golden_name} {obtained_name or 'OBTAINED'} lists them all"
        lines.append(f"  (+{more} more: {hint})")
    lines.append(environment_line("golden environment", comparison.golden.environment))
    lines.append(environment_line("obtained environment", comparison.obtained.environment))
    if comparison.golden.calibration is not None:
        lines.append(f"golden calibration: {calibration_summary(comparison.golden.calibration)}")
    if obtained_line or obtained_name:
        lines.append(obtained_line or f"obtained trace written to {obtained_name}")
    if accept_line:
        lines.append(accept_line)
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
    assert first is not None  # not ok: there is a mismatch
    unit = "x band" if comparison.profile.calibrated else "x allowed"
    lines = [f"the old golden differs in {len(comparison.distinct_stages)} of {total} traced "
             f"tensor{'s' if total != 1 else ''} "
             f"(profile {comparison.profile.name}), first at {first.where}, {first.stat}; worst rows:"]
    rows: list[list[str]] = []
    for m in ranked[:max_rows]:
        row = mismatch_row(m, comparison.profile.calibrated)
        if not comparison.profile.calibrated:
            ratio = m.difference / m.allowed if m.difference is not None and m.allowed else None
            row.append("-" if ratio is None else f"{ratio:.3g}")
        rows.append(row)
    lines += table(headers(comparison.profile.calibrated) + ([] if comparison.profile.calibrated else [unit]), rows)
    return lines


# --------------------------------------------------------------------------- a golden check's outcome
def _not_written(result: GoldenResult) -> str:
    """Why a failure's obtained trace is not on disk."""
    error = result.obtained_error
    filename = getattr(error, "filename", None)
    cause = getattr(error, "strerror", None) or str(error)
    return f"obtained trace not written to {result.shown(Path(filename)) if filename else 'the results folder'}: {cause}"


def update_command(result: GoldenResult) -> str:
    """The command that records this test's golden again."""
    return f"{result.command} --update-golden '{result.nodeid}'"


def _malformed(error: object) -> str:
    """A golden's read error as ``at JSON-PATH: what`` (or ``at line N: what``), the file left out."""
    if isinstance(error, TraceFormatError):
        return (f"at {error.path}: " if error.path else "") + error.detail
    return str(error)


def failure_lines(result: GoldenResult) -> list[str]:
    """The assertion message of a golden check that failed: what is wrong, where the obtained trace
    went, and the command that fixes it. Empty for a check that passed."""
    golden, status = result.shown(result.golden_path), result.status
    obtained = result.shown(result.obtained_path) if result.obtained_path is not None else None
    written = f"obtained trace written to {obtained}" if obtained is not None else _not_written(result)
    if status is GoldenStatus.MISSING:
        return [f"golden trace missing: {golden}", written, f"create it: {update_command(result)}"]
    if status is GoldenStatus.MALFORMED:
        return [f"malformed golden trace {golden}: {_malformed(result.error)}", written,
                f"fix the file, or regenerate it: {update_command(result)}"]
    if status is GoldenStatus.OTHER_CONFIG:
        return [f"golden trace {golden} is of another model config: {result.reason}", written,
                f"if the config change is intended: {update_command(result)}"]
    if status is GoldenStatus.NOT_COMPARABLE:
        return [f"golden trace {golden} cannot be compared: {result.reason}", written]
    if status is GoldenStatus.DIFFERS and result.comparison is not None:
        report = not result.comparison.golden.provenance.complete
        accept = ("this golden is a report (it lists a selection of the trace): edit it by hand, or record "
                  "a JSON golden by naming a .json file in golden=" if report
                  else f"if the change is intended, accept it: {update_command(result)}")
        return render_comparison(result.comparison, golden_name=golden, obtained_name=obtained,
                                 accept_line=accept, obtained_line=written)
    if status is GoldenStatus.REPORT_KEPT:
        if not result.golden_path.exists():
            return [f"golden {golden} (named by golden=) is a Markdown report, and --update-golden writes "
                    "JSON goldens only: reports are written by a person",
                    "to record a golden for this test, drop golden= or name a .json file"]
        return [f"golden {golden} is a report that lists a selection of the trace (named by golden=): "
                "--update-golden does not overwrite it",
                "to record a golden for this test, drop golden= or name a .json file"]
    if status is GoldenStatus.WRITE_ERROR:
        target = result.write_target or result.golden_path
        what = "golden trace" if target == result.golden_path else "trace"
        cause = getattr(result.error, "strerror", None) or str(result.error)
        return [f"cannot write {what} {result.shown(target)}: {cause}"]
    return []


def drift_lines(result: GoldenResult) -> list[str]:
    """Update mode: how far the golden that was rewritten lay from the new run (nothing when it matched)."""
    if result.status in WRITTEN and result.comparison is not None and not result.comparison.ok:
        return render_drift(result.comparison)
    return []


def calibration_note(band: Band | None) -> str | None:
    """What the band of a golden recorded in update mode is made of; None when it has none."""
    if band is None:
        return None
    if not band.usable:
        return ("NOT calibrated, no usable replay: " + calibration_summary(band.calibration) +
                "; written without a band (compared under exact)")
    return calibration_summary(band.calibration) + (
        f", measured in {band.seconds:.1f} s" if band.seconds is not None else "")


def summary_outcome(result: GoldenResult | None) -> str:
    """The golden check's part of a test's summary line, the golden named once: what was written,
    how much is out of tolerance, or what is wrong with the golden."""
    if result is None:
        return "not compared, no golden"
    golden, status = result.shown(result.golden_path), result.status
    if status in WRITTEN:
        note = calibration_note(result.band)
        return f"golden {status.value}: {golden}" + (f" ({note})" if note else "")
    if status in (GoldenStatus.MATCH, GoldenStatus.DIFFERS):
        comparison = result.comparison
        if comparison is None:  # update mode: an incomparable golden already held these very bytes
            return f"0 out of tolerance, golden {golden}"
        counted = out_of_tolerance(comparison)
        if comparison.ok and comparison.worst is not None:
            counted += f" ({comparison.profile.name}; {comparison.worst.describe()})"
        return f"{counted}, golden {golden}"
    if status is GoldenStatus.REPLAY_WRITTEN:
        return f"not compared (a calibration replay), golden {golden}"
    target = result.write_target
    if status is GoldenStatus.WRITE_ERROR and target is not None and target != result.golden_path:
        return f"obtained trace not written: {result.shown(target)}, golden {golden}"
    what = {
        GoldenStatus.MISSING: "golden missing",
        GoldenStatus.MALFORMED: "golden malformed",
        GoldenStatus.OTHER_CONFIG: "golden of another config",
        GoldenStatus.NOT_COMPARABLE: "golden not comparable",
        GoldenStatus.REPORT_KEPT: "golden not updated (a report named by golden=)",
        GoldenStatus.WRITE_ERROR: "golden not written",
    }[status]
    return f"{what}: {golden}"


def anomaly_failure_lines(blocking: Sequence[Anomaly]) -> list[str]:
    """The anomalies whose errors fail a traced test: a headline, each with cause and fix, the way out."""
    return [
        f"{len(blocking)} anomal{'y' if len(blocking) == 1 else 'ies'} in the trace: {blocking[0].symptom}",
        *anomaly_lines(blocking, include_info=False),
        "to accept a rule for this test: @pytest.mark.gpt_trace(allow=[\"RULE\"]), or ini gpt_trace_allow",
    ]


def anomaly_lines(anomalies: Sequence[Anomaly], *, include_info: bool = True) -> list[str]:
    """Grouped by severity, most important first; one line per anomaly, then its cause and fix."""
    lines = []
    for sev in (ERROR, WARNING, INFO):
        group = [a for a in anomalies if a.severity == sev]
        if not group or (sev == INFO and not include_info):
            continue
        lines.append(f"{len(group)} {sev}{'s' if len(group) != 1 else ''}:")
        for a in group:
            lines.append(f"  [{a.rule}] {a.located}")
            lines.append(f"      likely cause: {a.cause}")
            lines.append(f"      fix: {a.fix}")
    return lines or ["no anomalies"]
