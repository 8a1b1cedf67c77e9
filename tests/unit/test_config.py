"""NanoSpecConfig: defaults, errors that name the key, config files shipped in configs/."""

from pathlib import Path

import pytest

from nanospec_vllm.config import (
    NanoSpecConfig,
    NanoSpecConfigError,
    load_config_file,
    parse_config,
    split_speculative_config,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "configs").rglob("*.json"))


def test_defaults_are_the_shipped_config():
    """One source of defaults: `nanospec: {}` is exactly what configs/nanospec.yaml ships, and that is the measured
    policy (top-64 at verified positions, the 512-id shipped hot set, the break-even guard), not the paper's."""
    c = parse_config({})
    shipped = parse_config(load_config_file(ROOT / "configs" / "nanospec.yaml")["nanospec"])
    assert shipped.model_dump() == c.model_dump()
    assert (c.capacity, c.target_topk, c.seed_from_prompt, c.add_draft_tokens) == (3072, 64, True, True)
    assert (c.hot_set_path, c.hot_set_size, c.guard_coverage) == ("auto", 512, 0.89)
    assert c.always_active_special_ids and c.full_policy == "stop" and not c.prompt_topk
    assert parse_config(None) == c and parse_config(True) == c


class _Tok:
    """The one tokenizer method the `auto` hot set reads."""

    def __init__(self, vocab: dict[int, str]) -> None:
        self.vocab = vocab

    def convert_ids_to_tokens(self, ids):
        return [self.vocab.get(i) for i in ids]


def test_auto_hot_set_matches_the_tokenizer():
    """`auto` picks configs/hot/qwen2.5-hot.txt only for a tokenizer that reproduces its tokenizer check."""
    from nanospec_vllm.config import shipped_hot_set, tokenizer_check

    qwen = ROOT / "configs" / "hot" / "qwen2.5-hot.txt"
    check = tokenizer_check(qwen)
    assert check and len(check) >= 8
    c = parse_config({})
    assert shipped_hot_set(_Tok(check)) == str(qwen)
    assert c.hot_set_file(_Tok(check)) == str(qwen)
    ids = c.hot_set(_Tok(check))
    assert len(ids) == 512 and ids == parse_config({"hot_set_path": str(qwen)}).hot_set()[:512]
    other = dict(check)
    other[next(iter(other))] = "something-else"  # one token differs: another tokenizer
    assert shipped_hot_set(_Tok(other)) is None and c.hot_set(_Tok(other)) == []
    assert c.hot_set() == [] and c.hot_set_file() is None  # no tokenizer, nothing to match
    assert parse_config({"hot_set_path": None}).hot_set(_Tok(check)) == []


@pytest.mark.parametrize(
    "block,needle",
    [
        ({"capacity": 0}, "nanospec.capacity"),
        ({"capacity": "big"}, "nanospec.capacity"),
        ({"target_topk": 99}, "nanospec.target_topk"),
        ({"full_policy": "lru"}, "'stop' or 'fifo'"),
        ({"kernel": "cuda"}, "'auto', 'triton', 'torch', 'native', 'union' or 'dense'"),
        ({"capacty": 10}, "nanospec.capacty: unknown key (allowed: enabled, capacity"),
        ({"always_active_ids": [-3]}, "nanospec.always_active_ids"),
        ({"hot_set_path": "/nonexistent/ids.txt"}, "file not found"),
        ({"always_active_ids": [1, 2, 3], "capacity": 3}, "fewer than capacity"),
    ],
)
def test_errors_name_the_key(block, needle):
    with pytest.raises(NanoSpecConfigError) as e:
        parse_config(block)
    assert needle in str(e.value)


def test_not_a_mapping():
    with pytest.raises(NanoSpecConfigError, match="must be a mapping"):
        parse_config([1, 2])


def test_hot_set_file(tmp_path):
    p = tmp_path / "hot.txt"
    p.write_text("# top ids\n5\n7\n5\n9\n")
    c = parse_config({"hot_set_path": str(p), "hot_set_size": 2})
    assert c.hot_set() == [5, 7]
    q = tmp_path / "hot.json"
    q.write_text("[3, 1, 2]")
    assert parse_config({"hot_set_path": str(q)}).hot_set() == [3, 1, 2]
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(NanoSpecConfigError, match="not a list of integer token ids"):
        parse_config({"hot_set_path": str(bad)})


def test_split_expands_paths(monkeypatch):
    monkeypatch.setenv("NANOSPEC_CACHE", "/data/cache")
    rest, ns = split_speculative_config(
        {"method": "draft_model", "model": "${NANOSPEC_CACHE:-~/x}/models/a", "nanospec": {"capacity": 64}}
    )
    assert rest == {"method": "draft_model", "model": "/data/cache/models/a"}
    assert ns is not None and ns.capacity == 64
    monkeypatch.delenv("NANOSPEC_CACHE")
    rest, ns = split_speculative_config({"model": "${NANOSPEC_CACHE:-~/x}/m"})
    assert rest["model"] == str(Path.home() / "x" / "m") and ns is None
    assert split_speculative_config({"nanospec": False})[1] is None


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    data = load_config_file(path)
    spec = data.get("speculative-config", data)  # serve.yaml nests it
    rest, ns = split_speculative_config(spec, source=str(path))
    assert isinstance(ns, NanoSpecConfig)
    assert rest["method"] in ("draft_model", "eagle", "eagle3", "mtp")
    assert isinstance(rest["num_speculative_tokens"], int)


