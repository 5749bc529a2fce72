"""Calibration bands: the measured noise of every statistic of a golden (pure: no torch, no pytest).

A golden is recorded once, then the same test is replayed under platform variants (``replay``):
kernels capped at each lower ISA level the CPU has, the other thread count, and dithered replays
that perturb every floating-point result by a random ulp (``dither``), each a draw of "another
machine's kernels". The band of a statistic is the largest |replay - golden| over the replays that
are comparable with the golden. ``calibrated`` comparison (``compare``) allows

    max(floor, k * pooled band)

per statistic, where the pooled band (``effective_bands``) guards against a band that a few
replays measured too small:

1. within a stage, the band of mean, std, rms, min and max is at least the largest of them
   relative to each statistic's scale (the stage's noise is one noise, seen through five windows);
2. within one iteration and section, every statistic's relative band is at least the median of the
   stages' relative bands (the noise after an optimizer step reaches every stage).

Scales: the mean's is the stage rms (a mean cancels towards zero), std's and rms's their value,
min's and max's |value| + rms; zero fractions and the loss are pooled apart, in their own units.

A replay that is not comparable (another stage set, a shape, a NaN or an Inf count, a stage that is
all zeros on one side only) is not noise but a platform difference worth seeing: it is left out of
the band and named in the calibration's ``excluded`` list.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypedDict

from .trace import STAGE_SECTIONS, Iteration, JSONObject, Section, TensorStats, Trace

BAND_STATS = ("mean", "std", "min", "max", "rms", "zero_frac")
SCALED = ("mean", "std", "min", "max", "rms")  # pooled together within a stage
SECTIONS = STAGE_SECTIONS


@dataclass(frozen=True)
class Replay:
    """One replay's outcome: its variant's name and description, the trace (None when it failed)."""

    variant: str
    description: str
    trace: Trace | None
    error: str | None = None
    environment: JSONObject | None = None


def scale(stat: str, s: TensorStats) -> float:
    """The unit a statistic's noise is measured in (see the module doc); 0 when it has none."""
    rms = abs(s.rms) if s.rms is not None and math.isfinite(s.rms) else 0.0
    value = s.stat(stat)
    value = abs(value) if value is not None and math.isfinite(value) else 0.0
    if stat == "mean":
        return rms
    if stat in ("std", "rms"):
        return value
    if stat in ("min", "max"):
        return value + rms
    return 1.0  # zero_frac: absolute


def incomparable(golden: Trace, other: Trace) -> str | None:
    """Why ``other`` cannot be a draw of the golden's noise (None when it can)."""
    if len(golden.iterations) != len(other.iterations):
        return f"{len(other.iterations)} iterations, the golden has {len(golden.iterations)}"
    if dict(golden.config) != dict(other.config):
        keys = sorted(k for k in set(golden.config) | set(other.config) if golden.config.get(k) != other.config.get(k))
        return f"another model config ({', '.join(keys)})"
    for g_it, o_it in zip(golden.iterations, other.iterations, strict=True):
        i = g_it.index
        if g_it.stepped != o_it.stepped or dict(g_it.lr) != dict(o_it.lr):
            return f"another optimizer schedule at iteration {i} (stepped {o_it.stepped}, lr {dict(o_it.lr)})"
        if (g_it.loss is None) != (o_it.loss is None) or (
                g_it.loss is not None and o_it.loss is not None
                and math.isfinite(g_it.loss) != math.isfinite(o_it.loss)):
            return f"loss {o_it.loss} at iteration {i}, the golden has {g_it.loss}"
        for section in SECTIONS:
            g_sec, o_sec = g_it.section(section), o_it.section(section)
            if list(g_sec) != list(o_sec):
                extra = [n for n in o_sec if n not in g_sec]
                missing = [n for n in g_sec if n not in o_sec]
                what = (f"has {extra[0]}" if extra else f"lacks {missing[0]}") if extra or missing \
                    else "records them in another order"
                return f"another stage set in {section} at iteration {i}: the replay {what}"
            for name, g in g_sec.items():
                o = o_sec[name]
                if (g is None) != (o is None):
                    return f"{name} ({section}) has a gradient on one side only at iteration {i}"
                if g is None or o is None:
                    continue
                if g.shape != o.shape or g.dtype != o.dtype:
                    return f"{name} ({section}) is {o.dtype} {list(o.shape)} at iteration {i}, " \
                           f"the golden {g.dtype} {list(g.shape)}"
                if g.nan != o.nan or g.inf != o.inf:
                    return f"{name} ({section}) has {o.nan} NaN and {o.inf} Inf at iteration {i}, " \
                           f"the golden {g.nan} and {g.inf}"
                if g.all_zero != o.all_zero:
                    return f"{name} ({section}) is {'all zero' if o.all_zero else 'not all zero'} at " \
                           f"iteration {i}, the golden {'all zero' if g.all_zero else 'not all zero'}"
    return None


def _deviation(a: float | None, b: float | None) -> float:
    if a is None or b is None or a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return 0.0  # equal non-finite counts were checked; a NaN statistic carries no noise figure
    return abs(a - b)


