"""Config fuzz: random ``nanospec`` blocks (wrong types, out-of-range values, unknown keys, missing or unreadable
hot-set files, nested junk, blocks that are not mappings) through every front-end path that validates one.

Paths: :func:`parse_config` (what the worker and the tools call); :func:`split_speculative_config` (what the
front end calls on ``--speculative-config`` / ``LLM(speculative_config=...)``); a JSON config file read by
:func:`load_config_file` then split (``--speculative-config FILE``); and the ``EngineArgs.create_speculative_config``
patch itself, on a stand-in for ``EngineArgs`` (config level: no engine starts; invalid blocks only, which it
refuses before it touches the environment or vLLM).

Each value is drawn with a verdict: ``ok`` (valid), ``bad`` (must be refused) or ``lax`` (pydantic's lax mode may
coerce it, e.g. ``"12"`` for an int: either outcome is right). The rule checked for every case and path: the
only exception is :class:`NanoSpecConfigError`; a block with a ``bad`` value is refused and the message names
each offending key (``nanospec.<key>``); one with only ``ok`` values parses, to the values given, unless its
pinned ids do not fit its capacity (refused, naming ``capacity``). Fixed seed: the same cases on every run.
"""

from __future__ import annotations

import json
import math
import os
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import pytest

from nanospec_vllm.config import (
    HOT_SET_AUTO,
    NanoSpecConfig,
    NanoSpecConfigError,
    load_config_file,
    parse_config,
    split_speculative_config,
)

SEED = 17
N_CASES = 240
VOCAB = 151_936
KERNELS = typing.get_args(NanoSpecConfig.model_fields["kernel"].annotation)
POLICIES = typing.get_args(NanoSpecConfig.model_fields["full_policy"].annotation)
BOOLS = ("enabled", "seed_from_prompt", "add_draft_tokens", "prompt_topk", "always_active_special_ids")


class Opaque:
    """A value no config format can hold (what a Python caller could still pass)."""

    def __repr__(self) -> str:
        return "Opaque()"


JUNK = ({"a": {"b": [1, {"c": None}]}}, [[1, 2], {"x": "y"}], {"nanospec": {"capacity": 8}}, Opaque())


@dataclass
class Files:
    """Hot-set files: the valid ones with their id counts, and paths that must be refused."""

    ok: dict[str, int]
    bad: list[str]


def make_files(d: Path) -> Files:
    (d / "ids3.txt").write_text("# three ids\n1\n2\n3\n")
    (d / "ids4.json").write_text("[5, 6, 7, 8]")
    (d / "empty.txt").write_text("")
    (d / "garbage.txt").write_text("abc\n")
    (d / "negative.txt").write_text("4\n-3\n")
    (d / "floats.json").write_text("[1.5, 2]")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x01")
    (d / "nested.json").write_text("[[1], 2]")
    (d / "a_dir").mkdir()
    loop = d / "loop.txt"
    if not loop.is_symlink():
        loop.symlink_to(loop)  # a symlink to itself: ELOOP
    return Files(ok={str(d / "ids3.txt"): 3, str(d / "ids4.json"): 4, str(d / "empty.txt"): 0},
                 bad=[str(d / n) for n in ("garbage.txt", "negative.txt", "floats.json", "binary.txt",
                                           "nested.json", "a_dir", "loop.txt", "missing.txt")]
                 + [str(d / "no" / "such" / "dir" / "ids.txt"), "", "\x00", "x" * 5000, str(d / "ids3.txt/x")])


# ------------------------------------------------------------------------------------------ value generators
def _bool(rng: random.Random, verdict: str) -> Any:
    if verdict == "ok":
        return rng.choice((True, False))
    if verdict == "lax":
        return rng.choice(("yes", "off", "true", "0", 1, 0, "ON"))
    return rng.choice((2, -1, "maybe", None, [], {}, 1.5, "", [True]))


def _int_in(lo: int, hi: int | None) -> Any:
    def gen(rng: random.Random, verdict: str) -> Any:
        top = hi if hi is not None else 1 << 16
        if verdict == "ok":
            return rng.choice((lo, top, rng.randint(lo, top), rng.randint(lo, min(top, lo + 16))))
        if verdict == "lax":
            return rng.choice((str(rng.randint(lo, top)), float(rng.randint(lo, top))))
        out = [lo - 1, lo - 1000, 2.5, "abc", None, [lo], {"v": lo}, math.nan, math.inf, "1e3x"]
        if hi is not None:
            out += [hi + 1, 10**30]
        return rng.choice(out)
    return gen


