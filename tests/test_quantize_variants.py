"""The int8 variants (issue 14): SmoothQuant outlier migration (``int8-smooth``) and fp32 layers (``quantize_skip``).

Smoothing leaves the fp32 model's outputs as they were and refuses a fold map that does not; both variants keep
block omission exact; each lowers the int8 error where activation outliers are; and the settings reach the CLI,
the configs and the identities, which stay as they were for fp32 and plain int8.
"""

from __future__ import annotations

import copy
import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_quantize import assert_omission_equals
from torch import nn

from pudding.cli import main
from pudding.core import smooth
from pudding.core.errors import ConfigError
from pudding.core.load import load_model
from pudding.core.omit import get_blocks, prune_blocks
from pudding.core.quantize import (
    PerTokenInt8Linear,
    check_quantized,
    kept_fp32,
    quantization_of,
    quantize_identity,
    quantize_model,
    weight_bytes,
)
from pudding.core.smooth import InputScaledLinear, smooth_model
from pudding.evaluation.reproduce import ReproduceConfig
from pudding.pool.executor import ModelReplica
from pudding.pruning.candidates import PoolConfig, _search_identity, calibration_docs
from pudding.routing.labels import LabelConfig, collect_docs, run_identity

from tiny import TINY_CONFIGS, tiny_model, tiny_tokenizer

TEXTS = ("Question: Which gas do plants take in from the air?\nAnswer: carbon dioxide",
         "The cat sat on the mat, and then it went to sleep in the warm sun.")
OMITTED = (1, 3)
# (method, skip): the two new variants, and both together
VARIANTS = [("int8-smooth", ()), ("int8", ("down_proj",)), ("int8-smooth", ("mlp.down_proj",)), ("int8-mm-smooth", ()),
            ("int8-mm", ("down_proj",))]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _skip_for(model_type: str, skip: tuple[str, ...]) -> tuple[str, ...]:
    # gpt2, opt and gpt_neox have no down_proj: keep their MLP output projection instead
    other = {"gpt2": "mlp.c_proj", "opt": "fc2", "gpt_neox": "dense_4h_to_h"}
    return tuple(other.get(model_type, s) for s in skip)


def _quantize(model, method, skip, tokenizer):
    return quantize_model(model, method, skip=skip, tokenizer=tokenizer, calibration=TEXTS)


# --- smoothing is exact before quantization ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_smoothing_leaves_the_fp32_logits_as_they_were(model_type, tokenizer):
    model = tiny_model(model_type)
    smoothed = smooth_model(copy.deepcopy(model), tokenizer, TEXTS)
    ids = _ids()
    with torch.no_grad():
        want, got = model(ids).logits, smoothed(ids).logits
    assert (got - want).abs().max() < 1e-4
    # and it did move the scales: the weights differ from the original ones
    before, after = dict(model.named_parameters()), dict(smoothed.named_parameters())
    changed = [n for n in before if n in after and not torch.equal(before[n], after[n])]
    assert changed and any(isinstance(m, InputScaledLinear) for m in smoothed.modules())


def test_llama_folds_into_its_norms_and_scales_o_proj_and_down_proj_explicitly(tokenizer):
    model = tiny_model("llama")
    smoothed = smooth_model(copy.deepcopy(model), tokenizer, TEXTS)
    for original, block in zip(get_blocks(model), get_blocks(smoothed)):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert not torch.equal(getattr(original, norm).weight, getattr(block, norm).weight)
        for name in ("q_proj", "k_proj", "v_proj"):
            assert type(getattr(block.self_attn, name)) is nn.Linear  # the norm absorbed 1/s: no extra work
        assert isinstance(block.self_attn.o_proj, InputScaledLinear)
        assert isinstance(block.mlp.down_proj, InputScaledLinear)
        assert type(block.mlp.up_proj) is nn.Linear


def test_a_fold_map_that_does_not_match_the_block_is_refused(tokenizer, monkeypatch):
    # input_layernorm does not feed the MLP: folding into it for gate/up changes the output
    wrong = (smooth.NormFold("input_layernorm", ("mlp.gate_proj", "mlp.up_proj")),)
    monkeypatch.setitem(smooth.NORM_FOLDS, "llama", wrong)
    with pytest.raises(ConfigError, match="smoothing changed LlamaForCausalLM's fp32 output") as error:
        smooth_model(tiny_model("llama"), tokenizer, TEXTS)
    assert "\n" not in str(error.value)


# --- omission stays exact -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gpt_neox", "gemma2"])
@pytest.mark.parametrize("method,skip", VARIANTS)
def test_omission_on_a_smoothed_or_partly_fp32_model_equals_it_pruned(model_type, method, skip, tokenizer):
    skip = _skip_for(model_type, skip)
    fp32 = tiny_model(model_type)
    model = _quantize(copy.deepcopy(fp32), method, skip, tokenizer)
    references = [prune_blocks(model, OMITTED)]
    if not method.endswith("-smooth"):
        # Without smoothing the layers do not depend on calibration, so pruning the fp32 model first and then
        # quantizing gives the same model. Smoothing's statistics come from the whole model's activations, so
        # there the reference is the smoothed, quantized model pruned for good.
        references.append(_quantize(prune_blocks(fp32, OMITTED), method, skip, tokenizer))
    assert_omission_equals(model, references)
    assert quantization_of(model) == (method, False)
    kept = kept_fp32(model)
    assert len(kept) == len(skip) and all(smooth.matches(name, skip) for name in kept)


