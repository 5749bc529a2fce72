"""pytest adapter of pytest-gpttrace: options, ini keys, the marker, fixtures and report hooks.

Only pytest glue lives here; the logic is in plain modules of this package. torch is imported
only by the fixtures, so a session that traces nothing does not pay for it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MARKER = "gpt_trace"
SKIP_REASON = "GPT trace test: run it with `pytest --gpt-trace` (or add --gpt-trace to addopts)"
_PROPERTY = "gpt_trace_summary"
_UPDATED = "gpt_trace_golden_written"
_MARKER_KEYS = ("iterations", "seed", "profile", "tolerances", "stages", "micro_steps", "allow", "thresholds")


@dataclass
class _Settings:
    enabled: bool
    update: bool
    golden_dir: Path
    results_dir: Path
    report_dir: Path | None
    profile: str
    tolerances: list
    iterations: int
    recalibrate: bool
    calibration: bool
    dithers: int
    replay: dict | None
    allow: list
    thresholds: dict
    rootdir: Path
    summaries: list = field(default_factory=list)
    written: list = field(default_factory=list)


_SETTINGS = pytest.StashKey[_Settings]()
_TRACE = pytest.StashKey[object]()
_GOLDEN = pytest.StashKey[object]()


# --------------------------------------------------------------------------- options
def pytest_addoption(parser):
    group = parser.getgroup("gpt-trace", "GPT numerics traces (pytest-gpttrace)")
    group.addoption("--gpt-trace", action="store_true", default=None,
                    help="run the tests that trace a GPT (gpt_trace fixture or marker) and compare them "
                         "with their golden traces; without it they are skipped (ini: gpt_trace)")
    group.addoption("--update-golden", action="store_true", default=False,
                    help="implies --gpt-trace: write missing golden traces and rewrite those that no longer "
                         "match; refused when the CI environment variable is set")
    group.addoption("--gpt-trace-recalibrate", action="store_true", default=False,
                    help="implies --update-golden: record every golden again with a freshly measured noise "
                         "band, also those that still match")
    group.addoption("--gpt-trace-golden-dir", metavar="DIR", default=None,
                    help="where golden traces live (default: golden/ at rootdir; ini: gpt_trace_golden_dir)")
    group.addoption("--gpt-trace-results-dir", metavar="DIR", default=None,
                    help="where obtained traces of failing tests are written "
                         "(default: .gpttrace-results/ at rootdir; ini: gpt_trace_results_dir)")
    group.addoption("--gpt-trace-report", metavar="DIR", default=None,
                    help="also write every traced test's Markdown report and JSON trace to DIR (for CI artifacts)")
    group.addoption("--gpt-trace-profile", metavar="NAME", default=None,
                    help="tolerance profile: auto (default: calibrated for a golden with a noise band, exact "
                         "for one without), calibrated, exact or statistical (ini: gpt_trace_profile)")
    parser.addini("gpt_trace", type="bool", default=False, help="run GPT trace tests without --gpt-trace")
    parser.addini("gpt_trace_golden_dir", default="golden", help="golden trace folder, relative to rootdir")
    parser.addini("gpt_trace_results_dir", default=".gpttrace-results",
                  help="obtained traces of failing tests, relative to rootdir")
    parser.addini("gpt_trace_profile", default="auto",
                  help="tolerance profile: auto, calibrated, exact or statistical")
    parser.addini("gpt_trace_calibration", type="bool", default=True,
                  help="record goldens with their noise band (replays under platform variants); "
                       "false writes uncalibrated goldens, compared under exact")
    parser.addini("gpt_trace_dithers", default="2",
                  help="dithered replays per calibration, beside the ISA caps and the thread count (default 2)")
    parser.addini("gpt_trace_iterations", default="3", help="traced iterations per test (default 3)")
    parser.addini("gpt_trace_allow", type="linelist", default=[],
                  help="anomaly rule ids whose errors do not fail tests (they are still reported)")
    parser.addini("gpt_trace_thresholds", type="linelist", default=[],
                  help="anomaly thresholds, one 'name = value' per line (see the README's rule table)")
    parser.addini("gpt_trace_tolerances", type="linelist", default=[],
                  help="tolerance overrides, one per line: 'STAGE_GLOB STAT_GLOB atol=X rtol=Y [rms_atol=Z]' "
                       "or 'STAGE_GLOB STAT_GLOB skip'")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"{MARKER}(iterations=3, seed=42, profile=None, tolerances=None, stages=None, micro_steps=1, "
        "allow=(), thresholds=None): "
        "a GPT numerics trace test; see pytest-gpttrace's README",
    )
    from .anomalies import RULES, parse_thresholds
    from .compare import AUTO, PROFILES, overrides_from_lines
    from .replay import replay_spec

    recalibrate = bool(config.getoption("gpt_trace_recalibrate"))
    update = config.getoption("update_golden") or recalibrate
    try:
        replay = replay_spec()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if update and os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        raise pytest.UsageError(
            "--update-golden is refused because CI is set: CI never rewrites its own expectations. "
            "Update the goldens locally and commit them."
        )
    enabled = bool(update or replay or config.getoption("gpt_trace") or config.getini("gpt_trace"))
    profile = config.getoption("gpt_trace_profile") or config.getini("gpt_trace_profile")
    if profile not in PROFILES and profile != AUTO:
        raise pytest.UsageError(f"--gpt-trace-profile / gpt_trace_profile: unknown profile {profile!r}; "
                                f"choose one of {', '.join([AUTO, *PROFILES])}")
    dithers = _ini_int(config, "gpt_trace_dithers", minimum=0)
    try:
        tolerances = overrides_from_lines(config.getini("gpt_trace_tolerances"))
    except ValueError as exc:
        raise pytest.UsageError(f"ini gpt_trace_tolerances: {exc}") from None
    iterations = _ini_int(config, "gpt_trace_iterations", minimum=1)
    allow = list(config.getini("gpt_trace_allow"))
    unknown = [r for r in allow if r not in RULES]
    if unknown:
        raise pytest.UsageError(f"ini gpt_trace_allow: unknown rule {', '.join(unknown)}; known: {', '.join(RULES)}")
    try:
        thresholds = parse_thresholds(config.getini("gpt_trace_thresholds"))
    except ValueError as exc:
        raise pytest.UsageError(f"ini gpt_trace_thresholds: {exc}") from None
    rootdir = Path(config.rootpath)

    def folder(option, ini):
        value = config.getoption(option) or config.getini(ini)
        return (rootdir / value) if not Path(value).is_absolute() else Path(value)

    report = config.getoption("gpt_trace_report")
    golden_dir = folder("gpt_trace_golden_dir", "gpt_trace_golden_dir")
    results_dir = folder("gpt_trace_results_dir", "gpt_trace_results_dir")
    report_dir = Path(report).resolve() if report else None
    from .folders import folder_conflict

    conflict = folder_conflict(golden_dir, "--gpt-trace-golden-dir / gpt_trace_golden_dir", [
        ("--gpt-trace-report", report_dir), ("--gpt-trace-results-dir / gpt_trace_results_dir", results_dir)], rootdir)
    if conflict:
        raise pytest.UsageError(conflict)
    settings = config.stash[_SETTINGS] = _Settings(
        enabled=enabled,
        update=bool(update),
        golden_dir=golden_dir,
        results_dir=results_dir,
        report_dir=report_dir,
        profile=profile,
        tolerances=tolerances,
        iterations=iterations,
        recalibrate=recalibrate,
        calibration=bool(config.getini("gpt_trace_calibration")),
        dithers=dithers,
        replay=replay,
        allow=allow,
        thresholds=thresholds,
        rootdir=rootdir,
    )
    config.pluginmanager.register(_Collector(settings), "gpt-trace-collector")


def _ini_int(config, name: str, minimum: int) -> int:
    raw = config.getini(name)
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        what = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise pytest.UsageError(f"ini {name}: expected {what}, got {raw!r}")
    return value


def _is_trace_test(item) -> bool:
    fixtures = getattr(item, "fixturenames", ())
    return item.get_closest_marker(MARKER) is not None or "gpt_trace" in fixtures or "gpt_golden" in fixtures


def pytest_collection_modifyitems(config, items):
    if config.stash[_SETTINGS].enabled:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if _is_trace_test(item):
            item.add_marker(skip)


# --------------------------------------------------------------------------- fixtures
def _bad_marker(message: str):
    """A marker argument that cannot work: this test errors with the message alone (no traceback)."""
    pytest.fail(message, pytrace=False)


def _seed_everything(seed: int) -> None:
    import random

    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Seed torch, random and numpy before a traced test's fixtures build the model: a user model
    initialised from the global RNG then starts the same on every run (and matches its golden)."""
    if _SETTINGS not in item.config.stash or "gpt_trace" not in getattr(item, "fixturenames", ()):
        return
    marker = item.get_closest_marker(MARKER)
    try:
        seed = int((marker.kwargs if marker else {}).get("seed", 42))
    except (TypeError, ValueError):
        return  # the gpt_seed fixture reports it
    _seed_everything(seed)


