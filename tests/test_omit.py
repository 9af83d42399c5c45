"""Invariants of block omission, over tiny random models of every supported family."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from pudding.core.errors import ConfigError, UnknownNameError
from pudding.core.omit import (
    get_architecture,
    num_blocks,
    omit_blocks,
    prune_blocks,
    supported_model_types,
    validate_omission,
)

from tiny import BLOCK_PREFIX, NUM_LAYERS, TINY_CONFIGS, tiny_model

FAMILIES = sorted(TINY_CONFIGS)
# First block, last block, and a scattered pair: the first case moves every cache index, the last changes
# which block feeds the final norm.
OMISSIONS = [(0,), (NUM_LAYERS - 1,), (1, 3)]


def rebuilt_without(model, omitted):
    """A model built from scratch with a smaller config and the kept blocks' weights renumbered."""
    model_type = model.config.model_type
    kept = [i for i in range(NUM_LAYERS) if i not in omitted]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [model.config.layer_types[i] for i in kept]
    fresh = AutoModelForCausalLM.from_config(config).eval()
    prefix = re.escape(BLOCK_PREFIX[model_type])
    state = {}
    for key, value in model.state_dict().items():
        match = re.match(rf"{prefix}\.(\d+)\.(.*)", key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in kept:
            state[f"{BLOCK_PREFIX[model_type]}.{kept.index(int(match.group(1)))}.{match.group(2)}"] = value
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in k or "bias" in k and "attn" in k for k in missing), missing  # buffers only
    return fresh


def _inputs(batch=2, length=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (batch, length), generator=generator)


def test_every_required_family_is_registered():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt", "gpt2", "gpt_neox"}
    assert required <= set(supported_model_types())


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("omitted", OMISSIONS)
def test_logits_equal_a_model_rebuilt_without_the_blocks(model_type, omitted):
    model = tiny_model(model_type)
    reference = rebuilt_without(model, omitted)
    ids = _inputs()
    with torch.no_grad():
        with omit_blocks(model, omitted):
            got = model(ids).logits
        want = reference(ids).logits
        dense = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, dense, atol=1e-3), "omitting a block must change the output"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_generation_with_cache_matches_rebuilt_model_and_no_cache(model_type):
    omitted = (0, 3)
    model = tiny_model(model_type)
    reference = rebuilt_without(model, omitted)
    ids = _inputs(length=6)
    args = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = reference.generate(ids, use_cache=True, **args)
        with omit_blocks(model, omitted):
            with_cache = model.generate(ids, use_cache=True, **args)
            without_cache = model.generate(ids, use_cache=False, **args)
    assert torch.equal(with_cache, want)
    assert torch.equal(without_cache, want)


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.config.to_dict(),
        [(name, m.layer_idx) for name, m in model.named_modules() if isinstance(getattr(m, "layer_idx", None), int)],
        id(getattr(model, "model", model)),
    )


def _assert_same(before, after):
    params_before, config_before, idx_before, _ = before
    params_after, config_after, idx_after, _ = after
    assert params_before.keys() == params_after.keys()
    for key in params_before:
        assert torch.equal(params_before[key], params_after[key]), key
    assert config_before == config_after
    assert idx_before == idx_after


@pytest.mark.parametrize("model_type", FAMILIES)
def test_model_is_restored_exactly_after_the_context(model_type):
    model = tiny_model(model_type)
    before = _snapshot(model)
    blocks_before = list(model.get_decoder().modules()) if hasattr(model, "get_decoder") else None
    with omit_blocks(model, [1, 2]):
        assert num_blocks(model) == NUM_LAYERS - 2
        assert model.config.num_hidden_layers == NUM_LAYERS - 2
    _assert_same(before, _snapshot(model))
    with pytest.raises(RuntimeError, match="boom"):
        with omit_blocks(model, [0, 4]):
            raise RuntimeError("boom")
    _assert_same(before, _snapshot(model))
    assert num_blocks(model) == NUM_LAYERS
    if blocks_before is not None:
        assert list(model.get_decoder().modules()) == blocks_before


@pytest.mark.parametrize(
    "blocks, message",
    [
        ([NUM_LAYERS], "out of range"),
        ([-1], "out of range"),
        ([2, 2], "more than once"),
        ([1.5], "integer"),
        ([True], "integer"),
        (3, "collection"),
        ("1,x", "comma-separated"),
        (list(range(NUM_LAYERS)), "cannot omit all"),
    ],
)
def test_bad_omission_sets_raise_value_error_naming_the_problem(blocks, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        with omit_blocks(model, blocks):
            pass
    with pytest.raises(ConfigError, match=message):
        validate_omission(blocks, NUM_LAYERS)


def test_validate_omission_normalises():
    assert validate_omission([3, 1], 6) == (1, 3)
    assert validate_omission("3, 1", 6) == (1, 3)
    assert validate_omission(None, 6) == ()
    assert validate_omission("", 6) == ()


def test_nesting_is_refused():
    model = tiny_model("llama")
    with omit_blocks(model, [1]):
        with pytest.raises(ConfigError, match="already active"):
            with omit_blocks(model, [2]):
                pass
    assert num_blocks(model) == NUM_LAYERS


def test_unknown_architecture_lists_supported_ones():
    class FakeConfig:
        model_type = "mamba"

    with pytest.raises(UnknownNameError, match="llama.*") as info:
        get_architecture(FakeConfig())
    assert "mamba" in str(info.value) and "gpt_neox" in str(info.value)


def test_gpt2_with_index_dependent_scaling_is_refused():
    model = tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        with omit_blocks(model, [1]):
            pass


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "opt"])
def test_prune_blocks_returns_an_independent_smaller_model(model_type):
    model = tiny_model(model_type)
    before = _snapshot(model)
    ids = _inputs()
    with torch.no_grad():
        with omit_blocks(model, [1, 4]):
            want = model(ids).logits
        pruned = prune_blocks(model, [1, 4])
        got = pruned(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert num_blocks(pruned) == NUM_LAYERS - 2 and pruned.config.num_hidden_layers == NUM_LAYERS - 2
    _assert_same(before, _snapshot(model))
    assert not set(map(id, pruned.parameters())) & set(map(id, model.parameters()))
    in_place = prune_blocks(model, [1, 4], inplace=True)
    assert in_place is model and num_blocks(model) == NUM_LAYERS - 2


def test_a_swapped_attention_is_renumbered_after_the_block_was_omitted_before():
    # Omission caches which modules of a block carry a layer_idx; replacing a block's attention (sub-layer
    # omission, or user code) must not leave the new module with its full-model index inside the context.
    model = tiny_model("llama")
    with omit_blocks(model, (1,)):
        assert model.model.layers[2].self_attn.layer_idx == 2  # block 3, renumbered
    fresh = copy.deepcopy(model.model.layers[3].self_attn)
    model.model.layers[3].self_attn = fresh
    with omit_blocks(model, (1,)):
        assert fresh.layer_idx == 2
        got = model(_inputs()).logits
    assert fresh.layer_idx == 3
    reference = rebuilt_without(model, (1,))
    with torch.no_grad():
        torch.testing.assert_close(got, reference(_inputs()).logits, atol=1e-5, rtol=0)
