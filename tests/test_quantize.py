"""int8 quantization (pudding.core.quantize) and --quantize through the stages.

Omission stays exact on a quantized model; quantized scores stay close to fp32 without equalling them; the
per-token grid is batch invariant; the weights shrink about 4x; bad settings get one line; and the identities
that decide what a resumed job reuses name the quantization, while fp32 identities stay as they were.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pudding.cli import main
from pudding.core.errors import ConfigError, UnknownNameError
from pudding.core.fields import QUANTIZE_FIELD
from pudding.core.load import load_config, load_model, model_fingerprint
from pudding.core.omit import get_blocks, omit_blocks, prune_blocks
from pudding.core.quantize import (
    QUANTIZATIONS,
    Bf16Linear,
    IntMMInt8Linear,
    PerTokenInt8Linear,
    check_quantization,
    quantization_of,
    quantize_identity,
    quantize_model,
    weight_bytes,
)
from pudding.evaluation.reproduce import ReproduceConfig, _search_config, _wanted_pool, pool_identity
from pudding.evaluation.zero_shot import EvalConfig
from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource
from pudding.pruning.candidates import PoolConfig, _search_identity, build_baselines, build_pool, calibration_docs
from pudding.routing.labels import LabelConfig, build_labels, collect_docs, run_identity
from pudding.routing.model import PuddingModel
from pudding.routing.router import RouterConfig, build_router

from tiny import tiny_model

FAMILIES = ("llama", "gpt2", "opt", "gpt_neox", "gemma2")  # gpt2: transposed Conv1D; opt, gpt_neox: biases
OMITTED = (1, 3)
REPO = Path(__file__).resolve().parents[1]


def _ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


# --- omission on a quantized model ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("method", ["int8", "int8-mm", "bf16"])
def test_omission_on_a_quantized_model_equals_it_rebuilt_without_the_blocks(model_type, method):
    fp32 = tiny_model(model_type)
    model = quantize_model(copy.deepcopy(fp32), method)
    # Two references: the quantized model pruned for good, and the fp32 model pruned, then quantized.
    pruned = prune_blocks(model, OMITTED)
    rebuilt = quantize_model(prune_blocks(fp32, OMITTED), method)
    assert_omission_equals(model, [pruned, rebuilt])
    assert quantization_of(model) == (method, False) and quantization_of(fp32) == ("none", False)


def assert_omission_equals(model, references) -> None:
    """``model`` with :data:`OMITTED` omitted gives each reference's logits and cached greedy generation,
    bit for bit, and differs from ``model`` itself."""
    ids = _ids()
    args = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        with omit_blocks(model, OMITTED):
            got = model(ids).logits
            generated = model.generate(ids, use_cache=True, **args)
        dense = model(ids).logits
        for reference in references:
            assert torch.equal(got, reference(ids).logits)
            assert torch.equal(generated, reference.generate(ids, use_cache=True, **args))
    assert not torch.allclose(got, dense, atol=1e-3), "omitting blocks must change the output"


# --- fidelity -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("method", ["int8", "int8-mm", "bf16"])
def test_quantized_logits_are_close_to_fp32_but_not_equal(model_type, head, method):
    model = tiny_model(model_type)
    quantized = quantize_model(copy.deepcopy(model), method, head=head)
    assert quantization_of(quantized) == (method, head)
    ids = _ids()
    with torch.no_grad():
        error = _relative_error(quantized(ids).logits, model(ids).logits)
    # Per-token int8 lands at 1-6% on these random models; a lost scale, bias or transpose is off by order 1,
    # and 0 would mean nothing was quantized.
    assert 1e-3 < error < 0.1, error
    assert isinstance(quantized.get_output_embeddings(), (PerTokenInt8Linear, IntMMInt8Linear, Bf16Linear)) == head
    # the config (and so every artifact's fingerprint) is the loaded model's, tied head or not
    assert model_fingerprint(quantized.config) == model_fingerprint(model.config)


@pytest.mark.parametrize("kind", [PerTokenInt8Linear, IntMMInt8Linear, Bf16Linear])
@pytest.mark.parametrize("make", [lambda: nn.Linear(64, 48), lambda: Conv1D(48, 64)], ids=["linear", "conv1d"])
def test_each_row_is_close_to_fp32_even_beside_an_outlier_channel(make, kind):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(6, 64)
    x[1] *= 300  # a loud token
    x[2, 3] = 40.0  # a token with one huge channel, as small LLMs have
    quantized = kind(layer)
    with torch.no_grad():
        got, want = quantized(x), layer(x)
    errors = (got - want).norm(dim=1) / want.norm(dim=1)
    assert errors.max() < 0.05 and errors.min() > 1e-4, errors
    assert torch.equal(quantized(x.reshape(2, 3, 64)), got.reshape(2, 3, 48))


def _errors_beside_an_outlier_channel(kinds, outlier: float) -> tuple[dict[str, float], nn.Linear, torch.Tensor]:
    """Each layer kind's mean relative row error on one layer whose input has an outlier channel ``outlier``
    times the others, with the layer and the input."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 128)
    x = torch.randn(64, 256)
    x[:, 7] *= outlier
    with torch.no_grad():
        want = layer(x)
        errors = {kind.__name__: float(((kind(layer)(x) - want).norm(dim=1) / want.norm(dim=1)).mean())
                  for kind in kinds}
    return errors, layer, x


