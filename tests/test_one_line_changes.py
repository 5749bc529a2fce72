"""A table of one-line changes of the reference model's math, init and optimizer: each one fails
against the shipped tiny golden, and the first divergence named is the (iteration, section, stage)
where the change acts, by a wide margin over the allowance.

Where a change can act follows from the zero init of lm_head and every c_proj:
- iteration 0: every stage up to the block outputs is computed and nonzero, but each attention and
  MLP output and the logits are exactly zero, and so is every gradient behind lm_head (its weight
  is zero), so only lm_head gets a nonzero gradient;
- step 0 therefore moves lm_head alone (a zero gradient moves neither AdamW nor Muon), unless a
  weight decay acts: iteration 1 has nonzero logits and still-zero block outputs;
- at iteration 1 the gradient reaches the residual stream, wte and the c_proj weights (but not past
  a zero c_proj into the attention or MLP internals), so step 1 moves wte and c_proj: from
  iteration 2 everything is nonzero.
Each case traces only the iterations up to the one where it acts (the golden records 3; the
missing ones are reported after the first divergence).
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import reference_model
import reference_model.gpt as gpt
import tests.models
from pytest_gpttrace.compare import compare
from pytest_gpttrace.trace import load
from tests.models import TINY_GOLDEN_CONFIG, trace_reference
from tests.paths import TINY_GOLDEN

MARGIN = 10  # the first difference is at least this many times its allowance


def after_init(monkeypatch, change):
    """Apply change(model) at the end of GPT.init_weights (the same seeded draws, then the change)."""
    original = gpt.GPT.init_weights

    @torch.no_grad()
    def init_weights(self, seed=42):
        original(self, seed)
        change(self)

    monkeypatch.setattr(gpt.GPT, "init_weights", init_weights)


def after_optimizers(monkeypatch, change):
    """Apply change(adamw, muon) to the optimizers trace_reference builds (via its module's name)."""
    original = reference_model.optimizers

    def optimizers(model):
        opts = original(model)
        change(*opts)
        return opts

    monkeypatch.setattr(tests.models, "optimizers", optimizers)


def mlp_forward(act=F.relu, square=True):
    def forward(self, x):
        x = self.norm(gpt.norm(x))
        x = self.fc(self.c_fc(x))
        x = self.relu(act(x))
        x = self.relu2(x.square() if square else x)
        return self.out(self.c_proj(x))

    return forward


def block_forward(resid=1, branch=1):
    def forward(self, x, cos, sin):
        x = self.input(x)
        x = self.attn_resid(resid * x + branch * self.attn(x, cos, sin))
        x = self.mlp_resid(x + self.mlp(x))
        return x

    return forward


# --- iteration 0: the math and the init act in the first forward, at the first tap after them ---


def norm_eps(mp):
    # norm's first use is the embedding norm
    mp.setattr(gpt, "norm", lambda x: F.rms_norm(x, (x.size(-1),), eps=1e-2))  # was: eps=None


def rope_base_500(mp):
    # the tables are built at construction and pass rope.cos first (cos is 1 only at position 0)
    return dataclasses.replace(TINY_GOLDEN_CONFIG, rope_base=500.0)  # was: 10000


def rope_cos_sin_swapped(mp):
    original = gpt.rotary_tables
    mp.setattr(gpt, "rotary_tables", lambda *a, **k: original(*a, **k)[::-1])  # was: cos, sin


def attention_scale_dropped(mp):
    # the scores are no longer divided by sqrt(head_dim); gpt calls F.scaled_dot_product_attention (torch's)
    original = F.scaled_dot_product_attention
    mp.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: original(q, k, v, scale=1.0, **kw))


def causal_mask_removed(mp):
    original = F.scaled_dot_product_attention
    mp.setattr(F, "scaled_dot_product_attention",
               lambda q, k, v, is_causal, **kw: original(q, k, v, is_causal=False, **kw))  # was: True


def qk_norm_removed(mp):
    # queries and keys are the only 4-D tensors norm sees; q_norm comes before k_norm
    original = gpt.norm
    mp.setattr(gpt, "norm", lambda x: x if x.ndim == 4 else original(x))


def relu2_to_relu(mp):
    mp.setattr(gpt.MLP, "forward", mlp_forward(square=False))  # was: x.square()


def relu_to_gelu(mp):
    mp.setattr(gpt.MLP, "forward", mlp_forward(act=F.gelu))  # was: F.relu (then squared)


def residual_doubled(mp):
    # the residual stream itself is nonzero from the start (unlike the branch, see below)
    mp.setattr(gpt.Block, "forward", block_forward(resid=2))  # was: x + attn(x)


def c_fc_init_doubled(mp):
    after_init(mp, lambda m: [b.mlp.c_fc.weight.mul_(2) for b in m.blocks])  # std x2


def c_q_init_doubled(mp):
    # q is the first tap after c_q (q_norm would undo the scale, but q shows it first)
    after_init(mp, lambda m: [b.attn.c_q.weight.mul_(2) for b in m.blocks])  # std x2


def wte_init_halved(mp):
    after_init(mp, lambda m: m.wte.weight.mul_(0.5))  # std 0.5, was 1


def lm_head_not_zero(mp):
    # the logits are no longer exactly zero: the zero-init pattern is compared exactly
    def draw(m):
        gpt._normal_(m.lm_head.weight, 1 / math.sqrt(m.config.n_embd), torch.Generator().manual_seed(0))

    after_init(mp, draw)  # was: self.lm_head.weight.zero_()


# --- iteration 1: acts on nonzero logits, or through step 0 ---


