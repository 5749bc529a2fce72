"""Calibration bands: measuring them, pooling them, comparing under them, and the format that keeps them."""

from dataclasses import replace

import pytest

from pytest_gpttrace.calibrate import Replay, effective_bands, incomparable, measure, scale
from pytest_gpttrace.compare import CALIBRATED_FLOOR, CALIBRATED_K, compare, resolve_profile
from pytest_gpttrace.errors import TraceFormatError
from pytest_gpttrace.replay import CAPS, cpu_levels, plan_variants
from pytest_gpttrace.report import render_comparison
from pytest_gpttrace.trace import STAT_FIELDS, Trace, dumps, load, loads, replace_stats
from tests.builders import make_iteration as it
from tests.builders import make_stats
from tests.paths import TINY_GOLDEN

S = make_stats((4,), mean=0.5, std=1.0, min=-1.0, max=2.0, rms=1.2, zero_frac=0.25)


def trace(*iterations, calibration=None):
    return Trace({}, {"device_type": "cpu"}, tuple(iterations), calibration=calibration)


def replay(t, name="r"):
    return Replay(name, name, t)


def calibrated(golden, *others):
    return measure(golden, [replay(o, f"r{n}") for n, o in enumerate(others)], k=CALIBRATED_K,
                   floor=CALIBRATED_FLOOR)


# ----------------------------------------------------------------------------- measuring
def test_the_band_is_the_largest_deviation_of_the_replays():
    golden = trace(it(0, 2.0, {"x": S}))
    a = trace(it(0, 2.0 + 1e-6, {"x": replace_stats(S, std=1.0 + 3e-7, max=2.0 - 1e-7)}))
    b = trace(it(0, 2.0 - 4e-6, {"x": replace_stats(S, std=1.0 - 1e-7, max=2.0 + 5e-7)}))
    out = calibrated(golden, a, b)
    band = out.iterations[0].forward["x"].band
    assert band["std"] == pytest.approx(3e-7, rel=1e-6)
    assert band["max"] == pytest.approx(5e-7, rel=1e-6)
    assert band["mean"] == 0.0 and band["zero_frac"] == 0.0
    assert out.iterations[0].loss_band == pytest.approx(4e-6, rel=1e-6)
    assert out.calibration["replays"] == 2 and out.calibration["excluded"] == []
    assert out.calibration["k"] == CALIBRATED_K


@pytest.mark.parametrize("change, reason", [
    (lambda s: replace_stats(s, nan=1), "1 NaN"),
    (lambda s: replace_stats(s, shape=(5,), numel=5), "[5]"),
    (lambda s: replace_stats(s, zero_frac=1.0), "all zero"),
])
def test_an_incomparable_replay_is_left_out_and_named(change, reason):
    golden = trace(it(0, 1.0, {"x": S}))
    odd = trace(it(0, 1.0, {"x": change(S)}))
    fine = trace(it(0, 1.0, {"x": replace_stats(S, std=1.0 + 1e-7)}))
    out = measure(golden, [Replay("cap-odd", "odd", odd), Replay("fine", "fine", fine)], k=4, floor=1e-6)
    assert out.calibration is not None
    assert [v["variant"] for v in out.calibration["variants"]] == ["fine"]
    [left_out] = out.calibration["excluded"]
    assert left_out["variant"] == "cap-odd" and reason in left_out["reason"] and "x (forward)" in left_out["reason"]
    band = out.iterations[0].forward["x"].band
    assert band is not None and band["std"] == pytest.approx(1e-7, rel=1e-6)


def test_another_stage_set_and_a_failed_replay_are_left_out():
    golden = trace(it(0, 1.0, {"x": S}))
    other = trace(it(0, 1.0, {"x": S, "y": S}))
    reason = incomparable(golden, other)
    assert reason is not None and "has y" in reason
    out = measure(golden, [Replay("a", "a", other), Replay("b", "b", None, "exit 1 without a trace")], k=4,
                  floor=1e-6)
    assert out.calibration is not None
    assert [e["variant"] for e in out.calibration["excluded"]] == ["a", "b"]
    assert out.calibration["replays"] == 0


