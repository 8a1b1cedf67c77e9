"""``LaggedHostCopies`` (the statistics' and the guard's device -> host channel): order, no wait for copies that
have not arrived, a wait for the oldest when the ring is full, and the one-off buffer for a wide vector."""

from __future__ import annotations

import torch

from nanospec_vllm.hostcopy import LaggedHostCopies


class _Event:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def _copies(ring: int = 2, width: int = 3) -> tuple[LaggedHostCopies, list]:
    got: list = []
    return LaggedHostCopies(ring, width, torch.int64, torch.device("cpu"),
                            lambda host, meta: got.append((host.tolist(), meta))), got


def test_cpu_copies_are_read_in_order_with_their_meta() -> None:
    c, got = _copies()
    c.push(torch.tensor([1, 2]), "a")
    c.push(torch.tensor([3, 4, 5]), "b")
    c.read(wait=False)
    assert got == [([1, 2], "a"), ([3, 4, 5], "b")] and len(c) == 0


def test_unfinished_copies_wait_unless_asked_and_a_full_ring_waits_for_the_oldest() -> None:
    c, got = _copies(ring=2)
    c.push(torch.tensor([1]), 1)
    c._pending[-1].event = e1 = _Event()  # as on CUDA, before the copy has run
    c.push(torch.tensor([2]), 2)
    c._pending[-1].event = _Event()
    c.read(wait=False)
    assert got == [] and len(c) == 2  # nothing has arrived: nothing read, no wait
    c.push(torch.tensor([3]), 3)  # both ring rows in flight: the oldest is waited for and read first
    assert e1.done and got == [([1], 1)] and len(c) == 2
    c.read(wait=True)
    assert [m for _, m in got] == [1, 2, 3]


def test_a_vector_wider_than_a_row_gets_a_one_off_buffer() -> None:
    c, got = _copies(ring=2, width=3)
    c.push(torch.arange(5), "wide")
    c.read(wait=False)
    assert got == [([0, 1, 2, 3, 4], "wide")]
    assert c.buf.shape == (2, 3)
