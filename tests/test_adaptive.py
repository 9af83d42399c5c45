"""Adaptive depth: the depth ladder, the tolerance rule, its CLI and server surface, and the curve."""

from __future__ import annotations

import json
import random

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from pudding.cli import main
from pudding.core.errors import ConfigError
from pudding.core.load import model_fingerprint
from pudding.pool.artifact import DENSE_SOURCE, CandidatePool, PoolEntry, SetSource, ladder_pool
from pudding.pool.evaluator import CandidateEvaluator
from pudding.pruning.candidates import PoolConfig, build_pool
from pudding.routing.adaptive import (
    TOLERANCE_HEADER,
    adaptive_curve,
    check_adaptive,
    check_tolerance,
    choose_by_tolerance,
    combine_labels,
    mixture_of,
    save_labels,
)
from pudding.routing.model import PuddingModel
from pudding.routing.router import RouterConfig, build_router
from pudding.serving.server import ServeSettings, create_app

from tiny import tiny_model, tiny_tokenizer

# --- the choice rule on fixed predictions ------------------------------------------------------------------

DEPTHS = [0, 3, 3, 6, 6]


@pytest.mark.parametrize("row, tolerance, expected", [
    ([0.0, -0.1, -0.3, -0.2, -0.6], 0.25, 3),   # both k=3 sets fit, one k=6 set fits: the deepest wins
    ([0.0, -0.1, -0.3, -0.2, -0.6], 0.15, 1),   # no k=6 set fits: the best-fitting k=3
    ([0.0, -0.1, -0.3, -0.2, -0.6], 0.0, 0),    # tolerance 0: nothing below the dense prediction
    ([0.0, 0.2, -0.3, -0.2, -0.6], 0.0, 1),     # a set predicted above the reference drops nothing: it fits
    ([0.0, -0.1, -0.3, -0.2, -0.1], 0.25, 4),   # ties among the deepest: the best predicted score
    ([0.0, -0.1, -0.3, -0.2, -0.2], 0.25, 3),   # equal scores among the deepest: the first
    ([0.0, -0.1, -0.3, -0.2, -0.6], 1e9, 3),    # huge tolerance: the best of the deepest
    ([0.0, -0.1, -0.3, -0.2, -0.6], -1.0, 0),   # nothing fits (only a negative tolerance can): fewest blocks
])
def test_choice_rule_with_a_dense_reference(row, tolerance, expected):
    assert choose_by_tolerance(torch.tensor([row]), DEPTHS, tolerance).tolist() == [expected]


def test_choice_rule_without_dense_uses_the_best_set_at_the_smallest_k():
    depths = [3, 3, 6, 9]
    scores = torch.tensor([[-1.0, -0.5, -0.7, -0.9],   # reference -0.5 (set 1)
                           [-0.2, -0.5, -0.1, -2.0]])  # reference -0.2; the k=6 set is above it
    assert choose_by_tolerance(scores, depths, 0.0).tolist() == [1, 2]
    assert choose_by_tolerance(scores, depths, 0.25).tolist() == [2, 2]
    assert choose_by_tolerance(scores, depths, 0.4).tolist() == [3, 2]
    assert choose_by_tolerance(scores, depths, -0.2).tolist() == [1, 0]  # nothing fits: best at k=3


def _brute_force(row: list[float], depths: list[int], tolerance: float, available: list[int] | None = None) -> int:
    available = list(range(len(row))) if available is None else available
    shallow = min(depths)
    reference = max(s for s, d in zip(row, depths) if d == shallow)  # over every set, served or not
    fits = [i for i in available if reference - row[i] <= tolerance]
    if not fits:
        fewest = min(depths[i] for i in available)
        return max((i for i in available if depths[i] == fewest), key=lambda i: (row[i], -i))
    deepest = max(depths[i] for i in fits)
    return max((i for i in fits if depths[i] == deepest), key=lambda i: (row[i], -i))


@pytest.mark.parametrize("restricted", [False, True], ids=["every set", "some sets available"])
def test_choice_rule_matches_a_loop_on_random_predictions_with_ties(restricted):
    rng = random.Random(0)
    for _ in range(200):
        depths = [rng.choice([0, 3, 6, 9]) for _ in range(rng.randint(2, 7))]
        rows = [[round(rng.uniform(-1, 0.2), 1) for _ in depths] for _ in range(5)]  # rounded: many ties
        tolerance = rng.choice([0.0, 0.1, 0.3, 2.0, -0.2])
        available = sorted(rng.sample(range(len(depths)), rng.randint(1, len(depths)))) if restricted else None
        got = choose_by_tolerance(torch.tensor(rows, dtype=torch.float64), depths, tolerance, available).tolist()
        assert got == [_brute_force(r, depths, tolerance, available) for r in rows], (rows, depths, tolerance)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "0.5", True, None])
