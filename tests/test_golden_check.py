"""The golden check: one frozen ``GoldenResult`` per check, its status, and the texts rendered from it."""

import dataclasses
import json
from dataclasses import replace

import pytest

from pytest_gpttrace.calibrate import Calibrated, Replay, measure
from pytest_gpttrace.errors import TraceFormatError
from pytest_gpttrace.golden import GoldenTrace, trace_path
from pytest_gpttrace.outcome import GoldenResult, GoldenStatus
from pytest_gpttrace.report import MAX_ROWS, drift_lines, failure_lines, summary_outcome
from pytest_gpttrace.terminal import summarize, summary_lines
from pytest_gpttrace.trace import Iteration, TensorStats, Trace, dumps, replace_stats
from pytest_gpttrace.traceio import write_trace

S = TensorStats((4,), "torch.float32", "cpu", 4, 0.5, 1.0, -1.0, 2.0, 1.2, 0.25)
NODEID = "t.py::test_f"
UPDATE = "pytest --gpt-trace --update-golden 't.py::test_f'"


def trace(stages=("x",), std=1.0, config=None, device="cpu"):
    forward = {name: replace_stats(S, std=std) for name in stages}
    return Trace(config or {"n_layer": 2}, {"device_type": device},
                 (Iteration(0, 1.0, True, {}, forward, {}, {}),))


def golden_for(tmp_path, **options):
    return GoldenTrace(NODEID, tmp_path / "golden", tmp_path / "results", tmp_path, **options)


def record(tmp_path, t):
    """Write t as this test's golden (a JSON trace) and return its path."""
    path = trace_path(tmp_path / "golden", NODEID, t)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(t), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- comparing
def test_a_missing_golden_writes_the_obtained_trace_and_says_how_to_create_it(tmp_path):
    result = golden_for(tmp_path).check(trace())
    assert result.status is GoldenStatus.MISSING and not result.ok and result.written is None
    assert result.golden_path == tmp_path / "golden/t/test_f.json" and not result.golden_path.exists()
    assert result.obtained_path == tmp_path / "results/t/test_f.json"
    assert json.loads(result.obtained_path.read_text()) == json.loads(dumps(trace()))
    assert failure_lines(result) == [
        "golden trace missing: golden/t/test_f.json",
        "obtained trace written to results/t/test_f.json",
        f"create it: {UPDATE}",
    ]
    assert summary_outcome(result) == "golden missing: golden/t/test_f.json"


def test_the_summary_reads_the_status_and_not_the_file_system_again(tmp_path):
    result = golden_for(tmp_path).check(trace())
    record(tmp_path, trace())  # the golden appears after the check (before: "golden of another config")
    assert summary_outcome(result) == "golden missing: golden/t/test_f.json"


def test_a_matching_golden_is_a_match_and_writes_nothing(tmp_path):
    record(tmp_path, trace())
    result = golden_for(tmp_path).check(trace())
    assert result.status is GoldenStatus.MATCH and result.ok
    assert result.comparison is not None and result.comparison.ok and result.obtained_path is None
    assert failure_lines(result) == [] and not (tmp_path / "results").exists()
    assert summary_outcome(result) == ("0 of 2 traced tensors out of tolerance (exact; every compared statistic "
                                       "identical to the golden), golden golden/t/test_f.json")


def test_a_golden_out_of_tolerance_differs_with_the_table_and_the_accept_command(tmp_path):
    record(tmp_path, trace())
    result = golden_for(tmp_path).check(trace(std=1.5))
    assert result.status is GoldenStatus.DIFFERS and not result.ok
    assert result.obtained_path == tmp_path / "results/t/test_f.json" and result.obtained_path.exists()
    lines = failure_lines(result)
    assert lines[0] == ("1 of 2 traced tensors out of tolerance (profile exact); first divergence: x (forward), "
                        "iteration 0, std")
    assert lines[1] == "golden: golden/t/test_f.json"
    assert lines[-2:] == ["obtained trace written to results/t/test_f.json",
                          f"if the change is intended, accept it: {UPDATE}"]
    assert summary_outcome(result) == "1 of 2 traced tensors out of tolerance, golden golden/t/test_f.json"


def test_a_failure_with_more_rows_than_shown_says_how_to_see_them_all(tmp_path):
    stages = [f"s{i}" for i in range(MAX_ROWS + 7)]
    record(tmp_path, trace(stages))
    lines = failure_lines(golden_for(tmp_path).check(trace(stages, std=1.5)))
    assert "  (+7 more: gpttrace diff golden/t/test_f.json results/t/test_f.json lists them all)" in lines
    rows = [line for line in lines if line.split()[:2] == ["0", "fwd"]]
    assert len(rows) == MAX_ROWS


