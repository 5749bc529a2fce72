"""Models as users write them: Hugging Face causal LMs, nanoGPT-style code, keyword-only forwards,
returned directly from ``gpt_model`` with the default loss, batches and recorded config."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_gpttrace import trace_training
from pytest_gpttrace.cli import main as gpttrace
from pytest_gpttrace.compare import check_same_config, compare, get_profile
from pytest_gpttrace.errors import CaptureError
from pytest_gpttrace.markers import parse_marker
from pytest_gpttrace.report import render_comparison
from pytest_gpttrace.settings import Settings
from pytest_gpttrace.traceio import read_trace, write_trace
from pytest_gpttrace.usermodel import (
    MAX_SEQUENCE_LEN,
    batch_geometry,
    call_plan,
    default_batches,
    default_loss,
    model_config,
    next_token_loss,
)
from reference_model import GPT, GPTConfig, synthetic_batches
from tests.projects import NO_CALIBRATION, run

V, T = 128, 32  # the tiny configs' vocabulary and context


# ------------------------------------------------------------------------------ the models
def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    # bos/eos inside the tiny vocabulary (transformers logs a complaint otherwise)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=T,
                                      bos_token_id=0, eos_token_id=0))


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=V,
                                        max_position_embeddings=T, bos_token_id=0, eos_token_id=0))


@dataclasses.dataclass
class NanoConfig:
    block_size: int = T
    vocab_size: int = V
    n_layer: int = 2
    n_embd: int = 32
    bias: bool = True


class NanoBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        q, k, v = self.c_attn(self.ln_1(x)).split(x.size(-1), dim=-1)
        x = x + self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """karpathy's nanoGPT shape: a dataclass config, forward(idx, targets=None) -> (logits, loss)."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or NanoConfig()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList([NanoBlock(config.n_embd) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits[:, [-1], :], None  # nanoGPT's inference path: the last position only
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


class KeywordLM(nn.Module):
    """A keyword-only forward in the Hugging Face convention: labels aligned with the inputs, shifted
    inside; returns a dict with the loss (when labels are given) and the logits."""

    vocab_size, max_seq_len = V, T  # attributes on the model, no config

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 32)
        self.head = nn.Linear(32, V)

    def forward(self, *, input_ids, labels=None, attention_mask=None):
        logits = self.head(torch.tanh(self.emb(input_ids)))
        out = {"logits": logits}
        if labels is not None:  # the HF shift: position t predicts labels[t + 1]
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
        return out


class KeywordTargets(nn.Module):
    """forward(*, idx, targets) -> the loss."""

    def __init__(self):
        super().__init__()
        self.config = {"vocab_size": V, "block_size": T}  # a dict config
        self.emb = nn.Embedding(V, 16)
        self.head = nn.Linear(16, V)

    def forward(self, *, targets, idx):
        return F.cross_entropy(self.head(self.emb(idx)).view(-1, V), targets.view(-1))


class LogitsOnly(nn.Module):
    """forward(tokens) -> logits."""

    def __init__(self):
        super().__init__()
        self.vocab_size, self.context_length = V, T
        self.emb = nn.Embedding(V, 16)
        self.head = nn.Linear(16, V)

    def forward(self, tokens):
        return self.head(self.emb(tokens))


def a_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, V, (T + 1,), generator=g)
    return stream[:-1].view(1, T), stream[1:].view(1, T)


@pytest.fixture(scope="session")
def transformers_loaded():
    """transformers imported once, before any pytester run snapshots the loaded modules (an
    in-process run unloads what it imported, and transformers registers torch ops on import)."""
    pytest.importorskip("transformers")
    hf_gpt2(), hf_llama()


# ------------------------------------------------------------------------------ stages inside HF models
def trace_hf(make, iterations=2):
    torch.manual_seed(0)
    model = make()
    batches = default_batches(model, seed=0)
    return trace_training(model, batches, [torch.optim.AdamW(model.parameters(), lr=1e-3)], iterations=iterations)


def test_hugging_face_llama_has_rotary_attention_and_residual_stages_per_layer(transformers_loaded):
    forward = trace_hf(hf_llama, iterations=1).iterations[0].forward
    for i in range(2):
        attn = f"model.layers.{i}.self_attn"
        # q*cos + rotate_half(q)*sin, the same for k: the rotated tensors, not rotate_half's copy
        assert forward[f"{attn}/rotary#1"].shape == forward[f"{attn}/rotary#2"].shape == (1, 2, T, 16)  # one sequence per batch
        assert f"{attn}/rotary#3" not in forward
        assert f"{attn}/scaled_dot_product_attention#1" in forward
        assert [f"model.layers.{i}/add#1", f"model.layers.{i}/add#2"] == \
            [n for n in forward if n.startswith(f"model.layers.{i}/add")]
    assert not any(n.startswith("model.rotary_emb/") for n in forward)  # cat((freqs, freqs)) is a table


