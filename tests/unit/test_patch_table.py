"""The patch table in docs/architecture.md is generated from the register: the two must not disagree."""

from __future__ import annotations

from pathlib import Path

from nanospec_vllm.vllm.patches import all_patches, markdown_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_docs_table_is_the_register() -> None:
    text = DOC.read_text()
    start, end = "<!-- patch-table:start -->\n", "<!-- patch-table:end -->"
    assert start in text and end in text
    shown = text[text.index(start) + len(start): text.index(end)]
    assert shown == markdown_table(), "regenerate: python -m nanospec_vllm.vllm.patches.table"
    assert shown.count("\n| `patch_") == len(all_patches())
