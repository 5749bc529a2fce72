"""Comparing an obtained trace with a golden one under tolerance profiles (pure: no pytest, no torch).

Rule, per statistic: |obtained - golden| <= atol + rms_atol * golden.rms + rtol * |golden|.
``rms_atol`` exists for the mean, which cancels towards zero: a tolerance relative to the mean
itself would be meaningless there, one relative to the stage's scale (its rms) is not.
Shape, dtype and NaN/Inf counts must match exactly, and so must exact zero-ness: a stage that is
all zeros on one side and not on the other always differs (the zero-init pattern is part of the
numerics). Stages present on one side only are reported. The environment is never compared.

A section the golden does not record at all (a parsed seed report has no stage gradients, and only
a loss for later iterations) is not compared: the golden says nothing there. A trace whose
provenance is not complete (a parsed Markdown report shows a selection of stages: the seed has two
parameter gradients) is not held to the stages it does not list, and a trace's provenance quantum
(a report's %.6f rounding) widens every tolerance.

Coverage is a finding of its own (``Comparison.coverage``, ``CoverageFinding``): per stage call site
(``name`` and ``name#2``, ``module/op#1`` and ``module/op#2``: see ``coverage``), the iterations
where the obtained trace called it another number of times than the golden (``missing in
iteration 1``, ``fired twice in iteration 0, the golden once``), and the selected stages the
obtained capture never saw fire. The presence mismatches behind it stay in ``mismatches``.

Mismatches come out in execution order: iteration, then its forward stages (in the golden's
order), its loss, its stage gradients (backward order), its parameter gradients. The first one is
where the numerics first diverge.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .calibrate import effective_bands, scale
from .coverage import calls, iterations_text, times
from .trace import STAGE_SECTIONS, Iteration, Section, TensorStats, Trace

STATS = ("mean", "std", "min", "max", "rms", "zero_frac")
LOSS = "loss"  # the loss as a stage and a statistic: of tolerance lines ("loss loss atol=..."), of mismatches
SECTIONS = STAGE_SECTIONS
SECTION_TITLES = {section: section.label for section in Section}


@dataclass(frozen=True)
class Tolerance:
    atol: float = 0.0
    rtol: float = 0.0
    rms_atol: float = 0.0

    def allowed(self, golden: float, golden_rms: float | None) -> float:
        total = self.atol
        if self.rtol:
            total += self.rtol * abs(golden)
        if self.rms_atol and golden_rms is not None and math.isfinite(golden_rms):
            total += self.rms_atol * abs(golden_rms)
        return total


@dataclass(frozen=True)
class Override:
    """A tolerance for the stats matching ``stat`` (glob) of the stages matching ``stage`` (glob)."""

    stage: str
    stat: str
    tolerance: Tolerance | None  # None: not compared


@dataclass(frozen=True)
class Profile:
    name: str
    tolerances: Mapping[str, Tolerance]
    loss: Tolerance
    overrides: tuple[Override, ...] = ()
    description: str = ""
    # calibrated profiles: allowed = max(floor * scale, band_k * pooled band), see ``calibrate``
    band_k: float = 0.0
    floor: float = 0.0

    @property
    def calibrated(self) -> bool:
        return self.band_k > 0

    def with_overrides(self, overrides: Iterable[Override]) -> Profile:
        return replace(self, overrides=self.overrides + tuple(overrides))

    def override(self, stage: str, stat: str) -> Override | None:
        """The last override matching this stage and statistic."""
        for o in reversed(self.overrides):
            if fnmatch.fnmatchcase(stage, o.stage) and fnmatch.fnmatchcase(stat, o.stat):
                return o
        return None

    def tolerance(self, stage: str, stat: str) -> Tolerance | None:
        """The last matching override wins; then the profile's default for the stat."""
        o = self.override(stage, stat)
        if o is not None:
            return o.tolerance
        if stat == LOSS:
            return self.loss
        return self.tolerances.get(stat, Tolerance())


