"""NanoSpec in vLLM's V1 worker: the slot lifecycle and the per-step context (one object per model runner).

:class:`NanoSpecRuntime` is created lazily the first time the runner updates its states, only when the engine's
``additional_config`` carries a ``nanospec`` block (put there by the config patch). The runner patches in
:mod:`.patches.patch_gpu_model_runner` drive it; the one walk of an engine step is:

1. ``_update_states``: :meth:`~NanoSpecRuntime.release` frees finished and preempted requests' slots before
   vLLM's update, :meth:`~NanoSpecRuntime.admit_scheduled` seeds new requests from their prompt ids (+ stop/EOS
   ids) and resumed ones from prompt + output so far, after it. A request whose ``extra_args["nanospec"]`` is
   false gets no slot and drafts with the full head.
2. ``sample_tokens`` owns the step: :meth:`~NanoSpecRuntime.begin_step` creates the :class:`StepContext`, and
   :meth:`~NanoSpecRuntime.end_step` clears it and drains the statistics onto the ``ModelRunnerOutput``.
   Inside it, in order:
3. ``_sample``: :meth:`~NanoSpecRuntime.on_verification_logits` keeps the target's top-k ids of every logits row
   (one ``topk`` over logits that exist anyway).
4. ``propose_draft_token_ids``: :meth:`~NanoSpecRuntime.before_propose` maps batch rows to slots
   (:func:`..step.plan_batch`), counts coverage and adds the emitted tokens + verified top-k
   (:func:`..step.verified_update`); :meth:`~NanoSpecRuntime.after_propose` adds the step's drafts.
5. Every draft position: the proposer patch asks :class:`.head.SparseDraftHead` (``rt.head``) for the draft
   tokens; it answers ``None`` when the batch is not its to draft.

No blocking host wait per step on CUDA: the step's index vectors (row -> slot, on/off rows, verified rows, their
draft counts and logits starts) are written into one pinned host staging buffer allocated once (vLLM's
``CpuGpuBuffer``, a ring of :data:`STAGING_RING` rows sized by ``max_num_seqs``) and copied to the device with one
``non_blocking`` copy (:class:`IndexStaging`); the statistics stay on the device and are read from pinned memory
once their copy has completed (:class:`.metrics.worker.StepStats`); a row whose set holds no draftable id is
handled by a device-side select in the head. Host lists that vLLM hands over (token ids on some paths, prompts at
admission) go through pinned memory with ``non_blocking=True``. ``tests/unit/test_host_sync.py`` counts host reads
of device data over a step (zero). Cost per step: one ``[rows, V]`` top-k, one ``extend``, and the sparse head
instead of the dense one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..config import HOT_SET_AUTO, NanoSpecConfig, check_engine, parse_config, request_enabled
from ..guard import CoverageGuard, GuardParams
from ..hostcopy import IndexStaging
from ..ops import resolve_impl
from ..pinned import compose_pinned, pinned_token_ids
from ..state import ActiveVocabPool, PoolFullError
from ..step import logits_starts, plan_batch, prompt_rows, verified_update
from .debug import DebugRecorder
from .head import DraftBatch, SparseDraftHead
from .metrics.worker import StepStats

logger = logging.getLogger("vllm.nanospec")

__all__ = ["NanoSpecRuntime", "StepContext", "get_runtime"]


@dataclass
class StepContext:
    """What one engine step knows; created by :meth:`NanoSpecRuntime.begin_step`, cleared by ``end_step``."""

    topk: torch.Tensor | None = None  # [logits rows, k] target top-k at this step's verification
    batch: DraftBatch | None = None  # what before_propose built for this step's drafter (read-only)
    vllm_drafted: bool = False  # the head handed this step's positions to vLLM's own head (cost model: dense)


def get_runtime(obj: Any) -> NanoSpecRuntime | None:
    return getattr(obj, "_nanospec_runtime", None)


def _as_padded(rows: list[list[int]], pool: ActiveVocabPool) -> torch.Tensor:
    """``list[list[int]]`` (vLLM's unpadded sampled/draft ids, host data) -> ``[B, W]`` int64 padded with -1 on the
    pool's device (copied from pinned memory, non-blocking)."""
    width = max((len(x) for x in rows), default=0) or 1
    return pool.to_device(torch.tensor([x + [-1] * (width - len(x)) for x in rows], dtype=torch.int64))


def _vllm_staging_buffer() -> Any:
    """vLLM's pinned host + device pair (``CpuGpuBuffer``), or None (then :class:`..hostcopy.PinnedPair`)."""
    try:
        from vllm.v1.utils import CpuGpuBuffer
    except ImportError:  # inside vLLM it always imports; the host-sync test also runs on a bare GPU machine
        return None
    return CpuGpuBuffer


def _load_tokenizer(runner: Any) -> Any | None:
    """The target's tokenizer, loaded once at start-up (chat-template ids to pin, the ``auto`` hot set)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(runner.model_config.tokenizer,
                                             trust_remote_code=runner.model_config.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - tokenizer-less engines: EOS from the config is still pinned
        logger.warning("NanoSpec: could not load the tokenizer (%s); pinning EOS only, no `auto` hot set", e)
        return None


class NanoSpecRuntime:
    def __init__(self, runner: Any, cfg: NanoSpecConfig) -> None:
        spec = runner.speculative_config
        self.method = check_engine(getattr(spec, "method", None), runner.parallel_config.tensor_parallel_size,
                                   getattr(spec, "use_heterogeneous_vocab", False),
                                   getattr(spec, "rejection_sample_method", "standard"))
        self.cfg = cfg
        self.device = torch.device(runner.device)
        self.vocab_size = int(runner.model_config.get_vocab_size())
        tok = _load_tokenizer(runner) if cfg.always_active_special_ids or cfg.hot_set_path == HOT_SET_AUTO else None
        hot_file = cfg.hot_set_file(tok)
        hot = cfg.hot_set(tok)
        logger.info("NanoSpec: hot set %s", f"{hot_file} (first {len(hot)} ids)" if hot_file else
                    "none" if cfg.hot_set_path is None else "none (no shipped hot set matches this tokenizer)")
        gen = self._generation_ids(runner, tok) if cfg.always_active_special_ids else ()
        pinned, dropped = compose_pinned(self.vocab_size, cfg.capacity, cfg.always_active_ids, hot, gen)
        if dropped:  # never fail start-up over pinned ids: keep the lowest, say so
            logger.warning("NanoSpec: %d pinned ids do not fit capacity %d; pinning the first %d",
                           len(pinned) + dropped, cfg.capacity, len(pinned))
        num_slots = int(runner.scheduler_config.max_num_seqs)
        self.pool = ActiveVocabPool(num_slots, self.vocab_size, cfg.capacity, self.device, pinned, cfg.full_policy)
        self.impl = resolve_impl(cfg.kernel, self.device)
        self.stats = StepStats(self.device, max_sizes=num_slots)
        self.staging = IndexStaging(num_slots, self.device, _vllm_staging_buffer())
        tp = int(getattr(runner.parallel_config, "tensor_parallel_size", 1) or 1)
        self.head = SparseDraftHead(self.vocab_size, self.device, self.impl, cfg.kernel, cfg.dense_fallback_ratio,
                                    self.pool.pinned_ids, same_step_everywhere=tp > 1)
        gp = GuardParams(cfg.guard_coverage, cfg.guard_hysteresis, float(cfg.guard_window))
        self.guard = CoverageGuard(num_slots, self.device, gp, same_step_everywhere=tp > 1) if gp.enabled else None
        self.ctx: StepContext | None = None
        self.debug = DebugRecorder.from_env(self.pool)  # None unless NANOSPEC_DEBUG_RECORD=1 (tests only)
        logger.info(
            "NanoSpec active: method=%s capacity=%d slots=%d pinned=%d policy=%s kernel=%s pool=%.1f MiB guard=%s",
            self.method, cfg.capacity, num_slots, len(pinned), cfg.full_policy, self.impl, self.pool.nbytes / 2**20,
            CoverageGuard.describe(gp),
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
        model = getattr(runner.drafter, "model", None)
        if model is not None and getattr(model, "lm_head", None) is not None:
            rt.head.bind(model)  # the drafter is loaded: bind now, so no step pays for it
        return rt

    def _generation_ids(self, runner: Any, tok: Any) -> set[int]:
        ids = pinned_token_ids(runner.model_config.hf_config, tok)
        shown = ", ".join(f"{i}={tok.convert_ids_to_tokens(i)!r}" if tok is not None else str(i) for i in sorted(ids))
        logger.info("NanoSpec: pinned generation ids (EOS, pad, chat-template markers): %s", shown or "none")
        return ids

    # ------------------------------------------------------------------ lifecycle
    def admit(self, req_id: str, req_state: Any, token_ids: list[int]) -> None:
        sp = getattr(req_state, "sampling_params", None)
        if sp is None or not request_enabled(sp, self.cfg.enabled):
            self.pool.free(req_id)  # no slot: this request drafts with the full head
            return
        seed = list(token_ids) if self.cfg.seed_from_prompt else []
        seed += list(getattr(sp, "all_stop_token_ids", None) or getattr(sp, "stop_token_ids", None) or [])
        if self.debug is not None:
            self.debug.add(req_id, "seed", seed)
        try:
            slot = self.pool.seed(req_id, seed)
            if self.guard is not None:
                self.guard.reset(slot)
        except PoolFullError:
            logger.warning("NanoSpec: no free slot for %s; it drafts with the full head", req_id)
            self.stats.no_slot += 1

    def release(self, scheduler_output: Any) -> None:
        """Before vLLM's ``_update_states``: finished and preempted requests give their slot back."""
        if self.debug is not None:
            self.debug.snapshot([*scheduler_output.finished_req_ids,
                                 *(getattr(scheduler_output, "preempted_req_ids", None) or ())])
        for rid in scheduler_output.finished_req_ids:
            self.pool.free(rid)
        for rid in getattr(scheduler_output, "preempted_req_ids", None) or ():
            self.pool.free(rid)  # re-seeded from prompt + output when resumed

    def admit_scheduled(self, runner: Any, scheduler_output: Any) -> None:
        """After vLLM's ``_update_states``: seed new requests, re-seed resumed ones."""
        for nr in scheduler_output.scheduled_new_reqs:
            rs = runner.requests.get(nr.req_id)
            if rs is not None:
                self.admit(nr.req_id, rs, list(rs.prompt_token_ids or []))
        cached = scheduler_output.scheduled_cached_reqs
        for rid in getattr(cached, "resumed_req_ids", None) or ():
            rs = runner.requests.get(rid)
            if rs is not None:
                self.admit(rid, rs, list(rs.prompt_token_ids or []) + list(rs.output_token_ids or []))

    # ------------------------------------------------------------------ the step
    def begin_step(self) -> StepContext:
        self.ctx = StepContext()
        return self.ctx

    def end_step(self) -> dict[str, Any]:
        """Clear the step's context; returns the statistics payload of the steps whose figures have reached
        the host (no host wait; on CPU, this step's)."""
        self.ctx = None
        return self.stats.drain(self.pool, self.impl)

    def on_verification_logits(self, logits: torch.Tensor) -> None:
        """Keep the target's top-k ids of the verification logits. Outside a step (vLLM's warm-up sampler run)
        there is nothing to keep them for: ignored."""
        k = self.cfg.target_topk
        if self.ctx is None or k <= 0 or not self.pool.num_in_use or logits.dim() != 2 or not logits.shape[0]:
            return
        self.ctx.topk = logits.topk(min(k, logits.shape[1]), dim=-1).indices

    def before_propose(self, runner: Any, sampled: torch.Tensor | list[list[int]], spec_meta: Any,
                       hidden: Any = None, attn_meta: Any = None) -> None:
        """Update the tracked rows' sets from this verification and build the step's :class:`.head.DraftBatch`.
        Outside a step (only ``sample_tokens`` opens one) nothing is drafted sparsely: counted as ``no_step``."""
        ctx = self.ctx
        if ctx is None:
            self.stats.no_step += 1
            return
        if self.debug is not None:
            self.debug.before_propose(runner, sampled, spec_meta, ctx.topk)
        num_reqs = runner.input_batch.num_reqs
        flags = None
        if self.guard is not None:
            fires = self.guard.fires
            flags = self.guard.poll()  # the newest host copy that has arrived: never waits
            self.stats.guard_fires += self.guard.fires - fires
        plan = plan_batch(runner.input_batch.req_ids[:num_reqs], self.pool.slot_of, flags)
        tracked = plan.tracked_rows
        self.stats.planned += len(tracked)
        self.stats.guarded += len(plan.guarded_rows)
        topk, ctx.topk = ctx.topk, None
        rows: list[int] = []
        nd_rows: list[int] = []
        start_rows: list[int] = []
        nd_all = None
        if tracked:  # host lists only (vLLM's host-side mask and draft counts)
            discard = runner.discard_request_mask.np[:num_reqs]
            rows = [i for i in tracked if not discard[i]]  # partial prefills emit nothing
            nd_all = None if spec_meta is None else list(spec_meta.num_draft_tokens)
            starts_all = logits_starts(nd_all, num_reqs)
            nd_rows = [] if nd_all is None else [nd_all[i] for i in rows]
            start_rows = [starts_all[i] for i in rows]
        # every index vector of the step in one non-blocking host -> device copy
        slots, on_idx, off_idx, idx, nd, starts = self.staging.put(
            plan.slots, plan.on_rows, plan.off_rows, rows, nd_rows, start_rows)
        if tracked and self.cfg.prompt_topk:
            self._add_prompt_topk(runner, tracked, slots, hidden, attn_meta)
        if rows:
            self._verified(sampled, slots, idx, None if nd_all is None else nd, starts, topk)
        # the sets are final for this step's draft positions: read the on rows' once, freeze the batch. Also on a
        # step the head then hands to vLLM (dense path): their sizes (and a due union probe) are what the lagged
        # statistics read, and without them `auto` could not see the load fall and come back from dense
        active = self.pool.active(slots[on_idx]) if plan.on_rows else None
        if active is not None:
            self.stats.record_sizes(active[1])
        ctx.batch = DraftBatch(plan, slots, on_idx, off_idx, active)
        self.head.prepare(ctx.batch)  # the step's path and union gather now (CUDA: overlapping the drafter)

    def _verified(self, sampled: torch.Tensor | list[list[int]], slots: torch.Tensor, idx: torch.Tensor,
                  nd: torch.Tensor | None, starts: torch.Tensor, topk: torch.Tensor | None) -> None:
        """Rows ``idx`` were verified this step: count their coverage (against the sets the drafts came from), feed
        the guard, add the emitted tokens and the target's top-k (``nd`` None: no drafts were verified)."""
        if isinstance(sampled, list):
            sampled = _as_padded(sampled, self.pool)
        s = sampled[idx].long()  # [R, W]
        upd = verified_update(s, nd, starts, topk)
        rslots = slots[idx]
        covered = self.pool.contains(rslots, s) & upd.drafted  # against the set the drafts were made from
        self.stats.add_coverage(upd.drafted.sum(), covered.sum())
        if self.guard is not None:
            self.guard.update(rslots, upd.drafted.sum(1), covered.sum(1))
            self.guard.stage()
        self.pool.extend(rslots, upd.new_ids)

    def _add_prompt_topk(self, runner: Any, rows: tuple[int, ...], slots: torch.Tensor, hidden: Any,
                         attn_meta: Any) -> None:
        """``prompt_topk``: the target's top-k at the prompt positions scheduled this step (a full-vocab
        projection of those positions' hidden states, in chunks of 256 rows)."""
        qsl = getattr(attn_meta, "query_start_loc_cpu", None)
        if qsl is None or not isinstance(hidden, torch.Tensor):
            return
        k = max(1, self.cfg.target_topk)
        computed = runner.input_batch.num_computed_tokens_cpu
        n_prompt = runner.input_batch.num_prompt_tokens
        for i in rows:
            lo, hi = prompt_rows(int(qsl[i]), int(qsl[i + 1]), int(n_prompt[i]), int(computed[i]))
            for c in range(lo, hi, 256):
                top = runner.model.compute_logits(hidden[c: min(hi, c + 256)]).topk(k, dim=-1).indices
                self.pool.extend(slots[i: i + 1], top.T.reshape(1, -1))  # rank-major: all top-1 first

    def draft(self, proposer: Any, hidden: torch.Tensor, sampling_metadata: Any) -> Any | None:
        """One draft position (the proposer patch): the sparse head's answer for this step's batch, or ``None``
        ("not mine": vLLM's head drafts). The head's counters go into the step's statistics."""
        ctx = self.ctx
        # outside sample_tokens, or a propose without before_propose (a vLLM path the patches do not know): vLLM's
        # head drafts it, and /metrics shows it
        if ctx is None or ctx.batch is None:
            self.stats.no_step += 1
            return None
        out, counts = self.head.sample(proposer, hidden, sampling_metadata, ctx.batch)
        self.stats.fallback += counts.fallback
        self.stats.sparse_rows += counts.sparse_rows
        if counts.handed_back:
            ctx.vllm_drafted = True
        if counts.path is not None:
            self.stats.count_path(counts.path)
        return out

    def after_propose(self, draft_ids: Any) -> None:
        ctx = self.ctx
        if self.debug is not None and ctx is not None:
            self.debug.after_propose(draft_ids)
        # Sparse rows only. Their drafts come from their own sets, so this adds nothing new unless a row drafted the
        # fallback id; the full head's drafts of a guarded row are NOT added: they would be in the set when that
        # row's next verification counts coverage, and an accepted draft would always count as covered, so the
        # guard would read the full head's acceptance instead of what the sparse set would have offered.
        batch = None if ctx is None else ctx.batch
        if batch is None or not batch.plan.on_rows or not self.cfg.add_draft_tokens or ctx.vllm_drafted:
            return  # (vLLM's head drafted this step: its drafts are not the sets', as for the guarded rows above)
        if isinstance(draft_ids, list):
            if not draft_ids:
                return
            draft_ids = _as_padded(draft_ids, self.pool)
        if not isinstance(draft_ids, torch.Tensor) or draft_ids.dim() != 2 or draft_ids.shape[1] == 0:
            return
        if draft_ids.shape[0] != batch.plan.batch_size:
            return
        self.pool.extend(batch.slots[batch.on_idx], draft_ids[batch.on_idx].long())
