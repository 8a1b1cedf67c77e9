"""``nanospec demo`` (``make demo``): the main job, end to end on this machine.

First a core check without vLLM (a real prompt, its active set, the sparse head's greedy token vs the dense
head's, on the 0.5B model). Then it starts ``nanospec serve`` in one of two settings (``--setting``):

* ``eagle`` (default): the Qwen2.5-Coder-0.5B target with its EAGLE-1 head (``configs/examples/eagle-cpu.yaml``),
  the setting NanoSpec was made for: the head shares the target's 136M-parameter lm_head, most of a draft step's
  cost. The head is trained once by ``nanospec train-eagle qwen2.5-coder-0.5b`` (~25 min on a 2-core CPU) and
  cached; later demos start at once.
* ``draft_model``: the 1.5B target with the 0.5B drafter (``configs/nanospec.yaml``), whose lm_head is a
  minority of its cost.

It sends the same real prompts with NanoSpec on and switched off per request (``vllm_xargs: {"nanospec": 0}``:
the full draft head), one at a time, greedy, then stops that server and sends them to a server without
speculation, and prints three rows: no speculation, the head without NanoSpec, the head with NanoSpec (tokens/s,
median over prompts; acceptance and tau from vLLM's own ``/metrics``; mean active-set size and coverage from
NanoSpec's), whether NanoSpec's outputs equal the head's without it (exit 1 otherwise), and which row is fastest.

Timings on a shared 2-core machine are noisy; on/off alternate prompt by prompt so drift hits both alike; the
no-speculation row comes from its own server started right after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

DEFAULT_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number using memoization.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Write a function `is_prime(n)` in Python and a few unit tests for it.",
    "Summarize in three sentences why version control is useful for a software team.",
    "Write a SQL query that returns the five customers with the highest total order value.",
    "Implement binary search in Python and explain its time complexity.",
]


def _metrics(base: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_labels, val = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if "per_pos" in name:
            continue
        try:
            out[name] = out.get(name, 0.0) + float(val)
        except ValueError:
            pass
    return out


def _post(base: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=600).read())


#: What ``make demo`` can show. ``eagle`` is the setting NanoSpec was made for (the head's lm_head is most of the
#: draft cost); ``draft_model`` is a 0.5B drafter whose lm_head is a minority of its cost.
SETTINGS = {
    "eagle": {"target": "qwen2.5-coder-0.5b", "config": "examples/eagle-cpu.yaml",
              "head": "eagle1-qwen2.5-coder-0.5b", "train": ["qwen2.5-coder-0.5b"]},
    "eagle3": {"target": "qwen2.5-coder-0.5b", "config": "examples/eagle3-cpu.yaml",
               "head": "eagle3-qwen2.5-coder-0.5b-full",
               "train": ["qwen2.5-coder-0.5b", "--arch", "eagle3", "--draft-vocab", "0",
                         "--data", "calibration,selfprompt", "--budget-min", "30"]},
    "draft_model": {"target": "qwen2.5-coder-1.5b", "config": "nanospec.yaml"},
}
DEFAULT_SETTING = "eagle"


def setting_head(setting: str = DEFAULT_SETTING) -> Path | None:
    """Where the setting's ``nanospec train-eagle`` command puts its head (what its example config names)."""
    from .assets import cache_root

    head = SETTINGS[setting].get("head")
    return None if head is None else cache_root() / "heads" / head


