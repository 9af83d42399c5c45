"""`pudding bench` on a tiny artifact: every variant runs, the ratios are computed, bad input is refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pudding.cli import main
from pudding.core.errors import ConfigError
from pudding.core.load import model_fingerprint
from pudding.evaluation.bench import BenchConfig, run_bench
from pudding.pool.artifact import DENSE_SOURCE, CandidatePool, PoolEntry, SetSource
from pudding.routing.model import PuddingModel
from pudding.routing.router import RouterConfig, build_router


def _save_artifact(folder, tiny_dir, sets, depth_in_name=False):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    entries = tuple(PoolEntry(s, (SetSource("greedy", "t", "tl", list(s), [], [], 0.0) if s else DENSE_SOURCE,),
                              depth_in_name=depth_in_name) for s in sets)
    pool = CandidatePool(entries, {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(model.config)})
    torch.manual_seed(0)
    router = build_router(RouterConfig("llm-embed", len(sets), "llm", hidden=8), llm=model, llm_tokenizer=tokenizer)
    PuddingModel(model, tokenizer, pool, router).save_pretrained(folder)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("bench")
    _save_artifact(root / "artifact", tiny_dir, [(1, 2), (3, 4)])
    return root


def test_bench_runs_every_variant_and_reports_ratios(artifact):
    report = run_bench(BenchConfig(model=str(artifact / "artifact"), lengths="16,32", new_tokens=4, repeats=2,
                                   threads=1, cache_dir=str(artifact / "cache"), out=str(artifact / "out")))
    variants = report["variants"]
    assert set(variants) == {"dense", "static", "routed"}
    assert variants["static"]["omitted"] == variants["routed"]["omitted"] and len(variants["routed"]["omitted"]) == 2
    # only the 4 kept blocks of 6 are resident in the routed model, none of the omitted ones
    assert variants["routed"]["resident_weight_bytes"] < variants["dense"]["resident_weight_bytes"]
    assert variants["routed"]["resident_weight_bytes"] == variants["static"]["resident_weight_bytes"]
    # the speed ratios are paired within rounds of one interleaved process, one ratio per round
    assert report["interleaved"]["rounds"] == 2
    assert all(len(report["interleaved"]["prefill_seconds"][v]["16"]) == 2 for v in ("dense", "static", "routed"))
    assert set(report["ratios"]["dense_over_routed_prefill"]) == {"16", "32"}
    assert report["ratios"]["dense_over_routed_prefill"]["16"]["n"] == 2
    assert report["ratios"]["compute_limit"] == pytest.approx(6 / 4)
    assert isinstance(report["ratios"]["measurement_errors"], list)
    assert variants["routed"]["router_seconds"]["median"] > 0 and variants["dense"]["router_seconds"]["median"] == 0
    assert (artifact / "out" / "bench.md").read_text().count("| routed |") == 1


def test_ratios_beyond_their_compute_limit_are_flagged():
    from pudding.evaluation.bench import compute_limit, measurement_errors

    def summary(median):
        return {"median": median, "q1": median, "q3": median, "min": median, "max": median, "n": 1}

    limit = compute_limit(30, 6)
    assert limit == pytest.approx(1.25)
    plausible = {"dense_over_routed_prefill": {"512": summary(1.2)},
                 "dense_over_static_prefill": {"512": summary(1.21)},
                 "routed_model_only_over_static_prefill": {"512": summary(1.01)},
                 "dense_over_routed_decode": summary(1.18)}
    assert measurement_errors(plausible, limit) == []
    # the committed run's 1.45 at 512 tokens, and routed running 0.9x static on identical compute
    drifted = {**plausible, "dense_over_routed_prefill": {"512": summary(1.45)},
               "routed_model_only_over_static_prefill": {"512": summary(0.9)}}
    errors = measurement_errors(drifted, limit)
    assert len(errors) == 2 and "above the compute limit 1.250" in errors[0] and "identical compute" in errors[1]


def test_bench_refuses_bad_input(artifact, capsys):
    with pytest.raises(ConfigError, match="repeats"):
        BenchConfig(repeats=0)
    assert main(["bench", "--model", str(artifact / "artifact"), "--repeats", "0"]) == 2
    assert "repeats" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="exceed the context"):
        run_bench(BenchConfig(model=str(artifact / "artifact"), lengths="200", new_tokens=4, repeats=1, threads=1,
                              cache_dir=str(artifact / "cache"), out=None))


def test_bench_reports_an_oversized_length_as_one_clean_line_before_running(artifact, capsys):
    with pytest.raises(ConfigError) as info:
        run_bench(BenchConfig(model=str(artifact / "artifact"), lengths="16,200", new_tokens=4, repeats=1,
                              threads=1, cache_dir=str(artifact / "cache"), out=None))
    message = str(info.value)
    assert message.startswith("prompt lengths [200] plus 4 new tokens exceed the context (128)"), message
    assert "Traceback" not in message and "File " not in message and "|" not in message
    assert main(["bench", "--model", str(artifact / "artifact"), "--lengths", "200", "--new-tokens", "4",
                 "--cache-dir", str(artifact / "cache"), "--out", str(artifact / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pudding: error: prompt lengths") and len(err.strip().splitlines()) == 1


def test_bench_with_a_tolerance_times_the_depth_it_reaches(artifact, tiny_dir):
    _save_artifact(artifact / "ladder", tiny_dir, [(), (2,), (2, 3), (1, 2, 3)], depth_in_name=True)
    settings = dict(lengths="16", new_tokens=3, repeats=1, threads=1, cache_dir=str(artifact / "cache-ladder"))
    # a tolerance beyond any predicted drop admits the deepest set: k=3 of 6 blocks
    report = run_bench(BenchConfig(model=str(artifact / "ladder"), tolerance=1e6, out=str(artifact / "deep"),
                                   **settings))
    assert report["variants"]["routed"]["omitted"] == report["variants"]["static"]["omitted"] == [1, 2, 3]
    assert report["ratios"]["compute_limit"] == pytest.approx(6 / 3)
    assert "tolerance 1e+06 routes the bench prompt to a set of k=3" in (artifact / "deep" / "bench.md").read_text()
    # tolerance 0 admits no predicted drop from the dense reference: whatever the library routes that prompt to
    from pudding.evaluation.bench import prompt_ids

    pudding = PuddingModel.from_pretrained(artifact / "ladder")
    text = pudding.tokenizer.decode(prompt_ids(pudding.tokenizer, 128)[0])
    [expected] = pudding.route([text], tolerance=0)
    shallow = run_bench(BenchConfig(model=str(artifact / "ladder"), tolerance=0, out=None, **settings))
    assert shallow["variants"]["routed"]["omitted"] == list(expected.blocks)
    assert shallow["variants"]["static"]["omitted"] == list(expected.blocks)


def test_bench_refuses_a_tolerance_the_artifact_cannot_route_before_loading_it(artifact, capsys):
    with pytest.raises(ConfigError, match="depth ladder"):
        run_bench(BenchConfig(model=str(artifact / "artifact"), tolerance=0.1, lengths="16", new_tokens=4, out=None))
    with pytest.raises(ConfigError, match=">= 0"):
        BenchConfig(tolerance=-1.0)
    assert main(["bench", "--model", str(artifact / "artifact"), "--tolerance", "0.1", "--lengths", "16",
                 "--new-tokens", "4"]) == 2
    assert "depth ladder" in capsys.readouterr().err
