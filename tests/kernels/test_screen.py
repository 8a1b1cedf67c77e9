"""The low-rank screen (nanospec_vllm.tools.screen): factor quality, exact recovery at full rank, ordering, cost."""

import pytest
import torch

from nanospec_vllm.tools.screen import build_factor, screen_bytes, screen_candidates


def _low_rank_head(V=2000, d=64, r=8, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, r, generator=g) @ torch.randn(r, d, generator=g) + noise * torch.randn(V, d, generator=g)
    return w


def test_factor_reconstructs_and_is_best_rank_r():
    w = _low_rank_head()
    a, b = build_factor(w, 8)
    assert a.shape == (2000, 8) and b.shape == (64, 8)
    rel = torch.linalg.norm(w - a @ b.T) / torch.linalg.norm(w)
    assert rel < 0.02
    # optimal: equals the SVD truncation error
    s = torch.linalg.svdvals(w.double())
    best = torch.sqrt((s[8:] ** 2).sum()) / torch.sqrt((s ** 2).sum())
    assert float(rel) == pytest.approx(float(best), rel=1e-3)


def test_full_rank_screen_finds_the_exact_argmax():
    w = torch.randn(500, 32, generator=torch.Generator().manual_seed(1))
    h = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    f = build_factor(w, 32)
    ids = screen_candidates(h, f, 4)
    assert ids.shape == (16, 4) and ids.dtype == torch.int64
    assert torch.equal(ids[:, 0], (h @ w.T).argmax(1))


def test_low_rank_screen_recall_on_low_rank_head():
    w = _low_rank_head()
    h = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    ids = screen_candidates(h, build_factor(w, 8), 8)
    truth = (h @ w.T).argmax(1)
    assert (ids == truth[:, None]).any(1).float().mean() > 0.95


def test_ties_go_to_lowest_id_and_errors():
    w = torch.zeros(10, 4)
    w[[7, 3, 5], 0] = 1.0
    ids = screen_candidates(torch.tensor([[1.0, 0, 0, 0]]), build_factor(w, 1), 3)
    assert ids.tolist() == [[3, 5, 7]]
    with pytest.raises(ValueError):
        build_factor(w, 5)
    with pytest.raises(ValueError):
        screen_candidates(torch.zeros(1, 3), build_factor(w, 1), 2)


def test_bytes():
    assert screen_bytes(151_936, 896, 64, 32) == 2 * ((151_936 + 896) * 64 + 32 * 896)
    assert screen_bytes(151_936, 896, 64, 32) / (151_936 * 896 * 2) < 0.08