def test_the_symmetric_8_bit_grid_is_finer_than_fbgemms_7_bit_one():
    """int8-mm quantizes activations to 127 steps each side of zero, int8 (fbgemm's reduce_range) to about half
    that: on the same layer and inputs its error is clearly smaller (about half), and it is batch invariant too."""
    errors, layer, x = _errors_beside_an_outlier_channel((PerTokenInt8Linear, IntMMInt8Linear), outlier=30)
    assert errors["IntMMInt8Linear"] < 0.75 * errors["PerTokenInt8Linear"], errors
    mm = IntMMInt8Linear(layer)
    with torch.no_grad():
        assert torch.equal(mm(x[3:4]), mm(x)[3:4])


def test_bf16_keeps_each_elements_relative_precision_where_int8_shares_one_step():
    """bf16 rounds each element relative to itself, so an outlier channel does not coarsen its neighbours: on an
    outlier-heavy input its error is several times below even the finer int8 grid's, and it is batch invariant
    (each row's product is computed on its own values only)."""
    errors, layer, x = _errors_beside_an_outlier_channel((IntMMInt8Linear, Bf16Linear), outlier=100)
    assert errors["Bf16Linear"] < 0.25 * errors["IntMMInt8Linear"], errors
    bf16 = Bf16Linear(layer)
    with torch.no_grad():
        assert bf16(x).dtype == torch.float32
        assert torch.equal(bf16(x[3:4]), bf16(x)[3:4])


def test_the_per_token_grid_is_batch_invariant():
    torch.manual_seed(0)
    layer = PerTokenInt8Linear(nn.Linear(64, 48))
    row = torch.randn(1, 64)
    others = torch.randn(6, 64) * torch.tensor([1e3, 1e-3, 1.0, 50.0, 1e2, 1e-2])[:, None]
    others[2, 5] = 1e4  # an outlier channel in a batchmate
    batch = torch.cat([others[:3], row, others[3:]])
    with torch.no_grad():
        assert torch.equal(layer(row), layer(batch)[3:4])
        # The same kernel with one scale per tensor (torch.ao's quantize_dynamic) is not: the test can fail.
        per_tensor = lambda x: torch.ops.quantized.linear_dynamic(x, layer._packed, True)  # noqa: E731
        assert not torch.equal(per_tensor(row), per_tensor(batch)[3:4])


# --- memory --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_weight_bytes_drop_about_four_times_on_the_blocks_linears(model_type):
    model = tiny_model(model_type)
    linears = [m for block in get_blocks(model) for m in block.modules() if isinstance(m, nn.Linear | Conv1D)]
    outputs = [m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1] for m in linears]
    fp32 = sum(4 * m.weight.numel() for m in linears)
    int8 = sum(m.weight.numel() + 4 * out for m, out in zip(linears, outputs))  # int8 matrix + an fp32 scale per row
    before = weight_bytes(model)
    after = weight_bytes(quantize_model(copy.deepcopy(model), "int8"))
    assert before - after == fp32 - int8  # everything else (biases, norms, embeddings, head) is counted as before
    assert weight_bytes(quantize_model(copy.deepcopy(model), "int8-mm")) == after
    assert 3 < fp32 / int8 <= 4
    bf16 = sum(2 * m.weight.numel() for m in linears)  # bf16 keeps no scales
    assert before - weight_bytes(quantize_model(model, "bf16")) == fp32 - bf16


# --- bad input -------------------------------------------------------------------------------------------------


