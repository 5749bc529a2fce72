"""The layout of a GPT Component Debug Trace, shared by the renderer and the parser.

``LAYOUT`` maps every heading of the reference layout to its canonical stage (``{i}``: the block
index, ``{last}``: the last block). Some stages are shown twice under another title (Q/K/V
transposed, the MLP input, ...): they render from the canonical stage and parse from their first
occurrence. Headings of the STAGES section are stage names.

Numbers print as ``%.6f`` (``fmt``); ``HALF_ULP`` is what that rounding can lose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


LineItem = Line | str  # an item of a line list: a Line, or "" for a blank line


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
    before: tuple[LineItem, ...] = ()
    after: tuple[LineItem, ...] = ()
    transposed: bool = False  # shown with dims 1 and 2 swapped, (B, T, H, D) -> (B, H, T, D)


@dataclass(frozen=True)
class Section:
    title: str
    entries: tuple[Entry, ...]
    intro: tuple[LineItem, ...] = ()
    outro: tuple[LineItem, ...] = ()
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
GENERIC_STAGES = {"loss", "final_norm"}

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
BULLET_BY_LABEL = {b.label: b for b in BULLETS}

# gradient tables: (header, kind); kinds name a TensorStats field or "name", "l2", "nonfinite"
STAGE_GRAD_COLUMNS = (("stage", "name"), ("shape", "shape"), ("dtype", "dtype"), ("mean", "mean"),
                      ("std", "std"), ("rms", "rms"), ("zero fraction", "zero_frac"), ("NaN/Inf", "nonfinite"))
PARAM_GRAD_COLUMNS = (("parameter", "name"), ("shape", "shape"), ("dtype", "dtype"), ("std", "std"),
                      ("L2 norm", "l2"), ("zero fraction", "zero_frac"), ("NaN/Inf", "nonfinite"))
LEFT_ALIGNED = {"name", "shape", "dtype"}


# ----------------------------------------------------------------------------- numbers
HALF_ULP = 5e-7  # half a unit in the last printed place of %.6f: what a report's rounding loses


def fmt(x: float | None) -> str:
    """A statistic as the seed prints it: %.6f (nan, inf, -0.000000), n/a when unknown."""
    return "n/a" if x is None else f"{x:.6f}"


def as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def stage_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if k % 2 == 0 else rf"(?P<{p}>\d+)" for k, p in enumerate(parts))
    return re.compile(regex + "$")
