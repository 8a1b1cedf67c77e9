"""vLLM's ``apply_top_k_only`` on an empty batch: the bug the ``patch_topk_sampler`` register entry works around,
and the patched function (what the plugin installs) on empty and non-empty batches, inside a NanoSpec engine's
step and outside one (every other engine: vLLM's behaviour, failure included)."""

from __future__ import annotations

import pytest
import torch

from nanospec_vllm.vllm.patches import patch_topk_sampler
from nanospec_vllm.vllm.patches.scope import in_nanospec_step, nanospec_step

EMPTY_BATCH_ERROR = "numel\\(\\) == 0|reduction"


def _orig():
    from vllm.v1.sample.ops import topk_topp_sampler as m

    return getattr(m, "_nanospec_orig_apply_top_k_only", m.apply_top_k_only)  # vLLM's, patched or not


def test_vllm_fails_on_an_empty_batch():
    """If this starts passing, vLLM guards the empty batch and the patch can go (see its ``removal``)."""
    with pytest.raises(RuntimeError, match=EMPTY_BATCH_ERROR):
        _orig()(torch.empty(0, 10), torch.empty(0, dtype=torch.int64))


def _check_matches_vllm(fixed) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, generator=g)
    k = torch.tensor([2, 10, 5])
    want = _orig()(logits.clone(), k.clone())
    got = fixed(logits.clone(), k.clone())
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got[0]).sum() == 2 and torch.isfinite(got[1]).sum() == 10 and torch.isfinite(got[2]).sum() == 5


def test_patched_in_a_nanospec_step_returns_an_empty_batch_unchanged_and_matches_vllm_otherwise():
    fixed = patch_topk_sampler._make(_orig())
    empty = torch.empty(0, 10)
    with nanospec_step():
        assert in_nanospec_step()
        assert fixed(empty, torch.empty(0, dtype=torch.int64)) is empty
        _check_matches_vllm(fixed)
    assert not in_nanospec_step()


def test_patched_outside_a_nanospec_step_is_vllms_function():
    """An engine without a `nanospec` block never runs inside the scope: it gets vLLM's result and vLLM's error."""
    fixed = patch_topk_sampler._make(_orig())
    with pytest.raises(RuntimeError, match=EMPTY_BATCH_ERROR):
        fixed(torch.empty(0, 10), torch.empty(0, dtype=torch.int64))
    _check_matches_vllm(fixed)