def softcap_removed(mp):
    # iteration 0's logits are zero, where tanh is the identity; iteration 1's are small (rms ~0.15),
    # so the margin is the smallest in the table
    mp.setattr(gpt, "softcap", lambda logits, cap: logits.float())  # was: cap * tanh(logits / cap)


def softcap_halved(mp):
    original = gpt.softcap
    mp.setattr(gpt, "softcap", lambda logits, cap: original(logits, cap / 2))  # was: cap (15)


def lm_head_lr_doubled(mp):
    # step 0 moves lm_head alone, by lr x sign(grad)
    after_optimizers(mp, lambda adamw, muon: adamw.param_groups[1].update(lr=2 * adamw.param_groups[1]["lr"]))


def adamw_weight_decay(mp):
    # decoupled decay shrinks wte at step 0 although its gradient is zero (lm_head, zero, decays to zero)
    after_optimizers(mp, lambda adamw, muon: [g.update(weight_decay=0.01) for g in adamw.param_groups])  # was: 0


def muon_weight_decay(mp):
    # decay shrinks every block matrix at step 0; c_q is the first one the forward uses
    after_optimizers(mp, lambda adamw, muon: muon.param_groups[0].update(weight_decay=0.1))  # was: 0


def attention_branch_doubled(mp):
    # the forward is unchanged until iteration 2 (the branch is zero) and iteration 0's gradients are
    # zero, but at iteration 1 the gradient into each attention output doubles: the stage gradients
    # run in backward order, so blocks.1 comes first
    mp.setattr(gpt.Block, "forward", block_forward(branch=2))  # was: x + attn(x)


# --- iteration 2: acts through step 1, the first step with gradients beyond lm_head ---


def wte_lr_doubled(mp):
    # wte's gradient is zero at iteration 0, so step 0 leaves it; step 1 is its first move
    after_optimizers(mp, lambda adamw, muon: adamw.param_groups[0].update(lr=2 * adamw.param_groups[0]["lr"]))


def adam_beta1(mp):
    # Adam's step from a first gradient is lr x sign(grad) whatever the betas (lm_head at step 0:
    # iteration 1 matches); wte's first gradient arrives at its second step, where the bias
    # corrections leave lr x sqrt(1 + beta2) / (1 + beta1) x sign(grad)
    after_optimizers(mp, lambda adamw, muon: [g.update(betas=(0.9, 0.95)) for g in adamw.param_groups])  # was: 0.8


def muon_lr_doubled(mp):
    # Muon's matrices see zero gradients at iteration 0, and at iteration 1 only the c_proj weights
    # get one: step 1 moves c_proj alone, and the first tap after one is blocks.0.attn.out
    after_optimizers(mp, lambda adamw, muon: muon.param_groups[0].update(lr=2 * muon.param_groups[0]["lr"]))


CASES = [
    (norm_eps, (0, "forward", "embed.norm")),
    (rope_base_500, (0, "forward", "rope.cos")),
    (rope_cos_sin_swapped, (0, "forward", "rope.cos")),
    (attention_scale_dropped, (0, "forward", "blocks.0.attn.sdpa")),
    (causal_mask_removed, (0, "forward", "blocks.0.attn.sdpa")),
    (qk_norm_removed, (0, "forward", "blocks.0.attn.q_norm")),
    (relu2_to_relu, (0, "forward", "blocks.0.mlp.relu2")),
    (relu_to_gelu, (0, "forward", "blocks.0.mlp.relu")),
    (residual_doubled, (0, "forward", "blocks.0.attn_resid")),
    (c_fc_init_doubled, (0, "forward", "blocks.0.mlp.fc")),
    (c_q_init_doubled, (0, "forward", "blocks.0.attn.q")),
    (wte_init_halved, (0, "forward", "embed.wte")),
    (lm_head_not_zero, (0, "forward", "lm_head.logits")),
    (softcap_removed, (1, "forward", "lm_head.softcap")),
    (softcap_halved, (1, "forward", "lm_head.softcap")),
    (lm_head_lr_doubled, (1, "forward", "lm_head.logits")),
    (adamw_weight_decay, (1, "forward", "embed.wte")),
    (muon_weight_decay, (1, "forward", "blocks.0.attn.q")),
    (attention_branch_doubled, (1, "stage_grads", "blocks.1.attn.out")),
    (wte_lr_doubled, (2, "forward", "embed.wte")),
    (adam_beta1, (2, "forward", "embed.wte")),
    (muon_lr_doubled, (2, "forward", "blocks.0.attn.out")),
]


@pytest.mark.parametrize(("change", "expected"), CASES, ids=[c.__name__.replace("_", "-") for c, _ in CASES])
def test_a_one_line_change_diverges_first_where_it_acts(monkeypatch, change, expected):
    config = change(monkeypatch) or TINY_GOLDEN_CONFIG
    result = compare(load(TINY_GOLDEN), trace_reference(config, iterations=expected[0] + 1))
    first = result.first
    assert not result.ok and first is not None
    assert (first.iteration, first.section, first.stage) == expected, first
    if first.stat == "zeros":  # exact zero-ness has no allowance: it matches or not
        assert first.golden == "all zero"
    else:
        assert first.difference is not None and first.allowed is not None, first
        assert first.difference > MARGIN * first.allowed, first


def test_the_unchanged_model_passes():
    result = compare(load(TINY_GOLDEN), trace_reference(TINY_GOLDEN_CONFIG, iterations=3))
    assert result.ok, [m.where for m in result.mismatches[:5]]
