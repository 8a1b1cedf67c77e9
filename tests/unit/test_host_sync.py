"""No host wait per step: a counter of host reads of device data over fake engine steps driven through the runtime.

On a CPU machine the "device" is the host, so a real sync cannot be observed; :class:`HostReadCounter` counts
what would be one on CUDA instead. It wraps, while active, every Python-level way to read device data on the host
(``item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``cpu``, ``numpy``, ``nonzero``,
boolean-mask indexing), blocking copies between host and device memory (``copy_`` / ``to`` without
``non_blocking``), and ``torch.tensor`` / ``torch.as_tensor`` with a ``device`` argument (a blocking copy on CUDA).
Tensors that live in host memory on a GPU machine too (the runtime's staging buffers, vLLM's ``*_cpu`` tensors,
tensors built from host lists) may be read freely: the counter knows them by storage. On a CUDA machine the same
steps also run under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any, Self

import pytest
import torch

from nanospec_vllm.vllm.runtime import NanoSpecRuntime

from .fakes import admit, fake_runner

V, H = 1000, 16


class HostReadCounter:
    """Records ``(what, shape)`` for every host read of device data while active (see the module docstring)."""

    _METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")

    def __init__(self, host: list[torch.Tensor] = ()) -> None:
        self.events: list[tuple[str, tuple[int, ...]]] = []
        self._host = {t.untyped_storage().data_ptr() for t in host}
        self._saved: list[tuple[Any, str, Any]] = []

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
        return self

    def __exit__(self, *exc: object) -> None:
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
    assert torch.Tensor.item.__name__ == "item"  # restored


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
        tok, probs = rt.head.sample(proposer, hidden[pos * 3: pos * 3 + 3], NS(all_greedy=greedy))
        assert (probs is None) == greedy
        drafts.append(tok)
    rt.after_propose(torch.stack(drafts, 1))
    return rt.end_step()


def _host_tensors(rt: Any, qsl: torch.Tensor) -> list[torch.Tensor]:
    guard = [] if rt.guard is None else rt.guard.host_buffers()
    return [*rt.staging.host_buffers(), *rt.stats.host_buffers(), *guard, qsl]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("prompt_topk", [False, True])
def test_a_step_reads_no_device_data(device: str, greedy: bool, prompt_topk: bool) -> None:
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0)).to(device)
    r, rt, proposer = _runner({"target_topk": 2, "capacity": 64, "prompt_topk": prompt_topk,
                               "kernel": "torch"}, device, w)
    r.input_batch.num_computed_tokens_cpu[:] = [0, 0, 0, 0]
    r.input_batch.num_prompt_tokens[:] = [3, 2, 1, 0]
    qsl = torch.tensor([0, 3, 5, 6])  # vLLM's host copy of the query start locations
    sync_mode = torch.cuda.get_sync_debug_mode() if device == "cuda" else None
    inputs = _inputs(device)
    with HostReadCounter(host=_host_tensors(rt, qsl)) as c:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            _admit(r, rt, {"a": ([1, 2, 3], None), "b": ([4, 5], 0), "c": ([6], "on")})
            payload = _step(r, rt, proposer, inputs, greedy, qsl)
            payload2 = _step(r, rt, proposer, inputs, greedy, qsl)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(sync_mode)
    assert c.events == [], f"host reads of device data in a step: {c.events}"
    tot = rt.stats.totals  # off the hot path: waits for the copies in flight
    # drafted positions with an emitted token per step: a -> 2 (2, 7), c -> 2 (6, 8); b is off
    assert tot["target"] == 8
    assert tot["size_n"] == 4  # 2 NanoSpec rows x 2 steps, recorded once per propose
    if device == "cpu":  # the host is the device: every step's figures are ready at its own end
        assert payload["target"] == 4 and payload2["target"] == 4 and len(payload["sizes"]) == 2


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
    assert c.events == [], f"host reads of device data in a step: {c.events}"
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
    assert rt.ctx.plan.guarded_rows == (0,) and rt.ctx.plan.on_rows == (2,)
    tok, _ = rt.head.sample(proposer, hidden[:3], NS(all_greedy=True))
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
            tok, probs = rt.head.sample(proposer, hidden, NS(all_greedy=greedy))
            rt.end_step()
        assert c.events == []
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
    import sys

    from nanospec_vllm.vllm.runtime import IndexStaging

    if not with_vllm:
        monkeypatch.setitem(sys.modules, "vllm.v1.utils", None)  # import fails
    st = IndexStaging(4, torch.device("cpu"))
    assert type(st.buf).__name__ == ("CpuGpuBuffer" if with_vllm else "_PinnedPair")
    a = st.put((3, -1, 0), (0, 2), (1,), (), (5, 6))
    assert [t.tolist() for t in a] == [[3, -1, 0], [0, 2], [1], [], [5, 6]]
    b = st.put((7, 8), (9,))
    assert [t.tolist() for t in a] == [[3, -1, 0], [0, 2], [1], [], [5, 6]], "step N's views overwritten in N+1"
    assert [t.tolist() for t in b] == [[7, 8], [9]]
    big = st.put(list(range(15)), list(range(10)))
    assert [t.tolist() for t in big] == [list(range(15)), list(range(10))]
    assert not any(t.untyped_storage().data_ptr() == st.buf.cpu.untyped_storage().data_ptr() for t in a), \
        "the device-side views must not alias the host staging memory"
