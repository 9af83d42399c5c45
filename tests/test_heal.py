"""Healing (pudding heal): LoRA adapters trained with blocks omitted, saved in the artifact, applied per route."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pudding.core.errors import ConfigError
from pudding.core.load import model_fingerprint
from pudding.core.omit import omit_blocks
from pudding.core.tasks import load_docs
from pudding.healing.adapters import ADAPTER_FILE, ADAPTERS_DIR, AdapterBank
from pudding.healing.lora import (
    HealConfig,
    alpaca_text,
    batch_schedule,
    heal,
    healing_data,
    learning_rate,
    pack,
    shared_schedule,
)
from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource
from pudding.routing.model import PuddingModel, Route
from pudding.routing.router import RouterConfig, build_router

from tiny import tiny_model, tiny_tokenizer

SETS = [(1, 2), (3, 4)]
IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8]])
TEXTS = ["The man turned on the faucet. Water flowed from the spout because the valve opened.",
         "A revolving door is convenient for two direction travel, but it also serves as a security measure.",
         "Sarah was a much better surgeon than Maria so she always got the easier cases.",
         "Question: Which technology was developed most recently? Answer: cellular telephone"] * 6
FAST = dict(rank=4, alpha=8, dropout=0.0, steps=6, lr=2e-2, batch_size=2, seq_length=24, val_chunks=2,
            checkpoint_every=3, progress=False)


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


@pytest.fixture(scope="module")
def healed(tmp_path_factory, tiny_dir):
    """A tiny artifact with a per-set adapter for set 0 only, and the files it had before healing."""
    root = tmp_path_factory.mktemp("healed")
    corpus = root / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    art = _artifact(root / "art", model, spec=tiny_dir)
    before = _files(art)
    summary = heal(HealConfig(pool=str(art), data=str(corpus), sets=(0,), run_dir=str(root / "run"), **FAST),
                   model=model, tokenizer=tiny_tokenizer())
    return art, before, summary, model


def _load_tiny(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def _artifact(folder, model, spec="tiny"):
    entries = tuple(PoolEntry(s, (SetSource("greedy", "t", "tl", list(s), [], [], 0.0),)) for s in SETS)
    pool = CandidatePool(entries, {"spec": spec, "name": "tiny", "fingerprint": model_fingerprint(model.config)})
    router = build_router(RouterConfig("llm-embed", len(SETS), "llm", hidden=8), llm=model,
                          llm_tokenizer=tiny_tokenizer())
    PuddingModel(model, tiny_tokenizer(), pool, router).save_pretrained(folder)
    return folder


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_per_set_adapter_trains_saves_reloads_and_generates_the_same(healed, tiny_dir):
    art, before, summary, model = healed
    history = json.loads((art / ADAPTERS_DIR / "set-0" / "training.json").read_text())["history"]
    assert len(history) == FAST["steps"] and all(h["omitted"] == [1, 2] for h in history)
    trained = summary["adapters"]["set-0"]
    # the held-out loss with the set omitted goes down (a fixed set of chunks, before and after training)
    assert trained["val_loss_after"]["1,2"] < trained["val_loss_before"]["1,2"] - 0.05, trained
    # the artifact gains only adapter files: no copy of the LLM, no README, nothing else touched
    added = sorted(set(_files(art)) - set(before))
    assert added == [f"adapters/set-0/{f}" for f in ("adapter_config.json", "adapter_model.safetensors",
                                                     ADAPTER_FILE, "training.json", "training.png")]
    assert (art / ADAPTERS_DIR / "set-0" / "adapter_model.safetensors").stat().st_size < 200_000
    # per-set LoRA lives only in the kept blocks
    config = json.loads((art / ADAPTERS_DIR / "set-0" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0, 3, 4, 5]
    # heal leaves the model it was given plain again
    assert not any("lora" in n for n, _ in model.named_modules())

    with torch.no_grad(), omit_blocks(_load_tiny(tiny_dir), SETS[0]) as plain:
        unhealed = plain(IDS).logits
    pudding = PuddingModel.from_pretrained(art, model=_load_tiny(tiny_dir), tokenizer=tiny_tokenizer())
    assert pudding.adapters.mode == "per-set" and pudding.adapters.adapter_for(SETS[0]) == "set-0"
    assert pudding.adapters.adapter_for(SETS[1]) is None and pudding.adapters.adapter_for(()) is None
    with torch.no_grad(), pudding.running(SETS[0]) as healed_model:
        assert not torch.allclose(healed_model(IDS).logits, unhealed, atol=1e-4)  # the adapter changes it
    with torch.no_grad(), pudding.running(SETS[1]) as other:  # set 1 has no adapter: the plain pruned model
        with omit_blocks(_load_tiny(tiny_dir), SETS[1]) as plain:
            assert torch.allclose(other(IDS).logits, plain(IDS).logits, atol=1e-6)

    routes = [Route(0, SETS[0], "s0", [])]
    first = pudding.generate(["The man turned"], routes=routes, max_new_tokens=8)[0]
    again = PuddingModel.from_pretrained(art, model=_load_tiny(tiny_dir), tokenizer=tiny_tokenizer())
    assert again.generate(["The man turned"], routes=routes, max_new_tokens=8)[0].text == first.text
    bare = PuddingModel.from_pretrained(art, model=_load_tiny(tiny_dir), tokenizer=tiny_tokenizer(), adapters="none")
    assert bare.adapters is None
    assert bare.generate(["The man turned"], routes=routes, max_new_tokens=8)[0].text != first.text


def test_merged_export_equals_the_unmerged_adapter(healed, tiny_dir, tmp_path):
    from pudding.pruning.export import export_all_sets

    art = healed[0]
    pudding = PuddingModel.from_pretrained(art, model=_load_tiny(tiny_dir), tokenizer=tiny_tokenizer())
    out = export_all_sets(pudding, tmp_path / "export")
    for index, blocks in enumerate(SETS):
        folder = out / f"set-{index}"
        record = json.loads((folder / "config.json").read_text())["pudding_export"]
        assert record.get("adapter") == ("set-0" if index == 0 else None)  # set 1 has no adapter: exported plain
        loaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # vanilla transformers, no PEFT
        assert not any("lora" in n for n, _ in loaded.named_modules())
        with torch.no_grad(), pudding.running(blocks) as healed_model:
            expected = healed_model(IDS).logits
        with torch.no_grad():
            assert torch.allclose(loaded(IDS).logits, expected, atol=1e-5)
    # the live model still carries its (unmerged) adapter
    assert any("lora_A" in n for n, _ in pudding.model.named_modules())


def test_shared_adapter_draws_sets_reproducibly_and_serves_every_route(tmp_path, corpus):
    choices = [(1, 2), (3, 4), ()]
    assert shared_schedule(choices, 50, 0) == shared_schedule(choices, 50, 0)
    assert shared_schedule(choices, 50, 0) != shared_schedule(choices, 50, 1)
    assert set(shared_schedule(choices, 50, 0)) == set(choices)
    assert batch_schedule(10, 7, 3, 0) == batch_schedule(10, 7, 3, 0)
    assert sorted(sum(batch_schedule(10, 5, 2, 0), [])) == list(range(10))  # one epoch: each chunk once

    model = tiny_model("llama")
    art = _artifact(tmp_path / "art", model)
    heal(HealConfig(pool=str(art), data=corpus, mode="shared", include_dense=True, run_dir=str(tmp_path / "run"),
                    **FAST), model=model, tokenizer=tiny_tokenizer())
    history = json.loads((art / ADAPTERS_DIR / "shared" / "training.json").read_text())["history"]
    assert [tuple(h["omitted"]) for h in history] == shared_schedule(choices, FAST["steps"], 0)
    record = json.loads((art / ADAPTERS_DIR / "shared" / ADAPTER_FILE).read_text())
    assert record["mode"] == "shared" and record["blocks"] is None
    pudding = PuddingModel.from_pretrained(art, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    assert [pudding.adapters.adapter_for(s) for s in (*SETS, ())] == ["shared"] * 3


def test_training_resumes_from_its_checkpoint_exactly(tmp_path, corpus, monkeypatch):
    from safetensors.torch import load_file

    from pudding.healing import lora as heal_module

    def run(name):
        art = _artifact(tmp_path / name, tiny_model("llama"))
        return art, HealConfig(pool=str(art), data=corpus, sets=(1,), run_dir=str(tmp_path / f"run-{name}"), **FAST)

    whole_art, whole = run("whole")
    heal(whole, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    art, config = run("stopped")
    real = heal_module._save_checkpoint

    def save_then_stop(folder, peft_model, optimizer, step, history, identity):
        real(folder, peft_model, optimizer, step, history, identity)
        if step == 3:
            raise KeyboardInterrupt  # the process dies right after its step-3 checkpoint

    monkeypatch.setattr(heal_module, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        heal(config, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    monkeypatch.undo()
    assert not (art / ADAPTERS_DIR / "set-1").exists()  # nothing half-written in the artifact
    [checkpoint] = (tmp_path / "run-stopped").glob("*/set-1/checkpoint.json")  # run_dir/<pool fingerprint>/set-1
    assert json.loads(checkpoint.read_text())["step"] == 3
    heal(config, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    histories = [json.loads((a / ADAPTERS_DIR / "set-1" / "training.json").read_text())["history"]
                 for a in (whole_art, art)]
    assert [h["loss"] for h in histories[1]] == [h["loss"] for h in histories[0]]
    weights = [load_file(a / ADAPTERS_DIR / "set-1" / "adapter_model.safetensors") for a in (whole_art, art)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-7) for k in weights[0])
    # a checkpoint of other settings is refused, not silently continued
    other_art = str(_artifact(tmp_path / "c", tiny_model("llama")))
    changed = HealConfig(**{**config.__dict__, "lr": 1e-3, "pool": other_art})
    with pytest.raises(ConfigError, match="different healing run"):
        heal(changed, model=tiny_model("llama"), tokenizer=tiny_tokenizer())


def test_mismatched_adapters_are_refused(healed, tiny_dir):
    art = healed[0]
    other = tiny_model("llama", num_hidden_layers=8)  # another base model (its fingerprint differs)
    with pytest.raises(ConfigError, match="trained for tiny"):
        AdapterBank.load(other, art)
    # another pool: same model, sets in another order
    model = _load_tiny(tiny_dir)
    entries = tuple(PoolEntry(s, (SetSource("greedy", "t", "tl", list(s), [], [], 0.0),)) for s in SETS[::-1])
    pool = CandidatePool(entries, {"spec": "tiny", "name": "tiny", "fingerprint": model_fingerprint(model.config)})
    with pytest.raises(ConfigError, match="trained for pool"):
        AdapterBank.load(model, art, pool=pool)
    with pytest.raises(ConfigError, match="no shared adapters"):
        AdapterBank.load(_load_tiny(tiny_dir), art, mode="shared")


def test_config_and_data_checks(tmp_path):
    with pytest.raises(ConfigError, match="mode"):
        HealConfig(pool="x", mode="both")
    with pytest.raises(ConfigError, match="not both"):
        HealConfig(pool="x", omit="1,2", out="y")
    with pytest.raises(ConfigError, match="steps"):
        HealConfig(pool="x", steps=0)
    assert HealConfig(omit="2,1;4", out="y", model="m").omit == ((1, 2), (4,))
    config = HealConfig(pool="x", steps=100, warmup=0.1, lr=1.0)
    assert learning_rate(config, 0) == pytest.approx(0.1) and learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 99) < 0.02
    row = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert alpaca_text(row).endswith("### Instruction:\nName a color.\n\n### Response:\nBlue.")
    assert "### Input:\nsky" in alpaca_text({**row, "input": "sky"})
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([row] * 3))
    data = healing_data(str(path))
    assert len(data.texts) == 3 and data.favours == ()
    with pytest.raises(ConfigError, match="does not exist"):
        healing_data(str(tmp_path / "missing.jsonl"))
    chunks = pack(tiny_tokenizer(), TEXTS, 16)
    assert chunks.shape[1] == 16 and chunks.dtype == torch.long


def test_boolq_passages_exclude_evaluation_text():

    data = healing_data("boolq-passages")
    assert data.favours == ("boolq",) and len(data.texts) > 500
    evaluation = {d.contexts[0].rsplit("\nQuestion:", 1)[0] for d in load_docs("boolq", "evaluation")}
    assert not evaluation & set(data.texts)
    assert not any("\nQuestion:" in t for t in data.texts[:50])


def test_eval_applies_each_rows_adapter(healed, tiny_dir):
    from pudding.evaluation.zero_shot import EvalConfig, evaluate

    config = EvalConfig(model=tiny_dir, tasks=("piqa",), omissions=((), SETS[0]), limit=3, output_dir=None,
                        progress=False)
    plain = evaluate(config)
    healed_runs = evaluate(EvalConfig(**{**config.__dict__, "adapter": str(healed[0])}))["runs"]
    assert [r["adapter"] for r in healed_runs] == [None, "set-0"]
    assert healed_runs[1]["label"].endswith("+ lora set-0")
    logprobs = [[s["logprobs"] for s in run["samples"]["piqa"]] for run in (plain["runs"][1], healed_runs[1])]
    assert logprobs[0] != logprobs[1]  # the set's adapter changed its scores
    dense = [[s["logprobs"] for s in run["samples"]["piqa"]] for run in (plain["runs"][0], healed_runs[0])]
    assert dense[0] == dense[1]  # the dense row has no per-set adapter: unchanged


def test_cli_heal(tmp_path, corpus, tiny_dir, capsys):
    from pudding.cli import main

    art = _artifact(tmp_path / "art", AutoModelForCausalLM.from_pretrained(tiny_dir), spec=tiny_dir)
    flags = ["--data", corpus, "--steps", "2", "--batch-size", "2", "--seq-length", "24", "--val-chunks", "2",
             "--rank", "2", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(["heal", "--pool", str(art), "--mode", "shared", *flags]) == 0
    out = capsys.readouterr().out
    assert "shared: 2 steps" in out and f"wrote {art / ADAPTERS_DIR}" in out
    assert (art / ADAPTERS_DIR / "shared" / "adapter_model.safetensors").is_file()
    assert main(["heal", "--pool", str(art), "--sets", "9", *flags]) == 2
    assert "out of range" in capsys.readouterr().err


def test_heal_into_another_folder_copies_the_artifact(healed, tiny_dir, tmp_path, corpus):
    art = healed[0]
    out = tmp_path / "copy"
    heal(HealConfig(pool=str(art), out=str(out), data=corpus, sets=(1,), run_dir=str(tmp_path / "run"), **FAST),
         model=_load_tiny(tiny_dir), tokenizer=tiny_tokenizer())
    assert not (art / ADAPTERS_DIR / "set-1").exists()  # the source artifact is left alone
    pudding = PuddingModel.from_pretrained(out, model=_load_tiny(tiny_dir), tokenizer=tiny_tokenizer())
    assert pudding.adapters.adapter_for(SETS[1]) == "set-1" and pudding.adapters.adapter_for(SETS[0]) is None


def test_eval_routed_row_runs_each_document_without_its_own_set_with_its_adapter(healed, tiny_dir):
    from pudding.evaluation.zero_shot import EvalConfig, evaluate

    art = healed[0]
    base = dict(model=tiny_dir, tasks=("piqa", "arc_easy"), limit=4, output_dir=None, progress=False,
                adapter=str(art))
    static = evaluate(EvalConfig(**base, omissions=SETS))["runs"]
    routed = evaluate(EvalConfig(**base, routed=str(art)))["runs"]
    assert len(routed) == 1  # --routed without --omit: the routed row alone
    row = routed[0]
    assert row["omitted"] is None and row["routed"]["k"] == 2 and sum(row["routed"]["sets"].values()) == 8
    expected = {"omit 1,2": "set-0", "omit 3,4": None}  # set 0 alone was healed
    assert row["adapter"] == {label: expected[label] for label in row["adapter"]}
    pudding = PuddingModel.from_pretrained(art, model=_load_tiny(tiny_dir), tokenizer=tiny_tokenizer(),
                                           adapters="none")
    by_set = {tuple(r["omitted"]): r for r in static}
    for task, samples in row["samples"].items():
        docs = load_docs(task, "evaluation", limit=4)
        chosen = [r.blocks for r in pudding.route([d.router_text for d in docs])]
        assert [tuple(s["omitted"]) for s in samples] == chosen
        for sample, blocks in zip(samples, chosen):  # the routed score is that set's static score, adapter included
            reference = next(s for s in by_set[blocks]["samples"][task] if s["doc_id"] == sample["doc_id"])
            assert sample["logprobs"] == pytest.approx(reference["logprobs"], abs=1e-4)


def test_an_interrupted_routed_eval_resumes_from_its_parts(healed, tiny_dir, tmp_path, monkeypatch):
    """Killed after every part was scored but before the result was written: the rerun scores nothing and
    rebuilds the routed row (its set's part) and the static row exactly."""
    import pudding.evaluation.zero_shot as zero_shot
    from pudding.evaluation.zero_shot import EvalConfig, evaluate

    art = healed[0]
    make = lambda out: EvalConfig(model=tiny_dir, tasks=("piqa", "arc_easy"), limit=4, output_dir=str(out),  # noqa: E731
                                  omissions=(SETS[0],), progress=False, adapter=str(art), routed=str(art))
    whole = evaluate(make(tmp_path / "whole"))["runs"]
    write = zero_shot.atomic_write_json

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(zero_shot, "atomic_write_json", killed)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(make(tmp_path / "resumed"))
    monkeypatch.setattr(zero_shot, "atomic_write_json", write)
    monkeypatch.setattr(zero_shot, "score_docs", killed)  # everything must come from the parts
    resumed = evaluate(make(tmp_path / "resumed"))
    routed_sets = dict.fromkeys(tuple(d["omitted"]) for samples in whole[1]["samples"].values() for d in samples)
    assert resumed["resumed_parts"] == ["row-0-piqa", "row-0-arc_easy",
                                        *["routed-" + "-".join(map(str, blocks)) for blocks in routed_sets]]
    for got, want in zip(resumed["runs"], whole, strict=True):
        assert got["samples"] == want["samples"] and got.get("adapter") == want.get("adapter")
        assert {t: s["acc"] for t, s in got["tasks"].items()} == {t: s["acc"] for t, s in want["tasks"].items()}


def test_cli_eval_routed(healed, tiny_dir, tmp_path, capsys):
    from pudding.cli import main

    assert main(["eval", "--model", tiny_dir, "--tasks", "piqa", "--limit", "2", "--routed", str(healed[0]),
                 "--omit", "none", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"| PuDDing ({healed[0]}) | piqa |" in out and "| dense | piqa |" in out
    result = json.loads(next(tmp_path.glob("eval-*.json")).read_text())
    assert [r["label"] for r in result["runs"]] == ["dense", f"PuDDing ({healed[0]})"]


def test_eval_routed_refuses_an_artifact_of_another_model(healed, tmp_path):
    from pudding.evaluation.zero_shot import EvalConfig, evaluate

    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(_load_tiny_config_with_more_blocks(healed[3])).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(ConfigError, match="Refusing to route a different model"):
        evaluate(EvalConfig(model=str(other), tasks=("piqa",), limit=2, output_dir=None, progress=False,
                            routed=str(healed[0])))


def _load_tiny_config_with_more_blocks(model):
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers += 2
    return config
