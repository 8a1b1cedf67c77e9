"""Soak test: a real ``nanospec serve`` driven for a while with mixed, misbehaving clients, then checked.

``nanospec bench soak [--duration 600] [--concurrency 6] [--prompts FILE.jsonl] [--seed 0] [--json OUT]
[--model qwen2.5-coder-0.5b] [--draft MODEL | --speculative-config FILE|JSON] [--max-model-len 512]
[--max-num-seqs 8] [--kv-blocks 6] [--max-rss-growth-mb 512] [--serve-arg=--flag ...]``

What it does:

* **Server**: one ``nanospec serve`` child on 127.0.0.1 (:class:`nanospec_vllm.tools.server.ServeProcess`, Intel
  OpenMP preloaded on CPU), ``--enforce-eager``, ``draft_model`` speculation (default: ``--model`` drafting for
  itself, K=3, ``nanospec: {capacity: 1024, target_topk: 3}``, as ``configs/examples/cpu-self-draft.yaml``), and
  a KV cache of ``--kv-blocks`` blocks (``--num-gpu-blocks-override``; 6 x 128 tokens by default, one of
  them vLLM's null block: room for one longest request and a bit) so that concurrent requests are preempted.
* **Prompts**: ``--prompts`` JSONL rows ``{"prompt": ...}``, else 48 calibration prompts
  (:func:`nanospec_vllm.tools.calibration.calibration_prompts`, no benchmark text). Each is measured with the
  server's ``/tokenize`` (completion and chat forms); those that would not fit ``--max-model-len`` with the
  longest output are dropped. A model the server has no chat template for (a base model: ``/tokenize`` of a chat
  says so with a 400) is driven through ``/v1/completions`` only, and the header says so (``chat_template:
  false``).
* **Clients** (``--concurrency`` threads, each with its own seeded generator, until ``--duration`` s have
  passed; requests in flight then finish): each request picks an endpoint (``/v1/completions`` or
  ``/v1/chat/completions``), a prompt, ``max_tokens`` in (8, 32, 96, 200), ``ignore_eos`` (30%), the NanoSpec
  switch (``vllm_xargs: {"nanospec": true|false}``, 50/50), and a kind: ``complete`` (non-streaming),
  ``stream`` (read to the end), ``disconnect`` (streaming, closes the connection after 1-12 chunks), ``abort``
  (non-streaming, 200 tokens, client timeout 0.5-4 s). 10% of ``complete``/``stream`` requests sample
  (temperature 0.8, seeded); the rest are greedy.
* **Identity**: every completed greedy request is compared with the same request (endpoint, prompt,
  ``max_tokens``, ``ignore_eos``) with NanoSpec off: a switch-off request of the same key that completed during
  the run, else one re-run after the driving, against the same server, ``--concurrency`` at a time.
* **Checks at the end**: no 5xx and no other failure (4xx, connection error, error event in a stream, a
  request that outlived ``--request-timeout``), no mismatch, ``/health`` 200, ``nanospec_slots_in_use`` back to
  0 and ``vllm:num_requests_running`` 0 (polled for up to 60 s), the resident memory of the server's process
  tree (API server + engine core, VmRSS summed) grown by at most ``--max-rss-growth-mb`` from just after a
  warm-up to the end, and the run exercised what it is for: at least one preemption (delta of
  ``vllm:num_preemptions_total``), one disconnect, one abort and one comparison (``--no-require-exercised``
  drops this check).

Output: a progress line every 30 s and a summary on stderr; with ``--json``, ``{requests, completed,
disconnects, aborts, preemptions, errors_5xx, mismatches, slots_in_use_end, rss_growth_mb, ...}`` (see
:func:`summarize`; ``checks`` holds each check's result). Exit status: 0 when every check passes, 1 when one
fails, 2 when the server cannot start or the options are wrong.

Cost: one server (weights twice for self-drafting, the small KV cache) for the duration plus start-up (~30-60 s
on CPU) and the re-runs. Touches: the ``--json`` path and the server log (``--log``, else a temporary file,
removed when every check passes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .soak_client import (
    ENDPOINTS,
    KIND_WEIGHTS,
    KINDS,
    MAX_TOKENS,
    Client,
    Plan,
    Result,
    chat_template_available,
    fitting_prompts,
    plan_request,
)

__all__ = ["ENDPOINTS", "KINDS", "KIND_WEIGHTS", "MAX_TOKENS", "Client", "Plan", "Result", "chat_template_available",
           "compare", "fitting_prompts", "main", "plan_request", "summarize"]

DEFAULT_NANOSPEC = {"capacity": 1024, "target_topk": 3}

# ------------------------------------------------------------------------------------------ checks


def compare(results: list[Result]) -> tuple[dict[tuple, str], list[dict[str, Any]], int]:
    """Greedy identity over ``results``: ``(references, mismatches, compared)``.

    ``references`` maps a key (:attr:`Plan.key`) to the text of the first completed greedy switch-off request
    of that key (any phase); every completed greedy request (switch on or off) whose key has a reference is
    compared with it; each difference is one mismatch ``{key, nanospec, kind, phase, text, reference}``.
    """
    refs: dict[tuple, str] = {}
    for r in results:
        if r.status == "ok" and r.plan.temperature == 0 and not r.plan.nanospec:
            refs.setdefault(r.plan.key, r.text)
    mismatches: list[dict[str, Any]] = []
    compared = 0
    for r in results:
        if r.status != "ok" or r.plan.temperature != 0 or r.plan.key not in refs:
            continue
        compared += 1
        if r.text != refs[r.plan.key]:
            mismatches.append({"key": list(r.plan.key), "nanospec": r.plan.nanospec, "kind": r.plan.kind,
                               "phase": r.phase, "text": r.text[:400], "reference": refs[r.plan.key][:400]})
    return refs, mismatches, compared


def summarize(results: list[Result], *, preemptions: int, slots_in_use_end: float, running_end: float,
              healthy: bool, rss_start_mb: float, rss_end_mb: float, max_rss_growth_mb: float,
              require_exercised: bool = True) -> dict[str, Any]:
    """The report: counts over the driving phase, the identity check over every phase, and ``checks``
    (name -> bool) with ``passed`` = all of them."""
    drive = [r for r in results if r.phase == "drive"]
    status = Counter(r.status for r in drive)
    all_status = Counter(r.status for r in results)
    refs, mismatches, compared = compare(results)
    errors_5xx = sum(n for s, n in all_status.items() if s.startswith("http_5"))
    errors_4xx = sum(n for s, n in all_status.items() if s.startswith("http_4"))
    errors_other = all_status.get("error", 0) + sum(n for s, n in all_status.items()
                                                    if s.startswith("http_") and not s.startswith(("http_4",
                                                                                                  "http_5")))
    out: dict[str, Any] = {
        "requests": len(drive),
        "completed": status.get("ok", 0),
        "disconnects": status.get("disconnect", 0),
        "aborts": status.get("abort", 0),
        "preemptions": int(preemptions),
        "errors_5xx": errors_5xx,
        "mismatches": len(mismatches),
        "slots_in_use_end": slots_in_use_end,
        "rss_growth_mb": round(rss_end_mb - rss_start_mb, 1),
        "errors_4xx": errors_4xx,
        "errors_other": errors_other,
        "compared": compared,
        "compared_nanospec_on": sum(1 for r in results if r.status == "ok" and r.plan.temperature == 0
                                    and r.plan.nanospec and r.plan.key in refs),
        "reference_reruns": sum(1 for r in results if r.phase == "reference"),
        "running_end": running_end,
        "healthy_end": healthy,
        "rss_start_mb": round(rss_start_mb, 1),
        "rss_end_mb": round(rss_end_mb, 1),
        "max_rss_growth_mb": max_rss_growth_mb,
        "by_kind": dict(Counter(r.plan.kind for r in drive)),
        "by_status": dict(status),
        "nanospec_on": sum(1 for r in drive if r.plan.nanospec),
        "sampled": sum(1 for r in drive if r.plan.temperature > 0),
        "generated_tokens": sum(r.tokens for r in drive if r.status == "ok" and not r.plan.stream),
    }
    checks = {
        "no_5xx": errors_5xx == 0,
        "no_other_errors": errors_4xx == 0 and errors_other == 0,
        "greedy_identical": not mismatches,
        "healthy": healthy,
        "slots_released": slots_in_use_end == 0 and running_end == 0,
        "rss_within_bound": out["rss_growth_mb"] <= max_rss_growth_mb,
    }
    if require_exercised:
        checks["exercised"] = (out["preemptions"] > 0 and out["disconnects"] > 0 and out["aborts"] > 0
                               and compared > 0)
    out["checks"] = checks
    out["passed"] = all(checks.values())
    out["mismatch_examples"] = mismatches[:10]
    out["error_examples"] = [{"status": r.status, "detail": r.detail, "phase": r.phase, **asdict(r.plan)}
                             for r in results if r.status not in ("ok", "disconnect", "abort")][:10]
    return out


# ------------------------------------------------------------------------------------------ driving


@dataclass
class Soak:
    """State shared by the client threads."""

    client: Client
    n_prompts: int
    deadline: float
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    endpoints: tuple[str, ...] = ENDPOINTS

    def worker(self, rng: random.Random) -> None:
        while time.monotonic() < self.deadline:
            res = self.client.send(plan_request(rng, self.n_prompts, self.endpoints))
            with self.lock:
                self.results.append(res)


def load_prompts(path: str | None, seed: int, n: int = 48) -> list[str]:
    """``--prompts`` JSONL (``{"prompt": ...}`` rows), else ``n`` calibration prompts (no benchmark text)."""
    if path:
        rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        return [r["prompt"] for r in rows]
    from ..calibration import calibration_prompts

    return [p.prompt for p in calibration_prompts(n, seed=seed)]


def _resolve_model(name: str) -> Path:
    from ..assets import model_dir

    return model_dir(name)


def _log(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, warm up, drive, re-run references, check; return the report (see :func:`summarize`)."""
    from ..server import ServeProcess, serve_env

    model = _resolve_model(args.model)
    spec = args.speculative_config or json.dumps(
        {"method": "draft_model", "model": str(_resolve_model(args.draft or args.model)),
         "num_speculative_tokens": args.k, "nanospec": DEFAULT_NANOSPEC})
    serve_args = ["--speculative-config", spec, "--enforce-eager", "--max-model-len", str(args.max_model_len),
                  "--max-num-seqs", str(args.max_num_seqs), *args.serve_arg]
    if args.kv_blocks:
        serve_args += ["--num-gpu-blocks-override", str(args.kv_blocks)]
    log_path = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="nanospec-soak-", suffix=".log")[1])
    header = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "nanospec bench soak " + " ".join(args.argv), "model": str(model), "serve_args": serve_args,
              "duration_s": args.duration, "concurrency": args.concurrency, "seed": args.seed,
              "machine": {"cpus": os.cpu_count(), "load_start": list(os.getloadavg())}, "log": str(log_path)}
    _log(f"starting the server (log {log_path})")
    t_start = time.monotonic()
    env = serve_env(args.kv_cache_gib, iomp=not args.no_iomp)
    header["ld_preload"] = env.get("LD_PRELOAD") or None
    server = ServeProcess(model, serve_args, log_path, env=env, timeout=args.startup_timeout)
    header["startup_s"] = round(time.monotonic() - t_start, 1)
    try:
        return _drive(args, server, header, log_path)
    finally:
        server.stop()