def test_bad_tolerances_are_refused(value):
    with pytest.raises(ConfigError, match="tolerance"):
        check_tolerance(value)


def test_tolerance_needs_a_ladder_and_a_score_predicting_router():
    assert check_tolerance(0) == 0.0 and check_tolerance(2) == 2.0
    check_adaptive([0, 3, 6], "mse")
    with pytest.raises(ConfigError, match="depth ladder"):
        check_adaptive([6, 6, 6], "mse")
    with pytest.raises(ConfigError, match="loss mse"):
        check_adaptive([3, 6], "ce")


# --- the depth ladder ---------------------------------------------------------------------------------------

FINGERPRINT = {"model_type": "llama", "num_blocks": 12, "config_sha256": "x"}


def _searched_pool(k: int = 6) -> tuple[CandidatePool, CandidatePool]:
    orders = {"a": [5, 3, 8, 1, 2, 7, 9, 4], "b": [5, 3, 9, 10, 2, 6, 1, 4]}
    found = [(tuple(sorted(o[:k])), SetSource("greedy", t, "tl", o[:k], [float(i) for i in range(k + 1)], [], 1.0))
             for t, o in orders.items()]
    pool = CandidatePool(tuple(PoolEntry(b, (s,)) for b, s in found), {"name": "m", "fingerprint": FINGERPRINT},
                         {"k": k, "barriers": [1, 1]})
    importance = [float((7 * b) % 10) for b in range(1, 11)]  # one score per removable block 1..10
    shortgpt = SetSource("shortgpt", None, None, [], importance, [], 1.0)
    sleb = SetSource("sleb", None, "ppl", [2, 9, 4, 6, 8, 1, 3, 5][:k], [0.0] * (k + 1), [], 1.0)
    baselines = CandidatePool((PoolEntry(tuple(sorted(sleb.removal_order)), (sleb,)), PoolEntry((1,), (shortgpt,))),
                              pool.model, {"k": k, "barriers": [1, 1]})
    return pool, baselines


def test_ladder_sets_are_prefixes_of_one_search_and_baselines_at_the_same_k(tmp_path):
    pool, baselines = _searched_pool()
    ladder = ladder_pool([pool, baselines], (6, 0, 3))
    assert ladder.config["ladder"]["depths"] == [0, 3, 6] and ladder.config["k"] is None
    assert [e.k for e in ladder.sets] == sorted(e.k for e in ladder.sets) and ladder.sets[0].blocks == ()
    by_source: dict[str, dict[int, tuple]] = {}
    for entry in ladder.sets:
        for source in entry.sources:
            by_source.setdefault(source.task or source.method, {})[entry.k] = entry.blocks
    # a and b share their first two removals, so at k=3 they differ only by their third block
    assert by_source["a"] == {3: (3, 5, 8), 6: (1, 2, 3, 5, 7, 8)} and by_source["b"][3] == (3, 5, 9)
    for name in ("a", "b", "sleb"):
        assert set(by_source[name][3]) < set(by_source[name][6])  # nested: one search's prefixes
    # a one-shot ranking gives its k least important blocks at every k (importance 7b mod 10 of blocks 1..10)
    assert by_source["shortgpt"] == {3: (3, 6, 10), 6: (2, 3, 5, 6, 9, 10)}
    assert len({e.name for e in ladder.sets}) == len(ladder.sets)
    assert {e.name for e in ladder.sets} >= {"dense", "a-tl-k3", "a-tl-k6", "sleb-ppl-k3", "shortgpt-k3"}
    [shared] = [e for e in ladder.sets if e.blocks == by_source["b"][6]]  # b and ShortGPT agree at k=6: one entry
    assert [s.task or s.method for s in shared.sources] == ["b", "shortgpt"] and shared.name == "b-tl-k6"
    ladder.save_pretrained(tmp_path / "ladder")
    loaded = CandidatePool.from_pretrained(tmp_path / "ladder")
    assert loaded.sets == ladder.sets and [e.name for e in loaded.sets] == [e.name for e in ladder.sets]
    pool.save_pretrained(tmp_path / "plain")  # a pool without a ladder keeps its names
    assert [e.name for e in CandidatePool.from_pretrained(tmp_path / "plain").sets] == ["a-tl", "b-tl"]