def test_a_smoothed_quantized_model_survives_a_deep_copy(tokenizer):
    model = _quantize(tiny_model("llama"), "int8-smooth", (), tokenizer)
    copied = copy.deepcopy(model)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, model(ids).logits)
    assert quantization_of(copied) == ("int8-smooth", False)
    scaled = [m for m in copied.modules() if isinstance(m, PerTokenInt8Linear) and m.input_scale is not None]
    assert len(scaled) == 2 * len(get_blocks(copied))  # o_proj and down_proj of every block


# --- fidelity where the outliers are --------------------------------------------------------------------------------


def _with_outliers(model):
    """Large input channels, as small LLMs have, without changing the fp32 function for the MLP's: a norm
    channel, and one hidden MLP channel moved from down_proj's column into up_proj's row."""
    with torch.no_grad():
        for block in get_blocks(model):
            block.input_layernorm.weight[3] *= 60
            block.post_attention_layernorm.weight[5] *= 60
            block.mlp.up_proj.weight[7] *= 60
            block.mlp.down_proj.weight[:, 7] /= 60
    return model


def test_smoothing_and_fp32_down_proj_each_cut_the_int8_error_from_outliers(tokenizer):
    model = _with_outliers(tiny_model("llama"))
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        errors = {(m, s): _relative_error(_quantize(copy.deepcopy(model), m, s, tokenizer)(ids).logits, want)
                  for m, s in [("int8", ()), *VARIANTS]}
    plain = errors[("int8", ())]
    assert plain > 0.1, errors  # the outliers do hurt plain int8
    for variant in VARIANTS:
        assert errors[variant] < plain / 2, errors


def test_skipped_layers_stay_fp32_and_count_at_fp32_size():
    model = tiny_model("llama")
    int8 = weight_bytes(quantize_model(copy.deepcopy(model), "int8"))
    kept = quantize_model(copy.deepcopy(model), "int8", skip="down_proj")
    downs = [b.mlp.down_proj for b in get_blocks(kept)]
    assert all(type(d) is nn.Linear for d in downs)
    assert all(isinstance(b.mlp.up_proj, PerTokenInt8Linear) for b in get_blocks(kept))
    # each down_proj now holds 4 bytes per weight instead of 1 byte plus an fp32 scale per output row
    extra = sum(4 * d.weight.numel() - (d.weight.numel() + 4 * d.out_features) for d in downs)
    assert weight_bytes(kept) - int8 == extra
    assert kept_fp32(kept) == ("mlp.down_proj",)


def test_bad_skip_settings_get_one_line_errors(tiny_dir):
    errors = []
    for call, message in [
        (lambda: quantize_model(tiny_model("llama"), "int8", skip="down_prj"), "names no linear layer"),
        (lambda: quantize_model(tiny_model("llama"), "int8", skip="proj"), "names no linear layer"),  # whole names
        (lambda: quantize_model(tiny_model("llama"), "int8-smooth"), "needs the tokenizer"),
        (lambda: PoolConfig(quantize_skip="down_proj"), "needs a --quantize method"),
        (lambda: PoolConfig(quantize="int8", quantize_skip="mlp/down_proj"), "layer-name suffixes"),
        (lambda: load_model(tiny_dir, quantize_skip=("down_proj",)), "needs a --quantize method"),
    ]:
        with pytest.raises(ConfigError, match=message) as error:
            call()
        errors.append(str(error.value))
    assert all("\n" not in e for e in errors)


STAGE_CONFIGS = ["pudding.evaluation.zero_shot:EvalConfig", "pudding.pruning.importance:ImportanceConfig",
                 "pudding.pruning.candidates:PoolConfig", "pudding.routing.labels:LabelConfig",
                 "pudding.evaluation.reproduce:ReproduceConfig", "pudding.evaluation.bench:BenchConfig"]


@pytest.mark.parametrize("target", STAGE_CONFIGS)
def test_every_stage_config_that_runs_the_model_validates_its_quantization_in_one_place(target):
    module, _, name = target.partition(":")
    config_class = getattr(importlib.import_module(module), name)
    required = {"pool": "unused", "out": "unused"} if name == "LabelConfig" else {}
    with pytest.raises(ConfigError, match="needs a --quantize method"):
        config_class(quantize_skip="down_proj", **required)
    config = config_class(quantize="int8-smooth", quantize_skip="down_proj, mlp.up_proj,down_proj", **required)
    assert config.quantize_skip == ("down_proj", "mlp.up_proj")
    assert config.quantization == {"quantize": "int8-smooth", "quantize_head": False,
                                   "quantize_skip": ("down_proj", "mlp.up_proj")}


# --- through the stages ------------------------------------------------------------------------------------------