def _drive(args: argparse.Namespace, server: Any, header: dict[str, Any], log_path: Path) -> dict[str, Any]:
    model = server.model
    pool = load_prompts(args.prompts, args.seed)
    chat = chat_template_available(server.base, model)
    header["chat_template"] = chat
    endpoints = ENDPOINTS if chat else ("completions",)
    if not chat:
        _log(f"{Path(model).name} has no chat template: driving /v1/completions only (header chat_template: false)")
    prompts = fitting_prompts(server.base, model, pool, args.max_model_len - max(MAX_TOKENS) - 8, chat=chat)
    if not prompts:
        raise SystemExit(f"no prompt fits --max-model-len {args.max_model_len} with {max(MAX_TOKENS)} new tokens")
    header["prompts"] = {"source": args.prompts or "calibration", "offered": len(pool), "used": len(prompts)}
    client = Client(server.base, model, prompts, args.request_timeout)
    results: list[Result] = []
    # warm-up: a few of each endpoint, switch on and off, before the memory baseline
    n_warm = len(ENDPOINTS) * max(1, args.concurrency // 2)
    warm = [Plan("complete", endpoints[i % len(endpoints)], i % len(prompts), 32, False, bool(i % 2))
            for i in range(n_warm)]
    with ThreadPoolExecutor(args.concurrency) as ex:
        results += list(ex.map(lambda p: client.send(p, "warmup"), warm))
    time.sleep(2)
    rss_start = server.rss_mb()
    pre0 = server.metric("vllm:num_preemptions_total")
    _log(f"warm-up done ({len(warm)} requests), server RSS {rss_start:,.0f} MiB; driving {args.duration:g} s "
         f"x {args.concurrency} clients over {len(prompts)} prompts")
    soak = Soak(client, len(prompts), time.monotonic() + args.duration, endpoints=endpoints)
    threads = [threading.Thread(target=soak.worker, args=(random.Random(args.seed * 1000 + i),), daemon=True)
               for i in range(args.concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    rss_samples: list[list[float]] = []
    by_process: list[list[Any]] = []  # [t, {"<name> <pid>": MiB}]: which process grows

    def sample(el: float) -> float:
        parts = server.rss_parts()
        by_process.append([round(el, 1), {k: round(v, 1) for k, v in parts.items()}])
        rss_samples.append([round(el, 1), round(sum(parts.values()), 1)])
        return rss_samples[-1][1]

    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=max(0.1, 30 / len(threads)))
        el = time.monotonic() - t0
        if not rss_samples or el - rss_samples[-1][0] >= 30:
            rss = sample(el)
            with soak.lock:
                c = Counter(r.status for r in soak.results)
            _log(f"{el:5.0f} s: {sum(c.values())} requests, {c.get('ok', 0)} completed, {c.get('disconnect', 0)} "
                 f"disconnects, {c.get('abort', 0)} aborts, {sum(c.values()) - c.get('ok', 0) - c.get('disconnect', 0) - c.get('abort', 0)} "
                 f"failures; RSS {rss:,.0f} MiB")
    drive_s = time.monotonic() - t0
    results += soak.results
    # reference re-runs: greedy keys that completed with NanoSpec on but never with it off
    refs, _, _ = compare(results)
    need = sorted({r.plan.key for r in results if r.status == "ok" and r.plan.temperature == 0} - set(refs))
    _log(f"driving done in {drive_s:.0f} s; re-running {len(need)} greedy requests with NanoSpec off")
    plans = [Plan("complete", e, i, m, ie, False) for (e, i, m, ie) in need]
    with ThreadPoolExecutor(args.concurrency) as ex:
        results += list(ex.map(lambda p: client.send(p, "reference"), plans))
    slots = server.wait_metric("nanospec_slots_in_use", 0, timeout=60)
    running = server.wait_metric("vllm:num_requests_running", 0, timeout=30)
    preemptions = server.metric("vllm:num_preemptions_total") - pre0
    healthy = server.healthy()
    time.sleep(2)
    rss_end = sample(time.monotonic() - t0)
    report = summarize(results, preemptions=int(preemptions), slots_in_use_end=slots, running_end=running,
                       healthy=healthy, rss_start_mb=rss_start, rss_end_mb=rss_end,
                       max_rss_growth_mb=args.max_rss_growth_mb, require_exercised=not args.no_require_exercised)
    header["machine"]["load_end"] = list(os.getloadavg())
    report.update(drive_s=round(drive_s, 1), rss_samples_mb=rss_samples, rss_by_process_mb=by_process,
                  rss_trend=rss_trend(rss_samples[:-1]), header=header)
    lat = sorted(r.seconds for r in soak.results if r.status == "ok")
    if lat:
        report["latency_s"] = {"p50": round(lat[len(lat) // 2], 2), "max": round(lat[-1], 2)}
    return report


def _slope(pts: list[list[float]]) -> float | None:
    """Least-squares MiB per minute through ``[[t_s, MiB], ...]`` (None under 3 points)."""
    if len(pts) < 3:
        return None
    n = len(pts)
    mt, mr = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    var = sum((p[0] - mt) ** 2 for p in pts)
    return None if var == 0 else 60 * sum((p[0] - mt) * (p[1] - mr) for p in pts) / var


def rss_trend(samples: list[list[float]]) -> dict[str, Any]:
    """Growth rate of the driving phase's RSS samples, first half, second half and last quarter (MiB/min): a leak
    keeps its rate, caches filling up to a high-water mark grow in steps and then stay flat."""
    half, quarter = len(samples) // 2, len(samples) * 3 // 4
    rates = {"first_half": _slope(samples[: half + 1]), "second_half": _slope(samples[half:]),
             "last_quarter": _slope(samples[quarter:])}
    out: dict[str, Any] = {f"{k}_mb_per_min": None if v is None else round(v, 2) for k, v in rates.items()}
    out["samples"] = len(samples)
    return out


def plot_rss(report: dict[str, Any], png: str) -> None:
    """RSS over time, the server's total and each process (needs matplotlib: the ``test``/``bench`` extras)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    tot = report["rss_samples_mb"]
    ax.plot([t / 60 for t, _ in tot], [m - tot[0][1] for _, m in tot], label=f"server total ({tot[0][1]:,.0f} MiB at first)",
            lw=2)
    names = sorted({k for _, parts in report.get("rss_by_process_mb", []) for k in parts})
    for name in names:
        pts = [(t / 60, parts[name]) for t, parts in report["rss_by_process_mb"] if name in parts]
        ax.plot([p[0] for p in pts], [p[1] - pts[0][1] for p in pts], label=f"{name} ({pts[0][1]:,.0f} MiB)", lw=1)
    ax.set_xlabel("minutes since the driving began (the last point: after the reference re-runs)")
    ax.set_ylabel("resident memory above the first sample, MiB")
    ax.set_title(f"nanospec bench soak: {report['header'].get('command', '')}"[:110], fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="nanospec bench soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds of driving (default 600)")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--prompts", default=None, help='JSONL rows {"prompt": ...}; default: calibration prompts')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="prepared model name or folder")
    ap.add_argument("--draft", default=None, help="drafter (draft_model) name or folder; default: --model")
    ap.add_argument("--k", type=int, default=3, help="speculative tokens (default 3)")
    ap.add_argument("--speculative-config", default=None,
                    help="YAML/JSON file or JSON string; replaces --draft/--k and the default nanospec block")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--kv-blocks", type=int, default=6,
                    help="--num-gpu-blocks-override (KV-cache blocks; small forces preemption; 0 = vLLM's choice)")
    ap.add_argument("--kv-cache-gib", type=float, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `nanospec serve` argument (repeat)")
    ap.add_argument("--max-rss-growth-mb", type=float, default=512,
                    help="bound on the server's resident-memory growth after warm-up (MiB, default 512)")
    ap.add_argument("--request-timeout", type=float, default=600, help="client timeout of a normal request (s)")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--no-iomp", action="store_true", help="do not preload Intel OpenMP into the server")
    ap.add_argument("--no-require-exercised", action="store_true",
                    help="do not fail a run without preemption, disconnect, abort or comparison")
    ap.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    ap.add_argument("--plot", default=None, metavar="PNG", help="plot RSS over time (total and per process) here")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.duration <= 0 or args.concurrency < 1:
        ap.error("--duration must be > 0 and --concurrency >= 1")
    try:
        report = run(args)
    except RuntimeError as e:
        _log(f"server failed: {e}")
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot_rss(report, args.plot)
    keys = ("requests", "completed", "disconnects", "aborts", "preemptions", "errors_5xx", "errors_4xx",
            "errors_other", "compared", "mismatches", "slots_in_use_end", "rss_growth_mb")
    _log(", ".join(f"{k}={report[k]}" for k in keys))
    failed = [k for k, ok in report["checks"].items() if not ok]
    for m in report["mismatch_examples"][:3]:
        _log(f"mismatch {m['key']} nanospec={m['nanospec']}:\n  got {m['text'][:200]!r}\n  ref {m['reference'][:200]!r}")
    for e in report["error_examples"][:3]:
        _log(f"failure: {e['status']} {e['detail'][:200]}")
    if failed:
        _log(f"FAILED checks: {', '.join(failed)} (server log: {report['header']['log']})")
        return 1
    _log("all checks passed")
    if not args.log:
        Path(report["header"]["log"]).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