def _float_in(lo: float, hi: float, lo_open: bool = False, none_ok: bool = False) -> Any:
    def gen(rng: random.Random, verdict: str) -> Any:
        if verdict == "ok":
            vals = [hi, rng.uniform(lo, hi)] + ([] if lo_open else [lo]) + ([None] if none_ok else [])
            return rng.choice(vals)
        if verdict == "lax":
            return str(round(rng.uniform(lo + 1e-3, hi), 3))
        bad = [lo - 0.5, hi + 0.5, math.nan, math.inf, -math.inf, "x", [hi], {"v": lo}]
        return rng.choice(bad + ([lo] if lo_open else []) + ([] if none_ok else [None]))
    return gen


def _ids(rng: random.Random, verdict: str) -> Any:
    if verdict == "ok":
        return [rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))]
    if verdict == "lax":
        return rng.choice(([True], ["3", "4"], (1, 2), {5, 6}, [7.0]))
    return rng.choice(([-1], [1, -5], [1.5], "1,2", {"a": 1}, [[1]], [None], 7, None, ["x"]))


def _literal(values: tuple[str, ...]) -> Any:
    def gen(rng: random.Random, verdict: str) -> Any:
        if verdict == "ok":
            return rng.choice(values)
        return rng.choice(("cuda", "", None, 3, [values[0]], values[0].upper() + "!", {"v": values[0]}))
    return gen


def _hot_size(rng: random.Random, verdict: str) -> Any:
    if verdict == "ok":
        return rng.choice((None, 1, 2, rng.randint(1, 4096)))
    if verdict == "lax":
        return rng.choice(("8", 8.0))
    return rng.choice((0, -3, "x", 1.5, [], {"n": 1}))


#: field -> (generator(rng, verdict), verdicts it can draw). Every field of NanoSpecConfig must be here.
def generators(files: Files) -> dict[str, tuple[Any, tuple[str, ...]]]:
    def hot_path(rng: random.Random, verdict: str) -> Any:
        if verdict == "ok":
            return rng.choice((None, HOT_SET_AUTO, *files.ok))
        return rng.choice((*files.bad, 5, ["a"], {"p": 1}, True))

    g: dict[str, tuple[Any, tuple[str, ...]]] = {b: (_bool, ("ok", "bad", "lax")) for b in BOOLS}
    g.update({
        "capacity": (_int_in(1, 1 << 20), ("ok", "bad", "lax")),
        "target_topk": (_int_in(0, 64), ("ok", "bad", "lax")),
        "always_active_ids": (_ids, ("ok", "bad", "lax")),
        "full_policy": (_literal(POLICIES), ("ok", "bad")),
        "hot_set_path": (hot_path, ("ok", "bad")),
        "hot_set_size": (_hot_size, ("ok", "bad", "lax")),
        "kernel": (_literal(KERNELS), ("ok", "bad")),
        "dense_fallback_ratio": (_float_in(0.0, 64.0, lo_open=True, none_ok=True), ("ok", "bad", "lax")),
        "guard_coverage": (_float_in(0.0, 1.0), ("ok", "bad", "lax")),
        "guard_hysteresis": (_float_in(0.0, 0.5), ("ok", "bad", "lax")),
        "guard_window": (_int_in(1, 4096), ("ok", "bad", "lax")),
    })
    return g


UNKNOWN_KEYS = ("capacityy", "Capacity", "target-topk", "nanospec", "method", "hot_set", "guard", "ids", "kernel ",
                "x" * 40, 1, None, 2.5)


@dataclass
class Case:
    n: int
    block: Any
    verdicts: dict[Any, str] = field(default_factory=dict)  # key -> ok | bad | lax
    not_mapping: bool = False

    @property
    def bad(self) -> list[Any]:
        return [k for k, v in self.verdicts.items() if v == "bad"]

    @property
    def lax(self) -> list[Any]:
        return [k for k, v in self.verdicts.items() if v == "lax"]


