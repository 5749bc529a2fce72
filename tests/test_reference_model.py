import dataclasses
import inspect
import math
import re
import subprocess
import sys

import pytest
import torch

import reference_model.gpt as gpt
from pytest_gpttrace import scaling
from reference_model import GPT, GPTConfig, Tap, optimizers, synthetic_batches

SEED_CONFIG = GPTConfig.from_depth(4)


def record_taps(model):
    """Forward-hook every tap; returns the dict that fills with stage outputs."""
    seen: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, Tap):
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.detach()))
    return seen


def rms(t):
    return t.double().pow(2).mean().sqrt().item()


# ---------------------------------------------------------------- config
def test_from_depth_gives_the_seed_config():
    c = GPTConfig.from_depth(4)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (4, 256, 2, 2, 128)
    assert (c.vocab_size, c.sequence_len, c.softcap, c.rope_base) == (65536, 1024, 15.0, 10000)
    assert GPTConfig.from_depth(12).n_head == 6
    assert GPTConfig.from_depth(3).n_head == 2  # ceil(192 / 128)
    assert GPTConfig.from_depth(4) == GPTConfig()  # from_depth's softcap and rope_base are the field defaults


def test_config_is_frozen():
    for field in dataclasses.fields(GPTConfig):
        with pytest.raises(dataclasses.FrozenInstanceError, match=rf"^cannot assign to field '{field.name}'$"):
            setattr(SEED_CONFIG, field.name, 5)
    assert GPTConfig.from_depth(4) == SEED_CONFIG


def test_every_config_field_has_a_comment():
    source = inspect.getsource(GPTConfig)
    for field in dataclasses.fields(GPTConfig):
        assert re.search(rf"^    {field.name}: \w+ = [^#\n]+  # \S", source, re.M), field.name


def test_from_depth_follows_the_one_width_rule(monkeypatch):
    for depth in (1, 2, 3, 4, 8, 12, 20):
        c = GPTConfig.from_depth(depth, vocab_size=1000, sequence_len=64)
        shape = scaling.GPTShape.from_depth(depth, 1000, 64)
        assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == (shape.n_layer, shape.n_embd, shape.n_head, shape.n_kv_head)
    monkeypatch.setattr(scaling, "WIDTH_PER_LAYER", 32)  # the rule lives in scaling alone
    c = GPTConfig.from_depth(4)
    assert (c.n_embd, c.n_head) == (128, 1)


@pytest.mark.parametrize("depth", [0, -1, 2.0, True])
def test_from_depth_rejects_a_bad_depth(depth):
    with pytest.raises(ValueError, match=rf"^depth must be a positive integer, got {re.escape(repr(depth))}$"):
        GPTConfig.from_depth(depth)


def test_from_depth_passes_softcap_and_rope_base():
    c = GPTConfig.from_depth(2, softcap=30.0, rope_base=500.0)
    assert (c.n_embd, c.softcap, c.rope_base) == (128, 30.0, 500.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_embd": 100, "n_head": 3, "n_kv_head": 3}, "n_embd"),
        ({"n_embd": 128, "n_head": 4, "n_kv_head": 3}, "n_head"),
        ({"n_embd": 12, "n_head": 4, "n_kv_head": 4}, "head_dim"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -1}, "vocab_size"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_gqa_config_runs():
    c = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=32)
    model = GPT(c)
    idx, targets = next(synthetic_batches(c))
    seen = record_taps(model)
    loss = model(idx, targets)
    assert seen["blocks.0.attn.k"].shape == (1, 16, 2, 8)
    assert seen["blocks.0.attn.sdpa"].shape == (1, 4, 16, 8)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- init
def test_init_is_seeded_and_independent_of_global_rng():
    c = GPTConfig(sequence_len=8, vocab_size=32, n_layer=2, n_head=1, n_kv_head=1, n_embd=16)
    torch.manual_seed(0)
    a = GPT(c, seed=7).state_dict()
    torch.manual_seed(123)
    torch.randn(1000)
    b = GPT(c, seed=7).state_dict()
    other = GPT(c, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], other["wte.weight"])


INIT_CONFIG = GPTConfig(sequence_len=8, vocab_size=512, n_layer=2, n_head=4, n_kv_head=1, n_embd=64)