def test_identities_name_the_new_settings_only_when_set():
    assert quantize_identity("none") == {} and quantize_identity("int8") == {"quantize": "int8"}
    assert quantize_identity("int8-smooth") == {"quantize": "int8-smooth"}
    assert quantize_identity("int8", skip="o_proj,down_proj") == {"quantize": "int8",
                                                                   "quantize_skip": ["down_proj", "o_proj"]}
    config = PoolConfig(tasks=("piqa",), objectives=("tl",), samples=4)
    docs = calibration_docs("piqa", 4)
    fingerprint = {"model_type": "llama", "num_blocks": 6, "config_sha256": "0123456789abcdef"}
    fp32 = _search_identity(config, fingerprint, "piqa", "tl", docs)
    assert "quantize" not in fp32
    skipping = replace(config, quantize="int8", quantize_skip="down_proj")
    assert skipping.quantize_skip == ("down_proj",)
    assert _search_identity(skipping, fingerprint, "piqa", "tl", docs) == {
        **fp32, "quantize": "int8", "quantize_skip": ["down_proj"]}
    labels = LabelConfig(pool="unused", out="unused", tasks=("piqa",), samples=3)
    label_docs = collect_docs(labels)
    assert run_identity(replace(labels, quantize="int8-smooth"), fingerprint, label_docs) == {
        **run_identity(labels, fingerprint, label_docs), "quantize": "int8-smooth"}


def test_a_passed_model_must_keep_the_declared_layers_fp32(tiny_dir):
    model, tokenizer = load_model(tiny_dir, quantize="int8", quantize_skip="down_proj")
    assert kept_fp32(model) == ("mlp.down_proj",)
    check_quantized(model, "int8", skip=("down_proj",))
    check_quantized(model, "int8", skip=("mlp.down_proj",))
    with pytest.raises(ConfigError, match="quantized as int8 keeping mlp.down_proj fp32, but the configuration "
                                          "says int8;"):
        check_quantized(model, "int8")
    with pytest.raises(ConfigError, match="says int8-smooth"):
        check_quantized(model, "int8-smooth", skip=("down_proj",))
    replica = ModelReplica(tiny_dir, 512, 64, "int8", False, ("down_proj",))  # what Ray actors and stages load
    assert kept_fp32(replica.scorer().model) == ("mlp.down_proj",)
    with pytest.raises(ConfigError, match="keeping mlp.down_proj fp32, but the configuration says int8;"):
        replace(replica, quantize_skip=()).scorer(model, tokenizer)


def test_reproduce_keeps_skipping_runs_in_folders_of_their_own():
    assert ReproduceConfig(k=3, quantize="int8").folder == Path("results/smollm2/small-int8/k3")
    skipping = ReproduceConfig(k=3, quantize="int8-smooth", quantize_skip="down_proj")
    assert skipping.folder == Path("results/smollm2/small-int8-smooth-keep-down_proj/k3")


def test_eval_cli_runs_and_records_the_new_variants(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", tiny_dir, "--tasks", "piqa", "--limit", "2", "--output-dir", str(out),
                 "--no-progress", "--quantize", "int8-smooth", "--quantize-skip", "down_proj"]) == 0
    config = json.loads(next(out.glob("eval-*.json")).read_text())["config"]
    assert config["quantize"] == "int8-smooth" and config["quantize_skip"] == ["down_proj"]
    capsys.readouterr()
    assert main(["eval", "--model", tiny_dir, "--tasks", "piqa", "--limit", "2", "--output-dir", str(out),
                 "--no-progress", "--quantize-skip", "down_proj"]) == 2
    err = capsys.readouterr().err
    assert "--quantize-skip keeps some quantized layers in fp32, so it needs a --quantize method" in err
    assert err.count("\n") == 1


def test_bench_quantize_pairs_pre_fill_and_decode_within_each_round(tiny_dir, monkeypatch):
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import bench_quantize

    # A fake clock that only forward passes advance: 1 unit per pass of "fp32", 3 per pass of "slow". No
    # wall time is measured, so the expected ratios are exact.
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(bench_quantize.time, "perf_counter", lambda: clock.now)
    fp32, tokenizer = load_model(tiny_dir)
    slow = copy.deepcopy(fp32)
    for model, cost in ((fp32, 1.0), (slow, 3.0)):
        model.register_forward_pre_hook(lambda module, args, cost=cost: setattr(clock, "now", clock.now + cost))
    report = bench_quantize.interleaved_latency({"fp32": fp32, "slow": slow}, tokenizer, 16, 4, rounds=3)
    assert (report["prompt_tokens"], report["new_tokens"]) == (16, 4)
    # pre-fill is one forward pass, the decode one per new token (the first with the prompt, then cached)
    assert report["fp32"]["prefill"]["median_s"] == 1.0 and report["fp32"]["decode"]["median_s"] == 4.0
    assert report["slow"]["prefill"]["median_s"] == 3.0 and report["slow"]["decode"]["median_s"] == 12.0
    for kind in ("prefill", "decode"):
        assert report["slow"][kind]["speedup_vs_fp32_range"] == [0.333, 0.333]
