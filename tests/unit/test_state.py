"""ActiveVocabPool: membership, dedupe, capacity policies, lifecycle, determinism (CPU tensors)."""

import random

import pytest
import torch

from nanospec_vllm.state import ActiveVocabPool, PoolFullError

V = 151_936


def _arrivals(batch, known):
    """New ids of one batch in order of first arrival (the pool keeps arrival order)."""
    out = []
    for x in batch:
        if 0 <= x < V and x not in known and x not in out:
            out.append(x)
    return out


def python_model(pinned, cap, policy, batches):
    """A plain-Python model of one slot: the id list the pool must hold after the given extends."""
    head = sorted(set(pinned))
    if policy == "stop":
        ids = list(head)
        for b in batches:
            new = _arrivals(b, set(ids))
            ids += new[: max(0, cap - len(ids))]
        return ids
    ring = cap - len(head)
    slots: list = [None] * ring  # ring position -> id
    admitted = 0
    for b in batches:
        live = set(head) | {x for x in slots if x is not None}
        for x in _arrivals(b, live)[:ring]:
            slots[admitted % ring] = x
            admitted += 1
    return head + [x for x in slots if x is not None]


@pytest.mark.parametrize("policy", ["stop", "fifo"])
def test_matches_python_model_random(policy):
    rng = random.Random(0)
    pinned = [151643, 151645, 0]
    cap = 40
    pool = ActiveVocabPool(8, V, cap, pinned_ids=pinned, policy=policy)
    keys = [f"r{i}" for i in range(5)]
    history = {k: [] for k in keys}
    for k in keys:
        pool.allocate(k)
    for _ in range(12):
        batch_keys = rng.sample(keys, 3)
        rows = []
        for k in batch_keys:
            row = [rng.choice([-1, rng.randrange(60), rng.randrange(V), V - 1, V + 5]) for _ in range(7)]
            rows.append(row)
            history[k].append(row)
        slots = torch.tensor([pool.slot_of(k) for k in batch_keys])
        pool.extend(slots, torch.tensor(rows))
    for k in keys:
        expect = python_model(pinned, cap, policy, history[k])
        got = pool.active_list(k)
        assert got == expect, (k, policy)
        # bitmap agrees with the list exactly
        slot = pool.slot_of(k)
        words = pool.bitmap[slot].tolist()
        from_bits = sorted(w * 32 + b for w, word in enumerate(words) for b in range(32) if (word >> b) & 1)
        assert from_bits == sorted(got)


def test_stop_policy_counts_dropped_and_never_exceeds_capacity():
    pool = ActiveVocabPool(2, V, 10, pinned_ids=[1, 2])
    slot = pool.seed("a", list(range(100, 130)))
    assert int(pool.counts[slot]) == 10
    assert pool.active_list("a") == [1, 2] + list(range(100, 108))
    assert int(pool.dropped[slot]) == 22
    # already-active ids are not "dropped" again
    pool.extend(torch.tensor([slot]), torch.tensor([[100, 101, 1]]))
    assert int(pool.dropped[slot]) == 22


def test_fifo_evicts_oldest_and_keeps_pinned():
    pool = ActiveVocabPool(1, 1000, 5, pinned_ids=[999], policy="fifo")
    s = pool.seed("a", [1, 2, 3, 4])
    assert pool.active_list("a") == [999, 1, 2, 3, 4]
    pool.extend(torch.tensor([s]), torch.tensor([[5, 6]]))
    assert sorted(pool.active_list("a")) == [3, 4, 5, 6, 999]
    assert pool.contains(torch.tensor([s]), torch.tensor([[1, 2, 3, 999]])).tolist() == [[False, False, True, True]]
    # an evicted id can come back
    pool.extend(torch.tensor([s]), torch.tensor([[1]]))
    assert sorted(pool.active_list("a")) == [1, 4, 5, 6, 999]


def test_duplicates_padding_and_out_of_range_are_ignored():
    pool = ActiveVocabPool(1, V, 100)
    pool.seed("a", [7, 7, -1, V, V + 100, 3, 7, V - 1])
    assert pool.active_list("a") == [7, 3, V - 1]  # order of first arrival


def test_lifecycle_allocate_free_reuse_and_full():
    pool = ActiveVocabPool(2, 100, 8, pinned_ids=[99])
    a = pool.seed("a", [1, 2])
    pool.seed("b", [3])
    assert pool.num_in_use == 2
    with pytest.raises(PoolFullError):
        pool.allocate("c")
    assert pool.free("a") and not pool.free("a")
    c = pool.seed("c", [5])
    assert c == a  # slot reused, old contents gone
    assert pool.active_list("c") == [99, 5]
    assert not pool.contains(torch.tensor([c]), torch.tensor([[1, 2]])).any()
    # re-seeding a live key resets it (resume after preemption)
    pool.seed("c", [6])
    assert pool.active_list("c") == [99, 6]