def draw_cases(files: Files, seed: int = SEED, n: int = N_CASES) -> list[Case]:
    rng = random.Random(seed)
    gens = generators(files)
    cases = []
    for i in range(n):
        if i % 20 == 19:  # not a mapping at all
            cases.append(Case(i, rng.choice(([1, 2], "capacity: 3", 3, 2.5, ("a",), b"x")), not_mapping=True))
            continue
        only_ok = i % 4 == 0
        case = Case(i, {})
        for key in rng.sample(sorted(gens), rng.randint(0 if not only_ok else 1, 6)):
            gen, verdicts = gens[key]
            verdict = "ok" if only_ok else rng.choices(verdicts, [6, 3, 2][:len(verdicts)])[0]
            if verdict == "bad" and rng.random() < 0.15:
                value = rng.choice(JUNK)  # nested junk where a typed value belongs
            else:
                value = gen(rng, verdict)
            case.block[key] = value
            case.verdicts[key] = verdict
        if not only_ok and rng.random() < 0.2:
            key = rng.choice(UNKNOWN_KEYS)
            if key not in case.block:
                case.block[key] = rng.choice((1, "x", None, {"a": [1]}))
                case.verdicts[key] = "bad"
        cases.append(case)
    # and each broken hot-set path once on its own, beside one random valid key
    for path in files.bad:
        key = rng.choice(sorted(set(gens) - {"hot_set_path", "hot_set_size"}))
        cases.append(Case(len(cases), {"hot_set_path": path, key: gens[key][0](rng, "ok")},
                          {"hot_set_path": "bad", key: "ok"}))
    # and pins that fill the set three times (a valid hot set and always-active ids, capacity <= what they pin),
    # however the random draw above falls
    for path, size in sorted(files.ok.items()):
        if size:
            cases.append(Case(len(cases), {"hot_set_path": path, "hot_set_size": None, "always_active_ids": [0],
                                           "capacity": size}, dict.fromkeys(("hot_set_path", "hot_set_size",
                                                                          "always_active_ids", "capacity"), "ok")))
    cases.append(Case(len(cases), {"always_active_ids": [1, 2], "capacity": 2},
                      {"always_active_ids": "ok", "capacity": "ok"}))
    return cases


# ------------------------------------------------------------------------------------------------- the oracle
def pinned(block: dict[str, Any], files: Files) -> int:
    """Ids pinned in every set by an all-``ok`` block (an ``auto`` hot set is trimmed to fit at start-up)."""
    n = len(set(block.get("always_active_ids", ())))
    path = block.get("hot_set_path", HOT_SET_AUTO)
    if path in files.ok:
        size = block.get("hot_set_size", 512)
        n += files.ok[path] if size is None else min(size, files.ok[path])
    return n


def check(case: Case, files: Files, call: Any, prefix: str) -> str | None:
    """Run one path on one case; a description of what went wrong, or None."""
    try:
        got = call(case.block)
    except NanoSpecConfigError as e:
        msg = str(e)
        if case.not_mapping:
            return None if f"{prefix}:" in msg else f"does not name the block: {msg}"
        missing = [k for k in case.bad if f"{prefix}.{k}" not in msg]
        if missing:
            return f"refused without naming {missing}: {msg}"
        if case.bad:
            return None
        if case.lax and any(f"{prefix}.{k}" in msg for k in case.lax):
            return None  # pydantic did not coerce that one: a refusal naming it is right too
        if "capacity" in msg and pinned(case.block, files) >= case.block.get("capacity", 3072):
            return None
        if case.lax and "capacity" in msg:
            return None  # a coerced capacity or id list may not fit
        return f"refused a valid block: {msg}"
    except Exception as e:  # noqa: BLE001 - the point of the test
        return f"{type(e).__name__} instead of NanoSpecConfigError: {e}"[:500]
    if case.not_mapping or case.bad:
        return f"accepted an invalid block (bad: {case.bad})"
    if not case.lax and pinned(case.block, files) >= case.block.get("capacity", 3072):
        return "accepted pinned ids that do not fit the capacity"
    if not case.lax:
        for k, v in case.block.items():
            want = tuple(v) if k == "always_active_ids" else v
            if k == "hot_set_path" and v not in (None, HOT_SET_AUTO):
                want = str(Path(os.path.expanduser(v)))
            if getattr(got, k) != want:
                return f"{k}: parsed {getattr(got, k)!r}, given {v!r}"
    return None


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return make_files(tmp_path_factory.mktemp("hot"))


@pytest.fixture(scope="module")
def cases(files: Files) -> list[Case]:
    return draw_cases(files)


def _report(failures: list[str]) -> str:
    return f"{len(failures)} failures:\n" + "\n".join(failures[:20])


