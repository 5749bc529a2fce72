"""The GPT Component Debug Trace: a Trace rendered as Markdown, and parsed back.

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
print as ``%.6f`` (``nan``, ``inf``); an unknown statistic prints ``n/a``. ReLU² blocks carry
sparsity lines (zero counts of mlp.relu2 and mlp.relu).

``LAYOUT`` maps every heading of the reference layout to its canonical stage (``{i}``: the block
index, ``{last}``: the last block) and drives both directions. Some stages are shown twice under
another title (Q/K/V transposed, the MLP input, ...): they render from the canonical stage and
parse from their first occurrence. Headings of the STAGES section are stage names.

Parsing fills what the report does not print with None, except zero_frac (1.0 when min == max ==
0, 0.0 when min > 0 or max < 0) and the NaN/Inf counts (at least 1 when mean, min or max prints
``nan`` / min or max ``inf``); a one-element tensor's ``nan`` std is the seed's n/a and reads as
0.0. Malformed input raises MarkdownParseError naming the line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from . import scaling
from .errors import MarkdownParseError
from .trace import Iteration, TensorStats, Trace

TITLE = "# GPT Component Debug Trace"

SECTION, BANNER, HEADING, VALUE, INFO, NOTE = "#af87ff", "#d70000", "#5fafff", "#5faf00", "#0087ff", "#d7af00"

SCALING = "MODEL SCALING ANALYSIS"
TRAINING = "STARTING TRAINING WITH INSTRUMENTATION"
STAGES = "STAGES"
BACKWARD = "BACKWARD PASS"
ANOMALIES = "ANOMALIES"
COMPLETE = "TRAINING COMPLETE"

STEP_NOTES = {True: "optimizer step", False: "micro-step: no optimizer step"}
NO_GRADIENT = "no gradient"
CONFIG_ALIASES = (("n_layer", "depth"), ("n_embd", "d_model"), ("n_head", "n_heads"))
CONFIG_ORDER = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "softcap", "rope_base")


# ----------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class Line:
    """An explanatory line: a str.format template over the render context, skipped when a value is unknown."""

    color: str
    text: str


def B(text: str) -> Line:
    return Line(INFO, text)


def Y(text: str) -> Line:
    return Line(NOTE, text)


@dataclass(frozen=True)
class Entry:
    """One stat block of the layout. Line lists hold Line and "" (a blank line)."""

    title: str
    stage: str
    note: str | None = None
    before: tuple = ()
    after: tuple = ()
    transposed: bool = False  # shown with dims 1 and 2 swapped, (B, T, H, D) -> (B, H, T, D)


@dataclass(frozen=True)
class Section:
    title: str
    entries: tuple[Entry, ...]
    intro: tuple = ()
    outro: tuple = ()
    per_block: bool = False  # entries repeat for every block i
    always: bool = False  # rendered even when none of its stages is present


SHAPE_BTHD = "Shape: [B={s0}, H={s1}, T={s2}, D={s3}]"
SHAPE_BTC = "Shape: [B={s0}, T={s1}, d_model={s2}]"
IN_OUT = "  Input/Output: [batch={s0}, seq_len={s1}, d_model={s2}] → [batch={s0}, seq_len={s1}, d_model={s2}]"
BLOCK_MARKER = "  Block {i} (input not traced)"

BLOCK_ENTRIES = (
    Entry("  Input to Block {i}", "blocks.{i}.input",
          note="Input from previous layer (or token embeddings if layer 0)"),
    Entry("  Step 1a: RMSNorm(x) [pre-attention]", "blocks.{i}.attn.norm",
          note="Normalize BEFORE attention (pre-norm architecture)",
          before=(Y("  Formula: x = x + Attention(RMSNorm(x))"), ""),
          after=(B(IN_OUT),
                 B("  Architecture: Project to Q,K,V → RoPE → QK Norm → Scaled Dot-Product → Causal Mask → Softmax"),
                 "")),
    Entry("    Queries (Q)", "blocks.{i}.attn.q", note="Shape: [B={s0}, T={s1}, n_head={s2}, head_dim={s3}]",
          before=(Y("  [1b.i] Project to Queries, Keys, Values"),)),
    Entry("    Keys (K)", "blocks.{i}.attn.k", note="Shape: [B={s0}, T={s1}, n_kv_head={s2}, head_dim={s3}]"),
    Entry("    Values (V)", "blocks.{i}.attn.v", note="Shape: [B={s0}, T={s1}, n_kv_head={s2}, head_dim={s3}]"),
    Entry("    Q before RoPE", "blocks.{i}.attn.q", note="Original query vectors",
          before=(Y("  [1b.ii] Apply RoPE (Rotary Position Embeddings)"),
                  B("    RoPE encodes position via rotation (no learned parameters)"),
                  B("    Formula: rotate(x, θ) where θ depends on position"),
                  B("    Applied to Q and K only (not V)"), "")),
    Entry("    Q after RoPE", "blocks.{i}.attn.q_rope", note="Position-encoded query vectors via rotation"),
    Entry("    K after RoPE", "blocks.{i}.attn.k_rope", note="Position-encoded key vectors via rotation",
          after=(Y("    Note: RoPE allows relative position encoding"),
                 Y("    The dot product Q·K naturally captures relative distances"), "")),
    Entry("    Q after QK norm", "blocks.{i}.attn.q_norm", note="Normalized queries for stable training",
          before=(Y("  [1b.iii] QK Normalization"),
                  B("    Normalize Q and K separately for training stability"),
                  B("    Uses RMSNorm (no learnable parameters)"), "")),
    Entry("    K after QK norm", "blocks.{i}.attn.k_norm", note="Normalized keys for stable training"),
    Entry("    Q transposed", "blocks.{i}.attn.q_norm", note=SHAPE_BTHD, transposed=True,
          before=(B("    Reshape: [B, T, H, D] → [B, H, T, D]"),
                  B("    Makes head dimension the batch dimension for parallel processing"), "")),
    Entry("    K transposed", "blocks.{i}.attn.k_norm", note=SHAPE_BTHD, transposed=True),
    Entry("    V transposed", "blocks.{i}.attn.v", note=SHAPE_BTHD, transposed=True),
    Entry("    Attention output (multi-head)", "blocks.{i}.attn.sdpa", note=SHAPE_BTHD,
          before=(B("    Formula: Attention(Q,K,V) = softmax(Q·K^T / √d_k) · V"),
                  B("    Causal mask ensures token i can only attend to tokens ≤ i"),
                  B("    This maintains autoregressive property for language modeling"), "")),
    Entry("    Concatenated heads", "blocks.{i}.attn.heads", note=SHAPE_BTC,
          before=(B("    Reshape: [B, H, T, D] → [B, T, H*D] = [B, T, d_model]"),
                  B("    Then apply output projection to residual stream"), "")),
    Entry("    Final attention output (after c_proj)", "blocks.{i}.attn.out", note=SHAPE_BTC),
    Entry("  Step 1c: x + Attention(RMSNorm(x)) [RESIDUAL]", "blocks.{i}.attn_resid",
          note="Add attention output to input (residual connection)"),
    Entry("  Step 2a: RMSNorm(x) [pre-MLP]", "blocks.{i}.mlp.norm",
          note="Normalize BEFORE MLP (pre-norm architecture)",
          before=(Y("  Formula: x = x + MLP(RMSNorm(x))"), ""),
          after=(B(IN_OUT),
                 B("  Architecture: Two linear layers with ReLU² activation"),
                 B("  Expansion pattern: d_model → 4*d_model → d_model"),
                 B("  Formula: MLP(x) = c_proj(ReLU²(c_fc(x)))"), "")),
    Entry("    Input to MLP", "blocks.{i}.mlp.norm", note=SHAPE_BTC,
          before=(Y("  [2b.i] First Linear Layer: Expansion to 4x dimension"),
                  B("    c_fc: Linear({C}, {F}, bias=False)"),
                  B("    Expands representation to wider intermediate dimension"), "")),
    Entry("    After c_fc (expansion)", "blocks.{i}.mlp.fc",
          note="Shape: [B={s0}, T={s1}, 4*d_model={s2}] - Expanded to 4x"),
    Entry("    After ReLU (before squaring)", "blocks.{i}.mlp.relu", note="All negative values zeroed out",
          before=(B("    Formula: ReLU²(x) = (max(0, x))²"),
                  B("    Why ReLU²? Provides smoother gradients than ReLU"),
                  B("    Alternative to: GELU, SwiGLU, or other activations"), "")),
    Entry("    After ReLU² (squared)", "blocks.{i}.mlp.relu2", note="Non-linearity: enhances positive activations",
          after=(Y("    Sparsity: {relu2_zeros}/{relu2_numel} ({relu2_pct}%) zeros after ReLU²"),
                 Y("    Original negative values: {relu_zeros}/{relu_numel} ({relu_pct}%)"), "")),
    Entry("    After c_proj (output)", "blocks.{i}.mlp.out",
          note="Shape: [B={s0}, T={s1}, d_model={s2}] - Back to original dim",
          before=(Y("  [2b.iii] Second Linear Layer: Projection back to d_model"),
                  B("    c_proj: Linear({F}, {C}, bias=False)"),
                  B("    Projects back to original dimension for residual connection"), ""),
          after=(Y("  Key insight: 4x expansion provides capacity for complex transformations"),
                 Y("  No bias terms (bias=False) - simpler, often works just as well"), "")),
    Entry("    Input to MLP path (x_after_attn)", "blocks.{i}.attn_resid", note="State after attention residual",
          before=(Y("  [2c] Residual Connection"),
                  B("    Formula: x_new = x_old + MLP(RMSNorm(x_old))"),
                  B("    Allows gradient flow directly through the network"), "")),
    Entry("    MLP output", "blocks.{i}.mlp.out", note="Transformation to be added"),
    Entry("    x + MLP(RMSNorm(x)) [RESIDUAL]", "blocks.{i}.mlp_resid",
          note="Combined via addition (residual connection)",
          after=(Y("  Key insight: Pre-norm means we normalize BEFORE each operation"),
                 Y("  Residuals allow gradients to flow directly through the network"), "")),
)

FORWARD_SECTION = Section("FORWARD PASS #{index}", always=True, entries=(
    Entry("Input tokens (idx)", "inputs.idx", note="Batch size: {s0}, Sequence length: {s1}"),
    Entry("Target tokens", "inputs.targets"),
))

LAYOUT = (
    FORWARD_SECTION,
    Section("1. TOKEN EMBEDDINGS (wte)", intro=(
        B("The token embedding layer converts discrete token IDs to continuous vectors"),
        B("Embedding matrix shape: (vocab_size={V}, n_embd={C})"), ""), entries=(
        Entry("Token embeddings (before norm)", "embed.wte", note="Each token is now a {C}-dimensional vector",
              after=(Y("Note: wte is learned during training"), "")),
        Entry("Token embeddings (after RMSNorm)", "embed.norm", note="Normalized to stabilize training"),
    )),
    Section("2. POSITIONAL EMBEDDINGS (RoPE)", intro=(
        B("RoPE (Rotary Position Embeddings) encodes position information"),
        B("Unlike learned positional embeddings, RoPE is applied via rotation"),
        B("Rotary embeddings are precomputed and cached for efficiency"), ""), entries=(
        Entry("Rotary cos", "rope.cos", note="Precomputed cosine values for position encoding"),
        Entry("Rotary sin", "rope.sin", note="Precomputed sine values for position encoding"),
    ), outro=(
        Y("These will be applied to Q and K in attention via rotation"), "",
        B("RoPE formula: rotate pairs of dims using cos/sin"),
        B("  q_rotated = [q[:d/2] * cos + q[d/2:] * sin, q[:d/2] * (-sin) + q[d/2:] * cos]"), "")),
    Section("3. TRANSFORMER BLOCK STACK (depth={L})", per_block=True, entries=BLOCK_ENTRIES, intro=(
        B("Model has {L} layers stacked sequentially"),
        B("Each block contains: Attention + MLP with residual connections"), "")),
    Section("4. FINAL RMSNorm", intro=(B("Final normalization before the language modeling head"), ""), entries=(
        Entry("Before final norm", "blocks.{last}.mlp_resid"),
        Entry("After final norm", "final_norm", note="Ready for LM head projection",
              after=(Y("  where rms(x) = sqrt(mean(x^2))"), Y("  No learnable parameters in this implementation"), "")),
    )),
    Section("5. LANGUAGE MODELING HEAD", intro=(
        B("Projects from model dimension to vocabulary size"),
        B("Shape: (n_embd={C}) -> (vocab_size={V})"),
        B("Weights are UNTIED from token embeddings (separate parameters)"), ""), entries=(
        Entry("Logits (before softcap)", "lm_head.logits", note="Raw scores for each token in vocabulary"),
        Entry("Logits (after softcap)", "lm_head.softcap", note="Capped at ±{softcap} to prevent extreme values"),
    )),
    Section("6. LOSS COMPUTATION (Training Mode)", entries=(
        Entry("Loss", "loss", note="Cross-entropy loss (reduction=mean)"),
    )),
)

GRADIENT_ENTRIES = (
    Entry("Token embedding gradients", "wte.weight", note="Gradients for updating embedding matrix"),
    Entry("LM head gradients", "lm_head.weight", note="Gradients for updating output projection"),
)
BACKWARD_INTRO = (B("Gradients computed via backpropagation"), B("Checking gradients for key components:"), "")
STAGES_INTRO = (B("Traced stages, in execution order"), "")

# stage names specific to the reference model: a trace holding one of them uses the layout
_GENERIC_STAGES = {"loss", "final_norm"}

KEY_TAKEAWAYS = (
    "",
    "## Key Takeaways",
    "",
    "1. **Token embeddings (wte)** convert discrete tokens to continuous vectors",
    "2. **RoPE** adds positional info via rotation (not learned parameters)",
    "3. Each **Block** has Attention + MLP with residual connections",
    "4. **RMSNorm** stabilizes training (no learnable parameters)",
    "5. **LM head** projects to vocabulary (untied from wte)",
    "6. Model scales with depth, d_model, and n_heads",
)


@dataclass(frozen=True)
class Bullet:
    label: str
    field: str
    kind: str  # "shape", "text", "number" or "nonfinite"
    required: bool = True


BULLETS = (
    Bullet("Shape", "shape", "shape"),
    Bullet("Dtype", "dtype", "text"),
    Bullet("Device", "device", "text"),
    Bullet("Mean", "mean", "number"),
    Bullet("Std", "std", "number"),
    Bullet("Min", "min", "number"),
    Bullet("Max", "max", "number"),
    Bullet("RMS", "rms", "number", required=False),
    Bullet("Zero fraction", "zero_frac", "number", required=False),
    Bullet("Non-finite", "nonfinite", "nonfinite", required=False),
)
_BULLET_BY_LABEL = {b.label: b for b in BULLETS}

# gradient tables: (header, kind); kinds name a TensorStats field or "name", "l2", "nonfinite"
STAGE_GRAD_COLUMNS = (("stage", "name"), ("shape", "shape"), ("dtype", "dtype"), ("mean", "mean"),
                      ("std", "std"), ("rms", "rms"), ("zero fraction", "zero_frac"), ("NaN/Inf", "nonfinite"))
PARAM_GRAD_COLUMNS = (("parameter", "name"), ("shape", "shape"), ("dtype", "dtype"), ("std", "std"),
                      ("L2 norm", "l2"), ("zero fraction", "zero_frac"), ("NaN/Inf", "nonfinite"))
_LEFT_ALIGNED = {"name", "shape", "dtype"}


# ----------------------------------------------------------------------------- rendering
def fmt(x: float | None) -> str:
    """A statistic as the seed prints it: %.6f (nan, inf, -0.000000), n/a when unknown."""
    return "n/a" if x is None else "%.6f" % x


def _span(color: str, text: str) -> str:
    return f'<span style="color: {color}">{text}</span>'


def _section(title: str) -> list[str]:
    return ["", "---", "", f"## {_span(SECTION, title)}", ""]


def _fill(template: str, ctx: Mapping[str, Any]) -> str | None:
    try:
        return template.format_map(ctx)
    except (KeyError, IndexError, ValueError):
        return None


def _emit(lines, ctx) -> list[str]:
    """Render Line templates; a blank line follows only lines that were rendered."""
    out, pending = [], False
    for line in lines:
        if line == "":
            if pending:
                out.append("")
            pending = False
            continue
        text = _fill(line.text, ctx)
        if text is not None:
            out.append(_span(line.color, text))
            pending = True
    return out


def _shape(shape) -> str:
    return str(tuple(shape))


def _bullet_value(stats: TensorStats, bullet: Bullet) -> str | None:
    if bullet.kind == "shape":
        return f"`{_shape(stats.shape)}`"
    if bullet.kind == "text":
        return f"`{getattr(stats, bullet.field)}`"
    if bullet.kind == "nonfinite":
        return f"NaN {stats.nan}, Inf {stats.inf}" if stats.nan or stats.inf else None
    value = getattr(stats, bullet.field)
    if value is None and not bullet.required:
        return None
    return fmt(value)


def stat_block(title: str, stats: TensorStats, note: str | None = None,
               ctx: Mapping[str, Any] | None = None) -> list[str]:
    """The lines of one stat block: heading, bullets and the italic note (a template over ctx)."""
    ctx = ctx or {}
    lines = [f"#### {_span(HEADING, title)}", ""]
    for bullet in BULLETS:
        value = _bullet_value(stats, bullet)
        if value is not None:
            lines.append(f"- **{bullet.label}**: {_span(VALUE, value)}")
    lines.append("")
    text = _fill(note, {**ctx, **_shape_context(stats)}) if note else None
    if text is not None:
        lines += [f"*{_span(INFO, text)}*", ""]
    return lines


def _shape_context(stats: TensorStats) -> dict[str, int]:
    return {f"s{k}": n for k, n in enumerate(stats.shape)}


def _transposed(stats: TensorStats) -> TensorStats:
    shape = stats.shape
    if len(shape) < 3:
        return stats
    return replace(stats, shape=(shape[0], shape[2], shape[1], *shape[3:]))


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _stage_pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if k % 2 == 0 else rf"(?P<{p}>\d+)" for k, p in enumerate(parts))
    return re.compile(regex + "$")


_BLOCK_STAGES = [_stage_pattern(e.stage) for e in BLOCK_ENTRIES]
_LAYOUT_STAGES = [_stage_pattern(e.stage) for s in LAYOUT for e in s.entries]


def _block_indices(names) -> list[int]:
    found = set()
    for name in names:
        for pattern in _BLOCK_STAGES:
            m = pattern.match(name)
            if m:
                found.add(int(m.group("i")))
    return sorted(found)


def uses_layout(trace: Trace) -> bool:
    """Whether the trace holds stages of the reference model (else every stage renders under STAGES)."""
    return any(
        name not in _GENERIC_STAGES and any(p.match(name) for p in _LAYOUT_STAGES)
        for it in trace.iterations for name in it.forward
    )


def _context(trace: Trace, it: Iteration) -> dict[str, Any]:
    """Numbers for the explanatory lines: from the config, else from the shapes."""
    cfg, fwd = trace.config, it.forward

    def last_dim(stage):
        s = fwd.get(stage)
        return s.shape[-1] if s is not None and s.shape else None

    blocks = _block_indices(fwd)
    wte = trace.parameters.get("wte.weight")
    values = {
        "index": it.index,
        "C": _int(cfg.get("n_embd")) or last_dim("embed.wte"),
        "V": _int(cfg.get("vocab_size")) or last_dim("lm_head.logits") or (wte[0] if wte else None),
        "L": _int(cfg.get("n_layer")) or (blocks[-1] + 1 if blocks else None),
    }
    softcap = cfg.get("softcap")
    if isinstance(softcap, (int, float)) and not isinstance(softcap, bool):
        values["softcap"] = f"{float(softcap):g}"
    if values["C"]:
        values["F"] = 4 * values["C"]
    if values["L"]:
        values["last"] = values["L"] - 1
    return {k: v for k, v in values.items() if v is not None}


def _sparsity_context(forward: Mapping[str, TensorStats], i: int) -> dict[str, Any]:
    out = {}
    for key in ("relu", "relu2"):
        s = forward.get(f"blocks.{i}.mlp.{key}")
        if s is not None and s.zero_frac is not None and s.numel > 0 and math.isfinite(s.zero_frac):
            zeros = s.zeros
            out.update({f"{key}_zeros": zeros, f"{key}_numel": s.numel, f"{key}_pct": f"{100 * zeros / s.numel:.1f}"})
    return out


def _render_entries(entries, forward, ctx, used: set) -> list[str]:
    out = []
    for entry in entries:
        name = _fill(entry.stage, ctx)
        stats = forward.get(name) if name is not None else None
        if stats is None:
            continue
        used.add(name)
        shown = _transposed(stats) if entry.transposed else stats
        local = {**ctx, **_shape_context(shown)}
        out += _emit(entry.before, local)
        out += stat_block(_fill(entry.title, ctx), shown, entry.note, ctx)
        out += _emit(entry.after, local)
    return out


def _render_section(section: Section, forward, ctx, used: set) -> list[str]:
    if section.per_block:
        body = []
        for i in _block_indices(forward):
            block_ctx = {**ctx, "i": i, **_sparsity_context(forward, i)}
            if _fill(section.entries[0].stage, block_ctx) not in forward:
                body += _emit((Y(BLOCK_MARKER), ""), block_ctx)
            body += _render_entries(section.entries, forward, block_ctx, used)
    else:
        body = _render_entries(section.entries, forward, ctx, used)
    if not body and not section.always:
        return []
    heading = _section(_fill(section.title, ctx) or section.title)
    return heading + _emit(section.intro, ctx) + body + _emit(section.outro, ctx)


def _forward(trace: Trace, it: Iteration, layout: bool) -> list[str]:
    ctx = _context(trace, it)
    used: set[str] = set()
    if layout:
        lines = [line for section in LAYOUT for line in _render_section(section, it.forward, ctx, used)]
    else:
        lines = _section(_fill(FORWARD_SECTION.title, ctx))
    rest = [name for name in it.forward if name not in used]
    if rest:
        lines += _section(STAGES) + _emit(STAGES_INTRO, ctx)
        for name in rest:
            lines += stat_block(name, it.forward[name])
    return lines


def _markdown_table(header, rows: list[list[str]], left: int = 0) -> list[str]:
    """A Markdown table whose first `left` columns align left and the others (numbers) right."""
    rule = "|" + "|".join("---" if k < left else "---:" for k in range(len(header))) + "|"
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(row) + " |" for row in rows]


def _grad_table(columns, rows: list[list[str]]) -> list[str]:
    left = sum(kind in _LEFT_ALIGNED for _, kind in columns)
    return _markdown_table([header for header, _ in columns], rows, left=left)


def _cell(stats: TensorStats, name: str, kind: str) -> str:
    if kind == "name":
        return name
    if kind == "shape":
        return f"`{_shape(stats.shape)}`"
    if kind == "dtype":
        return stats.dtype
    if kind == "l2":
        return fmt(stats.l2_norm)
    if kind == "nonfinite":
        return f"{stats.nan}/{stats.inf}"
    return fmt(getattr(stats, kind))


def _gradient_tables(trace: Trace, it: Iteration) -> list[str]:
    lines = []
    if it.stage_grads:
        rows = [[_cell(s, name, kind) for _, kind in STAGE_GRAD_COLUMNS] for name, s in it.stage_grads.items()]
        lines += [_span(INFO, "Stage gradients (d loss / d stage output), in backward order:"), ""]
        lines += _grad_table(STAGE_GRAD_COLUMNS, rows) + [""]
    if it.param_grads:
        rows = []
        for name, s in it.param_grads.items():
            if s is None:
                shape = trace.parameters.get(name)
                row = [name, f"`{_shape(shape)}`" if shape is not None else "n/a", NO_GRADIENT]
                rows.append(row + [""] * (len(PARAM_GRAD_COLUMNS) - len(row)))
            else:
                rows.append([_cell(s, name, kind) for _, kind in PARAM_GRAD_COLUMNS])
        lines += [_span(INFO, "Parameter gradients:"), ""]
        lines += _grad_table(PARAM_GRAD_COLUMNS, rows) + [""]
    return lines


def _backward(trace: Trace, it: Iteration) -> list[str]:
    if not it.stage_grads and not it.param_grads:
        return []
    lines = _section(BACKWARD) + _emit(BACKWARD_INTRO, {})
    for entry in GRADIENT_ENTRIES:
        stats = it.param_grads.get(entry.stage)
        if stats is not None:
            lines += stat_block(entry.title, stats, entry.note)
    return lines + _gradient_tables(trace, it)


def _completion(pos: int, it: Iteration) -> list[str]:
    step = f" ({STEP_NOTES[it.stepped]})" if it.stepped is not None else ""
    return [_span(VALUE, f"✓ Iteration {pos} complete - Loss: {fmt(it.loss)}{step}"), ""]


def _banner(pos: int, total: int) -> list[str]:
    return [f"<strong>{_span(BANNER, f'ITERATION {pos}/{total}')}", f"<strong>{_span(BANNER, '#' * 80)}", ""]


def _config_value(value) -> str | None:
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, str) and value and ", " not in value and "=" not in value:
        return value
    return None


def _config_line(config: Mapping[str, Any], layout: bool) -> str:
    items = [f"{alias}={config[key]}" for key, alias in CONFIG_ALIASES if key in config]
    if not layout:
        aliased = {key for key, _ in CONFIG_ALIASES}
        for key, value in config.items():
            text = _config_value(value)
            if key not in aliased and text is not None:
                items.append(f"{key}={text}")
    return ", ".join(items) or "n/a"


def _device_line(trace: Trace) -> str:
    env = trace.environment
    first = next((s for it in trace.iterations for s in it.forward.values()), None)
    device = env.get("device") or (first.device if first else "n/a")
    device_type = env.get("device_type") or str(device).split(":")[0]
    return f"{device_type} ({device})"


def _header(trace: Trace, layout: bool, generated) -> list[str]:
    if generated is None:
        generated = "n/a"
    elif isinstance(generated, datetime):
        generated = generated.strftime("%Y-%m-%d %H:%M:%S")
    lines = [TITLE, "", f"**Generated**: {generated}", f"**Configuration**: {_config_line(trace.config, layout)}"]
    if trace.model:
        lines.append(f"**Model**: {trace.model}")
    return lines + [f"**Device**: {_device_line(trace)}", f"**Iterations**: {len(trace.iterations)}", ""]


def _count(n: int) -> str:
    return f"{n:,}"


def _component_lines(components: list[scaling.Component], source: str) -> list[str]:
    rows = []
    for c in components:
        per_block = c.uniform_per_block
        rows.append([c.name, "" if not c.per_block else "varies" if per_block is None else _count(per_block),
                     str(len(c.per_block)) if c.per_block else "", _count(c.total)])
    rows.append(["**total**", "", "", f"**{_count(scaling.total_params(components))}**"])
    origin = "the traced parameters" if source == "parameters" else "the config"
    return [_span(INFO, f"Parameters by component (from {origin}):"), "",
            *_markdown_table(["component", "per block", "blocks", "parameters"], rows, left=1), ""]


def _flops_lines(shape: scaling.GPTShape, components: list[scaling.Component]) -> list[str]:
    non_embedding = scaling.total_params(components) - scaling.embedding_params(components)
    dims = f"12 × {shape.n_layer} × {shape.n_head} × {shape.head_dim} × {shape.sequence_len}"
    text = (f"FLOPs per token (forward + backward): 6 × {_count(non_embedding)} non-embedding parameters"
            f" + 12·L·H·D·T = {dims} ({_count(scaling.attention_flops_per_token(shape))})"
            f" = {_count(scaling.flops_per_token(shape, components))}")
    return [_span(INFO, text), ""]


def _sweep_lines(shape: scaling.GPTShape) -> list[str]:
    rule = (f"Growth with depth (nanochat rule: n_embd = 64·depth, n_head = ceil(n_embd / 128);"
            f" V = {_count(shape.vocab_size)}, T = {_count(shape.sequence_len)}):")
    rows = [[str(r.depth), str(r.n_embd), str(r.n_head), _count(r.params), _count(r.flops_per_token)]
            for r in scaling.depth_sweep(shape.vocab_size, shape.sequence_len)]
    header = ["depth", "n_embd", "n_head", "parameters", "FLOPs/token"]
    return [_span(INFO, rule), "", *_markdown_table(header, rows), ""]


def _scaling_lines(trace: Trace) -> list[str]:
    """Parameters per component (always when known), then FLOPs and the depth sweep (GPT configs)."""
    components, source = scaling.choose_components(trace.config, trace.parameters)
    shape = scaling.shape_from_config(trace.config)
    lines = _component_lines(components, source) if components else []
    if shape is None:
        missing = ", ".join(scaling.missing_keys(trace.config)) or "a head count that divides n_embd"
        note = f"No FLOPs or depth scaling: the config lacks {missing} (not a nanochat-style GPT config)"
        return lines + [_span(NOTE, note), ""]
    return lines + _flops_lines(shape, components) + _sweep_lines(shape)


def render(trace: Trace, *, all_iterations: bool = False, anomalies: str | None = None, generated=None) -> str:
    """The trace as a GPT Component Debug Trace in Markdown.

    The first iteration renders in full, later ones as their loss line (every one in full with
    all_iterations). anomalies: pre-rendered Markdown, placed in an ANOMALIES section.
    generated: the header's timestamp, a datetime or a string; without it the header says n/a, so
    that the same trace always renders to the same text.
    """
    layout = uses_layout(trace)
    lines = _header(trace, layout, generated)
    lines += _section(SCALING) + _scaling_lines(trace)
    lines += _section(TRAINING)
    total = len(trace.iterations)
    for pos, it in enumerate(trace.iterations, 1):
        lines += _banner(pos, total)
        if pos == 1 or all_iterations:
            lines += _forward(trace, it, layout) + _backward(trace, it)
        lines += _completion(pos, it)
    if anomalies and anomalies.strip():
        lines += _section(ANOMALIES) + anomalies.strip("\n").splitlines() + [""]
    lines += _section(COMPLETE) + list(KEY_TAKEAWAYS)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- parsing
_SECTION_RE = re.compile(r'^## <span style="color: #[0-9a-fA-F]{6}">(.*)</span>\s*$')
_HEADING_RE = re.compile(r'^#### (?:<span style="color: #[0-9a-fA-F]{6}">(.*)</span>|(.*))\s*$')
_BANNER_RE = re.compile(r'^<strong><span style="color: #[0-9a-fA-F]{6}">ITERATION (\d+)/(\d+)</span>')
_SPAN_RE = re.compile(r'^\*?<span style="color: #[0-9a-fA-F]{6}">(.*)</span>\*?\s*$')
_BULLET_RE = re.compile(r"^- \*\*([^*]+)\*\*:\s*(.*?)\s*$")
_VALUE_RE = re.compile(r'^<span style="color: #[0-9a-fA-F]{6}">(.*)</span>$')
_HEADER_RE = re.compile(r"^\*\*(Generated|Configuration|Model|Device|Iterations)\*\*:\s*(.*?)\s*$")
_DEVICE_RE = re.compile(r"^(\S+) \((.*)\)$")
_NONFINITE_RE = re.compile(r"^NaN (\d+), Inf (\d+)$")
_CELL_NONFINITE_RE = re.compile(r"^(\d+)/(\d+)$")
_COMPLETION_RE = re.compile(r"^✓ Iteration (\d+) complete - Loss: (\S+)(?: \((.+)\))?$")
_SPARSITY_RE = re.compile(r"^Sparsity: (\d+)/(\d+) \([^)]*\) zeros after ReLU²$")
_NEGATIVE_RE = re.compile(r"^Original negative values: (\d+)/(\d+)")
_MARKER_RE = _stage_pattern(BLOCK_MARKER.strip())
_BODY_CONFIG = (
    (re.compile(r"^Embedding matrix shape: \(vocab_size=(\d+), n_embd=(\d+)\)$"), ("vocab_size", "n_embd"), int),
    (re.compile(r"^Batch size: \d+, Sequence length: (\d+)$"), ("sequence_len",), int),
    (re.compile(r"^Capped at ±(\S+) to prevent extreme values$"), ("softcap",), float),
)
_SKIPPED_SECTIONS = (SCALING, ANOMALIES, COMPLETE)
_STEP_BY_NOTE = {v: k for k, v in STEP_NOTES.items()}
HALF_ULP = 5e-7  # half a unit in the last printed place of %.6f: what a report's rounding loses


def _reconcile(candidates) -> float | None:
    """One value consistent with every printed candidate (value, half-width); the most precise wins."""
    cands = [(v, h) for v, h in candidates if v is not None]
    if not cands:
        return None
    for v, _ in cands:
        if not math.isfinite(v):
            return v
    cands.sort(key=lambda c: c[1])
    lo, hi = max(v - h for v, h in cands), min(v + h for v, h in cands)
    for v, _ in cands:
        if lo <= v <= hi:
            return v
    return (lo + hi) / 2 if lo <= hi else cands[0][0]


class _Stats:
    """A TensorStats being assembled from a stat block, table rows and sparsity lines."""

    def __init__(self, shape, dtype: str, device: str):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.values: dict[str, float | None] = {}
        self.rms: list = []
        self.zero: list = []
        self.nonfinite: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def set(self, field: str, value):
        if field == "rms":
            self.rms.append((value, HALF_ULP))
        elif field == "zero_frac":
            self.zero.append((value, HALF_ULP))
        elif field == "l2":
            if value is not None and self.numel:
                root = math.sqrt(self.numel)
                self.rms.append((value / root, HALF_ULP / root))
        elif field == "nonfinite":
            self.nonfinite = self.nonfinite or value
        elif self.values.get(field) is None:
            self.values[field] = value

    def zero_count(self, zeros: int):
        if self.numel:
            self.zero.append((zeros / self.numel, 0.5 / self.numel))

    def build(self) -> TensorStats:
        numel = self.numel
        mean, std, lo, hi = (self.values.get(k) for k in ("mean", "std", "min", "max"))
        if numel == 1 and std is not None and math.isnan(std):
            std = 0.0
        if self.nonfinite is not None:
            nan, inf = self.nonfinite
        else:
            nan = int(any(v is not None and math.isnan(v) for v in (mean, lo, hi)))
            inf = int(any(v is not None and math.isinf(v) for v in (lo, hi)))
        zero = _reconcile(self.zero)
        if zero is None:
            zero = _zero_frac_from_range(lo, hi, numel)
        return TensorStats(shape=self.shape, dtype=self.dtype, device=self.device, numel=numel,
                           mean=mean, std=std, min=lo, max=hi, rms=_reconcile(self.rms), zero_frac=zero,
                           nan=nan, inf=inf)


def _zero_frac_from_range(lo, hi, numel) -> float | None:
    if lo is None or hi is None or numel == 0 or math.isnan(lo) or math.isnan(hi):
        return None
    if lo > 0 or hi < 0 or (hi == 0 and math.copysign(1.0, hi) < 0):
        return 0.0
    if lo == 0 and hi == 0 and math.copysign(1.0, lo) > 0:
        return 1.0
    return None


class _IterationDraft:
    def __init__(self, pos: int):
        self.pos = pos
        self.index: int | None = None
        self.loss: float | None = None
        self.stepped: bool | None = None
        self.completed = False
        self.forward: dict[str, _Stats] = {}
        self.stage_grads: dict[str, _Stats] = {}
        self.param_grads: dict[str, _Stats | None] = {}


class _Parser:
    def __init__(self, text: str, file):
        self.text, self.file = text, file
        self.lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.header_config: dict[str, Any] = {}
        self.body_config: dict[str, Any] = {}
        self.device: tuple[str, str] | None = None
        self.model = ""
        self.declared_iterations: tuple[int, int] | None = None
        self.parameters: dict[str, tuple[int, ...]] = {}
        self.iterations: list[_IterationDraft] = []
        self.section: str | None = None
        self.layout_section: Section | None = None
        self.block: int | None = None

    def fail(self, line: int | None, message: str):
        raise MarkdownParseError(self.file, line, message)

    # -- driver
    def run(self) -> Trace:
        if not self.text.strip():
            self.fail(1, "the file is empty: expected a GPT Component Debug Trace")
        first = next(n for n, line in enumerate(self.lines) if line.strip())
        if self.lines[first].strip() != TITLE:
            self.fail(first + 1, f"not a GPT Component Debug Trace: expected the title '{TITLE}', "
                                 f"got {_short(self.lines[first])}")
        n = first + 1
        while n < len(self.lines):
            n = self.step(n)
        return self.finish()

    def step(self, n: int) -> int:
        line = self.lines[n]
        m = _SECTION_RE.match(line)
        if m and not (self.section == ANOMALIES and m.group(1).strip() != COMPLETE):
            self.enter_section(m.group(1).strip(), n + 1)
            return n + 1
        if self.section in _SKIPPED_SECTIONS:
            return n + 1
        if self.section is None:
            m = _HEADER_RE.match(line)
            if m:
                self.header(m.group(1), m.group(2), n + 1)
                return n + 1
        m = _BANNER_RE.match(line)
        if m:
            self.banner(int(m.group(1)), int(m.group(2)), n + 1)
            return n + 1
        m = _HEADING_RE.match(line)
        if m:
            return self.stat_block((m.group(1) if m.group(1) is not None else m.group(2)).strip(), n)
        if line.startswith("|"):
            return self.table(n)
        m = _SPAN_RE.match(line)
        if m:
            self.span_line(m.group(1).strip(), n + 1)
        elif _BULLET_RE.match(line):
            self.fail(n + 1, "a statistic bullet outside of a stat block (no '#### ' heading above it)")
        return n + 1

    # -- header and sections
    def header(self, key: str, value: str, line: int):
        if key == "Configuration":
            self.header_config = self.config_items(value, line)
        elif key == "Model":
            self.model = value
        elif key == "Device":
            m = _DEVICE_RE.match(value)
            self.device = (m.group(1), m.group(2)) if m else (value.split(":")[0], value)
        elif key == "Iterations":
            if not re.fullmatch(r"\d+", value):
                self.fail(line, f"Iterations: expected a count, got {_short(value)}")
            self.declared_iterations = (int(value), line)

    def config_items(self, value: str, line: int) -> dict[str, Any]:
        if value == "n/a":
            return {}
        aliases = {alias: key for key, alias in CONFIG_ALIASES}
        out = {}
        for item in value.split(", "):
            key, eq, raw = item.partition("=")
            if not eq or not key.strip():
                self.fail(line, f"Configuration: expected key=value items, got {_short(item)}")
            out[aliases.get(key.strip(), key.strip())] = _config_scalar(raw.strip())
        return out

    def enter_section(self, title: str, line: int):
        self.layout_section = None
        if title in (SCALING, ANOMALIES, COMPLETE, TRAINING):
            self.section = title
            return
        self.current(line, f"section '{title}'")
        if title in (STAGES, BACKWARD):
            self.section = title
            return
        for section in LAYOUT:
            m = _stage_pattern(section.title).match(title)
            if m:
                self.section, self.layout_section = section.title, section
                if section is FORWARD_SECTION:
                    self.iterations[-1].index = int(m.group("index"))
                return
        self.fail(line, f"unknown section '{title}'")

    def banner(self, pos: int, total: int, line: int):
        expected = len(self.iterations) + 1
        if pos != expected:
            self.fail(line, f"ITERATION {pos}/{total}: expected iteration {expected}")
        self.iterations.append(_IterationDraft(pos))
        self.section, self.layout_section, self.block = TRAINING, None, None

    def current(self, line: int, what: str) -> _IterationDraft:
        if not self.iterations:
            self.fail(line, f"{what} outside of an iteration (no 'ITERATION k/N' banner before it)")
        return self.iterations[-1]

    # -- stat blocks
    def stat_block(self, title: str, n: int) -> int:
        it = self.current(n + 1, f"stat block '{title}'")
        bullets, end = self.read_bullets(title, n)
        shape, dtype, device = (bullets[label][0] for label in ("Shape", "Dtype", "Device"))
        stats = _Stats(shape, dtype, device)
        for label, (value, _) in bullets.items():
            field = _BULLET_BY_LABEL[label].field
            if field not in ("shape", "dtype", "device"):
                stats.set(field, value)
        self.place(it, title, stats, n + 1)
        return end

    def read_bullets(self, title: str, n: int):
        k = n + 1
        while k < len(self.lines) and not self.lines[k].strip():
            k += 1
        bullets: dict[str, tuple[Any, int]] = {}
        while k < len(self.lines) and self.lines[k].startswith("- "):
            label, value = self.bullet(self.lines[k], k + 1)
            if label in bullets:
                self.fail(k + 1, f"stat block '{title}': a second {label} bullet")
            bullets[label] = (value, k + 1)
            k += 1
        if not bullets:
            self.fail(n + 1, f"stat block '{title}' has no statistics (expected '- **Shape**: ...' bullets below it)")
        missing = [b.label for b in BULLETS if b.required and b.label not in bullets]
        if missing:
            self.fail(n + 1, f"stat block '{title}' lacks the {', '.join(missing)} bullet{'s' * (len(missing) > 1)}")
        return bullets, k

    def bullet(self, line: str, lineno: int):
        m = _BULLET_RE.match(line)
        if not m:
            self.fail(lineno, f"expected a statistic bullet '- **Name**: value', got {_short(line)}")
        label, raw = m.group(1).strip(), m.group(2)
        spec = _BULLET_BY_LABEL.get(label)
        if spec is None:
            self.fail(lineno, f"unknown statistic '{label}' (expected one of {', '.join(_BULLET_BY_LABEL)})")
        span = _VALUE_RE.match(raw)
        value = (span.group(1) if span else raw).strip()
        if not value:
            self.fail(lineno, f"{label}: missing value")
        return label, self.value(spec.kind, value, label, lineno)

    def value(self, kind: str, value: str, label: str, lineno: int):
        if kind in ("shape", "text"):
            value = value.strip("`").strip()
            if not value:
                self.fail(lineno, f"{label}: missing value")
        if kind == "shape":
            shape = _parse_shape(value)
            if shape is None:
                self.fail(lineno, f"{label}: expected a shape such as (1, 1024), got {_short(value)}")
            return shape
        if kind == "nonfinite":
            m = _NONFINITE_RE.match(value) or _CELL_NONFINITE_RE.match(value)
            if not m:
                self.fail(lineno, f"{label}: expected 'NaN n, Inf m', got {_short(value)}")
            return int(m.group(1)), int(m.group(2))
        if kind == "number":
            return self.number(value, label, lineno)
        return value

    def number(self, value: str, label: str, lineno: int) -> float | None:
        if value == "n/a":
            return None
        try:
            return float(value)
        except ValueError:
            self.fail(lineno, f"{label}: expected a number (or nan, inf, n/a), got {_short(value)}")

    def place(self, it: _IterationDraft, title: str, stats: _Stats, line: int):
        if self.section == STAGES:
            it.forward.setdefault(title, stats)
        elif self.section == BACKWARD:
            entry = next((e for e in GRADIENT_ENTRIES if e.title == title), None)
            if entry is None:
                known = " or ".join(f"'{e.title}'" for e in GRADIENT_ENTRIES)
                self.fail(line, f"unknown gradient block '{title}' (expected {known})")
            it.param_grads.setdefault(entry.stage, stats)
            self.parameters.setdefault(entry.stage, stats.shape)
        elif self.layout_section is not None:
            stage, transposed = self.layout_stage(self.layout_section, title, line)
            if transposed and len(stats.shape) >= 3:
                s = stats.shape
                stats.shape = (s[0], s[2], s[1], *s[3:])
            it.forward.setdefault(stage, stats)
        else:
            self.fail(line, f"stat block '{title}' outside of a FORWARD PASS, STAGES or BACKWARD PASS section")

    def layout_stage(self, section: Section, title: str, line: int) -> tuple[str, bool]:
        for entry in section.entries:
            m = _stage_pattern(entry.title.strip()).match(title)
            if not m:
                continue
            ctx = {k: int(v) for k, v in m.groupdict().items()}
            if "i" in ctx:
                self.block = ctx["i"]
            elif section.per_block:
                if self.block is None:
                    self.fail(line, f"stat block '{title}' before any 'Input to Block i' heading")
                ctx["i"] = self.block
            if "{last}" in entry.stage:
                ctx["last"] = self.last_block(line)
            return entry.stage.format_map(ctx), entry.transposed
        self.fail(line, f"unknown stat block '{title}' in section '{section.title}'")

    def last_block(self, line: int) -> int:
        n_layer = self.header_config.get("n_layer")
        if _int(n_layer):
            return n_layer - 1
        if self.block is None:
            self.fail(line, "'Before final norm' needs the depth (Configuration: depth=L) or the blocks above it")
        return self.block

    # -- other lines
    def span_line(self, text: str, line: int):
        m = _COMPLETION_RE.match(text)
        if m:
            return self.completion(m, line)
        if self.section is None:
            return
        for pattern, keys, convert in _BODY_CONFIG:
            m = pattern.match(text)
            if m:
                for key, raw in zip(keys, m.groups()):
                    try:
                        self.body_config.setdefault(key, convert(raw))
                    except ValueError:
                        self.fail(line, f"{key}: expected a number, got {_short(raw)}")
                return
        m = _MARKER_RE.match(text)
        if m:
            self.block = int(m.group("i"))
            return
        for regex, stage in ((_SPARSITY_RE, "relu2"), (_NEGATIVE_RE, "relu")):
            m = regex.match(text)
            if m and self.iterations and self.block is not None:
                stats = self.iterations[-1].forward.get(f"blocks.{self.block}.mlp.{stage}")
                if stats is not None:
                    stats.zero_count(int(m.group(1)))

    def completion(self, m: re.Match, line: int):
        it = self.current(line, "completion line")
        if int(m.group(1)) != it.pos:
            self.fail(line, f"'Iteration {m.group(1)} complete' inside ITERATION {it.pos}")
        it.loss = self.number(m.group(2), "Loss", line)
        note = m.group(3)
        if note is not None:
            if note not in _STEP_BY_NOTE:
                known = " or ".join(f"'({n})'" for n in STEP_NOTES.values())
                self.fail(line, f"unknown step note '({note})' (expected {known})")
            it.stepped = _STEP_BY_NOTE[note]
        it.completed = True

    # -- gradient tables
    def table(self, n: int) -> int:
        header = _cells(self.lines[n])
        end = n
        while end < len(self.lines) and self.lines[end].startswith("|"):
            end += 1
        columns = next((c for c in (STAGE_GRAD_COLUMNS, PARAM_GRAD_COLUMNS) if [h for h, _ in c] == header), None)
        if columns is None or self.section != BACKWARD:
            return end
        it = self.current(n + 1, "gradient table")
        for k in range(n + 2, end):
            cells = _cells(self.lines[k])
            if len(cells) != len(columns):
                self.fail(k + 1, f"gradient table row: expected {len(columns)} cells, got {len(cells)}")
            if columns is STAGE_GRAD_COLUMNS:
                name, stats = self.row(columns, cells, k + 1)
                it.stage_grads.setdefault(name, stats)
            else:
                self.param_row(it, cells, k + 1)
        return end

    def row(self, columns, cells, line: int, stats: _Stats | None = None):
        values = {}
        for (header, kind), cell in zip(columns, cells):
            if kind == "name":
                if not cell:
                    self.fail(line, f"gradient table row: missing {header}")
                values[kind] = cell
            elif kind == "shape":
                values[kind] = self.value("shape", cell, header, line)
            elif kind == "dtype":
                values[kind] = self.value("text", cell, header, line)
            elif kind == "nonfinite":
                values[kind] = self.value("nonfinite", cell, header, line)
            else:
                values[kind] = self.number(cell, header, line)
        if stats is None:
            stats = _Stats(values["shape"], values["dtype"], self.default_device())
        for kind, value in values.items():
            if kind not in ("name", "shape", "dtype"):
                stats.set(kind, value)
        return values["name"], stats

    def param_row(self, it: _IterationDraft, cells: list[str], line: int):
        """A parameter row; the table's order wins over the gradient blocks above it."""
        name = cells[0]
        if len(cells) > 2 and cells[2] == NO_GRADIENT:
            shape = None if cells[1] == "n/a" else self.value("shape", cells[1], "shape", line)
            stats = None
        else:
            name, stats = self.row(PARAM_GRAD_COLUMNS, cells, line, it.param_grads.get(name))
            shape = stats.shape
        it.param_grads[name] = it.param_grads.pop(name, stats)
        if shape is not None:
            self.parameters[name] = self.parameters.pop(name, shape)

    def default_device(self) -> str:
        it = self.iterations[-1]
        for stats in (*it.forward.values(), *(s for s in it.param_grads.values() if s is not None)):
            return stats.device
        return self.device[1] if self.device else ""

    # -- the Trace
    def finish(self) -> Trace:
        if self.declared_iterations is not None and self.declared_iterations[0] != len(self.iterations):
            count, line = self.declared_iterations
            self.fail(line, f"the header declares {count} iterations, the report holds {len(self.iterations)}")
        iterations, previous = [], None
        for draft in self.iterations:
            index = draft.index
            if index is None:  # a loss-only iteration: one past the previous one
                index = previous + 1 if previous is not None else draft.pos - 1
            forward = {k: s.build() for k, s in draft.forward.items()}
            loss = draft.loss if draft.completed else (forward["loss"].mean if "loss" in forward else None)
            iterations.append(Iteration(
                index=index, loss=loss, stepped=draft.stepped, lr={}, forward=forward,
                stage_grads={k: s.build() for k, s in draft.stage_grads.items()},
                param_grads={k: (s.build() if s is not None else None) for k, s in draft.param_grads.items()},
            ))
            previous = index
        environment = {"source": "markdown"}
        if self.device:
            environment = {"device": self.device[1], "device_type": self.device[0], **environment}
        return Trace(config=self.config(iterations), environment=environment, iterations=tuple(iterations),
                     parameters=dict(self.parameters), model=self.model)

    def config(self, iterations: list[Iteration]) -> dict[str, Any]:
        found = {**self.body_config, **self.header_config}
        for it in iterations:
            for name, stats in it.forward.items():
                if re.fullmatch(r"blocks\.\d+\.attn\.k", name) and len(stats.shape) == 4:
                    found.setdefault("n_kv_head", stats.shape[2])
        ordered = {k: found[k] for k in CONFIG_ORDER if k in found}
        return {**ordered, **{k: v for k, v in found.items() if k not in ordered}}


