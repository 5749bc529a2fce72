"""What a failure report and the summary say: counts in one unit, the golden named once, no compiler logs."""

import json
import re
from dataclasses import replace

from pytest_gpttrace.compare import compare
from pytest_gpttrace.report import out_of_tolerance, render_comparison, render_drift, traced_tensors
from pytest_gpttrace.trace import load
from tests.paths import ROOT, TINY_GOLDEN
from tests.projects import GOLDEN, TEST_FILE, run, run_subprocess


def moved(trace, factor=1.5, sections=("forward", "stage_grads", "param_grads")):
    """Every std of the given sections, in every iteration, times factor."""
    iterations = []
    for it in trace.iterations:
        changes = {}
        for section in sections:
            changes[section] = {name: (replace(s, std=s.std * factor) if s is not None and s.std else s)
                                for name, s in getattr(it, section).items()}
        iterations.append(replace(it, **changes))
    return replace(trace, iterations=tuple(iterations))


def tensors_in(trace) -> int:
    it = trace.iterations[0]
    return len(it.forward) + len(it.stage_grads) + len(it.param_grads) + (it.loss is not None)


def test_the_headline_counts_traced_tensors_out_of_all_traced():
    golden = load(TINY_GOLDEN)
    result = compare(golden, moved(golden))
    n, total = len(result.distinct_stages), traced_tensors(result)
    assert total == tensors_in(golden) > len(golden.stage_names)
    assert n > len(golden.stage_names)  # stages, stage gradients and parameter gradients differ
    headline = render_comparison(result, golden_name="golden/x.json")[0]
    # before: "N stages out of tolerance" with N counting gradients too, against "48 stages" of the summary
    assert headline.startswith(f"{n} of {total} traced tensors out of tolerance in ")
    assert re.match(r"\d+ of \d+ traced tensors out of tolerance in \d+ tensor-iterations \(profile \w+\); "
                    r"first divergence: ", headline)
    assert out_of_tolerance(result) == f"{n} of {total} traced tensors out of tolerance"
    drift = render_drift(result)[0]
    assert drift.startswith(f"the old golden differs in {n} of {total} traced tensors (profile ")


def test_forward_stages_alone_count_as_stages_of_the_summary():
    golden = load(TINY_GOLDEN)
    result = compare(golden, moved(golden, sections=("forward",)))
    stages = {name for section, name in result.distinct_stages if section == "forward"}
    assert {section for section, _ in result.distinct_stages} == {"forward"}
    assert stages <= set(golden.stage_names)


def test_the_rows_left_out_say_how_to_see_them_all():
    golden = load(TINY_GOLDEN)
    lines = render_comparison(compare(golden, moved(golden)), golden_name="golden/x.json", max_rows=5)
    more = [line for line in lines if line.lstrip().startswith("(+")]
    assert len(more) == 1 and more[0].endswith(" more: gpttrace diff golden/x.json OBTAINED lists them all)")
    cli = render_comparison(compare(golden, moved(golden)), golden_name="x.json", max_rows=5,
                            more_hint="--max-rows 0 lists them all")
    assert next(line for line in cli if line.lstrip().startswith("(+")).endswith(" more: --max-rows 0 lists them all)")


# --------------------------------------------------------------------------- through the plugin
def test_the_summary_names_the_written_golden_once(project):
    result = run(project, "--update-golden")
    result.assert_outcomes(passed=1)
    # before: "..., golden created, golden golden/test_model/test_model.json, ..."
    result.stdout.fnmatch_lines([
        "test_model.py::test_model: 48 stages, 2 iterations, loss *, golden created: "
        "golden/test_model/test_model.json, 0 warnings/errors, * infos",
    ])
    result.stdout.no_fnmatch_line("*golden created, golden *")


def test_the_summary_and_the_headline_count_in_one_unit(project):
    run(project, "--update-golden").assert_outcomes(passed=1)
    golden = project.path / GOLDEN
    doc = json.loads(golden.read_text())
    doc["iterations"][0]["forward"]["blocks.1.attn.q_rope"]["std"] *= 1.01
    golden.write_text(json.dumps(doc))
    result = run(project, "--gpt-trace")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    headline = re.search(r"^(\d+ of \d+ traced tensors) out of tolerance", text, re.M)
    summary = re.search(r"^test_model.py::test_model: 48 stages, .*, (\d+ of \d+ traced tensors) out of "
                        r"tolerance, golden golden/test_model/test_model.json,", text, re.M)
    assert headline and summary, text
    assert headline.group(1) == summary.group(1)


def test_a_failing_traced_test_shows_no_compiler_log_records(project, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's plugin in the child process
    # a fresh process: the statistics kernel compiles during this run's fixture setup
    project.makepyfile(test_model=TEST_FILE.replace("assert gpt_trace == gpt_golden", "assert False"))
    result = run_subprocess(project, "--gpt-trace")
    result.assert_outcomes(failed=1)
    assert "torch.__trace" not in result.stdout.str()  # before: dozens of empty DEBUG lines under "Captured log setup"


def test_traces_of_two_granularities_are_said_to_differ_by_design():
    from pytest_gpttrace.trace import Trace
    from tests.builders import make_iteration, make_stats

    s = make_stats(mean=0.0, std=1.0, min=-1.0, max=1.0, rms=1.0, zero_frac=0.0)
    golden = Trace({}, {"granularity": "ops"}, (make_iteration(forward={"a": s, "a/rms_norm#1": s}),))
    obtained = Trace({}, {"granularity": "modules"}, (make_iteration(forward={"a": s}),))
    lines = render_comparison(compare(golden, obtained), golden_name="g.json")
    assert "the golden's stages are ops, this run's modules: their stage lists differ by design" in "\n".join(lines)
    same = render_comparison(compare(golden, replace(obtained, environment={"granularity": "ops"})),
                             golden_name="g.json")
    assert not any("differ by design" in line for line in same)


def test_a_compiled_run_against_a_golden_of_another_granularity_is_told_what_to_record():
    from pytest_gpttrace.trace import Trace
    from tests.builders import make_iteration, make_stats

    s = make_stats(mean=0.0, std=1.0, min=-1.0, max=1.0, rms=1.0, zero_frac=0.0)
    golden = Trace({}, {"granularity": "ops"}, (make_iteration(forward={"a": s, "a/rms_norm#1": s}),))
    obtained = Trace({}, {"granularity": "modules", "compiled": "traced compiled (statistics inside the compiled graph)"},
                     (make_iteration(forward={"a": s}),))
    text = "\n".join(render_comparison(compare(golden, obtained), golden_name="g.json"))
    assert "a compiled model is traced at modules: record the eager golden at modules" in text
