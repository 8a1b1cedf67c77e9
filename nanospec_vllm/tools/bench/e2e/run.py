"""``nanospec bench e2e``: the command line, the rounds over engines, the result file."""

from __future__ import annotations

import argparse
import datetime
import hashlib
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

from ...engine import find_iomp
from . import job as jobs
from .inputs import (
    DEFAULT_HOT_SET,
    DEFAULT_NANOSPEC_YAML,
    TASK_GROUPS,
    BenchError,
    load_prompt_file,
    load_tasks,
    mix_groups,
    resolve_config,
    resolve_model,
    speculative_config,
    split_configs,
)
from .plot import plot_tokens_per_s
from .report import aggregate, check_identity, group_metrics, render_markdown, split_mismatches, summarize

#: ``--help``'s first line
DESCRIPTION = ("End-to-end benchmark: the real vLLM offline engine, configurations side by side, on the 7 "
               "task groups.")


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

    from .... import __version__
    from ....version import installed_vllm

    v = installed_vllm()
    try:
        torch_v = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_v = None
    return {"nanospec_vllm": __version__, "vllm": None if v is None else f"{v[0]}=={v[1]}", "torch": torch_v}


def _model_label(name_or_path: str) -> str:
    p = Path(os.path.expanduser(name_or_path))
    return p.name if p.is_dir() else name_or_path


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="nanospec bench e2e", description=DESCRIPTION)
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
    ap.add_argument("--mix", type=int, nargs="?", const=0, default=None, metavar="N",
                    help="one group `mixed`: the groups' prompts round-robin (large batches from every group); "
                         "N > 0 keeps the first N")
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
    if args.mix is not None:
        groups = mix_groups(groups, args.mix)
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
                     # the target's tokenizer has a chat template (prompts are one user turn through it), or not
                     # (False: the raw prompt, as /v1/completions sends it); None until an engine has run
                     "chat_template": None,
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
                    res = jobs.run_engine(job, Path(tmp), f"{tag}-a{attempt}", args.engine_timeout)
                    break
                except jobs.EngineKilled as e:  # killed by a signal (the OOM killer on a shared machine): retry
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
            if header["settings"]["chat_template"] is None and "chat_template" in res:
                header["settings"]["chat_template"] = bool(res["chat_template"])
                if not res["chat_template"]:
                    print(f"nanospec bench e2e: note: {_model_label(args.model)} has no chat template: prompts "
                          "are sent as raw text (JSON header settings.chat_template = false)", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.engine_job:
        return jobs.engine_main(args.engine_job)
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
