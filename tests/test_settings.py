"""Options, ini keys, environment variables and marker arguments that cannot work are refused with
one line naming them; a string where a list is expected is one entry."""

import os
import subprocess
import sys

import pytest

from tests import projects
from tests.paths import ROOT, SEED_REPORT
from tests.projects import NO_CALIBRATION, user_project


@pytest.fixture
def project(pytester, monkeypatch):
    """The user project without a test file: each test writes its own."""
    return user_project(pytester, monkeypatch, test_file=None)


def run(pytester, *args):
    """pytest --gpt-trace ARGS in the project, in this process."""
    return projects.run(pytester, "--gpt-trace", *args)


def marked(arguments: str, body: str = "pass", fixtures: str = "gpt_trace") -> str:
    return f"""
import pytest

@pytest.mark.gpt_trace({arguments})
def test_it({fixtures}):
    {body}
"""


def assert_one_line_error(result, line: str):
    """The test errors at setup with that line and no traceback."""
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([line.replace("[", "[[]")])  # brackets are literal here
    out = result.stdout.str()
    assert "Traceback" not in out and "During handling" not in out, out
    assert "plugin.py" not in out and "markers.py" not in out, out


@pytest.mark.parametrize("arguments, line", [
    ('iterations=2.7', "*test_it: @pytest.mark.gpt_trace(iterations=2.7): expected a positive integer"),
    ('iterations=True', "*test_it: @pytest.mark.gpt_trace(iterations=True): expected a positive integer"),
    ('iterations=0', "*test_it: @pytest.mark.gpt_trace(iterations=0): expected a positive integer"),
    ('iterations=1, micro_steps=0', "*test_it: @pytest.mark.gpt_trace(micro_steps=0): expected a positive integer"),
    ('iterations=1, stages=["!*"]',
     "*test_it: @pytest.mark.gpt_trace(stages=['!*']): stage patterns ['!*'] select none of the * stages of GPT*"),
    ('iterations=1, seed=-1', "*test_it: @pytest.mark.gpt_trace(seed=-1): expected an integer from 0 to 2**64 - 1*"),
    ('iterations=1, seed=2**64',
     "*test_it: @pytest.mark.gpt_trace(seed=18446744073709551616): expected an integer from 0 to 2**64 - 1*"),
    ('iterations=1, thresholds={"dead_relu_warn": float("nan")}',
     "*test_it: @pytest.mark.gpt_trace: threshold dead_relu_warn must be a finite number, got nan"),
    ('iterations=1, thresholds={"dead_relu_warn": float("inf")}',
     "*test_it: @pytest.mark.gpt_trace: threshold dead_relu_warn must be a finite number, got inf"),
    ('iterations=1, thresholds=0', "*test_it: @pytest.mark.gpt_trace(thresholds=0): expected a dict of name -> number, got int"),
    ('iterations=1, thresholds=[]', "*test_it: @pytest.mark.gpt_trace(thresholds=[]): expected a dict of name -> number, got list"),
    ('iterations=1, golden="../outside.json"',
     "*test_it: @pytest.mark.gpt_trace(golden='../outside.json'): the golden file must lie inside rootdir*"),
    ('iterations=1, golden=".gpttrace-results/t.json"',
     "*test_it: @pytest.mark.gpt_trace(golden='.gpttrace-results/t.json'): lies inside the --gpt-trace-results-dir "
     "folder, where obtained traces are written over it*"),
], ids=["iterations-float", "iterations-bool", "iterations-0", "micro_steps-0", "stages-select-nothing",
        "seed-negative", "seed-too-large", "threshold-nan", "threshold-inf", "thresholds-0", "thresholds-list",
        "golden-outside-rootdir", "golden-in-results-dir"])
def test_a_marker_argument_that_cannot_work_fails_its_test_in_one_line(project, arguments, line):
    project.makepyfile(test_m=marked(arguments))
    assert_one_line_error(run(project), line)