def test_a_rope_bug_in_hugging_face_llama_is_named_at_its_rotary_stage(transformers_loaded, monkeypatch):
    from transformers.models.llama import modeling_llama

    healthy = trace_hf(hf_llama)

    def rotated_backwards(q, k, cos, sin, unsqueeze_dim=1):  # `-` for `+`: a rotation by -angle
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        rotate_half = modeling_llama.rotate_half
        return q * cos - rotate_half(q) * sin, k * cos - rotate_half(k) * sin

    # rotate_half's own output is unchanged by this bug: only the sum after it shows it
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", rotated_backwards)
    result = compare(healthy, trace_hf(hf_llama))
    assert result.first is not None
    assert (result.first.iteration, str(result.first.section), result.first.stage) == \
        (0, "forward", "model.layers.0.self_attn/rotary#1")


def test_hugging_face_gpt2_has_attention_and_residual_stages_per_layer(transformers_loaded):
    forward = trace_hf(hf_gpt2, iterations=1).iterations[0].forward
    for i in range(2):
        assert f"transformer.h.{i}.attn/scaled_dot_product_attention#1" in forward
        assert f"transformer.h.{i}/add#1" in forward and f"transformer.h.{i}/add#2" in forward


# ------------------------------------------------------------------------------ the default loss
def test_a_hugging_face_model_gets_the_next_token_loss_shifted_once(transformers_loaded):
    torch.manual_seed(0)
    model = hf_gpt2().eval()
    idx, targets = a_batch()
    loss = default_loss(model, (idx, targets))
    logits = model(input_ids=idx).logits
    assert torch.equal(loss, F.cross_entropy(logits.view(-1, V), targets.view(-1)))
    # passing the shifted targets as labels would shift twice: a different (wrong) loss
    assert not math.isclose(loss.item(), model(input_ids=idx, labels=targets).loss.item(), rel_tol=1e-4)


def test_a_keyword_only_forward_with_labels_is_not_shifted_twice():
    torch.manual_seed(0)
    model = KeywordLM()
    idx, targets = a_batch()
    plan = call_plan(model)
    assert plan.input_kw == "input_ids" and plan.hf_labels and not plan.targets
    loss = default_loss(model, (idx, targets))
    logits = model(input_ids=idx)["logits"]
    assert torch.equal(loss, next_token_loss(logits, targets))
    # the model's own loss with the inputs as labels scores T - 1 positions, the same predictions
    own = model(input_ids=idx, labels=idx)["loss"]
    assert own.item() == pytest.approx(F.cross_entropy(logits[0, :-1], targets[0, :-1]).item())


def test_a_keyword_only_forward_with_targets_gets_them_by_name():
    torch.manual_seed(0)
    model = KeywordTargets()
    idx, targets = a_batch()
    plan = call_plan(model)
    assert (plan.input_kw, plan.targets_kw) == ("idx", "targets")
    assert torch.equal(default_loss(model, (idx, targets)), model(idx=idx, targets=targets))


def test_nanogpt_and_a_logits_model():
    torch.manual_seed(0)
    idx, targets = a_batch()
    nano = NanoGPT()
    assert call_plan(nano).input_kw is None and call_plan(nano).targets_kw is None  # model(idx, targets)
    assert torch.equal(default_loss(nano, (idx, targets)), nano(idx, targets)[1])
    logits_model = LogitsOnly()
    assert torch.equal(default_loss(logits_model, (idx, targets)), next_token_loss(logits_model(idx), targets))


def test_the_reference_model_is_called_as_before():
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16), seed=1)
    batch = next(synthetic_batches(model.config, seed=1))
    assert torch.equal(default_loss(model, batch), model(*batch))


class NeedsMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, idx, mask, targets):
        return idx


class NoInputs(nn.Module):
    def forward(self, *, image):
        return image


class Words(nn.Module):
    def forward(self, idx, targets):
        return "a loss"


@pytest.mark.parametrize("model, message", [
    (NeedsMask(), "cannot call NeedsMask.forward(idx, mask, targets) with a batch (idx, targets) "
                  "(missing a required argument: 'mask'): override the gpt_loss_fn fixture "
                  "(loss_fn= for trace_training)"),
    (NoInputs(), "NoInputs.forward(*, image) takes no input ids (a parameter named idx, input_ids, tokens, input, "
                 "inputs, x, or a positional one): override the gpt_loss_fn fixture (loss_fn= for trace_training)"),
    (Words(), "Words returned a str: neither a loss nor logits of shape (1, 32, 'V') for targets of shape (1, 32): "
              "override the gpt_loss_fn fixture (loss_fn= for trace_training)"),
], ids=["unmatched-signature", "no-inputs", "no-loss"])
def test_a_model_the_default_loss_cannot_call_is_one_line_naming_gpt_loss_fn(model, message):
    with pytest.raises(CaptureError) as info:
        default_loss(model, a_batch())
    assert str(info.value) == message


