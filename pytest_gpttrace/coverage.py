"""Coverage: which stages fired in which iterations, and what a capture could not record.

Each selected stage records once per call site per iteration: a module called twice is ``name``
and ``name#2``, an op's calls in a module ``module/op#1``, ``module/op#2``. A stage's *site* is its
name without the call number (``name``, ``module/op``), and its *calls* in an iteration are how many
numbered names of that site the iteration holds. A forward that autograd runs again during the
backward (activation checkpointing, ``torch.utils.checkpoint``) is not a call: it is not recorded.

A trace's ``Coverage`` holds what the capture knew and the iterations alone do not say:

- ``missing``: stage -> the iterations it did not fire in, for a stage that fired in others;
- ``never_fired``: selected stage modules that ran in no iteration (a branch not taken, a module
  that the forward does not call);
- ``no_grad``: stages whose gradient could not be recorded: computed under ``torch.no_grad()`` in
  the forward and run again in the backward (``torch.utils.checkpoint(use_reentrant=True)``),
  where the recomputed output could not be matched to one call (a module called more than once,
  or an op stage).

The JSON format writes it as a top-level ``"coverage"`` object only when it is not empty.
Pure: no torch, no pytest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

MISSING = "missing"
NEVER_FIRED = "never_fired"
NO_GRAD = "no_grad"
KEYS = (MISSING, NEVER_FIRED, NO_GRAD)

_CALL = re.compile(r"^(.*)#([0-9]+)$")


@dataclass(frozen=True)
class Coverage:
    """What fired where, beyond the iterations' own stage lists (see the module docstring)."""

    missing: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    never_fired: tuple[str, ...] = ()
    no_grad: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.missing or self.never_fired or self.no_grad)

    def to_json(self) -> dict[str, object]:
        """The JSON object, its empty parts left out."""
        out: dict[str, object] = {}
        if self.missing:
            out[MISSING] = {stage: list(its) for stage, its in self.missing.items()}
        if self.never_fired:
            out[NEVER_FIRED] = list(self.never_fired)
        if self.no_grad:
            out[NO_GRAD] = list(self.no_grad)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, object]) -> Coverage:
        """The inverse of ``to_json``; ValueError (naming the key) for anything else."""
        unknown = [k for k in obj if k not in KEYS]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}; expected {', '.join(KEYS)}")
        missing = obj.get(MISSING, {})
        if not isinstance(missing, dict) or not all(
                isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
                for v in missing.values()):
            raise ValueError(f"{MISSING}: expected an object of stage name -> list of iteration indices")
        names = {}
        for key in (NEVER_FIRED, NO_GRAD):
            value = obj.get(key, [])
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise ValueError(f"{key}: expected a list of stage names")
            names[key] = tuple(value)
        return cls({str(k): tuple(v) for k, v in missing.items()}, names[NEVER_FIRED], names[NO_GRAD])


def site(stage: str) -> tuple[str, int]:
    """(call site, call number): ``ln#2`` -> ("ln", 2), ``ln`` -> ("ln", 1), ``m/add#1`` -> ("m/add", 1)."""
    m = _CALL.match(stage)
    return (m.group(1), int(m.group(2))) if m else (stage, 1)


_OUTPUT = re.compile(r"(\[[^\]]*\])*$")


def stage_module(stage: str) -> str:
    """The module (or op site) a stage name is of: its site without an output's index,
    ``attn[0]#2`` -> ``attn``, ``m/add#1`` -> ``m/add``."""
    return _OUTPUT.sub("", site(stage)[0])


def calls(stages: Iterable[str]) -> dict[str, int]:
    """Call site -> how many calls of it the stage names hold, in first-seen order."""
    out: dict[str, int] = {}
    for stage in stages:
        name, _ = site(stage)
        out[name] = out.get(name, 0) + 1
    return out


def gaps(stage_lists: Sequence[Iterable[str]]) -> dict[str, tuple[int, ...]]:
    """Stage -> the iterations (indices into ``stage_lists``) it is absent from, for every stage
    present in at least one iteration and absent from another, in first-seen order."""
    present = [set(stages) for stages in stage_lists]
    seen: dict[str, None] = {}
    for stages in stage_lists:
        seen.update(dict.fromkeys(stages))
    out = {}
    for stage in seen:
        absent = tuple(i for i, names in enumerate(present) if stage not in names)
        if absent:
            out[stage] = absent
    return out


def iterations_text(its: Sequence[int]) -> str:
    """``iteration 1``, ``iterations 0, 2``, ``iterations 0-3``."""
    if len(its) == 1:
        return f"iteration {its[0]}"
    if list(its) == list(range(its[0], its[0] + len(its))) and len(its) > 2:
        return f"iterations {its[0]}-{its[-1]}"
    return "iterations " + ", ".join(map(str, its))


def times(n: int) -> str:
    """``once``, ``twice``, ``3 times``."""
    return {1: "once", 2: "twice"}.get(n, f"{n} times")
