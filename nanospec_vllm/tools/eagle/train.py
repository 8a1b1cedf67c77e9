"""``nanospec train-eagle TARGET``: train an EAGLE-1 (or, ``--arch eagle3``, EAGLE-3) head on this machine's CPUs.

Prints the head's folder.

Pipeline (each stage cached under ``$NANOSPEC_CACHE/heads/.work/<name>-<settings>/``, so a rerun resumes):

1. prompts: ``calibration_prompts(prompts + heldout, seed)`` (no benchmark text), split train / held-out
   (:mod:`.data`);
2. data: the target's greedy continuations from the vLLM offline engine (self-distillation), then one
   teacher-forced transformers forward per sample for the features vLLM feeds the head (after the final norm),
   cached in bf16;
3. training (:mod:`.model`): smooth-L1 on the next feature + 0.1 x soft cross-entropy against the target's
   next-token distribution through the frozen lm_head, restricted to a candidate set of lm_head rows (the
   step's actual next tokens + ``--neg`` uniform ids; its gradient against the full-vocabulary loss is measured
   and written to the card); AdamW (0.9, 0.95), weight decay 0, warm-up + cosine learning rate, gradient
   clipping 0.5, uniform noise U(-0.1, 0.1) on input features; deterministic for ``--seed``. ``--unroll S``
   also trains draft steps 2..S on the head's own fed-back features, as vLLM drafts
   (:meth:`.model.EagleHead.forward_unrolled`; loss weight 0.5^(s-1), ~S x the cost per step). The number of
   steps is sized to ``--budget-min`` from the throughput measured on the first steps (``--steps`` fixes it);
4. acceptance: vLLM with ``method: eagle``, 3 speculative tokens, greedy, on the held-out calibration prompts:
   acceptance per draft position and tau = 1 + accepted / drafts;
5. publish ``$NANOSPEC_CACHE/heads/<name>/`` atomically: ``config.json``, ``model.safetensors`` (no
   embedding / lm_head: vLLM shares the target's), ``card.json`` and ``card.md``. A second call with the same
   settings returns the folder at once.

``--arch eagle3`` (:mod:`.format3`, :mod:`.model3`) changes stages 2-5: the same teacher-forced pass also keeps the
target's residual streams entering the aux layers (vLLM's default ``2, n/2, n-3``); the draft vocabulary is the
``--draft-vocab`` ids the training data (prompt + continuation tokens) uses most, BOS/EOS/pad pinned, stored as
``d2t``/``t2d`` with the head's own lm_head (initialised from the target's rows; ``--draft-vocab 0``: the full
vocabulary through the target's frozen lm_head, none stored); the head starts from N(0, 0.02) weights and unit
norms (:func:`_new_head3` says why); the loss is the soft cross-entropy against the target's distribution
restricted to the draft vocabulary (sampled rows as above), at positions whose next token the vocabulary holds,
for ``--unroll`` (default 3) draft steps of the
training-time test (:meth:`.model3.Eagle3Head.forward_unrolled`: the pre-norm output fed back, the attention
vLLM's draft loop has; weight 0.5^s); acceptance with ``method: eagle3``. ``--data calibration,selfprompt``
adds requests the target writes itself (:mod:`.selfprompt`) to the training prompts (held out: calibration).

Costs (0.5B target, measured on a heavily shared 2-core CPU, see docs/benchmarks/eagle-cpu.md): for the
defaults (96 prompts x 128 tokens) vLLM generation ~14 min (12 tokens/s batched) and features ~15 min (~20
tokens/s; ~85 tokens/s measured when the machine was less loaded), training ``--budget-min`` (default 10) or
``--max-epochs`` passes, acceptance ~3 min. Peak RAM ~3 GB (target's embedding + lm_head in bf16, the head and
AdamW state in fp32, the features) plus ~6 GB while a vLLM engine child runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..assets import cache_root, model_path
from .card import CARD_FORMAT, card_md, special_ids, write_random_head
from .data import extract_features, generate, load_features, split_prompts
from .engine import run_job, summarize
from .format import head_config, write_head
from .format3 import check_tensors3, draft_vocab, eagle3_config
from .model import EagleHead
from .model3 import Eagle3Head
from .steps import Sampler, Vocab3, measure_equivalence, micro


def resolve_target(target: str) -> tuple[str, Path]:
    p = Path(target).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.name, p
    folder = model_path(target)
    if folder is None:
        raise SystemExit(f"nanospec train-eagle: {target!r} is neither a model folder nor a prepared model; "
                         f"run `nanospec prepare-models {target}`")
    return target, folder


def _shared_weights(target: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's embedding and lm_head (bf16, read straight from its safetensors; tied -> the same)."""
    from safetensors import safe_open

    emb = head = None
    for f in sorted(target.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys = set(st.keys())
            if "model.embed_tokens.weight" in keys:
                emb = st.get_tensor("model.embed_tokens.weight").to(torch.bfloat16)
            if "lm_head.weight" in keys:
                head = st.get_tensor("lm_head.weight").to(torch.bfloat16)
    if emb is None:
        raise RuntimeError(f"no model.embed_tokens.weight in {target}")
    return emb, emb if head is None else head


def _settings(a: argparse.Namespace) -> dict:
    if a.arch == "eagle3":
        return {"arch": "eagle3", "draft_vocab": a.draft_vocab, "aux_layers": a.aux_layers,
                **_settings(argparse.Namespace(**dict(vars(a), arch="eagle")))}
    return {"prompts": a.prompts, "heldout": a.heldout, "max_new_tokens": a.max_new_tokens, "seed": a.seed,
            "budget_min": None if a.steps else a.budget_min, "steps": a.steps, "tokens_per_step": a.tokens_per_step,
            "lr": a.lr,
            "neg": a.neg, "ce_weight": a.ce_weight, "noise": a.noise, "max_epochs": a.max_epochs,
            "threads": a.threads, **({"unroll": a.unroll} if a.unroll > 1 else {}),
            **({"data": a.data} if a.data != "calibration" else {}),
            **({"selfprompts": a.selfprompts} if "selfprompt" in a.data.split(",") else {})}


def _new_head3(cfg: dict, vocab: dict | None, lm_head: torch.Tensor) -> Eagle3Head:
    """A fresh EAGLE-3 head: weights N(0, 0.02), norms 1, a reduced lm_head = the target's rows of the draft
    vocabulary. Chosen by the step-1 cross-entropy at initialisation on the toy run's 12 samples (full 32k
    draft vocabulary): 11.0 this way; 22.4 with the target's final-norm weight as ``norm``; 15.0 with also fc
    passing the top aux layer through (the target's own logits at the last position: it drafts the input token
    again, top-1 agreement 0.9%)."""
    head = Eagle3Head(cfg, own_lm_head=vocab is not None)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
        if vocab is not None:
            head.lm_head.weight.copy_(lm_head[vocab["ids"]].float())
    return head


def train(a: argparse.Namespace, cfg: dict, feats: dict, emb: torch.Tensor, lm_head: torch.Tensor,
          progress: bool = True, vocab: dict | None = None) -> tuple[dict, dict]:
    """Train a head; EAGLE-3 when ``cfg`` is an EAGLE-3 config (``vocab``: :func:`.format3.draft_vocab`'s
    reduced vocabulary, None for the full one through the target's lm_head)."""
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    eagle3 = "draft_vocab_size" in cfg
    if eagle3:
        head = _new_head3(cfg, vocab, lm_head)
        lm_head = Vocab3(lm_head, vocab)  # what _micro3 needs, passed where EAGLE-1 passes the lm_head
    else:
        head = EagleHead(cfg)
        with torch.no_grad():  # start near "next feature = this feature" (fc passes the feature through)
            for p in head.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02)
            h = cfg["hidden_size"]
            head.fc.weight[:, h:] += torch.eye(h)
    lengths = [min(int(feats["offsets"][i + 1] - feats["offsets"][i]), a.max_len + 1) - 1
               for i in range(len(feats["offsets"]) - 1)]
    n_tokens = sum(lengths)
    g = torch.Generator().manual_seed(a.seed + 1)
    eq_idx = list(range(min(2, len(lengths))))
    eq_before = measure_equivalence(head, feats, eq_idx, emb, lm_head, a, a.seed + 2)
    opt = torch.optim.AdamW(head.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sampler = Sampler(lengths, a.tokens_per_step, a.seed)
    budget_s = a.budget_min * 60
    steps = a.steps
    warm = 3  # steps timed to size the run when --steps is not given
    curve, step, t_start = [], 0, time.perf_counter()
    t_measure = None
    bar = None
    total_steps = steps or 10**9
    stopped_early = False
    while step < total_steps:
        if steps is None and time.perf_counter() - t_start > 1.25 * budget_s:
            stopped_early = True  # the machine slowed down after sizing: keep the wall budget
            break
        if steps is None and step == warm:
            el = time.perf_counter() - t_start
            tps = sampler.seen / el
            max_steps = int(a.max_epochs * n_tokens / a.tokens_per_step)
            total_steps = max(step + 1, min(max_steps, int(budget_s * tps / a.tokens_per_step)))
            t_measure = {"tokens_per_s": tps, "steps": total_steps}
            if progress:
                print(f"train-eagle: {tps:.0f} tokens/s measured -> {total_steps} steps of ~{a.tokens_per_step} "
                      f"tokens ({total_steps * a.tokens_per_step / n_tokens:.2f} epochs of {n_tokens} tokens)",
                      file=sys.stderr, flush=True)
        if progress and bar is None and total_steps < 10**9:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=step, desc="train", unit="step")
        warm_lr = min(1.0, (step + 1) / 10)
        frac = step / max(1, total_steps) if total_steps < 10**9 else 0.0
        lr = a.lr * warm_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = sampler.step()
        ntok = sum(lengths[i] for i in idx)
        agg = dict.fromkeys(["loss", *([] if eagle3 else ["l1"]), "ce", "acc",
                             *(f"acc{s}" for s in range(2, a.unroll + 1))], 0.0)
        for i in idx:
            r = micro(head, feats, i, emb, lm_head, a, g)
            (r["loss"] * (lengths[i] / ntok)).backward()
            for k in agg:
                agg[k] += float(r[k].detach()) * lengths[i] / ntok if k in r else 0.0
        gn = float(torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        curve.append({"step": step, "tokens": sampler.seen, "t_s": round(time.perf_counter() - t_start, 1),
                      "lr": lr, "grad_norm": gn, **{k: round(v, 5) for k, v in agg.items()}})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{agg['loss']:.3f}", ce=f"{agg['ce']:.2f}", acc=f"{agg['acc']:.2f}",
                            **({} if eagle3 else {"l1": f"{agg['l1']:.3f}"}))
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start
    eq_after = measure_equivalence(head, feats, eq_idx, emb, lm_head, a, a.seed + 2)
    stats = {"steps": step, "train_wall_s": wall, "token_passes": sampler.seen, "epochs": sampler.seen / n_tokens,
             "data_tokens": n_tokens, "tokens_per_s": sampler.seen / wall, "sizing": t_measure,
             "stopped_early_at_1.25x_budget": stopped_early,
             "loss_equivalence": {"at_init": eq_before, "after_training": eq_after}, "curve": curve}
    return {k: v.detach() for k, v in head.state_dict().items()}, stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanospec train-eagle", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="prepared model name (qwen2.5-coder-0.5b) or a model folder")
    p.add_argument("--budget-min", type=float, default=15.0, help="training wall budget in minutes (default 15)")
    p.add_argument("--prompts", type=int, default=480, help="training prompts (default 480)")
    p.add_argument("--heldout", type=int, default=48, help="held-out calibration prompts (acceptance on the first 16 kept)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generated tokens per prompt (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="fix the number of steps (default: sized to budget)")
    p.add_argument("--tokens-per-step", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--neg", type=int, default=2048, help="uniform negative lm_head rows per sample")
    p.add_argument("--ce-weight", type=float, default=0.1)
    p.add_argument("--noise", type=float, default=0.1,
                   help="half-width of the uniform feature noise (eagle only; eagle3 trains on its own fed-back "
                        "states instead)")
    p.add_argument("--max-epochs", type=float, default=8.0, help="cap on passes over the data (small data overfits)")
    p.add_argument("--unroll", type=int, default=None,
                   help="draft steps trained per position (default 2 for eagle, 3 for eagle3): 1 = teacher-forced "
                        "features only; more also trains on the head's own fed-back states, as vLLM drafts "
                        "(EAGLE-3's training-time test; loss weight 0.5^s)")
    p.add_argument("--arch", choices=("eagle", "eagle3"), default="eagle",
                   help="eagle: EAGLE-1 (vLLM method eagle); eagle3: EAGLE-3 over three target layers (eagle3)")
    p.add_argument("--draft-vocab", type=int, default=32000,
                   help="eagle3: draft vocabulary size, the ids the training data uses most (d2t); 0 = the full "
                        "vocabulary through the target's lm_head (no d2t)")
    p.add_argument("--aux-layers", default=None,
                   help="eagle3: three target layer ids, comma-separated (default vLLM's: 2, n/2, n-3)")
    p.add_argument("--data", default="calibration",
                   help="training prompt sources, comma-separated: calibration (standard-library text and arithmetic),"
                        " selfprompt (requests the target writes itself, tools/eagle/selfprompt.py)")
    p.add_argument("--selfprompts", type=int, default=None,
                   help="with --data ...selfprompt: how many self-written prompts (default: --prompts)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per sample used in training")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 2))
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 head forward (default: bf16 autocast)")
    p.add_argument("--out", default=None, help="head folder (default $NANOSPEC_CACHE/heads/<name>)")
    p.add_argument("--force", action="store_true", help="retrain even if the head exists")
    p.add_argument("--quick", action="store_true", help="toy size for tests: 6 prompts, 24 tokens, 4 steps")
    p.add_argument("--random-weights", action="store_true",
                   help="no data, no training: write a head of the right shape for TARGET with random weights "
                        "(acceptance meaningless, draft cost real: for measuring draft time on any vocabulary)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def train_eagle(argv: list[str]) -> Path:
    a = build_parser().parse_args(argv)
    if a.unroll is None:
        a.unroll = 3 if a.arch == "eagle3" else 2
    if a.quick:
        a.prompts, a.heldout, a.max_new_tokens, a.steps, a.tokens_per_step, a.neg = 6, 4, 24, 4, 256, 256
    sources = a.data.split(",")
    if not sources or set(sources) - {"calibration", "selfprompt"}:
        raise SystemExit(f"nanospec train-eagle: --data {a.data!r}: sources are calibration, selfprompt")
    if "selfprompt" in sources and a.selfprompts is None:
        a.selfprompts = a.prompts
    name, target = resolve_target(a.target)
    tcfg = json.loads((target / "config.json").read_text())
    if a.arch == "eagle3":
        a.aux_layers = ([int(x) for x in a.aux_layers.split(",")] if a.aux_layers else
                        eagle3_config(tcfg)["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        a.draft_vocab = 0 if a.draft_vocab in (0, tcfg["vocab_size"]) else a.draft_vocab
    if a.random_weights:
        return write_random_head(name, target, a)
    head_name = (f"eagle1-{name}" if a.arch == "eagle" else
                 f"eagle3-{name}" + ("-full" if a.draft_vocab == 0 else "")) + ("-quick" if a.quick else "")
    out = Path(a.out).expanduser() if a.out else cache_root() / "heads" / head_name
    settings = _settings(a)
    card_path = out / "card.json"
    if card_path.is_file() and not a.force:
        card = json.loads(card_path.read_text())
        if card.get("settings") == settings and card.get("format") == CARD_FORMAT:
            return out
        raise SystemExit(f"nanospec train-eagle: {out} holds a head trained with other settings; pass --force "
                         "to retrain it or --out for another folder")
    progress = not a.quiet
    t0 = time.perf_counter()
    tag = (f"{head_name}-p{a.prompts}-n{a.max_new_tokens}-s{a.seed}"
           + ("" if a.data == "calibration" else f"-{a.data.replace(',', '+')}{a.selfprompts}"))
    work = cache_root() / "heads" / ".work" / tag
    train_prompts, held = split_prompts(a.prompts, a.heldout, a.seed)
    if "calibration" not in sources:
        train_prompts = []
    self_stats = None
    if "selfprompt" in sources:
        from .selfprompt import self_prompts

        sp = self_prompts(target, a.selfprompts, a.seed, work / "selfprompts.json", progress=progress)
        train_prompts = train_prompts + sp["prompts"]
        self_stats = {k: v for k, v in sp.items() if k != "prompts"}
    t_gen = time.perf_counter()
    data = generate(target, train_prompts, a.max_new_tokens, work, progress=progress)
    gen_s = time.perf_counter() - t_gen
    eagle3 = a.arch == "eagle3"
    fstats = extract_features(target, data, work, threads=a.threads, progress=progress,
                              aux_layers=a.aux_layers if eagle3 else None)
    emb, lm_head = _shared_weights(target)
    feats = load_features(work)
    vocab = None
    if eagle3:
        n_vocab = int(tcfg["vocab_size"])
        counts = torch.bincount(feats["ids"], minlength=n_vocab)[:n_vocab]
        if a.draft_vocab:
            vocab = draft_vocab(counts, a.draft_vocab, special_ids(target, tcfg))
        cfg = eagle3_config(tcfg, a.draft_vocab or None, a.aux_layers)
        tensors, tstats = train(a, cfg, feats, emb, lm_head, progress=progress, vocab=vocab)
        if vocab is not None:
            tensors.update(d2t=vocab["d2t"], t2d=vocab["t2d"])
            cont = torch.cat([torch.tensor(t, dtype=torch.int64) for t in data["tokens"] if t] or [torch.zeros(0)])
            tstats["draft_vocab"] = {"size": a.draft_vocab, "data_tokens_covered": float(counts[vocab["ids"]].sum()
                                                                                          / counts.sum()),
                                     "generated_tokens_covered": float(vocab["t2d"][cont.long()].float().mean())
                                     if len(cont) else None,
                                     "distinct_ids_in_data": int((counts > 0).sum())}
        check, method = check_tensors3, "eagle3"
    else:
        cfg = head_config(tcfg)
        tensors, tstats = train(a, cfg, feats, emb, lm_head, progress=progress)
        check, method = None, "eagle"
    del feats, emb, lm_head
    # acceptance on held-out calibration prompts: write a provisional head, measure, then publish with the card
    tmp_head = write_head(work / "head", cfg, tensors, check=check)
    mnt = 32 if a.quick else 64
    held = held[:16]
    res = run_job({"model": str(target), "prompts": held, "max_tokens": mnt,
                   "spec": {"method": method, "model": str(tmp_head), "num_speculative_tokens": 3}})
    acc = dict(summarize(res["metrics"]), prompts=len(held), max_tokens=mnt,
               generated_tokens=sum(map(len, res["tokens"])))
    source = " + ".join(
        ([("nanospec_vllm.tools.calibration.calibration_prompts("
          f"{a.prompts + a.heldout}, seed={a.seed}) (standard-library docstrings/code + templated arithmetic; "
          "no benchmark text); the first prompts train, the rest are held out")] if "calibration" in sources else [])
        + ([(f"{a.selfprompts} requests the target wrote itself (nanospec_vllm.tools.eagle.selfprompt, seed "
            f"{a.seed})")] if "selfprompt" in sources else []))
    card = {"format": CARD_FORMAT, "kind": "eagle1" if method == "eagle" else "eagle3", "target": name,
            "target_folder": str(target),
            "settings": settings, "config": {k: cfg[k] for k in ("hidden_size", "intermediate_size",
                                                                 "num_attention_heads", "num_key_value_heads")},
            "parameters": sum(int(t.numel()) for t in tensors.values() if t.is_floating_point()),
            "data": {"source": "target's greedy continuations (vLLM, chat template) of " + source
                               + "; held out: calibration prompts whose source the training part lacks",
                     **({"selfprompt": self_stats} if self_stats else {}),
                     "train_prompts": len(train_prompts), "heldout_prompts": len(held),
                     "generated_tokens": sum(map(len, data["tokens"])), "data_tokens": fstats["tokens"],
                     "generation_wall_s": data["wall_s"], "generation_total_s": gen_s,
                     "features_wall_s": fstats["wall_s"], "features_tokens_per_s": fstats["tokens_per_s"]},
            "training": tstats, "acceptance_heldout": acc, "total_wall_s": time.perf_counter() - t0,
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {a.threads} threads (shared)"}
    if eagle3:
        card["config"].update({k: cfg[k] for k in ("draft_vocab_size", "eagle_config")})
    card["total_wall_s"] = time.perf_counter() - t0
    write_head(out, cfg, tensors, {"card.json": json.dumps(card, indent=1) + "\n", "card.md": card_md(card)},
               check=check)
    return out


def main(argv: list[str]) -> int:
    print(train_eagle(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