def test_a_misspelt_statistic_in_a_marker_tolerance_is_refused(project):
    project.makepyfile(test_m=marked('tolerances=["blocks.* mena atol=1e-3"]', fixtures="gpt_golden"))
    assert_one_line_error(run(project), "*test_it: @pytest.mark.gpt_trace(tolerances=...): tolerance line "
                                        "'blocks.* mena atol=1e-3': 'mena' matches no statistic; "
                                        "the statistics are mean, std, min, max, rms, zero_frac*")


def test_tolerances_as_a_dict_is_refused(project):
    project.makepyfile(test_m=marked('tolerances={"blocks.* std": {"rtol": 0.1}}', fixtures="gpt_golden"))
    assert_one_line_error(run(project), "*test_it: @pytest.mark.gpt_trace(tolerances={*}): expected override "
                                        "lines *, a string or a list of strings, not a dict")


def test_tolerances_as_one_string_is_one_line(project):
    project.makepyfile(test_m=marked('tolerances="lm_head.* max rtol=1e-3"', fixtures="gpt_golden",
                                     body='assert [(o.stage, o.stat, o.tolerance.rtol) for o in gpt_golden.overrides]'
                                          ' == [("lm_head.*", "max", 1e-3)]'))
    run(project).assert_outcomes(passed=1)


def test_stages_as_one_string_is_one_pattern(project):
    project.makepyfile(test_m=marked('iterations=1, stages="blocks.0.*"',
                                     body='assert gpt_trace.stage_names and all(n.startswith("blocks.0.") '
                                          'for n in gpt_trace.stage_names), gpt_trace.stage_names'))
    run(project).assert_outcomes(passed=1)


def test_the_largest_torch_seed_is_accepted(project):
    project.makepyfile(test_m=marked("iterations=1, seed=2**64 - 1", fixtures="gpt_seed, gpt_trace",
                                     body="assert gpt_seed == 2**64 - 1"))
    run(project).assert_outcomes(passed=1)


def test_a_misspelt_statistic_in_the_ini_tolerances_is_a_usage_error(project):
    project.makeini(NO_CALIBRATION + "gpt_trace_tolerances = blocks.* mena atol=1e-3\n")
    project.makepyfile(test_m=marked("iterations=1"))
    result = run(project)
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*ini gpt_trace_tolerances: tolerance line 'blocks.* mena atol=1e-3': "
                                 "'mena' matches no statistic*"])


def test_a_non_finite_ini_threshold_is_a_usage_error(project):
    project.makeini(NO_CALIBRATION + "gpt_trace_thresholds = dead_relu_warn = nan\n")
    project.makepyfile(test_m=marked("iterations=1"))
    result = run(project)
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*ini gpt_trace_thresholds: threshold line 'dead_relu_warn = nan': "
                                 "'nan' is not a finite number*"])


def test_an_unknown_statistics_path_is_a_usage_error(project, monkeypatch):
    monkeypatch.setenv("GPTTRACE_STATS_PATH", "bogus")
    project.makepyfile(test_m=marked("iterations=1"))
    result = run(project)
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*environment GPTTRACE_STATS_PATH='bogus' is not a statistics path: "
                                 "use one of auto, compiled, eager*"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_check_refuses_a_non_finite_threshold():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for value in ("nan", "inf", "-inf"):
        done = subprocess.run([sys.executable, "-m", "pytest_gpttrace.cli", "check", str(SEED_REPORT),
                               "--threshold", f"dead_relu_warn={value}"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"check: --threshold: threshold line 'dead_relu_warn={value}': '{value}' is not a finite number" \
            in done.stderr.splitlines()[-1], done.stderr


def test_a_skipped_test_with_a_bad_marker_argument_is_skipped(project):
    project.makepyfile(test_m="""
import pytest

@pytest.mark.skipif(True, reason="not here")
@pytest.mark.gpt_trace(iterations=0)
def test_it(gpt_trace):
    pass
""")
    run(project).assert_outcomes(skipped=1)
    projects.run(project).assert_outcomes(skipped=1)  # without --gpt-trace
