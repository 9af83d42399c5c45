"""Only kept blocks are resident: a lazily loaded, routed model holds exactly its kept blocks' bytes."""

import pytest
import torch

from pudding.core.errors import ConfigError
from pudding.core.lazy import BlockStore, build_lazy_model, resident_bytes, write_cache
from pudding.core.omit import get_blocks, omit_blocks

from tiny import tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8]])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "opt"])
def test_lazy_model_matches_and_holds_only_kept_blocks(family, tmp_path):
    dense = tiny_model(family)
    block_bytes = [resident_bytes(b) for b in get_blocks(dense)]
    non_block = resident_bytes(dense) - sum(block_bytes)  # parameters() counts tied weights once
    write_cache(dense, tmp_path)
    lazy = build_lazy_model(tmp_path)
    store = BlockStore(lazy, tmp_path)
    assert resident_bytes(lazy) == non_block
    for omitted in [(1, 2), (2, 4), (1, 2)]:
        kept = [i for i in range(6) if i not in omitted]
        switch = store.ensure(kept)
        with torch.no_grad(), omit_blocks(dense, omitted):
            expected = dense(IDS).logits
        with torch.no_grad(), omit_blocks(lazy, omitted):
            assert torch.allclose(lazy(IDS).logits, expected, atol=1e-5)
        blocks_resident = sum(resident_bytes(b) for b in get_blocks(lazy))
        assert blocks_resident == sum(block_bytes[i] for i in kept)
        assert store.resident_block_bytes() == blocks_resident
        assert resident_bytes(lazy) == non_block + blocks_resident
    assert switch.loaded == (4,) and switch.dropped == (1,)  # (2, 4) -> (1, 2): only the difference moves


def test_budget_keeps_recent_blocks_and_refuses_less_than_one_block(tmp_path):
    dense = tiny_model("llama")
    write_cache(dense, tmp_path)
    lazy = build_lazy_model(tmp_path)
    one = resident_bytes(get_blocks(dense)[0])
    with pytest.raises(ConfigError, match="cannot hold one block"):
        BlockStore(lazy, tmp_path, budget_bytes=one - 1)
    store = BlockStore(lazy, tmp_path, budget_bytes=6 * one)
    store.ensure([0, 3, 5])
    switch = store.ensure([0, 1, 5])
    assert switch.dropped == () and set(store.resident) == {0, 1, 3, 5}
    assert store.ensure([0, 3, 5]).loaded == ()


def test_pudding_model_with_a_block_store_generates_the_same(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pudding.core.load import model_fingerprint
    from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource
    from pudding.routing.model import PuddingModel, Route
    from pudding.routing.router import RouterConfig, build_router

    dense = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    sets = [(1, 2), (3, 4)]
    entries = tuple(PoolEntry(s, (SetSource("greedy", "t", "tl", list(s), [], [], 0.0),)) for s in sets)
    pool = CandidatePool(entries, {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(dense.config)})
    router = build_router(RouterConfig("llm-embed", 2, "llm", hidden=8), llm=dense, llm_tokenizer=tokenizer)
    write_cache(dense, tmp_path)
    lazy = build_lazy_model(tmp_path)
    reference = PuddingModel(dense, tokenizer, pool, router)
    routed = PuddingModel(lazy, tokenizer, pool, router)
    routed.use_block_store(BlockStore(lazy, tmp_path))
    routes = [Route(0, sets[0], "a", []), Route(1, sets[1], "b", [])]
    prompts = ["The man turned on the faucet.", "A revolving door is"]
    for route in routes:
        want = reference.generate(prompts, routes=[route, route], max_new_tokens=5)
        got = routed.generate(prompts, routes=[route, route], max_new_tokens=5)
        assert [g.text for g in got] == [w.text for w in want]
        kept = [i for i in range(6) if i not in route.blocks]
        assert (sum(resident_bytes(b) for b in get_blocks(lazy))
                == sum(resident_bytes(get_blocks(dense)[i]) for i in kept))