def core_check(model_dir: Path, prompt: str, steps: int = 24, capacity: int = 3072, k: int = 3) -> bool:
    """The core alone, on a real model (no vLLM): greedy-decode ``steps`` tokens with transformers and, at every
    position, draft with the sparse head over the active set (prompt ids + emitted tokens + the model's top-k at
    verified positions, special ids pinned) next to the dense head. Wherever the dense head's token is in the set,
    the sparse head must pick the same token; returns False otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..ops import sparse_head
    from ..state import ActiveVocabPool
    from .bench.e2e.job import has_chat_template, prompt_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    # through the chat template; a base model without one gets the raw prompt (as /v1/completions sends it)
    templated = has_chat_template(tok)
    ids = torch.tensor([prompt_ids(tok, prompt)], dtype=torch.long)
    weight = model.get_output_embeddings().weight  # [V, H], read only
    V = weight.shape[0]
    pool = ActiveVocabPool(1, V, capacity, pinned_ids=[i for i in tok.all_special_ids if i < V])
    slot = torch.tensor([pool.seed("demo", ids[0])])
    in_set = equal = 0
    impl = ""
    sizes = []
    with torch.no_grad():
        for _ in range(steps):
            out = model(ids, output_hidden_states=True)
            h = out.hidden_states[-1][:, -1]  # [1, H], after the final norm
            dense_tok = int(out.logits[0, -1].float().argmax())
            act, cnt = pool.active(slot)
            res = sparse_head(h, weight, act, cnt)
            impl = res.impl
            sizes.append(int(cnt[0]))
            if bool(pool.contains(slot, torch.tensor([[dense_tok]]))[0, 0]):
                in_set += 1
                equal += int(res.token_ids[0]) == dense_tok
            # verification: the emitted token and the top-k at this position join the set
            new = torch.cat([torch.tensor([dense_tok]), out.logits[0, -1].topk(k).indices]).reshape(1, -1)
            pool.extend(slot, new)
            ids = torch.cat([ids, torch.tensor([[dense_tok]])], dim=1)
    answer = tok.decode(ids[0, -steps:])
    print(f"core check on {model_dir.name} (sparse head impl={impl}, no vLLM): {steps} greedy tokens\n"
          f"  prompt{'' if templated else ' (raw: the tokenizer has no chat template)'}: {prompt!r}\n"
          f"  answer: {answer!r}\n"
          f"  active set: {sizes[0]} -> {sizes[-1]} of {V} ids ({V / sizes[-1]:.0f}x smaller than the vocabulary)\n"
          f"  dense head's token in the active set at {in_set}/{steps} positions (coverage); "
          f"sparse head picked the same token at {equal}/{in_set} of those\n", flush=True)
    return equal == in_set


def main(argv: list[str]) -> int:
    from . import configs_dir
    from .assets import model_path

    ap = argparse.ArgumentParser(prog="nanospec demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default=DEFAULT_SETTING,
                    help="eagle: the 0.5B target with its trained EAGLE-1 head; eagle3: with its trained EAGLE-3 "
                         "head (full vocabulary); each trained and cached on first use; draft_model: the 1.5B "
                         "target with the 0.5B drafter")
    ap.add_argument("--target", default=None, help="prepared model name or a model folder (default: the setting's)")
    ap.add_argument("--config", default=None, help="speculative config file (default: the setting's)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", help="Spec-Bench style question.jsonl (first turn of each line) instead of the "
                                      "built-in prompts")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--log", default=None, help="server log file (default: a temp file)")
    ap.add_argument("--no-core-check", action="store_true", help="skip the core check before serving")
    ap.add_argument("--json", default=None, help="also write the three rows' figures to this file")
    a = ap.parse_args(argv)
    setting = SETTINGS[a.setting]
    a.target = a.target or setting["target"]
    a.config = a.config or str(configs_dir() / setting["config"])
    head = setting_head(a.setting)
    if head is not None and not (head / "config.json").is_file():
        print("nanospec demo: training the EAGLE head first (once; cached): nanospec train-eagle "
              f"{' '.join(setting['train'])}", flush=True)
        from .eagle.train import train_eagle

        train_eagle(list(setting["train"]))

    target = Path(a.target) if Path(a.target).is_dir() else model_path(a.target)
    if target is None:
        print(f"nanospec demo: {a.target} is not prepared; run `nanospec prepare-models {a.target} "
              "qwen2.5-coder-0.5b` (make demo does)", file=sys.stderr)
        return 1
    prompts = DEFAULT_PROMPTS
    if a.prompts:
        prompts = [json.loads(line)["turns"][0] for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    prompts = prompts[: a.num_prompts]
    draft = model_path("qwen2.5-coder-0.5b")
    if not a.no_core_check and draft is not None and not core_check(draft, prompts[0]):
        print("core check failed: the dense head's token was in the active set but the sparse head chose "
              "another", file=sys.stderr)
        return 1

    from .server import ServeProcess, serve_env

    log = Path(a.log) if a.log else Path(os.environ.get("TMPDIR", "/tmp")) / f"nanospec-demo-{os.getpid()}.log"
    env = serve_env(kv_cache_gib=float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")))
    common = ["--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "4"]
    model = str(target)
    print(f"$ nanospec serve {model} --speculative-config {a.config} {' '.join(common)}\n  (server log: {log})",
          flush=True)
    t0 = time.time()
    try:
        server = ServeProcess(model, ["--speculative-config", a.config, *common], log, env=env, timeout=600)
    except RuntimeError as e:
        print(f"nanospec demo: {e}", file=sys.stderr)
        return 1
    try:
        print(f"server ready in {time.time() - t0:.0f} s; {len(prompts)} prompts x {a.max_tokens} tokens, greedy, "
              "one at a time, NanoSpec on / off alternating\n", flush=True)
        modes = _measure(server.base, model, prompts, a.max_tokens, ("on", "off"))
    finally:
        server.stop()
    # the third row: the same prompts on a server without speculation (its own start, right after)
    nolog = log.with_name(log.stem + "-no-spec.log")
    print(f"$ nanospec serve {model} {' '.join(common)}   (no speculation; log: {nolog})", flush=True)
    try:
        server = ServeProcess(model, common, nolog, env=env, timeout=600)
    except RuntimeError as e:
        print(f"nanospec demo: {e}", file=sys.stderr)
        return 1
    try:
        modes.update(_measure(server.base, model, prompts, a.max_tokens, ("no-spec",)))
    finally:
        server.stop()
    meta = {"command": "nanospec demo " + " ".join(argv), "setting": a.setting, "target": model,
            "config": a.config, "max_tokens": a.max_tokens, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} CPU cores"}
    return _report(modes, prompts, a.json, meta)


_KEYS = ("vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_draft_tokens_total",
         "vllm:spec_decode_num_drafts_total", "nanospec_active_vocab_size_sum",
         "nanospec_active_vocab_size_count", "nanospec_target_tokens_total",
         "nanospec_target_tokens_covered_total")
_LABELS = {"no-spec": "no speculation", "off": "head, NanoSpec off", "on": "head + NanoSpec"}


def _measure(base: str, model: str, prompts: list[str], max_tokens: int, order: tuple[str, ...]) -> dict:
    """Each prompt once per mode (``on`` / ``off``: the per-request switch; ``no-spec``: a plain server), the
    modes' order alternating prompt by prompt; tokens/s per request, the texts, and the metric deltas."""
    _post(base, {"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0})  # warm-up
    modes: dict = {m: {"tps": [], "texts": [], "d": {}} for m in order}
    for i, p in enumerate(prompts):
        for mode in (order if i % 2 == 0 else order[::-1]):
            before = _metrics(base)
            body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0}
            if mode == "off":
                body["vllm_xargs"] = {"nanospec": 0}
            t = time.perf_counter()
            r = _post(base, body)
            dt = time.perf_counter() - t
            time.sleep(0.3)
            after = _metrics(base)
            m = modes[mode]
            m["tps"].append(r["usage"]["completion_tokens"] / dt)
            m["texts"].append(r["choices"][0]["text"])
            for k in _KEYS:
                m["d"][k] = m["d"].get(k, 0.0) + after.get(k, 0.0) - before.get(k, 0.0)
    return modes


def summarize(modes: dict, prompts: list[str]) -> dict:
    """The three rows' figures (tokens/s median and per prompt, acceptance, tau, active set, coverage), the output
    agreement counts and the fastest row: what ``--json`` writes and the report prints."""
    rows = {}
    for mode in ("no-spec", "off", "on"):
        d = modes[mode]["d"]
        rows[mode] = {"label": _LABELS[mode], "tokens_per_s": statistics.median(modes[mode]["tps"]),
                      "tokens_per_s_per_prompt": [round(x, 3) for x in modes[mode]["tps"]],
                      "draft_acceptance": d[_KEYS[0]] / d[_KEYS[1]] if d.get(_KEYS[1]) else None,
                      "tau": 1 + d[_KEYS[0]] / d[_KEYS[2]] if d.get(_KEYS[2]) else None,
                      "mean_active": d[_KEYS[3]] / d[_KEYS[4]] if d.get(_KEYS[4]) else None,
                      "coverage": d[_KEYS[6]] / d[_KEYS[5]] if d.get(_KEYS[5]) else None}
    speed = {m: r["tokens_per_s"] for m, r in rows.items()}
    return {"rows": rows, "prompts": len(prompts),
            "same_as_head": sum(x == y for x, y in zip(modes["on"]["texts"], modes["off"]["texts"])),
            "same_as_no_spec": sum(x == y for x, y in zip(modes["on"]["texts"], modes["no-spec"]["texts"])),
            "fastest": max(speed, key=speed.get)}


def _report(modes: dict, prompts: list[str], json_path: str | None = None, meta: dict | None = None) -> int:
    """Three rows (no speculation, the head, the head with NanoSpec) and which is fastest. Exit 1 when NanoSpec's
    outputs differ from the same head's without it (the lossless claim); outputs of no speculation may differ
    from any speculation in bf16 (vLLM's verification numerics), so they are counted, not required.
    ``json_path``: also write :func:`summarize`'s figures (with ``meta``: command, setting, date) there."""
    s = summarize(modes, prompts)
    print(f"{'configuration':<20} {'tok/s (median)':>15} {'draft accept':>13} {'tau':>6} {'active set':>11} "
          f"{'coverage':>9}")
    speed = {}
    for mode, r in s["rows"].items():
        acc, tau, size, cov = r["draft_acceptance"], r["tau"], r["mean_active"], r["coverage"]
        speed[mode] = r["tokens_per_s"]
        print(f"{_LABELS[mode]:<20} {speed[mode]:>15.1f} {(f'{acc:.1%}' if acc is not None else '-'):>13} "
              f"{(f'{tau:.2f}' if tau is not None else '-'):>6} {(f'{size:.0f}' if size is not None else '-'):>11} "
              f"{(f'{cov:.1%}' if cov is not None else '-'):>9}")
    n, same, same_plain, fastest = len(prompts), s["same_as_head"], s["same_as_no_spec"], s["fastest"]
    if json_path:
        Path(json_path).write_text(json.dumps(dict(meta or {}, **s), indent=1) + "\n")
    print(f"\noutputs identical, head + NanoSpec vs the head without it: {same}/{n}; vs no speculation: "
          f"{same_plain}/{n}")
    print(f"head + NanoSpec: {speed['on'] / speed['off']:.2f}x the head without it, "
          f"{speed['on'] / speed['no-spec']:.2f}x no speculation")
    print(f"fastest here: {_LABELS[fastest]} ({speed[fastest]:.1f} tok/s)")
    print(f"first answer (head + NanoSpec):\n{modes['on']['texts'][0][:400]}")
    return 0 if same == n else 1
