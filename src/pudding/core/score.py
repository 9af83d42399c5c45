"""Batched log-likelihoods of continuations given contexts.

Every later stage (evaluation, candidate search, router labels) asks the same question many times: what is
log p(continuation | context) under the model, possibly with blocks omitted. This module answers it fast:

- requests are tokenised exactly as lm-evaluation-harness does (``_encode_pair``: trailing spaces of the
  context move to the continuation; the continuation's ids are the whole string's ids past the context's);
- requests that share a context (the choices of one question) run the context **once** when that saves
  work: its KV cache is built in one batched forward, then copied to each choice's row for a second
  forward over the choices;
  continuations of one token need no second forward at all;
- requests without a shared context are packed, left-padded, into token-budgeted batches;
- the LM head runs only on the continuation positions (``logits_to_keep``), never on the whole context,
  which matters when the vocabulary is large (49k for SmolLM2, 128k for Llama-3).

:func:`score_one_by_one` is the plain one-request-at-a-time loop that the batched scorer is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pudding.core.load import context_length
from pudding.core.omit import get_architecture
from pudding.core.tasks import MCDoc


@dataclass(frozen=True)
class Request:
    """One continuation to score after one context (both plain text, the continuation with its delimiter)."""

    context: str
    continuation: str


@dataclass(frozen=True)
class ChoiceScore:
    """The model's verdict on one request.

    Attributes:
        logprob: sum over the continuation's tokens of log p(token | everything before it).
        n_tokens: number of continuation tokens scored.
        n_bytes: UTF-8 byte length of the continuation text.
        n_chars: character length of the continuation text, delimiter included (acc_norm divides by the
            answer option's length instead: :attr:`pudding.core.metrics.DocScores.choice_chars`).
        is_greedy: whether every continuation token was the model's argmax.
    """

    logprob: float
    n_tokens: int
    n_bytes: int
    n_chars: int
    is_greedy: bool

    @property
    def mean_logprob(self) -> float:
        """Mean per-token log-likelihood: the paper's task-likelihood for the gold answer."""
        return self.logprob / self.n_tokens


@dataclass(frozen=True)
class PackedBatch:
    """Left-padded, whole-sequence requests ready for one forward pass (see :meth:`LikelihoodScorer.pack`).

    Attributes:
        indices: positions of the rows in the request list that was packed.
        input_ids, attention_mask, position_ids: (rows, width) tensors.
        targets: per row, the continuation token ids; they are the last tokens of the row's sequence.
        requests: per row, the request (for its text lengths).
    """

    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: list[torch.Tensor]
    requests: list[Request]

    @property
    def keep(self) -> int:
        """How many final positions need logits: the longest continuation."""
        return max(len(t) for t in self.targets)


@dataclass(frozen=True)
class _Encoded:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


def encode_request(tokenizer, request: Request, add_bos: bool = False) -> _Encoded:
    """Token ids of a request, exactly as lm-evaluation-harness's ``HFLM._encode_pair`` builds them."""
    context, continuation = request.context, request.continuation
    if not continuation:
        raise ValueError("cannot score an empty continuation")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False) if context else []
    continuation_ids = whole[len(context_ids):]
    if add_bos or not context_ids:
        # lm-eval scores an empty context after a prefix token, and prepends BOS for families that need it.
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        context_ids = [prefix] + context_ids
    if not continuation_ids:
        raise ValueError(f"continuation {request.continuation!r} tokenises to nothing after its context")
    return _Encoded(tuple(context_ids), tuple(continuation_ids))


def _make_score(request: Request, logprobs: torch.Tensor, greedy: torch.Tensor) -> ChoiceScore:
    text = request.continuation
    return ChoiceScore(
        logprob=float(logprobs.sum()),
        n_tokens=int(logprobs.numel()),
        n_bytes=len(text.encode("utf-8")),
        n_chars=len(text),
        is_greedy=bool(greedy.all()),
    )


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``targets`` under ``logits`` (..., V), in fp32, and whether each was the argmax."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logprobs, logits.argmax(dim=-1) == targets


def _model_max_length(model) -> int:
    return context_length(model) or 2048


