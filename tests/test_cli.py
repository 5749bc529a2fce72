import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_gpttrace import markdown
from pytest_gpttrace.cli import main
from pytest_gpttrace.trace import load
from tests.paths import SEED_GOLDEN, SEED_REPORT


def known(value: float | None) -> float:
    assert value is not None
    return value


def first_iteration_blocks(md: str) -> list[str]:
    """Titles of the stat blocks of the first rendered iteration."""
    body = md.split("ITERATION 2/")[0]
    return [line for line in body.splitlines() if line.startswith("#### ")]


@pytest.fixture(scope="module")
def seed_config_run(tmp_path_factory):
    """The reference model at the seed config. One iteration: the three-step run is the shipped
    golden of tests/test_traces.py, checked against a fresh trace there."""
    out = tmp_path_factory.mktemp("run")
    rc = main(["run", "--depth", "4", "--iterations", "1", "--no-step", "--json", str(out / "t.json"),
               "--markdown", str(out / "t.md")])
    assert rc == 0
    return load(out / "t.json"), (out / "t.md").read_text()


def test_run_reproduces_the_seed_structure(seed_config_run):
    trace, md = seed_config_run
    ours, seed = first_iteration_blocks(md), first_iteration_blocks(SEED_REPORT.read_text())
    assert len(seed) == 117
    assert ours == seed
    first = trace.iterations[0]
    assert f"{first.loss:.6f}" == "11.090358"
    assert first.stepped is False  # --no-step
    assert abs(first.forward["embed.wte"].std - 1) < 0.01
    assert 0.15 <= first.forward["blocks.0.attn.sdpa"].std <= 0.21
    assert first.forward["lm_head.logits"].all_zero
    assert first.param_grads["wte.weight"].all_zero and not first.param_grads["lm_head.weight"].all_zero
    parsed = markdown.parse(md)
    assert list(parsed.iterations[0].forward) == list(first.forward)


def test_run_prints_markdown_to_stdout_and_the_loss_decreases():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_gpttrace.cli", "run", "--depth", "1", "--sequence-len", "16",
         "--vocab-size", "64", "--iterations", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# GPT Component Debug Trace")
    assert "ITERATION 3/3" in proc.stdout and "MODEL SCALING ANALYSIS" in proc.stdout
    losses = [known(it.loss) for it in markdown.parse(proc.stdout).iterations]
    assert losses[0] > losses[1] > losses[2]


def test_the_shipped_seed_config_golden_trains():
    """The three-iteration run at the seed config (kept as the shipped golden): steps lower the loss."""
    trace = load(SEED_GOLDEN)
    assert [it.stepped for it in trace.iterations] == [True, True, True]
    losses = [known(it.loss) for it in trace.iterations]
    assert f"{losses[0]:.6f}" == "11.090358" and losses[0] > losses[1] > losses[2]


def test_gpttrace_console_script_is_installed():
    exe = shutil.which("gpttrace")
    assert exe, "the gpttrace console script is not on PATH"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "convert" in proc.stdout


def test_show_renders_the_seed(capsys):
    assert main(["show", str(SEED_REPORT)]) == 0
    out = capsys.readouterr().out
    assert len(first_iteration_blocks(out)) == 117


def test_convert_round_trips_the_seed(tmp_path):
    j, md = tmp_path / "seed.json", tmp_path / "seed.md"
    assert main(["convert", str(SEED_REPORT), str(j)]) == 0
    doc = json.loads(j.read_text())
    assert doc["format"] == 1 and len(doc["iterations"]) == 3
    assert main(["convert", str(j), str(md)]) == 0
    assert markdown.parse(md.read_text()).iterations[0].forward == load(j).iterations[0].forward