# ----------------------------------------------------------------------------- pooling
def test_a_stage_band_is_pooled_over_its_statistics_and_the_section_median():
    quiet_band = {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "rms": 0.0, "zero_frac": 0.0}
    quiet = make_stats((4,), mean=0.0, std=1.0, min=-1.0, max=1.0, rms=1.0, zero_frac=0.0, band=quiet_band)
    noisy = replace(quiet, band={**quiet_band, "std": 1e-3})
    iteration = it(0, 1.0, {"a": noisy, "b": quiet, "c": noisy})
    bands = effective_bands(iteration)
    # within a stage: std's relative noise reaches every scaled statistic
    assert bands[("forward", "a")]["max"] == pytest.approx(1e-3 * scale("max", noisy))
    assert bands[("forward", "a")]["mean"] == pytest.approx(1e-3 * scale("mean", noisy))
    # across stages: the quiet one gets the section's median relative noise (1e-3 of 3 stages)
    assert bands[("forward", "b")]["std"] == pytest.approx(1e-3)
    assert bands[("forward", "b")]["zero_frac"] == 0.0


# ----------------------------------------------------------------------------- comparing
def test_calibrated_allows_k_times_the_band_and_never_less_than_the_floor():
    g = replace(S, band={"mean": 0.0, "std": 1e-4, "min": 0.0, "max": 0.0, "rms": 0.0, "zero_frac": 0.0})
    golden = trace(it(0, 1.0, {"x": g}), calibration={"k": 4})
    pooled = effective_bands(golden.iterations[0])[("forward", "x")]["std"]
    assert pooled == pytest.approx(1e-4)
    inside = trace(it(0, 1.0, {"x": replace_stats(S, std=1.0 + 3.9e-4)}))
    outside = trace(it(0, 1.0, {"x": replace_stats(S, std=1.0 + 4.1e-4)}))
    assert compare(golden, inside).ok
    result = compare(golden, outside)
    assert result.profile.name == "calibrated"
    [m] = result.mismatches
    assert m.stat == "std" and m.band == pytest.approx(1e-4) and m.allowed == pytest.approx(4e-4)
    # a band of zero still allows the floor
    flat = replace(S, band=dict.fromkeys(STAT_FIELDS, 0.0))
    golden = trace(it(0, 1.0, {"x": flat}), calibration={"k": 4})
    assert compare(golden, trace(it(0, 1.0, {"x": replace_stats(S, std=1.0 + 0.9 * CALIBRATED_FLOOR)}))).ok
    assert not compare(golden, trace(it(0, 1.0, {"x": replace_stats(S, std=1.0 + 1.1 * CALIBRATED_FLOOR)}))).ok


def test_an_override_wins_over_the_band():
    g = replace(S, band=dict.fromkeys(STAT_FIELDS, 0.0))
    golden = trace(it(0, 1.0, {"x": g}), calibration={"k": 4})
    obtained = trace(it(0, 1.0, {"x": replace_stats(S, std=1.5)}))
    from pytest_gpttrace.compare import parse_override

    profile = resolve_profile("calibrated", golden, [parse_override("x std rtol=0.6")])
    assert compare(golden, obtained, profile).ok


def test_profiles_resolve_from_the_golden():
    plain = trace(it(0, 1.0, {"x": S}))
    assert resolve_profile(None, plain).name == "exact"
    assert resolve_profile("auto", calibrated(plain, plain)).name == "calibrated"
    assert resolve_profile("exact", calibrated(plain, plain)).name == "exact"
    with pytest.raises(ValueError, match="--gpt-trace-recalibrate"):
        resolve_profile("calibrated", plain)


