"""Sub-block omission ("12.attn", "12.mlp"): exact against a reference that needs no pudding code, on every family.

The reference is the same model with the skipped sub-layer's output projection (weight and bias) set to zero:
that sub-layer then adds exactly nothing to the residual stream, which is what skipping it means, while its
attention still runs and fills its KV cache as usual. So the reference also checks that a skipped attention
writing no cache changes nothing. A whole block is the reference with both of its projections zeroed.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from pudding.cli import main
from pudding.core.errors import ConfigError
from pudding.core.omit import Omission, omission_key, omit_blocks, parse_omission, prune_blocks
from pudding.evaluation.zero_shot import EvalConfig, evaluate
from pudding.pruning.export import export_pruned

from tiny import NUM_LAYERS, TINY_CONFIGS, tiny_model, tiny_tokenizer, zeroed_reference

FAMILIES = sorted(TINY_CONFIGS)
# Attention skipped in block 0 (transformers reads the cache length from layer 0) and in block 1 (the first
# full-attention layer of the hybrid families, whose cache sizes the full masks), beside a whole block (3)
# whose removal renumbers the later cache layers, and an MLP.
SPECS = ["2.attn", "3.mlp", "0.attn,1.attn,3,4.mlp"]


def _inputs(batch=2, length=10, seed=1):
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_logits_equal_zeroed_output_projections(model_type, spec):
    model = tiny_model(model_type)
    reference = zeroed_reference(model, spec)
    ids = _inputs()
    with torch.no_grad():
        with omit_blocks(model, spec):
            got = model(ids).logits
        want = reference(ids).logits
        dense = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, dense, atol=1e-3), "skipping a sub-layer must change the output"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_cached_generation_equals_the_reference_and_uncached_generation(model_type):
    spec = SPECS[-1]
    model = tiny_model(model_type)
    reference = zeroed_reference(model, spec)
    ids = _inputs(length=6)
    args = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = reference.generate(ids, use_cache=True, **args)
        with omit_blocks(model, spec):
            with_cache = model.generate(ids, use_cache=True, **args)
            without_cache = model.generate(ids, use_cache=False, **args)
    assert torch.equal(with_cache, want)
    assert torch.equal(without_cache, want)


def test_a_lazily_built_cache_also_skips_the_layer():
    # A DynamicCache() made without the config grows its layers on the first update of each index.
    model = tiny_model("llama")
    reference = zeroed_reference(model, "0.attn,2.attn")
    ids = _inputs(length=6)
    args = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = reference.generate(ids, **args)
        with omit_blocks(model, "0.attn,2.attn"):
            cache = DynamicCache()
            got = model.generate(ids, cache=cache, **args)
    assert torch.equal(got, want)
    assert type(cache.layers[0]).__name__ == "DummyLayer" and cache.get_seq_length() == got.shape[1] - 1


def test_a_cache_filled_with_the_attention_kept_is_refused():
    model = tiny_model("llama")
    ids = _inputs(length=6)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        with omit_blocks(model, "2.attn"), pytest.raises(ConfigError, match="fresh cache"):
            model(ids[:, -1:], cache=cache, use_cache=True)


def _modules(model):
    return {name: module for name, module in model.named_modules()}


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "opt", "gpt_neox"])
def test_model_is_restored_exactly_even_on_exceptions(model_type):
    model = tiny_model(model_type)
    before_modules = _modules(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    layer_idx = {n: m.layer_idx for n, m in model.named_modules() if isinstance(getattr(m, "layer_idx", None), int)}
    with omit_blocks(model, "1,2.attn,4.mlp"):
        assert set(_modules(model)) != set(before_modules)
    with pytest.raises(RuntimeError, match="boom"):
        with omit_blocks(model, "0.attn,3.mlp"):
            raise RuntimeError("boom")
    assert _modules(model) == before_modules  # the very same module objects, at the same names
    assert {n: m.layer_idx for n, m in model.named_modules()
            if isinstance(getattr(m, "layer_idx", None), int)} == layer_idx
    after = model.state_dict()
    assert after.keys() == before_state.keys() and all(torch.equal(after[k], v) for k, v in before_state.items())
    assert model.config.num_hidden_layers == NUM_LAYERS


def test_parse_normalises_and_keeps_whole_block_sets_as_int_tuples():
    assert parse_omission("14.mlp, 3,12.attn", 30) == Omission((3,), ((12, "attn"), (14, "mlp")))
    assert parse_omission("12.mlp,3,12.attn", 30) == Omission((3, 12))
    assert omission_key("12.mlp,3,12.attn", 30) == (3, 12)  # both sub-layers: the whole block, as plain ints
    assert omission_key([5, "2.attn"], 30) == ("2.attn", 5)
    assert omission_key((3, "12.attn"), None) == (3, "12.attn")  # the key parses back to itself
    assert omission_key("20,21", 30) == (20, 21) and omission_key(None, 30) == ()
    assert str(parse_omission([14, "3.mlp"], 30)) == "3.mlp,14"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("2.foo", "unknown sub-layer 'foo'"),
        (f"{NUM_LAYERS + 93}.attn", "out of range"),
        ("-1.mlp", "out of range"),
        ("x.attn", "block index"),
        ("2.attn,2.attn", "more than once"),
        ("2,2.mlp", "names block 2 whole"),
        ([2, 3.5, "1.attn"], "block indices or sub-layers"),
        (",".join(map(str, range(NUM_LAYERS - 1))) + f",{NUM_LAYERS - 1}.attn,{NUM_LAYERS - 1}.mlp",
         "cannot omit all"),
    ],
)
def test_bad_sub_layer_names_get_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_omission(spec, NUM_LAYERS)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=message):
        with omit_blocks(tiny_model("llama"), spec):
            pass


def test_post_norm_opt_is_refused_for_sub_layers_but_not_for_whole_blocks():
    model = tiny_model("opt", do_layer_norm_before=False)
    with pytest.raises(ConfigError, match="do_layer_norm_before=False"):
        with omit_blocks(model, "2.attn"):
            pass
    with omit_blocks(model, "2"):
        pass


def test_export_and_prune_refuse_sub_layers(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="whole blocks only.*2.attn"):
        export_pruned(model, tiny_tokenizer(), "1,2.attn", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="whole blocks only"):
        prune_blocks(model, "2.mlp")


def test_pudding_eval_scores_a_sub_block_set():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    config = EvalConfig(model="unused", tasks="piqa", omissions=("", "3,2.attn", "2.attn,2.mlp"), limit=4,
                        output_dir=None, progress=False)
    assert config.omissions == ((), ("2.attn", 3), (2,))
    result = evaluate(config, model=model, tokenizer=tokenizer)
    runs = result["runs"]
    assert [r["omitted"] for r in runs] == [[], ["2.attn", 3], [2]] and runs[1]["label"] == "omit 2.attn,3"
    logprobs = [[d["logprobs"] for d in r["samples"]["piqa"]] for r in runs]
    assert logprobs[1] != logprobs[0] and logprobs[1] != logprobs[2]
    reference = evaluate(EvalConfig(model="unused", tasks="piqa", omissions=("",), limit=4, output_dir=None,
                                    progress=False), model=zeroed_reference(model, "3,2.attn"), tokenizer=tokenizer)
    want = [d["logprobs"] for d in reference["runs"][0]["samples"]["piqa"]]
    torch.testing.assert_close(torch.tensor(logprobs[1]), torch.tensor(want), atol=1e-4, rtol=0)


def test_eval_cli_reports_a_bad_sub_layer_on_one_line(capsys):
    status = main(["eval", "--model", "default", "--tasks", "piqa", "--omit", "3.ffn", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and "unknown sub-layer 'ffn'" in err and err.count("\n") == 1
