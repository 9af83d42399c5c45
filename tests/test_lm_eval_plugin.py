"""The lm-eval ``pudding`` model gives the same accuracies as ``pudding eval`` on the same documents."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

lm_eval = pytest.importorskip("lm_eval")

from pudding.core.load import model_fingerprint  # noqa: E402
from pudding.core.metrics import acc, acc_norm  # noqa: E402
from pudding.core.omit import omit_blocks  # noqa: E402
from pudding.core.score import LikelihoodScorer  # noqa: E402
from pudding.core.tasks import load_docs  # noqa: E402
from pudding.evaluation.lm_eval_plugin import LOCAL_TASKS, PuddingLM, write_local_tasks  # noqa: E402
from pudding.evaluation.zero_shot import EvalConfig, evaluate, score_docs  # noqa: E402
from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource  # noqa: E402
from pudding.routing.model import PuddingModel  # noqa: E402
from pudding.routing.router import RouterConfig, build_router  # noqa: E402

SETS = [(1, 2), (2, 3), (3, 4)]
TASKS = ("piqa", "arc_easy")
LIMIT = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("lm-eval")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    entries = tuple(PoolEntry(s, (SetSource("greedy", "t", "tl", list(s), [], [], 0.0),)) for s in SETS)
    pool = CandidatePool(entries, {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(model.config)})
    torch.manual_seed(5)
    router = build_router(RouterConfig("llm-embed", len(SETS), "llm", hidden=8), llm=model, llm_tokenizer=tokenizer)
    PuddingModel(model, tokenizer, pool, router).save_pretrained(root / "artifact")
    docs = {t: load_docs(t, "evaluation", limit=LIMIT) for t in TASKS}
    for task, task_docs in docs.items():
        # The same documents as `pudding eval`, as an lm-eval task: context, choices without the delimiter.
        rows = [{"context": d.contexts[0], "choices": [c[1:] for c in d.continuations], "gold": d.gold}
                for d in task_docs]
        (root / f"{task}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (root / f"pudding_test_{task}.yaml").write_text(
            f"task: pudding_test_{task}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {root / f'{task}.jsonl'}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
            "doc_to_choice: choices\ndoc_to_target: gold\ntarget_delimiter: ' '\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return root, model, tokenizer, docs


def _run_lm_eval(root, lm, samples=False):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=[f"pudding_test_{t}" for t in TASKS],
                                  task_manager=TaskManager(include_path=str(root)), log_samples=samples)
    results = {t: out["results"][f"pudding_test_{t}"] for t in TASKS}
    if not samples:
        return results
    logprobs = {t: {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in out["samples"][f"pudding_test_{t}"]}
                for t in TASKS}
    return results, logprobs


@pytest.mark.parametrize("omit", ["none", "1;3"])
def test_static_and_dense_match_pudding_eval(setup, omit):
    root, model, tokenizer, _ = setup
    lm = PuddingLM(pretrained=str(root / "artifact"), omit=omit, model=model, tokenizer=tokenizer)
    theirs, their_logprobs = _run_lm_eval(root, lm, samples=True)
    ours = evaluate(EvalConfig(model="unused", tasks=",".join(TASKS), omissions=("" if omit == "none" else "1,3",),
                               limit=LIMIT, output_dir=None, progress=False, save_samples=True),
                    model=model, tokenizer=tokenizer)
    for task in TASKS:
        our_logprobs = [d["logprobs"] for d in ours["runs"][0]["samples"][task]]
        for i, expected in enumerate(our_logprobs):
            assert their_logprobs[task][i] == pytest.approx(expected, abs=1e-4)
        for metric in ("acc", "acc_norm"):
            assert theirs[task][f"{metric},none"] == pytest.approx(ours["runs"][0]["tasks"][task][metric]["value"])


def test_routed_model_routes_once_per_document_on_the_context(setup):
    root, model, tokenizer, docs = setup
    lm = PuddingLM(pretrained=str(root / "artifact"), model=model, tokenizer=tokenizer)
    theirs = _run_lm_eval(root, lm)
    scorer = LikelihoodScorer(model, tokenizer)
    for task in TASKS:
        routes = lm.pudding.route([d.contexts[0] for d in docs[task]])
        scored = []
        for doc, route in zip(docs[task], routes):
            with omit_blocks(model, route.blocks):
                scored.extend(score_docs(scorer, [doc]))
        assert theirs[task]["acc,none"] == pytest.approx(sum(map(acc, scored)) / len(scored))
        assert theirs[task]["acc_norm,none"] == pytest.approx(sum(map(acc_norm, scored)) / len(scored))
    assert sum(lm.chosen.values()) == sum(len(d) for d in docs.values())


def test_local_task_yamls_load_in_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    names = write_local_tasks(tmp_path)
    assert len(names) == len(LOCAL_TASKS)
    tasks = lm_eval.tasks.get_task_dict(["piqa_local", "boolq_local"], TaskManager(include_path=str(tmp_path)))
    piqa = tasks["piqa_local"]
    doc = next(iter(piqa.validation_docs()))
    assert piqa.doc_to_text(doc).startswith("Question: ")
    boolq = tasks["boolq_local"]
    assert boolq.doc_to_target(next(iter(boolq.validation_docs()))) in (0, 1)


@pytest.mark.parametrize("task", ["hellaswag", "arc_challenge"])
def test_acc_norm_matches_lm_evals_own_process_results_on_real_documents(tmp_path, task):
    """lm-eval divides by len(choice), not len(" " + choice): one character that flips real cells."""
    import random

    from lm_eval.tasks import TaskManager

    from pudding.core.metrics import DocScores
    from pudding.core.score import ChoiceScore

    write_local_tasks(tmp_path)
    theirs = lm_eval.tasks.get_task_dict([f"{task}_local"], TaskManager(include_path=str(tmp_path)))[f"{task}_local"]
    ours = {(d.contexts[0], tuple(d.continuations)): d for d in load_docs(task, "calibration")}
    rng, compared, flips = random.Random(0), 0, 0
    for their_doc in list(theirs.validation_docs())[:300]:
        choices = theirs.doc_to_choice(their_doc)
        doc = ours.get((theirs.doc_to_text(their_doc), tuple(" " + c for c in choices)))
        if doc is None:  # in our evaluation split, or dropped as a duplicate
            continue
        # Log-likelihoods near -1 per character, so the choice length decides the normalised argmax.
        lls = [-len(c) * (1 + rng.uniform(-0.05, 0.05)) for c in choices]
        expected = theirs.process_results(their_doc, [(ll, False) for ll in lls])["acc_norm"]
        scored = DocScores(doc.doc_id, doc.gold, tuple(ChoiceScore(ll, 1, len(x), len(x), False)
                                                          for ll, x in zip(lls, doc.continuations)), doc.choice_chars)
        assert acc_norm(scored) == expected, doc.doc_id
        with_delimiter = [ll / len(" " + c) for ll, c in zip(lls, choices)]
        flips += float(max(range(len(choices)), key=lambda i: (with_delimiter[i], -i)) == doc.gold) != expected
        compared += 1
    assert compared >= 100
    assert flips > 0, "no document where counting the delimiter changes acc_norm: the test could not fail"


def test_a_mistyped_model_arg_is_refused_and_lm_evals_own_arguments_are_accepted(setup):
    from pudding.core.errors import ConfigError

    root, model, tokenizer, _ = setup
    with pytest.raises(ConfigError, match=r"unknown pudding model_args \['omitt'\]"):
        PuddingLM.create_from_arg_string(f"pretrained={root / 'artifact'},omitt=1;3",
                                         {"model": model, "tokenizer": tokenizer})
    lm = PuddingLM.create_from_arg_string(f"pretrained={root / 'artifact'},omit=1;3",
                                          {"model": model, "tokenizer": tokenizer, "batch_size": 8,
                                           "max_batch_size": None, "device": "cpu"})
    assert lm.static == (1, 3)
