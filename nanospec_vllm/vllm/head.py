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

Path per step (:meth:`SparseDraftHead.step_path`): ``kernel: union`` always takes the union path; ``kernel: auto``
on a device with a fitted cost model (:func:`..ops.cost.model_for`: this CPU, and CUDA from an H200 run) chooses
per step among the per-request kernel, the union path and the dense head (vLLM's own head: the step is handed
back, so at a load where gathering costs more than the full head NanoSpec never makes a draft position slower;
its drafts, from the full vocabulary, are not added to the sets) from the batch size and the sizes of earlier steps (sum of
the set sizes and union size, copied back lagged: :class:`..hostcopy.LaggedHostCopies`, never waited for);
elsewhere the per-request kernel (and the static ``dense_fallback_ratio`` rule). The sets do not change between
the draft positions of a step, so the path is decided and the union's rows are gathered once per step, as soon as
the runtime has frozen the step's batch (:meth:`SparseDraftHead.prepare`; on CUDA on a side stream, overlapping
the drafter's first forward), and reused at every position: the plan is kept with a weak reference to the step's
batch, so it is dropped with it.

Data flow: the runtime freezes the step's :class:`DraftBatch` (plan, slot rows, on/off indices, the on rows' active
ids and counts) once the sets are final, and every draft position passes it to :meth:`SparseDraftHead.sample`,
which returns the draft and its :class:`HeadCounts` (the runtime adds them to the statistics); the head holds no
reference to the runtime. Binding the drafter's head (:func:`..ops.binding.bind_head`) lives beside the
tensor-parallel scoring in ``ops``.

Touches: reads the drafter's ``lm_head`` weight (often shared with the target; never modified). Cost: the sparse head over ``sum(counts)`` rows instead of the full ``[B, V]`` projection; on
the union path one gather of the union's rows per step (buffers kept between steps: ``6 x rows x H`` bytes) and
one GEMM per position; under ``auto`` at batch >= 2, when the union path could win, a union-size probe every
:data:`PROBE_EVERY` steps (a ``V``-byte map). No host
synchronisation per draft position: a row whose set holds no draftable id is handled by a device-side select
(``torch.where``) to a fallback id chosen once at binding (:meth:`SparseDraftHead.bind`).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..hostcopy import LaggedHostCopies
from ..ops import SparseHeadOutput, cost, sparse_head
from ..ops.binding import HeadBinding, bind_head
from ..ops.tp import sparse_head_sharded
from ..ops.union import UnionPlan, prepare_union, union_size
from ..step import BatchPlan

logger = logging.getLogger("vllm.nanospec")

__all__ = ["DraftBatch", "HeadBinding", "HeadCounts", "SparseDraftHead", "bind_head"]


@dataclass(frozen=True, eq=False)
class DraftBatch:
    """One step's draft batch as the runtime froze it after updating the sets (``before_propose``); the head only
    reads it. The sets do not change until the next verification, so ``active`` is read once per step."""

    plan: BatchPlan  # row -> slot map: on rows (sparse head), off rows (vLLM's head)
    slots: torch.Tensor  # [B] int64 on the device, -1 = full head
    on_idx: torch.Tensor  # [len(on_rows)] int64
    off_idx: torch.Tensor  # [len(off_rows)] int64
    active: tuple[torch.Tensor, torch.Tensor] | None  # (ids [R, C], counts [R]) of the on rows; None: no on row


@dataclass(frozen=True)
class HeadCounts:
    """What one draft position adds to the step's statistics (host-known, no device read)."""

    sparse_rows: int = 0  # request rows the sparse head scored
    fallback: int = 0  # 1: the position was handed to vLLM's head although the batch had NanoSpec rows
    path: str | None = None  # the step's path (ops.cost.PATHS) at the position that decided it, else None
    handed_back: bool = False  # the cost model chose vLLM's own head for this step (path ``dense``)


def _vllm_tp_group() -> Any:
    from vllm.distributed import get_tp_group

    return get_tp_group()


#: host copies of the step sizes in flight (a push waits only when the device is this many steps behind)
SIZE_RING = 4
#: under ``auto``, the union size is measured at most every this many steps
PROBE_EVERY = 8