# Calibrated on the reference model at the seed config (depth 4, T 1024, V 65536, 3 optimizer steps):
# 1 vs 2 torch threads differ by at most 8e-8 relative in std/rms/min/max and 7e-9 * rms in the
# mean. The tolerances below leave about 100x headroom for other CPUs' reduction orders and SIMD
# widths, and stay 3 orders of magnitude below what a one-line change of the math moves.
EXACT = Profile(
    name="exact",
    description="same seed, same device type: any real change of the math fails",
    tolerances={
        "mean": Tolerance(rms_atol=1e-6, rtol=1e-5),
        "std": Tolerance(atol=1e-12, rtol=1e-5),
        "rms": Tolerance(atol=1e-12, rtol=1e-5),
        "min": Tolerance(atol=1e-12, rtol=1e-5),
        "max": Tolerance(atol=1e-12, rtol=1e-5),
        "zero_frac": Tolerance(atol=1e-4),
    },
    loss=Tolerance(atol=1e-6, rtol=1e-5),
)

# For a golden from another random draw or real data (the seed report). Calibrated on the reference
# model at the seed config: 8 draws (init seeds 1000-1007, data seeds 0-7) against one draw, largest
# deviation per statistic over every stage: mean 0.11 x rms, std and rms 18%, min 38%, max 72% (the
# attention outputs, the most data-dependent stage), zero fraction 0.004. The tolerances are about
# twice that. Data-dependent statistics are excluded: the input token ids (another tokenizer or text
# gives other ids), and the loss stage's shape (the seed prints its scalar loss as shape (1,)).
STATISTICAL = Profile(
    name="statistical",
    description="another random draw or real data: tolerances from sampling spread",
    tolerances={
        "mean": Tolerance(atol=1e-6, rms_atol=0.2),
        "std": Tolerance(atol=1e-6, rtol=0.35),
        "rms": Tolerance(atol=1e-6, rtol=0.35),
        "min": Tolerance(atol=1e-6, rtol=1.5),
        "max": Tolerance(atol=1e-6, rtol=1.5),
        "zero_frac": Tolerance(atol=0.01),
    },
    loss=Tolerance(atol=1e-4, rtol=0.01),
    overrides=(
        Override("inputs.*", "*", None),
        Override(LOSS, "shape", None),
    ),
)

# For a golden recorded with its calibration band (``calibrate``, ``replay``): per statistic,
# allowed = max(FLOOR * scale, K * pooled band). Measured on the reference model's tiny config over
# 6 init/data seeds and 5 iterations, on an AMD EPYC (AVX2): the real difference between AVX2 and
# default-ISA kernels, held out, against the pooled band of dithered replays alone: at iterations 0
# and 1 (before any noise grows) at most 0.89 x max(band, 1e-6 x scale); at iterations 2-4, 99% of
# the statistics within 7 x the band (the worst, one stage in one seed at the first step that moved
# its projection, 278 x). K = 4 on a band that also holds the real lower-ISA kernels and the other
# thread count; FLOOR = 4e-6 is 4.5 x the largest iteration-0/1 kernel difference seen (8.9e-7)
# and 25 x below a 1e-4 change, which must fail. The zero fraction's floor is absolute (1e-4).
CALIBRATED_K = 4.0
CALIBRATED_FLOOR = 4e-6
CALIBRATED = Profile(
    name="calibrated",
    description="a calibrated golden: k x its measured noise band, never below a floor",
    tolerances={"zero_frac": Tolerance(atol=1e-4)},
    loss=Tolerance(),
    band_k=CALIBRATED_K,
    floor=CALIBRATED_FLOOR,
)

PROFILES = {p.name: p for p in (CALIBRATED, EXACT, STATISTICAL)}
AUTO = "auto"  # calibrated for a golden with a band, exact for one without


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown tolerance profile {name!r}: choose one of "
                         f"{', '.join([AUTO, *PROFILES])}") from None


