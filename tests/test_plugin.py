"""The plugin end to end, through pytester: options, fixtures, the golden life cycle, reports."""

import json
from pathlib import Path

import pytest

from tests.projects import CONFTEST, GOLDEN, NO_CALIBRATION, TEST_FILE, run, run_subprocess


def nudge_std(path: Path, stage: str, factor: float, iteration: int = 0):
    doc = json.loads(path.read_text())
    stats = doc["iterations"][iteration]["forward"][stage]
    stats["std"] *= factor
    path.write_text(json.dumps(doc))


def test_golden_life_cycle(project):
    p = project
    # missing: fails with the command that creates it, writes nothing under golden/
    result = run(p, "--gpt-trace")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*golden trace missing: golden/test_model/test_model.json*",
        "*obtained trace written to .gpttrace-results/test_model/test_model.json*",
        "*create it: pytest --gpt-trace --update-golden 'test_model.py::test_model'*",
    ])
    assert not (p.path / "golden").exists()
    assert (p.path / ".gpttrace-results/test_model/test_model.json").exists()
    # create
    result = run(p, "--update-golden")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*gpt-trace*", "*golden created: golden/test_model/test_model.json*"])
    golden = p.path / GOLDEN
    assert json.loads(golden.read_text())["format"] == 1
    # pass, and an unchanged golden is not rewritten
    mtime = golden.stat().st_mtime_ns
    run(p, "--gpt-trace").assert_outcomes(passed=1)
    result = run(p, "--update-golden")
    result.assert_outcomes(passed=1)
    assert "golden updated" not in result.stdout.str() and golden.stat().st_mtime_ns == mtime
    # change beyond tolerance: fails with the table; --update-golden rewrites it; then passes
    nudge_std(golden, "blocks.1.attn.q_rope", 1.01)
    result = run(p, "--gpt-trace")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*1 of * traced tensors out of tolerance (profile exact); first divergence: blocks.1.attn.q_rope (forward), iteration 0, std*",
        "*iter*pass*stage*stat*golden*obtained*difference*allowed*",
        "*0*fwd*blocks.1.attn.q_rope*std*",
        "*accept it: pytest --gpt-trace --update-golden 'test_model.py::test_model'*",
    ])
    result = run(p, "--update-golden")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*golden updated: golden/test_model/test_model.json*"])
    run(p, "--gpt-trace").assert_outcomes(passed=1)


def test_failure_message_has_no_pytest_internals(project):
    run(project, "--update-golden").assert_outcomes(passed=1)
    nudge_std(project.path / GOLDEN, "embed.norm", 1.5)
    result = run(project, "--gpt-trace")
    out = result.stdout.str()
    assert "_pytest/" not in out and "pytest_gpttrace/" not in out and "site-packages" not in out
    assert "first divergence: embed.norm (forward), iteration 0, std" in out


def test_a_missing_stage_fails(project):
    run(project, "--update-golden").assert_outcomes(passed=1)
    golden = project.path / GOLDEN
    doc = json.loads(golden.read_text())
    doc["iterations"][0]["forward"]["blocks.9.extra"] = doc["iterations"][0]["forward"]["final_norm"]
    golden.write_text(json.dumps(doc))
    result = run(project, "--gpt-trace")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*blocks.9.extra*presence*present*missing*"])


def test_malformed_golden_names_the_file_and_json_path(project):
    run(project, "--update-golden").assert_outcomes(passed=1)
    golden = project.path / GOLDEN
    golden.write_text(golden.read_text().replace('"std": ', '"std": "x", "was": ', 1))
    result = run(project, "--gpt-trace")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(['malformed golden trace golden/test_model/test_model.json: '
                                 'at $.iterations[[]0[]].forward[[]"inputs.idx"[]].std: expected a number or null*'])


