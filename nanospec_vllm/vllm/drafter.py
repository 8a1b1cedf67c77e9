"""Where the slot pool, the sparse head and vLLM's V1 runner meet (one object per model runner).

:class:`NanoSpecRuntime` is created lazily in the worker the first time the runner updates its states, only when
the engine's ``additional_config`` carries a ``nanospec`` block (put there by the config patch). It is driven by
the runner patches in :mod:`.patches.patch_gpu_model_runner` and the proposer patch in
:mod:`.patches.patch_llm_base_proposer`; the walk of one engine step is:

1. ``_update_states``: finished and preempted requests release their slot (before vLLM's own update); new
   requests are seeded from their prompt ids (+ their stop/EOS ids), resumed ones from prompt + output so far.
   A request whose ``extra_args["nanospec"]`` is false gets no slot and drafts with the full head.
2. ``_sample`` (target verification): the target's top-k ids of every logits row are taken before vLLM samples
   (one ``topk`` over logits that exist anyway; no extra projection).
3. ``propose_draft_token_ids``: before drafting, each NanoSpec row adds the tokens the target emitted this step
   and the top-k at the verified positions (rows after the first rejection are skipped), and coverage is counted
   (was each emitted token at a drafted position active when drafted?). Then the batch's row -> slot map is set.
4. ``_sample_draft_tokens`` (every draft position): NanoSpec rows are scored by the sparse head over their active
   ids; other rows use vLLM's full head in the same batch. Probabilistic drafting samples from the softmax over
   the active set laid out over the full vocabulary (0 elsewhere), which the rejection sampler needs to stay exact.
5. ``sample_tokens`` returns: the step's statistics ride on the ``ModelRunnerOutput`` to the scheduler.

Host synchronisations added on CUDA: draining the statistics once per step (next to the one vLLM already makes
for the sampled tokens) and, per draft position, one check for rows whose set holds no draftable id (possible
only with an EAGLE-3 reduced draft vocabulary; removing it is on the CUDA-graph list). Cost per step: one ``[rows, V]`` top-k, one ``extend`` (a few small kernels),
and the sparse head instead of the dense one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..config import NanoSpecConfig, parse_config
from ..ops import SparseHeadOutput, resolve_impl, row_index_from_d2t, sparse_head
from ..state import ActiveVocabPool, PoolFullError
from .metrics import StepStats

logger = logging.getLogger("vllm.nanospec")

__all__ = ["NanoSpecRuntime", "get_runtime", "parse_switch", "request_enabled"]

SUPPORTED_METHODS = ("draft_model", "eagle", "eagle3")
_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


def parse_switch(value: Any) -> bool:
    """The per-request ``nanospec`` switch: bool, 0/1, or one of true/false/on/off/yes/no. Raises ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"nanospec must be 0 or 1 (or true/false), got {value!r}")


def request_enabled(sampling_params: Any, default: bool) -> bool:
    extra = getattr(sampling_params, "extra_args", None) or {}
    if "nanospec" not in extra:
        return default
    try:
        return parse_switch(extra["nanospec"])
    except ValueError:  # already rejected in the front end; never crash a worker on it
        return default


@dataclass
class HeadBinding:
    """The drafter's lm_head as the sparse head sees it (read-only; never modified in place)."""

    weight: torch.Tensor  # [Vw, H]
    row_index: torch.Tensor | None  # target id -> weight row (EAGLE-3 reduced heads)
    scale: float
    soft_cap: float | None
    vocab_size: int  # target vocabulary (logits width)


@dataclass
class BatchContext:
    slots: torch.Tensor  # [B] int64 slot per batch row, -1 = full head
    on_rows: list[int]
    off_rows: list[int]
    batch_size: int
    on_idx: torch.Tensor  # [len(on_rows)] int64, built once per step
    off_idx: torch.Tensor  # [len(off_rows)] int64
    active: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, counts) of on rows, read once per propose


def _as_padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """``list[list[int]]`` (vLLM's unpadded sampled/draft ids) -> ``[B, W]`` int64 padded with -1."""
    width = max((len(x) for x in rows), default=0) or 1
    return torch.tensor([x + [-1] * (width - len(x)) for x in rows], dtype=torch.int64, device=device)


def get_runtime(obj: Any) -> NanoSpecRuntime | None:
    return getattr(obj, "_nanospec_runtime", None)


