import itertools
import math
import re

import pytest

from pytest_gpttrace import scaling
from pytest_gpttrace.scaling import Component, GPTShape

SEED_CONFIG = {"sequence_len": 1024, "vocab_size": 65536, "n_layer": 4, "n_head": 2, "n_kv_head": 2,
               "n_embd": 256, "softcap": 15.0, "rope_base": 10000.0}


def shape_of(config):
    shape = scaling.shape_from_config(config)
    assert shape is not None, config
    return shape


def reference_parameters(n_layer=4, d=256, V=65536, kv_dim=256):
    params = {"wte.weight": (V, d)}
    for i in range(n_layer):
        params.update({f"blocks.{i}.attn.c_q.weight": (d, d), f"blocks.{i}.attn.c_k.weight": (kv_dim, d),
                       f"blocks.{i}.attn.c_v.weight": (kv_dim, d), f"blocks.{i}.attn.c_proj.weight": (d, d),
                       f"blocks.{i}.mlp.c_fc.weight": (4 * d, d), f"blocks.{i}.mlp.c_proj.weight": (d, 4 * d)})
    params["lm_head.weight"] = (V, d)
    return params


def test_seed_config_parameters_and_flops():
    shape = scaling.shape_from_config(SEED_CONFIG)
    assert shape == GPTShape(4, 256, 2, 2, 65536, 1024) and shape.head_dim == 128
    assert scaling.count_params(shape) == 2 * 65536 * 256 + 12 * 4 * 256**2 == 36_700_160
    assert scaling.attention_flops_per_token(shape) == 12 * 4 * 2 * 128 * 1024
    assert scaling.flops_per_token(shape) == 132_120_576


def test_components_from_the_config():
    components = scaling.components_from_config(shape_of(SEED_CONFIG))
    assert [(c.name, c.total, c.uniform_per_block) for c in components] == [
        ("wte", 16_777_216, None), ("attention", 4 * 262_144, 262_144), ("mlp", 4 * 524_288, 524_288),
        ("lm_head", 16_777_216, None)]
    assert scaling.embedding_params(components) == 65536 * 256


def test_parameter_shapes_group_like_the_config():
    from_params = scaling.components_from_parameters(reference_parameters())
    assert from_params == scaling.components_from_config(shape_of(SEED_CONFIG))
    shape = shape_of(SEED_CONFIG)
    assert scaling.flops_per_token(shape, from_params) == 132_120_576


def test_grouped_query_attention():
    config = {**SEED_CONFIG, "n_head": 4, "n_kv_head": 1}  # head_dim 64, c_k and c_v are 256 x 64
    shape = shape_of(config)
    attn = 256 * 256 + 2 * 256 * 64 + 256 * 256
    assert scaling.attention_params_per_block(shape) == attn == 163_840
    total = 2 * 65536 * 256 + 4 * (attn + 8 * 256**2)
    assert scaling.count_params(shape) == total
    assert scaling.flops_per_token(shape) == 6 * (total - 65536 * 256) + 12 * 4 * 4 * 64 * 1024
    params = reference_parameters(kv_dim=64)
    assert scaling.total_params(scaling.components_from_parameters(params)) == total


@pytest.mark.parametrize("depth, width", [(1, (64, 1)), (2, (128, 1)), (3, (192, 2)), (4, (256, 2)),
                                          (12, (768, 6)), (20, (1280, 10)), (26, (1664, 13))])
def test_width_for_depth(depth, width):
    assert scaling.width_for_depth(depth) == width
    shape = GPTShape.from_depth(depth, 1000, 64)
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.n_kv_head) == (depth, *width, width[1])


@pytest.mark.parametrize("depth", [0, -3, 4.0, True, None])
def test_width_for_depth_rejects_a_bad_depth(depth):
    with pytest.raises(ValueError, match=rf"^depth must be a positive integer, got {re.escape(repr(depth))}$"):
        scaling.width_for_depth(depth)


def test_depth_sweep_follows_nanochat_rule():
    rows = scaling.depth_sweep(65536, 1024)
    assert [r.depth for r in rows] == list(scaling.DEFAULT_DEPTHS)
    first = rows[0]
    assert (first.n_embd, first.n_head, first.params, first.flops_per_token) == (256, 2, 36_700_160, 132_120_576)
    assert [(r.n_embd, r.n_head) for r in rows][-1] == (1664, 13)
    assert all(a.params < b.params and a.flops_per_token < b.flops_per_token for a, b in itertools.pairwise(rows))
    d20 = rows[scaling.DEFAULT_DEPTHS.index(20)]
    assert d20.params == 2 * 65536 * 1280 + 12 * 20 * 1280**2


@pytest.mark.parametrize("config, missing", [
    ({}, list(scaling.REQUIRED_KEYS)),
    ({**SEED_CONFIG, "n_layer": None}, ["n_layer"]),
    ({**SEED_CONFIG, "vocab_size": "65536"}, ["vocab_size"]),
    ({**SEED_CONFIG, "n_head": True}, ["n_head"]),
])
def test_incomplete_configs_have_no_shape(config, missing):
    assert scaling.missing_keys(config) == missing
    assert scaling.shape_from_config(config) is None


def test_heads_that_do_not_divide_have_no_shape():
    assert scaling.missing_keys({**SEED_CONFIG, "n_head": 3}) == []
    assert scaling.shape_from_config({**SEED_CONFIG, "n_head": 3}) is None


@pytest.mark.parametrize("name, component", [
    ("wte.weight", ("wte", None)),
    ("transformer.wte.weight", ("wte", None)),
    ("tok_emb.weight", ("wte", None)),
    ("lm_head.weight", ("lm_head", None)),
    ("blocks.3.attn.c_q.weight", ("attention", 3)),
    ("transformer.h.1.attn.c_attn.weight", ("attention", 1)),
    ("layers.0.mlp.fc.weight", ("mlp", 0)),
    ("blocks.2.ln_1.weight", ("other", None)),
    ("head.weight", ("other", None)),
])
def test_component_of(name, component):
    assert scaling.component_of(name) == component


def test_uneven_blocks_have_no_uniform_count():
    params = {"blocks.0.attn.w": (4, 4), "blocks.1.attn.w": (8, 4)}
    (attn,) = scaling.components_from_parameters(params)
    assert attn == Component("attention", 48, (16, 32)) and attn.uniform_per_block is None


def test_choose_components():
    full = reference_parameters()
    assert scaling.choose_components(SEED_CONFIG, full)[1] == "parameters"
    partial = {"wte.weight": (65536, 256), "lm_head.weight": (65536, 256)}  # as parsed from the seed
    components, source = scaling.choose_components(SEED_CONFIG, partial)
    assert source == "config" and scaling.total_params(components) == 36_700_160
    assert scaling.choose_components({}, partial)[1] == "parameters"
    assert scaling.choose_components({}, {}) == ([], None)
    assert math.prod(()) == 1 and scaling.components_from_parameters({"scalar": ()})[0].total == 1
