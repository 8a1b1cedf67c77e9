"""Known answers that do not come from the code under test: a hand-written map, a plain dense matmul, top-k
worked out by hand. The other kernel tests compare implementations with the reference; these check the reference
(and every implementation) against answers computed without it.
"""

from __future__ import annotations

import pytest
import torch

from nanospec_vllm import ops

from .conftest import DEVICES, IMPLS, require_impl

pytestmark = pytest.mark.kernels


def test_row_index_from_d2t_tiny_map() -> None:
    # draft rows 0..3 produce target ids 2, 5, 6, 9 (d2t holds offsets: target = row + d2t[row])
    d2t = torch.tensor([2, 4, 4, 6])
    ri = ops.row_index_from_d2t(d2t, 10)
    assert ri.tolist() == [-1, -1, 0, -1, -1, 1, 2, -1, -1, 3]
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        ops.row_index_from_d2t(torch.tensor([0, 9]), 10)  # row 1 -> id 10, out of range


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_all_ids_active_equals_dense_argmax(impl: str, device: str) -> None:
    """With every id active the sparse head is the full head: tokens equal a plain fp32 ``(h @ W.T).argmax``."""
    require_impl(impl, device)
    g = torch.Generator().manual_seed(7)
    V, H, B = 5_003, 64, 6
    w = (torch.randn(V, H, generator=g) * 0.05).to(torch.bfloat16)
    h = torch.randn(B, H, generator=g).to(torch.bfloat16)
    want = (h.float() @ w.float().T).argmax(dim=1)
    ids = torch.randperm(V, generator=g).to(torch.int32).repeat(B, 1)  # every id, in a shuffled order
    counts = torch.full((B,), V, dtype=torch.int32)
    out = ops.sparse_head(h.to(device), w.to(device), ids.to(device), counts.to(device), impl=impl)
    assert out.token_ids.cpu().tolist() == want.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_topk_with_duplicates_by_hand(impl: str, device: str) -> None:
    """Scores are the ids' own weight rows dotted with h = [1, 0]: score(id) = W[id, 0], chosen by hand."""
    require_impl(impl, device)
    w = torch.zeros(10, 2)
    w[:, 0] = torch.tensor([0.0, 5.0, 3.0, 5.0, 1.0, 4.0, 0.0, 2.0, 0.0, 3.0])
    h = torch.tensor([[1.0, 0.0]])
    # candidates with duplicates (3 twice, 5 twice), a padding -1, and one id past the count
    ids = torch.tensor([[3, 5, 3, 1, 9, 5, -1, 2, 4, 7]], dtype=torch.int32)
    counts = torch.tensor([9], dtype=torch.int32)  # id 7 (the 10th entry) is not a candidate
    out = ops.sparse_head(h.to(device), w.to(device), ids.to(device), counts.to(device), topk=5, impl=impl,
                          want_logprobs=True, vocab_size=10)
    # distinct candidates {1:5, 2:3, 3:5, 4:1, 5:4, 9:3}; ties to the lowest id: 1, 3, 5, 2, 9
    assert out.token_ids.tolist() == [1]
    assert out.topk_ids.cpu().tolist() == [[1, 3, 5, 2, 9]]
    assert out.topk_scores.cpu().tolist() == [[5.0, 5.0, 4.0, 3.0, 3.0]]
    lp = out.logprobs.cpu()[0]
    z = torch.tensor([5.0, 3.0, 5.0, 1.0, 4.0, 3.0]).exp().sum().log()
    assert torch.allclose(lp[[1, 2, 3, 4, 5, 9]], torch.tensor([5.0, 3.0, 5.0, 1.0, 4.0, 3.0]) - z, atol=1e-5)
    assert torch.isinf(lp[[0, 6, 7, 8]]).all()  # 7 is past the count: not in the distribution