def _marker_kwargs(request) -> dict:
    marker = request.node.get_closest_marker(MARKER)
    kwargs = dict(marker.kwargs) if marker else {}
    unknown = set(kwargs) - set(_MARKER_KEYS)
    if unknown or (marker and marker.args):
        _bad_marker(
            f"{request.node.nodeid}: @pytest.mark.{MARKER} takes keyword arguments "
            f"{', '.join(_MARKER_KEYS)}; got {', '.join(sorted(unknown)) or 'positional arguments'}"
        )
    return kwargs


@pytest.fixture
def gpt_config():
    """The model config; default: the seed config (depth 4, d 256, 2 heads, V 65536, T 1024)."""
    from reference_model import GPTConfig

    return GPTConfig.from_depth(4)


@pytest.fixture
def gpt_seed(request) -> int:
    """Init and data seed: the marker's seed=, else 42. torch, random and numpy are seeded with it
    before the model is built and again before the training loop."""
    seed = _marker_kwargs(request).get("seed", 42)
    try:
        return int(seed)
    except (TypeError, ValueError):
        _bad_marker(f"{request.node.nodeid}: @pytest.mark.{MARKER}(seed={seed!r}): expected an integer")


@pytest.fixture
def gpt_model(gpt_config, gpt_seed):
    """The reference GPT, seeded. Override this fixture to trace your own model."""
    from reference_model import GPT

    return GPT(gpt_config, seed=gpt_seed)


