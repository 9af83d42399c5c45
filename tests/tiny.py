"""Tiny random models of every supported family, for fast CPU tests.

Each config is the smallest that still exercises what the family does differently: sliding-window layers
(gemma2, gemma3, qwen2), grouped-query attention, logit soft-capping (gemma2), a projected OPT decoder,
partial rotary (gpt_neox), learned absolute positions (gpt2, opt).
"""

from __future__ import annotations

import copy
import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

NUM_LAYERS = 6
VOCAB = 320  # room for the tiny byte-level BPE tokenizer below
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=VOCAB)
_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    num_hidden_layers=NUM_LAYERS, max_position_embeddings=128, **_TOKENS,
)
_SLIDING = ["sliding_attention", "full_attention"] * (NUM_LAYERS // 2)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_DECODER),
    "mistral": dict(_DECODER, sliding_window=None),
    "qwen2": dict(_DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=3),
    "qwen3": dict(_DECODER, layer_types=list(_SLIDING), sliding_window=4, use_sliding_window=True),
    "gemma2": dict(_DECODER, sliding_window=4, layer_types=list(_SLIDING), query_pre_attn_scalar=8),
    "gemma3_text": dict(_DECODER, sliding_window=4, layer_types=list(_SLIDING), query_pre_attn_scalar=8),
    "phi3": dict(_DECODER),
    "opt": dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=NUM_LAYERS,
                word_embed_proj_dim=16, max_position_embeddings=128, **_TOKENS),
    "gpt2": dict(n_embd=32, n_head=4, n_layer=NUM_LAYERS, n_positions=128, **_TOKENS),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=NUM_LAYERS,
                     max_position_embeddings=128, **_TOKENS),
}

# Where each family keeps its blocks, written out independently of pudding.core.omit so the parity tests do not
# trust the code under test to find them.
BLOCK_PREFIX = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers",
    "gemma2": "model.layers", "gemma3_text": "model.layers", "phi3": "model.layers",
    "opt": "model.decoder.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
}


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A randomly initialised, eval-mode model of ``model_type`` with NUM_LAYERS blocks, fp32, eager-free."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Random init leaves some norms at exactly 1 and biases at 0; perturb every parameter so that a block
    # which is wrongly skipped or reordered always changes the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


_CORPUS = [
    "Question: Which technology was developed most recently? Answer: cellular telephone",
    "The man turned on the faucet. Water flowed from the spout because the valve opened.",
    "A revolving door is convenient for two direction travel, but it also serves as a security measure.",
    "Sarah was a much better surgeon than Maria so she always got the easier cases.",
    "How do I ready a guinea pig cage for its new occupants? Provide bedding made of paper strips.",
] * 4


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with VOCAB entries, trained offline on a fixed corpus (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


_LLAMA_LIKE = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}
# Each family's output projection per sub-layer, written out here rather than read from pudding.core.omit: zeroing it
# is the reference for skipping that sub-layer (tests/test_subblock.py).
OUTPUT_PROJECTION = {
    **{f: _LLAMA_LIKE for f in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")},
    "gpt2": {"attn": "attn.c_proj", "mlp": "mlp.c_proj"},
    "gpt_neox": {"attn": "attention.dense", "mlp": "mlp.dense_4h_to_h"},
    "opt": {"attn": "self_attn.out_proj", "mlp": "fc2"},
}


def zeroed_reference(model, spec: str):
    """A deep copy of ``model`` whose named sub-layers (or whole blocks) have zero output projections."""
    reference = copy.deepcopy(model)
    table = OUTPUT_PROJECTION[model.config.model_type]
    modules = dict(reference.named_modules())
    for item in spec.split(","):
        block, _, name = item.partition(".")
        for sublayer in ([name] if name else ["attn", "mlp"]):
            projection = modules[f"{BLOCK_PREFIX[model.config.model_type]}.{block}.{table[sublayer]}"]
            with torch.no_grad():
                projection.weight.zero_()
                if getattr(projection, "bias", None) is not None:
                    projection.bias.zero_()
    return reference
