"""Writing trace files: durable atomic writes, no umask toggling, stale temporaries, one-line errors;
the plugin's folders kept apart from the goldens; the CLI on a closed pipe and on a folder as output."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from pytest_gpttrace import traceio
from pytest_gpttrace.errors import GptTraceError
from pytest_gpttrace.traceio import sweep_stale_temps, write_text_atomic
from tests.paths import ROOT, TINY_GOLDEN
from tests.projects import GOLDEN, run


# --------------------------------------------------------------------------- write_text_atomic
def test_a_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        return real_fsync(fd)

    def replace(a, b):
        events.append("replace")
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert write_text_atomic(tmp_path / "a" / "t.json", "{}")
    assert events[:2] == ["fsync-file", "replace"]
    if sys.platform.startswith("linux"):
        assert events == ["fsync-file", "replace", "fsync-dir"]
    assert (tmp_path / "a" / "t.json").read_text() == "{}"


def test_a_folder_that_cannot_be_synced_is_fine(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(22, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert write_text_atomic(tmp_path / "t.json", "{}") is True
    assert (tmp_path / "t.json").read_text() == "{}"


def test_a_write_leaves_the_umask_alone_and_gives_a_new_file_the_usual_mode(tmp_path, monkeypatch):
    umask = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError("os.umask changed while writing: it is process-wide")

        monkeypatch.setattr(os, "umask", no_umask)
        write_text_atomic(tmp_path / "new.json", "{}")
    finally:
        monkeypatch.undo()
        os.umask(umask)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
    existing = tmp_path / "existing.json"
    existing.write_text("old")
    existing.chmod(0o604)
    write_text_atomic(existing, "new")
    assert existing.stat().st_mode & 0o777 == 0o604 and existing.read_text() == "new"


def test_stale_temporaries_of_a_killed_writer_are_swept_and_fresh_ones_kept(tmp_path):
    folder = tmp_path / "golden"
    folder.mkdir()
    stale, fresh = folder / ".t.json.ab12cd34.tmp", folder / ".u.json.ef56gh78.tmp"
    other = folder / ".notes.tmp"  # not one of ours
    for f in (stale, fresh, other):
        f.write_text("{")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    write_text_atomic(folder / "t.json", "{}")
    assert not stale.exists() and fresh.exists() and other.exists()
    assert sorted(p.name for p in folder.iterdir()) == [".notes.tmp", ".u.json.ef56gh78.tmp", "t.json"]
    assert sweep_stale_temps(folder, now=time.time() + 3600) == [fresh]


def test_a_file_in_the_way_is_one_line_naming_the_path_and_the_cause(tmp_path):
    (tmp_path / "golden").write_text("")
    target = tmp_path / "golden" / "t" / "f.json"
    with pytest.raises(GptTraceError) as info:
        write_text_atomic(target, "{}")
    assert str(info.value) == f"cannot write {target}: 'golden' on its path is a file, not a folder"
    assert isinstance(info.value, OSError) and ".tmp" not in str(info.value)


def test_a_folder_as_the_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "out.json").mkdir()
    with pytest.raises(GptTraceError, match=r"^cannot write .*out\.json: it is a folder; give a file path$"):
        write_text_atomic(tmp_path / "out.json", "{}")


def test_a_read_only_folder_is_one_line_naming_the_path(tmp_path, monkeypatch):
    """What a read-only folder does to the temporary file (made here the same for root, who may
    write anywhere): the error names the golden, not the hidden temporary name."""
    folder = tmp_path / "golden"
    folder.mkdir()

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / ".f.json.abcdefgh.tmp"))

    monkeypatch.setattr(traceio, "_open_temp", refused)
    with pytest.raises(GptTraceError, match=r"^cannot write .*golden/f\.json: its folder is not writable") as caught:
        write_text_atomic(folder / "f.json", "{}")
    assert ".tmp" not in str(caught.value)


# --------------------------------------------------------------------------- the CLI
def gpttrace(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pytest_gpttrace.cli", *args], env=env, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_diff_into_a_pipe_closed_early_ends_quietly(tmp_path):
    doc = json.loads(TINY_GOLDEN.read_text())
    for it in doc["iterations"]:
        for stats in it["forward"].values():
            if isinstance(stats.get("std"), float):
                stats["std"] *= 1.5
    obtained = tmp_path / "obtained.json"
    obtained.write_text(json.dumps(doc))
    proc = gpttrace("diff", str(TINY_GOLDEN), str(obtained), stdout=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does once it has its lines
    _, err = proc.communicate(timeout=120)
    assert err == "", err  # before: "gpttrace: error: Broken pipe"
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away


def test_convert_to_a_folder_names_the_folder_given(tmp_path):
    (tmp_path / "out.json").mkdir()
    proc = gpttrace("convert", str(TINY_GOLDEN), str(tmp_path / "out.json"), stdout=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    assert err.strip() == f"gpttrace: error: cannot write {tmp_path / 'out.json'}: it is a folder; give a file path"


# --------------------------------------------------------------------------- the plugin's folders
@pytest.mark.parametrize("option, folder", [
    ("--gpt-trace-report", "golden"),
    ("--gpt-trace-report", "golden/reports"),
    ("--gpt-trace-report", "."),
    ("--gpt-trace-results-dir", "golden"),
    ("--gpt-trace-results-dir", "golden/obtained"),
])
def test_an_output_folder_overlapping_the_goldens_is_refused_up_front(project, option, folder):
    result = run(project, "--gpt-trace", option, folder)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {option}* and the golden folder golden/ (--gpt-trace-golden-dir*) overlap: *"])
    assert not (project.path / "golden").exists()


def test_a_report_in_the_golden_folder_no_longer_overwrites_a_failing_golden(project):
    run(project, "--update-golden").assert_outcomes(passed=1)
    golden = project.path / GOLDEN
    doc = json.loads(golden.read_text())
    doc["iterations"][0]["forward"]["blocks.1.attn.q_rope"]["std"] *= 1.01
    golden.write_text(json.dumps(doc))
    before = golden.read_text()
    result = run(project, "--gpt-trace", "--gpt-trace-report", "golden")
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # before: the report replaced the golden and it passed
    assert golden.read_text() == before
    result = run(project, "--gpt-trace", "--gpt-trace-results-dir", "golden")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert golden.read_text() == before
    run(project, "--gpt-trace").assert_outcomes(failed=1)


def test_folders_apart_from_the_goldens_are_accepted(project):
    result = run(project, "--update-golden", "--gpt-trace-report", "reports", "--gpt-trace-results-dir", "obtained")
    result.assert_outcomes(passed=1)
    assert (project.path / "reports" / "test_model" / "test_model.json").is_file()


def test_a_file_in_the_way_of_the_golden_folder_fails_the_test_in_one_line(project):
    (project.path / "golden").write_text("not a folder")
    result = run(project, "--update-golden")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "cannot write golden trace golden/test_model/test_model.json: 'golden' on its path is a file, not a folder*",
    ])
    result.stdout.no_fnmatch_line("*.tmp*")
    result.stdout.no_fnmatch_line("*Traceback*")


def test_a_report_folder_that_cannot_be_written_fails_the_test_in_one_line(project):
    """Before: a 111-line traceback through the gpt_trace fixture."""
    (project.path / "afile").write_text("")
    result = run(project, "--gpt-trace", "--gpt-trace-report", "afile/reports")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--gpt-trace-report: cannot write *afile/reports/test_model/test_model.json: "
                                 "'afile' on its path is a file, not a folder*"])
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.no_fnmatch_line("*WriteError*")


def test_a_killed_writers_temporary_file_is_removed_when_the_next_session_starts(project):
    """Before: only a later write into the same folder removed it; a passing run left it forever."""
    run(project, "--update-golden").assert_outcomes(passed=1)
    stale = project.path / "golden" / "test_model" / ".test_model.json.abcd1234.tmp"
    stale.write_text("{")
    fresh = stale.with_name(".test_model.json.0123abcd.tmp")
    fresh.write_text("{")  # a writer's that may still be running: kept
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    run(project, "--gpt-trace").assert_outcomes(passed=1)
    assert not stale.exists() and fresh.exists()