def resolve_profile(name: str | None, golden: Trace, overrides: Iterable[Override] = ()) -> Profile:
    """The profile a golden is compared under: ``auto`` (or None) picks calibrated for a golden that
    has a band and exact for one that has not; calibrated on a golden without a band is an error."""
    if name in (None, AUTO):
        profile = CALIBRATED if golden.calibrated else EXACT
    else:
        profile = get_profile(name)
    if profile.calibrated and not golden.calibrated:
        raise ValueError("profile calibrated needs a calibrated golden (format 2, with a noise band), and this "
                         "one has none: record it again with --update-golden --gpt-trace-recalibrate, or "
                         "compare under exact")
    return profile.with_overrides(overrides)


def parse_override(line: str) -> Override:
    """'STAGE_GLOB STAT_GLOB atol=.. rtol=.. rms_atol=..' or 'STAGE_GLOB STAT_GLOB skip'."""
    parts = line.split()
    if len(parts) < 3:
        raise ValueError(f"tolerance line {line!r}: expected 'STAGE_GLOB STAT_GLOB atol=X rtol=Y' or '... skip'")
    stage, stat, *settings = parts
    if not any(fnmatch.fnmatchcase(name, stat) for name in (*STATS, LOSS)):
        raise ValueError(f"tolerance line {line!r}: {stat!r} matches no statistic; "
                         f"the statistics are {', '.join(STATS)} (and loss for the loss)")
    if settings == ["skip"]:
        return Override(stage, stat, None)
    values: dict[str, float] = {}
    for s in settings:
        key, _, value = s.partition("=")
        if key not in ("atol", "rtol", "rms_atol") or not value:
            raise ValueError(f"tolerance line {line!r}: {s!r} is not atol=X, rtol=Y or rms_atol=Z")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"tolerance line {line!r}: {value!r} is not a number") from None
        if values[key] < 0 or math.isnan(values[key]):
            raise ValueError(f"tolerance line {line!r}: {key} must be a non-negative number")
    return Override(stage, stat, Tolerance(**values))


@dataclass(frozen=True)
class Mismatch:
    iteration: int
    section: Section
    stage: str
    stat: str  # a statistic, or "shape" | "dtype" | "nan" | "inf" | "zeros" | "presence"
    golden: object
    obtained: object
    allowed: float | None = None
    band: float | None = None  # the pooled calibration band behind the allowance (calibrated profile)

    def __post_init__(self) -> None:
        object.__setattr__(self, "section", Section(self.section))  # "forward" from a caller is Section.FORWARD

    @property
    def difference(self) -> float | None:
        if isinstance(self.golden, (int, float)) and isinstance(self.obtained, (int, float)) \
                and not isinstance(self.golden, bool):
            return abs(self.obtained - self.golden)
        return None

    @property
    def where(self) -> str:
        if self.section == Section.LOSS:
            return f"loss, iteration {self.iteration}"
        kind = self.section.label
        return f"{self.stage} ({kind}), iteration {self.iteration}"


@dataclass(frozen=True)
class Headroom:
    """The compared statistic that came closest to its allowance: |difference| / allowed."""

    fraction: float
    iteration: int
    section: Section
    stage: str
    stat: str

    def describe(self) -> str:
        if self.fraction == 0:
            return "every compared statistic identical to the golden"
        where = "loss" if self.section == Section.LOSS else f"{self.stage} {self.stat}"
        if self.section == Section.STAGE_GRADS:
            where = f"{self.stage} gradient {self.stat}"
        elif self.section == Section.PARAM_GRADS:
            where = f"{self.stage} grad {self.stat}"
        return f"worst {where} (iteration {self.iteration}) at {self.fraction:.2g} of allowed"


class _Worst:
    def __init__(self) -> None:
        self.value: Headroom | None = None

    def see(self, difference: float, allowed: float, iteration: int, section: Section, stage: str,
            stat: str) -> None:
        if difference == 0:
            fraction = 0.0
        elif allowed > 0:
            fraction = difference / allowed
        else:
            fraction = math.inf
        if self.value is None or fraction > self.value.fraction:
            self.value = Headroom(fraction, iteration, section, stage, stat)


