"""vLLM's ``apply_top_k_only`` on an empty batch: the bug the ``patch_topk_sampler`` register entry works around,
and the patched function (what the plugin installs) on empty and non-empty batches."""

from __future__ import annotations

import pytest
import torch

from nanospec_vllm.vllm.patches import patch_topk_sampler


def _orig():
    from vllm.v1.sample.ops import topk_topp_sampler as m

    f = m.apply_top_k_only
    return getattr(f, "__wrapped__", f)


def test_vllm_fails_on_an_empty_batch():
    """If this starts passing, vLLM guards the empty batch and the patch can go (see its ``removal``)."""
    with pytest.raises(RuntimeError, match="numel\\(\\) == 0|reduction"):
        _orig()(torch.empty(0, 10), torch.empty(0, dtype=torch.int64))


def test_patched_returns_an_empty_batch_unchanged_and_matches_vllm_otherwise():
    fixed = patch_topk_sampler._make(_orig())
    empty = torch.empty(0, 10)
    assert fixed(empty, torch.empty(0, dtype=torch.int64)) is empty
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, generator=g)
    k = torch.tensor([2, 10, 5])
    want = _orig()(logits.clone(), k.clone())
    got = fixed(logits.clone(), k.clone())
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got[0]).sum() == 2 and torch.isfinite(got[1]).sum() == 10 and torch.isfinite(got[2]).sum() == 5
