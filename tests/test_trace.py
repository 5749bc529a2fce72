import math

import pytest
from hypothesis import given

from pytest_gpttrace.errors import TraceFormatError
from pytest_gpttrace.trace import FORMAT_VERSION, Iteration, Trace, dumps, load, loads
from tests.builders import make_stats
from tests.strategies import traces


def same(a, b):
    """Equality where NaN equals NaN (bit-for-bit round trip)."""
    return dumps(a) == dumps(b)


@given(traces())
def test_json_round_trip_is_bit_exact(trace):
    text = dumps(trace)
    back = loads(text)
    assert same(back, trace)
    for it_a, it_b in zip(back.iterations, trace.iterations, strict=True):
        for name, s in it_b.forward.items():
            for k in ("mean", "std", "min", "max", "rms", "zero_frac"):
                a, b = getattr(it_a.forward[name], k), getattr(s, k)
                assert (a is None and b is None) or (math.isnan(a) and math.isnan(b)) or a == b


def test_one_stage_per_line_and_stable_key_order():
    s = make_stats((2,), mean=0.1, std=0.2, min=0.0, max=0.3, rms=0.25, zero_frac=0.5)
    trace = Trace({"b": 1, "a": 2}, {}, (Iteration(0, 1.5, True, {}, {"x": s, "y": s}, {}, {"w": None}),))
    text = dumps(trace)
    lines = text.splitlines()
    assert sum('"x": {"shape": [2], "dtype": "torch.float32", "device": "cpu", "numel": 2, "mean": 0.1' in line for line in lines) == 1
    assert any(line.strip() == '"w": null' for line in lines)
    assert text.index('"format"') < text.index('"config"') < text.index('"iterations"')
    assert dumps(loads(text)) == text


def write(tmp_path, text, name="golden.json"):
    p = tmp_path / name
    p.write_text(text)
    return p


def valid_text():
    s = make_stats((2,), mean=0.1, std=0.2, min=0.0, max=0.3, rms=0.25, zero_frac=0.5)
    return dumps(Trace({}, {}, (Iteration(0, 1.5, True, {}, {"blocks.0.attn.q": s}, {}, {}),)))


