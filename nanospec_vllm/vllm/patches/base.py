"""The patch helper: every change NanoSpec makes to vLLM goes through :class:`Patch`.

A patch names its target (``module:Class.attr`` or ``module:function``), why it exists and when it can go. It
keeps the original as ``_nanospec_orig_<attr>`` on the owner, refuses to patch an attribute twice (idempotent
across repeated ``register()`` calls in one process: a second apply is a no-op, a *different* patch on the same
attribute is an error), and checks the target's signature against the one it was written for
(``expect_params``, the full parameter list), so a vLLM upgrade fails loudly at start-up and in the drift test, not in production.
``plain`` says what an engine without a ``nanospec`` block gets from the patch (``tests/unit/test_patches_inert.py``).
A wrapper sets no ``__wrapped__``: the drift test reads the wrapper's own signature.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Patch", "PatchError"]


class PatchError(RuntimeError):
    pass


@dataclass
class Patch:
    target: str  # "vllm.module.path:Owner.attr" or "vllm.module.path:attr"
    why: str
    removal: str
    make: Callable[[Any], Any]  # original -> replacement
    expect_params: tuple[str, ...] | None = None  # the target's full parameter list the replacement was written for
    when: Callable[[], bool] = field(default=lambda: True)  # version/platform gate
    name: str = ""  # identifies the patch (defaults to target); two different names on one attribute conflict
    #: what the patch changes for an engine without a ``nanospec`` block: "unchanged: <how it stays inert>", or
    #: what it changes and why it cannot be inert (shown in the register's table; every patch must say)
    plain: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.target

    def resolve(self) -> tuple[Any, str, Any]:
        """``(owner, attr, current value)``; raises PatchError if the symbol is gone."""
        mod_name, _, path = self.target.partition(":")
        try:
            owner: Any = importlib.import_module(mod_name)
        except ImportError as e:
            raise PatchError(f"{self.target}: cannot import {mod_name} ({e})") from e
        *parents, attr = path.split(".")
        for p in parents:
            if not hasattr(owner, p):
                raise PatchError(f"{self.target}: {p} not found in {owner!r}")
            owner = getattr(owner, p)
        if not hasattr(owner, attr):
            raise PatchError(f"{self.target}: attribute {attr} not found")
        return owner, attr, inspect.getattr_static(owner, attr)

    def check_signature(self, fn: Any) -> None:
        if self.expect_params is None:
            return
        f = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn
        try:
            params = tuple(inspect.signature(f).parameters)
        except (TypeError, ValueError) as e:
            raise PatchError(f"{self.target}: cannot read signature ({e})") from e
        if params != self.expect_params:  # a new trailing parameter would be dropped by the wrapper: refuse it
            raise PatchError(
                f"{self.target}: signature drifted: expected parameters {self.expect_params}, found {params}. "
                "This vLLM version is not supported by this nanospec_vllm patch."
            )

    def apply(self) -> bool:
        """Install the patch; returns False when it was already installed or its gate is off."""
        if not self.when():
            return False
        owner, attr, current = self.resolve()
        marker = getattr(current, "_nanospec_patch", None)
        if marker is not None:
            if marker == self.name:
                return False
            raise PatchError(f"{self.target}: already patched by {marker}")
        self.check_signature(current)
        orig_key = f"_nanospec_orig_{attr}"
        if orig_key in vars(owner) if isinstance(owner, type) else hasattr(owner, orig_key):
            raise PatchError(f"{self.target}: an original is already saved; refusing to patch twice")
        new = self.make(current)
        try:
            new._nanospec_patch = self.name
        except AttributeError:  # staticmethod/classmethod objects before 3.10 semantics
            new.__func__._nanospec_patch = self.name
        setattr(owner, orig_key, current)
        setattr(owner, attr, new)
        return True

    def remove(self) -> None:
        """Restore the original (tests only)."""
        owner, attr, current = self.resolve()
        orig_key = f"_nanospec_orig_{attr}"
        if getattr(current, "_nanospec_patch", None) != self.name:
            return
        setattr(owner, attr, getattr(owner, orig_key))
        delattr(owner, orig_key)
