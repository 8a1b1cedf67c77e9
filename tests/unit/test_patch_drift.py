"""Drift test: every vLLM symbol a NanoSpec patch touches still exists with the signature the patch expects.

A vLLM upgrade that renames or re-signs one of them fails here, in CI, instead of in production: the parameter
names (``Patch.expect_params``, also checked at start-up), and each parameter's kind and default, which must be
those of the wrapper the patch installs (a wrapper that passes its own default on would otherwise override a
default vLLM changed). Also checks the register itself: every patch says why and how it will be removed, targets
are unique, and applying the register twice is a no-op.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

pytest.importorskip("vllm")

from nanospec_vllm.vllm.patches import all_patches, apply_all
from nanospec_vllm.vllm.patches.base import Patch, PatchError

PATCHES = all_patches()
METHOD_PATCHES = [p for p in PATCHES if p.expect_params is not None]
FIELD_PATCHES = [p for p in PATCHES if p.expect_params is None]


def _original(patch: Patch) -> Any:
    """vLLM's own object (the saved original when the patch is applied in this process), read statically: through
    the class a saved ``staticmethod`` would come back as its plain function (the suite applies the register in
    earlier tests, so this test must not depend on order)."""
    owner, attr, current = patch.resolve()
    return inspect.getattr_static(owner, f"_nanospec_orig_{attr}", current)


def param_spec(fn: Any, follow_wrapped: bool = True) -> list[tuple[str, str, Any]]:
    """``(name, kind, default)`` per parameter; annotations are left out (they differ in spelling only)."""
    f = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn
    params = inspect.signature(f, follow_wrapped=follow_wrapped).parameters.values()
    return [(p.name, p.kind.name, p.default) for p in params]


def spec_drift(orig: Any, wrapper: Any) -> list[str]:
    """What differs between vLLM's function and the wrapper written for it: names, kinds, defaults, arity.
    vLLM's function is read through its decorators (``__wrapped__``, as ``Patch.check_signature`` reads it); the
    wrapper's own parameters are read, never the function a ``__wrapped__`` on it points to (that is vLLM's)."""
    a, b = param_spec(orig), param_spec(wrapper, follow_wrapped=False)
    out = [f"{x} != {y}" for x, y in zip(a, b) if x != y]
    if len(a) != len(b):
        out.append(f"{len(a)} parameters in vLLM, {len(b)} in the wrapper")
    return out


@pytest.mark.parametrize("patch", METHOD_PATCHES, ids=lambda p: p.target)
def test_target_exists_with_expected_signature(patch: Patch):
    orig = _original(patch)
    patch.check_signature(orig)  # names, in order
    assert patch.why and patch.removal


@pytest.mark.parametrize("patch", METHOD_PATCHES, ids=lambda p: p.target)
def test_wrapper_matches_kinds_and_defaults(patch: Patch):
    orig = _original(patch)
    wrapper = patch.make(orig)  # builds the replacement only; nothing is installed
    assert isinstance(wrapper, staticmethod) == isinstance(orig, staticmethod), patch.target
    assert isinstance(wrapper, classmethod) == isinstance(orig, classmethod), patch.target
    assert spec_drift(orig, wrapper) == [], patch.target


def test_spec_drift_sees_a_changed_default_kind_or_new_parameter():
    """The comparison above fails on each kind of drift it is meant to catch."""
    def vllm_fn(self, a, b=None, *, c=1):
        pass

    def same(self, a, b=None, *, c=1):
        pass

    def new_default(self, a, b=0, *, c=1):
        pass

    def keyword(self, a, b=None, c=1):
        pass

    def shorter(self, a, b=None):
        pass

    assert spec_drift(vllm_fn, same) == []
    assert spec_drift(vllm_fn, new_default) == [("('b', 'POSITIONAL_OR_KEYWORD', None) != "
                                                 "('b', 'POSITIONAL_OR_KEYWORD', 0)")]
    assert len(spec_drift(vllm_fn, keyword)) == 1 and "KEYWORD_ONLY" in spec_drift(vllm_fn, keyword)[0]
    assert spec_drift(vllm_fn, shorter) == ["4 parameters in vLLM, 3 in the wrapper"]
    shorter.__wrapped__ = vllm_fn  # what functools.wraps sets: the wrapper's own parameters still count
    assert spec_drift(vllm_fn, shorter) == ["4 parameters in vLLM, 3 in the wrapper"]


@pytest.mark.parametrize("patch", FIELD_PATCHES, ids=lambda p: p.target)
def test_added_field_is_ours_on_a_dataclass(patch: Patch):
    """A field patch adds an attribute vLLM must not have: the owner is still a dataclass, and the field, when
    present, is the one NanoSpec added (vLLM declaring one of that name would collide)."""
    owner, attr, current = patch.resolve()
    assert dataclasses.is_dataclass(owner)
    if current is not None:
        assert getattr(current, "_nanospec_patch", None) == patch.name, f"{patch.target} declared by vLLM"
    with pytest.raises(PatchError, match="already declares"):
        patch.make({attr: object()})  # the patch refuses a field vLLM declared
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
    assert [e.value for e in eps] == ["nanospec_vllm.vllm.plugin:register"]
    assert list(inspect.signature(eps[0].load()).parameters) == []  # vLLM calls plugins with no argument
