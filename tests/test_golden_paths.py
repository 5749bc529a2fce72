"""Golden file names from node ids: stable for plain ids, bounded, collision-free, never outside the folder."""

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_gpttrace.folders import folder_conflict
from pytest_gpttrace.golden import MAX_NAME_BYTES, golden_relpath
from tests.paths import GOLDEN_DIR, SEED_GOLDEN, TINY_GOLDEN


@pytest.mark.parametrize("nodeid, expected", [
    ("tests/test_traces.py::test_reference_model_at_the_seed_config",
     "tests/test_traces/test_reference_model_at_the_seed_config.json"),
    ("tests/test_traces.py::test_reference_model_tiny[tiny]",
     "tests/test_traces/test_reference_model_tiny[tiny].json"),
    ("tests/test_traces.py::test_reference_model_tiny_gradient_accumulation[tiny]",
     "tests/test_traces/test_reference_model_tiny_gradient_accumulation[tiny].json"),
    ("test_model.py::test_model", "test_model/test_model.json"),
    ("tests/test_m.py::test_f[p-1.5]", "tests/test_m/test_f[p-1.5].json"),
])
def test_plain_lowercase_ids_keep_their_paths(nodeid, expected):
    assert golden_relpath(nodeid).as_posix() == expected


def test_the_shipped_goldens_are_where_their_ids_point():
    for name in ("test_reference_model_at_the_seed_config", "test_reference_model_tiny[tiny]",
                 "test_reference_model_tiny_gradient_accumulation[tiny]"):
        path = GOLDEN_DIR / golden_relpath(f"tests/test_traces.py::{name}")
        assert path.is_file(), path
    # the paths the other tests read are these
    assert GOLDEN_DIR / golden_relpath("tests/test_traces.py::test_reference_model_at_the_seed_config") == SEED_GOLDEN
    assert GOLDEN_DIR / golden_relpath("tests/test_traces.py::test_reference_model_tiny[tiny]") == TINY_GOLDEN


def test_a_device_type_goes_into_the_name():
    assert golden_relpath("t.py::f", "cuda").as_posix() == "t/f.cuda.json"


@pytest.mark.parametrize("param", ["a" * 300, "é" * 100, "x-" * 200, "A" * 300])
def test_a_long_id_is_bounded_in_bytes_and_can_be_written(tmp_path, param):
    for device in ("cpu", "cuda"):
        rel = golden_relpath(f"tests/test_m.py::TestC::test_f[{param}]", device)
        assert all(len(part.encode()) <= MAX_NAME_BYTES for part in rel.parts)
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")  # before: OSError: File name too long
    long_a, long_b = (golden_relpath(f"t.py::f[{'a' * 300}{c}]") for c in "xy")
    assert long_a != long_b  # cut to the same prefix, told apart by the hash


@pytest.mark.parametrize("nodeid", ["::test_f", "../x/t.py::test_f", "../../t.py::f", "..::f", "/abs/t.py::f",
                                    "t.py::", "", "::"])
def test_a_test_file_outside_rootdir_gets_a_path_inside_the_golden_folder(tmp_path, nodeid):
    rel = golden_relpath(nodeid)
    assert not rel.is_absolute() and ".." not in rel.parts and "." not in rel.parts
    assert (tmp_path / rel).resolve().is_relative_to(tmp_path.resolve())


def test_parent_parts_are_kept_apart_from_a_plain_path():
    assert golden_relpath("../x/t.py::f") != golden_relpath("x/t.py::f")
    assert golden_relpath("../../x/t.py::f") != golden_relpath("../x/t.py::f")


@pytest.mark.parametrize("a, b", [
    ("t.py::test_f[A]", "t.py::test_f[a]"),
    ("t.py::TestC::f", "t.py::Testc::f"),
    ("T.py::f", "t.py::f"),
    ("t.py::test_F", "t.py::test_f"),
])
def test_ids_that_differ_only_in_case_get_files_that_differ_without_case(a, b):
    assert str(golden_relpath(a)).lower() != str(golden_relpath(b)).lower()


@given(st.text(max_size=400), st.sampled_from(["cpu", "cuda", "mps", "../x", "A" * 200]))
def test_no_id_leaves_the_golden_folder(nodeid, device):
    golden_dir = Path("/golden-root/golden")
    rel = golden_relpath(nodeid, device)
    assert not rel.is_absolute()
    assert all(part not in ("", ".", "..") for part in rel.parts)
    assert all(len(part.encode()) <= MAX_NAME_BYTES for part in rel.parts)
    assert all("/" not in part and "\\" not in part and "\0" not in part for part in rel.parts)
    resolved = Path(os.path.normpath(golden_dir / rel))
    assert resolved.is_relative_to(golden_dir) and resolved != golden_dir
    assert rel.name.endswith(".json")


@given(st.lists(st.text(alphabet="abcAB_-.[]/ é", max_size=12), min_size=2, max_size=2, unique=True))
def test_distinct_test_names_get_distinct_files_even_without_case(names):
    a, b = (golden_relpath(f"t.py::{n}") for n in names)
    assert str(a).lower() != str(b).lower()


# --------------------------------------------------------------------------- folders apart
@pytest.mark.parametrize("other", ["golden", "golden/reports", "."])
def test_an_output_folder_overlapping_the_goldens_is_named_with_the_golden_folder(tmp_path, other):
    message = folder_conflict(tmp_path / "golden", "--gpt-trace-golden-dir",
                              [("--gpt-trace-report", tmp_path / other)], tmp_path)
    assert message is not None and "\n" not in message
    assert message.startswith("--gpt-trace-report ") and "golden folder golden/" in message


def test_folders_apart_from_the_goldens_pass(tmp_path):
    assert folder_conflict(tmp_path / "golden", "--gpt-trace-golden-dir",
                           [("--gpt-trace-report", tmp_path / "golden-reports"),
                            ("--gpt-trace-results-dir", tmp_path / ".gpttrace-results"), ("x", None)]) is None
