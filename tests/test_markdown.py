import math
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gpttrace import markdown
from pytest_gpttrace.anomalies import ERROR, Anomaly
from pytest_gpttrace.errors import MarkdownParseError, TraceFormatError
from pytest_gpttrace.trace import Iteration, TensorStats, Trace, dumps, loads, replace_stats
from tests.paths import SEED_REPORT

SEED_BULLETS = ("Shape", "Dtype", "Device", "Mean", "Std", "Min", "Max")
BLOCK_STAGES = (
    "input", "attn.norm", "attn.q", "attn.k", "attn.v", "attn.q_rope", "attn.k_rope", "attn.q_norm",
    "attn.k_norm", "attn.sdpa", "attn.heads", "attn.out", "attn_resid", "mlp.norm", "mlp.fc", "mlp.relu",
    "mlp.relu2", "mlp.out", "mlp_resid",
)
CONFIG = {"sequence_len": 8, "vocab_size": 32, "n_layer": 2, "n_head": 2, "n_kv_head": 1, "n_embd": 16,
          "softcap": 15.0, "rope_base": 10000.0}


def reference_stage_names(n_layer: int) -> list[str]:
    names = ["inputs.idx", "inputs.targets", "embed.wte", "embed.norm", "rope.cos", "rope.sin"]
    for i in range(n_layer):
        names += [f"blocks.{i}.{s}" for s in BLOCK_STAGES]
    return [*names, "final_norm", "lm_head.logits", "lm_head.softcap", "loss"]


def stats(shape=(2, 3), mean=0.5, std=1.25, lo=-2.0, hi=3.0, rms=1.5, zero_frac=0.0, nan=0, inf=0,
          dtype="torch.float32") -> TensorStats:
    return TensorStats(shape=tuple(shape), dtype=dtype, device="cpu", numel=math.prod(shape), mean=mean,
                       std=std, min=lo, max=hi, rms=rms, zero_frac=zero_frac, nan=nan, inf=inf)