def broken_inputs(tmp_path):
    good = tmp_path / "good.json"
    main(["convert", str(SEED_REPORT), str(good)])
    text = good.read_text()
    seed = SEED_REPORT.read_text()
    cases = {
        "truncated.json": (text[: len(text) // 3], "not valid JSON"),
        "future.json": (text.replace('"format": 1', '"format": 99', 1), "unknown trace format version 99"),
        "broken.md": (seed.replace("**Mean**: <span style=\"color: #5faf00\">4730.903320</span>",
                                   "**Mean**: <span style=\"color: #5faf00\">abc</span>", 1), ":"),
        "empty.md": ("", "empty"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        yield tmp_path / name, message


def test_malformed_inputs_exit_2_with_one_line_naming_the_file(tmp_path, capsys):
    for path, message in broken_inputs(tmp_path):
        for argv in (["show", str(path)], ["convert", str(path), str(tmp_path / "out.json")]):
            assert main(argv) == 2, path
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("gpttrace: error: ")
            assert path.name in err and message in err
    assert not (tmp_path / "out.json").exists()


def test_broken_markdown_names_the_line(tmp_path, capsys):
    seed = SEED_REPORT.read_text().splitlines()
    line_no = next(i for i, line in enumerate(seed, 1) if "**Mean**" in line)
    seed[line_no - 1] = "- **Mean**: <span style=\"color: #5faf00\">abc</span>"
    p = tmp_path / "broken.md"
    p.write_text("\n".join(seed))
    assert main(["show", str(p)]) == 2
    assert f"broken.md:{line_no}" in capsys.readouterr().err


def test_bad_flags_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--depth", "0"])
    assert info.value.code == 2
    assert "--depth" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--device", "meta"], "--device meta: meta tensors hold no values"),
    (["--device", "tpu"], "--device tpu: Expected one of cpu"),
    (["--json", "."], "--json .: is a folder; give a file path"),
    (["--markdown", "{tmp}/file.txt/report.md"], "/file.txt is not a folder"),
])
def test_run_refuses_bad_devices_and_output_paths_before_running(argv, message, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as info:
        main(["run", "--depth", "1", "--vocab-size", "64", "--sequence-len", "8", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_diff_of_two_configs_is_an_input_error_naming_both_files(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, depth in ((a, "1"), (b, "2")):
        assert main(["run", "--depth", depth, "--vocab-size", "64", "--sequence-len", "8", "--iterations", "1",
                     "--json", str(path)]) == 0
    capsys.readouterr()
    assert main(["diff", str(a), str(b)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"{a} and {b} are traces of different model configs (" in err and "n_layer: golden 1, obtained 2" in err


def test_written_traces_are_ordinary_files(tmp_path):
    path = tmp_path / "t.json"
    assert main(["run", "--depth", "1", "--vocab-size", "64", "--sequence-len", "8", "--iterations", "1",
                 "--json", str(path)]) == 0
    assert path.stat().st_mode & 0o044 == 0o044  # readable by others under the usual umask, not 0600


def test_a_trace_matches_its_markdown_conversion_both_ways(tmp_path, capsys):
    js, md = tmp_path / "t.json", tmp_path / "t.md"
    assert main(["run", "--depth", "1", "--vocab-size", "64", "--sequence-len", "16", "--iterations", "2",
                 "--json", str(js)]) == 0
    assert main(["convert", str(js), str(md)]) == 0
    capsys.readouterr()
    assert main(["diff", str(js), str(md)]) == 0, capsys.readouterr().out
    assert main(["diff", str(md), str(js)]) == 0, capsys.readouterr().out
    # and a real change still shows through the rounding
    doc = json.loads(js.read_text())
    doc["iterations"][0]["forward"]["blocks.0.attn.q"]["std"] *= 1.001
    js.write_text(json.dumps(doc))
    assert main(["diff", str(md), str(js)]) == 1
    assert "first divergence: blocks.0.attn.q (forward), iteration 0, std" in capsys.readouterr().out


@pytest.mark.parametrize("markdown_path", ["t.json", "./t.json", "sub/../t.json"])
def test_run_refuses_one_file_for_both_the_json_and_the_markdown(tmp_path, markdown_path):
    (tmp_path / "sub").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_gpttrace.cli", "run", "--depth", "1", "--sequence-len", "8",
         "--vocab-size", "64", "--iterations", "1", "--json", "t.json", "--markdown", markdown_path],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"gpttrace: error: run: --json and --markdown are both {markdown_path}")
    assert not (tmp_path / "t.json").exists()


def test_diff_reads_a_markdown_golden_whatever_its_suffix(tmp_path, capsys):
    golden = tmp_path / "golden.json"
    golden.write_text(SEED_REPORT.read_text())  # a Markdown report under a .json name
    assert main(["diff", str(golden), str(SEED_REPORT)]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.startswith(f"trace matches {golden}")
    assert main(["show", str(golden)]) == 0
    assert capsys.readouterr().out.startswith("# GPT Component Debug Trace")


def test_an_empty_trace_file_names_neither_format_wrongly(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text("\n")
    assert main(["show", str(path)]) == 2
    assert capsys.readouterr().err == f"gpttrace: error: {path}: the file is empty: expected a JSON trace or a Markdown report\n"


# ------------------------------------------------------------------ inputs that must not give a traceback
def gpttrace(*argv, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "pytest_gpttrace.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def assert_one_line_error(proc, *names):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("gpttrace: error: "), proc.stderr
    for name in names:
        assert str(name) in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def good_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.json"
    assert main(["convert", str(SEED_REPORT), str(path)]) == 0
    return path


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, '{"a": ' * 100000 + "1" + "}" * 100000],
                         ids=["list", "object"])
@pytest.mark.parametrize("command", ["diff", "check"])
def test_a_deeply_nested_json_file_is_one_line_naming_it(text, command, good_json, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text(text)
    argv = [command, deep, good_json] if command == "diff" else [command, deep]
    proc = gpttrace(*argv, cwd=tmp_path)
    assert_one_line_error(proc, deep, "nested too deeply")


def _edit(doc, how):
    doc = json.loads(json.dumps(doc))
    how(doc)
    return json.dumps(doc)


def _first_stats(doc):
    return next(iter(doc["iterations"][0]["forward"].values()))


BAD_INPUTS = {
    # name: (what to write, the command, words of the error)
    "folder": (None, "diff", "is a directory"),
    "latin1": (b"\xff\xfe{\x00}", "check", "not a text file"),
    "empty": ("", "show", "the file is empty"),
    "huge-integer": ('{"format": ' + "9" * 5000 + "}", "diff", "not a JSON trace"),
    "overflowing-statistic": (lambda doc: _edit(doc, lambda d: _first_stats(d).update(mean=10**400)), "check",
                              "an integer too large for a float"),
    "lone-surrogate": (lambda doc: _edit(doc, lambda d: d.update(model="\ud800")), "show",
                       "at $.model: a string holds a lone UTF-16 surrogate"),
    "deep-config": (lambda doc: _edit(doc, lambda d: d["config"].update(x=json.loads("[" * 900 + "]" * 900))),
                    "convert", "at $.config: nested deeper than 64 levels"),
    "long-number-report": (lambda doc: SEED_REPORT.read_text().replace("ITERATION 1/3", "ITERATION " + "9" * 5000 + "/3", 1),
                           "show", "a number of 5000 digits"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_file_is_one_line_naming_it_never_a_traceback(case, good_json, tmp_path):
    content, command, words = BAD_INPUTS[case]
    path = tmp_path / f"{case}.json"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        text = content(json.loads(good_json.read_text())) if callable(content) else content
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
    argv = {"diff": ["diff", good_json, path], "check": ["check", path], "show": ["show", path],
            "convert": ["convert", path, tmp_path / "out.json"]}[command]
    proc = gpttrace(*argv, cwd=tmp_path)
    assert_one_line_error(proc, path.name, words)
    assert proc.stdout == "" and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1", "x"])
def test_run_refuses_a_seed_torch_cannot_take(seed, tmp_path):
    proc = gpttrace("run", "--depth", "1", "--sequence-len", "8", "--vocab-size", "64", "--iterations", "1",
                    "--seed", seed, "--json", "t.json", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("gpttrace run: error: argument --seed: expected an integer")
    assert not (tmp_path / "t.json").exists()


def _torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or not hasattr(os, "killpg"),
                    reason="needs /proc and process groups to see when the run is under way")
def test_ctrl_c_during_run_exits_130_with_one_line_and_no_file(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_gpttrace.cli", "run", "--depth", "1", "--sequence-len", "64",
         "--vocab-size", "512", "--iterations", "100000", "--json", str(out / "t.json"), "--markdown", str(out / "t.md")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        deadline = time.monotonic() + 120
        while not _torch_loaded(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # into the run itself
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground group
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr == "gpttrace: interrupted\n" and stdout == ""
    assert not out.exists() or list(out.iterdir()) == []


def test_ctrl_c_while_writing_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch, capsys):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    target = tmp_path / "seed.json"
    try:
        code = main(["convert", str(SEED_REPORT), str(target)])
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped main() as a traceback")
    assert code == 130
    assert capsys.readouterr().err == "gpttrace: interrupted\n"
    assert list(tmp_path.iterdir()) == []