# ------------------------------------------------------------------------------ batches and config
def test_the_batches_follow_the_model(transformers_loaded):
    assert batch_geometry(hf_gpt2()) == (V, T)           # n_positions
    assert batch_geometry(hf_llama()) == (V, T)          # max_position_embeddings
    assert batch_geometry(NanoGPT(NanoConfig(block_size=24, vocab_size=96))) == (96, 24)  # block_size
    assert batch_geometry(KeywordLM()) == (V, T)         # class attributes
    assert batch_geometry(KeywordTargets()) == (V, T)    # a dict config
    assert batch_geometry(NanoGPT(NanoConfig(block_size=4096))) == (V, MAX_SEQUENCE_LEN)
    idx, targets = next(default_batches(NanoGPT(NanoConfig(block_size=24, vocab_size=96)), seed=3))
    assert idx.shape == targets.shape == (1, 24) and idx.dtype == torch.int64 and int(idx.max()) < 96
    assert torch.equal(idx[0, 1:], targets[0, :-1])  # targets are the next tokens


def test_the_reference_models_batches_are_unchanged():
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)
    got, want = next(default_batches(GPT(config, seed=5), seed=5)), next(synthetic_batches(config, seed=5))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want, strict=True))


class Anonymous(nn.Module):
    def __init__(self, **attrs):
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        for k, v in attrs.items():
            setattr(self, k, v)


@pytest.mark.parametrize("attrs, message", [
    ({}, "gpt_batches: cannot tell the vocabulary size of Anonymous: no vocab_size or n_vocab on Anonymous "
         "(it has no config): override the gpt_batches fixture"),
    ({"vocab_size": 8}, "gpt_batches: cannot tell the context length of Anonymous: no sequence_len, block_size, "
                        "n_positions, max_position_embeddings, n_ctx, max_seq_len, context_length, seq_len on "
                        "Anonymous (it has no config): override the gpt_batches fixture"),
])
def test_batches_of_a_model_without_sizes_are_one_line_naming_gpt_batches(attrs, message):
    with pytest.raises(CaptureError) as info:
        batch_geometry(Anonymous(**attrs))
    assert str(info.value) == message


def test_hugging_face_and_dataclass_configs_are_recorded_json_safe(transformers_loaded, tmp_path):
    config = model_config(hf_gpt2())
    assert config["n_positions"] == T and config["vocab_size"] == V and config["model_type"] == "gpt2"
    assert list(config) == sorted(config) and "transformers_version" not in config
    assert config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}  # JSON keys are strings
    assert json.loads(json.dumps(config)) == config
    assert model_config(hf_llama())["max_position_embeddings"] == T
    assert model_config(NanoGPT()) == {"block_size": T, "vocab_size": V, "n_layer": 2, "n_embd": 32, "bias": True}
    assert list(model_config(NanoGPT())) == ["block_size", "vocab_size", "n_layer", "n_embd", "bias"]  # field order
    assert model_config(KeywordLM()) == {}
    # a trace round-trips its config: a golden of the same HF model is of the same config
    torch.manual_seed(0)
    model = hf_gpt2()
    trace = trace_training(model, default_batches(model, seed=0), None, iterations=1)
    path = tmp_path / "t.json"
    write_trace(path, trace, "json")
    assert check_same_config(read_trace(path), trace) == []


def test_a_frozen_parameter_reads_as_frozen_in_a_failure():
    torch.manual_seed(0)
    model = NanoGPT()
    golden = trace_training(model, default_batches(model, seed=0), None, iterations=1)
    torch.manual_seed(0)
    model = NanoGPT()
    model.wpe.weight.requires_grad_(False)
    obtained = trace_training(model, default_batches(model, seed=0), None, iterations=1)
    result = compare(golden, obtained, get_profile("exact"))
    frozen = [m for m in result.mismatches if m.stage == "wpe.weight"]
    assert [(m.stat, m.golden, m.obtained) for m in frozen] == [("presence", "present", "frozen")]
    assert any("wpe.weight" in line and "frozen" in line for line in render_comparison(result, golden_name="g"))
    back = compare(obtained, golden, get_profile("exact"))  # trained now, frozen in the golden
    assert [(m.golden, m.obtained) for m in back.mismatches if m.stage == "wpe.weight"] == [("frozen", "present")]