def test_headroom_names_the_closest_statistic():
    g = replace(S, band=dict.fromkeys(STAT_FIELDS, 1e-3))
    golden = trace(it(0, 1.0, {"x": g, "y": g}), calibration={"k": 4})
    obtained = trace(it(0, 1.0, {"x": replace_stats(S, max=2.0 + 1e-3), "y": S}))
    result = compare(golden, obtained)
    assert result.ok and result.worst is not None
    assert (result.worst.stage, result.worst.stat) == ("x", "max")
    assert result.worst.describe().startswith("worst x max (iteration 0) at 0.")
    assert "worst x max" in render_comparison(result, golden_name="g.json")[0]


# ----------------------------------------------------------------------------- the shipped golden
def test_the_shipped_tiny_golden_is_calibrated_with_its_provenance():
    golden = load(TINY_GOLDEN)
    cal = golden.calibration
    assert cal is not None
    names = [v["variant"] for v in cal["variants"]]
    assert "cap-default" in names and any(n.startswith("threads-") for n in names)
    assert any(n.startswith("dither-") for n in names)
    env = cal["variants"][0]["environment"]
    assert {"torch", "device_name", "cpu_capability", "threads"} <= set(env)
    assert {"device_name", "cpu_capability", "matmul_precision"} <= set(golden.environment)


def _scaled(golden, i, section, stage, stat, factor):
    it0 = golden.iterations[i]
    stages = dict(getattr(it0, section))
    s = stages[stage]
    stages[stage] = replace_stats(s, **{stat: getattr(s, stat) * factor})
    return replace(golden, iterations=(*golden.iterations[:i], replace(it0, **{section: stages}), *golden.iterations[i + 1:]))


def test_negative_control_a_1e4_relative_change_at_iteration_0_fails_for_every_stage():
    """The band is not a blanket: at iteration 0, moving any one stage's std, rms or extreme by a
    relative 1e-4 fails under the calibrated profile, and names that stage."""
    golden = load(TINY_GOLDEN)
    checked = 0
    for section in ("forward", "stage_grads", "param_grads"):
        for stage, s in golden.iterations[0].__getattribute__(section).items():
            if s is None or s.all_zero or s.numel < 2:
                continue
            for stat in ("std", "rms", "max", "min"):
                value = getattr(s, stat)
                if not value or abs(value) < 0.1 * (s.rms or 0):  # an extreme near zero: relative is meaningless
                    continue
                obtained = _scaled(golden, 0, section, stage, stat, 1 + 1e-4)
                result = compare(golden, obtained)
                assert not result.ok and result.first is not None, f"{section} {stage} {stat}: a 1e-4 change passed"
                assert (result.first.section, result.first.stage, result.first.stat) == (section, stage, stat)
                checked += 1
    assert checked > 100


# ----------------------------------------------------------------------------- the format
def test_format_2_round_trips_bit_for_bit_and_format_1_still_reads(tmp_path):
    golden = load(TINY_GOLDEN)
    text = dumps(golden)
    assert text.splitlines()[1] == '  "format": 2,'
    back = loads(text)
    assert dumps(back) == text
    assert back.iterations[2].forward["blocks.0.attn.q"].band == golden.iterations[2].forward["blocks.0.attn.q"].band
    plain = replace(golden, calibration=None,
                    iterations=tuple(replace(i, loss_band=None, forward={k: replace(v, band=None)
                                                                          for k, v in i.forward.items()},
                                             stage_grads={}, param_grads={}) for i in golden.iterations))
    old = dumps(plain)
    assert old.splitlines()[1] == '  "format": 1,' and '"band"' not in old
    assert not loads(old).calibrated
    # one stage per line, the band at its end
    line = next(x for x in text.splitlines() if '"blocks.0.attn.q":' in x)
    assert line.rstrip(",").endswith("}}") and '"band": {"mean"' in line