@dataclass(frozen=True)
class CoverageFinding:
    """A stage call site the obtained trace called ``obtained`` times in ``iterations`` where the
    golden called it ``golden`` times (0: not at all); ``golden`` None: a selected stage the
    obtained capture never saw fire, in any iteration."""

    section: Section
    stage: str  # the call site: the stage name without its call number
    iterations: tuple[int, ...]
    golden: int | None
    obtained: int

    @property
    def kind(self) -> str:
        """``never fired``, ``missing`` (golden calls, obtained none), ``extra`` (the reverse), ``calls``."""
        if self.golden is None:
            return "never fired"
        if self.obtained == 0:
            return "missing"
        return "extra" if self.golden == 0 else "calls"

    @property
    def message(self) -> str:
        """``blocks.1.mlp (forward) missing in iteration 1`` and the like."""
        what = f"{self.stage} ({self.section.label})"
        when = iterations_text(self.iterations)
        if self.golden is None:
            return f"{what} never fired: selected, but its module ran in no iteration"
        if self.obtained == 0:
            return f"{what} missing in {when}" + (f" (the golden: {times(self.golden)})" if self.golden > 1 else "")
        if self.golden == 0:
            return f"{what} fired in {when}, not in the golden"
        return f"{what} fired {times(self.obtained)} in {when}, the golden {times(self.golden)}"


@dataclass(frozen=True)
class Comparison:
    golden: Trace
    obtained: Trace
    profile: Profile
    mismatches: tuple[Mismatch, ...] = field(default_factory=tuple)
    worst: Headroom | None = None  # the closest call among the compared statistics
    coverage: tuple[CoverageFinding, ...] = ()  # stages that fired otherwise than in the golden

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def first(self) -> Mismatch | None:
        return self.mismatches[0] if self.mismatches else None

    @property
    def stages_differing(self) -> list[tuple[int, Section, str]]:
        """(iteration, section, stage) of every mismatch, each once, in execution order."""
        return list(dict.fromkeys((m.iteration, m.section, m.stage) for m in self.mismatches))

    @property
    def distinct_stages(self) -> list[tuple[Section, str]]:
        """(section, stage) that differ in any iteration, each once: what "N stages" counts."""
        return list(dict.fromkeys((m.section, m.stage) for m in self.mismatches))


def _close(golden: float, obtained: float, tol: Tolerance, golden_rms: float | None) -> tuple[bool, float]:
    allowed = tol.allowed(golden, golden_rms)
    if golden == obtained:
        return True, allowed
    if math.isnan(golden) or math.isnan(obtained):
        return math.isnan(golden) and math.isnan(obtained), allowed
    if math.isinf(golden) or math.isinf(obtained):
        return golden == obtained, allowed
    return abs(obtained - golden) <= allowed, allowed


def _calibrated_allowed(profile: Profile, stat: str, g: TensorStats, band: float | None) -> float:
    floor_tol = profile.tolerances.get(stat)
    floor = floor_tol.allowed(getattr(g, stat), g.rms_estimate) if floor_tol is not None \
        else profile.floor * scale(stat, g)
    return max(floor, profile.band_k * (band or 0.0))


