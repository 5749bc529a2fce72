"""pytest adapter of pytest-gpttrace: options, ini keys, the marker, fixtures and report hooks.

Only pytest glue lives here; the logic is in plain modules of this package. torch is imported
only by the fixtures, so a session that traces nothing does not pay for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .markers import MARKER, Run, parse_marker

if TYPE_CHECKING:
    import torch

    from reference_model import GPTConfig

    from .calibrate import Calibrated
    from .golden import GoldenTrace
    from .settings import Settings
    from .terminal import TracedTestSummary
    from .trace import Trace
    from .usermodel import LossFn

SKIP_REASON = "GPT trace test: run it with `pytest --gpt-trace` (or add --gpt-trace to addopts)"
_PROPERTY = "gpt_trace_summary"
_UPDATED = "gpt_trace_golden_written"

_SETTINGS = pytest.StashKey["Settings"]()
_COLLECTOR = pytest.StashKey["_Collector"]()
_RUN = pytest.StashKey[Run]()  # a traced test's marker, parsed once
_TRACE = pytest.StashKey["Trace"]()
_GOLDEN = pytest.StashKey["GoldenTrace"]()


# --------------------------------------------------------------------------- options
def pytest_addoption(parser: pytest.Parser) -> None:
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
    group.addoption("--gpt-trace-granularity", metavar="NAME", default=None,
                    help="what a stage is: auto (default: taps where the model has them, else ops), taps, "
                         "modules or ops (ini: gpt_trace_granularity; a marker's granularity= wins)")
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
    parser.addini("gpt_trace_granularity", default="auto",
                  help="stages of a model: auto (taps where the model has them, else ops), taps, modules or ops")
    parser.addini("gpt_trace_ops", type="linelist", default=[],
                  help="changes to the op list of the ops granularity: names replace it, +name adds, !name drops")
    parser.addini("gpt_trace_tolerances", type="linelist", default=[],
                  help="tolerance overrides, one per line: 'STAGE_GLOB STAT_GLOB atol=X rtol=Y [rms_atol=Z]' "
                       "or 'STAGE_GLOB STAT_GLOB skip'")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(iterations=3, seed=42, profile=None, tolerances=None, stages=None, micro_steps=1, "
        "allow=(), thresholds=None, golden=None, loss=None, granularity=None, ops=None): "
        "a GPT numerics trace test; see pytest-gpttrace's README",
    )
    from .settings import read_settings

    rootdir = Path(config.rootpath)

    def folder(option: str, ini: str) -> Path:
        value = str(config.getoption(option) or config.getini(ini))
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
    try:
        config.stash[_SETTINGS] = read_settings(
            config.getoption, config.getini, os.environ,
            golden_dir=golden_dir, results_dir=results_dir, report_dir=report_dir, rootdir=rootdir,
        )
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.pluginmanager.register(config.stash.setdefault(_COLLECTOR, _Collector()), "gpt-trace-collector")


def _is_trace_test(item: pytest.Item) -> bool:
    fixtures = getattr(item, "fixturenames", ())
    return item.get_closest_marker(MARKER) is not None or "gpt_trace" in fixtures or "gpt_golden" in fixtures


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.stash[_SETTINGS].enabled:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if _is_trace_test(item):
            item.add_marker(skip)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove the temporary files a killed writer left in the golden folder (older than a minute)."""
    settings = session.config.stash[_SETTINGS]
    if settings.enabled and not hasattr(session.config, "workerinput"):
        from .traceio import sweep_stale_temps_under

        sweep_stale_temps_under(settings.golden_dir)


# --------------------------------------------------------------------------- fixtures
def _bad_marker(message: str) -> NoReturn:
    """A marker argument that cannot work: this test errors with the message alone (no traceback)."""
    pytest.fail(message, pytrace=False)


def _parsed_run(node: pytest.Item) -> Run:
    """The test's marker over the session's settings, parsed once; ValueError if an argument is bad."""
    run = node.stash.get(_RUN, None)
    if run is None:
        marker = node.get_closest_marker(MARKER)
        run = node.stash[_RUN] = parse_marker(marker.args if marker else (), marker.kwargs if marker else {},
                                              node.config.stash[_SETTINGS])
    return run


def _run(node: pytest.Item) -> Run:
    """The test's ``markers.Run``; a bad marker argument fails the test with the reason alone."""
    try:
        return _parsed_run(node)
    except ValueError as exc:
        problem = str(exc)
    _bad_marker(f"{node.nodeid}: {problem}")  # outside the except: no chained traceback