def test_a_malformed_golden_names_the_json_path(tmp_path):
    path = record(tmp_path, trace())
    path.write_text(path.read_text().replace('"std": 1.0', '"std": "x"', 1))
    result = golden_for(tmp_path).check(trace())
    assert result.status is GoldenStatus.MALFORMED and isinstance(result.error, TraceFormatError)
    first, written, fix = failure_lines(result)
    assert first.startswith("malformed golden trace golden/t/test_f.json: at $.iterations[0].forward[\"x\"].std: ")
    assert written == "obtained trace written to results/t/test_f.json"
    assert fix == f"fix the file, or regenerate it: {UPDATE}"
    assert summary_outcome(result) == "golden malformed: golden/t/test_f.json"


def test_a_golden_of_another_config_names_the_keys(tmp_path):
    record(tmp_path, trace(config={"n_layer": 3}))
    result = golden_for(tmp_path).check(trace())
    assert result.status is GoldenStatus.OTHER_CONFIG and result.reason == "n_layer: golden 3, obtained 2"
    assert failure_lines(result) == [
        "golden trace golden/t/test_f.json is of another model config: n_layer: golden 3, obtained 2",
        "obtained trace written to results/t/test_f.json",
        f"if the config change is intended: {UPDATE}",
    ]
    assert summary_outcome(result) == "golden of another config: golden/t/test_f.json"


def test_a_profile_that_cannot_compare_is_not_comparable(tmp_path):
    record(tmp_path, trace())  # no band: calibrated cannot compare it
    result = golden_for(tmp_path, profile_name="calibrated").check(trace())
    assert result.status is GoldenStatus.NOT_COMPARABLE and result.reason
    assert failure_lines(result) == [f"golden trace golden/t/test_f.json cannot be compared: {result.reason}",
                                     "obtained trace written to results/t/test_f.json"]
    # before: the summary said "golden of another config" for it
    assert summary_outcome(result) == "golden not comparable: golden/t/test_f.json"


# --------------------------------------------------------------------------- update mode
def test_update_creates_a_missing_golden(tmp_path):
    result = golden_for(tmp_path, update=True).check(trace())
    assert result.status is GoldenStatus.CREATED and result.ok and result.written == "created"
    assert result.golden_path.read_text() == dumps(trace())
    assert failure_lines(result) == [] and drift_lines(result) == []
    assert summary_outcome(result) == "golden created: golden/t/test_f.json"


def test_update_leaves_a_matching_golden_alone(tmp_path):
    path = record(tmp_path, trace())
    before = path.stat().st_mtime_ns
    result = golden_for(tmp_path, update=True).check(trace())
    assert result.status is GoldenStatus.MATCH and result.written is None
    assert path.stat().st_mtime_ns == before


def test_update_rewrites_a_differing_golden_and_says_how_far_it_lay(tmp_path):
    path = record(tmp_path, trace())
    result = golden_for(tmp_path, update=True).check(trace(std=1.5))
    assert result.status is GoldenStatus.UPDATED and result.written == "updated"
    assert path.read_text() == dumps(trace(std=1.5))
    assert result.comparison is not None and not result.comparison.ok  # the old golden against the new run
    drift = drift_lines(result)
    assert drift[0].startswith("the old golden differs in 1 of 2 traced tensors (profile exact), first at x (forward)")
    assert summary_outcome(result) == "golden updated: golden/t/test_f.json"


def test_update_rewrites_a_malformed_golden(tmp_path):
    path = record(tmp_path, trace())
    path.write_text("{")
    result = golden_for(tmp_path, update=True).check(trace())
    assert result.status is GoldenStatus.UPDATED and isinstance(result.error, TraceFormatError)
    assert path.read_text() == dumps(trace())