def stage_shape(name: str, c=CONFIG) -> tuple[int, ...]:
    T, d, h, kv = c["sequence_len"], c["n_embd"], c["n_head"], c["n_kv_head"]
    D = d // h
    for suffix, shape in ((".q", (1, T, h, D)), (".q_rope", (1, T, h, D)), (".q_norm", (1, T, h, D)),
                          (".k", (1, T, kv, D)), (".v", (1, T, kv, D)), (".k_rope", (1, T, kv, D)),
                          (".k_norm", (1, T, kv, D)), (".sdpa", (1, h, T, D)), ("mlp.fc", (1, T, 4 * d)),
                          ("mlp.relu", (1, T, 4 * d)), ("mlp.relu2", (1, T, 4 * d))):
        if name.endswith(suffix):
            return shape
    if name.startswith("inputs."):
        return (1, T)
    if name.startswith("rope."):
        return (1, T, 1, D // 2)
    if name.startswith("lm_head."):
        return (1, T, c["vocab_size"])
    if name == "loss":
        return ()
    return (1, T, d)


def reference_parameters(c=CONFIG) -> dict[str, tuple[int, ...]]:
    d, V, kv = c["n_embd"], c["vocab_size"], c["n_kv_head"] * (c["n_embd"] // c["n_head"])
    params: dict[str, tuple[int, ...]] = {"wte.weight": (V, d)}
    for i in range(c["n_layer"]):
        params.update({f"blocks.{i}.attn.c_q.weight": (d, d), f"blocks.{i}.attn.c_k.weight": (kv, d),
                       f"blocks.{i}.attn.c_v.weight": (kv, d), f"blocks.{i}.attn.c_proj.weight": (d, d),
                       f"blocks.{i}.mlp.c_fc.weight": (4 * d, d), f"blocks.{i}.mlp.c_proj.weight": (d, 4 * d)})
    params["lm_head.weight"] = (V, d)
    return params


def reference_iteration(index: int, names=None, stepped=True) -> Iteration:
    names = reference_stage_names(int(CONFIG["n_layer"])) if names is None else names
    forward = {}
    for k, name in enumerate(names):
        shape = stage_shape(name)
        if name == "loss":
            forward[name] = stats(shape, mean=3.4657 + index, std=0.0, lo=3.4657 + index, hi=3.4657 + index,
                                  rms=3.4657 + index)
        elif name.endswith("mlp.relu") or name.endswith("mlp.relu2"):
            forward[name] = stats(shape, mean=0.4, std=0.6, lo=0.0, hi=4.0 + k, rms=0.7, zero_frac=0.5 + 0.01 * k)
        elif name.endswith(".out") or name.startswith("lm_head."):
            forward[name] = stats(shape, mean=0.0, std=0.0, lo=0.0, hi=0.0, rms=0.0, zero_frac=1.0)
        else:
            forward[name] = stats(shape, mean=0.001 * k - 0.01, std=1.0 + 0.001 * k, lo=-4.0 - k, hi=4.0 + k)
    grads = {name: stats(s.shape, mean=-1e-9, std=0.0123, lo=None, hi=None, rms=0.0125, zero_frac=0.25)
             for name, s in reversed(forward.items())}
    params: dict[str, TensorStats | None] = {
        name: stats(shape, mean=-1e-9, std=0.00015, lo=-0.0287, hi=0.0345, rms=0.00016, zero_frac=0.0)
        for name, shape in reference_parameters().items()}
    params["blocks.0.attn.c_q.weight"] = None
    return Iteration(index=index, loss=3.4657 + index, stepped=stepped, lr={"AdamW[0]": 0.004},
                     forward=forward, stage_grads=grads, param_grads=params)


def reference_trace(iterations=3, **kwargs) -> Trace:
    its = tuple(reference_iteration(i, stepped=i % 2 == 0, **kwargs) for i in range(iterations))
    return Trace(config=CONFIG, environment={"device_type": "cpu", "device": "cpu", "torch": "2.13.0"},
                 iterations=its, parameters=reference_parameters(), model="GPT")


PRINTED = {  # the statistics each place prints: stat blocks, the stage and the parameter table
    "block": ("mean", "std", "min", "max", "rms", "zero_frac"),
    "stage_grads": ("mean", "std", "rms", "zero_frac"),
    "param_grads": ("std", "l2_norm", "zero_frac"),
}


def printed(s: TensorStats | None, where: str = "block") -> dict[str, str]:
    """What the renderer prints of a TensorStats, as text."""
    if s is None:
        return {"grad": "none"}
    out = {"shape": str(s.shape), "dtype": s.dtype, "numel": str(s.numel), "nan": str(s.nan), "inf": str(s.inf)}
    for field in PRINTED[where]:
        if getattr(s, field) is not None:
            out[field] = markdown.fmt(getattr(s, field))
    return out


def assert_preserved(original: Trace, parsed: Trace, iterations=None):
    """Every statistic the original prints reads back to the same printed text."""
    for a, b in zip(original.iterations[:iterations], parsed.iterations[:iterations], strict=True):
        assert (a.index, a.stepped, markdown.fmt(a.loss)) == (b.index, b.stepped, markdown.fmt(b.loss))
        for kind in ("forward", "stage_grads", "param_grads"):
            mine, theirs = getattr(a, kind), getattr(b, kind)
            assert list(mine) == list(theirs), kind
            for name in mine:
                where = "block" if kind == "forward" or name in ("wte.weight", "lm_head.weight") else kind
                expected, got = printed(mine[name], where), printed(theirs[name], where)
                assert {k: got.get(k) for k in expected} == expected, (kind, name)


def bullet_values(md: str, labels=SEED_BULLETS) -> list[str]:
    pattern = re.compile(rf"^- \*\*({'|'.join(labels)})\*\*: <span[^>]*>(.*)</span>$", re.M)
    return [f"{m.group(1)}={m.group(2)}" for m in pattern.finditer(md)]


def headings(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("#")]


@pytest.fixture(scope="module")
def seed_text() -> str:
    return SEED_REPORT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def seed(seed_text) -> Trace:
    return markdown.parse(seed_text, file=SEED_REPORT)


# ----------------------------------------------------------------------------- the seed
def test_seed_has_117_stat_blocks_mapped_to_the_canonical_stages(seed_text, seed):
    assert sum(line.startswith("#### ") for line in seed_text.splitlines()) == 117
    first = seed.iterations[0]
    assert list(first.forward) == reference_stage_names(4)
    assert list(first.param_grads) == ["wte.weight", "lm_head.weight"]
    assert seed.parameters == {"wte.weight": (65536, 256), "lm_head.weight": (65536, 256)}
    assert [it.index for it in seed.iterations] == [0, 1, 2]
    assert [it.forward for it in seed.iterations[1:]] == [{}, {}]
    assert [markdown.fmt(it.loss) for it in seed.iterations] == ["11.090358"] * 3
    assert [it.stepped for it in seed.iterations] == [None] * 3


def test_seed_config_and_environment(seed):
    assert seed.config == {"sequence_len": 1024, "vocab_size": 65536, "n_layer": 4, "n_head": 2,
                           "n_kv_head": 2, "n_embd": 256, "softcap": 15.0}
    assert seed.environment["device"] == "cpu" and seed.environment["source"] == "markdown"


def test_seed_statistics(seed):
    fwd = seed.iterations[0].forward
    idx = fwd["inputs.idx"]
    assert (idx.shape, idx.dtype, idx.numel, idx.mean, idx.min) == ((1, 1024), "torch.int32", 1024, 4730.903320, 10.0)
    assert idx.rms is None and idx.zero_frac == 0.0
    assert fwd["blocks.0.attn.q_norm"].shape == (1, 1024, 2, 128)  # the transposed repeat is not kept
    relu2, relu = fwd["blocks.0.mlp.relu2"], fwd["blocks.0.mlp.relu"]
    assert (relu2.zeros, relu2.numel) == (524845, 1048576)
    assert relu.zeros == 524845
    assert fwd["blocks.3.mlp.relu2"].zeros == 526773
    for name in ("blocks.0.attn.out", "blocks.2.mlp.out", "lm_head.logits", "lm_head.softcap"):
        assert fwd[name].zero_frac == 1.0 and fwd[name].all_zero
    assert fwd["embed.wte"].zero_frac is None
    loss = fwd["loss"]
    assert (loss.shape, loss.numel, loss.std, loss.nan, loss.inf) == ((1,), 1, 0.0, 0, 0)
    grads = seed.iterations[0].param_grads
    assert grads["wte.weight"].all_zero
    lm = grads["lm_head.weight"]
    assert (lm.std, lm.min, lm.max, lm.zero_frac) == (0.000153, -0.028741, 0.034515, None)
    assert math.copysign(1.0, lm.mean) == -1.0  # printed -0.000000


def test_seed_repeats_agree_with_their_canonical_stage(seed_text):
    """The Markdown shows some stages twice; rendering them from the canonical stage loses nothing."""
    rerendered = markdown.render(markdown.parse(seed_text), generated="2025-11-01 14:32:09")
    assert bullet_values(rerendered) == [
        "Std=0.000000" if v == "Std=nan" else v for v in bullet_values(seed_text)
    ]


def test_seed_rerender_keeps_every_line_in_order(seed_text, seed):
    """Every seed line (the n/a loss std aside) appears in the re-render, in order: nothing dropped."""
    out = markdown.render(seed, generated="2025-11-01 14:32:09")
    nan_std = '- **Std**: <span style="color: #5faf00">nan</span>'
    expected = [line.replace(">nan<", ">0.000000<") if line == nan_std else line for line in seed_text.splitlines()]
    it = iter(out.splitlines())
    missing = [line for line in expected if not any(line == got for got in it)]
    assert missing == []
    assert headings(out) == headings(seed_text)
    assert "36,700,160" in out and "132,120,576" in out
    assert out.endswith("6. Model scales with depth, d_model, and n_heads\n")


def test_seed_json_markdown_round_trip_is_exact(seed):
    via_json = loads(dumps(seed))
    again = markdown.parse(markdown.render(via_json, all_iterations=True))
    for a, b in zip(via_json.iterations, again.iterations, strict=True):
        assert a.forward == b.forward and a.param_grads == b.param_grads and a.loss == b.loss


def test_seed_render_is_stable(seed):
    once = markdown.render(seed, generated="t")
    assert markdown.render(markdown.parse(once), generated="t") == once


# ----------------------------------------------------------------------------- synthetic traces
def test_reference_trace_round_trip():
    trace = reference_trace()
    md = markdown.render(loads(dumps(trace)), generated="t")
    parsed = markdown.parse(md)
    assert_preserved(trace, parsed, iterations=1)
    assert [markdown.fmt(it.loss) for it in parsed.iterations] == ["3.465700", "4.465700", "5.465700"]
    assert [it.stepped for it in parsed.iterations] == [True, False, True]
    assert parsed.iterations[1].forward == {}
    assert parsed.parameters == trace.parameters
    assert {k: parsed.config[k] for k in parsed.config} == {k: v for k, v in CONFIG.items() if k != "rope_base"}
    assert parsed.model == "GPT"


def test_reference_trace_explanatory_numbers_follow_the_config():
    md = markdown.render(reference_trace(1), generated="t")
    for line in ("Embedding matrix shape: (vocab_size=32, n_embd=16)", "Batch size: 1, Sequence length: 8",
                 "Shape: [B=1, T=8, n_head=2, head_dim=8]", "Shape: [B=1, T=8, n_kv_head=1, head_dim=8]",
                 "Shape: [B=1, H=1, T=8, D=8]", "c_fc: Linear(16, 64, bias=False)", "Capped at ±15 to prevent",
                 "3. TRANSFORMER BLOCK STACK (depth=2)", "Shape: (n_embd=16) -> (vocab_size=32)",
                 "Sparsity: 369/512 (72.1%) zeros after ReLU²", "Original negative values: 364/512 (71.1%)",
                 "(optimizer step)",
                 "| blocks.0.attn.c_q.weight | `(16, 16)` | no gradient |"):
        assert line in md, line
    assert "65536" not in md


def test_all_iterations_renders_every_iteration_in_full():
    trace = reference_trace(3)
    short, full = markdown.render(trace, generated="t"), markdown.render(trace, all_iterations=True, generated="t")
    assert short.count("FORWARD PASS #") == 1 and full.count("FORWARD PASS #") == 3
    assert "(micro-step: no optimizer step)" in short
    assert_preserved(trace, markdown.parse(full))


def test_special_values_round_trip():
    """An empty tensor (every statistic n/a), NaN and Inf counts, a one-element loss."""
    forward = {
        "tok_emb": stats((2, 4)),
        "empty": TensorStats(shape=(0, 4), dtype="torch.float32", device="cpu", numel=0),
        "poisoned": stats((4, 4), mean=math.nan, std=math.nan, lo=math.nan, hi=math.nan, rms=math.nan,
                          zero_frac=0.125, nan=3, inf=1),
        "overflow": stats((8,), mean=math.inf, std=math.nan, lo=-1.0, hi=math.inf, rms=math.inf, inf=2),
        "loss": stats((), mean=2.5, std=0.0, lo=2.5, hi=2.5, rms=2.5),
    }
    trace = Trace(config={}, environment={"device": "cpu"}, model="Toy", parameters={"w": (3,)}, iterations=(
        Iteration(index=0, loss=None, stepped=None, forward=forward,
                  stage_grads={"loss": stats(()), "poisoned": forward["poisoned"]},
                  param_grads={"w": None}),))
    md = markdown.render(trace, generated="t")
    assert "- **Non-finite**: <span style=\"color: #5faf00\">NaN 3, Inf 1</span>" in md
    assert "Loss: n/a" in md and "| w | `(3,)` | no gradient |" in md
    parsed = markdown.parse(md)
    assert_preserved(trace, parsed)
    fwd = parsed.iterations[0].forward
    assert fwd["empty"] == forward["empty"]
    assert (fwd["poisoned"].nan, fwd["poisoned"].inf, fwd["overflow"].inf) == (3, 1, 2)
    assert fwd["loss"].std == 0.0 and fwd["loss"].shape == ()
    assert parsed.iterations[0].param_grads == {"w": None} and parsed.parameters == {"w": (3,)}


def test_nan_statistics_without_counts_mean_at_least_one_nan():
    md = markdown.render(Trace({}, {}, (Iteration(0, 1.0, None, forward={"x": stats((3,))}),)), generated="t")
    md = md.replace("- **Mean**: <span style=\"color: #5faf00\">0.500000</span>",
                    "- **Mean**: <span style=\"color: #5faf00\">nan</span>")
    md = md.replace("- **Max**: <span style=\"color: #5faf00\">3.000000</span>",
                    "- **Max**: <span style=\"color: #5faf00\">inf</span>")
    x = markdown.parse(md).iterations[0].forward["x"]
    assert x.mean is not None and math.isnan(x.mean) and (x.nan, x.inf) == (1, 1)


def user_trace() -> Trace:
    names = ["tok_emb", "layers.0.attn.qkv", "layers.0.attn.proj", "layers.0.mlp", "head", "loss"]
    forward = {name: stats((1, 4, 8), mean=0.1 * k, lo=-1.0 - k, hi=1.0 + k) for k, name in enumerate(names)}
    return Trace(config={"vocab": 64, "d": 8, "dropout": 0.1, "name": "tiny"}, environment={"device": "cpu"},
                 model="UserGPT", parameters={"tok_emb.weight": (64, 8), "head.weight": (64, 8)},
                 iterations=(Iteration(0, 4.1, True, forward=forward,
                                       param_grads={"tok_emb.weight": stats((64, 8)), "head.weight": stats((64, 8))}),))


def test_user_model_renders_a_stages_section_and_parses_back():
    trace = user_trace()
    md = markdown.render(trace, generated="t")
    assert "## <span style=\"color: #af87ff\">STAGES</span>" in md
    assert "TOKEN EMBEDDINGS" not in md and "LOSS COMPUTATION" not in md
    assert "the config lacks n_layer, n_embd, n_head, vocab_size, sequence_len" in md
    assert "| **total** |  |  | **1,024** |" in md
    parsed = markdown.parse(md)
    assert_preserved(trace, parsed)
    assert parsed.config == trace.config and parsed.model == "UserGPT"


def test_narrowed_capture_renders_what_is_there():
    names = ["blocks.1.attn.q", "blocks.1.mlp.relu", "blocks.1.mlp.relu2", "blocks.1.mlp_resid", "loss", "custom.tap"]
    iteration = reference_iteration(0, names=names)
    iteration = Iteration(0, 1.0, None, forward=iteration.forward)
    trace = Trace(config=CONFIG, environment={}, iterations=(iteration,))
    md = markdown.render(trace, generated="t")
    assert "Block 1 (input not traced)" in md and "Before final norm" in md
    assert "TOKEN EMBEDDINGS" not in md and "BACKWARD PASS" not in md
    assert md.index("LOSS COMPUTATION") < md.index("custom.tap")  # leftovers go to STAGES
    parsed = markdown.parse(md)
    assert list(parsed.iterations[0].forward) == names
    assert_preserved(trace, parsed)


def test_anomalies_section_is_rendered_and_skipped_by_the_parser():
    trace = reference_trace(2)
    anomalies = [Anomaly("stuck-loss", ERROR, 1, "blocks.0.attn.q", "#### Loss is flat\n\n- **Mean**: <span>oops</span>",
                         "## <span style=\"color: #af87ff\">X</span>", "none")]
    md = markdown.render(trace, anomalies=anomalies, generated="t")
    assert md.index("ANOMALIES") < md.index("TRAINING COMPLETE") and "#### Loss is flat" in md
    assert_preserved(trace, markdown.parse(md), iterations=1)


def test_load_reads_a_file_and_names_it_in_errors(tmp_path):
    path = tmp_path / "t.md"
    path.write_text(markdown.render(user_trace(), generated="t"), encoding="utf-8")
    assert next(iter(markdown.load(path).iterations[0].forward)) == "tok_emb"
    with pytest.raises(TraceFormatError, match=r"missing\.md: no such file"):  # the one error of every reader
        markdown.load(tmp_path / "missing.md")


# ----------------------------------------------------------------------------- malformed input
def replace_line(text: str, predicate, new: str | None) -> tuple[str, int]:
    lines = text.splitlines()
    n = next(k for k, line in enumerate(lines) if predicate(line))
    if new is None:
        del lines[n]
    else:
        lines[n] = new
    return "\n".join(lines) + "\n", n + 1


def first_heading_line(text: str) -> int:
    return next(k for k, line in enumerate(text.splitlines(), 1) if line.startswith("#### "))


MALFORMED = {
    "not a number": (lambda s: "**Mean**" in s, '- **Mean**: <span style="color: #5faf00">abc</span>', 0,
                     "Mean: expected a number"),
    "missing value": (lambda s: "**Std**" in s, "- **Std**: ", 0, "Std: missing value"),
    "empty span": (lambda s: "**Max**" in s, '- **Max**: <span style="color: #5faf00"></span>', 0,
                   "Max: missing value"),
    "bad shape": (lambda s: "**Shape**" in s, '- **Shape**: <span style="color: #5faf00">`(1, x)`</span>', 0,
                  "Shape: expected a shape"),
    "unknown bullet": (lambda s: "**Min**" in s, '- **Median**: <span style="color: #5faf00">1.0</span>', 0,
                       "unknown statistic 'Median'"),
    "missing bullet": (lambda s: "**Std**" in s, None, "heading", "lacks the Std bullet"),
    "unknown title": (lambda s: "Target tokens" in s, "#### <span style=\"color: #5fafff\">Targets</span>", 0,
                      "unknown stat block 'Targets'"),
    "bad loss": (lambda s: "Iteration 2 complete" in s,
                 '<span style="color: #5faf00">✓ Iteration 2 complete - Loss: lots</span>', 0,
                 "Loss: expected a number"),
    "wrong iteration": (lambda s: "ITERATION 2/3" in s, '<strong><span style="color: #d70000">ITERATION 5/3</span>',
                        0, "expected iteration 2"),
    "unknown section": (lambda s: "LANGUAGE MODELING HEAD" in s, '## <span style="color: #af87ff">7. MYSTERY</span>',
                        0, "unknown section '7. MYSTERY'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_seed_names_the_line(seed_text, case):
    predicate, new, where, message = MALFORMED[case]
    text, line = replace_line(seed_text, predicate, new)
    if where == "heading":
        line = first_heading_line(text)
    with pytest.raises(MarkdownParseError) as info:
        markdown.parse(text, file="seed.md")
    assert (info.value.file, info.value.line) == ("seed.md", line)
    assert message in str(info.value) and str(info.value).startswith(f"seed.md:{line}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, line, message", [
    ("", 1, "the file is empty"),
    ("  \n\n", 1, "the file is empty"),
    ("\n# Some other report\n", 2, "not a GPT Component Debug Trace"),
    ('{"format": 1}', 1, "not a GPT Component Debug Trace"),
    ("# GPT Component Debug Trace\n\n#### <span style=\"color: #5fafff\">Loss</span>\n", 3,
     "outside of an iteration"),
    ("# GPT Component Debug Trace\n\n- **Mean**: 1.0\n", 3, "outside of a stat block"),
    ("# GPT Component Debug Trace\n**Iterations**: 2\n", 2, "declares 2 iterations"),
    ("# GPT Component Debug Trace\n**Configuration**: depth\n", 2, "expected key=value"),
])
def test_malformed_documents(text, line, message):
    with pytest.raises(MarkdownParseError) as info:
        markdown.parse(text)
    assert info.value.line == line and message in str(info.value)


def test_broken_gradient_table_row_names_the_line():
    md = markdown.render(reference_trace(1), generated="t")
    text, line = replace_line(md, lambda s: s.startswith("| loss |"), "| loss | `()` | torch.float32 | 1.0 |")
    with pytest.raises(MarkdownParseError) as info:
        markdown.parse(text)
    assert info.value.line == line and "expected 8 cells, got 4" in str(info.value)


# ----------------------------------------------------------------------------- property: round trip
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
maybe = st.one_of(st.none(), finite, st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-9, -1e-9]))


@st.composite
def tensor_stats(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    numel = math.prod(shape)
    if numel == 0:
        return TensorStats(shape=shape, dtype="torch.float32", device="cpu", numel=0)
    values = {k: draw(maybe) for k in ("mean", "std", "min", "max")}
    if numel == 1:
        values["std"] = draw(st.sampled_from([0.0, None]))  # the std of one element is 0.0 (or unknown)
    rms = draw(st.one_of(st.none(), st.floats(0, 1e6)))
    zero = draw(st.one_of(st.none(), st.integers(0, numel).map(lambda z: z / numel), st.floats(0, 1)))
    # counts consistent with the values, as real statistics are: a nan value means a NaN element
    nan = max(draw(st.integers(0, 3)), int(any(v is not None and math.isnan(v) for v in values.values())))
    extremes = (values["min"], values["max"])
    inf = max(draw(st.integers(0, 3)), int(any(v is not None and math.isinf(v) for v in extremes)))
    return TensorStats(shape=shape, dtype=draw(st.sampled_from(["torch.float32", "torch.bfloat16"])),
                       device="cpu", numel=numel, rms=rms, zero_frac=zero, nan=nan, inf=inf, **values)


@settings(max_examples=40, deadline=None)
@given(st.lists(tensor_stats(), min_size=1, max_size=4), st.one_of(st.none(), st.booleans()), maybe)
def test_round_trip_preserves_every_printed_statistic(items, stepped, loss):
    forward = {f"stage.{k}": s for k, s in enumerate(items)}
    params = {f"p{k}.weight": s for k, s in enumerate(items)}
    trace = Trace(config={}, environment={"device": "cpu"}, parameters={k: s.shape for k, s in params.items()},
                  iterations=(Iteration(0, loss, stepped, forward=forward, stage_grads=dict(reversed(forward.items())),
                                        param_grads=params),))
    parsed = markdown.parse(markdown.render(trace, generated="t"))
    assert_preserved(trace, parsed)


def test_render_is_deterministic_unless_given_a_time():
    from datetime import datetime

    trace = user_trace()
    assert markdown.render(trace) == markdown.render(trace)
    assert "**Generated**: n/a" in markdown.render(trace)
    assert "**Generated**: 2025-11-01 14:32:09" in markdown.render(trace, generated=datetime(2025, 11, 1, 14, 32, 9))


# ----------------------------------------------------------------------------- the lexer, provenance, reading
def test_the_lexer_yields_frozen_records_with_line_numbers(seed_text):
    import dataclasses

    from pytest_gpttrace.markdown import lex

    records = list(lex.lex(seed_text))
    lines = seed_text.splitlines()
    blocks = [r for r in records if isinstance(r, lex.StatBlock)]
    assert len(blocks) == 117
    assert [r.line for r in records] == sorted(r.line for r in records)
    for r in records:
        assert dataclasses.is_dataclass(r) and r.line >= 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            field = "line"  # the frozen field, set as a caller would
            setattr(r, field, 0)
    first = blocks[0]
    assert lines[first.line - 1].startswith("#### ") and first.title in lines[first.line - 1]
    assert [lines[b.line - 1] for b in first.bullets] == [b.text for b in first.bullets]
    assert [b.text.split("**")[1] for b in first.bullets][:3] == ["Shape", "Dtype", "Device"]
    banners = [r for r in records if isinstance(r, lex.Banner)]
    assert [(b.pos, b.total) for b in banners] == [(1, 3), (2, 3), (3, 3)]
    assert [r.pos for r in records if isinstance(r, lex.Completion)] == [1, 2, 3]


def test_the_lexer_skips_the_scaling_and_anomaly_sections():
    from pytest_gpttrace.markdown import lex

    flat = Anomaly("stuck-loss", ERROR, 0, None, "#### Loss is flat\n\n- **Mean**: not a number", "c", "f")
    md = markdown.render(reference_trace(1), anomalies=[flat], generated="t")
    titles = [r.title for r in lex.lex(md) if isinstance(r, lex.SectionHeading)]
    assert "ANOMALIES" in titles and titles[-1] == "TRAINING COMPLETE"
    assert not any(isinstance(r, lex.StatBlock) and r.title == "Loss is flat" for r in lex.lex(md))


def test_a_parsed_report_says_its_numbers_are_rounded_and_its_stages_a_selection(seed):
    from pytest_gpttrace.trace import Provenance

    assert seed.provenance == Provenance(quantum=markdown.HALF_ULP, complete=False, source="markdown")
    assert markdown.HALF_ULP == 5e-7
    assert loads(dumps(seed)).provenance == Provenance()  # JSON does not carry it
    assert '"provenance"' not in dumps(seed)


def test_a_markdown_file_named_json_is_read_by_its_content(tmp_path, seed_text):
    from pytest_gpttrace.traceio import read_trace

    path = tmp_path / "golden.json"
    path.write_text(seed_text, encoding="utf-8")
    assert dumps(read_trace(path)) == dumps(markdown.parse(seed_text))
    assert read_trace(path).provenance.source == "markdown"
    path.write_text("\n  " + dumps(markdown.parse(seed_text)), encoding="utf-8")  # JSON, whatever the suffix
    assert read_trace(path).provenance.source == "json"


def test_every_reader_raises_one_error_for_a_missing_file(tmp_path):
    from pytest_gpttrace.trace import load
    from pytest_gpttrace.traceio import read_trace

    for read in (read_trace, load, markdown.load):
        with pytest.raises(TraceFormatError, match=r"nope\.md: no such file") as info:
            read(tmp_path / "nope.md")
        assert type(info.value) is TraceFormatError


def test_a_malformed_report_is_a_trace_format_error_naming_the_line(tmp_path, seed_text):
    from pytest_gpttrace.traceio import read_trace

    text, line = replace_line(seed_text, lambda s: "**Mean**" in s, '- **Mean**: <span style="color: #5faf00">abc</span>')
    path = tmp_path / "t.md"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    assert isinstance(info.value, MarkdownParseError) and info.value.path == f"line {line}"
    assert str(info.value).startswith(f"{path}:{line}: Mean: expected a number")


def golden_for(tmp_path):
    from pytest_gpttrace.golden import GoldenTrace

    return GoldenTrace("tests/test_x.py::test_y", tmp_path / "golden", tmp_path / "results", tmp_path)


def test_the_golden_check_reads_a_markdown_golden(tmp_path):
    trace = reference_trace(2)
    golden = golden_for(tmp_path)
    path = golden.path_for(trace)
    path.parent.mkdir(parents=True)
    path.write_text(markdown.render(trace, all_iterations=True, generated="t"), encoding="utf-8")
    assert golden == trace and golden.error is None
    it = trace.iterations[0]
    loss = it.forward["loss"]
    assert loss.mean is not None
    bumped = replace(it, forward={**it.forward, "loss": replace_stats(loss, mean=loss.mean + 1)})
    other = golden_for(tmp_path)
    assert not (other == replace(trace, iterations=(bumped, *trace.iterations[1:])))  # noqa: SIM201  the == a test writes
    assert any("loss" in line for line in other.failure)


def test_a_malformed_markdown_golden_names_its_line(tmp_path, seed_text):
    trace = reference_trace(1)
    golden = golden_for(tmp_path)
    path = golden.path_for(trace)
    path.parent.mkdir(parents=True)
    md = markdown.render(trace, generated="t")
    text, line = replace_line(md, lambda s: "**Std**" in s, "- **Std**: ")
    path.write_text(text, encoding="utf-8")
    assert not (golden == trace)  # noqa: SIM201  the == a test writes
    assert golden.failure[0].endswith(f"at line {line}: Std: missing value")
