"""Drift test: every vLLM symbol a NanoSpec patch touches still exists with the signature the patch expects.

A vLLM upgrade that renames or re-signs one of them fails here, in CI, instead of in production. Also checks the
register itself: every patch says why and how it will be removed, targets are unique, and applying the register
twice is a no-op.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from nanospec_vllm.vllm.patches import all_patches, apply_all
from nanospec_vllm.vllm.patches.base import Patch

PATCHES = all_patches()


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.target)
def test_target_exists_with_expected_signature(patch: Patch):
    owner, attr, current = patch.resolve()
    # check the original (if already patched in this process, the saved original)
    orig = getattr(owner, f"_nanospec_orig_{attr}", current)
    patch.check_signature(orig)
    assert patch.why and patch.removal


def test_targets_unique():
    targets = [p.target for p in PATCHES]
    assert len(targets) == len(set(targets))


def test_apply_all_idempotent_and_marks_targets():
    apply_all()
    apply_all()
    for p in PATCHES:
        if not p.when():
            continue
        _, _, current = p.resolve()
        assert getattr(current, "_nanospec_patch", None) == p.name, p.target


def test_register_entry_point_declared():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "nanospec"]
    assert eps and eps[0].value == "nanospec_vllm.vllm.plugin:register"
    from nanospec_vllm.vllm.plugin import register

    assert eps[0].load() is register