def test_unknown_method_and_int8_off_the_cpu_get_one_line_errors(tiny_dir):
    errors = []
    for call, kind, message in [
        (lambda: quantize_model(tiny_model("llama"), "int4"), UnknownNameError, "known: none, int8"),
        (lambda: EvalConfig(quantize="int4"), UnknownNameError, "unknown quantization 'int4'"),
        (lambda: quantize_model(tiny_model("llama").to("meta"), "int8"), ConfigError, "CPU only; the model is on "
                                                                                       "meta"),
        (lambda: quantize_model(tiny_model("llama").to("meta"), "int8-mm"), ConfigError, "CPU only"),
        (lambda: quantize_model(tiny_model("llama").to("meta"), "bf16"), ConfigError, "load the model in bf16"),
        # refused before any weight is read, so this holds on a machine without a GPU
        (lambda: load_model(tiny_dir, device="cuda", quantize="int8"), ConfigError, "the model is on cuda"),
        (lambda: PoolConfig(quantize_head=True), ConfigError, "needs a --quantize method"),
        (lambda: EvalConfig(adapter="x", quantize="int8"), ConfigError, "do not run on a quantized model"),
    ]:
        with pytest.raises(kind, match=message) as error:
            call()
        errors.append(str(error.value))
    assert all("\n" not in e for e in errors)
    assert check_quantization("none").replace is None and check_quantization("int8", True, "cpu").name == "int8"