class LikelihoodScorer:
    """Batched continuation log-likelihoods for one model and tokenizer.

    Args:
        model: a causal LM in eval mode; it may be inside ``omit_blocks``.
        tokenizer: its tokenizer.
        max_batch_tokens: padded tokens per forward pass; bounds memory (activations and the kept logits).
        share_context: run a context shared by several requests once (disable only to measure its effect).
        add_bos: prepend BOS to every context; defaults to lm-eval's per-family choice (True for Gemma).
        max_length: truncate longer requests from the left to this many tokens (default: the model's context).

    Example::

        scorer = LikelihoodScorer(model, tokenizer)
        scores = scorer.score([Request("Question: 2+2?\\nAnswer:", " 4"), Request("Question: 2+2?\\nAnswer:", " 5")])
        scores[0].logprob  # summed log p(" 4" | context)
    """

    def __init__(self, model, tokenizer, *, max_batch_tokens: int = 512, share_context: bool = True,
                 add_bos: bool | None = None, max_length: int | None = None):
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.share_context = share_context
        self.add_bos = get_architecture(model.config).add_bos_token if add_bos is None else add_bos
        # Longer requests keep their last max_length tokens (lm-eval's left truncation).
        self.max_length = min(max_length or _model_max_length(model), _model_max_length(model))

    @property
    def _pad_id(self) -> int:
        # Padded positions are always masked out, so any valid id will do when the tokenizer has none.
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, requests: Sequence[Request], *, progress: bool | str = False) -> list[ChoiceScore]:
        """Score every request; the result is in the order of ``requests``.

        ``progress`` shows a progress bar (its description if a string).
        """
        encoded = [encode_request(self.tokenizer, r, self.add_bos) for r in requests]
        shared, packed = self._split_by_shared_context(encoded)
        results: list[ChoiceScore | None] = [None] * len(requests)
        desc = progress if isinstance(progress, str) else "scoring"
        with torch.inference_mode(), tqdm(total=len(requests), unit="req", desc=desc, disable=not progress) as bar:
            for groups in self._shared_batches(shared, encoded):
                for index, score in self._run_shared(groups, encoded, requests):
                    results[index] = score
                    bar.update()
            for batch in self._packed_batches(packed, encoded):
                for index, score in self._run_packed(batch, encoded, requests):
                    results[index] = score
                    bar.update()
        return results  # type: ignore[return-value]

    # --- planning -------------------------------------------------------------------------------------------

    def _split_by_shared_context(self, encoded: list[_Encoded]) -> tuple[list[list[int]], list[int]]:
        """Groups of request indices with identical context ids (size >= 2), and the remaining singles."""
        by_context: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(encoded):
            by_context.setdefault(item.context, []).append(index)
        shared, packed = [], []
        for context, members in by_context.items():
            if self.share_context and self._sharing_pays(context, [encoded[i] for i in members]):
                shared.append(members)
            else:
                packed.extend(members)
        return shared, packed

    def _sharing_pays(self, context: tuple[int, ...], members: list[_Encoded]) -> bool:
        """Share a context only when that saves more tokens than padding the choices to one length costs.

        Sharing saves (n-1) context passes, but the second pass pads every choice to the longest one; for
        short questions with long, uneven answers (PIQA) packing whole sequences is cheaper.
        """
        lengths = [len(m.continuation) for m in members]
        if len(members) < 2 or len(context) + max(lengths) > self.max_length:
            return False
        saved = (len(members) - 1) * len(context)
        padding = len(members) * max(lengths) - sum(lengths)
        # The second forward and the cache copies cost about two average continuations more (measured on
        # SmolLM2 over ARC, PIQA, HellaSwag and BoolQ); below that margin packing was as fast or faster.
        second_pass_overhead = 2 * sum(lengths) // len(members)
        return saved > padding + second_pass_overhead

    def _shared_batches(self, groups: list[list[int]], encoded: list[_Encoded]) -> Iterator[list[list[int]]]:
        # Longest contexts first, so each batch pads little and memory peaks early, where it is visible.
        groups = sorted(groups, key=lambda g: -len(encoded[g[0]].context))
        batch: list[list[int]] = []
        for group in groups:
            candidate = batch + [group]
            if batch and self._shared_cost(candidate, encoded) > self.max_batch_tokens:
                yield batch
                candidate = [group]
            batch = candidate
        if batch:
            yield batch

    @staticmethod
    def _shared_cost(groups: list[list[int]], encoded: list[_Encoded]) -> int:
        context_len = max(len(encoded[g[0]].context) for g in groups)
        rows = sum(len(g) for g in groups)
        continuation_len = max(len(encoded[i].continuation) for g in groups for i in g)
        return len(groups) * context_len + rows * (context_len + continuation_len)

    def _packed_batches(self, indices: list[int], encoded: list[_Encoded]) -> Iterator[list[int]]:
        length = {i: min(len(encoded[i].context) + len(encoded[i].continuation) - 1, self.max_length) for i in indices}
        batch: list[int] = []
        for index in sorted(indices, key=lambda i: -length[i]):
            if batch and (len(batch) + 1) * length[batch[0]] > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

    # --- execution ------------------------------------------------------------------------------------------

    def _left_pad(self, rows: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(rows):
            if tokens:
                ids[row, width - len(tokens):] = torch.tensor(tokens)
                mask[row, width - len(tokens):] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        # Left padding must not shift positions: count only real tokens (pads get position 0, never used).
        return (mask.cumsum(-1) - 1).clamp(min=0)

    def _run_packed(self, batch: list[int], encoded: list[_Encoded], requests: Sequence[Request]):
        yield from zip(batch, self.score_packed(self._make_packed(batch, encoded, requests)))

    def _make_packed(self, batch: list[int], encoded: list[_Encoded], requests: Sequence[Request]) -> PackedBatch:
        # As lm-eval: keep the last max_length+1 tokens, feed all but the last, score the continuation.
        wholes = [(encoded[i].context + encoded[i].continuation)[-(self.max_length + 1):] for i in batch]
        # A continuation longer than the window itself is scored on its last max_length tokens only.
        cont_lens = [min(len(encoded[i].continuation), len(w) - 1) for i, w in zip(batch, wholes)]
        ids, mask = self._left_pad([w[:-1] for w in wholes])
        targets = [torch.tensor(w[-n:], device=ids.device) for w, n in zip(wholes, cont_lens)]
        return PackedBatch(batch, ids, mask, self._positions(mask), targets, [requests[i] for i in batch])

    def pack(self, requests: Sequence[Request]) -> list[PackedBatch]:
        """Tokenise and pad ``requests`` into packed batches, without context sharing.

        Callers that score the *same* requests under many omission sets (the candidate search) pack once and
        call :meth:`score_packed` per set; identical batches also make cached hidden states reusable.
        """
        encoded = [encode_request(self.tokenizer, r, self.add_bos) for r in requests]
        return [self._make_packed(b, encoded, requests)
                for b in self._packed_batches(list(range(len(requests))), encoded)]

    def score_packed(self, batch: PackedBatch) -> list[ChoiceScore]:
        """Scores of one packed batch's rows, in row order."""
        with torch.inference_mode():
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, use_cache=False, logits_to_keep=batch.keep).logits
        scores = []
        for row, (targets, request) in enumerate(zip(batch.targets, batch.requests)):
            logprobs, greedy = _token_logprobs(logits[row, batch.keep - len(targets):], targets)
            scores.append(_make_score(request, logprobs, greedy))
        return scores

    def _run_shared(self, groups: list[list[int]], encoded: list[_Encoded], requests: Sequence[Request]):
        contexts = [encoded[g[0]].context for g in groups]
        ids, mask = self._left_pad(contexts)
        needs_cache = any(len(encoded[i].continuation) > 1 for g in groups for i in g)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=self._positions(mask),
                         use_cache=needs_cache, logits_to_keep=1)
        first_logits = out.logits[:, -1]
        rows = [i for g in groups for i in g]
        group_of_row = torch.tensor([n for n, g in enumerate(groups) for _ in g], device=ids.device)
        rest_logits = self._continuation_logits(out, mask, rows, group_of_row, encoded) if needs_cache else None
        for row, index in enumerate(rows):
            targets = torch.tensor(encoded[index].continuation, device=ids.device)
            logits = first_logits[group_of_row[row]].unsqueeze(0)
            if len(targets) > 1:
                logits = torch.cat([logits, rest_logits[row, : len(targets) - 1]])
            logprobs, greedy = _token_logprobs(logits, targets)
            yield index, _make_score(requests[index], logprobs, greedy)

    def _continuation_logits(self, context_out, context_mask, rows, group_of_row, encoded) -> torch.Tensor:
        """Logits at continuation positions 0..n-2 (predicting tokens 1..n-1), every row reusing its context's
        cache."""
        cache = context_out.cache if hasattr(context_out, "cache") else context_out.past_key_values
        cache.batch_select_indices(group_of_row)  # one copy of the context's K/V per choice
        inputs = [encoded[i].continuation[:-1] for i in rows]
        width = max(len(x) for x in inputs)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        cont_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(inputs):  # right-padded: padding after a row's tokens is never attended to
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            cont_mask[row, : len(tokens)] = 1
        ids, cont_mask = ids.to(context_mask.device), cont_mask.to(context_mask.device)
        row_context_mask = context_mask[group_of_row]
        positions = row_context_mask.sum(-1, keepdim=True) + torch.arange(width, device=ids.device)
        return self.model(input_ids=ids, attention_mask=torch.cat([row_context_mask, cont_mask], dim=1),
                          position_ids=positions, cache=cache, use_cache=True).logits


def score_one_by_one(model, tokenizer, requests: Sequence[Request], add_bos: bool | None = None) -> list[ChoiceScore]:
    """The naive reference: one forward per request, full logits, no batching or sharing.

    Slow by design; it exists so tests and benchmarks can check the batched scorer against it.
    """
    add_bos = get_architecture(model.config).add_bos_token if add_bos is None else add_bos
    results = []
    with torch.inference_mode():
        for request in requests:
            encoded = encode_request(tokenizer, request, add_bos)
            whole = torch.tensor([encoded.context + encoded.continuation], device=next(model.parameters()).device)
            logits = model(input_ids=whole[:, :-1]).logits[0]
            n = len(encoded.continuation)
            logprobs, greedy = _token_logprobs(logits[-n:], whole[0, -n:])
            results.append(_make_score(request, logprobs, greedy))
    return results


def doc_requests(doc: MCDoc) -> list[Request]:
    """One scoring request per choice of ``doc``."""
    return [Request(c, x) for c, x in zip(doc.contexts, doc.continuations)]
