"""The vLLM attributes NanoSpec reads outside the patched signatures (``patches/reads.py``) exist on the installed
vLLM's real classes; and every ``getattr(obj, "name", default)`` in the plugin's own vLLM-facing modules names
either NanoSpec's own attribute or one of those entries (so a default cannot hide a vLLM rename)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from nanospec_vllm.vllm.patches.reads import VLLM_READS, Read

PKG = Path(__file__).resolve().parents[2] / "nanospec_vllm" / "vllm"
#: the modules whose reads this test scans: every module that reads vLLM's objects (the head binding in ops too)
SCANNED = ["patches", "metrics", "plugin.py", "serve.py", "debug.py", "runtime.py", "head.py",
           "../ops/binding.py"]
#: attributes NanoSpec itself puts on vLLM's objects, or reads on its own objects
OWN = {"_nanospec_runtime", "_nanospec_patch", "_nanospec_orig_version", "_nanospec_type", "nanospec_stats",
       "_nanospec_checked"}


def _owner(path: str) -> type:
    mod, _, name = path.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def has_attr(cls: type, attr: str) -> bool:
    """Whether instances of ``cls`` have ``attr``: a dataclass or pydantic field, a class attribute, an
    annotation, or an assignment to ``self.<attr>`` in a method of the class or a base."""
    if dataclasses.is_dataclass(cls) and attr in {f.name for f in dataclasses.fields(cls)}:
        return True
    if attr in (getattr(cls, "model_fields", None) or {}) or attr in (getattr(cls, "__pydantic_fields__", None) or {}):
        return True
    if hasattr(cls, attr):
        return True
    assign = re.compile(rf"\bself\.{re.escape(attr)}\s*(:[^=\n]+)?=[^=]")
    for base in cls.__mro__:
        if attr in getattr(base, "__annotations__", {}):
            return True
        try:
            src = inspect.getsource(base)
        except (OSError, TypeError):
            continue
        if assign.search(src):
            return True
    return False


@pytest.mark.parametrize("read", VLLM_READS, ids=lambda r: f"{r.owner.rsplit(':', 1)[1]}.{r.attr}")
def test_read_resolves_on_vllm(read: Read):
    assert has_attr(_owner(read.owner), read.attr), f"{read.owner} has no {read.attr} (read by {read.by})"


def test_has_attr_sees_a_missing_attribute():
    from vllm.config.speculative import SpeculativeConfig
    from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

    assert has_attr(SpeculativeConfig, "method") and not has_attr(SpeculativeConfig, "methd")
    assert has_attr(AsyncGPUModelRunnerOutput, "_model_runner_output")
    assert not has_attr(AsyncGPUModelRunnerOutput, "_model_runner_outputs")


def _getattr_defaults(path: Path) -> list[tuple[str, int]]:
    """``(name, line)`` of every ``getattr(x, "name", default)`` with a literal name."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) == 3 and isinstance(node.args[1], ast.Constant)):
            out.append((node.args[1].value, node.lineno))
    return out


def test_every_defaulted_read_is_own_or_listed():
    listed = {r.attr for r in VLLM_READS}
    files = [f for s in SCANNED for f in ((PKG / s).glob("*.py") if (PKG / s).is_dir() else [PKG / s])]
    assert len(files) > 5
    unknown = [f"{f.relative_to(PKG)}:{line} {name}" for f in files for name, line in _getattr_defaults(f)
               if name not in OWN and name not in listed]
    assert unknown == [], "read these without a default, or list them in nanospec_vllm/vllm/patches/reads.py"