@pytest.mark.parametrize(
    "mutate, path, message",
    [
        (lambda t: t[: len(t) // 2], "", "not valid JSON (line"),
        (lambda t: "", "", "the file is empty"),
        (lambda t: "[1, 2]", "$", "expected a JSON object, got a list"),
        (lambda t: t.replace(f'"format": {FORMAT_VERSION}', '"format": 99'), "$.format", "unknown trace format version 99"),
        (lambda t: t.replace(f'"format": {FORMAT_VERSION},', ''), "$", 'missing field "format"'),
        (lambda t: t.replace('"std": 0.2', '"std": "wide"'), '$.iterations[0].forward["blocks.0.attn.q"].std', "expected a number or null, got a string 'wide'"),
        (lambda t: t.replace('"shape": [2]', '"shape": "2"'), '$.iterations[0].forward["blocks.0.attn.q"].shape', "expected a list of dimension sizes"),
        (lambda t: t.replace('"stepped": true', '"stepped": 1'), "$.iterations[0].stepped", "expected true, false or null"),
        (lambda t: t.replace('"numel": 2, ', ''), '$.iterations[0].forward["blocks.0.attn.q"]', 'missing field "numel"'),
    ],
)
def test_malformed_files_name_the_file_the_path_and_what_was_expected(tmp_path, mutate, path, message):
    p = write(tmp_path, mutate(valid_text()))
    with pytest.raises(TraceFormatError) as info:
        load(p)
    err = info.value
    assert err.file == p and err.path == path
    first_line = str(err).splitlines()[0]
    assert str(p) in first_line and message in first_line


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(TraceFormatError, match=r"nope\.json: no such file"):
        load(tmp_path / "nope.json")


def test_frozen_params_round_trip_and_are_omitted_when_there_are_none():
    trace = Trace(config={}, environment={}, iterations=(), frozen_params=("wte.weight",))
    text = dumps(trace)
    assert '"frozen_params": ["wte.weight"]' in text and loads(text).frozen_params == ("wte.weight",)
    plain = dumps(Trace(config={}, environment={}, iterations=()))
    assert "frozen_params" not in plain and loads(plain).frozen_params == ()
    with pytest.raises(TraceFormatError, match=r"\$\.frozen_params: expected a list of parameter names"):
        loads(text.replace('["wte.weight"]', '[1]'), "t.json")


def test_provenance_defaults_to_exact_and_complete_and_is_not_written():
    from dataclasses import replace

    from pytest_gpttrace.trace import Provenance

    trace = Trace(config={}, environment={}, iterations=())
    assert trace.provenance == Provenance(quantum=0.0, complete=True, source="json")
    rounded = replace(trace, provenance=Provenance(quantum=5e-7, complete=False, source="markdown"))
    assert dumps(rounded) == dumps(trace) and rounded == trace
    assert loads(dumps(rounded)).provenance == Provenance()


def test_the_rms_estimate_is_the_recorded_rms_or_the_one_mean_and_std_imply():
    import torch

    from pytest_gpttrace.stats import tensor_stats

    x = torch.tensor([1.0, -2.0, 4.0, 0.5])
    recorded = tensor_stats(x)
    assert recorded.rms_estimate == recorded.rms
    implied = make_stats((4,), mean=recorded.mean, std=recorded.std, rms=None)
    assert implied.rms_estimate == pytest.approx(math.sqrt((x**2).mean().item()), rel=1e-12)
    assert make_stats((1,), mean=3.0, std=0.0, rms=None).rms_estimate == 3.0
    assert make_stats((0,), mean=None, std=None, rms=None).rms_estimate is None


def test_stage_kinds_and_inputs_round_trip_and_are_omitted_when_there_are_none():
    s = make_stats((2,), mean=0.1, std=0.2, min=0.0, max=0.3, rms=0.25, zero_frac=0.5)
    its = (Iteration(0, 1.5, True, {}, {"a.c_q": s, "a/rotary#1": s}, {}, {}),)
    trace = Trace({}, {}, its, stage_kinds={"a.c_q": "linear", "a/rotary#1": "rotary"},
                  stage_inputs={"a/rotary#1": "a.c_q"})
    text = dumps(trace)
    assert '"stage_kinds": {"a.c_q": "linear", "a/rotary#1": "rotary"},' in text
    assert '"stage_inputs": {"a/rotary#1": "a.c_q"},' in text
    back = loads(text)
    assert back.stage_kinds == trace.stage_kinds and back.stage_inputs == trace.stage_inputs
    assert dumps(back) == text
    plain = dumps(Trace({}, {}, its))  # a trace written before kinds: no key, and read back empty
    assert "stage_kinds" not in plain and "stage_inputs" not in plain
    assert loads(plain).stage_kinds == {} and loads(plain).stage_inputs == {}


@pytest.mark.parametrize(("old", "new", "path", "message"), [
    ('"rotary"}', '"rope"}', '$.stage_kinds["a/rotary#1"]', "unknown stage kind 'rope'; expected one of norm, "),
    ('"rotary"}', '3}', '$.stage_kinds["a/rotary#1"]', "expected stage kind (a string), got an integer 3"),
    ('"stage_kinds": {"a/rotary#1": "rotary"}', '"stage_kinds": []', "$.stage_kinds",
     "expected an object of stage name -> stage kind, got a list"),
    ('{"a/rotary#1": "a.c_q"}', '{"a/rotary#1": null}', '$.stage_inputs["a/rotary#1"]',
     "expected stage name (a string), got null"),
])
def test_malformed_stage_kinds_name_the_json_path(old, new, path, message):
    trace = Trace({}, {}, (), stage_kinds={"a/rotary#1": "rotary"}, stage_inputs={"a/rotary#1": "a.c_q"})
    text = dumps(trace)
    assert old in text
    with pytest.raises(TraceFormatError) as info:
        loads(text.replace(old, new), "t.json")
    assert info.value.path == path and message in str(info.value)