def _seed_everything(seed: int) -> None:
    import random

    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Seed torch, random and numpy before a traced test's fixtures build the model: a user model
    initialised from the global RNG then starts the same on every run (and matches its golden)."""
    if _SETTINGS not in item.config.stash or "gpt_trace" not in getattr(item, "fixturenames", ()):
        return
    try:
        run = _parsed_run(item)
    except ValueError:
        return  # the fixtures fail the test with the reason (unless a skip mark skips it first)
    _seed_everything(run.seed)


@pytest.fixture
def gpt_config() -> GPTConfig:
    """The model config; default: the seed config (depth 4, d 256, 2 heads, V 65536, T 1024)."""
    from reference_model import GPTConfig

    config: GPTConfig = GPTConfig.from_depth(4)
    return config


@pytest.fixture
def gpt_seed(request: pytest.FixtureRequest) -> int:
    """Init and data seed: the marker's seed=, else 42. torch, random and numpy are seeded with it
    before the model is built and again before the training loop."""
    return _run(request.node).seed


@pytest.fixture
def gpt_model(gpt_config: GPTConfig, gpt_seed: int) -> torch.nn.Module:
    """The reference GPT, seeded. Override this fixture to trace your own model."""
    from reference_model import GPT

    return GPT(gpt_config, seed=gpt_seed)


@pytest.fixture
def gpt_batches(gpt_model: torch.nn.Module, gpt_seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An iterator of (idx, targets) batches, targets the next tokens; default: the reference model's
    synthetic batches at the model's vocabulary and context length (the reference GPT's config, a
    Hugging Face or dataclass config, or attributes on the model)."""
    from .errors import CaptureError
    from .usermodel import default_batches

    problem = None
    try:
        return default_batches(gpt_model, seed=gpt_seed)
    except CaptureError as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture
def gpt_loss_fn() -> LossFn | None:
    """loss(model, batch) -> scalar loss tensor for the training loop; default None: the tool's loss
    (the model's own loss, or the cross-entropy of its logits; see the README's "Your own model").
    The marker's loss= takes precedence."""
    return None