def _cells(line: str) -> list[str]:
    inner = line.strip()
    if inner.startswith("|"):
        inner = inner[1:]
    if inner.endswith("|"):
        inner = inner[:-1]
    return [c.strip() for c in inner.split("|")]


def _parse_shape(text: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"\(\s*((?:\d+\s*,\s*)*\d*)\s*,?\s*\)", text)
    if not m:
        return None
    return tuple(int(p) for p in re.split(r"\s*,\s*", m.group(1)) if p)


def _config_scalar(raw: str):
    if re.fullmatch(r"-?\d+", raw):
        return int(raw)
    if raw in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[raw]
    try:
        return float(raw)
    except ValueError:
        return raw


def _short(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= 60 else text[:57] + "...")


def parse(text: str, file=None) -> Trace:
    """Read a GPT Component Debug Trace (the seed's, or one render wrote) into a Trace.

    Raises MarkdownParseError naming the file and line when the text is not such a report.
    """
    return _Parser(text, file).run()


def load(path) -> Trace:
    """parse() the file at path."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MarkdownParseError(path, None, "no such file") from None
    except IsADirectoryError:
        raise MarkdownParseError(path, None, "is a directory, not a Markdown trace") from None
    except UnicodeDecodeError:
        raise MarkdownParseError(path, None, "not a UTF-8 text file (expected a Markdown trace)") from None
    return parse(text, file=path)
