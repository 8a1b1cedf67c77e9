"""The sparse draft head as vLLM's proposer sees it: asked at every draft position, answers or says "not mine".

:meth:`SparseDraftHead.sample` returns what ``SpecDecodeBaseProposer._sample_draft_tokens`` returns (draft token
ids, and draft probabilities for probabilistic drafting) for a batch that holds NanoSpec rows, or ``None`` when
the batch is not its to draft (no NanoSpec row, parallel drafting where rows are not requests, soft-capped
logits under probabilistic drafting); the proposer patch then calls vLLM's own method, in the manner of vLLM's
``VocabMapping``. Rows switched off inside a NanoSpec batch are drafted by vLLM's full head in the same call.

Greedy: the argmax over each row's active ids (target-vocabulary ids; EAGLE-3 reduced heads go through a
target -> head-row index built from ``d2t``). Probabilistic: ``[B, V]`` logits equal to the log-softmax over the
active set and ``-inf`` elsewhere go through vLLM's own sampler, so the draft probabilities the rejection sampler
sees are exactly the pruned distribution that was sampled: verification stays exact.

Touches: reads the drafter's ``lm_head`` weight (often shared with the target; never modified) and the runtime's
per-step context. Cost: the sparse head over ``sum(counts)`` rows instead of the full ``[B, V]`` projection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..ops import SparseHeadOutput, row_index_from_d2t, sparse_head

if TYPE_CHECKING:
    from .runtime import NanoSpecRuntime

logger = logging.getLogger("vllm.nanospec")

__all__ = ["HeadBinding", "SparseDraftHead", "bind_head"]


@dataclass
class HeadBinding:
    """The drafter's lm_head as the sparse head sees it (read-only; never modified in place)."""

    weight: torch.Tensor  # [Vw, H]
    row_index: torch.Tensor | None  # target id -> weight row (EAGLE-3 reduced heads)
    scale: float
    soft_cap: float | None
    vocab_size: int  # target vocabulary (logits width)


def bind_head(model: Any, vocab_size: int) -> HeadBinding:
    """Read the drafter model's lm_head (and ``d2t`` map, logits scale, soft cap)."""
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or not hasattr(lm_head, "weight"):
        raise RuntimeError(f"NanoSpec: drafter {type(model).__name__} has no lm_head weight")
    qm = getattr(lm_head, "quant_method", None)
    if qm is not None and "Unquantized" not in type(qm).__name__:
        raise RuntimeError(f"NanoSpec: quantized drafter lm_head ({type(qm).__name__}) is not supported")
    lp = getattr(model, "logits_processor", None)
    org = int(getattr(lm_head, "org_vocab_size", None) or getattr(lp, "org_vocab_size", lm_head.weight.shape[0]))
    weight = lm_head.weight[:org]
    d2t = getattr(model, "draft_id_to_target_id", None)
    row_index = None if d2t is None else row_index_from_d2t(d2t.data[:org], vocab_size)
    logger.info("NanoSpec: drafter head %s rows x %d (%s)%s", weight.shape[0], weight.shape[1], weight.dtype,
                " with a draft->target vocab map" if row_index is not None else "")
    return HeadBinding(weight=weight, row_index=row_index, scale=float(getattr(lp, "scale", 1.0) or 1.0),
                       soft_cap=getattr(lp, "soft_cap", None), vocab_size=vocab_size)


class SparseDraftHead:
    def __init__(self, runtime: NanoSpecRuntime) -> None:
        self.rt = runtime
        self.binding: HeadBinding | None = None

    def _scores(self, h: torch.Tensor, logprobs: bool) -> SparseHeadOutput:
        b, ctx = self.binding, self.rt.ctx
        assert b is not None and ctx is not None and ctx.active is not None
        ids, counts = ctx.active
        if b.scale != 1.0:
            h = h * b.scale
        return sparse_head(h, b.weight, ids, counts, row_index=b.row_index, want_logprobs=logprobs,
                           vocab_size=b.vocab_size, impl=self.rt.impl,
                           dense_fallback_ratio=self.rt.cfg.dense_fallback_ratio)

    def sample(self, proposer: Any, hidden: torch.Tensor, sampling_metadata: Any) -> Any | None:
        """Draft tokens for this position, or ``None`` ("not mine": call vLLM's own head)."""
        rt, ctx = self.rt, self.rt.ctx
        if ctx is None or ctx.plan is None or not ctx.plan.on_rows:
            return None
        plan = ctx.plan
        if hidden.shape[0] != plan.batch_size:
            rt.stats.fallback += 1  # parallel drafting: rows are not requests
            return None
        if self.binding is None:
            self.binding = bind_head(proposer.model, rt.vocab_size)
        greedy = not proposer._enable_probabilistic_draft_probs or sampling_metadata.all_greedy
        if not greedy and self.binding.soft_cap is not None:
            rt.stats.fallback += 1  # soft-capped logits: the pruned softmax needs the raw scores
            return None
        on = ctx.on_idx
        if ctx.active is None:  # first draft position: the sets do not change until the next verification
            ctx.active = rt.pool.active(ctx.slots[on])
            rt.stats.record_sizes(ctx.active[1])
        if greedy:
            return self._greedy(proposer, hidden), None
        return self._probabilistic(proposer, hidden, sampling_metadata)

    def _greedy(self, proposer: Any, hidden: torch.Tensor) -> torch.Tensor:
        ctx = self.rt.ctx
        on, plan = ctx.on_idx, ctx.plan
        tok = self._scores(hidden[on], logprobs=False).token_ids
        if bool((tok < 0).any()):  # a row with no draftable id (e.g. none in an EAGLE-3 draft vocab)
            tok = torch.where(tok < 0, proposer._greedy_sample(hidden[on]), tok)
        if not plan.off_rows:
            return tok
        res = torch.empty(plan.batch_size, dtype=torch.int64, device=hidden.device)
        res[on] = tok
        res[ctx.off_idx] = proposer._greedy_sample(hidden[ctx.off_idx]).long()
        return res

    def _probabilistic(self, proposer: Any, hidden: torch.Tensor, sampling_metadata: Any) -> Any:
        ctx = self.rt.ctx
        on, plan, vocab = ctx.on_idx, ctx.plan, self.binding.vocab_size
        out = self._scores(hidden[on], logprobs=True)
        logits = torch.full((plan.batch_size, vocab), float("-inf"), dtype=torch.float32, device=hidden.device)
        logits[on] = out.logprobs  # log-softmax over the active set; a per-row shift of the scores
        empty = out.token_ids < 0
        if bool(empty.any()):  # no draftable id in the set: that row samples from the full head
            logits[on[empty]] = proposer.model.compute_logits(hidden[on[empty]]).float()
        if plan.off_rows:
            logits[ctx.off_idx] = proposer.model.compute_logits(hidden[ctx.off_idx]).float()
        return proposer._sample_from_logits(logits, sampling_metadata)