@pytest.fixture
def gpt_batches(gpt_config, gpt_seed):
    """An iterator of (idx, targets) batches; default: the reference model's synthetic batches."""
    from reference_model import synthetic_batches

    return synthetic_batches(gpt_config, seed=gpt_seed)


@pytest.fixture
def gpt_optimizers(gpt_model):
    """The reference optimizers for the reference GPT; AdamW(lr=1e-3) for any other model."""
    import torch

    from reference_model import GPT, optimizers

    if isinstance(gpt_model, GPT):
        return optimizers(gpt_model)
    return [torch.optim.AdamW(gpt_model.parameters(), lr=1e-3)]


@pytest.fixture
def gpt_trace(request, gpt_seed, gpt_model, gpt_batches, gpt_optimizers):
    """Runs the marked number of instrumented training iterations and returns the Trace."""
    from .tracer import trace_training

    settings = request.config.stash[_SETTINGS]
    kwargs = _marker_kwargs(request)
    try:
        _anomaly_settings(request.node)  # a bad allow=/thresholds= fails here, not in the report hook
    except ValueError as exc:
        _bad_marker(f"{request.node.nodeid}: @pytest.mark.{MARKER}: {exc}")
    from .replay import variant_applied

    _seed_everything(gpt_seed)  # the loop's own randomness (dropout, sampled batches) repeats too
    with variant_applied(settings.replay or {}):  # a calibration replay's variant; nothing otherwise
        trace = trace_training(
            gpt_model, gpt_batches, gpt_optimizers,
            iterations=int(kwargs.get("iterations", settings.iterations)),
            micro_steps=int(kwargs.get("micro_steps", 1)),
            stages=kwargs.get("stages"),
        )
    request.node.stash[_TRACE] = trace
    if settings.report_dir is not None and not settings.replay:  # a replay's trace is not the run's report
        _write_report(settings, request.node.nodeid, trace)
    return trace


@pytest.fixture
def gpt_golden(request):
    """This test's golden trace: ``assert gpt_trace == gpt_golden``."""
    from .compare import AUTO, get_profile
    from .golden import GoldenTrace

    settings = request.config.stash[_SETTINGS]
    kwargs = _marker_kwargs(request)
    profile = kwargs.get("profile") or settings.profile
    if profile != AUTO:
        try:
            get_profile(profile)
        except ValueError as exc:
            _bad_marker(f"{request.node.nodeid}: {exc}")
    overrides = list(settings.tolerances) + _marker_tolerances(request, kwargs.get("tolerances"))
    golden = GoldenTrace(
        nodeid=request.node.nodeid,
        golden_dir=settings.golden_dir,
        results_dir=settings.results_dir,
        rootdir=settings.rootdir,
        profile_name=profile,
        overrides=tuple(overrides),
        update=settings.update,
        recalibrate=settings.recalibrate,
        calibrator=_calibrator(request) if settings.update and settings.calibration else None,
        replay_out=Path(settings.replay["out"]) if settings.replay else None,
    )
    request.node.stash[_GOLDEN] = golden
    return golden