@pytest.fixture
def gpt_optimizers(gpt_model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The reference optimizers for the reference GPT; AdamW(lr=1e-3) for any other model."""
    import torch

    from reference_model import GPT, optimizers

    if isinstance(gpt_model, GPT):
        reference: list[torch.optim.Optimizer] = optimizers(gpt_model)
        return reference
    return [torch.optim.AdamW(gpt_model.parameters(), lr=1e-3)]


@pytest.fixture
def gpt_trace(request: pytest.FixtureRequest, gpt_seed: int, gpt_model: torch.nn.Module, gpt_batches: Iterable[Any],
              gpt_optimizers: Sequence[torch.optim.Optimizer] | None, gpt_loss_fn: LossFn | None) -> Trace:
    """Runs the marked number of instrumented training iterations and returns the Trace."""
    from .errors import CaptureError
    from .ops import resolve_ops
    from .replay import variant_applied
    from .tracer import select_stages, trace_training

    settings = request.config.stash[_SETTINGS]
    run = _run(request.node)
    problem = None
    try:
        select_stages(gpt_model, run.stages, run.granularity)
    except CaptureError as exc:
        problem = str(exc)
    if problem is not None:  # outside the except: no chained traceback
        given = ([f"stages={list(run.stages)!r}"] if run.stages is not None else []) + \
            ([f"granularity={run.granularity!r}"] if run.granularity != "auto" else [])
        _bad_marker(f"{request.node.nodeid}: @pytest.mark.{MARKER}({', '.join(given)}): {problem}")
    try:
        resolve_ops(settings.ops, origin="ini gpt_trace_ops")
        resolve_ops(run.ops, origin=f"@pytest.mark.{MARKER}(ops={list(run.ops)!r})")
    except CaptureError as exc:
        problem = str(exc)
    if problem is not None:
        _bad_marker(f"{request.node.nodeid}: {problem}")
    _seed_everything(gpt_seed)  # the loop's own randomness (dropout, sampled batches) repeats too
    problem = None
    with variant_applied(settings.replay or {}):  # a calibration replay's variant; nothing otherwise
        try:
            trace = trace_training(gpt_model, gpt_batches, gpt_optimizers, iterations=run.iterations,
                                   micro_steps=run.micro_steps, stages=run.stages, loss_fn=run.loss or gpt_loss_fn,
                                   granularity=run.granularity, ops=run.ops)
        except CaptureError as exc:  # a model, loss or batches the loop cannot use: the reason alone
            problem = str(exc)
    if problem is not None:
        pytest.fail(f"{request.node.nodeid}: {problem}", pytrace=False)
    request.node.stash[_TRACE] = trace
    if settings.report_dir is not None and not settings.replay:  # a replay's trace is not the run's report
        from .traceio import WriteError

        problem = None
        try:
            _write_report(settings, request.node.nodeid, trace)
        except WriteError as exc:
            problem = f"--gpt-trace-report: {exc}"
        if problem is not None:  # outside the except: no chained traceback
            pytest.fail(problem, pytrace=False)
    return trace


@pytest.fixture
def gpt_golden(request: pytest.FixtureRequest) -> GoldenTrace:
    """This test's golden trace: ``assert gpt_trace == gpt_golden``."""
    from .golden import GoldenTrace

    settings = request.config.stash[_SETTINGS]
    run = _run(request.node)
    golden = GoldenTrace(
        nodeid=request.node.nodeid,
        golden_dir=settings.golden_dir,
        results_dir=settings.results_dir,
        rootdir=settings.rootdir,
        profile_name=run.profile,
        overrides=run.overrides,
        update=settings.update,
        recalibrate=settings.recalibrate,
        calibrator=_calibrator(request) if settings.update and settings.calibration else None,
        replay_out=Path(settings.replay["out"]) if settings.replay else None,
        named_path=settings.rootdir / run.golden if run.golden else None,
    )
    request.node.stash[_GOLDEN] = golden
    return golden


def _calibrator(request: pytest.FixtureRequest) -> Callable[[Trace], Calibrated]:
    """obtained trace -> the same with its noise band, from replays of this test (see ``replay``)."""
    from .replay import Session, calibrator

    config = request.config
    settings = config.stash[_SETTINGS]
    extra = ["-n", "0"] if config.pluginmanager.hasplugin("xdist") else []
    granularity = config.getoption("gpt_trace_granularity")
    if granularity:  # a replay traces the stages the recording run traced
        extra += ["--gpt-trace-granularity", str(granularity)]
    session = Session(nodeid=request.node.nodeid, rootdir=settings.rootdir,
                      inifile=Path(config.inipath) if config.inipath else None, extra_args=extra)
    return calibrator(session, dithers=settings.dithers)


def _write_report(settings: Settings, nodeid: str, trace: Trace) -> None:
    from .anomalies import detect
    from .golden import trace_path
    from .traceio import write_trace

    assert settings.report_dir is not None
    base = trace_path(settings.report_dir, nodeid, trace)
    write_trace(base, trace, "json")
    write_trace(base.with_suffix(".md"), trace, "markdown", anomalies=detect(trace))


# --------------------------------------------------------------------------- reporting
def pytest_assertrepr_compare(config: pytest.Config, op: str, left: object, right: object) -> list[str] | None:
    from .golden import GoldenTrace
    from .report import failure_lines

    if op == "==":
        for side in (right, left):
            if isinstance(side, GoldenTrace) and side.result is not None and not side.result.ok:
                return failure_lines(side.result)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                                          pytest.TestReport]:
    report = yield
    trace = item.stash.get(_TRACE, None)
    if report.when != "call" or _SETTINGS not in item.config.stash or trace is None:
        return report
    from .anomalies import ERROR, detect
    from .report import anomaly_failure_lines, failure_lines
    from .terminal import summarize

    golden = item.stash.get(_GOLDEN, None)
    result = golden.result if golden is not None else None
    golden_failed = result is not None and not result.ok
    if result is not None and golden_failed and report.failed and call.excinfo is not None \
            and call.excinfo.errisinstance(AssertionError):
        # the whole report, untruncated, without pytest's traceback; then where the assert stands
        entry = call.excinfo.traceback[-1]
        where = f"{Path(str(entry.path)).name}:{entry.lineno + 1}: {str(entry.statement).strip()}"
        report.longrepr = "\n".join([*failure_lines(result), where])
    run = item.stash[_RUN]  # set before the gpt_trace fixture could run
    anomalies = detect(trace, run.thresholds, allow=run.allow)
    blocking = [a for a in anomalies if a.severity == ERROR]
    if blocking and (report.passed or golden_failed):
        lines = "\n".join(anomaly_failure_lines(blocking))
        if report.passed:
            report.outcome = "failed"
            report.longrepr = lines
        else:
            report.longrepr = str(report.longrepr) + "\n\n" + lines
    report.user_properties.append((_PROPERTY, summarize(item.nodeid, trace, result, anomalies)))
    if result is not None and result.written:
        report.user_properties.append((_UPDATED, (result.written, result.shown(result.golden_path))))
    return report


class _Collector:
    """Gathers per-test summaries from reports, so it works under xdist (reports cross processes)."""

    def __init__(self) -> None:
        self.summaries: list[TracedTestSummary] = []
        self.written: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in getattr(report, "user_properties", ()):
            if key == _PROPERTY:
                self.summaries.append(value)
            elif key == _UPDATED:
                action, path = value
                self.written.append((action, path))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: pytest.ExitCode | int,
                            config: pytest.Config) -> None:
    from .terminal import summary_lines

    if _SETTINGS not in config.stash or not config.stash[_SETTINGS].enabled:
        return
    collector = config.stash[_COLLECTOR]
    if not collector.summaries and not collector.written:
        return
    terminalreporter.write_sep("-", "gpt-trace")
    for line in summary_lines(collector.summaries, collector.written, verbose=config.get_verbosity() > 0):
        terminalreporter.write_line(line)
