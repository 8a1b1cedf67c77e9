"""The package's layering, read from the source: the core never imports vLLM, and the draft head does not
import the runtime (the runtime hands it a frozen draft batch; no import circle)."""

from __future__ import annotations

import ast
from pathlib import Path

import nanospec_vllm

PKG = Path(nanospec_vllm.__file__).parent
CORE = ["config.py", "state.py", "step.py", "guard.py", "hostcopy.py", "pinned.py", "ops"]


def _imports(path: Path, src: str | None = None) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports resolved against the package)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    pkg_parts = list(rel.parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if src is None else src)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg_parts[: len(pkg_parts) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _files(names: list[str]) -> list[Path]:
    return [f for n in names for f in (sorted((PKG / n).rglob("*.py")) if (PKG / n).is_dir() else [PKG / n])]


def test_core_never_imports_vllm() -> None:
    files = _files(CORE)
    assert len(files) > 10
    bad = {str(f.relative_to(PKG)): sorted(m for m in _imports(f) if m == "vllm" or m.startswith("vllm."))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_head_does_not_import_the_runtime() -> None:
    mods = _imports(PKG / "vllm" / "head.py")
    assert "nanospec_vllm.step" in mods  # the resolver sees the head's relative imports
    assert not [m for m in mods if m.startswith("nanospec_vllm.vllm.runtime")], mods


def test_the_resolver_sees_lazy_and_relative_imports() -> None:
    """The checks above can fail: a lazy import inside a function, and a relative import of the runtime."""
    f = PKG / "ops" / "binding.py"
    src = f.read_text() + "\n\ndef _g():\n    from vllm.distributed import get_tp_group\n    return get_tp_group\n"
    assert "vllm.distributed" in _imports(f, src)
    h = PKG / "vllm" / "head.py"
    assert "nanospec_vllm.vllm.runtime" in _imports(h, h.read_text() + "\nfrom .runtime import NanoSpecRuntime\n")