def compare_stats(iteration: int, section: Section | str, stage: str, g: TensorStats | None, o: TensorStats | None,
                  profile: Profile, *, quantum: float = 0.0, partial_obtained: bool = False,
                  bands: Mapping[str, float] | None = None, worst: _Worst | None = None) -> list[Mismatch]:
    """Mismatches of one stage. quantum: rounding of either side (a Markdown report) added to every
    tolerance; partial_obtained: the obtained side is a report that omits some statistics; bands:
    this stage's pooled calibration bands (calibrated profile)."""
    out: list[Mismatch] = []
    section = Section(section)

    def mismatch(stat: str, gv: object, ov: object, allowed: float | None = None, band: float | None = None) -> None:
        out.append(Mismatch(iteration, section, stage, stat, gv, ov, allowed, band))

    if g is None or o is None:
        if (g is None) != (o is None):
            mismatch("presence", "no gradient" if g is None else "gradient",
                     "no gradient" if o is None else "gradient")
        return out
    for attr in ("shape", "dtype"):
        if profile.tolerance(stage, attr) is not None and getattr(g, attr) != getattr(o, attr):
            mismatch(attr, getattr(g, attr), getattr(o, attr))
    for attr in ("nan", "inf"):
        if profile.tolerance(stage, attr) is not None and getattr(g, attr) != getattr(o, attr):
            mismatch(attr, getattr(g, attr), getattr(o, attr), 0.0)
    if profile.tolerance(stage, "zeros") is not None and g.zero_frac is not None and o.zero_frac is not None \
            and g.all_zero != o.all_zero:
        mismatch("zeros", "all zero" if g.all_zero else "not all zero", "all zero" if o.all_zero else "not all zero")
    for stat in STATS:
        gv, ov = getattr(g, stat), getattr(o, stat)
        tol = profile.tolerance(stage, stat)
        if tol is None or gv is None:
            continue
        if ov is None:
            if not partial_obtained:
                mismatch(stat, gv, None)
            continue
        if quantum:
            tol = replace(tol, atol=tol.atol + quantum)
        band = None
        if profile.calibrated and profile.override(stage, stat) is None:
            band = (bands or {}).get(stat, 0.0)
            tol = Tolerance(atol=_calibrated_allowed(profile, stat, g, band) + quantum)
        ok, allowed = _close(gv, ov, tol, g.rms_estimate)
        if worst is not None and math.isfinite(gv) and math.isfinite(ov):
            worst.see(abs(ov - gv), allowed, iteration, section, stage, stat)
        if not ok:
            mismatch(stat, gv, ov, allowed, band)
    return out


def compare(golden: Trace, obtained: Trace, profile: Profile | None = None) -> Comparison:
    """Every mismatch between golden and obtained, in execution order. Without a profile: calibrated
    for a golden with a band, exact for one without (``resolve_profile``)."""
    if profile is None:
        profile = resolve_profile(None, golden)
    elif profile.calibrated and not golden.calibrated:
        resolve_profile(profile.name, golden)  # raises, saying how to calibrate
    worst = _Worst()
    mismatches: list[Mismatch] = []
    partial = not golden.provenance.complete
    partial_obtained = not obtained.provenance.complete
    quantum = max(golden.provenance.quantum, obtained.provenance.quantum)  # e.g. a report's %.6f rounding
    n = max(len(golden.iterations), len(obtained.iterations))
    for i in range(n):
        if i >= len(golden.iterations) or i >= len(obtained.iterations):
            have = "golden" if i < len(golden.iterations) else "obtained"
            mismatches.append(Mismatch(i, Section.FORWARD, "(iteration)", "presence",
                                       "present" if have == "golden" else "absent",
                                       "present" if have == "obtained" else "absent"))
            continue
        g_it, o_it = golden.iterations[i], obtained.iterations[i]
        bands = effective_bands(g_it) if profile.calibrated else {}
        for section in SECTIONS:
            g_sec, o_sec = g_it.section(section), o_it.section(section)
            if not g_sec:
                continue  # the golden does not record this section
            if not o_sec and partial_obtained:
                continue  # the obtained report does not record this section
            for stage, g in g_sec.items():
                if stage not in o_sec:
                    if not partial_obtained:  # a parameter frozen on one side reads as frozen
                        mismatches.append(Mismatch(i, section, stage, "presence", "present",
                                                   _absent(obtained, section, stage)))
                    continue
                mismatches += compare_stats(i, section, stage, g, o_sec[stage], profile, quantum=quantum,
                                            partial_obtained=partial_obtained,
                                            bands=bands.get((section, stage)), worst=worst)
            for stage in o_sec:
                if partial or stage in g_sec:
                    continue
                if profile.tolerance(stage, "presence") is not None:
                    mismatches.append(Mismatch(i, section, stage, "presence", _absent(golden, section, stage),
                                               "present"))
            if section == Section.FORWARD:
                mismatches += _compare_loss(i, g_it, o_it.loss, profile, quantum, worst)
        if not g_it.forward:
            mismatches += _compare_loss(i, g_it, o_it.loss, profile, quantum, worst)
    return Comparison(golden, obtained, profile, tuple(mismatches), worst.value,
                      coverage_findings(golden, obtained, profile))


