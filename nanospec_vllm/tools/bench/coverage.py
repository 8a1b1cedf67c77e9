"""Offline coverage replay: how well an active-set policy keeps the full draft head's acceptance, in seconds.

``nanospec bench coverage [--source specbench|calibration] [--limit N] [--policies a,b] [--json OUT] [--markdown]``

Per prompt it replays greedy speculative decoding without an engine in the loop:

1. the TARGET's greedy continuation ``y`` (vLLM offline engine, no speculation, chat template applied), with
   its top-64 ids at every generated position (vLLM ``logprobs=64``: the logits row that predicts ``y[i]``,
   the same row the runtime's ``target_topk`` reads) and its top-16 at prompt positions (``prompt_logprobs``,
   for ``prompt_topk`` policies);
2. one teacher-forced forward of the DRAFTER (transformers) over ``prompt + y``: its final hidden states (after
   the final norm) at the positions that predict ``y``, its full-head ranking there (top-256 ids and scores,
   bf16-rounded, ties to the lowest id) and, for the low-rank screen, the top-64 ids of rank-r approximations
   of its head (:mod:`nanospec_vllm.tools.screen`);
3. the chain: a step starts at position ``p``; the draft at ``p+j`` (``j < K``) is the masked argmax of the
   drafter's logits over the ACTIVE SET (the first active id of the cached ranking, or an exact score of every
   active id when none of the top-256 is active); drafts are accepted while they equal ``y[p+j]``; ``a``
   accepted -> ``a+1`` tokens emitted, next step at ``p+a+1``. The full head is simulated the same way.
   Teacher forcing is exact up to the first mismatch of a step, which is all acceptance depends on (drafts
   after a mismatch, added to the set by ``add_draft_tokens``, are the teacher-forced picks: a small bias).
4. after every step the set is updated in the runtime's order (``nanospec_vllm/step.py:verified_update``): emitted
   tokens, then the target's top-k at the verified positions, then (after drafting) the step's K drafts; at
   admission the prompt ids and stop ids, with special ids and the optional hot set pinned. The set lives in
   the real :class:`nanospec_vllm.state.ActiveVocabPool` (one slot per prompt).

Reported per policy and task group: mean / p95 active size over draft steps, coverage (share of the target's
tokens at drafted positions -- up to the first rejection, as the runtime counts them -- that were active when
drafted), coverage per draft position, agreement (sparse pick == full pick at those positions), predicted
tau(sparse), tau(full) and their ratio, and why each miss happened: ``never`` (never seen in the request),
``beyond_topk`` (in the target's top-64 at an earlier verified position, not in the policy's top-k),
``dropped`` (offered to a full set and refused or evicted), ``other``. ``--json`` also writes one row per
prompt and policy (task, drafted, covered, ...) to compare with the engine's own coverage counters.

Cache: steps 1-2 are stored under ``$NANOSPEC_CACHE/coverage/<target>--<draft>/`` (one ``.npz`` per prompt,
keyed by the prompt text, models and max tokens; ~0.6 MB each), written batch by batch, so a policy sweep re-runs
in a fraction of a second per prompt and policy (one torch thread). A cold run costs one vLLM generation pass of
the target over the prompts plus one teacher-forced drafter pass (estimates, not recorded in a committed file: tens
of seconds per prompt for the 1.5B target at 128 tokens on a 2-core CPU, and several GB of RSS for the engine
with 1 GiB of KV space); the two phases never overlap.

Modules: :mod:`.coverage_cache` (prompts and the cached inputs of steps 1-2), :mod:`.coverage_replay` (policies,
step 3-4 and the aggregation), this one (the policy runs, the markdown report, the plot and the CLI).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from ..hotset import rank_ids
from .coverage_cache import build_cache, load_head, load_prompts, resolve_model, special_ids
from .coverage_replay import (
    CachedScorer,
    DenseScorer,
    DraftScorer,
    Policy,
    PromptData,
    PromptResult,
    aggregate,
    parse_policy,
    simulate,
)

__all__ = [
    "DenseScorer",
    "DraftScorer",
    "Policy",
    "PromptData",
    "aggregate",
    "build_cache",
    "load_prompts",
    "main",
    "parse_policy",
    "simulate",
]


# ---------------------------------------------------------------------------------------------- CLI
DEFAULT_POLICIES = ("paper,defaults,topk-3,topk-8,topk-16,topk-32,topk-64,"
                    "topk-64+sorted,topk-64+rank,topk-64+fifo")


def run_policies(items: list[dict], policies: list[Policy], k: int, weight: torch.Tensor, pinned: list[int],
                 hot_ids: list[int], log: Callable[[str], None] = print, hot_loo: bool = False) -> list[PromptResult]:
    """Replay every prompt under every policy. ``hot_loo``: each prompt's hot set is ranked from the OTHER
    prompts' continuations only (then lower id first): an out-of-sample hot set when the prompts are the
    calibration prompts the hot set would be built from."""
    results = []
    V = weight.shape[0]
    loo: list[list[int]] = []
    if hot_loo and any(p.hot for p in policies):
        size = max(p.hot for p in policies)
        loo = [rank_ids([int(t) for j, o in enumerate(items) if j != i for t in o["y"]], [], V, size)
               for i in range(len(items))]
    for pol in policies:
        t0 = time.time()
        fb = 0
        for n_it, it in enumerate(items):
            data = PromptData(task=str(it["task"]), prompt_ids=it["prompt_ids"], y=it["y"], target_top=it["target_top"],
                              prompt_top=it.get("prompt_top"), stop_ids=tuple(int(x) for x in it["stop_ids"]),
                              key=str(it["key"]))
            sc = CachedScorer(it["d_ids"], it["d_scores"], it["hidden"], weight)
            screen = it.get(f"screen{pol.screen_r}") if pol.screen_r else None
            hot = loo[n_it] if loo else hot_ids
            results.append(simulate(data, pol, sc, k, pinned=pinned, hot_ids=hot, vocab_size=V, screen=screen))
            fb += sc.fallbacks
        log(f"  {pol.name}: {len(items)} prompts in {time.time() - t0:.1f} s ({fb} exact fallbacks)")
    return results


def to_markdown(agg: dict, k: int) -> str:
    lines = []
    groups = [g for g in next(iter(agg.values())) if g != "ALL"] + ["ALL"]
    lines.append("| policy | group | prompts | mean size | p95 size | coverage | agreement | tau sparse | tau full | "
                 "tau ratio |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for pol, gs in agg.items():
        for g in groups:
            if g not in gs:
                continue
            v = gs[g]
            lines.append(f"| {pol} | {g} | {v['prompts']} | {v['mean_size']:.0f} | {v['p95_size']:.0f} | "
                         f"{v['coverage']:.3f} | {v['agreement']:.3f} | {v['tau_sparse']:.2f} | {v['tau_full']:.2f} | "
                         f"{v['tau_ratio']:.3f} |")
    lines.append("")
    lines.append("| policy | median group tau ratio | min group tau ratio | max group mean size | misses: never | "
                 "beyond top-k | dropped | other | " + " | ".join(f"cov pos {j}" for j in range(k)) + " |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * k)
    for pol, gs in agg.items():
        v = gs["ALL"]
        ms = v["miss_share"]
        lines.append(f"| {pol} | {v['median_group_ratio']:.3f} | {v['min_group_ratio']:.3f} | "
                     f"{v['max_group_mean_size']:.0f} | {ms['never']:.3f} | {ms['beyond_topk']:.3f} | "
                     f"{ms['dropped']:.3f} | {ms['other']:.3f} | " + " | ".join(f"{c:.3f}" for c in v["coverage_pos"])
                     + " |")
    return "\n".join(lines)


def plot(agg: dict, path: str, title: str = "") -> None:
    """Coverage vs mean active size, one panel per task group, one marker per policy (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in next(iter(agg.values())) if g != "ALL"] + ["ALL"]
    cols = 4
    rows = (len(groups) + cols - 1) // cols
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 3.2, 3.6 * rows), squeeze=False)
    markers = "os^vD<>pPX*h8d"
    for ax, g in zip(axes.flat, groups, strict=False):
        for n, (pol, gs) in enumerate(agg.items()):
            if g in gs:
                v = gs[g]
                ax.scatter(v["mean_size"], v["coverage"], marker=markers[n % len(markers)], s=42,
                           color=plt.cm.tab20(n % 20), label=pol)
        ax.set_title(g)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("mean active size (ids)")
        ax.set_ylabel("coverage")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 3.0 / (4.2 * cols + 3.2), 1))
    fig.legend(handles, labels, loc="center right", fontsize=7, ncol=1)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nanospec bench coverage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", default=None, help="JSONL rows {prompt, task}")
    ap.add_argument("--source", default="specbench", choices=("specbench", "calibration"))
    ap.add_argument("--limit", type=int, default=None, help="prompts per group")
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--hot-set", default=str(Path(__file__).resolve().parents[3] / "configs" / "hot" / "qwen2.5-hot.txt"))
    ap.add_argument("--hot-loo", action="store_true",
                    help="hot set per prompt from the other prompts' continuations (out-of-sample calibration)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--plot", default=None, help="PNG: coverage vs mean active size per group")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    target, draft = resolve_model(args.model), resolve_model(args.draft)
    policies = [parse_policy(p) for p in args.policies.split(",") if p.strip()]
    rows = load_prompts(args.source, args.limit, args.prompts)
    log(f"{len(rows)} prompts ({args.source if not args.prompts else args.prompts}), {len(policies)} policies")
    items = build_cache(target, draft, rows, args.max_tokens, log=log)
    weight = load_head(draft)
    pinned = special_ids(target)
    hot_ids: list[int] = []
    if any(p.hot for p in policies) and not args.hot_loo:
        from ...config import load_hot_set

        hot_ids = load_hot_set(args.hot_set)
    # the replay is thousands of tiny ops: one thread (OpenMP spin-waits make them 50x slower on a busy machine)
    torch.set_num_threads(1)
    results = run_policies(items, policies, args.k, weight, pinned, hot_ids, log=log, hot_loo=args.hot_loo)
    agg = aggregate(results, args.k)
    header = {
        "command": "nanospec bench coverage " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "target": target.name, "draft": draft.name, "k": args.k,
        "max_tokens": args.max_tokens, "source": args.prompts or args.source, "limit": args.limit,
        "prompts_per_group": {g: v["prompts"] for g, v in next(iter(agg.values())).items()},
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "policies": {p.name: asdict(p) for p in policies},
        "pinned_special_ids": len(pinned), "hot_set": "leave-one-out" if args.hot_loo else (args.hot_set if hot_ids
                                                                                             else None),
    }
    if args.markdown:
        print(to_markdown(agg, args.k))
    else:
        for pol, gs in agg.items():
            v = gs["ALL"]
            print(f"{pol:32s} size {v['mean_size']:6.0f} (max group {v['max_group_mean_size']:6.0f}) "
                  f"cov {v['coverage']:.3f} agree {v['agreement']:.3f} tau {v['tau_sparse']:.2f}/{v['tau_full']:.2f} "
                  f"ratio {v['tau_ratio']:.3f} (median group {v['median_group_ratio']:.3f}, "
                  f"min {v['min_group_ratio']:.3f})")
    if args.plot:
        plot(agg, args.plot, f"{target.name} <- {draft.name}, K={args.k}, {header['source']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": header, "summary": agg,
                                               "rows": [r.row() for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