def test_skipped_without_the_flag_with_a_reason(project):
    result = run(project, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*run it with `pytest --gpt-trace`*"])


@pytest.mark.parametrize("value", ["1", "true"])
def test_update_golden_is_refused_under_ci(project, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    result = run(project, "--update-golden")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--update-golden is refused because CI is set*"])


def test_update_golden_is_allowed_when_ci_says_false(project, monkeypatch):
    monkeypatch.setenv("CI", "false")
    run(project, "--update-golden").assert_outcomes(passed=1)


def test_unknown_profile_is_a_usage_error(project):
    result = run(project, "--gpt-trace", "--gpt-trace-profile", "loose")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*unknown profile 'loose'*exact, statistical*"])


def test_ini_tolerances_and_marker_tolerances_loosen_a_stage(project):
    run(project, "--update-golden").assert_outcomes(passed=1)
    nudge_std(project.path / GOLDEN, "blocks.1.attn.q_rope", 1.01)
    run(project, "--gpt-trace").assert_outcomes(failed=1)
    project.makeini(NO_CALIBRATION + "gpt_trace_tolerances =\n    blocks.*.attn.q_rope std rtol=0.05\n")
    run(project, "--gpt-trace").assert_outcomes(passed=1)
    project.makeini(NO_CALIBRATION)
    project.makepyfile(test_model=TEST_FILE.replace(
        "iterations=2)", "iterations=2, tolerances=['blocks.1.attn.* std rtol=0.05'])"))
    run(project, "--gpt-trace").assert_outcomes(passed=1)


def test_report_dir_gets_markdown_and_json(project, tmp_path):
    run(project, "--update-golden").assert_outcomes(passed=1)
    out = tmp_path / "reports"
    run(project, "--gpt-trace", "--gpt-trace-report", str(out)).assert_outcomes(passed=1)
    md = (out / "test_model/test_model.md").read_text()
    assert md.startswith("# GPT Component Debug Trace")
    assert json.loads((out / "test_model/test_model.json").read_text())["format"] == 1


def test_terminal_summary_lines(project):
    run(project, "--update-golden").assert_outcomes(passed=1)
    result = run(project, "--gpt-trace", "-v")
    result.stdout.fnmatch_lines([
        "*- gpt-trace -*",
        "test_model.py::test_model: 48 stages, 2 iterations, loss 4.158883 -> *, 0 of * traced tensors out of tolerance (exact; every compared statistic identical to the golden), golden golden/test_model/test_model.json, 0 warnings/errors, * infos",
        "*residual std by layer*",
    ])


@pytest.mark.parametrize("mode", ["--update-golden", "--gpt-trace"])
def test_xdist_compare_and_update(project, mode):
    project.makepyfile(test_more="""
import pytest

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_seeds(gpt_config, seed, gpt_golden):
    from reference_model import GPT, optimizers, synthetic_batches
    from pytest_gpttrace import trace_training
    model = GPT(gpt_config, seed=seed)
    trace = trace_training(model, synthetic_batches(gpt_config, seed=seed), optimizers(model), iterations=1)
    assert trace == gpt_golden
""")
    run(project, "--update-golden").assert_outcomes(passed=4)
    result = run_subprocess(project, mode, "-n", "2")
    result.assert_outcomes(passed=4)
    if mode == "--gpt-trace":
        result.stdout.fnmatch_lines(["*test_model.py::test_model: 48 stages*"])
    assert len(list((project.path / "golden").rglob("*.json"))) == 4


def test_user_model_without_taps(pytester, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest("""
import pytest, torch
from tests.models import UserGPT, user_batches

@pytest.fixture
def gpt_model():
    return UserGPT()

@pytest.fixture
def gpt_batches():
    return user_batches()
""")
    pytester.makepyfile(test_user="""
def test_user_gpt(gpt_trace, gpt_golden):
    assert "layers.0.qkv" in gpt_trace.stage_names and gpt_trace.model == "UserGPT"
    assert gpt_trace == gpt_golden
""")
    run(pytester, "--update-golden").assert_outcomes(passed=1)
    run(pytester, "--gpt-trace").assert_outcomes(passed=1)


def test_an_anomaly_error_fails_the_test_and_allow_accepts_it(project):
    project.makeconftest(CONFTEST + """

@pytest.fixture
def gpt_optimizers(gpt_model):
    from reference_model import optimizers
    opts = optimizers(gpt_model)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = 0.0
    return opts
""")
    project.makepyfile(test_model="""
import pytest

@pytest.mark.gpt_trace(iterations=2)
def test_model(gpt_trace):
    assert gpt_trace.iterations[0].loss > 0
""")
    result = run(project, "--gpt-trace")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "1 anomaly in the trace: the loss is 4.158883 at iterations 0..1*",
        "*[[]stuck-loss[]]*",
        "*the LM head is not being updated*",
        "*allow=[[]\"RULE\"[]]*",
    ])
    project.makepyfile(test_model="""
import pytest

@pytest.mark.gpt_trace(iterations=2, allow=["stuck-loss"])
def test_model(gpt_trace):
    assert gpt_trace.iterations[0].loss > 0
""")
    run(project, "--gpt-trace").assert_outcomes(passed=1)


def test_an_anomaly_is_added_to_a_golden_failure(project):
    run(project, "--update-golden").assert_outcomes(passed=1)
    project.makeconftest(CONFTEST + """

@pytest.fixture
def gpt_model(gpt_config):
    from reference_model import GPT
    model = GPT(gpt_config)
    model.blocks[0].mlp.out.register_forward_hook(lambda m, i, o: o * float("nan"))
    return model
""")
    result = run(project, "--gpt-trace")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*traced tensors out of tolerance* (profile exact); first divergence: blocks.0.mlp.out (forward), iteration 0, nan*",
        "*anomal* in the trace: first NaN at blocks.0.mlp.out (forward), iteration 0*",
    ])