# ------------------------------------------------------------------------------ the marker's loss=
def test_the_marker_takes_a_loss_function(tmp_path):
    settings = Settings(enabled=True, update=False, recalibrate=False, golden_dir=tmp_path, results_dir=tmp_path,
                        report_dir=None, rootdir=tmp_path, profile="auto", tolerances=(), iterations=3,
                        calibration=False, dithers=2, replay=None, allow=(), thresholds={})

    def loss(model, batch):
        return model(*batch)

    assert parse_marker((), {"loss": loss}, settings).loss is loss
    assert parse_marker((), {}, settings).loss is None
    with pytest.raises(ValueError, match=r"^@pytest.mark.gpt_trace\(loss=3\): expected a function \(model, batch\)"):
        parse_marker((), {"loss": 3}, settings)


# ------------------------------------------------------------------------------ end to end
MODELS_CONFTEST = """
import pytest
from tests import test_user_models as models

@pytest.fixture(params=["gpt2", "llama", "nanogpt", "keyword"])
def gpt_model(request):
    return {"gpt2": models.hf_gpt2, "llama": models.hf_llama, "nanogpt": models.NanoGPT,
            "keyword": models.KeywordLM}[request.param]()
"""

MODELS_TEST = """
def test_model(gpt_trace, gpt_golden):
    assert gpt_trace.iterations[0].loss > 0 and gpt_trace.stage_names
    assert gpt_trace == gpt_golden
"""


def test_user_models_returned_directly_trace_match_their_goldens_and_check_clean(
        transformers_loaded, pytester, monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("GPTTRACE_STATS_PATH", raising=False)
    pytester.makeini(NO_CALIBRATION)
    pytester.makeconftest(MODELS_CONFTEST)
    pytester.makepyfile(test_models=MODELS_TEST)
    run(pytester, "--update-golden").assert_outcomes(passed=4)
    result = run(pytester, "--gpt-trace", "--gpt-trace-report", "reports")
    result.assert_outcomes(passed=4)
    goldens = sorted((pytester.path / "golden").rglob("*.json"))
    assert len(goldens) == 4
    for golden in goldens:
        doc = json.loads(golden.read_text())
        assert doc["config"] or doc["model"] == "KeywordLM"  # HF and dataclass configs are recorded
    reports = sorted((pytester.path / "reports").rglob("*.json"))
    assert len(reports) == 4
    capsys.readouterr()
    for report in reports:
        assert gpttrace(["check", str(report)]) == 0
        assert ": 0 errors, 0 warnings" in capsys.readouterr().out, report


def user_project(pytester, monkeypatch, fixtures):
    """A project without calibration whose conftest imports pytest and this module as ``models``,
    then defines ``fixtures``."""
    monkeypatch.delenv("CI", raising=False)
    pytester.makeini(NO_CALIBRATION)
    pytester.makeconftest("import pytest\nfrom tests import test_user_models as models\n" + fixtures)


def test_the_gpt_loss_fn_fixture_and_the_marker_set_the_loss(pytester, monkeypatch):
    user_project(pytester, monkeypatch, """

@pytest.fixture
def gpt_model():
    return models.KeywordLM()

@pytest.fixture
def gpt_loss_fn():
    return lambda model, batch: 2 * model(input_ids=batch[0], labels=batch[0])["loss"]
""")
    pytester.makepyfile(test_loss="""
import pytest
from pytest_gpttrace.usermodel import default_loss

def test_fixture(gpt_trace):
    assert gpt_trace.iterations[0].loss > 2 * 4.0  # twice the HF loss of a random model, about 2 ln 128

@pytest.mark.gpt_trace(iterations=1, loss=default_loss)
def test_marker(gpt_trace):
    assert gpt_trace.iterations[0].loss < 6.0
""")
    run(pytester, "--gpt-trace").assert_outcomes(passed=2)


def test_a_model_the_tool_cannot_call_fails_that_test_in_one_line(pytester, monkeypatch):
    user_project(pytester, monkeypatch, """

@pytest.fixture
def gpt_model():
    return models.NeedsMask()

@pytest.fixture
def gpt_batches():
    return iter([models.a_batch()])
""")
    pytester.makepyfile(test_bad="""
def test_mask(gpt_trace):
    pass
""")
    result = run(pytester, "--gpt-trace")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_bad.py::test_mask: cannot call NeedsMask.forward(idx, mask, targets) with a "
                                 "batch (idx, targets) *: override the gpt_loss_fn fixture*"])
    assert "Traceback" not in result.stdout.str()


def test_a_model_without_sizes_fails_in_gpt_batches_in_one_line(pytester, monkeypatch):
    user_project(pytester, monkeypatch, """

@pytest.fixture
def gpt_model():
    return models.Anonymous(vocab_size=8)
""")
    pytester.makepyfile(test_bad="""
def test_sizes(gpt_trace):
    pass
""")
    result = run(pytester, "--gpt-trace")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*gpt_batches: cannot tell the context length of Anonymous*: override the "
                                 "gpt_batches fixture*"])
    assert "Traceback" not in result.stdout.str()
