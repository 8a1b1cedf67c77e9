"""The drafter's lm_head as the sparse head reads it (no vLLM imports; vLLM's objects are duck-typed).

:func:`bind_head` reads a drafter model's ``lm_head`` (weight, real rows ``org_vocab_size``), an EAGLE-3 head's
``draft_id_to_target_id`` map (-> ``row_index``, target id -> head row), the logits processor's scale and soft cap,
and, for a vocab-parallel head (``tp_size > 1``, beside :mod:`.tp` which scores it), this rank's shard and the
group's all-gather. Refuses a quantized lm_head. Runs once per engine; reads the weight, never modifies it. Every
attribute read here on a vLLM object is listed in :mod:`nanospec_vllm.vllm.patches.reads`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import row_index_from_d2t
from .tp import AllGather, VocabShard, shard_row_index

logger = logging.getLogger("vllm.nanospec")

__all__ = ["HeadBinding", "bind_head"]


@dataclass
class HeadBinding:
    """The drafter's lm_head as the sparse head sees it (read-only; never modified in place)."""

    weight: torch.Tensor  # [Vw, H]
    row_index: torch.Tensor | None  # target id -> weight row (EAGLE-3 reduced heads)
    scale: float
    soft_cap: float | None
    vocab_size: int  # target vocabulary (logits width)
    # tensor parallelism (vocab-parallel head, see _bind_shard): weight is this rank's shard, row_index the global
    # target id -> head row map (never None then), local_row_index target id -> local row (-1 = another rank's)
    shard: VocabShard | None = None
    local_row_index: torch.Tensor | None = None
    all_gather: AllGather | None = None


def bind_head(model: Any, vocab_size: int, tp_group: Callable[[], Any] | None = None) -> HeadBinding:
    """Read the drafter model's lm_head (and ``d2t`` map, logits scale, soft cap). ``tp_group``: returns the
    tensor-parallel group to all-gather over when the sharded lm_head does not name its own (vLLM's
    ``get_tp_group``; only called for a vocab-parallel head)."""
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
    binding = HeadBinding(weight=weight, row_index=row_index, scale=float(getattr(lp, "scale", 1.0) or 1.0),
                          soft_cap=getattr(lp, "soft_cap", None), vocab_size=vocab_size)
    return _bind_shard(binding, lm_head, org, tp_group)


def _bind_shard(b: HeadBinding, lm_head: Any, org: int, tp_group: Callable[[], Any] | None) -> HeadBinding:
    """A vocab-parallel head (vLLM's ``ParallelLMHead`` / ``VocabParallelEmbedding`` with ``tp_size > 1``): keep
    this rank's real rows only, make ``row_index`` the global target id -> head row map (identical on every
    rank), build the local map (``4 * V`` bytes, once) and the group's all-gather. Unchanged when not sharded."""
    tp = int(getattr(lm_head, "tp_size", 1) or 1)
    if tp <= 1:
        return b
    si = lm_head.shard_indices
    shard = VocabShard(int(si.org_vocab_start_index), int(si.org_vocab_end_index), int(lm_head.tp_rank), tp)
    dev = b.weight.device
    if b.row_index is None:
        ids = torch.arange(b.vocab_size, dtype=torch.int32, device=dev)
        b.row_index = torch.where(ids < org, ids, torch.full_like(ids, -1))
    b.weight = lm_head.weight[: shard.num_rows]
    b.shard = shard
    b.local_row_index = shard_row_index(b.vocab_size, shard, b.row_index, dev)
    group = getattr(lm_head, "parallel_group", None)
    if group is None:
        if tp_group is None:
            raise RuntimeError("NanoSpec: a vocab-parallel drafter head without a process group to gather over")
        group = tp_group()
    b.all_gather = lambda t: group.all_gather(t.unsqueeze(0), dim=0)
    logger.info("NanoSpec: vocab-parallel head, rank %d/%d holds ids [%d, %d)", shard.rank, tp, shard.start, shard.end)
    return b