def init_table():
    """{parameter: what it starts as} from the table in GPT.init_weights' docstring."""
    rows = re.findall(r"^\s+((?:wte|blocks|lm_head)\S*)\s+\([^)]*\)\s+(.+?)\s*$", GPT.init_weights.__doc__ or "", re.M)
    return dict(rows)


def test_the_init_table_lists_every_parameter_as_it_starts():
    model = GPT(INIT_CONFIG, seed=3)
    table = init_table()
    names = {re.sub(r"^blocks\.\d+\.", "blocks.i.", n) for n, _ in model.named_parameters()}
    assert set(table) == names
    C, D, Hkv = 64, 16, 1
    expected_std = {"normal, std 1": 1.0, "normal, std 1/√C": C**-0.5,
                    "normal, std 1/√C · min(1, √(Hkv·D/C))": C**-0.5 * min(1.0, math.sqrt(Hkv * D / C))}
    for name, p in model.named_parameters():
        start = table[re.sub(r"^blocks\.\d+\.", "blocks.i.", name)]
        if start == "zeros":
            assert not p.any(), name
        else:
            assert p.mean().abs().item() < 0.1 * expected_std[start], name
            assert p.std().item() == pytest.approx(expected_std[start], rel=0.1), name


def test_every_tap_is_an_attribute_written_out_with_its_shape():
    source = inspect.getsource(gpt)
    model = GPT(INIT_CONFIG)
    taps = [n for n, m in model.named_modules() if isinstance(m, Tap)]
    for name in {n.rsplit(".", 1)[-1] for n in taps}:
        assert re.search(rf"^\s+self\.{name} = Tap\(\)  # \(", source, re.M), name


def test_taps_hang_on_the_model_own_modules_only():
    """No tap hangs on a torch container or layer (inputs.* hung on an nn.ModuleDict and lm_head.* on
    the nn.Linear before)."""
    model = GPT(INIT_CONFIG)
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, Tap):
            parent = modules[name.rpartition(".")[0]]
            assert type(parent).__module__ == gpt.__name__, (name, type(parent))


def test_zero_init_weights_and_no_biases():
    c = GPTConfig(sequence_len=8, vocab_size=32, n_layer=2, n_head=1, n_kv_head=1, n_embd=16)
    model = GPT(c)
    zero = {n for n, p in model.named_parameters() if not p.any()}
    assert zero == {"lm_head.weight"} | {f"blocks.{i}.{m}.c_proj.weight" for i in range(2) for m in ("attn", "mlp")}
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert model.wte.weight.data_ptr() != model.lm_head.weight.data_ptr()


def test_stage_names_are_the_documented_taps():
    c = GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=16)
    model = GPT(c)
    seen = record_taps(model)
    model(*next(synthetic_batches(c)))
    block = ["input", "attn.norm", "attn.q", "attn.k", "attn.v", "attn.q_rope", "attn.k_rope",
             "attn.q_norm", "attn.k_norm", "attn.sdpa", "attn.heads", "attn.out", "attn_resid",
             "mlp.norm", "mlp.fc", "mlp.relu", "mlp.relu2", "mlp.out", "mlp_resid"]
    expected = (["inputs.idx", "inputs.targets", "embed.wte", "embed.norm", "rope.cos", "rope.sin"]
                + [f"blocks.0.{s}" for s in block]
                + ["final_norm", "lm_head.logits", "lm_head.softcap", "loss"])
    assert list(seen) == expected


def test_a_tap_hook_that_returns_a_tensor_replaces_the_stage():
    c = GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=16)
    model = GPT(c)
    idx, _ = next(synthetic_batches(c))
    model.lm_head.softcap.register_forward_hook(lambda m, i, o: torch.full_like(o, 3.0))
    logits = model(idx)
    assert torch.equal(logits, torch.full_like(logits, 3.0))


# ---------------------------------------------------------------- the seed config, step 0
@pytest.fixture(scope="module")
def seed_step0():
    model = GPT(SEED_CONFIG, seed=42)
    seen = record_taps(model)
    idx, targets = next(synthetic_batches(SEED_CONFIG, seed=42))
    loss = model(idx, targets)
    loss.backward()
    return model, seen, loss


