"""A Trace rendered as a GPT Component Debug Trace in Markdown (the seed report's format).

The first iteration renders in full, later ones as their loss line (every one with
all_iterations). A stat block is a ``#### `` heading followed by bullets
``- **Name**: <span style="color: #5faf00">value</span>``; see ``layout`` for what goes where.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from .. import scaling
from ..anomalies import Anomaly, Severity
from ..trace import EnvKey, Iteration, TensorStats, Trace
from .layout import (
    ANOMALIES,
    BACKWARD,
    BACKWARD_INTRO,
    BANNER,
    BLOCK_ENTRIES,
    BLOCK_MARKER,
    BULLETS,
    COMPLETE,
    CONFIG_ALIASES,
    FORWARD_SECTION,
    GENERIC_STAGES,
    GRADIENT_ENTRIES,
    HEADING,
    INFO,
    KEY_TAKEAWAYS,
    LAYOUT,
    LEFT_ALIGNED,
    NO_GRADIENT,
    NOTE,
    PARAM_GRAD_COLUMNS,
    SCALING,
    SECTION,
    STAGE_GRAD_COLUMNS,
    STAGES,
    STAGES_INTRO,
    STEP_NOTES,
    TITLE,
    TRAINING,
    VALUE,
    Bullet,
    Entry,
    LineItem,
    Section,
    Y,
    as_int,
    fmt,
    stage_pattern,
)


def _span(color: str, text: str) -> str:
    return f'<span style="color: {color}">{text}</span>'


def _section(title: str) -> list[str]:
    return ["", "---", "", f"## {_span(SECTION, title)}", ""]


def _fill(template: str, ctx: Mapping[str, Any]) -> str | None:
    try:
        return template.format_map(ctx)
    except (KeyError, IndexError, ValueError):
        return None


def _emit(lines: Iterable[LineItem], ctx: Mapping[str, Any]) -> list[str]:
    """Render Line templates; a blank line follows only lines that were rendered."""
    out: list[str] = []
    pending = False
    for line in lines:
        if isinstance(line, str):  # "": a blank line
            if pending:
                out.append("")
            pending = False
            continue
        text = _fill(line.text, ctx)
        if text is not None:
            out.append(_span(line.color, text))
            pending = True
    return out


def _shape(shape: Sequence[int]) -> str:
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


_BLOCK_STAGES = [stage_pattern(e.stage) for e in BLOCK_ENTRIES]
_LAYOUT_STAGES = [stage_pattern(e.stage) for s in LAYOUT for e in s.entries]


def _block_indices(names: Iterable[str]) -> list[int]:
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
        name not in GENERIC_STAGES and any(p.match(name) for p in _LAYOUT_STAGES)
        for it in trace.iterations for name in it.forward
    )


def _context(trace: Trace, it: Iteration) -> dict[str, Any]:
    """Numbers for the explanatory lines: from the config, else from the shapes."""
    cfg, fwd = trace.config, it.forward

    def last_dim(stage: str) -> int | None:
        s = fwd.get(stage)
        return s.shape[-1] if s is not None and s.shape else None

    blocks = _block_indices(fwd)
    wte = trace.parameters.get("wte.weight")
    values: dict[str, Any] = {
        "index": it.index,
        "C": as_int(cfg.get("n_embd")) or last_dim("embed.wte"),
        "V": as_int(cfg.get("vocab_size")) or last_dim("lm_head.logits") or (wte[0] if wte else None),
        "L": as_int(cfg.get("n_layer")) or (blocks[-1] + 1 if blocks else None),
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
    out: dict[str, Any] = {}
    for key in ("relu", "relu2"):
        s = forward.get(f"blocks.{i}.mlp.{key}")
        if s is not None and s.zero_frac is not None and s.numel > 0 and math.isfinite(s.zero_frac):
            zeros = round(s.zero_frac * s.numel)  # TensorStats.zeros, known here
            out.update({f"{key}_zeros": zeros, f"{key}_numel": s.numel, f"{key}_pct": f"{100 * zeros / s.numel:.1f}"})
    return out


def _render_entries(entries: Iterable[Entry], forward: Mapping[str, TensorStats], ctx: Mapping[str, Any],
                    used: set[str]) -> list[str]:
    out: list[str] = []
    for entry in entries:
        name = _fill(entry.stage, ctx)
        stats = forward.get(name) if name is not None else None
        if name is None or stats is None:
            continue
        used.add(name)
        shown = _transposed(stats) if entry.transposed else stats
        local = {**ctx, **_shape_context(shown)}
        out += _emit(entry.before, local)
        out += stat_block(_fill(entry.title, ctx) or entry.title, shown, entry.note, ctx)
        out += _emit(entry.after, local)
    return out


def _render_section(section: Section, forward: Mapping[str, TensorStats], ctx: Mapping[str, Any],
                    used: set[str]) -> list[str]:
    if section.per_block:
        body: list[str] = []
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
        lines = _section(_fill(FORWARD_SECTION.title, ctx) or FORWARD_SECTION.title)
    rest = [name for name in it.forward if name not in used]
    if rest:
        lines += _section(STAGES) + _emit(STAGES_INTRO, ctx)
        for name in rest:
            lines += stat_block(name, it.forward[name])
    return lines


def _markdown_table(header: Sequence[str], rows: list[list[str]], left: int = 0) -> list[str]:
    """A Markdown table whose first `left` columns align left and the others (numbers) right."""
    rule = "|" + "|".join("---" if k < left else "---:" for k in range(len(header))) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows)]


def _grad_table(columns: Sequence[tuple[str, str]], rows: list[list[str]]) -> list[str]:
    left = sum(kind in LEFT_ALIGNED for _, kind in columns)
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
    return fmt(stats.stat(kind))


def _gradient_tables(trace: Trace, it: Iteration) -> list[str]:
    lines: list[str] = []
    if it.stage_grads:
        rows = [[_cell(s, name, kind) for _, kind in STAGE_GRAD_COLUMNS] for name, s in it.stage_grads.items()]
        lines += [_span(INFO, "Stage gradients (d loss / d stage output), in backward order:"), ""]
        lines += [*_grad_table(STAGE_GRAD_COLUMNS, rows), ""]
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
        lines += [*_grad_table(PARAM_GRAD_COLUMNS, rows), ""]
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


def _config_value(value: object) -> str | None:
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
    device = env.get(EnvKey.DEVICE) or (first.device if first else "n/a")
    device_type = env.get(EnvKey.DEVICE_TYPE) or str(device).split(":")[0]
    return f"{device_type} ({device})"


def _header(trace: Trace, layout: bool, generated: datetime | str | None) -> list[str]:
    if generated is None:
        stamp = "n/a"
    elif isinstance(generated, datetime):
        stamp = generated.strftime("%Y-%m-%d %H:%M:%S")
    else:
        stamp = generated
    lines = [TITLE, "", f"**Generated**: {stamp}", f"**Configuration**: {_config_line(trace.config, layout)}"]
    if trace.model:
        lines.append(f"**Model**: {trace.model}")
    return [*lines, f"**Device**: {_device_line(trace)}", f"**Iterations**: {len(trace.iterations)}", ""]


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
    dims = f"12 × {shape.n_layer} × {shape.n_head} × {shape.head_dim} × {shape.sequence_len}"  # noqa: RUF001
    text = (f"FLOPs per token (forward + backward): 6 × {_count(non_embedding)} non-embedding parameters"  # noqa: RUF001
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
    lines = _component_lines(components, source) if components and source else []
    if shape is None:
        missing = ", ".join(scaling.missing_keys(trace.config)) or "a head count that divides n_embd"
        note = f"No FLOPs or depth scaling: the config lacks {missing} (not a nanochat-style GPT config)"
        return [*lines, _span(NOTE, note), ""]
    return lines + _flops_lines(shape, components) + _sweep_lines(shape)


def anomaly_items(anomalies: Sequence[Anomaly]) -> list[str]:
    """The body of the report's ANOMALIES section: one coloured item per anomaly."""
    colours = {Severity.ERROR: "#d70000", Severity.WARNING: "#d7af00", Severity.INFO: "#0087ff"}
    if not anomalies:
        return ['<span style="color: #5faf00">No anomalies.</span>']
    return [f'- <span style="color: {colours[a.severity]}">**{a.severity.upper()}** `{a.rule}`</span>: '
            f"{a.located}. Likely cause: {a.cause}. Fix: {a.fix}." for a in anomalies]


def render(trace: Trace, *, all_iterations: bool = False, anomalies: Sequence[Anomaly] | None = None,
           generated: datetime | str | None = None) -> str:
    """The trace as a GPT Component Debug Trace in Markdown.

    The first iteration renders in full, later ones as their loss line (every one in full with
    all_iterations). anomalies: the diagnoses for an ANOMALIES section (None: no such section).
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
    if anomalies is not None:
        lines += [*_section(ANOMALIES), *anomaly_items(anomalies), ""]
    lines += _section(COMPLETE) + list(KEY_TAKEAWAYS)
    return "\n".join(lines) + "\n"


