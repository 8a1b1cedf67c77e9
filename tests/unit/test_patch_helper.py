"""The Patch helper itself: keeps originals, refuses double patching, detects signature drift."""

import sys
import types

import pytest

from nanospec_vllm.vllm.patches.base import Patch, PatchError


@pytest.fixture()
def fake_module():
    mod = types.ModuleType("nanospec_fake_mod")

    class Owner:
        def f(self, x, y=1):
            return x + y

    def g(a):
        return a * 2

    mod.Owner = Owner
    mod.g = g
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


def wrap(orig):
    def new(self, x, y=1):
        return orig(self, x, y) * 10

    return new


def test_apply_keeps_original_and_is_idempotent(fake_module):
    p = Patch("nanospec_fake_mod:Owner.f", why="t", removal="t", make=wrap, expect_params=("self", "x", "y"))
    assert p.apply() is True
    assert fake_module.Owner().f(1) == 20
    assert fake_module.Owner._nanospec_orig_f(fake_module.Owner(), 1) == 2
    assert p.apply() is False  # second register() in the same process: no-op
    assert fake_module.Owner().f(1) == 20
    p.remove()
    assert fake_module.Owner().f(1) == 2 and not hasattr(fake_module.Owner, "_nanospec_orig_f")


def test_other_patch_on_same_attribute_refused(fake_module):
    Patch("nanospec_fake_mod:g", why="t", removal="t", make=lambda o: (lambda a: o(a) + 1)).apply()
    other = Patch("nanospec_fake_mod:g", why="t", removal="t", make=lambda o: o, name="another patch")
    with pytest.raises(PatchError, match="already patched"):
        other.apply()


def test_signature_drift_detected(fake_module):
    p = Patch("nanospec_fake_mod:Owner.f", why="t", removal="t", make=wrap, expect_params=("self", "z"))
    with pytest.raises(PatchError, match="signature drifted"):
        p.apply()
    assert fake_module.Owner().f(1) == 2  # untouched


def test_new_trailing_parameter_is_drift(fake_module):
    """A parameter added after the ones the wrapper knows would be dropped at run time: refused at apply."""
    p = Patch("nanospec_fake_mod:Owner.f", why="t", removal="t", make=wrap, expect_params=("self", "x"))
    with pytest.raises(PatchError, match="signature drifted"):
        p.apply()


def test_missing_symbol(fake_module):
    with pytest.raises(PatchError, match="not found"):
        Patch("nanospec_fake_mod:Owner.nope", why="t", removal="t", make=wrap).resolve()
    with pytest.raises(PatchError, match="cannot import"):
        Patch("nanospec_no_such_module:x", why="t", removal="t", make=wrap).resolve()


def test_gate_off_does_nothing(fake_module):
    p = Patch("nanospec_fake_mod:g", why="t", removal="t", make=lambda o: None, when=lambda: False)
    assert p.apply() is False and fake_module.g(2) == 4
