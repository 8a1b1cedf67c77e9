"""Real per-request active sets for ``nanospec bench kernels --sets FILE``: built as the shipped policy builds them.

``python -m nanospec_vllm.tools.bench.sets --model qwen2.5-coder-0.5b --per-group 12 --max-tokens 64 --out F.jsonl``

Per prompt (the 7 Spec-Bench / HumanEval task groups of ``bench coverage``, chat template applied) the target
generates greedily (transformers, CPU or CUDA, batches of left-padded prompts) and the set is filled in the real
:class:`nanospec_vllm.state.ActiveVocabPool` in the runtime's order: at admission the prompt ids and stop ids, with
the special ids the chat template writes and the first ``--hot-size`` ids of the shipped hot set pinned; then per
generated position the emitted token followed by the target's top-``--topk`` ids there (the verified positions of
``target_topk``). Capacity and full policy are the shipped defaults (3,072, ``stop``). The set is seeded with
the whole prompt, but the generation sees only its last ``--max-prompt-tokens`` tokens (long Spec-Bench prompts
would otherwise make the prefill the whole cost on a CPU), so the continuations of long prompts are approximate.
Not simulated: the
drafter's own drafts (``add_draft_tokens``); they are the drafter's argmax over the set itself, so they add an
id only when it was already a candidate of the target, which makes the written sets a slight underestimate.

Writes one JSON line per request: ``{"task", "prompt_tokens", "generated", "ids": [...]}`` (the set when the
generation ended, pinned ids first). Cost: one greedy generation per prompt (the 0.5B target at 64 tokens: a few
seconds per prompt on a 2-core CPU, dominated by long prompts' prefill).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

__all__ = ["build_sets", "main"]


def _pinned(tok, model_config, hot_size: int) -> list[int]:
    from ...config import load_hot_set, shipped_hot_set
    from ...pinned import pinned_token_ids

    ids = set(pinned_token_ids(model_config, tok))
    hot = shipped_hot_set(tok)
    if hot and hot_size:
        ids |= set(load_hot_set(hot, hot_size))
    return sorted(ids)


def build_sets(model_dir: Path, prompts: list[tuple[str, str]], max_tokens: int, topk: int, capacity: int,
               hot_size: int, batch: int = 8, max_prompt_tokens: int = 384, log=print,
               on_batch=None) -> list[dict]:
    """The sets of ``prompts`` (``[(task, prompt)]``); ``on_batch(rows)`` gets each batch's rows as they are done."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...state import ActiveVocabPool
    from ..engine import chat_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    vocab = int(model.config.vocab_size)
    pinned = _pinned(tok, model.config, hot_size)
    pool = ActiveVocabPool(1, vocab, capacity, "cpu", pinned, "stop")
    eos = {i for i in [model.config.eos_token_id, tok.eos_token_id] if isinstance(i, int)}
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos))
    out: list[dict] = []
    t0 = time.time()
    for c in range(0, len(prompts), batch):
        chunk = prompts[c: c + batch]
        enc = [chat_ids(tok, p) for _, p in chunk]
        seen = [e[-max_prompt_tokens:] for e in enc]
        width = max(map(len, seen))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in seen])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in seen])
        with torch.no_grad():
            g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=pad)
        new = g.sequences[:, width:]
        tops = torch.stack([s.float().topk(topk, dim=-1).indices for s in g.scores], 1)  # [b, T, topk]
        for i, ((task, _), e) in enumerate(zip(chunk, enc, strict=True)):
            pool.seed("r", e + sorted(eos))
            n = 0
            for t in range(new.shape[1]):
                y = int(new[i, t])
                row = torch.cat([torch.tensor([y]), tops[i, t]]).view(1, -1)
                pool.extend(torch.zeros(1, dtype=torch.int64), row)
                n += 1
                if y in eos:
                    break
            out.append({"task": task, "prompt_tokens": len(e), "generated": n, "ids": pool.active_list("r")})
            pool.free("r")
        if on_batch is not None:
            on_batch(out[-len(chunk):])
        log(f"  sets: {len(out)}/{len(prompts)} requests ({time.time() - t0:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanospec_vllm.tools.bench.sets", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="a model name of `nanospec prepare-models` or a folder")
    p.add_argument("--per-group", type=int, default=12, help="prompts per task group")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--topk", type=int, default=64, help="target top-k ids added per generated position")
    p.add_argument("--capacity", type=int, default=3072)
    p.add_argument("--hot-size", type=int, default=512, help="ids of the shipped hot set pinned (0: none)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=384, help="prompt tokens the generation sees")
    p.add_argument("--out", required=True, help="JSONL file to write")
    a = p.parse_args(argv)
    from .coverage import load_prompts

    folder = Path(a.model)
    if not folder.is_dir():
        from ..assets import model_dir

        folder = model_dir(a.model)
    prompts = load_prompts("specbench", a.per_group)
    prompts.sort(key=lambda tp: len(tp[1]))  # similar lengths in a batch: less padding
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:  # written batch by batch: a cut-short run keeps what it made

        def write(batch_rows: list[dict]) -> None:
            f.writelines(json.dumps(r) + "\n" for r in batch_rows)
            f.flush()

        rows = build_sets(folder, prompts, a.max_tokens, a.topk, a.capacity, a.hot_size, a.batch,
                          a.max_prompt_tokens, on_batch=write)
    sizes = sorted(len(r["ids"]) for r in rows)
    print(f"wrote {len(rows)} sets to {a.out}: size median {sizes[len(sizes) // 2]}, max {sizes[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
