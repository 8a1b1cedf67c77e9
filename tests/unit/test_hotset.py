"""Hot-set files: ranking, writing, loading back through the config loader; the shipped file's shape."""

from pathlib import Path

import pytest

from nanospec_vllm.config import load_hot_set, parse_config
from nanospec_vllm.tools.hotset import rank_ids, write_hot_set

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "configs" / "hot" / "qwen2.5-hot.txt"


def test_rank_by_count_then_secondary_then_id_and_fill():
    ids = rank_ids([5, 5, 5, 9, 9, 2, 2, 50], [2, 2, 7, 50], vocab_size=12, size=8)
    # 5 (3x), then 2 and 9 (2x; 2 wins on the secondary count), then 50 is out of range, then 7 (secondary only),
    # then the lowest unseen ids fill up to `size`
    assert ids == [5, 2, 9, 7, 0, 1, 3, 4]
    assert len(set(ids)) == len(ids)


def test_write_and_load_roundtrip(tmp_path):
    p = tmp_path / "hot.txt"
    write_hot_set(p, [10, 3, 7, 3], ["made by a test", "second line"])
    text = p.read_text()
    assert text.startswith("# made by a test\n# second line\n10\n")
    assert load_hot_set(str(p)) == [10, 3, 7]
    assert load_hot_set(str(p), 2) == [10, 3]
    cfg = parse_config({"hot_set_path": str(p), "hot_set_size": 2, "capacity": 16})
    assert cfg.hot_set() == [10, 3]


def test_shipped_hot_set():
    if not SHIPPED.is_file():
        pytest.fail(f"{SHIPPED} missing: run `nanospec build-hot-set`")
    header = [line for line in SHIPPED.read_text().splitlines() if line.startswith("#")]
    assert any("nanospec build-hot-set" in h for h in header) and any("Date:" in h for h in header)
    ids = load_hot_set(str(SHIPPED))
    assert len(ids) >= 32768 and all(0 <= i < 151_936 for i in ids)
    # a frequency ranking, not id order: the first ids are not simply 0, 1, 2, ...
    assert ids[:64] != list(range(64))


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports (absolute names; relative imports resolved against ``nanospec_vllm.tools``)."""
    import ast

    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
            out.add(".".join([*base, node.module] if node.module else base))
    return out


def test_no_import_circle_between_hotset_and_the_coverage_replay():
    """hotset -> coverage_cache; coverage -> hotset, coverage_cache, coverage_replay; never back."""
    tools = ROOT / "nanospec_vllm" / "tools"
    hot = _imports(tools / "hotset.py")
    assert "nanospec_vllm.tools.bench.coverage_cache" in hot
    assert "nanospec_vllm.tools.bench.coverage" not in hot
    for name in ("coverage_cache", "coverage_replay"):
        mods = _imports(tools / "bench" / f"{name}.py")
        assert not {"nanospec_vllm.tools.hotset", "nanospec_vllm.tools.bench.coverage"} & mods, (name, mods)
    assert "nanospec_vllm.tools.hotset" in _imports(tools / "bench" / "coverage.py")


def test_tokenizer_check_header_is_what_auto_matches(tmp_path, monkeypatch) -> None:
    """A hot set written with the header is found by `hot_set_path: auto` for that tokenizer and no other."""
    from nanospec_vllm.config import shipped_hot_set, tokenizer_check
    from nanospec_vllm.tools.hotset import tokenizer_check_header, write_hot_set

    class Tok:
        eos_token_id = 99

        def __init__(self, shift: int = 0) -> None:
            self.shift = shift

        def __len__(self) -> int:
            return 120

        def convert_ids_to_tokens(self, ids):
            return [f"t{i + self.shift}" for i in ids]

    hot = tmp_path / "hot"
    (tmp_path / "nanospec.yaml").write_text("method: draft_model\n")
    ids = [5, 7, 9, 11, 13, 15, 17, 19, 21]
    write_hot_set(hot / "toy.txt", ids, ["toy", tokenizer_check_header(Tok(), ids)])
    check = tokenizer_check(hot / "toy.txt")
    assert list(check) == [5, 7, 9, 11, 13, 15, 17, 19, 20, 40, 60, 80, 100, 99]
    monkeypatch.setenv("NANOSPEC_CONFIGS", str(tmp_path))
    assert shipped_hot_set(Tok()) == str(hot / "toy.txt")
    assert shipped_hot_set(Tok(shift=1)) is None