def test_unknown_allowed_rule_is_a_usage_error(project):
    project.makeini(NO_CALIBRATION + "gpt_trace_allow = stuck-los\n")
    result = run(project, "--gpt-trace")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*gpt_trace_allow: unknown rule stuck-los*"])


UNSEEDED_USER_MODEL = """
import pytest, torch
import torch.nn as nn
import torch.nn.functional as F

class Tiny(nn.Module):
    # initialised from the global RNG, as most user models are; one parameter frozen
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.emb.weight.requires_grad_(False)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 32)

    def forward(self, idx, targets):
        logits = self.head(torch.relu(self.fc(self.emb(idx))))
        return F.cross_entropy(logits.view(-1, 32), targets.view(-1))

@pytest.fixture
def gpt_model():
    return Tiny()

@pytest.fixture
def gpt_batches():
    def draw():
        while True:  # drawn from the global RNG inside the loop
            idx = torch.randint(0, 32, (1, 8))
            yield idx, torch.roll(idx, -1, 1)
    return draw()
"""


def test_a_user_model_from_the_global_rng_matches_its_golden(pytester, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    pytester.makeini(NO_CALIBRATION)
    pytester.makeconftest(UNSEEDED_USER_MODEL)
    pytester.makepyfile(test_user="""
import torch

def test_user(gpt_trace, gpt_golden):
    torch.rand(3)  # moves the global RNG: the next run must not depend on it
    assert gpt_trace.frozen_params == ("emb.weight",)
    assert "emb.weight" not in gpt_trace.iterations[0].param_grads
    assert gpt_trace == gpt_golden
""")
    run(pytester, "--update-golden").assert_outcomes(passed=1)
    result = run(pytester, "--gpt-trace")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*dead-gradient*")  # a frozen parameter is not a dead gradient


def test_a_bad_marker_argument_fails_that_test_only(project):
    project.makepyfile(test_model="""
import pytest

@pytest.mark.gpt_trace(iterations=1, allow=["stuck-los"])
def test_typo(gpt_trace):
    pass

@pytest.mark.gpt_trace(iterations=1, thresholds={"no_such_threshold": 1})
def test_bad_threshold(gpt_trace):
    pass

@pytest.mark.gpt_trace(iterations=1, seed="abc")
def test_bad_seed(gpt_trace):
    pass

@pytest.mark.gpt_trace(iterations=1, allow=["stuck-loss", "zero-schedule"])
def test_fine(gpt_trace):
    pass
""")
    result = run(project, "--gpt-trace")
    result.assert_outcomes(passed=1, errors=3)
    result.stdout.fnmatch_lines([
        "*test_typo*: @pytest.mark.gpt_trace: allow=: unknown rule 'stuck-los'; known: *",
    ])
    result.stdout.fnmatch_lines(["*test_bad_threshold*: @pytest.mark.gpt_trace: unknown threshold no_such_threshold*"])
    result.stdout.fnmatch_lines(["*test_bad_seed*: @pytest.mark.gpt_trace(seed='abc'): expected an integer*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_summary_says_when_nothing_was_compared(project):
    result = run(project, "--gpt-trace")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["test_model.py::test_model: 48 stages, 2 iterations, *, golden missing: golden/*"])
    result = run(project, "--update-golden")
    result.stdout.fnmatch_lines(["test_model.py::test_model: *, golden created: golden/*"])


def test_calibrated_golden_life_cycle(project):
    """Create with a band, pass with headroom, fail with the band beside the allowance, refresh
    saying how far the old golden lay in bands, recalibrate from the command line."""
    p = project
    p.makeini("[pytest]\n")  # calibration on, as by default
    result = run(p, "--update-golden")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "*golden created: golden/test_model/test_model.json (band of 5 replays (cap-default, threads-*, cap-default+threads-*, dither-1, dither-2), k 4.0, floor 4e-06, "
        "measured in * s)*",
    ])
    golden = p.path / GOLDEN
    doc = json.loads(golden.read_text())
    assert doc["format"] == 2 and doc["calibration"]["excluded"] == []
    assert {"device_name", "cpu_capability", "threads"} <= set(doc["calibration"]["variants"][0]["environment"])
    mtime = golden.stat().st_mtime_ns
    result = run(p, "--gpt-trace")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*0 of * traced tensors out of tolerance (calibrated; *)*"])
    run(p, "--update-golden").assert_outcomes(passed=1)
    assert golden.stat().st_mtime_ns == mtime  # a matching golden is not rewritten
    nudge_std(golden, "blocks.1.attn.q_rope", 1.01)
    result = run(p, "--gpt-trace")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*1 of * traced tensors out of tolerance (profile calibrated); first divergence: blocks.1.attn.q_rope (forward), "
        "iteration 0, std*",
        "*iter*pass*stage*stat*golden*obtained*difference*allowed*band*x band*",
        "*golden calibration: band of * replays*",
    ])
    result = run(p, "--update-golden")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "*golden updated: golden/test_model/test_model.json (band of*",
        "*the old golden differs in 1 of * traced tensors (profile calibrated), first at blocks.1.attn.q_rope (forward), "
        "iteration 0, std; worst rows:*",
        "*0*fwd*blocks.1.attn.q_rope*std*",
    ])
    run(p, "--gpt-trace").assert_outcomes(passed=1)
    done = p.run("gpttrace", "calibrate", "test_model.py", "--dithers", "0")
    assert done.ret == 0, done.stdout.str()
    done.stdout.fnmatch_lines(["*golden recalibrated: golden/test_model/test_model.json (band of 3 replays (cap-default, threads-*, cap-default+threads-*), *"])
    variants = [v["variant"] for v in json.loads(golden.read_text())["calibration"]["variants"]]
    assert variants and not any(name.startswith("dither-") for name in variants), variants