class SparseDraftHead:
    """The sparse head of one runtime: ``vocab_size`` (target), ``device``, ``impl`` (resolved kernel), ``kernel``
    and ``dense_fallback_ratio`` (the config's), ``pinned_ids`` (the pool's: the fallback id is chosen among them).
    ``same_step_everywhere`` (tensor parallelism): every rank must choose the same path (a step handed back to
    vLLM's head runs other collectives than the sparse head's), so the lagged sizes are read from every copy
    issued so far, waiting on their events if needed (long completed: vLLM has read those steps' sampled tokens),
    not from whichever copies have arrived. Holds no reference to the runtime: each position gets the step's
    :class:`DraftBatch`."""

    def __init__(self, vocab_size: int, device: torch.device, impl: str, kernel: str,
                 dense_fallback_ratio: float | None, pinned_ids: list[int],
                 same_step_everywhere: bool = False) -> None:
        self.vocab_size, self.impl, self.kernel = int(vocab_size), impl, kernel
        self.device = torch.device(device)
        self.dense_fallback_ratio = dense_fallback_ratio
        self.same_step_everywhere = same_step_everywhere
        self.pinned_ids = list(pinned_ids)
        self.binding: HeadBinding | None = None
        self.fallback_id = 0  # drafted by a row whose set holds no id the head can draft (see bind)
        self._fallback: torch.Tensor | None = None  # the same, a 0-dim int64 device tensor
        #: steps per path (host counters; ``per_request`` includes the static dense rule's steps)
        self.path_steps = dict.fromkeys(cost.PATHS, 0)
        self._step: weakref.ref | None = None  # the DraftBatch whose path / plan below are cached
        self._path = "per_request"
        self._plan: UnionPlan | None = None
        self._workspace: dict = {}  # union buffers, reused between steps
        self._lagged = (0, 0, 0)  # (rows, sum of set sizes, union size) of the newest step read back; 0: none yet
        self._sizes = LaggedHostCopies(SIZE_RING, 3, torch.int64, self.device, self._read_sizes)
        self._positions = 1  # draft positions per step (the proposer's num_speculative_tokens)
        self._probes = 0  # steps where a union-size probe was due
        self._unreported = False  # the cached step's path is not yet in the statistics (reported once it drafts)
        self._side: Any = None  # CUDA: the side stream prepare() issues the union gather on
        self._ready: Any = None  # CUDA: the event the first draft position waits for
        self._union_share = 1.0  # union / sum of the sets at the last measurement (1.0: none yet)

    def host_buffers(self) -> list[torch.Tensor]:
        """Host memory the head reads (its lagged size copies)."""
        return [self._sizes.buf]

    def _read_sizes(self, host: torch.Tensor, meta: Any) -> None:
        b, s, u = (int(v) for v in host.tolist())
        if u >= 0:  # a measured union: remember its share of the sum
            self._union_share = u / max(1, s)
        self._lagged = (b, s, max(1, round(s * self._union_share)) if u < 0 else u)

    def lagged_sizes(self, batch: int, width: int) -> tuple[int, int]:
        """``(sum of set sizes, union size)`` expected for ``batch`` rows, from the newest step read back: the sum
        scaled by the number of rows, the union scaled up (never down) with it, at most the sum. Before any
        step was read back: full sets of ``width`` ids that do not overlap."""
        b0, s0, u0 = self._lagged
        if not b0:
            return batch * width, batch * width
        s = max(1, round(s0 * batch / b0))
        return s, min(s, max(1, round(u0 * max(1.0, batch / b0))))

    def bind(self, model: Any) -> HeadBinding:
        """Read the drafter's head (:func:`bind_head`) and choose the fallback id: the first pinned id the head
        can draft, else the lowest id it can draft. A row whose set holds no draftable id (possible only with
        an EAGLE-3 reduced draft vocabulary, or an empty set) drafts that id, chosen on the device with
        ``torch.where``: no per-position host check. Any draft keeps greedy output exact; the target rejects a
        bad one. Runs once (at runtime creation when the drafter is loaded, else at the first draft); the host
        reads of ``row_index`` here happen only then."""
        b = bind_head(model, self.vocab_size, _vllm_tp_group)
        pinned = self.pinned_ids
        if b.row_index is None:
            fid = next((i for i in pinned if i < b.weight.shape[0]), 0)
        else:
            rows = b.row_index.tolist()  # once per engine
            fid = next((i for i in pinned if rows[i] >= 0), next((i for i, r in enumerate(rows) if r >= 0), 0))
        self.fallback_id = int(fid)
        self._fallback = torch.tensor(self.fallback_id, dtype=torch.int64, device=b.weight.device)
        self.binding = b
        return b

    def step_path(self, batch: DraftBatch) -> tuple[str, UnionPlan | None]:
        """This step's path (``per_request``, ``union`` or ``dense``) and union plan, decided once per step (by
        :meth:`prepare`, else at the first draft position) and cached until the step's batch is gone. Reads only
        host data (the lagged sizes)."""
        if self._step is not None and self._step() is batch:
            return self._path, self._plan
        b = self.binding
        assert b is not None and batch.active is not None
        ids, counts = batch.active
        row_index = b.local_row_index if b.shard is not None else b.row_index
        kernel = self.kernel
        model = cost.model_for(b.weight.device.type) if kernel == "auto" else None
        B, (Vw, H) = ids.shape[0], b.weight.shape
        self._sizes.read(wait=self.same_step_everywhere)  # the copies that have arrived (TP: all issued so far)
        S, U = self.lagged_sizes(B, ids.shape[1])
        bucket = cost.union_bucket(U, B, ids.shape[1], Vw)
        if kernel in ("union", "dense"):  # forced (benchmarks; `dense`: NanoSpec keeps its sets, vLLM drafts)
            path = kernel
        elif model is not None:
            path = cost.choose(model, cost.StepSizes(B, H, Vw, S, U, positions=self._positions), bucket)
        else:
            path = "per_request"
        plan = None
        total = counts.sum().long()
        if path == "union":
            plan = prepare_union(b.weight, ids, counts, row_index, capacity=bucket, workspace=self._workspace)
            size = plan.size
        elif model is None:
            size = None
        elif B > 1 and self._probe_due(model, B, H, Vw, S, ids.shape[1]):  # the union, for later steps' choice
            size = union_size(ids, counts, Vw, row_index, self._workspace)
        else:  # not measured this step (one row, not due, or the union path cannot win): -1
            size = torch.full_like(total, -1)
        if size is not None:
            self._sizes.push(torch.stack([torch.full_like(total, B), total, size.long()]))
        self._unreported = True
        self._step, self._path, self._plan = weakref.ref(batch, self._forget), path, plan
        return path, plan

    def _probe_due(self, model: cost.CostModel, B: int, H: int, Vw: int, S: int, width: int) -> bool:
        """Measure the union this step? Only when the union path could win at all (with the smallest union the
        sets allow, ``S / B``), and then every :data:`PROBE_EVERY` steps (the union changes slowly; the last
        measurement is reused in between)."""
        lo = max(1, S // B)
        z = cost.StepSizes(B, H, Vw, S, lo, positions=self._positions)
        if cost.choose(model, z, cost.union_bucket(lo, B, width, Vw)) != "union":
            return False
        self._probes += 1
        return self._probes % PROBE_EVERY == 1 or PROBE_EVERY == 1

    def prepare(self, batch: DraftBatch) -> None:
        """Decide the step's path, and on the union path gather the union's rows, as soon as the batch is frozen:
        before the drafter's first forward instead of at its first draft position. On CPU this runs in order.

        CUDA only (not run on this project's CPU test machines): the work is issued on a side stream that first
        waits for the current stream (the sets' updates), the plan's tensors are recorded on the current stream
        for the caching allocator, and the first draft position waits for the side stream's event
        (:meth:`_wait_prepared`), so the gather overlaps the drafter's forward: the paper's asynchronous gather.
        Nothing is prepared before the head is bound (the drafter not loaded yet: the first position decides)."""
        if self.binding is None or batch.active is None:
            return
        if self.device.type != "cuda":
            self.step_path(batch)
            return
        main = torch.cuda.current_stream(self.device)
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            _, plan = self.step_path(batch)
            self._ready = torch.cuda.Event()
            self._ready.record(self._side)
        if plan is not None:
            for t in (plan.rows, plan.size, plan.col, plan.valid, plan.fits, plan.weight_rows):
                t.record_stream(main)

    def _wait_prepared(self) -> None:
        """CUDA: make the current stream wait for :meth:`prepare`'s side-stream work (a device-side wait)."""
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None

    def _forget(self, ref: Any) -> None:
        """The step's batch is gone: drop its plan (the buffers stay in the workspace)."""
        if ref is self._step:
            self._step, self._plan = None, None

    def _scores(self, h: torch.Tensor, logprobs: bool, batch: DraftBatch) -> SparseHeadOutput:
        b = self.binding
        assert b is not None and batch.active is not None
        ids, counts = batch.active
        if b.scale != 1.0:
            h = h * b.scale
        _, plan = self.step_path(batch)
        ratio = self.dense_fallback_ratio
        impl = self.impl  # with a plan, the union path runs whatever impl says
        if b.shard is not None:  # every rank scores its shard's ids; all ranks get the same answer
            return sparse_head_sharded(h, b.weight, ids, counts, row_index=b.local_row_index,
                                       all_gather=b.all_gather, want_logprobs=logprobs, vocab_size=b.vocab_size,
                                       impl=impl, dense_fallback_ratio=ratio, union_plan=plan)
        return sparse_head(h, b.weight, ids, counts, row_index=b.row_index, want_logprobs=logprobs,
                           vocab_size=b.vocab_size, impl=impl, dense_fallback_ratio=ratio, union_plan=plan)

    def sample(self, proposer: Any, hidden: torch.Tensor, sampling_metadata: Any,
               batch: DraftBatch) -> tuple[Any | None, HeadCounts]:
        """Draft tokens for this position of ``batch`` (or ``None``: "not mine", call vLLM's own head) and what
        this position adds to the statistics."""
        plan = batch.plan
        if not plan.on_rows or batch.active is None:
            return None, HeadCounts()
        if hidden.shape[0] != plan.batch_size:
            return None, HeadCounts(fallback=1)  # parallel drafting: rows are not requests
        if self.binding is None:
            self.bind(proposer.model)
        self._positions = max(1, int(getattr(proposer, "num_speculative_tokens", 1) or 1))
        greedy = not proposer._enable_probabilistic_draft_probs or sampling_metadata.all_greedy
        if not greedy and self.binding.soft_cap is not None:
            return None, HeadCounts(fallback=1)  # soft-capped logits: the pruned softmax needs the raw scores
        self._wait_prepared()
        path, _ = self.step_path(batch)  # decided by prepare() or at the step's first position, then cached
        report, self._unreported = self._unreported, False
        if report:
            self.path_steps[path] += 1
        if path == "dense":  # vLLM's own head is the cheapest: the whole position is handed back, unmasked
            return None, HeadCounts(path=path if report else None, handed_back=True)
        # host-known: the rows this position's head scores, and the path once per step
        counts = HeadCounts(sparse_rows=len(plan.on_rows), path=path if report else None)
        if greedy:
            return (self._greedy(proposer, hidden, batch), None), counts
        return self._probabilistic(proposer, hidden, sampling_metadata, batch), counts

    def _greedy(self, proposer: Any, hidden: torch.Tensor, batch: DraftBatch) -> torch.Tensor:
        on, plan = batch.on_idx, batch.plan
        tok = self._scores(hidden[on], False, batch).token_ids
        tok = torch.where(tok < 0, self._fallback, tok)  # a row with no draftable id: the fallback id (device)
        if not plan.off_rows:
            return tok
        res = torch.empty(plan.batch_size, dtype=torch.int64, device=hidden.device)
        res[on] = tok
        res[batch.off_idx] = proposer._greedy_sample(hidden[batch.off_idx]).long()
        return res

    def _probabilistic(self, proposer: Any, hidden: torch.Tensor, sampling_metadata: Any,
                       batch: DraftBatch) -> Any:
        on, plan, vocab = batch.on_idx, batch.plan, self.binding.vocab_size
        out = self._scores(hidden[on], True, batch)
        logits = torch.full((plan.batch_size, vocab), float("-inf"), dtype=torch.float32, device=hidden.device)
        lp, fid = out.logprobs, self.fallback_id  # log-softmax over the active set; a per-row shift of the scores
        # no draftable id in the set (all -inf): that row's distribution is one-hot at the fallback id, selected on
        # the device; the draft probabilities reported are that distribution, so verification stays exact
        lp[:, fid] = torch.where(out.token_ids < 0, torch.zeros_like(lp[:, fid]), lp[:, fid])
        logits[on] = lp
        if plan.off_rows:
            logits[batch.off_idx] = proposer.model.compute_logits(hidden[batch.off_idx]).float()
        return proposer._sample_from_logits(logits, sampling_metadata)