def test_recalibrate_writes_a_matching_golden_again_with_its_band(tmp_path):
    path = record(tmp_path, trace())

    def calibrator(obtained):
        return Calibrated(measure(obtained, [Replay("r", "a replay", obtained)], k=4.0, floor=1e-6), 2.0)

    result = golden_for(tmp_path, update=True, recalibrate=True, calibrator=calibrator).check(trace())
    assert result.status is GoldenStatus.RECALIBRATED and result.written == "recalibrated"
    assert json.loads(path.read_text())["calibration"]["replays"] == 1
    assert result.band is not None and result.band.usable and result.band.seconds == 2.0
    assert summary_outcome(result).startswith("golden recalibrated: golden/t/test_f.json (band of 1 replays (r), ")
    assert summary_outcome(result).endswith(", measured in 2.0 s)")
    again = golden_for(tmp_path, update=True, recalibrate=True, calibrator=calibrator).check(trace())
    assert again.status is GoldenStatus.MATCH  # the same bytes: nothing written


def test_a_named_report_is_never_overwritten(tmp_path):
    named = tmp_path / "reports" / "seed.md"
    write_trace(named, trace(), "markdown")
    before = named.read_bytes()
    result = golden_for(tmp_path, update=True, named_path=named).check(trace(std=1.5))
    assert result.status is GoldenStatus.REPORT_KEPT and not result.ok
    assert named.read_bytes() == before and not (tmp_path / "golden").exists()
    assert failure_lines(result) == [
        "golden reports/seed.md is a report that lists a selection of the trace (named by golden=): "
        "--update-golden does not overwrite it",
        "to record a golden for this test, drop golden= or name a .json file",
    ]
    # before: the summary said "golden of another config" for it
    assert summary_outcome(result) == "golden not updated (a report named by golden=): reports/seed.md"


def test_a_named_report_is_compared_without_update(tmp_path):
    named = tmp_path / "reports" / "seed.md"
    write_trace(named, trace(), "markdown")
    assert golden_for(tmp_path, named_path=named).check(trace()).status is GoldenStatus.MATCH


# --------------------------------------------------------------------------- writing
def test_a_golden_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "golden").write_text("")
    result = golden_for(tmp_path, update=True).check(trace())
    assert result.status is GoldenStatus.WRITE_ERROR and not result.ok
    assert result.write_target == result.golden_path
    assert failure_lines(result) == [
        "cannot write golden trace golden/t/test_f.json: 'golden' on its path is a file, not a folder"]
    assert summary_outcome(result) == "golden not written: golden/t/test_f.json"


def test_an_obtained_trace_that_cannot_be_written_leaves_the_failure_as_it_is(tmp_path):
    (tmp_path / "results").write_text("")
    result = golden_for(tmp_path).check(trace())
    assert result.status is GoldenStatus.MISSING and result.obtained_path is None
    assert failure_lines(result) == [
        "golden trace missing: golden/t/test_f.json",
        "obtained trace not written to results/t/test_f.json: 'results' on its path is a file, not a folder",
        f"create it: {UPDATE}",
    ]
    assert summary_outcome(result) == "golden missing: golden/t/test_f.json"


def test_a_difference_keeps_its_table_when_the_obtained_trace_cannot_be_written(tmp_path):
    """Before: the whole failure was the write error, and the table of what differs was lost."""
    record(tmp_path, trace())
    (tmp_path / "results").write_text("")
    result = golden_for(tmp_path).check(trace(std=1.5))
    assert result.status is GoldenStatus.DIFFERS and result.comparison is not None
    lines = failure_lines(result)
    assert lines[0].startswith("1 of 2 traced tensors out of tolerance")
    assert any(line.split()[:2] == ["0", "fwd"] for line in lines)
    assert lines[-2:] == [
        "obtained trace not written to results/t/test_f.json: 'results' on its path is a file, not a folder",
        f"if the change is intended, accept it: {UPDATE}"]


def test_a_named_markdown_golden_is_never_written_by_update(tmp_path):
    """Before: --update-golden wrote JSON into the .md file named by golden=."""
    named = tmp_path / "reports" / "new.md"
    result = golden_for(tmp_path, update=True, named_path=named).check(trace())
    assert result.status is GoldenStatus.REPORT_KEPT and not named.exists()
    assert failure_lines(result) == [
        "golden reports/new.md (named by golden=) is a Markdown report, and --update-golden writes JSON goldens "
        "only: reports are written by a person",
        "to record a golden for this test, drop golden= or name a .json file",
    ]


def test_a_named_report_that_differs_does_not_offer_an_update_it_would_refuse(tmp_path):
    named = tmp_path / "reports" / "seed.md"
    write_trace(named, trace(), "markdown")
    lines = failure_lines(golden_for(tmp_path, named_path=named).check(trace(std=1.5)))
    assert lines[-1] == ("this golden is a report (it lists a selection of the trace): edit it by hand, or record "
                         "a JSON golden by naming a .json file in golden=")
    assert not any("--update-golden" in line for line in lines)