class NanoSpecRuntime:
    def __init__(self, runner: Any, cfg: NanoSpecConfig) -> None:
        spec = runner.speculative_config
        method = getattr(spec, "method", None)
        if method not in SUPPORTED_METHODS:
            raise RuntimeError(
                f"NanoSpec supports speculative methods {SUPPORTED_METHODS}; this engine uses {method!r}. "
                "Remove the `nanospec` block or change `method`."
            )
        if getattr(spec, "use_heterogeneous_vocab", False):
            raise RuntimeError("NanoSpec does not support `use_heterogeneous_vocab` draft models yet")
        tp = runner.parallel_config.tensor_parallel_size
        if tp != 1:
            raise RuntimeError(
                f"NanoSpec does not support tensor_parallel_size={tp} yet (vocab-sharded heads are planned); "
                "run with tensor_parallel_size=1 or remove the `nanospec` block."
            )
        self.cfg = cfg
        self.device = torch.device(runner.device)
        self.vocab_size = int(runner.model_config.get_vocab_size())
        pinned = self._pinned_ids(runner) | set(cfg.always_active_ids) | set(cfg.hot_set())
        pinned = {i for i in pinned if 0 <= i < self.vocab_size}
        num_slots = int(runner.scheduler_config.max_num_seqs)
        self.pool = ActiveVocabPool(num_slots, self.vocab_size, cfg.capacity, self.device, sorted(pinned),
                                    cfg.full_policy)
        self.impl = resolve_impl(cfg.kernel, self.device)
        self.stats = StepStats(self.device)
        self.head: HeadBinding | None = None
        self.ctx: BatchContext | None = None
        self.topk: torch.Tensor | None = None  # [logits rows, k] from the last verification
        logger.info(
            "NanoSpec active: method=%s capacity=%d slots=%d pinned=%d policy=%s kernel=%s pool=%.1f MiB",
            method, cfg.capacity, num_slots, len(pinned), cfg.full_policy, self.impl, self.pool.nbytes / 2**20,
        )

    # ------------------------------------------------------------------ set-up
    @classmethod
    def maybe_create(cls, runner: Any) -> NanoSpecRuntime | None:
        rt = get_runtime(runner)
        if rt is not None or getattr(runner, "_nanospec_checked", False):
            return rt
        runner._nanospec_checked = True
        extra = getattr(runner.vllm_config, "additional_config", None) or {}
        block = extra.get("nanospec") if isinstance(extra, dict) else None
        if block is None or getattr(runner, "drafter", None) is None:
            return None
        rt = cls(runner, parse_config(block))
        runner._nanospec_runtime = rt
        runner.drafter._nanospec_runtime = rt
        return rt

    def _pinned_ids(self, runner: Any) -> set[int]:
        if not self.cfg.always_active_special_ids:
            return set()
        ids: set[int] = set()
        hf = runner.model_config.hf_config
        for src in (getattr(hf, "eos_token_id", None), getattr(hf, "bos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(runner.model_config.tokenizer,
                                                trust_remote_code=runner.model_config.trust_remote_code)
            ids.update(int(i) for i in tok.all_special_ids)
            ids.update(int(i) for i in getattr(tok, "added_tokens_decoder", {}) if getattr(
                tok.added_tokens_decoder[i], "special", False))
        except Exception as e:  # tokenizer-less engines: EOS from the config is still pinned
            logger.warning("NanoSpec: could not load the tokenizer to pin special ids (%s); pinning EOS only", e)
        return ids

    def bind_head(self, proposer: Any) -> HeadBinding:
        if self.head is not None:
            return self.head
        model = proposer.model
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
        row_index = None
        if d2t is not None:
            row_index = row_index_from_d2t(d2t.data[:org], self.vocab_size)
        self.head = HeadBinding(
            weight=weight,
            row_index=row_index,
            scale=float(getattr(lp, "scale", 1.0) or 1.0),
            soft_cap=getattr(lp, "soft_cap", None),
            vocab_size=self.vocab_size,
        )
        logger.info("NanoSpec: drafter head %s rows x %d (%s)%s", weight.shape[0], weight.shape[1], weight.dtype,
                    " with a draft->target vocab map" if row_index is not None else "")
        return self.head

    # ------------------------------------------------------------------ lifecycle
    def admit(self, req_id: str, req_state: Any, token_ids: list[int]) -> None:
        sp = getattr(req_state, "sampling_params", None)
        if sp is None or not request_enabled(sp, self.cfg.enabled):
            self.pool.free(req_id)  # no slot: this request drafts with the full head
            return
        seed = list(token_ids) if self.cfg.seed_from_prompt else []
        seed += list(getattr(sp, "all_stop_token_ids", None) or getattr(sp, "stop_token_ids", None) or [])
        try:
            self.pool.seed(req_id, seed)
        except PoolFullError:
            logger.warning("NanoSpec: no free slot for %s; it drafts with the full head", req_id)
            self.stats.no_slot += 1

    def update_states(self, runner: Any, so: Any, orig: Any) -> Any:
        for rid in so.finished_req_ids:
            self.pool.free(rid)
        for rid in getattr(so, "preempted_req_ids", None) or ():
            self.pool.free(rid)  # re-seeded from prompt + output when resumed
        out = orig(runner, so)
        for nr in so.scheduled_new_reqs:
            rs = runner.requests.get(nr.req_id)
            if rs is not None:
                self.admit(nr.req_id, rs, list(rs.prompt_token_ids or []))
        cached = so.scheduled_cached_reqs
        for rid in getattr(cached, "resumed_req_ids", None) or ():
            rs = runner.requests.get(rid)
            if rs is not None:
                self.admit(rid, rs, list(rs.prompt_token_ids or []) + list(rs.output_token_ids or []))
        return out

    # ------------------------------------------------------------------ verification
    def take_target_topk(self, logits: torch.Tensor) -> None:
        k = self.cfg.target_topk
        self.topk = None
        if k > 0 and self.pool.num_in_use and logits.dim() == 2 and logits.shape[0]:
            self.topk = logits.topk(min(k, logits.shape[1]), dim=-1).indices

    def add_prompt_topk(self, runner: Any, rows: list[int], slots: torch.Tensor, hidden: Any, attn_meta: Any) -> None:
        """``prompt_topk``: the target's top-k at every prompt position scheduled this step (a full-vocab
        projection of those positions' hidden states, in chunks of 256 rows)."""
        qsl = getattr(attn_meta, "query_start_loc_cpu", None)
        if qsl is None or not isinstance(hidden, torch.Tensor):
            return
        k = max(1, self.cfg.target_topk)
        computed = runner.input_batch.num_computed_tokens_cpu
        n_prompt = runner.input_batch.num_prompt_tokens
        for i in rows:
            start, end = int(qsl[i]), int(qsl[i + 1])
            # positions of this step's chunk that are prompt positions (the last one is the sampled position)
            n = min(end - start, int(n_prompt[i]) - int(computed[i])) - 1
            for c in range(0, max(0, n), 256):
                h = hidden[start + c: start + min(n, c + 256)]
                top = runner.model.compute_logits(h).topk(k, dim=-1).indices
                self.pool.extend(slots[i: i + 1], top.reshape(1, -1))

    def before_propose(self, runner: Any, sampled: torch.Tensor | list[list[int]], spec_meta: Any,
                       hidden: Any = None, attn_meta: Any = None) -> None:
        num_reqs = runner.input_batch.num_reqs
        req_ids = runner.input_batch.req_ids[:num_reqs]
        slot_list = [self.pool.slot_of(r) for r in req_ids]
        on_rows = [i for i, s in enumerate(slot_list) if s is not None]
        off_rows = [i for i, s in enumerate(slot_list) if s is None]
        slots = torch.tensor([-1 if s is None else s for s in slot_list], dtype=torch.int64, device=self.device)
        self.ctx = BatchContext(slots=slots, on_rows=on_rows, off_rows=off_rows, batch_size=num_reqs,
                                on_idx=torch.tensor(on_rows, dtype=torch.int64, device=self.device),
                                off_idx=torch.tensor(off_rows, dtype=torch.int64, device=self.device))
        topk, self.topk = self.topk, None
        if not on_rows:
            return
        if self.cfg.prompt_topk:
            self.add_prompt_topk(runner, on_rows, slots, hidden, attn_meta)
        discard = runner.discard_request_mask.np[:num_reqs]
        rows = [i for i in on_rows if not discard[i]]
        if not rows:
            return
        if isinstance(sampled, list):
            sampled = _as_padded(sampled, self.device)
        idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
        s = sampled[idx].long()  # [R, W], -1 after the first rejection
        rslots = slots[idx]
        W = s.shape[1]
        j = torch.arange(W, device=self.device)
        if spec_meta is not None:
            nd_all = torch.tensor(spec_meta.num_draft_tokens, dtype=torch.int64)
            nd = nd_all[rows].to(self.device)
            # coverage: tokens the target emitted at drafted positions, and whether they were active when drafted
            drafted = (j[None, :] < nd[:, None]) & (s >= 0)
            covered = self.pool.contains(rslots, s) & drafted
            self.stats.add_coverage(drafted.sum(), covered.sum())
            starts_all = torch.cumsum(nd_all + 1, 0) - (nd_all + 1)
            starts = starts_all[rows].to(self.device)
            valid = (j[None, :] <= nd[:, None]) & (s >= 0)
        else:
            starts = idx
            valid = (j[None, :] == 0) & (s >= 0)
        new = [s]
        if topk is not None:
            lrow = (starts[:, None] + j[None, :]).clamp(max=topk.shape[0] - 1)
            t = topk[lrow].long()  # [R, W, k]
            t = torch.where(valid[:, :, None], t, torch.full_like(t, -1))
            new.append(t.reshape(t.shape[0], -1))
        self.pool.extend(rslots, torch.cat(new, dim=1))

    def after_propose(self, draft_ids: Any) -> None:
        ctx = self.ctx
        if ctx is None or not ctx.on_rows or not self.cfg.add_draft_tokens:
            return
        if isinstance(draft_ids, list):
            if not draft_ids:
                return
            draft_ids = _as_padded(draft_ids, self.device)
        if not isinstance(draft_ids, torch.Tensor) or draft_ids.dim() != 2 or draft_ids.shape[1] == 0:
            return
        if draft_ids.shape[0] != ctx.batch_size:
            return
        self.pool.extend(ctx.slots[ctx.on_idx], draft_ids[ctx.on_idx].long())

    # ------------------------------------------------------------------ drafting
    def _sparse(self, head: HeadBinding, h: torch.Tensor, logprobs: bool) -> SparseHeadOutput:
        assert self.ctx is not None and self.ctx.active is not None
        ids, counts = self.ctx.active
        if head.scale != 1.0:
            h = h * head.scale
        return sparse_head(h, head.weight, ids, counts, row_index=head.row_index, want_logprobs=logprobs,
                           vocab_size=head.vocab_size, impl=self.impl,
                           dense_fallback_ratio=self.cfg.dense_fallback_ratio)

    def sample_draft_tokens(self, proposer: Any, hidden: torch.Tensor, sampling_metadata: Any, orig: Any):
        ctx = self.ctx
        if ctx is None or not ctx.on_rows or hidden.shape[0] != ctx.batch_size:
            if ctx is not None and ctx.on_rows and hidden.shape[0] != ctx.batch_size:
                self.stats.fallback += 1  # parallel drafting: rows are not requests
            return orig(proposer, hidden, sampling_metadata)
        head = self.bind_head(proposer)
        greedy = not proposer._enable_probabilistic_draft_probs or sampling_metadata.all_greedy
        on = ctx.on_idx
        if ctx.active is None:  # first draft position: the sets do not change until the next verification
            ctx.active = self.pool.active(ctx.slots[on])
            self.stats.record_sizes(ctx.active[1])
        if greedy:
            out = self._sparse(head, hidden[on], logprobs=False)
            tok = out.token_ids
            if bool((tok < 0).any()):  # a row with no draftable id (e.g. none in an EAGLE-3 draft vocab)
                full = proposer._greedy_sample(hidden[on])
                tok = torch.where(tok < 0, full, tok)
            if not ctx.off_rows:
                return tok, None
            res = torch.empty(ctx.batch_size, dtype=torch.int64, device=hidden.device)
            res[on] = tok
            off = ctx.off_idx
            res[off] = proposer._greedy_sample(hidden[off]).long()
            return res, None
        if head.soft_cap is not None:
            self.stats.fallback += 1  # soft-capped logits: the pruned softmax needs the raw scores
            return orig(proposer, hidden, sampling_metadata)
        out = self._sparse(head, hidden[on], logprobs=True)
        logits = torch.full((ctx.batch_size, head.vocab_size), float("-inf"), dtype=torch.float32,
                            device=hidden.device)
        logits[on] = out.logprobs  # log-softmax over the active set; a per-row shift of the scores
        empty = out.token_ids < 0
        if bool(empty.any()):  # no draftable id in the set: that row samples from the full head
            logits[on[empty]] = proposer.model.compute_logits(hidden[on[empty]]).float()
        if ctx.off_rows:
            off = ctx.off_idx
            logits[off] = proposer.model.compute_logits(hidden[off]).float()
        return proposer._sample_from_logits(logits, sampling_metadata)