def test_ladder_refuses_short_searches_other_models_and_ladders():
    pool, baselines = _searched_pool(k=6)
    with pytest.raises(ConfigError, match="stopped at k=6.*pudding candidates --k 9"):
        ladder_pool([pool], (3, 9))
    with pytest.raises(ConfigError, match="pudding baselines --k 9"):
        ladder_pool([baselines], (3, 9))
    other = CandidatePool(pool.sets, {"fingerprint": {**FINGERPRINT, "num_blocks": 30}}, pool.config)
    with pytest.raises(ConfigError, match="different models"):
        ladder_pool([pool, other], (3,))
    with pytest.raises(ConfigError, match="not from another ladder"):
        ladder_pool([ladder_pool([pool], (3, 6))], (3,))
    with pytest.raises(ConfigError, match="integers >= 0"):
        ladder_pool([pool], (-1, 3))


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """A tiny llama with 8 blocks (6 removable), deep enough for k=4."""
    folder = tmp_path_factory.mktemp("tiny-llama-8")
    tiny_model("llama", num_hidden_layers=8).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_extending_a_search_reuses_its_checkpoint(deep_dir, tmp_path, monkeypatch):
    evaluated = []
    original = CandidateEvaluator.evaluate

    def counting(self, omissions):
        evaluated.extend(omissions)
        return original(self, omissions)

    monkeypatch.setattr(CandidateEvaluator, "evaluate", counting)
    config = dict(model=deep_dir, tasks=("piqa",), objectives=("tl",), samples=3, progress=False)
    short = build_pool(PoolConfig(**config, k=2, run_dir=str(tmp_path / "run"), out=str(tmp_path / "k2")))
    assert len(evaluated) == 1 + 6 + 5  # dense, then 6 and 5 candidates
    evaluated.clear()
    extended = build_pool(PoolConfig(**config, k=4, run_dir=str(tmp_path / "run"), out=str(tmp_path / "k4")))
    assert len(evaluated) == 4 + 3 and all(len(o) >= 3 for o in evaluated)  # only steps 3 and 4 ran
    fresh = build_pool(PoolConfig(**config, k=4, run_dir=str(tmp_path / "fresh"), out=str(tmp_path / "f4")))
    [source] = extended.sets[0].sources
    assert source.removal_order == fresh.sets[0].sources[0].removal_order
    assert source.removal_order[:2] == short.sets[0].sources[0].removal_order
    ladder = ladder_pool([extended], (2, 4))
    assert [e.blocks for e in ladder.sets] == [short.sets[0].blocks, extended.sets[0].blocks]