COVERAGE_SECTIONS = (Section.FORWARD, Section.STAGE_GRADS)


def coverage_findings(golden: Trace, obtained: Trace, profile: Profile | None = None) -> tuple[CoverageFinding, ...]:
    """Where the obtained trace called a stage another number of times than the golden, per call
    site and section, its iterations grouped; then the selected stages it never saw fire. Nothing
    against a golden that lists a selection (a report), none of the obtained side's extras where
    a selection is obtained."""
    if not golden.provenance.complete or not obtained.provenance.complete:
        return ()
    found: dict[tuple[Section, str, int, int], list[int]] = {}
    for g_it, o_it in zip(golden.iterations, obtained.iterations, strict=False):
        for section in COVERAGE_SECTIONS:
            g_sec, o_sec = g_it.section(section), o_it.section(section)
            if not g_sec:
                continue  # the golden does not record this section
            g_calls, o_calls = calls(g_sec), calls(o_sec)
            for stage in dict.fromkeys([*g_calls, *o_calls]):
                g, o = g_calls.get(stage, 0), o_calls.get(stage, 0)
                if g == o or (g == 0 and profile is not None and profile.tolerance(stage, "presence") is None):
                    continue
                found.setdefault((section, stage, g, o), []).append(g_it.index)
    out = [CoverageFinding(section, stage, tuple(its), g, o) for (section, stage, g, o), its in found.items()]
    out.sort(key=lambda f: f.iterations[0])
    its = tuple(it.index for it in obtained.iterations)
    out += [CoverageFinding(Section.FORWARD, stage, its, None, 0) for stage in obtained.coverage.never_fired]
    return tuple(out)


def _absent(trace: Trace, section: Section, stage: str) -> str:
    """How a stage absent from one side reads: a parameter it lists as frozen has no gradient by design."""
    return "frozen" if section == Section.PARAM_GRADS and stage in trace.frozen_params else "missing"


def _compare_loss(i: int, g_it: Iteration, o: float | None, profile: Profile, quantum: float = 0.0,
                  worst: _Worst | None = None) -> list[Mismatch]:
    g = g_it.loss
    tol = profile.tolerance(LOSS, LOSS)
    if tol is not None and quantum:
        tol = replace(tol, atol=tol.atol + quantum)
    if g is None or tol is None:
        return []
    if o is None:
        return [Mismatch(i, Section.LOSS, LOSS, LOSS, g, None)]
    band = None
    if profile.calibrated and profile.override(LOSS, LOSS) is None and math.isfinite(g):
        band = g_it.loss_band or 0.0
        tol = Tolerance(atol=max(profile.floor * abs(g), profile.band_k * band) + quantum)
    ok, allowed = _close(g, o, tol, None)
    if worst is not None and math.isfinite(g) and math.isfinite(o):
        worst.see(abs(o - g), allowed, i, Section.LOSS, LOSS, LOSS)
    return [] if ok else [Mismatch(i, Section.LOSS, LOSS, LOSS, g, o, allowed, band)]


def check_same_config(golden: Trace, obtained: Trace) -> list[str]:
    """Config keys whose values differ: a golden of another config cannot be compared stat by stat."""
    keys = sorted(set(golden.config) & set(obtained.config))
    return [f"{k}: golden {golden.config[k]!r}, obtained {obtained.config[k]!r}"
            for k in keys if golden.config[k] != obtained.config[k]]


def overrides_from_lines(lines: Sequence[str]) -> list[Override]:
    return [parse_override(line) for line in lines if line.strip() and not line.strip().startswith("#")]
