import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_gpttrace.compare import (
    EXACT,
    STATISTICAL,
    Override,
    Profile,
    Tolerance,
    compare,
    get_profile,
    parse_override,
)
from pytest_gpttrace.report import render_comparison
from pytest_gpttrace.trace import STAT_FIELDS, Trace, replace_stats
from tests.builders import make_iteration as it
from tests.builders import make_stats
from tests.strategies import moderate, traces

S = make_stats((4,), mean=0.5, std=1.0, min=-1.0, max=2.0, rms=1.2, zero_frac=0.25)
Z = make_stats((4,), mean=0.0, std=0.0, min=0.0, max=0.0, rms=0.0, zero_frac=1.0)  # all zero


def trace(*iterations):
    return Trace({}, {}, tuple(iterations))


@given(traces())
def test_comparison_is_reflexive(t):
    assert compare(t, t, EXACT).ok and compare(t, t, STATISTICAL).ok


@given(moderate, st.floats(0, 1e3), st.floats(0, 0.5), st.floats(0, 1.0))
def test_the_rule_flips_exactly_at_the_tolerance(golden, atol, rtol, rms_atol):
    tol = Tolerance(atol=atol, rtol=rtol, rms_atol=rms_atol)
    profile = Profile("t", dict.fromkeys(STAT_FIELDS, tol), tol)
    g = replace_stats(S, std=golden)
    allowed = tol.allowed(golden, g.rms)
    inside = golden + allowed
    if inside - golden > allowed:  # the sum rounded up: step back to the last float inside
        inside = math.nextafter(inside, -math.inf)
    outside = math.nextafter(golden + allowed, math.inf)
    while outside - golden <= allowed:
        outside = math.nextafter(outside, math.inf)
    assert compare(trace(it(forward={"x": g})), trace(it(forward={"x": replace_stats(g, std=inside)})), profile).ok
    result = compare(trace(it(forward={"x": g})), trace(it(forward={"x": replace_stats(g, std=outside)})), profile)
    assert [m.stat for m in result.mismatches] == ["std"]


def test_mismatches_come_in_execution_order():
    golden = trace(
        it(0, 1.0, {"a": S, "b": S}, {"b": S, "a": S}, {"w": S}),
        it(1, 1.0, {"a": S, "b": S}),
    )
    obtained = trace(
        it(0, 1.0, {"a": S, "b": replace_stats(S, max=9.0)}, {"b": S, "a": replace_stats(S, std=3.0)},
           {"w": replace_stats(S, rms=5.0)}),
        it(1, 2.0, {"a": replace_stats(S, min=-7.0), "b": S}),
    )
    result = compare(golden, obtained)
    assert [(m.iteration, m.section, m.stage, m.stat) for m in result.mismatches] == [
        (0, "forward", "b", "max"),
        (0, "stage_grads", "a", "std"),
        (0, "param_grads", "w", "rms"),
        (1, "forward", "a", "min"),
        (1, "loss", "loss", "loss"),
    ]
    assert result.first is not None and result.first.where == "b (forward), iteration 0"


def test_exact_zero_ness_always_counts():
    tiny = replace_stats(Z, max=1e-30, rms=1e-31, std=1e-31, zero_frac=0.75)
    result = compare(trace(it(forward={"c_proj": Z})), trace(it(forward={"c_proj": tiny})))
    assert "zeros" in [m.stat for m in result.mismatches]


def test_shape_dtype_counts_and_presence():
    other = replace_stats(S, shape=(2, 2), dtype="torch.bfloat16", nan=1)
    result = compare(trace(it(forward={"x": S, "gone": S}, param_grads={"p": S})),
                     trace(it(forward={"x": other, "new": S}, param_grads={"p": None})))
    stats = [(m.stage, m.stat) for m in result.mismatches]
    assert stats == [("x", "shape"), ("x", "dtype"), ("x", "nan"), ("gone", "presence"), ("new", "presence"),
                     ("p", "presence")]


def test_sections_the_golden_does_not_record_are_skipped():
    golden = trace(it(0, 1.0, {"x": S}), it(1, 1.0))  # a parsed report: no gradients, then losses only
    obtained = trace(it(0, 1.0, {"x": S}, {"x": S}, {"w": S}), it(1, 1.0, {"x": S}, {"x": S}))
    assert compare(golden, obtained).ok
    moved = trace(it(0, 1.0, {"x": S}), it(1, 0.5, {"x": S}))
    assert [m.where for m in compare(golden, moved).mismatches] == ["loss, iteration 1"]


def test_missing_iterations_are_reported():
    result = compare(trace(it(0), it(1)), trace(it(0)))
    assert [(m.iteration, m.stat) for m in result.mismatches] == [(1, "presence")]


