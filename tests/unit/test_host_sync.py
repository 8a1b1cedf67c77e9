"""No host wait per step: a counter of host reads of device data over fake engine steps driven through the runtime.

On a CPU machine the "device" is the host, so a real sync cannot be observed; :class:`HostReadCounter` counts
what would be one on CUDA instead, at two levels:

* Python: it wraps, while active, every Python-level way to read device data on the host (``item``, ``tolist``,
  ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``cpu``, ``numpy``, ``nonzero``, boolean-mask
  indexing), blocking copies between host and device memory (``copy_`` / ``to`` without ``non_blocking``), and
  ``torch.tensor`` / ``torch.as_tensor`` with a ``device`` argument (a blocking copy on CUDA);
* PyTorch's dispatcher (:class:`SyncOpCounter`, a ``TorchDispatchMode``, which sees every ATen op that runs, also
  inside library code and on CPU tensors): the ops whose result's size or value the host must wait for, wherever
  they are called from: ``nonzero`` (also ``torch.where(cond)``, ``argwhere``), ``_local_scalar_dense`` (``item``,
  ``int()``, ``bool()``), ``unique*``, ``masked_select``, ``bincount``, ``equal`` / ``allclose``,
  ``repeat_interleave`` without ``output_size``, indexing or index assignment with a boolean mask, and blocking
  device -> host copies.

Tensors that live in host memory on a GPU machine too (the runtime's staging buffers, vLLM's ``*_cpu`` tensors,
tensors built from host lists) may be read freely: the counter knows them by storage. On a CUDA machine the same
steps also run under ``torch.cuda.set_sync_debug_mode("error")``. The steps run through the runtime's hooks,
through the patch wrappers vLLM's runner and proposer call, and with each sparse head implementation this machine
has (PyTorch, the native CPU kernel, the dense strategy, Triton: on CUDA, or on CPU under ``TRITON_INTERPRET=1``
in a fresh process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import MethodType
from types import SimpleNamespace as NS
from typing import Any, Self

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanospec_vllm.vllm.runtime import NanoSpecRuntime

from .fakes import admit, fake_runner

V, H = 1000, 16
aten = torch.ops.aten

#: ATen ops (overload packets) the host always waits for: their output's size or value depends on device data
SYNC_OPS = frozenset({aten.nonzero, aten._local_scalar_dense, aten.is_nonzero, aten.masked_select, aten._unique,
                      aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive,
                      aten.bincount, aten.equal, aten.allclose})
#: index ops that sync when an index is a boolean mask (turned into positions with nonzero inside the kernel)
MASK_INDEX_OPS = frozenset({aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_})


class SyncOpCounter(TorchDispatchMode):
    """Records ``(op, shape)`` for every ATen op that makes the host wait for the device (see the module docstring)
    and that reads at least one tensor not in ``is_host`` memory."""

    def __init__(self, is_host: Any) -> None:
        super().__init__()
        self.is_host = is_host
        self.events: list[tuple[str, tuple[int, ...]]] = []

    def _why(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            return f"aten.{packet.__name__}"
        if packet is aten.repeat_interleave and kwargs.get("output_size") is None and len(args) < 4:
            return "aten.repeat_interleave without output_size"
        if packet in MASK_INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                return f"aten.{packet.__name__} with a boolean mask"
        if packet is aten._to_copy and not kwargs.get("non_blocking", False):
            src, dst = args[0].device, kwargs.get("device")
            if dst is not None and torch.device(dst).type == "cpu" and src.type != "cpu":
                return "aten._to_copy device -> host"
        if packet is aten.copy_ and args[0].device.type == "cpu" and args[1].device.type != "cpu" and not (
                args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
            return "aten.copy_ device -> host"
        return None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        why = self._why(func, args, kwargs)
        if why is not None:
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            device = [t for t in tensors if not self.is_host(t)]
            if device:
                self.events.append((why, tuple(device[0].shape)))
        return func(*args, **kwargs)


class HostReadCounter:
    """Records ``(what, shape)`` for every host read of device data while active (see the module docstring)."""

    _METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")

    def __init__(self, host: list[torch.Tensor] = ()) -> None:
        self.events: list[tuple[str, tuple[int, ...]]] = []
        self._host = {t.untyped_storage().data_ptr() for t in host}
        self._keep: list[torch.Tensor] = list(host)  # host memory is known by address: keep it from being reused
        self._saved: list[tuple[Any, str, Any]] = []
        self.ops = SyncOpCounter(self.is_host)

    def found(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every host read seen: Python-level ones, then the syncing ATen ops."""
        return self.events + self.ops.events

    def is_host(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self._host

    def _record(self, what: str, t: torch.Tensor) -> None:
        self.events.append((what, tuple(t.shape)))

    def _patch(self, owner: Any, name: str, make: Any) -> None:
        orig = getattr(owner, name)
        self._saved.append((owner, name, orig))
        setattr(owner, name, make(orig))

    def __enter__(self) -> Self:
        counter = self

        def reader(name: str) -> Any:
            def make(orig: Any) -> Any:
                def wrapped(t: torch.Tensor, *a: Any, **k: Any) -> Any:
                    if not counter.is_host(t):
                        counter._record(name, t)
                    return orig(t, *a, **k)
                return wrapped
            return make

        for name in self._METHODS:
            self._patch(torch.Tensor, name, reader(name))

        def _has_mask(index: Any) -> bool:
            items = index if isinstance(index, tuple) else (index,)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

        def getitem(orig: Any) -> Any:
            def wrapped(t: torch.Tensor, index: Any) -> Any:
                if _has_mask(index) and not counter.is_host(t):
                    counter._record("mask-index", t)
                return orig(t, index)
            return wrapped

        def setitem(orig: Any) -> Any:
            def wrapped(t: torch.Tensor, index: Any, value: Any) -> Any:
                if _has_mask(index) and not counter.is_host(t):
                    counter._record("mask-assign", t)
                return orig(t, index, value)
            return wrapped

        def copy_(orig: Any) -> Any:
            def wrapped(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> Any:
                if not non_blocking and isinstance(src, torch.Tensor) and counter.is_host(src) != counter.is_host(dst):
                    counter._record("blocking-copy", src)
                return orig(dst, src, non_blocking)
            return wrapped

        def to(orig: Any) -> Any:
            def wrapped(t: torch.Tensor, *a: Any, **k: Any) -> Any:
                moves = "device" in k or any(isinstance(x, (torch.device, str)) for x in a)
                if moves and not k.get("non_blocking", False) and counter.is_host(t):
                    counter._record("blocking-to", t)
                return orig(t, *a, **k)
            return wrapped

        def factory(name: str) -> Any:
            def make(orig: Any) -> Any:
                def wrapped(*a: Any, **k: Any) -> Any:
                    out = orig(*a, **k)
                    if k.get("device") is not None:
                        counter._record(f"{name}(device=)", out)
                    elif isinstance(out, torch.Tensor) and out.device.type == "cpu" and not (
                            a and isinstance(a[0], torch.Tensor)):
                        counter._host.add(out.untyped_storage().data_ptr())  # built from host data: host memory
                        counter._keep.append(out)  # alive while counting: its address is never reused
                    return out
                return wrapped
            return make

        self._patch(torch.Tensor, "__getitem__", getitem)
        self._patch(torch.Tensor, "__setitem__", setitem)
        self._patch(torch.Tensor, "copy_", copy_)
        self._patch(torch.Tensor, "to", to)
        self._patch(torch, "tensor", factory("torch.tensor"))
        self._patch(torch, "as_tensor", factory("torch.as_tensor"))
        self._patch(torch, "nonzero", reader("torch.nonzero"))
        self.ops.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ops.__exit__(*exc)
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        self._saved.clear()


# ---------------------------------------------------------------------------------------------- the counter itself
def test_counter_sees_every_kind_of_host_read() -> None:
    """The counter must fail a step that syncs: each of these is one event; host tensors are free to read."""
    d = torch.arange(6)
    host = torch.arange(3)
    with HostReadCounter(host=[host]) as c:
        host.tolist()
        int(host[1])
        d.sum().item()
        d.tolist()
        bool((d > 2).any())
        int(d[0])
        d[d > 2]
        d[d > 4] = 0
        torch.tensor([1, 2], device="cpu")
        torch.nonzero(d)
        d.cpu()
        lst = torch.tensor([1, 2])  # built from a host list: host memory
        lst.to("cpu")  # a blocking host -> device copy on CUDA
        lst.to("cpu", non_blocking=True)
        d.copy_(torch.tensor([0] * 6))  # blocking host -> device
        torch.zeros(6, dtype=torch.int64).copy_(d, non_blocking=True)
    kinds = [k for k, _ in c.events]
    assert kinds == ["item", "tolist", "__bool__", "__int__", "mask-index", "mask-assign",
                     "torch.tensor(device=)", "torch.nonzero", "cpu", "blocking-to", "blocking-copy"], kinds
    ops = [k for k, _ in c.ops.events]  # the same reads seen in the dispatcher (host ones excepted)
    assert ops == ["aten._local_scalar_dense", "aten._local_scalar_dense", "aten._local_scalar_dense",
                   "aten.index with a boolean mask", "aten.index_put_ with a boolean mask", "aten.nonzero"], ops
    assert torch.Tensor.item.__name__ == "item"  # restored


def test_counter_sees_syncs_inside_pytorch() -> None:
    """Ops that wait for the device without a Python-level read: each is one event, wherever it is called from;
    their sync-free forms (and any op on host memory) are none."""
    d = torch.tensor([3, 0, 2, 2, 5])
    host = torch.tensor([1, 0, 1])
    with HostReadCounter(host=[host]) as c:
        torch.where(d < 1)  # one argument: nonzero
        torch.argwhere(d)
        torch.unique(d)
        torch.unique(d.view(5, 1), dim=0)
        torch.unique_consecutive(d)
        torch.masked_select(d, d > 1)
        torch.repeat_interleave(d, d)
        torch.bincount(d)
        torch.equal(d, d)
        # sync-free: output sizes known on the host, selects instead of compaction
        torch.repeat_interleave(d, d, output_size=12)
        torch.where(d < 1, d, torch.zeros_like(d))
        torch.nonzero_static(d, size=5)
        d.masked_fill(d > 1, 0)
        d.index_select(0, torch.tensor([0, 2]))
        torch.where(host)  # host memory: no wait
        host.unique()
    assert [k for k, _ in c.ops.events] == [
        "aten.nonzero", "aten.nonzero", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
        "aten.masked_select", "aten.repeat_interleave without output_size", "aten.bincount", "aten.equal"]
    assert c.events == []
    torch.where(d < 1)  # the counter has left the dispatcher
    assert len(c.ops.events) == 9


# ---------------------------------------------------------------------------------------------- fake engine steps
def _runner(cfg: dict, device: str, w: torch.Tensor, d2t: torch.Tensor | None = None) -> tuple[Any, Any, Any]:
    model = NS(lm_head=NS(weight=w), logits_processor=NS(scale=1.0, soft_cap=None),
               compute_logits=lambda h: h.float() @ w.float().T)
    if d2t is not None:
        model.draft_id_to_target_id = d2t
        model.compute_logits = None  # never called: rows of the EAGLE-3 case here are all NanoSpec rows
    proposer = NS(model=model, _enable_probabilistic_draft_probs=False,
                  _greedy_sample=lambda h: (h.float() @ w.float().T).argmax(-1),
                  _sample_from_logits=lambda logits, md: (logits.argmax(-1), logits.softmax(-1)))
    block = dict({"always_active_special_ids": False}, **cfg)
    r = fake_runner(V, device, vllm_config=NS(additional_config={"nanospec": block}), drafter=proposer, model=model)
    rt = NanoSpecRuntime.maybe_create(r)  # binds the head: the drafter is "loaded"
    assert rt is not None and rt.head.binding is not None
    return r, rt, proposer


_admit = admit


def _inputs(dev: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What vLLM hands over, on the device: verification logits, sampled ids, drafter hidden states."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3 + 2 + 3, V, generator=g).to(dev)
    sampled = torch.tensor([[2, 7, -1], [4, -1, -1], [6, 8, 9]]).to(dev)
    hidden = torch.randn(8, H, generator=g).to(dev)
    return logits, sampled, hidden


def _step(r: Any, rt: Any, proposer: Any, inputs: tuple, greedy: bool, qsl: torch.Tensor) -> dict:
    """One verification + propose (2 draft positions) + end of step, as vLLM's ``sample_tokens`` drives it."""
    logits, sampled, hidden = inputs
    proposer._enable_probabilistic_draft_probs = not greedy
    rt.begin_step()
    rt.on_verification_logits(logits)
    rt.before_propose(r, sampled, NS(num_draft_tokens=[2, 1, 2]), hidden, NS(query_start_loc_cpu=qsl))
    drafts = []
    for pos in range(2):
        h = hidden[pos * 3: pos * 3 + 3]
        out = rt.draft(proposer, h, NS(all_greedy=greedy))
        if out is None:  # handed back (the cost model chose vLLM's own head): what the proposer patch then runs
            logits_full = proposer.model.compute_logits(h)
            out = (proposer._greedy_sample(h), None) if greedy else proposer._sample_from_logits(logits_full, None)
        tok, probs = out
        assert (probs is None) == greedy
        drafts.append(tok)
    rt.after_propose(torch.stack(drafts, 1))
    return rt.end_step()


def _host_tensors(rt: Any, qsl: torch.Tensor) -> list[torch.Tensor]:
    guard = [] if rt.guard is None else rt.guard.host_buffers()
    head = getattr(rt.head, "host_buffers", list)()  # a head that copies figures back keeps them in host memory
    return [*rt.staging.host_buffers(), *rt.stats.host_buffers(), *guard, *head, qsl]


def _patch(name: str, orig: Any) -> Any:
    """The register's wrapper for ``name`` (the attribute a patch replaces) around ``orig``, as a function."""
    from nanospec_vllm.vllm.patches import all_patches

    (p,) = [p for p in all_patches() if p.target.split(":")[1].rsplit(".", 1)[-1] == name]
    w = p.make(orig)
    return w.__func__ if isinstance(w, staticmethod) else w


def _install_wrappers(r: Any, proposer: Any) -> None:
    """Give the fake runner and proposer vLLM's methods as the plugin leaves them: the register's wrappers around
    stand-ins for vLLM's originals that call each other as vLLM's V1 runner does (``sample_tokens`` ->
    ``_sample`` -> ``propose_draft_token_ids`` -> the drafter's ``_sample_draft_tokens`` per draft position).
    ``r.fake`` holds what vLLM would hand over (inputs, greedy, the host query start locations)."""
    pytest.importorskip("vllm")  # the sample_tokens wrapper reads vLLM's output types

    def update_states(self: Any, so: Any) -> None:  # vLLM: the scheduled requests become the batch
        for nr in so.scheduled_new_reqs:
            self.requests[nr.req_id] = nr.state
        if so.scheduled_new_reqs:
            self.input_batch.req_ids = [nr.req_id for nr in so.scheduled_new_reqs]
            self.input_batch.num_reqs = len(so.scheduled_new_reqs)

    def execute_model(self: Any, so: Any, intermediate_tensors: Any = None) -> None:
        return None  # the output comes from sample_tokens

    def sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        top_k = _patch("apply_top_k_only", lambda lg, k: lg)  # the rejection sampler's top-k, as patched
        top_k(logits[:0], None)
        return top_k(logits, None)

    def sample_tokens(self: Any, grammar_output: Any) -> Any:
        logits, sampled, hidden = self.fake.inputs
        spec, attn = NS(num_draft_tokens=[2, 1, 2]), NS(query_start_loc_cpu=self.fake.qsl)
        self._sample(logits, spec)
        drafts = self.propose_draft_token_ids(None, sampled, NS(all_greedy=self.fake.greedy), hidden, hidden, None,
                                              spec, attn, None)
        return NS(sampled_token_ids=sampled, draft_token_ids=drafts)

    def propose(self: Any, so: Any, sampled: Any, sampling_metadata: Any, hidden: Any, sample_hidden: Any,
                aux: Any, spec: Any, attn: Any, slot_mappings: Any) -> Any:
        toks = []
        for pos in range(2):
            tok, probs = self.drafter._sample_draft_tokens(hidden[pos * 3: pos * 3 + 3], sampling_metadata)
            assert (probs is None) == sampling_metadata.all_greedy
            toks.append(tok)
        return torch.stack(toks, 1)

    def full_head(self: Any, hidden: Any, sampling_metadata: Any) -> Any:
        """vLLM's own head: asked only when NanoSpec hands the whole step back (``kernel: dense``)."""
        if not getattr(r.fake, "vllm_head", False):
            raise AssertionError("every row of these batches is NanoSpec's or vLLM's full head inside NanoSpec's call")
        logits = self.model.compute_logits(hidden)
        return logits.argmax(-1), (None if sampling_metadata.all_greedy else logits.softmax(-1))

    for name, orig in (("_update_states", update_states), ("execute_model", execute_model), ("_sample", sample),
                       ("sample_tokens", sample_tokens), ("propose_draft_token_ids", propose)):
        setattr(r, name, MethodType(_patch(name, orig), r))
    proposer._sample_draft_tokens = MethodType(_patch("_sample_draft_tokens", full_head), proposer)


def _scheduled(reqs: dict[str, tuple[list[int], object]] | None = None) -> NS:
    """A scheduler output: ``reqs`` (id -> (prompt ids, per-request switch)) new, nothing else."""
    new = [NS(req_id=rid, state=NS(prompt_token_ids=p, output_token_ids=[], sampling_params=NS(
        extra_args=None if sw is None else {"nanospec": sw}, all_stop_token_ids=[]))) for rid, (p, sw) in
        (reqs or {}).items()]
    return NS(finished_req_ids=[], preempted_req_ids=[], scheduled_new_reqs=new,
              scheduled_cached_reqs=NS(resumed_req_ids=[]))


def _wrapped_step(r: Any, so: Any) -> Any:
    """One engine step as vLLM's worker drives it (through the patch wrappers)."""
    r._update_states(so)
    r.execute_model(so, None)
    return r.sample_tokens(None)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: sparse head implementations: kernel setting and extra config (``dense``: the dense strategy at any size)
KERNELS = {"torch": {"kernel": "torch"}, "native": {"kernel": "native"}, "triton": {"kernel": "triton"},
           "dense": {"kernel": "torch", "dense_fallback_ratio": 1e-3}, "union": {"kernel": "union"},
           "auto": {"kernel": "auto"}, "vllm-head": {"kernel": "dense"}}


def _kernel_cfg(kernel: str, device: str) -> dict:
    import typing

    from nanospec_vllm.config import NanoSpecConfig
    from nanospec_vllm.ops import available_impls

    cfg = KERNELS[kernel]
    choices = typing.get_args(NanoSpecConfig.model_fields["kernel"].annotation)
    if cfg["kernel"] not in choices:
        pytest.skip(f"no {cfg['kernel']} sparse head in this version")
    if cfg["kernel"] not in ("union", "auto", "dense") and cfg["kernel"] not in available_impls(device):
        pytest.skip(f"{cfg['kernel']} sparse head not available on {device}")
    return cfg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("via", ["hooks", "patches"])
@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("prompt_topk", [False, True])
def test_a_step_reads_no_device_data(device: str, kernel: str, via: str, greedy: bool, prompt_topk: bool) -> None:
    """Two steps of three requests (one switched off): admission, verification top-k, set updates, coverage,
    two draft positions, statistics. ``via="hooks"`` calls the runtime's hooks; ``via="patches"`` drives vLLM's
    methods as patched (runner and proposer wrappers, the top-k sampler's)."""
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0)).to(device)
    r, rt, proposer = _runner({"target_topk": 2, "capacity": 64, "prompt_topk": prompt_topk,
                               **_kernel_cfg(kernel, device)}, device, w)
    r.input_batch.num_computed_tokens_cpu[:] = [0, 0, 0, 0]
    r.input_batch.num_prompt_tokens[:] = [3, 2, 1, 0]
    qsl = torch.tensor([0, 3, 5, 6])  # vLLM's host copy of the query start locations
    sync_mode = torch.cuda.get_sync_debug_mode() if device == "cuda" else None
    inputs = _inputs(device)
    reqs = {"a": ([1, 2, 3], None), "b": ([4, 5], 0), "c": ([6], "on")}
    if via == "patches":
        _install_wrappers(r, proposer)
        r.fake = NS(inputs=inputs, greedy=greedy, qsl=qsl, vllm_head=kernel == "vllm-head")
        proposer._enable_probabilistic_draft_probs = not greedy
    with HostReadCounter(host=_host_tensors(rt, qsl)) as c:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            if via == "hooks":
                _admit(r, rt, reqs)
                payload = _step(r, rt, proposer, inputs, greedy, qsl)
                payload2 = _step(r, rt, proposer, inputs, greedy, qsl)
            else:
                out = _wrapped_step(r, _scheduled(reqs))
                out2 = _wrapped_step(r, _scheduled())
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(sync_mode)
    assert c.found() == [], f"host reads of device data in a step: {c.found()}"
    tot = rt.stats.totals  # off the hot path: waits for the copies in flight
    # drafted positions with an emitted token per step: a -> 2 (2, 7), c -> 2 (6, 8); b is off
    assert tot["target"] == 8
    assert tot["size_n"] == 4  # 2 NanoSpec rows x 2 steps, recorded once per propose
    if kernel == "vllm-head":  # every step handed back: vLLM's head drafted, NanoSpec scored nothing
        assert tot["path_dense"] == 2 and tot["sparse_rows"] == 0, tot
    if via == "patches":  # NanoSpec drafted the on rows (b, switched off, by vLLM's head inside the same call)
        assert out.draft_token_ids.shape == out2.draft_token_ids.shape == (3, 2) and rt.ctx is None
    elif device == "cpu":  # the host is the device: every step's figures are ready at its own end
        assert payload["target"] == 4 and payload2["target"] == 4 and len(payload["sizes"]) == 2


@pytest.mark.parametrize("via", ["hooks", "patches"])
def test_a_sync_injected_into_the_step_is_caught(monkeypatch, via: str) -> None:
    """The counter must fail a step that syncs inside PyTorch: ``torch.where(tok < 0)[0]`` (a one-argument
    ``where``: ``nonzero``) added to the sparse head's greedy path is one ``aten.nonzero`` per draft position."""
    from nanospec_vllm.vllm.head import SparseDraftHead

    greedy_head = SparseDraftHead._greedy

    def injected(self: Any, proposer: Any, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        tok = greedy_head(self, proposer, hidden, batch)
        torch.where(tok < 0)[0]  # the injected sync
        return tok

    monkeypatch.setattr(SparseDraftHead, "_greedy", injected)
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    r, rt, proposer = _runner({"target_topk": 2, "capacity": 64, "kernel": "torch"}, "cpu", w)
    qsl = torch.tensor([0, 3, 5, 6])
    reqs = {"a": ([1, 2, 3], None), "b": ([4, 5], 0), "c": ([6], "on")}
    inputs = _inputs("cpu")
    if via == "patches":
        _install_wrappers(r, proposer)
        r.fake = NS(inputs=inputs, greedy=True, qsl=qsl)
    with HostReadCounter(host=_host_tensors(rt, qsl)) as c:
        if via == "hooks":
            _admit(r, rt, reqs)
            _step(r, rt, proposer, inputs, True, qsl)
        else:
            _wrapped_step(r, _scheduled(reqs))
    assert c.found() == [("aten.nonzero", (3,)), ("aten.nonzero", (3,))]  # 2 positions x [3 rows]


def test_triton_head_in_a_fresh_process() -> None:
    """The Triton sparse head's steps on CPU: under ``TRITON_INTERPRET=1``, which must be set before triton is
    first imported, so in a fresh process running this file's Triton cases (skipped here when this process can
    run them itself, or has no triton)."""
    from nanospec_vllm.ops import available_impls, triton_kernels

    if "triton" in available_impls("cpu"):
        pytest.skip("this process runs the Triton cases itself")
    if triton_kernels.triton is None:
        pytest.skip("triton is not installed")
    root = Path(__file__).resolve().parents[2]
    cases = [f"{Path(__file__)}::test_a_step_reads_no_device_data[False-{greedy}-{via}-triton-cpu]"
             for greedy in (True, False) for via in ("hooks", "patches")]  # prompt_topk off: the head is the point
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *cases], cwd=root,
                       capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=900,
                       check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "4 passed" in out and "skipped" not in out, out[-3000:]


@pytest.mark.parametrize("device", DEVICES)
def test_the_guard_sends_a_low_coverage_request_to_the_full_head_without_host_reads(device: str) -> None:
    """``guard_coverage: 0.99`` with a 1-position window: after its first verification a request whose emitted
    tokens were not all active is guarded; from the next plan on it drafts with the full head (vLLM's
    ``_greedy_sample``) while its set is still updated, and the statistics count it. No host read of device
    data on the way (the flags arrive through the guard's own pinned copies)."""
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0)).to(device)
    r, rt, proposer = _runner({"target_topk": 0, "capacity": 64, "kernel": "torch", "guard_coverage": 0.99,
                               "guard_window": 1}, device, w)
    assert rt.guard is not None
    qsl = torch.tensor([0, 3, 5, 6])
    inputs = _inputs(device)
    with HostReadCounter(host=_host_tensors(rt, qsl)) as c:
        _admit(r, rt, {"a": ([1, 2, 3], None), "b": ([4, 5], 0), "c": ([6, 8, 9], "on")})
        _step(r, rt, proposer, inputs, True, qsl)  # a: 2, 7 emitted at drafted positions, 2 active; c: 6, 8 both
        assert rt.ctx is None
        _step(r, rt, proposer, inputs, True, qsl)
    assert c.found() == [], f"host reads of device data in a step: {c.found()}"
    assert rt.guard.poll()[rt.pool.slot_of("a")] is True and rt.guard.poll()[rt.pool.slot_of("c")] is False
    tot = rt.stats.totals
    assert tot["planned"] == 4 and tot["guarded"] == 1 and tot["guard_fires"] == 1
    # the guarded request's set keeps the emitted tokens (7), but not the full head's drafts of step 2: with them in
    # the set, its next coverage count would read the full head's acceptance
    assert set(rt.pool.active_list("a")) == {1, 2, 3, 7}
    # a third step, looked at closely: a drafts the full head's argmax, c the argmax over its set
    _, sampled, hidden = inputs
    rt.begin_step()
    rt.before_propose(r, sampled, NS(num_draft_tokens=[2, 1, 2]), hidden, NS(query_start_loc_cpu=qsl))
    assert rt.ctx.batch.plan.guarded_rows == (0,) and rt.ctx.batch.plan.on_rows == (2,)
    tok, _ = rt.draft(proposer, hidden[:3], NS(all_greedy=True))
    rt.end_step()
    full = (hidden[:3].float() @ w.float().T).argmax(-1)
    assert int(tok[0]) == int(full[0]) and int(tok[1]) == int(full[1])
    c_ids = torch.tensor(rt.pool.active_list("c"), device=device)
    assert int(tok[2]) == int(c_ids[(hidden[2].float() @ w[c_ids].float().T).argmax()])