def test_a_format_2_file_without_its_calibration_or_with_a_bad_band_is_refused(tmp_path):
    text = dumps(load(TINY_GOLDEN))
    no_cal = "\n".join(x for x in text.splitlines() if not x.startswith('  "calibration"'))
    with pytest.raises(TraceFormatError, match='missing field "calibration"'):
        loads(no_cal, file=tmp_path / "g.json")
    bad = text.replace('"band": {"mean": ', '"band": {"mena": ', 1)
    with pytest.raises(TraceFormatError, match=r"band: unknown statistic 'mena'"):
        loads(bad, file=tmp_path / "g.json")


# ----------------------------------------------------------------------------- the variants
def test_the_variants_follow_the_cpu_and_the_run():
    def plan(threads, **kw):
        return [(v.name, v.threads) for v in plan_variants("cpu", threads, **kw)]

    avx2 = {"avx2", "fma"}
    # every platform at the run's thread count and at the other: the two interact in a reduction
    assert plan(2, dithers=2, environ={}, flags=avx2) == [
        ("cap-default", 2), ("threads-1", 1), ("cap-default+threads-1", 1), ("dither-1", 2), ("dither-2", 2)]
    amx = {"avx2", "avx512f", "amx_tile"}
    assert plan(1, dithers=1, environ={}, flags=amx) == [
        ("cap-default", 1), ("cap-avx2", 1), ("cap-avx512", 1), ("threads-2", 2),
        ("cap-default+threads-2", 2), ("cap-avx2+threads-2", 2), ("cap-avx512+threads-2", 2), ("dither-1", 1)]
    # a run capped at default already: the platform it is not on is the uncapped one
    assert plan(1, dithers=0, environ=CAPS["default"], flags=avx2) == [
        ("native", 1), ("threads-2", 2), ("native+threads-2", 2)]
    native = next(v for v in plan_variants("cpu", 1, dithers=0, environ=CAPS["default"], flags=avx2))
    assert all(native.env[k] is None for k in CAPS["default"])
    cuda = [v.name for v in plan_variants("cuda", 1, dithers=1, tf32=False)]
    assert cuda == ["tf32-on", "sdpa-math", "deterministic", "dither-1"]
    assert cpu_levels(set()) == ["default"]


def test_token_ids_keep_their_own_exact_band():
    ids = make_stats((8,), dtype="torch.int64", mean=10.0, std=3.0, min=1.0, max=20.0, rms=11.0, zero_frac=0.0,
                     band=dict.fromkeys(STAT_FIELDS, 0.0))
    noisy = replace(S, band={**dict.fromkeys(STAT_FIELDS, 0.0), "std": 1e-2})
    bands = effective_bands(it(0, 1.0, {"inputs.idx": ids, "a": noisy, "b": noisy}))
    assert bands[("forward", "inputs.idx")]["max"] == 0.0


def test_a_replay_of_another_schedule_is_not_noise():
    golden = trace(it(0, 1.0, {"x": S}))
    other = trace(it(0, 1.0, {"x": S}, lr={"AdamW[0]": 0.1}))
    reason = incomparable(golden, other)
    assert reason is not None and "another optimizer schedule" in reason


def test_without_a_usable_replay_the_golden_is_written_without_a_band(tmp_path):
    from pytest_gpttrace.calibrate import Calibrated
    from pytest_gpttrace.golden import GoldenTrace

    obtained = trace(it(0, 1.0, {"x": S}))
    failed = measure(obtained, [Replay("cap-default", "d", None, "exit 4 without a trace")], k=4, floor=1e-6)
    golden = GoldenTrace("t.py::test", tmp_path / "golden", tmp_path / "results", tmp_path, update=True,
                         calibrator=lambda t: Calibrated(failed, 1.0))
    assert golden == obtained
    assert golden.path is not None and not load(golden.path).calibrated
    assert golden.calibration_note is not None
    assert golden.calibration_note.startswith("NOT calibrated, no usable replay")
