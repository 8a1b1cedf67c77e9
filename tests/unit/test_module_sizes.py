"""No module of the package over 500 lines: a longer one is split by job (run / report / plot, ...)."""

from __future__ import annotations

from pathlib import Path

import nanospec_vllm

LIMIT = 500


def test_no_module_over_limit() -> None:
    root = Path(nanospec_vllm.__file__).parent
    sizes = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    assert len(sizes) > 40  # the walk found the package
    over = {k: n for k, n in sizes.items() if n > LIMIT}
    assert not over, f"modules over {LIMIT} lines (split them by job): {over}"