def test_config_files_found():
    assert len(CONFIG_FILES) >= 3


def test_bad_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("method: [unclosed")
    with pytest.raises(NanoSpecConfigError, match="cannot parse"):
        load_config_file(p)
    with pytest.raises(NanoSpecConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")
    p.write_text("- 1\n- 2\n")
    with pytest.raises(NanoSpecConfigError, match="top level must be a mapping"):
        load_config_file(p)


def test_every_key_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in NanoSpecConfig.model_fields if f"`{k}`" not in doc]
    assert not missing, f"keys not documented in docs/configuration.md: {missing}"


def test_relative_hot_set_path_is_beside_the_file(tmp_path, monkeypatch) -> None:
    from nanospec_vllm.config import load_config_file, split_speculative_config

    (tmp_path / "hot").mkdir()
    (tmp_path / "hot" / "ids.txt").write_text("1\n2\n3\n")
    f = tmp_path / "spec.yaml"
    f.write_text("method: draft_model\nnanospec:\n  hot_set_path: hot/ids.txt\n  hot_set_size: 2\n")
    monkeypatch.chdir("/")  # started from anywhere else
    _, ns = split_speculative_config(load_config_file(f))
    assert ns.hot_set_path == str(tmp_path / "hot" / "ids.txt") and ns.hot_set() == [1, 2]


def test_auto_hot_set_is_trimmed_to_fit_a_small_capacity() -> None:
    """`auto` is best effort: with capacity 16 and 3 extra pinned ids, 8 - 3 = 5 hot ids are kept, and the config
    itself never fails over a hot set the user did not name."""
    check = tokenizer_check_of_qwen()
    c = parse_config({"capacity": 16, "always_active_ids": [1, 2, 3]})
    full = parse_config({}).hot_set(_Tok(check))
    assert c.hot_set(_Tok(check)) == full[:5]
    assert parse_config({"capacity": 1}).hot_set(_Tok(check)) == []


def tokenizer_check_of_qwen() -> dict[int, str]:
    from nanospec_vllm.config import tokenizer_check

    check = tokenizer_check(ROOT / "configs" / "hot" / "qwen2.5-hot.txt")
    assert check is not None
    return check


def test_ids_checked_against_the_target_vocabulary(tmp_path):
    from nanospec_vllm.config import check_against_target

    hot = tmp_path / "hot.txt"
    hot.write_text("5\n7\n151936\n")
    cfg = parse_config({"hot_set_path": str(hot)})
    with pytest.raises(NanoSpecConfigError, match=r"hot_set_path: .*hot.txt holds 1 ids outside .*\[151936\]"):
        check_against_target(cfg, 151936)
    check_against_target(cfg, 151937)  # fits a larger vocabulary
    check_against_target(parse_config({"hot_set_path": str(hot), "hot_set_size": 2}), 151936)  # only the first 2
    with pytest.raises(NanoSpecConfigError, match=r"always_active_ids: 1 ids outside .* \[900\]"):
        check_against_target(parse_config({"always_active_ids": [1, 900]}), 500)


def test_unreadable_hot_set_is_a_config_error(tmp_path):
    d = tmp_path / "dir.txt"
    d.mkdir()
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"\xff\xfe\x00 1\n")
    with pytest.raises(NanoSpecConfigError, match="file not found"):
        parse_config({"hot_set_path": str(d)})
    with pytest.raises(NanoSpecConfigError, match="cannot read the hot-set file|not a list of integer"):
        parse_config({"hot_set_path": str(f)})


def test_eagle3_d2t_must_fit_the_target(tmp_path):
    import torch
    from safetensors.torch import save_file

    from nanospec_vllm.config import check_against_target

    head = tmp_path / "head"
    head.mkdir()
    d2t = torch.tensor([0, 5, 10, 20])  # target id = row + d2t[row]: 0, 6, 12, 23
    save_file({"d2t": d2t, "fc.weight": torch.zeros(2, 2)}, str(head / "model.safetensors"))
    cfg = parse_config({})
    check_against_target(cfg, 24, "eagle3", head)
    with pytest.raises(NanoSpecConfigError, match=r"d2t .* target ids \[0, 23\], outside the target vocabulary \[0, 20\)"):
        check_against_target(cfg, 20, "eagle3", head)
    check_against_target(cfg, 20, "eagle", head)  # only EAGLE-3 heads carry a d2t map