def test_a_replay_writes_the_obtained_trace_and_compares_nothing(tmp_path):
    out = tmp_path / "replay" / "out.json"
    record(tmp_path, trace())
    result = golden_for(tmp_path, replay_out=out).check(trace(std=1.5))
    assert result.status is GoldenStatus.REPLAY_WRITTEN and result.ok and result.comparison is None
    assert result.obtained_path == out and out.read_text() == dumps(trace(std=1.5))
    assert not (tmp_path / "results").exists()


def test_one_path_per_test_and_device_for_golden_obtained_and_report(tmp_path):
    cuda = trace(device="cuda")
    result = golden_for(tmp_path).check(cuda)
    assert result.golden_path == tmp_path / "golden/t/test_f.cuda.json"
    assert result.obtained_path == tmp_path / "results/t/test_f.cuda.json"
    assert trace_path(tmp_path / "reports", NODEID, cuda) == tmp_path / "reports/t/test_f.cuda.json"
    assert golden_for(tmp_path).path_for(trace()) == tmp_path / "golden/t/test_f.json"


# --------------------------------------------------------------------------- the value and ==
def test_equality_runs_the_check_and_keeps_its_frozen_result(tmp_path):
    record(tmp_path, trace())
    assert golden_for(tmp_path).result is None  # nothing checked yet
    golden = golden_for(tmp_path)
    assert trace() == golden
    matched = golden.result
    assert matched is not None and matched.status is GoldenStatus.MATCH
    assert golden.failure_lines() == ["the trace matches its golden"]
    assert trace(std=1.5) != golden
    differed = golden.result
    assert differed is not None and differed.status is GoldenStatus.DIFFERS  # a new value, not the old one changed
    assert matched.status is GoldenStatus.MATCH
    assert golden.failure == failure_lines(differed) == golden.failure_lines() and golden.path == differed.golden_path
    with pytest.raises(dataclasses.FrozenInstanceError):
        differed.status = GoldenStatus.MATCH
    with pytest.raises(TypeError):
        hash(golden)
    assert (golden == "not a trace") is False


def test_a_result_is_plain_data(tmp_path):
    result = GoldenResult(GoldenStatus.MISSING, NODEID, tmp_path / "golden/t/test_f.json", tmp_path,
                          obtained_path=tmp_path / "results/t/test_f.json")
    assert replace(result, status=GoldenStatus.MATCH).ok and not result.ok
    assert result.shown(tmp_path / "golden/t/test_f.json") == "golden/t/test_f.json"
    assert result.shown(tmp_path.parent / "elsewhere.json") == str(tmp_path.parent / "elsewhere.json")


# --------------------------------------------------------------------------- the terminal summary
def test_the_summary_line_names_the_golden_once(tmp_path):
    created = golden_for(tmp_path, update=True).check(trace())
    matched = golden_for(tmp_path).check(trace())
    summaries = [summarize("t.py::a", trace(), created, []), summarize("t.py::b", trace(), matched, []),
                 summarize("t.py::c", trace(), None, [])]
    assert [s["status"] for s in summaries] == ["created", "match", None]
    lines = summary_lines(summaries, [("created", "golden/t/test_f.json")], verbose=False)
    assert lines == [
        "t.py::a: 1 stages, 1 iterations, loss 1.000000 -> 1.000000, golden created: golden/t/test_f.json, "
        "0 warnings/errors, 0 infos",
        "t.py::b: 1 stages, 1 iterations, loss 1.000000 -> 1.000000, 0 of 2 traced tensors out of tolerance "
        "(exact; every compared statistic identical to the golden), golden golden/t/test_f.json, "
        "0 warnings/errors, 0 infos",
        "t.py::c: 1 stages, 1 iterations, loss 1.000000 -> 1.000000, not compared, no golden, "
        "0 warnings/errors, 0 infos",
        "golden created: golden/t/test_f.json",
    ]


def test_the_summary_shows_the_drift_of_an_update(tmp_path):
    record(tmp_path, trace())
    updated = golden_for(tmp_path, update=True).check(trace(std=1.5))
    summary = summarize(NODEID, trace(std=1.5), updated, [])
    assert summary["drift"] == drift_lines(updated) and summary["drift"]
    lines = summary_lines([summary], [], verbose=False)
    assert lines[1] == "    " + summary["drift"][0]