def test_batch_extend_rows_independent_and_deterministic():
    def run():
        pool = ActiveVocabPool(4, V, 64)
        for k in "abcd":
            pool.allocate(k)
        g = torch.Generator().manual_seed(3)
        for _ in range(5):
            new = torch.randint(-1, 500, (4, 16), generator=g)
            pool.extend(torch.tensor([3, 1, 0, 2]), new)
        return pool.ids.clone(), pool.bitmap.clone(), pool.counts.clone()

    a, b = run(), run()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_active_view_is_static_shape():
    pool = ActiveVocabPool(3, 1000, 16)
    pool.seed("a", [1, 2, 3])
    pool.seed("b", [4])
    ids, counts = pool.active(torch.tensor([pool.slot_of("b"), pool.slot_of("a")]))
    assert ids.shape == (2, 16) and ids.dtype == torch.int32
    assert counts.tolist() == [1, 3]
    assert ids[0, :1].tolist() == [4] and ids[0, 1:].eq(-1).all()


def test_nbytes_reported():
    pool = ActiveVocabPool(256, V, 3072)
    words = (V + 31) // 32
    assert pool.nbytes == 256 * (4 * words + 4 * 3073 + 4 + 8 + 8)
    assert pool.nbytes < 9 * 2**20


@pytest.mark.parametrize("kwargs,msg", [
    ({"num_slots": 0, "vocab_size": 10, "capacity": 4}, ">= 1"),
    ({"num_slots": 1, "vocab_size": 10, "capacity": 4, "policy": "lru"}, "policy"),
    ({"num_slots": 1, "vocab_size": 10, "capacity": 4, "pinned_ids": [10]}, "out of range"),
    ({"num_slots": 1, "vocab_size": 10, "capacity": 2, "pinned_ids": [1, 2]}, "no room"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ActiveVocabPool(**kwargs)


def test_full_set_keeps_order_of_arrival_not_lowest_ids():
    # the old pool sorted each batch, so a full set kept the LOWEST ids ([1, 3, 5, 700])
    pool = ActiveVocabPool(1, V, 4)
    pool.seed("a", [900, 800, 700, 5, 3, 1])
    assert pool.active_list("a") == [900, 800, 700, 5]
    assert int(pool.dropped[0]) == 2
    assert pool.contains(torch.tensor([0]), torch.tensor([[900, 1, 3]])).tolist() == [[True, False, False]]


def test_full_set_arrival_order_per_row_in_a_batch_with_duplicates():
    pool = ActiveVocabPool(2, V, 5, pinned_ids=[42])
    a, b = pool.allocate("a"), pool.allocate("b")
    pool.extend(torch.tensor([b, a]), torch.tensor([[9, 42, 9, 8, 7, 6, 5, 4], [-1, 300, 200, 300, 100, 1, 0, 2]]))
    assert pool.active_list("b") == [42, 9, 8, 7, 6]  # pinned 42 and the duplicate 9 take no room
    assert pool.active_list("a") == [42, 300, 200, 100, 1]
    assert int(pool.dropped[b]) == 2 and int(pool.dropped[a]) == 2


def test_fifo_admits_in_arrival_order():
    pool = ActiveVocabPool(1, 1000, 4, policy="fifo")
    s = pool.seed("a", [50, 40, 30])
    pool.extend(torch.tensor([s]), torch.tensor([[20, 10]]))  # 20 fills the set, 10 evicts the oldest (50)
    assert sorted(pool.active_list("a")) == [10, 20, 30, 40]
    assert pool.contains(torch.tensor([s]), torch.tensor([[50]])).tolist() == [[False]]


def test_free_resets_dropped_counter():
    pool = ActiveVocabPool(1, V, 4)
    pool.seed("a", list(range(10)))
    assert int(pool.dropped[0]) == 6
    assert pool.free("a")
    assert int(pool.dropped[0]) == 0  # a finished request must not keep counting
    pool.seed("b", [1, 2])
    assert int(pool.dropped[0]) == 0


def test_extend_order_fixed_op_count_no_sync():
    # the same ops whatever the data: a CPU profile of two extends with different contents has the same op list
    def ops(rows):
        pool = ActiveVocabPool(2, V, 6)
        pool.allocate("a")
        pool.allocate("b")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            pool.extend(torch.tensor([0, 1]), torch.tensor(rows))
        return [e.name for e in prof.events() if e.name.startswith("aten::")]

    assert ops([[1, 2, 3, 4, 5, 6, 7, 8], [-1] * 8]) == ops([[9, 9, 9, 1, 1, 1, 0, V + 3], [5, 4, 3, 2, 1, 0, 7, 8]])