NAMED_TEST = """
import pytest

@pytest.mark.gpt_trace(iterations=2, golden="reports/test_model/test_model.md")
def test_named(gpt_trace, gpt_golden):
    assert gpt_trace == gpt_golden

@pytest.mark.gpt_trace(iterations=2, seed=43, golden="reports/test_model/test_model.md")
def test_named_other_seed(gpt_trace, gpt_golden):
    assert gpt_trace == gpt_golden
"""


def test_a_test_names_its_golden_file_and_a_markdown_report_serves(project):
    """golden= names the file (here a Markdown report), read by the same reader as any golden:
    the run that wrote the report matches it, another init does not, and no update rewrites it."""
    p = project
    run(p, "--gpt-trace", "--gpt-trace-report", "reports")  # no golden yet: fails, writes the report
    report = p.path / "reports/test_model/test_model.md"
    assert report.read_text().startswith("#")
    p.makepyfile(test_named=NAMED_TEST)
    result = run(p, "--gpt-trace", "test_named.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*traced tensors out of tolerance* (profile exact); first divergence: *",
                                 "test_named.py::test_named: *0 of * out of tolerance*, golden reports/test_model/test_model.md*"])
    before = report.read_bytes()
    result = run(p, "--update-golden", "test_named.py::test_named_other_seed")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*golden reports/test_model/test_model.md is a report that lists a selection*"])
    assert report.read_bytes() == before
    assert not (p.path / "golden/test_named").exists()  # nothing written under the node id's name either


def test_golden_must_name_a_path(project):
    project.makepyfile(test_bad='''
import pytest

@pytest.mark.gpt_trace(golden=3)
def test_bad(gpt_trace, gpt_golden):
    assert gpt_trace == gpt_golden
''')
    result = run(project, "--gpt-trace", "test_bad.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.gpt_trace(golden=3): expected the path of a trace file, relative to rootdir*"])
