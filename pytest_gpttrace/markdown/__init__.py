"""The GPT Component Debug Trace: a Trace rendered as Markdown (``render``), and read back (``parse``).

The format is the seed report's (tests/data/seed_trace.md), colours as HTML spans::

    # GPT Component Debug Trace
    **Generated** / **Configuration** / [**Model**] / **Device** / **Iterations** header lines
    ## MODEL SCALING ANALYSIS                 parameters per component, FLOPs per token, depth sweep
    ## STARTING TRAINING WITH INSTRUMENTATION
    ITERATION k/N banner; a fully rendered iteration (the first, or all with all_iterations) has
      ## FORWARD PASS #index                  input tokens, then the reference layout:
      ## 1. TOKEN EMBEDDINGS (wte) ... ## 6. LOSS COMPUTATION (Training Mode)
      ## STAGES                               forward stages outside the reference layout
      ## BACKWARD PASS                        wte / lm_head gradient blocks, gradient tables
    ✓ Iteration k complete - Loss: x [(optimizer step) | (micro-step: no optimizer step)]
    ## ANOMALIES                              optional, pre-rendered by the caller
    ## TRAINING COMPLETE                      and the Key Takeaways

A stat block is a ``#### `` heading followed by bullets
``- **Name**: <span style="color: #5faf00">value</span>``: Shape, Dtype, Device, Mean, Std, Min
and Max always, then RMS, Zero fraction and Non-finite (``NaN n, Inf m``) when known. Numbers
print as ``%.6f`` (``nan``, ``inf``); an unknown statistic prints ``n/a``.

``layout`` is the one description of the format both directions use; ``render`` writes it;
``lex`` splits a report into records, ``parse`` assembles them (``draft`` holds the statistics
being assembled, each within its printed rounding). A file is read with ``traceio.read_trace``.
"""

from __future__ import annotations

from pathlib import Path

from ..trace import PathLike, Trace
from .layout import HALF_ULP, LAYOUT, TITLE, fmt
from .parse import PROVENANCE, parse
from .render import render, stat_block, uses_layout

__all__ = ["HALF_ULP", "LAYOUT", "PROVENANCE", "TITLE", "fmt", "load", "parse", "render", "stat_block",
           "uses_layout"]


def load(path: PathLike) -> Trace:
    """The report at path (read as ``traceio.read_trace`` reads any trace file)."""
    from ..traceio import read_trace

    return read_trace(Path(path))