def test_the_cases_cover_what_they_claim(cases: list[Case], files: Files) -> None:
    """>= 200 cases, the same on every run; every field is drawn valid and invalid; valid blocks, refused
    blocks, unknown keys, non-mappings, over-full pins and broken hot-set files are all among them."""
    assert len(cases) >= 200
    assert [repr(c.block) for c in draw_cases(files)] == [repr(c.block) for c in cases]
    assert set(generators(files)) == set(NanoSpecConfig.model_fields), "a new field needs a generator here"
    for key in NanoSpecConfig.model_fields:
        kinds = {c.verdicts.get(key) for c in cases}
        assert {"ok", "bad"} <= kinds, (key, kinds)
    valid = [c for c in cases if not c.not_mapping and not c.bad and not c.lax]
    over = [c for c in valid if pinned(c.block, files) >= c.block.get("capacity", 3072)]
    assert len(valid) - len(over) >= 40 and len(over) >= 3
    assert sum(1 for c in cases if c.bad) >= 100 and sum(1 for c in cases if c.not_mapping) >= 10
    assert sum(1 for c in cases if any(k not in NanoSpecConfig.model_fields for k in c.verdicts)) >= 10
    paths = [c.block.get("hot_set_path") for c in cases if isinstance(c.block, dict)]
    assert all(p in paths for p in [*files.bad, *files.ok])


def test_parse_config(cases: list[Case], files: Files) -> None:
    failures = [f"case {c.n} {c.block!r:.200}: {err}" for c in cases
                if (err := check(c, files, parse_config, "nanospec"))]
    assert not failures, _report(failures)


def test_split_speculative_config(cases: list[Case], files: Files) -> None:
    """The front end's path: the whole speculative config, ``nanospec`` block inside."""
    def call(block: Any) -> Any:
        rest, ns = split_speculative_config({"method": "draft_model", "model": "m", "nanospec": block})
        assert rest == {"method": "draft_model", "model": "m"}
        return ns

    failures = [f"case {c.n} {c.block!r:.200}: {err}" for c in cases
                if (err := check(c, files, call, "speculative config: nanospec"))]
    assert not failures, _report(failures)


def test_config_file(cases: list[Case], files: Files, tmp_path: Path) -> None:
    """``--speculative-config FILE.json``: the file is read, then split. Blocks JSON cannot hold as they are
    (tuples, sets, non-string keys, NaN, objects) are left to the other paths."""
    def as_json(block: Any) -> str | None:
        try:
            text = json.dumps({"method": "draft_model", "model": "m", "nanospec": block}, allow_nan=False)
        except (TypeError, ValueError):
            return None
        return text if json.loads(text)["nanospec"] == block else None

    def call(path: Path) -> Any:
        return split_speculative_config(load_config_file(path))[1]

    failures, n = [], 0
    for c in cases:
        text = as_json(c.block)
        if text is None:
            continue
        n += 1
        f = tmp_path / f"case{c.n}.json"
        f.write_text(text)
        if err := check(c, files, lambda _block, f=f: call(f), "nanospec"):
            failures.append(f"case {c.n} {c.block!r:.200}: {err}")
    assert n >= 150
    assert not failures, _report(failures)


def test_engine_args_patch_refuses_before_vllm(cases: list[Case], files: Files, monkeypatch) -> None:
    """The ``create_speculative_config`` patch on a stand-in for ``EngineArgs``: every invalid block is refused
    with the same NanoSpecConfigError, before vLLM's method runs."""
    from nanospec_vllm.vllm.patches.patch_arg_utils import _make_create_speculative_config

    calls = []
    wrapper = _make_create_speculative_config(lambda *a: calls.append(a))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")

    def call(block: Any) -> Any:
        args = NS(speculative_config={"method": "draft_model", "model": "m", "nanospec": block},
                  additional_config=None, attention_config=None, watermark_config=None)
        wrapper(args, NS(get_vocab_size=lambda: VOCAB), NS(tensor_parallel_size=1))
        raise AssertionError("accepted")

    invalid = [c for c in cases if c.bad or (c.not_mapping and c.block is not False)]
    failures = [f"case {c.n} {c.block!r:.200}: {err}" for c in invalid
                if (err := check(c, files, call, "speculative config: nanospec"))]
    assert len(invalid) >= 100
    assert not failures, _report(failures)
    assert calls == []