def _calibrator(request):
    """obtained trace -> the same with its noise band, from replays of this test (see ``replay``)."""
    from .calibrate import Calibrated, measure
    from .compare import CALIBRATED_FLOOR, CALIBRATED_K
    from .replay import Session, plan_variants, run_replays

    config = request.config
    settings = config.stash[_SETTINGS]
    extra = ["-n", "0"] if config.pluginmanager.hasplugin("xdist") else []
    session = Session(nodeid=request.node.nodeid, rootdir=settings.rootdir,
                      inifile=Path(config.inipath) if config.inipath else None, extra_args=extra)

    def calibrate(obtained):
        env = obtained.environment
        variants = plan_variants(str(env.get("device_type", "cpu")), int(env.get("threads", 1)),
                                 dithers=settings.dithers, tf32=env.get("tf32"))
        replays, seconds = run_replays(session, variants)
        return Calibrated(measure(obtained, replays, k=CALIBRATED_K, floor=CALIBRATED_FLOOR), seconds)

    return calibrate


def _marker_tolerances(request, tolerances) -> list:
    from .compare import Override, Tolerance, parse_override

    if not tolerances:
        return []
    try:
        if isinstance(tolerances, dict):  # {"stage_glob stat_glob": dict(atol=..) | None}
            out = []
            for key, value in tolerances.items():
                stage, _, stat = key.partition(" ")
                out.append(Override(stage, stat.strip() or "*", None if value is None else Tolerance(**value)))
            return out
        return [parse_override(line) for line in tolerances]
    except (TypeError, ValueError) as exc:
        _bad_marker(f"{request.node.nodeid}: @pytest.mark.{MARKER}(tolerances=...): {exc}")


def _write_report(settings, nodeid, trace):
    from .anomalies import detect, render_markdown
    from .golden import golden_relpath
    from .traceio import write_trace

    base = settings.report_dir / golden_relpath(nodeid, str(trace.environment.get("device_type", "cpu")))
    write_trace(base, trace, "json")
    write_trace(base.with_suffix(".md"), trace, "markdown", anomalies=render_markdown(detect(trace)))


# --------------------------------------------------------------------------- reporting
def pytest_assertrepr_compare(config, op, left, right):
    from .golden import GoldenTrace

    if op == "==":
        for side in (right, left):
            if isinstance(side, GoldenTrace) and side.failure:
                return side.failure_lines()
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or _SETTINGS not in item.config.stash:
        return
    trace = item.stash.get(_TRACE, None)
    if trace is None:
        return
    golden = item.stash.get(_GOLDEN, None)
    if golden is not None and golden.failure and report.failed and call.excinfo is not None \
            and call.excinfo.errisinstance(AssertionError):
        # the whole report, untruncated, without pytest's traceback; then where the assert stands
        entry = call.excinfo.traceback[-1]
        where = f"{Path(str(entry.path)).name}:{entry.lineno + 1}: {str(entry.statement).strip()}"
        report.longrepr = "\n".join(golden.failure_lines() + [where])
    anomalies = _anomalies(item, trace)
    blocking = [a for a in anomalies if a.severity == "error"]
    if blocking and report.when == "call" and (report.passed or (golden is not None and golden.failure)):
        from .anomalies import render_text

        lines = [f"{len(blocking)} anomal{'y' if len(blocking) == 1 else 'ies'} in the trace: "
                 f"{blocking[0].symptom}"] + render_text(blocking, include_info=False)
        lines.append("to accept a rule for this test: @pytest.mark.gpt_trace(allow=[\"RULE\"]), "
                     "or ini gpt_trace_allow")
        if report.passed:
            report.outcome = "failed"
            report.longrepr = "\n".join(lines)
        else:
            report.longrepr = str(report.longrepr) + "\n\n" + "\n".join(lines)
    summary = _summary(item, trace, golden)
    summary["anomalies"] = [(a.severity, a.rule, a.symptom, a.where) for a in anomalies if a.severity != "info"]
    summary["infos"] = sum(1 for a in anomalies if a.severity == "info")
    report.user_properties.append((_PROPERTY, summary))
    if golden is not None and golden.written:
        report.user_properties.append((_UPDATED, (golden.written, golden.display(golden.path))))