def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_slow(monkeypatch):
    monkeypatch.setattr("pudding.core.quantize.native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        quantize_model(tiny_model("llama"), "bf16")
    monkeypatch.setattr("pudding.core.quantize.native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(tiny_model("llama"), "bf16")


def test_cli_quantize_choices_are_the_registry_and_bad_values_are_one_line(tiny_dir, tmp_path, capsys):
    assert QUANTIZE_FIELD["choices"] == tuple(QUANTIZATIONS)  # the flag's choices, declared once
    base = ["eval", "--model", tiny_dir, "--limit", "2", "--output-dir", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--quantize", "int4"])
    assert exit_info.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    assert main([*base, "--quantize-head"]) == 2
    err = capsys.readouterr().err
    assert "needs a --quantize method" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):  # export writes the model's own precision: no --quantize to give it
        main(["export", "--model", tiny_dir, "--omit", "1", "--out", str(tmp_path / "x"), "--quantize", "int8"])
    assert "unrecognized arguments: --quantize int8" in capsys.readouterr().err


# --- through the stages ----------------------------------------------------------------------------------------


def test_eval_cli_records_the_quantization_and_scores_close_to_fp32(tiny_dir, tmp_path, capsys):
    results = {}
    for method in ("none", "int8"):
        out = tmp_path / method
        assert main(["eval", "--model", tiny_dir, "--tasks", "piqa", "--omit", "1,2", "--limit", "3", "--output-dir",
                     str(out), "--no-progress", "--quantize", method]) == 0
        results[method] = json.loads(next(out.glob("eval-*.json")).read_text())
    assert results["int8"]["config"]["quantize"] == "int8" and results["none"]["config"]["quantize"] == "none"
    assert results["int8"]["config"]["quantize_head"] is False
    fp32, int8 = ([lp for doc in results[m]["runs"][0]["samples"]["piqa"] for lp in doc["logprobs"]]
                  for m in ("none", "int8"))
    assert fp32 != int8 and _relative_error(torch.tensor(int8), torch.tensor(fp32)) < 0.05


def _pool_config(tiny_dir, tmp_path, **overrides) -> PoolConfig:
    return PoolConfig(**{**dict(model=tiny_dir, tasks=("piqa",), objectives=("tl",), k=1, samples=4,
                                run_dir=str(tmp_path / "run"), out=str(tmp_path / "pool"), progress=False),
                         **overrides})


def test_an_fp32_search_checkpoint_is_refused_by_an_int8_resume(tiny_dir, tmp_path):
    config = _pool_config(tiny_dir, tmp_path)
    build_pool(config)
    saved = json.loads((tmp_path / "run" / "piqa-tl.json").read_text())["identity"]
    ids = [d.doc_id for d in calibration_docs("piqa", 4)]
    # Exactly the keys every checkpoint had before quantization existed: old checkpoints keep resuming.
    assert saved == {"model": model_fingerprint(load_config(tiny_dir)), "task": "piqa", "objective": "tl",
                     "barriers": [1, 1], "max_length": 256,
                     "samples_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]}
    with pytest.raises(ConfigError, match=r"\(differs in: quantize\); refusing to resume") as error:
        build_pool(replace(config, quantize="int8"))
    assert "\n" not in str(error.value)
    int8 = _pool_config(tiny_dir, tmp_path, run_dir=str(tmp_path / "run8"), out=str(tmp_path / "pool8"),
                        quantize="int8")
    pool = build_pool(int8)
    assert json.loads((tmp_path / "run8" / "piqa-tl.json").read_text())["identity"] == {**saved, "quantize": "int8"}
    assert pool.config["quantize"] == "int8"
    with pytest.raises(ConfigError, match=r"differs in: quantize_head"):
        build_pool(replace(int8, quantize_head=True))


def test_the_committed_search_checkpoint_still_matches_its_fp32_configuration():
    """The running 128-document searches resume from these files: their identity must not move."""
    saved = json.loads((REPO / "results/smollm2/pool-128-run/hellaswag-tl.json").read_text())["identity"]
    config = PoolConfig(tasks=("hellaswag",), objectives=("tl",), samples=128)
    assert _search_identity(config, saved["model"], "hellaswag", "tl", calibration_docs("hellaswag", 128)) == saved
    quantized = _search_identity(replace(config, quantize="int8"), saved["model"], "hellaswag", "tl",
                                 calibration_docs("hellaswag", 128))
    assert quantized == {**saved, "quantize": "int8"}


def test_label_identity_is_unchanged_for_fp32_and_names_int8():
    config = LabelConfig(pool="unused", out="unused", tasks=("piqa",), samples=3)
    docs = collect_docs(config)
    fingerprint = {"model_type": "llama", "num_blocks": 6, "config_sha256": "0123456789abcdef"}
    fp32 = {"format": "pudding.labels/2", "model": fingerprint, "docs": [d.doc_id for d in docs],
            "split": "calibration", "max_length": 256, "shard_size": 16}
    assert run_identity(config, fingerprint, docs) == fp32
    assert run_identity(replace(config, quantize="int8"), fingerprint, docs) == {**fp32, "quantize": "int8"}
    assert run_identity(replace(config, quantize="int8", quantize_head=True), fingerprint, docs) == {
        **fp32, "quantize": "int8", "quantize_head": True}
    assert quantize_identity("none", False) == {}


def test_labelling_an_fp32_run_dir_with_int8_is_refused(tiny_dir, tmp_path):
    model, tokenizer = load_model(tiny_dir)
    pool = CandidatePool((PoolEntry((1, 2), (SetSource("greedy", "piqa", "tl", [1, 2], [], [], 0.0),)),),
                         {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(model.config)})
    pool.save_pretrained(tmp_path / "pool")
    config = LabelConfig(pool=str(tmp_path / "pool"), out=str(tmp_path / "labels"), tasks=("piqa",), samples=2,
                         run_dir=str(tmp_path / "run"), progress=False)
    build_labels(config, model=model, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="quantized as none, but the configuration says int8"):
        build_labels(replace(config, quantize="int8"), model=model, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match=r"differs in: quantize\)"):
        build_labels(replace(config, quantize="int8"))  # loads and quantizes the model itself


def test_reproduce_reuses_the_committed_fp32_pool_and_not_for_int8():
    committed = CandidatePool.from_pretrained(REPO / "results/smollm2/small/k3/pool")
    fingerprint = committed.model["fingerprint"]
    fp32 = ReproduceConfig(k=3)
    assert pool_identity(committed) == _wanted_pool(_search_config(fp32, "pool"), fingerprint)
    int8 = ReproduceConfig(k=3, quantize="int8")
    wanted = _wanted_pool(_search_config(int8, "pool"), fingerprint)
    assert wanted == {**pool_identity(committed), "quantize": "int8"}
    assert fp32.folder == Path("results/smollm2/small/k3") and int8.folder == Path("results/smollm2/small-int8/k3")
    assert "taylor" in fp32.baseline_methods and "taylor" not in int8.baseline_methods


def test_baselines_refuse_taylor_on_int8_and_run_the_others(tiny_dir, tmp_path):
    config = _pool_config(tiny_dir, tmp_path, quantize="int8", objectives=("ppl",))
    with pytest.raises(ConfigError, match="taylor baseline needs the gradients"):
        build_baselines(config)
    pool = build_baselines(config, ("sleb", "shortgpt"))
    assert [s.method for e in pool.sets for s in e.sources] == ["sleb", "shortgpt"]


def test_ray_worker_loads_its_replica_quantized(tiny_dir):
    from pudding.pool.executor import _Worker

    worker = _Worker(tiny_dir, 512, 64, None, "int8", True)  # the class a Ray actor runs, without Ray
    assert quantization_of(worker.scorer.model) == ("int8", True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("quantized-artifact")
    model, tokenizer = load_model(tiny_dir)
    entries = tuple(PoolEntry(s, (SetSource("greedy", "t", "tl", list(s), [], [], 0.0),)) for s in [(1, 2), (3, 4)])
    pool = CandidatePool(entries, {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(model.config)})
    torch.manual_seed(0)
    router = build_router(RouterConfig("llm-embed", 2, "llm", hidden=8), llm=model, llm_tokenizer=tokenizer)
    PuddingModel(model, tokenizer, pool, router).save_pretrained(folder)
    return folder


def test_pudding_model_loads_its_llm_quantized_and_refuses_an_unquantized_one(artifact, tiny_dir):
    pudding = PuddingModel.from_pretrained(artifact, quantize="int8", quantize_head=True)
    assert quantization_of(pudding.model) == ("int8", True)
    [generation] = pudding.generate(["Question: Which gas do plants take in?"], max_new_tokens=4)
    assert generation.completion_tokens > 0
    with torch.no_grad(), pudding.running(generation.route.blocks) as model:
        ids = _ids(1, 8)
        routed = model(ids).logits
    reference = quantize_model(prune_blocks(load_model(tiny_dir)[0], generation.route.blocks), "int8", head=True)
    assert torch.equal(routed, reference(ids).logits)
    fp32, tokenizer = load_model(tiny_dir)
    with pytest.raises(ConfigError, match="quantized as none, but the configuration says int8"):
        PuddingModel.from_pretrained(artifact, model=fp32, tokenizer=tokenizer, quantize="int8")
    given = PuddingModel.from_pretrained(artifact, model=quantize_model(fp32, "int8"), tokenizer=tokenizer,
                                         quantize="int8")
    assert given.model is fp32  # used as passed, not copied or quantized again


@pytest.mark.parametrize("method", ["int8", "bf16"])
def test_bench_runs_every_variant_quantized(artifact, tiny_dir, tmp_path, method):
    from pudding.evaluation.bench import BenchConfig, run_bench

    report = run_bench(BenchConfig(model=str(artifact), lengths="16", new_tokens=3, repeats=1, threads=1,
                                   cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "out"), quantize=method))
    variants = report["variants"]
    quantized = weight_bytes(quantize_model(load_model(tiny_dir)[0], method))
    assert variants["dense"]["resident_weight_bytes"] == quantized  # the subprocess ran the quantized model
    assert variants["routed"]["resident_weight_bytes"] == quantized  # no fp32 block cache: the whole model stays
    assert variants["static"]["resident_weight_bytes"] < quantized
    assert not (tmp_path / "cache").exists(), "a quantized run must not write the fp32 block cache"
    assert report["config"]["quantize"] == method and f"{method} model" in (tmp_path / "out" / "bench.md").read_text()


@pytest.mark.slow  # a whole tiny reproduction: minutes on 2 shared cores
@pytest.mark.integration
def test_reproduce_runs_every_stage_on_the_int8_model(tiny_dir, tmp_path):
    from pudding.evaluation.reproduce import reproduce

    config = ReproduceConfig(model=tiny_dir, k=2, budget="tiny", run_dir=str(tmp_path / "run"),
                             out=str(tmp_path / "results" / "tiny-int8" / "k2"), routers=(("llm-embed", "mse"),),
                             router_seeds=1, variants=False, reuse=None, progress=False, quantize="int8")
    result = reproduce(config)
    rows = result["tables"]["main"]["rows"]
    assert {"dense", "sleb", "shortened_ppl", "shortgpt", "PuDDing (paper: llm-embed-mse)"} <= set(rows)
    assert "taylor" not in rows
    checkpoints = list((tmp_path / "run").rglob("*-tl.json"))
    assert checkpoints and all(json.loads(p.read_text())["identity"]["quantize"] == "int8" for p in checkpoints)
    assert json.loads((config.folder / "labels" / "labels.json").read_text())["identity"]["quantize"] == "int8"
    assert "int8 model in every stage" in (config.folder / "README.md").read_text()
