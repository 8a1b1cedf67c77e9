"""Per-request active vocabularies in preallocated device buffers (no vLLM imports).

The pool is sized once (``num_slots`` x ``capacity``) on the model's device, like the KV cache, and slots follow
request admission, preemption and completion through :meth:`ActiveVocabPool.allocate` / :meth:`free`.

Per slot it keeps:

* ``bitmap[slot]``: ``ceil(V / 32)`` int32 words, bit ``i`` set when token id ``i`` is active (membership test
  and de-duplication in O(1) per id);
* ``ids[slot, :counts[slot]]``: the compact list of active ids (the rows the sparse head gathers), pinned ids
  (special ids, static hot set) first, then ids in the order they were admitted;
* ``counts[slot]``, ``admitted[slot]`` (ids ever admitted after the pinned ones; the FIFO ring position) and
  ``dropped[slot]`` (ids refused because the set was full under the ``stop`` policy).

:meth:`extend` adds a ``[B, n]`` batch of candidate ids (``-1`` = padding) to ``B`` distinct slots with a fixed
number of tensor ops: no host synchronisation, no data-dependent shapes, deterministic results. New ids are
admitted in the order of arrival, so when a set fills up the candidates EARLIER in a row win (callers put the most
useful first: emitted tokens, then the target's top-1, top-2, ...); duplicates count at their first occurrence. Bits are set with
an integer ``index_add_`` of distinct, unset bits, which equals a bitwise OR and is exact in any order.

Host side per step: a free list and ``req_id -> slot`` (plain Python). Nothing on the per-step path reads device
data back: :meth:`extend`, :meth:`contains`, :meth:`active`, :meth:`allocate` and :meth:`free` only launch device
ops (scalar fills, gathers, scatters); :meth:`seed` copies the prompt ids from pinned memory with
``non_blocking=True``. Only :meth:`active_list` (tests, tools) syncs.

Memory: ``num_slots * (4 * ceil(V/32) + 4 * (capacity + 1) + 20)`` bytes, e.g. 256 slots x V=151,936 x 3,072 ids
= 8.0 MiB (:attr:`nbytes`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import torch

__all__ = ["ActiveVocabPool", "PoolFullError"]


class PoolFullError(RuntimeError):
    """No free slot is left (more live requests than the pool was sized for)."""


class ActiveVocabPool:
    def __init__(
        self,
        num_slots: int,
        vocab_size: int,
        capacity: int,
        device: torch.device | str = "cpu",
        pinned_ids: Iterable[int] = (),
        policy: str = "stop",
    ) -> None:
        if num_slots < 1 or vocab_size < 1 or capacity < 1:
            raise ValueError(f"num_slots, vocab_size and capacity must be >= 1 ({num_slots}, {vocab_size}, {capacity})")
        if policy not in ("stop", "fifo"):
            raise ValueError(f"policy must be 'stop' or 'fifo' (got {policy!r})")
        pinned = sorted({int(i) for i in pinned_ids})
        bad = [i for i in pinned if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"pinned ids out of range [0, {vocab_size}): {bad[:5]}")
        if len(pinned) >= capacity:
            raise ValueError(f"{len(pinned)} pinned ids leave no room in capacity {capacity}")
        self.num_slots = num_slots
        self.vocab_size = vocab_size
        self.capacity = capacity
        self.policy = policy
        self.device = torch.device(device)
        self.num_words = (vocab_size + 31) // 32
        self.num_pinned = len(pinned)
        self.pinned_ids: tuple[int, ...] = tuple(pinned)  # host copy (sorted)
        dev = self.device
        self.bitmap = torch.zeros(num_slots, self.num_words, dtype=torch.int32, device=dev)
        # One scratch column at index `capacity` absorbs writes of refused ids (static shapes, no masking sync).
        self.ids = torch.full((num_slots, capacity + 1), -1, dtype=torch.int32, device=dev)
        self.counts = torch.zeros(num_slots, dtype=torch.int32, device=dev)
        self.admitted = torch.zeros(num_slots, dtype=torch.int64, device=dev)
        self.dropped = torch.zeros(num_slots, dtype=torch.int64, device=dev)
        # Template row for pinned ids, copied into a slot at allocation.
        self._pinned_ids = torch.tensor(pinned, dtype=torch.int32, device=dev)
        self._pinned_bitmap = torch.zeros(self.num_words, dtype=torch.int32, device=dev)
        if pinned:
            self._set_bits(self._pinned_bitmap, self._pinned_ids.long())
        # slot -> [1] index tensor as a view (no host-to-device copy when seeding one slot)
        self._slot_index = torch.arange(num_slots, dtype=torch.int64, device=dev)
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[Hashable, int] = {}

    # ---- bookkeeping (host side, O(1)) ----
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bitmap, self.ids, self.counts, self.admitted, self.dropped))

    @property
    def num_in_use(self) -> int:
        return len(self._slot_of)

    def slot_of(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot_of

    def keys(self) -> list[Hashable]:
        return list(self._slot_of)

    def allocate(self, key: Hashable) -> int:
        """Give ``key`` a fresh slot holding only the pinned ids. Re-allocating a live key resets its slot."""
        slot = self._slot_of.get(key)
        if slot is None:
            if not self._free:
                raise PoolFullError(f"all {self.num_slots} NanoSpec slots are in use")
            slot = self._free.pop()
            self._slot_of[key] = slot
        self.bitmap[slot].copy_(self._pinned_bitmap)
        self.ids[slot].fill_(-1)
        if self.num_pinned:
            self.ids[slot, : self.num_pinned].copy_(self._pinned_ids)
        self.counts[slot] = self.num_pinned
        self.admitted[slot] = 0
        self.dropped[slot] = 0
        return slot

    def free(self, key: Hashable) -> bool:
        """Release ``key``'s slot; returns False when it held none (idempotent)."""
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return False
        self.dropped[slot] = 0  # a finished request must not keep counting in the dropped metric
        self._free.append(slot)
        return True

    # ---- device-side updates ----
    def seed(self, key: Hashable, token_ids: torch.Tensor | Sequence[int]) -> int:
        """Allocate (or reset) ``key``'s slot and add ``token_ids`` (e.g. the prompt). Returns the slot."""
        slot = self.allocate(key)
        t = self.to_device(torch.as_tensor(token_ids, dtype=torch.int64)).reshape(1, -1)
        if t.numel():
            self.extend(self._slot_index[slot: slot + 1], t)
        return slot

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the pool's device without a blocking host wait: a host tensor is copied from pinned memory
        with ``non_blocking=True`` (the caching host allocator keeps the pinned block until the copy has run);
        a tensor already on the device (or a CPU pool) is returned as is."""
        if t.device.type == "cpu" and self.device.type != "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device, non_blocking=True)  # same device: no copy; device -> device: stream-ordered

    def extend(self, slots: torch.Tensor, new_ids: torch.Tensor) -> None:
        """Add candidate ids ``new_ids[b, :]`` to slot ``slots[b]``; ``-1`` (or any id outside ``[0, V)``) is padding.

        ``slots`` must be distinct. Ids already active are ignored; what does not fit follows the policy.
        """
        if new_ids.dim() != 2 or slots.dim() != 1 or new_ids.shape[0] != slots.shape[0]:
            raise ValueError(f"expected slots [B] and new_ids [B, n], got {tuple(slots.shape)} and {tuple(new_ids.shape)}")
        if new_ids.shape[1] == 0 or new_ids.shape[0] == 0:
            return
        V, cap = self.vocab_size, self.capacity
        slots = slots.to(self.device, torch.int64, non_blocking=True)
        x = new_ids.to(self.device, torch.int64, non_blocking=True)
        x = torch.where((x >= 0) & (x < V), x, torch.full_like(x, V))
        # De-duplicate within the row keeping each id's FIRST occurrence, and keep the order of arrival: a stable
        # sort makes equal ids neighbours (earliest first); the "first" flags are scattered back to row order.
        sx, perm = torch.sort(x, dim=1, stable=True)
        first_sorted = torch.ones_like(sx, dtype=torch.bool)
        first_sorted[:, 1:] = sx[:, 1:] != sx[:, :-1]
        first = torch.empty_like(first_sorted).scatter_(1, perm, first_sorted)
        valid = (x < V) & first
        x = x.clamp(max=V - 1)
        word = x >> 5
        bit = x & 31
        rows = slots[:, None]
        present = ((self.bitmap[rows, word].long() >> bit) & 1).bool()
        new = valid & ~present
        rank = new.long().cumsum(1)  # 1-based rank among this row's new ids
        if self.policy == "stop":
            pos = self.counts[slots].long()[:, None] + rank - 1
            accept = new & (pos < cap)
            self.dropped[slots] += (new & ~accept).sum(1)
        else:  # fifo ring over the non-pinned positions
            ring = cap - self.num_pinned
            t = self.admitted[slots][:, None] + rank - 1
            accept = new & (rank <= ring)
            self.dropped[slots] += (new & ~accept).sum(1)
            pos = self.num_pinned + t % ring
            evict = accept & (t >= ring)
            old = self.ids[rows, pos.clamp(max=cap)].long().clamp(min=0)
            self._add_bits(slots, old, evict, sign=-1)
        n_acc = accept.sum(1)
        pos = torch.where(accept, pos, torch.full_like(pos, cap))
        self.ids[rows.expand_as(pos), pos] = torch.where(accept, x, torch.full_like(x, -1)).to(torch.int32)
        self.ids[:, cap] = -1
        self._add_bits(slots, x, accept, sign=1)
        if self.policy == "stop":
            self.counts[slots] = (self.counts[slots].long() + n_acc).to(torch.int32)
        else:
            self.admitted[slots] += n_acc
            self.counts[slots] = (self.admitted[slots] + self.num_pinned).clamp(max=cap).to(torch.int32)

    def _add_bits(self, slots: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, sign: int) -> None:
        # Distinct bits that are all unset (sign=+1) or all set (sign=-1): integer add == bitwise OR / AND-NOT.
        val = torch.where(mask, (1 << (x & 31)) * sign, torch.zeros_like(x)).to(torch.int32)
        flat = slots[:, None] * self.num_words + (x >> 5)
        self.bitmap.view(-1).index_add_(0, flat.reshape(-1), val.reshape(-1))

    @staticmethod
    def _set_bits(bitmap_row: torch.Tensor, ids: torch.Tensor) -> None:
        val = (1 << (ids & 31)).to(torch.int32)
        bitmap_row.index_add_(0, ids >> 5, val)

    # ---- reads ----
    def contains(self, slots: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, n]``: is ``token_ids[b, j]`` active in ``slots[b]`` (ids outside ``[0, V)`` -> False)."""
        slots = slots.to(self.device, torch.int64, non_blocking=True)
        x = token_ids.to(self.device, torch.int64, non_blocking=True)
        ok = (x >= 0) & (x < self.vocab_size)
        xc = x.clamp(0, self.vocab_size - 1)
        w = self.bitmap[slots[:, None], xc >> 5].long()
        return ok & (((w >> (xc & 31)) & 1) == 1)

    def active(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B, capacity] int32 padded with -1, counts [B] int32)`` for the sparse head (static shape)."""
        slots = slots.to(self.device, torch.int64, non_blocking=True)
        return self.ids[slots, : self.capacity], self.counts[slots]

    def active_list(self, key: Hashable) -> list[int]:
        """The active ids of ``key`` as a Python list (syncs: for tests, tools and debugging only)."""
        slot = self._slot_of[key]
        n = int(self.counts[slot])
        return self.ids[slot, :n].tolist()
