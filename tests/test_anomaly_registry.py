"""The anomaly rule registry: one decorated function per rule, read by detect, the plugin, the CLI
and this README check."""

import json
import re

import pytest

from pytest_gpttrace import anomalies
from pytest_gpttrace.anomalies import (
    ERROR,
    INFO,
    REGISTRY,
    RULES,
    WARNING,
    Anomaly,
    Severity,
    Thresholds,
    check_rules,
    detect,
    rule,
    with_where,
)
from pytest_gpttrace.traceio import read_trace
from tests.paths import ROOT, SEED_REPORT


def readme_rule_rows() -> dict[str, tuple[str, str]]:
    """rule id -> (severity cell, threshold cell) of the README's rule table."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| rule | severity | fires when | threshold (default) |") + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4 and re.fullmatch(r"`[a-z-]+`", cells[0]), line
        rows[cells[0].strip("`")] = (cells[1], cells[3])
    return rows


def test_the_readme_rule_table_is_the_registry():
    rows = readme_rule_rows()
    assert sorted(rows) == sorted(REGISTRY)
    for r in REGISTRY.values():
        severity, thresholds = rows[r.id]
        assert severity == " / ".join(s.value for s in r.severities), r.id
        assert re.findall(r"`(\w+)`", thresholds) == list(r.thresholds), r.id


def test_thresholds_are_the_rules_declarations():
    declared = {name: default for r in REGISTRY.values() for name, default in r.thresholds.items()}
    assert Thresholds().names() == list(declared)
    assert {name: getattr(Thresholds(), name) for name in declared} == declared
    assert {r.id: r.description for r in REGISTRY.values()} == RULES


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", True, "high"])
def test_a_threshold_must_be_a_finite_number(value):
    with pytest.raises(ValueError, match=f"threshold dead_relu_warn must be a finite number, got {value!r}"):
        Thresholds().updated({"dead_relu_warn": value})


def test_severity_reads_as_its_value():
    assert f"{ERROR}" == str(ERROR) == ERROR == "error" and WARNING == "warning" and INFO == "info"
    assert f"{WARNING:>8}" == " warning" and ERROR.upper() == "ERROR"
    assert json.dumps([INFO]) == '["info"]'
    assert Severity("error") is ERROR


def test_with_where_adds_the_place_unless_the_symptom_names_it():
    assert with_where("x is zero", "loss, iteration 2") == "x is zero (loss, iteration 2)"
    assert with_where("first NaN at loss, iteration 2", "loss, iteration 2") == "first NaN at loss, iteration 2"
    assert with_where("x", "") == "x"
    a = Anomaly("softcap", INFO, 3, "lm_head.softcap", "the logits", "c", "f")
    assert a.located == "the logits (lm_head.softcap, iteration 3)"


def test_check_rules_names_the_unknown_and_the_known():
    assert check_rules(["stuck-loss"]) == ["stuck-loss"]
    with pytest.raises(ValueError, match=r"^unknown rule stuck-los; known: non-finite, stuck-loss, "):
        check_rules(["stuck-los"])
    with pytest.raises(ValueError, match=r"^unknown rule 'x'; known: "):
        check_rules(["x"], show=repr)


def test_a_decorated_function_is_a_rule(monkeypatch):
    monkeypatch.setattr(anomalies, "REGISTRY", dict(REGISTRY))

    @rule(id="long-run", severity=WARNING, description="more than two iterations")
    def long_run(ctx):
        n = len(ctx.trace.iterations)
        return [Anomaly("long-run", WARNING, n - 1, "loss", f"{n} iterations", "a long run", "none")] if n > 2 else []

    found = detect(read_trace(SEED_REPORT), allow=["long-run"])
    assert [(a.rule, a.severity) for a in found if a.rule == "long-run"] == [("long-run", INFO)]
    with pytest.raises(ValueError, match="registered twice"):
        rule(id="long-run", severity=ERROR, description="again")(long_run)
    with pytest.raises(ValueError, match=r"threshold 'dead_relu_warn': default 0\.5 in rule 'other'"):
        rule(id="other", severity=ERROR, description="x", thresholds={"dead_relu_warn": 0.5})(long_run)


def test_the_rule_context_is_computed_once_per_detect(monkeypatch):
    calls = {"vocab": 0, "zero_init": 0}
    vocab, zero_init = anomalies._vocab_size, anomalies._zero_init

    def counted(name, fn):
        def wrapper(trace):
            calls[name] += 1
            return fn(trace)
        return wrapper

    monkeypatch.setattr(anomalies, "_vocab_size", counted("vocab", vocab))
    monkeypatch.setattr(anomalies, "_zero_init", counted("zero_init", zero_init))
    found = detect(read_trace(SEED_REPORT))
    assert calls == {"vocab": 1, "zero_init": 1}
    assert [(a.rule, a.severity) for a in found] == [("stuck-loss", ERROR), ("zero-schedule", INFO),
                                                     ("zero-schedule", INFO)]


def test_the_settings_know_the_statistics_paths():
    from pytest_gpttrace import settings, stats

    assert settings.STATS_PATHS == stats.PATHS and settings.STATS_PATH_VAR == stats.ENV_VAR