def test_statistical_profile_skips_input_ids_and_the_loss_shape():
    ids = make_stats((1, 8), dtype="torch.int32", mean=100.0, std=5.0, min=1.0, max=900.0, rms=100.1, zero_frac=0.0)
    loss1 = make_stats((1,), mean=11.0, std=0.0, min=11.0, max=11.0, rms=11.0, zero_frac=0.0)
    loss0 = replace_stats(loss1, shape=())
    golden = trace(it(forward={"inputs.idx": ids, "loss": loss1}))
    obtained = trace(it(forward={"inputs.idx": replace_stats(ids, mean=4000.0), "loss": loss0}))
    assert compare(golden, obtained, STATISTICAL).ok
    assert not compare(golden, obtained, EXACT).ok


def test_overrides_last_match_wins_and_skip():
    p = EXACT.with_overrides([Override("blocks.*", "std", Tolerance(rtol=0.5)), Override("blocks.0.*", "*", None)])
    assert p.tolerance("blocks.1.q", "std") == Tolerance(rtol=0.5)
    assert p.tolerance("blocks.0.q", "std") is None
    assert p.tolerance("final_norm", "std") == EXACT.tolerances["std"]


@pytest.mark.parametrize("line, message", [
    ("blocks.*", "expected 'STAGE_GLOB STAT_GLOB"),
    ("blocks.* std tol=1", "'tol=1' is not atol=X"),
    ("blocks.* std rtol=abc", "'abc' is not a number"),
    ("blocks.* std rtol=-1", "must be a non-negative number"),
])
def test_bad_tolerance_lines_say_what_is_wrong(line, message):
    with pytest.raises(ValueError, match=message):
        parse_override(line)


def test_parse_override():
    assert parse_override("lm_head.* max atol=1e-3 rtol=0.1") == Override("lm_head.*", "max", Tolerance(1e-3, 0.1))
    assert parse_override("inputs.* * skip") == Override("inputs.*", "*", None)


def test_unknown_profile():
    with pytest.raises(ValueError, match="unknown tolerance profile 'x': choose one of auto, calibrated, exact, statistical"):
        get_profile("x")


def test_report_is_capped_and_ends_with_the_remedy():
    forward = {f"s{i}": S for i in range(30)}
    moved = {f"s{i}": replace_stats(S, std=2.0) for i in range(30)}
    lines = render_comparison(compare(trace(it(forward=forward)), trace(it(forward=moved))),
                              golden_name="golden/x.json", obtained_name=".gpttrace-results/x.json",
                              accept_line="if the change is intended, accept it: pytest --gpt-trace --update-golden 'x'")
    assert lines[0] == "30 of 31 traced tensors out of tolerance (profile exact); first divergence: s0 (forward), iteration 0, std"
    # 30 mismatches, 20 shown; the hint names both files
    assert "  (+10 more: gpttrace diff golden/x.json .gpttrace-results/x.json lists them all)" in lines
    assert lines[-1] == "if the change is intended, accept it: pytest --gpt-trace --update-golden 'x'"


def test_a_stage_that_differs_in_several_iterations_counts_once():
    g = trace(it(0, forward={"a": S, "b": S}), it(1, forward={"a": S, "b": S}))
    o = trace(it(0, forward={"a": replace_stats(S, std=2.0), "b": S}),
              it(1, forward={"a": replace_stats(S, std=2.0), "b": S}))
    result = compare(g, o)
    assert result.distinct_stages == [("forward", "a")] and len(result.stages_differing) == 2
    line = render_comparison(result, golden_name="g.json")[0]
    assert line.startswith("1 of 3 traced tensors out of tolerance in 2 tensor-iterations (profile exact); first divergence: a (forward)")


def test_provenance_not_the_environment_says_how_precise_and_how_complete_a_trace_is():
    from dataclasses import replace

    from pytest_gpttrace.trace import Provenance

    golden = trace(it(0, 1.0, {"x": S}))
    obtained = trace(it(0, 1.0 + 4e-4, {"x": replace_stats(S, mean=0.5 + 4e-4), "y": S}))  # S.mean is 0.5
    assert {m.stat for m in compare(golden, obtained, EXACT).mismatches} == {"mean", "loss", "presence"}
    labelled = replace(golden, environment={"source": "markdown"})  # a label only: it changes nothing
    assert compare(labelled, obtained, EXACT).mismatches == compare(golden, obtained, EXACT).mismatches
    rounded = replace(golden, provenance=Provenance(quantum=5e-4, complete=False, source="report"))
    assert compare(rounded, obtained, EXACT).ok
    assert compare(replace(golden, provenance=Provenance(quantum=5e-4)), obtained, EXACT).mismatches[0].stat == "presence"
    assert not compare(replace(golden, provenance=Provenance(quantum=1e-4, complete=False)), obtained, EXACT).ok


def test_the_comparison_golden_and_plugin_import_no_markdown():
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, pytest_gpttrace.compare, pytest_gpttrace.golden, pytest_gpttrace.plugin, pytest_gpttrace.traceio;"
            "loaded = sorted(m for m in sys.modules if m.startswith('pytest_gpttrace.markdown'));"
            "assert not loaded, loaded")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr
