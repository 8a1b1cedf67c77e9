"""Chat-style training prompts that the target writes itself (``train-eagle --data selfprompt``).

An instruct model given only its chat template's opening of a user turn (system turn, then the tokens that
start a user message, and nothing else) continues with a plausible user request, which it ends with its
end-of-turn token (the "Magpie" idea, arXiv 2406.08464). No dataset and no benchmark text is involved: the only
text this module supplies is a short system hint per prompt, drawn from :data:`TOPICS` x :data:`LANGUAGES`
(written here), so that the requests spread over subjects and languages instead of collapsing onto the few the
model writes most.

* :func:`user_turn_opening`: the rendered template up to where a user message's content starts, found by
  rendering a sentinel message and cutting at it (works for any template that places the content verbatim;
  raises otherwise).
* :func:`dedup`: drops empty, unfinished (length-capped), template-token-bearing and near-duplicate requests
  (normalised text equal, or word-trigram Jaccard >= 0.7 with one already kept).
* :func:`self_prompts`: samples with the vLLM offline engine (temperature 1.0, top-p 0.95, per-request seeds,
  up to 160 tokens), de-duplicates, and repeats with fresh seeds until ``n`` are kept; cached as JSON.

Measured (``python -m nanospec_vllm.tools.eagle.selfprompt qwen2.5-coder-0.5b --n 24``, 2 shared cores): see
docs/benchmarks/eagle-cpu.md. Touches only the cache file it is given.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path

__all__ = ["LANGUAGES", "TOPICS", "dedup", "self_prompts", "system_hints", "user_turn_opening"]

TOPICS = (
    "writing or fixing Python code", "JavaScript and web front ends", "SQL queries and databases",
    "shell scripts and the command line", "C, C++ or Rust programming", "algorithms and data structures",
    "debugging an error message", "explaining a programming concept", "arithmetic and word problems",
    "algebra, geometry or probability", "physics or chemistry homework", "biology and medicine",
    "history and historical events", "geography and travel planning", "cooking and recipes",
    "personal finance and budgeting", "writing an email or a letter", "writing a short story or a poem",
    "summarising a paragraph the user pastes", "translating a sentence the user gives",
    "grammar and word choice", "job interviews and careers", "health, sport and fitness",
    "philosophy and ethics", "economics and business", "music, films and books",
    "role-play as a character", "giving advice on a personal situation", "extracting facts from a text",
    "comparing two products or options",
)
LANGUAGES = ("English",) * 6 + ("Chinese", "Spanish", "French", "German", "Japanese", "Russian", "Portuguese")
_SENTINEL = "\u2063NanoSpec user content\u2063"


def system_hints(n: int, seed: int) -> list[str]:
    """``n`` system messages, each naming one topic and one language (seeded, cycling through the topics)."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    out = []
    for i in range(n):
        if i % len(topics) == 0:
            rng.shuffle(topics)
        lang = rng.choice(LANGUAGES)
        out.append(f"You are a helpful assistant. The user writes in {lang} and asks about "
                   f"{topics[i % len(topics)]}.")
    return out


def user_turn_opening(tok, system: str | None) -> str:
    """The chat template rendered up to the start of a user message's content (after an optional system turn)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": _SENTINEL}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    cut = text.find(_SENTINEL)
    if cut < 0:
        raise ValueError("the chat template does not place a user message's content verbatim")
    return text[:cut]


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _shingles(text: str) -> set[tuple[str, ...]]:
    w = _norm(text).split()
    return {tuple(w[i:i + 3]) for i in range(max(1, len(w) - 2))}


def dedup(texts: list[str], finished: list[bool] | None = None, kept: list[str] | None = None,
          min_chars: int = 12, jaccard: float = 0.7) -> list[str]:
    """The requests worth keeping, in order: stripped, at least ``min_chars``, finished (not cut at the token
    limit), free of template tokens (``<|...|>``), and not a near-duplicate of one kept before (``kept`` counts
    too): same normalised text, or word-trigram Jaccard >= ``jaccard``."""
    prev = list(kept or [])
    keys = {_norm(t) for t in prev}
    sh = [_shingles(t) for t in prev]
    out = []
    for i, t in enumerate(texts):
        t = t.strip()
        if len(t) < min_chars or (finished is not None and not finished[i]) or re.search(r"<\|[^|]*\|>", t):
            continue
        k = _norm(t)
        if not k or k in keys:
            continue
        s = _shingles(t)
        if any(len(s & o) / max(1, len(s | o)) >= jaccard for o in sh):
            continue
        keys.add(k)
        sh.append(s)
        out.append(t)
    return out


def self_prompts(target: Path, n: int, seed: int, cache: Path | None = None, max_tokens: int = 160,
                 rounds: int = 4, progress: bool = True) -> dict:
    """``n`` de-duplicated requests written by ``target``: {prompts, generated, rounds, wall_s, prompts_per_s}."""
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("n") == n and data.get("seed") == seed:
            return data
    from transformers import AutoTokenizer

    from .engine import run_job

    tok = AutoTokenizer.from_pretrained(str(target))
    kept: list[str] = []
    generated, t0, used = 0, time.perf_counter(), 0
    for r in range(rounds):
        need = n - len(kept)
        if need <= 0:
            break
        used += 1
        m = int(need * 1.5) + 4  # oversample: some are dropped as duplicates or unfinished
        hints = system_hints(m, seed * 1000 + r)
        res = run_job({"model": str(target), "prompts": [user_turn_opening(tok, h) for h in hints], "raw": True,
                       "max_tokens": max_tokens, "temperature": 1.0, "top_p": 0.95, "seed": seed * 100_000 + r * m,
                       "max_num_seqs": 64, "progress": progress})
        generated += len(res["texts"])
        kept += dedup(res["texts"], [f == "stop" for f in res["finish_reasons"]], kept)[:need]
        if progress:
            print(f"selfprompt: round {r + 1}: {len(kept)}/{n} kept of {generated} generated", file=sys.stderr,
                  flush=True)
    wall = time.perf_counter() - t0
    data = {"n": n, "seed": seed, "prompts": kept, "generated": generated, "rounds": used, "wall_s": wall,
            "prompts_per_s": len(kept) / wall, "max_tokens": max_tokens, "temperature": 1.0, "top_p": 0.95}
    if len(kept) < n:
        raise RuntimeError(f"selfprompt: only {len(kept)} distinct requests of {n} after {rounds} rounds")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.rename(cache)
    return data


def main(argv: list[str]) -> int:
    import argparse

    from .train import resolve_target

    p = argparse.ArgumentParser(prog="python -m nanospec_vllm.tools.eagle.selfprompt")
    p.add_argument("target")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the prompts and figures here")
    a = p.parse_args(argv)
    _, target = resolve_target(a.target)
    data = self_prompts(target, a.n, a.seed, progress=False)
    if a.json:
        Path(a.json).write_text(json.dumps(data, indent=1))
    print(json.dumps({k: v for k, v in data.items() if k != "prompts"}))
    for t in data["prompts"]:
        print("---", t.replace("\n", " ")[:300])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