@dataclass(frozen=True)
class Calibrated:
    """A golden with its band, and the wall time the replays took (reported, not written: a golden
    changes only when its numbers do)."""

    trace: Trace
    seconds: float | None = None


class Excluded(TypedDict):
    variant: str
    reason: str


def measure(golden: Trace, replays: Sequence[Replay], *, k: float, floor: float) -> Trace:
    """The golden with a band on every statistic and its calibration record (format 2)."""
    used: list[tuple[Replay, Trace]] = []
    excluded: list[Excluded] = []
    for r in replays:
        if r.trace is None:
            excluded.append({"variant": r.variant, "reason": r.error or "the replay produced no trace"})
            continue
        why = incomparable(golden, r.trace)
        if why:
            excluded.append({"variant": r.variant, "reason": why})
        else:
            used.append((r, r.trace))
    iterations = []
    for n, g_it in enumerate(golden.iterations):
        others = [trace.iterations[n] for _, trace in used]
        sections: dict[Section, dict[str, TensorStats | None]] = {}
        for section in SECTIONS:
            out: dict[str, TensorStats | None] = {}
            for name, g in g_it.section(section).items():
                if g is None:
                    out[name] = None
                    continue
                band = {}
                for stat in BAND_STATS:
                    if g.stat(stat) is None:
                        continue
                    band[stat] = max((_deviation(g.stat(stat), _stat(o.section(section)[name], stat))
                                      for o in others), default=0.0)
                out[name] = replace(g, band=band)
            sections[section] = out
        loss_band = max((_deviation(g_it.loss, o.loss) for o in others), default=0.0) \
            if g_it.loss is not None else None
        iterations.append(replace(g_it, loss_band=loss_band, forward=_stages(sections[Section.FORWARD]),
                                  stage_grads=_stages(sections[Section.STAGE_GRADS]),
                                  param_grads=sections[Section.PARAM_GRADS]))
    calibration: dict[str, Any] = {
        "k": k,
        "floor": floor,
        "replays": len(used),
        "variants": [{"variant": r.variant, "what": r.description,
                      **({"environment": dict(r.environment)} if r.environment else {})} for r, _ in used],
        "excluded": excluded,
    }
    return replace(golden, iterations=tuple(iterations), calibration=calibration)


def _stat(s: TensorStats | None, stat: str) -> float | None:
    return None if s is None else s.stat(stat)


def _stages(section: Mapping[str, TensorStats | None]) -> dict[str, TensorStats]:
    """A section that records no None (forward, stage_grads) with its type saying so."""
    return {name: s for name, s in section.items() if s is not None}


def _is_float(dtype: str) -> bool:
    return any(k in dtype for k in ("float", "bfloat", "half", "complex"))


def _relative(band: float, unit: float) -> float:
    return band / unit if unit > 0 else 0.0


def effective_bands(it: Iteration) -> dict[tuple[str, str], dict[str, float]]:
    """(section, stage) -> statistic -> the pooled band that ``calibrated`` multiplies by k (the
    sections are Section members, which equal their names)."""
    relative: dict[tuple[Section, str], float] = {}  # a stage's relative noise (step 1)
    banded: dict[tuple[Section, str], tuple[TensorStats, Mapping[str, float]]] = {}
    zero_bands: dict[Section, list[float]] = {}
    for section in SECTIONS:
        for name, s in it.section(section).items():
            if s is None or not s.band:
                continue
            banded[(section, name)] = s, s.band
            if not _is_float(s.dtype):
                relative[(section, name)] = 0.0
                continue
            relative[(section, name)] = max(
                (_relative(s.band[stat], scale(stat, s)) for stat in SCALED if stat in s.band), default=0.0)
            if "zero_frac" in s.band:
                zero_bands.setdefault(section, []).append(s.band["zero_frac"])
    medians = {}
    for section in SECTIONS:
        values = [v for (sec, _), v in relative.items() if sec == section]
        medians[section] = statistics.median(values) if values else 0.0
    zero_medians = {sec: statistics.median(v) for sec, v in zero_bands.items()}
    out: dict[tuple[str, str], dict[str, float]] = {}
    for (section, name), stage_relative in relative.items():
        s, band = banded[(section, name)]
        if not _is_float(s.dtype):
            out[(section, name)] = dict(band)  # token ids and counts: exact, no float noise to share
            continue
        pooled = max(stage_relative, medians[section])
        bands = {stat: max(band[stat], pooled * scale(stat, s)) for stat in SCALED if stat in band}
        if "zero_frac" in band:
            bands["zero_frac"] = max(band["zero_frac"], zero_medians.get(section, 0.0))
        out[(section, name)] = bands
    return out


def summary(calibration: JSONObject) -> str:
    """One line: what the band is made of."""
    names = [v["variant"] for v in calibration.get("variants", ())]
    line = f"band of {calibration.get('replays', len(names))} replays ({', '.join(names) or 'none'}), " \
           f"k {calibration.get('k')}, floor {calibration.get('floor')}"
    left_out = calibration.get("excluded") or ()
    if left_out:
        line += "; left out: " + "; ".join(f"{e['variant']} ({e['reason']})" for e in left_out)
    return line