def test_ladder_cli(tmp_path, capsys):
    pool, baselines = _searched_pool()
    pool.save_pretrained(tmp_path / "pool")
    baselines.save_pretrained(tmp_path / "baselines")
    status = main(["ladder", "--pool", str(tmp_path / "pool"), "--pool", str(tmp_path / "baselines"),
                   "--depths", "0,3,6", "--out", str(tmp_path / "ladder")])
    assert status == 0 and "wrote" in capsys.readouterr().out
    assert sorted({e.k for e in CandidatePool.from_pretrained(tmp_path / "ladder").sets}) == [0, 3, 6]
    status = main(["ladder", "--pool", str(tmp_path / "pool"), "--depths", "3,x", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert status == 2 and "--depths must be comma-separated integers" in err and len(err.splitlines()) == 1
    status = main(["ladder", "--pool", str(tmp_path / "pool"), "--depths", "3,9", "--out", str(tmp_path / "x")])
    assert status == 2 and "extend it" in capsys.readouterr().err


# --- the routed model, CLI and server -----------------------------------------------------------------------

LADDER = [((), "dense"), ((2,), "a"), ((3,), "b"), ((2, 3), "c"), ((1, 4), "d"), ((1, 2, 3), "e")]
PREDICTIONS = {  # fixed router outputs per prompt, one per LADDER set
    "The man turned on the faucet.": [0.0, -0.05, -0.3, -0.2, -0.5, -1.0],  # 0.25 -> (2, 3), k=2
    "Sarah was a much better surgeon": [0.0, -0.01, -0.02, -0.9, -0.9, -0.1],  # 0.25 -> (1, 2, 3), k=3
    "A revolving door is": [0.0, -0.5, -0.1, -0.5, -0.6, -0.7],  # 0.25 -> (3,), k=1
}
EXPECTED = {prompt: blocks for prompt, blocks in zip(PREDICTIONS, [(2, 3), (1, 2, 3), (3,)])}


def _pudding(tiny_dir, sets, loss="mse"):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    entries = tuple(PoolEntry(b, (SetSource("greedy", t, "tl", list(b), [], [], 0.0) if b else DENSE_SOURCE,),
                              depth_in_name=True) for b, t in sets)
    pool = CandidatePool(entries, {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(model.config)},
                         {"ladder": {}})
    torch.manual_seed(3)
    router = build_router(RouterConfig("llm-embed", len(sets), "llm", hidden=8, loss=loss), llm=model,
                          llm_tokenizer=tokenizer)
    return PuddingModel(model, tokenizer, pool, router)


@pytest.fixture(scope="module")
def ladder(tiny_dir):
    return _pudding(tiny_dir, LADDER)


@pytest.fixture(scope="module")
def flat(tiny_dir):
    return _pudding(tiny_dir, [((1, 2), "a"), ((2, 3), "b"), ((3, 4), "c")])


@pytest.fixture
def fixed(ladder, monkeypatch):
    """The ladder model with the router's predictions fixed per prompt."""
    monkeypatch.setattr(ladder.router, "scores", lambda texts, batch_size=64: torch.tensor(
        [PREDICTIONS[t] for t in texts]))
    return ladder


def test_route_picks_the_deepest_set_within_the_tolerance(fixed):
    routes = fixed.route(list(PREDICTIONS), tolerance=0.25)
    assert [r.blocks for r in routes] == list(EXPECTED.values()) and {r.tolerance for r in routes} == {0.25}
    assert [r.blocks for r in fixed.route(list(PREDICTIONS), tolerance=0)] == [(), (), ()]
    assert [len(r.blocks) for r in fixed.route(list(PREDICTIONS), tolerance=100)] == [3, 3, 3]
    assert [r.tolerance for r in fixed.route(list(PREDICTIONS))] == [None] * 3  # plain argmax routing


def test_a_batch_of_different_depths_gives_what_each_gives_alone(fixed):
    prompts = list(PREDICTIONS)
    together = fixed.generate(prompts, tolerance=0.25, max_new_tokens=6)
    assert len({len(g.route.blocks) for g in together}) == 3
    for prompt, out in zip(prompts, together):
        [alone] = fixed.generate([prompt], tolerance=0.25, max_new_tokens=6)
        direct, _ = fixed.generate_with([prompt], EXPECTED[prompt], max_new_tokens=6, do_sample=False)
        assert out.route.blocks == EXPECTED[prompt] and out.text == alone.text == direct[0]


def test_tolerance_errors_in_the_library(ladder, flat, tiny_dir):
    with pytest.raises(ConfigError, match="depth ladder"):
        flat.route(["The man turned on the faucet."], tolerance=0.1)
    with pytest.raises(ConfigError, match="finite number >= 0"):
        ladder.route(["The man turned on the faucet."], tolerance=-1)
    with pytest.raises(ConfigError, match="loss mse"):
        _pudding(tiny_dir, LADDER, loss="ce").route(["A revolving door is"], tolerance=0.1)


def _status(argv: list[str]) -> int:
    """main's exit status, also for an argparse refusal (which exits before main's own handling)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def test_route_and_generate_cli_with_tolerance(ladder, flat, tmp_path, capsys):
    ladder.save_pretrained(tmp_path / "ladder")
    flat.save_pretrained(tmp_path / "flat")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PREDICTIONS) + "\n")
    assert main(["route", "--model", str(tmp_path / "ladder"), "--file", str(prompts), "--tolerance", "0.3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for line in lines:
        index = choose_by_tolerance(torch.tensor([line["scores"]]), [len(b) for b, _ in LADDER], 0.3).item()
        assert line["blocks"] == list(LADDER[index][0]) and line["k"] == len(line["blocks"])
        assert line["tolerance"] == 0.3
    for argv, message in [
        (["route", "--model", str(tmp_path / "flat"), "--file", str(prompts), "--tolerance", "0.3"], "depth ladder"),
        (["route", "--model", str(tmp_path / "ladder"), "--file", str(prompts), "--tolerance", "-1"], ">= 0"),
        (["route", "--model", str(tmp_path / "ladder"), "--file", str(prompts), "--tolerance", "lots"], "number"),
        (["generate", "--model", str(tmp_path / "flat"), "--tolerance", "0.3", "A revolving door is"], "depth ladder"),
        (["generate", "--model", str(tmp_path / "ladder"), "--tolerance", "nan", "A door"], "finite"),
    ]:
        assert _status(argv) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]  # (stderr also has the load bars)
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert main(["generate", "--model", str(tmp_path / "ladder"), "--tolerance", "0.3", "--max-new-tokens", "3",
                 "A revolving door is"]) == 0
    assert "within tolerance 0.3" in capsys.readouterr().out


def test_server_routes_by_tolerance_reports_it_and_batches_by_set(fixed):
    prompts = list(PREDICTIONS)
    with TestClient(create_app(fixed, ServeSettings(max_tokens_limit=16))) as client:
        before = client.get("/health").json()["batches"]
        response = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 5, "temperature": 0,
                                                          "tolerance": 0.25})
        assert response.status_code == 200, response.text
        info = response.json()["pudding"]
        assert [tuple(i["blocks"]) for i in info] == list(EXPECTED.values())
        assert all(i["tolerance"] == 0.25 and i["k"] == len(i["blocks"]) for i in info)
        assert response.headers[TOLERANCE_HEADER] == "0.25"
        assert client.get("/health").json()["batches"] - before == 3  # one batch per chosen set
        for prompt, choice in zip(prompts, response.json()["choices"]):
            [alone] = fixed.generate([prompt], tolerance=0.25, max_new_tokens=5)
            assert choice["text"] == alone.text
        # two prompts that chose the same set share one batch
        before = client.get("/health").json()["batches"]
        same = client.post("/v1/completions", json={"prompt": prompts[:2], "max_tokens": 3, "temperature": 0,
                                                    "tolerance": 100})
        assert same.status_code == 200 and client.get("/health").json()["batches"] - before == 1
        plain = client.post("/v1/completions", json={"prompt": prompts[0], "max_tokens": 3, "temperature": 0})
        assert "tolerance" not in plain.json()["pudding"] and TOLERANCE_HEADER not in plain.headers


@pytest.mark.parametrize("tolerance", [-0.5, "0.5", True, [0.1], None])
def test_server_refuses_bad_tolerances_with_400(ladder, tolerance):
    with TestClient(create_app(ladder)) as client:
        body = {"prompt": "A revolving door is", "max_tokens": 2}
        response = client.post("/v1/completions", json={**body, "tolerance": tolerance})
        if tolerance is None:  # an explicit null is no tolerance
            assert response.status_code == 200
            return
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "tolerance"


def test_server_refuses_tolerance_without_a_ladder_or_with_a_fixed_set(flat, ladder):
    body = {"prompt": "A revolving door is", "max_tokens": 2, "tolerance": 0.1}
    with TestClient(create_app(flat)) as client:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 400 and "depth ladder" in response.json()["error"]["message"]
    with TestClient(create_app(ladder, ServeSettings(force_set=1))) as client:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 400 and "one fixed set" in response.json()["error"]["message"]


def test_gateway_routes_by_tolerance_among_the_served_sets(fixed, flat):
    from test_serve import _Server

    from pudding.serving.gateway import create_gateway

    served = [0, 2, 3]  # dense, (3,) and (2, 3); not (2,), (1, 4) or (1, 2, 3)
    servers = {i: _Server(create_app(fixed, ServeSettings(force_set=i))) for i in served}
    urls = {i: server.__enter__() for i, server in servers.items()}
    try:
        with TestClient(create_gateway(fixed, urls)) as gateway, TestClient(create_app(fixed)) as direct:
            for prompt, scores in PREDICTIONS.items():
                request = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
                response = gateway.post("/v1/completions", json={**request, "tolerance": 0.25})
                assert response.status_code == 200, response.text  # the backend never saw the field
                expected = _brute_force(scores, [len(b) for b, _ in LADDER], 0.25, served)
                info = response.json()["pudding"]
                assert info["set_index"] == expected and info["tolerance"] == 0.25 and info["k"] == len(info["blocks"])
                assert response.headers[TOLERANCE_HEADER] == "0.25"
                # the same text as `pudding serve` forced to that set
                forced = TestClient(create_app(fixed, ServeSettings(force_set=expected)))
                with forced:
                    assert response.json()["choices"] == forced.post("/v1/completions", json=request).json()["choices"]
            # "Sarah ..." goes to (1, 2, 3) from `pudding serve`, which has no backend here: (3,) is the deepest
            # served set within the tolerance, measured from the same dense reference
            sarah = {"prompt": "Sarah was a much better surgeon", "max_tokens": 2, "tolerance": 0.25}
            assert direct.post("/v1/completions", json=sarah).json()["pudding"]["blocks"] == [1, 2, 3]
            assert gateway.post("/v1/completions", json=sarah).json()["pudding"]["blocks"] == [3]
            plain = gateway.post("/v1/completions", json={"prompt": "A revolving door is", "max_tokens": 2})
            assert plain.status_code == 200 and TOLERANCE_HEADER not in plain.headers
            assert "tolerance" not in plain.json()["pudding"]
            bad = gateway.post("/v1/completions", json={**sarah, "tolerance": -1})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "tolerance"
        with TestClient(create_gateway(flat, {0: "http://127.0.0.1:9"})) as gateway:
            refused = gateway.post("/v1/completions", json={"prompt": "A door", "tolerance": 0.1})
            assert refused.status_code == 400 and "depth ladder" in refused.json()["error"]["message"]
    finally:
        for server in servers.values():
            server.__exit__()


# --- the measurement ----------------------------------------------------------------------------------------


def test_curve_on_synthetic_scores_matches_hand_computation():
    scores = torch.tensor([[0.0, -0.1, -0.4, -0.3], [0.0, -0.5, -0.6, -0.05],
                           [0.0, -0.2, -0.1, -0.9], [0.0, -0.7, -0.8, -0.9]])
    correct = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 1, 1, 0], [0, 0, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    curve = adaptive_curve(scores, [0, 3, 3, 6], correct, [0, 1, 2, 3], ["a", "a", "b", "b"],
                           {"sleb": {3: 4, 6: 3}}, dense=0, points=50)
    assert curve["dense"]["accuracy"] == pytest.approx(0.75)
    first, last = curve["adaptive"][0], curve["adaptive"][-1]
    assert first["tolerance"] == 0 and first["mean_k"] == 0 and first["accuracy"] == pytest.approx(0.75)
    assert last["mean_k"] == 6 and last["accuracy"] == pytest.approx(0.25)
    mean_ks = [p["mean_k"] for p in curve["adaptive"]]
    assert mean_ks == sorted(mean_ks)
    assert curve["static"]["sleb"] == [{"k": 3, "mean_k": 3.0, "accuracy": 0.25, "accuracy_per_document": 0.25},
                                       {"k": 6, "mean_k": 6.0, "accuracy": 0.25, "accuracy_per_document": 0.25}]
    # fixed k=3: the router's best k=3 set per document is columns 1, 1, 2, 1
    assert curve["fixed"][0] == {"k": 3, "mean_k": 3.0, "accuracy": 0.75, "accuracy_per_document": 0.75}
    matched = {(m["row"], m["k"]): m for m in curve["matched"]}
    # mean k reaches 3 first at tolerance 0.1 (choices 1, 3, 2, 0: skip 3, 6, 3, 0), right on every document
    at3 = matched[("sleb", 3)]
    assert at3["tolerance"] == pytest.approx(0.1) and at3["adaptive_mean_k"] == 3 and at3["adaptive_accuracy"] == 1
    assert at3["difference"] == pytest.approx(0.75) and at3["n"] == 4
    assert at3["ci95"] == pytest.approx([0.75 - 1.96 * 0.25, 0.75 + 1.96 * 0.25])
    at6 = matched[("sleb", 6)]
    assert at6["tolerance"] == pytest.approx(0.9) and at6["difference"] == 0
    assert matched[("PuDDing, fixed k", 3)]["difference"] == pytest.approx(0.25)


def test_curve_reports_a_k_no_tolerance_reaches():
    scores = torch.tensor([[0.0, -0.1], [0.0, -0.2]])
    correct = torch.ones(2, 3, dtype=torch.float64)
    curve = adaptive_curve(scores, [0, 3], correct, [0, 1], ["a", "a"], {"sleb": {3: 1, 9: 2}})
    reasons = {m["k"]: m.get("reason") for m in curve["matched"] if m["row"] == "sleb"}
    assert reasons == {3: None, 9: "no tolerance reaches this mean k"} and "dense" not in curve


def _label_artifact(folder, sets, doc_ids, offset):
    import datasets

    from pudding.routing.labels import Labels, _features

    n = len(doc_ids)
    table = datasets.Dataset.from_dict({
        "task": ["piqa"] * n, "doc_id": doc_ids, "router_text": [f"q{d}" for d in doc_ids], "gold": [0] * n,
        "choice_tokens": [[2, 2]] * n, "choice_chars": [[3, 3]] * n,
        "choice_logprob": [[[offset + j, -1.0] for j in range(len(sets))] for _ in doc_ids],
        "label": [[offset + j for j in range(len(sets))] for _ in doc_ids]}, features=_features())
    return save_labels(Labels(table, {"sets": [list(s) for s in sets], "pool": "x"}), folder)


def test_combine_labels_takes_each_set_from_the_first_folder_that_scored_it(tmp_path):
    first = _label_artifact(tmp_path / "k3", [(), (1, 2, 3)], ["d1", "d2"], 0.0)
    second = _label_artifact(tmp_path / "k6", [(1, 2, 3), (1, 2, 3, 4, 5, 6)], ["d1", "d2"], 10.0)
    entries = tuple(PoolEntry(b, (DENSE_SOURCE,)) for b in [(1, 2, 3, 4, 5, 6), (), (1, 2, 3)])
    pool = CandidatePool(entries, {"fingerprint": FINGERPRINT})
    combined = combine_labels([first, second], pool)
    assert combined.meta["sets"] == [[1, 2, 3, 4, 5, 6], [], [1, 2, 3]]
    assert list(combined.table["label"]) == [[11.0, 0.0, 1.0]] * 2
    combined.check_pool(pool)
    other = _label_artifact(tmp_path / "other", [(4,)], ["d1", "d3"], 0.0)
    with pytest.raises(ConfigError, match="other documents"):
        combine_labels([first, other], pool)
    with pytest.raises(ConfigError, match="in none of"):
        combine_labels([first], pool)


def test_curve_script_end_to_end_on_a_tiny_model(ladder, tiny_dir, tmp_path, capsys):
    import sys
    from pathlib import Path

    from pudding.routing.labels import LabelConfig, Labels, build_labels
    from pudding.routing.train import routing_data, split_rows

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import adaptive_curve

    ladder.save_pretrained(tmp_path / "artifact")
    sleb = SetSource("sleb", None, "ppl", [3, 1, 2], [0.0] * 4, [], 0.0)
    shortgpt = SetSource("shortgpt", None, None, [4], [0.4, 0.3, 0.2, 0.1], [], 0.0)  # blocks 1..4
    baselines = CandidatePool((PoolEntry((1, 2, 3), (sleb,)), PoolEntry((4,), (shortgpt,))), ladder.pool.model,
                              {"k": 3, "barriers": [1, 1]})
    baselines.save_pretrained(tmp_path / "baselines")
    scoring = ladder_pool([baselines], (0, 1, 2, 3))
    wanted = {e.blocks for e in scoring.sets} | {e.blocks for e in ladder.pool.sets}
    scoring = CandidatePool(tuple(PoolEntry(b, (DENSE_SOURCE,)) for b in sorted(wanted, key=len)), ladder.pool.model)
    scoring.save_pretrained(tmp_path / "scoring")
    build_labels(LabelConfig(pool=str(tmp_path / "scoring"), out=str(tmp_path / "scores"), tasks=("piqa", "arc_easy"),
                             samples=3, split="evaluation", run_dir=str(tmp_path / "run"), progress=False))
    status = adaptive_curve.main(["--artifact", str(tmp_path / "artifact"), "--scores", str(tmp_path / "scores"),
                                  "--baselines", str(tmp_path / "baselines"), "--methods", "sleb,shortgpt",
                                  "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert status == 0 and "paired difference" in printed
    assert (tmp_path / "out" / "adaptive-curve.md").read_text().strip() in printed
    saved = json.loads((tmp_path / "out" / "adaptive-curve.json").read_text())
    curve = saved["curve"]
    assert saved["provenance"]["git"]["commit"] and curve["documents"] == 6 and curve["depths"] == [0, 1, 2, 3]
    assert [p["k"] for p in curve["static"]["sleb"]] == [1, 2, 3] and "dense" in curve
    mean_ks = [p["mean_k"] for p in curve["adaptive"]]
    assert curve["adaptive"][0]["tolerance"] == 0 and mean_ks == sorted(mean_ks) and mean_ks[-1] == 3
    assert {m["row"] for m in curve["matched"]} == {"sleb", "shortgpt", "PuDDing, fixed k"}
    assert (tmp_path / "out" / "adaptive-curve.png").stat().st_size > 10_000
    status = adaptive_curve.main(["--artifact", str(tmp_path / "artifact"), "--scores", str(tmp_path / "scores"),
                                  "--baselines", str(tmp_path / "baselines"), "--methods", "taylor",
                                  "--out", str(tmp_path / "x")])
    assert status == 2 and "no ['taylor']" in capsys.readouterr().err
    # --held-out: only the prompts the router's validation split holds out (here, of an untrained router, refused;
    # then with a recorded fraction, exactly the split's rows)
    args = ["--artifact", str(tmp_path / "artifact"), "--scores", str(tmp_path / "scores"), "--baselines",
            str(tmp_path / "baselines"), "--methods", "sleb", "--held-out", "--out", str(tmp_path / "held")]
    assert adaptive_curve.main(args) == 2 and "no validation fraction" in capsys.readouterr().err
    config = json.loads((tmp_path / "artifact" / "pudding.json").read_text())
    config["training"] = {"config": {"val_fraction": 0.5}}
    (tmp_path / "artifact" / "pudding.json").write_text(json.dumps(config))
    texts = routing_data(Labels.load(tmp_path / "scores")).texts
    held = adaptive_curve.held_out_rows(str(tmp_path / "artifact"), texts)
    assert held == split_rows(texts, 0.5)[1] and 0 < len(held) < len(texts)
    assert adaptive_curve.main(args) == 0 and "held out from the router's training" in capsys.readouterr().out
    held_curve = json.loads((tmp_path / "held" / "adaptive-curve.json").read_text())
    assert held_curve["held_out"] and held_curve["curve"]["documents"] == len(held)


def test_a_static_row_mixed_to_a_mean_k_is_the_line_between_its_neighbouring_depths():
    right_at = {0: torch.tensor([1.0, 1.0]), 3: torch.tensor([1.0, 0.0]), 6: torch.tensor([0.0, 0.0])}
    assert mixture_of(right_at, 3.0).tolist() == [1.0, 0.0]
    assert mixture_of(right_at, 1.5).tolist() == [1.0, 0.5]
    assert mixture_of(right_at, 5.0).tolist() == pytest.approx([1 / 3, 0.0])
    assert mixture_of(right_at, 6.5) is None and mixture_of({3: right_at[3]}, 1.0) is None


def test_curve_compares_each_adaptive_point_with_each_row_mixed_to_its_mean_k():
    scores = torch.tensor([[0.0, -0.1, -0.4, -0.3], [0.0, -0.5, -0.6, -0.05],
                           [0.0, -0.2, -0.1, -0.9], [0.0, -0.7, -0.8, -0.9]])
    correct = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 1, 1, 0], [0, 0, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    curve = adaptive_curve(scores, [0, 3, 3, 6], correct, [0, 1, 2, 3], ["a", "a", "b", "b"],
                           {"sleb": {3: 4, 6: 3}}, dense=0, points=50)
    sleb = {m["tolerance"]: m for m in curve["versus_mixture"] if m["row"] == "sleb"}
    # tolerance 0.05 sends document 1 to column 3 (k=6): mean k 1.5, halfway between dense and SLEB at k=3.
    # adaptive is right on documents 0, 1, 3; the mixture on each is (dense + SLEB k=3) / 2 = 1, .5, 0, .5
    point = next(m for t, m in sleb.items() if t == pytest.approx(0.05))
    assert point["mean_k"] == 1.5
    assert point["difference"] == pytest.approx(((1 - 1) + (1 - 0.5) + (0 - 0) + (1 - 0.5)) / 4)
    assert point["adaptive_accuracy"] == pytest.approx(0.75) and point["row_accuracy"] == pytest.approx(0.5)
    assert {m["row"] for m in curve["versus_mixture"]} == {"sleb", "PuDDing, fixed k"}