def test_seed_config_step0_matches_the_seed_trace(seed_step0):
    _, seen, loss = seed_step0
    assert abs(seen["embed.wte"].std().item() - 1) < 0.01
    for i in range(4):
        for s in ("q", "k", "v"):
            assert abs(seen[f"blocks.{i}.attn.{s}"].std().item() - 1) < 0.05
        assert 0.45 <= (seen[f"blocks.{i}.mlp.relu2"] == 0).float().mean().item() <= 0.55
        assert 0.15 <= seen[f"blocks.{i}.attn.sdpa"].std().item() <= 0.21
    norms = [n for n in seen if n in ("embed.norm", "final_norm") or n.endswith((".norm", "_norm"))]
    assert len(norms) == 2 + 4 * 4
    for n in norms:
        assert abs(rms(seen[n]) - 1) < 1e-3, n
    zeros = [f"blocks.{i}.{m}.out" for i in range(4) for m in ("attn", "mlp")] + ["lm_head.logits", "lm_head.softcap"]
    for n in zeros:
        assert not seen[n].any(), n
    assert f"{loss.item():.6f}" == "11.090358"
    assert abs(loss.item() - math.log(65536)) < 1e-5


def test_seed_config_first_backward(seed_step0):
    model, _, _ = seed_step0
    assert not model.wte.weight.grad.any()
    assert model.lm_head.weight.grad.any()


# ---------------------------------------------------------------- training
def test_three_optimizer_steps_reduce_the_loss_and_wake_every_c_proj():
    c = GPTConfig.from_depth(2, vocab_size=1024, sequence_len=128)
    model = GPT(c, seed=42)
    opts = optimizers(model)
    seen = record_taps(model)
    batches = synthetic_batches(c, seed=42)
    losses = []
    for _ in range(3):
        loss = model(*next(batches))
        loss.backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > losses[1] > losses[2]
    for i in range(2):
        assert seen[f"blocks.{i}.attn.out"].any() and seen[f"blocks.{i}.mlp.out"].any()


def test_optimizers_cover_every_parameter_once():
    c = GPTConfig(sequence_len=8, vocab_size=32, n_layer=2, n_head=1, n_kv_head=1, n_embd=16)
    model = GPT(c)
    adamw, muon = optimizers(model)
    assert isinstance(muon, torch.optim.Muon)
    covered = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(covered) == len(set(map(id, covered))) == len(list(model.parameters()))
    scale = (16 / 768) ** -0.5
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.2 * scale, 0.004 * scale])


def test_synthetic_batches_are_deterministic_next_token_pairs():
    c = GPTConfig(sequence_len=64, vocab_size=1000, n_layer=1, n_head=1, n_kv_head=1, n_embd=16)
    idx, targets = next(synthetic_batches(c, seed=3, batch_size=2))
    assert idx.dtype == torch.int32 and targets.dtype == torch.int64
    assert idx.shape == targets.shape == (2, 64)
    assert torch.equal(idx.flatten()[1:].long(), targets.flatten()[:-1])
    again = next(synthetic_batches(c, seed=3, batch_size=2))
    assert torch.equal(idx, again[0])
    repeated = synthetic_batches(c, seed=3)
    assert torch.equal(next(repeated)[0], next(repeated)[0])
    fresh = synthetic_batches(c, seed=3, fresh=True)
    assert not torch.equal(next(fresh)[0], next(fresh)[0])
    # Zipf-like: low ids dominate
    big = next(synthetic_batches(GPTConfig(sequence_len=4096, vocab_size=1000, n_layer=1, n_head=1, n_kv_head=1, n_embd=16)))[0]
    assert (big < 100).float().mean() > 0.5


def test_command_line_trains_and_prints_the_loss_per_step():
    out = subprocess.run(
        [sys.executable, "-m", "reference_model", "--depth", "1", "--steps", "3",
         "--sequence-len", "32", "--vocab-size", "256"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    steps = [line for line in out.splitlines() if line.startswith("step")]
    assert len(steps) == 3
    losses = [float(line.split("loss")[1]) for line in steps]
    assert losses[0] == pytest.approx(math.log(256), abs=1e-5)
    assert losses[2] < losses[0]


def test_command_line_rejects_a_bad_depth():
    proc = subprocess.run([sys.executable, "-m", "reference_model", "--depth", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "depth" in proc.stderr