def _anomaly_settings(item):
    """(thresholds, allowed rules) for a test: ini settings, then its marker. ValueError if invalid."""
    from .anomalies import RULES, Thresholds

    settings = item.config.stash[_SETTINGS]
    marker = item.get_closest_marker(MARKER)
    kwargs = marker.kwargs if marker else {}
    extra = kwargs.get("thresholds") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"thresholds= expects a dict of name -> number, got {type(extra).__name__}")
    thresholds = Thresholds().updated({**settings.thresholds, **extra})
    allow = kwargs.get("allow") or ()
    if isinstance(allow, str):
        allow = [allow]
    unknown = [r for r in allow if r not in RULES]
    if unknown:
        raise ValueError(f"allow=: unknown rule {', '.join(map(repr, unknown))}; known: {', '.join(RULES)}")
    return thresholds, list(settings.allow) + list(allow)


def _anomalies(item, trace) -> list:
    from .anomalies import detect

    try:
        thresholds, allow = _anomaly_settings(item)
    except ValueError:
        return []  # already reported: the gpt_trace fixture failed the test with the reason
    return detect(trace, thresholds, allow=allow)


def _summary(item, trace, golden) -> dict:
    losses = [it.loss for it in trace.iterations if it.loss is not None]
    resid = [s.std for name, s in (trace.iterations[0].forward.items() if trace.iterations else [])
             if name.endswith("mlp_resid") and s.std is not None]
    if golden is None or golden.path is None:
        out_of_tol = "not compared"
    elif golden.written:
        out_of_tol = f"golden {golden.written}: {golden.display(golden.path)}"
        if golden.calibration_note:
            out_of_tol += f" ({golden.calibration_note})"
    elif golden.comparison is not None:
        from .report import out_of_tolerance

        out_of_tol = out_of_tolerance(golden.comparison)
        if golden.comparison.ok and golden.comparison.worst is not None:
            out_of_tol += f" ({golden.comparison.profile.name}; {golden.comparison.worst.describe()})"
    elif golden.error is not None:
        out_of_tol = f"golden malformed: {golden.display(golden.path)}"
    elif golden.failure:
        out_of_tol = ("golden missing" if not golden.path.exists() else "golden of another config") + \
            f": {golden.display(golden.path)}"
    else:
        out_of_tol = "0 out of tolerance"
    return {
        "nodeid": item.nodeid,
        "stages": len(trace.stage_names),
        "iterations": len(trace.iterations),
        "loss": (losses[0], losses[-1]) if losses else None,
        "out_of_tolerance": out_of_tol,
        "golden": golden.display(golden.path) if golden and golden.path else None,
        "residual_std": resid,
        "drift": list(golden.drift or ()) if golden else [],
    }


class _Collector:
    """Gathers per-test summaries from reports, so it works under xdist (reports cross processes)."""

    def __init__(self, settings):
        self.settings = settings

    def pytest_runtest_logreport(self, report):
        for key, value in getattr(report, "user_properties", ()):
            if key == _PROPERTY:
                self.settings.summaries.append(value)
            elif key == _UPDATED:
                self.settings.written.append(tuple(value))


def _sparkline(values) -> str:
    bars = "▁▂▃▄▅▆▇█"
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return bars[3] * len(values)
    return "".join(bars[min(7, int((v - lo) / (hi - lo) * 7.999))] for v in values)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _SETTINGS not in config.stash or not config.stash[_SETTINGS].enabled:
        return
    settings = config.stash[_SETTINGS]
    summaries, written = settings.summaries, settings.written
    if not summaries and not written:
        return
    tr = terminalreporter
    tr.write_sep("-", "gpt-trace")
    for s in summaries:
        loss = f"loss {s['loss'][0]:.6f} -> {s['loss'][1]:.6f}" if s["loss"] else "no loss"
        golden = f"golden {s['golden']}" if s["golden"] else "no golden"
        status = s["out_of_tolerance"]
        if status.startswith("golden "):  # created, updated, missing, ...: the status names the file itself
            golden = None
        tr.write_line(f"{s['nodeid']}: {s['stages']} stages, {s['iterations']} iterations, {loss}, "
                      f"{', '.join(filter(None, (status, golden)))}, "
                      f"{len(s.get('anomalies', ()))} warnings/errors, {s.get('infos', 0)} infos")
        for severity, rule, symptom, where in s.get("anomalies", ()):
            tr.write_line(f"    {severity} [{rule}] {symptom}" + (f" ({where})" if where and where not in symptom else ""))
        for line in s.get("drift", ()):
            tr.write_line(f"    {line}")
        if config.get_verbosity() > 0 and s["residual_std"]:
            tr.write_line(f"    residual std by layer {_sparkline(s['residual_std'])} "
                          f"({s['residual_std'][0]:.3g} .. {s['residual_std'][-1]:.3g})")
    for action, path in written:
        tr.write_line(f"golden {action}: {path}")