def test_a_row_with_no_draftable_id_drafts_the_fallback_on_the_device() -> None:
    """EAGLE-3 reduced head: draft rows 0..9 produce target ids 500..509. Request a's set (its prompt) holds none
    of them: it drafts the lowest draftable id (500, no pinned id is draftable), picked by ``torch.where``;
    request c's set holds 503 and 507: it drafts the better scoring of the two. No host read on the way."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(10, H, generator=g)
    d2t = torch.full((10,), 500, dtype=torch.int64)  # target id = draft row + 500
    r, rt, proposer = _runner({"target_topk": 0, "capacity": 16, "kernel": "torch"}, "cpu", w, d2t)
    assert rt.head.fallback_id == 500
    qsl = torch.tensor([0, 1, 2])
    hidden = torch.randn(2, H, generator=g)
    nothing = torch.full((2, 1), -1)
    for greedy in (True, False):
        with HostReadCounter(host=_host_tensors(rt, qsl)) as c:
            _admit(r, rt, {"a": ([1, 2, 3], None), "c": ([503, 507, 9], None)})
            proposer._enable_probabilistic_draft_probs = not greedy
            rt.begin_step()
            rt.before_propose(r, nothing, None)
            tok, probs = rt.draft(proposer, hidden, NS(all_greedy=greedy))
            rt.end_step()
        assert c.found() == []
        s = hidden @ w.T
        want_c = 503 if s[1, 3] > s[1, 7] else 507
        assert tok.tolist() == [500, want_c]
        if not greedy:  # the distribution a row sampled from is what it reports: one-hot at the fallback id
            assert probs[0, 500] == 1.0 and probs[0].sum() == pytest.approx(1.0)
            assert probs[1, [503, 507]].sum() == pytest.approx(1.0)


@pytest.mark.parametrize("with_vllm", [True, False])
def test_index_staging_round_trip(monkeypatch, with_vllm: bool) -> None:
    """The staged vectors come back exact, side by side; the previous step's views survive one more step (ring of
    two); more than ``5 x max_rows`` values still work (one-off copy). Without vLLM a local pinned pair is used."""
    from nanospec_vllm.hostcopy import IndexStaging
    from nanospec_vllm.vllm.runtime import _vllm_staging_buffer

    if not with_vllm:
        monkeypatch.setitem(sys.modules, "vllm.v1.utils", None)  # import fails
    st = IndexStaging(4, torch.device("cpu"), _vllm_staging_buffer())
    assert type(st.buf).__name__ == ("CpuGpuBuffer" if with_vllm else "PinnedPair")
    a = st.put((3, -1, 0), (0, 2), (1,), (), (5, 6))
    assert [t.tolist() for t in a] == [[3, -1, 0], [0, 2], [1], [], [5, 6]]
    b = st.put((7, 8), (9,))
    assert [t.tolist() for t in a] == [[3, -1, 0], [0, 2], [1], [], [5, 6]], "step N's views overwritten in N+1"
    assert [t.tolist() for t in b] == [[7, 8], [9]]
    big = st.put(list(range(15)), list(range(10)))
    assert [t.tolist() for t in big] == [list(range(15)), list(range(10))]
    assert not any(t.untyped_storage().data_ptr() == st.buf.cpu.untyped_storage().data_ptr() for t in a), \
        "the device-side views must not alias the host staging memory"
