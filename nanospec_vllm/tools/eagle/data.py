"""Training data for an EAGLE head: the target's own greedy continuations and its features, cached on disk.

1. :func:`split_prompts`: ``calibration_prompts(n_train + n_heldout, seed)`` (standard-library text and templated
   arithmetic, no benchmark text), split into a training part and a held-out part; held-out prompts whose source
   function also appears in the training part are dropped, so held-out acceptance is measured on unseen text.
2. :func:`generate`: the vLLM offline engine (one child process, batched, chat template applied) generates the
   target's greedy continuation of every training prompt (self-distillation).
3. :func:`extract_features`: one teacher-forced transformers forward of the target over prompt + continuation
   per sample, keeping the hidden state vLLM hands an EAGLE head: the output of the target's decoder stack
   **after** its final norm (vLLM's ``Qwen2Model.forward`` returns ``norm(h)``; ``EagleProposer`` feeds that as
   ``target_hidden_states``). Stored once as bf16 in ``features.safetensors`` (all samples concatenated, with
   offsets) next to ``tokens.json``. For an EAGLE-3 head the same pass also keeps the residual streams entering
   the head's aux layers (``aux``, see :func:`extract_features`).

Touches ``<work>/`` only (a folder under the head's cache). Costs (measured on a heavily shared 2-core CPU, see
docs/benchmarks/eagle-cpu.md): vLLM generation ~12 tokens/s (batched) and the forward pass 20-85 tokens/s there;
peak RAM is the target in bf16 (~1.3 GB) plus the features (2 x hidden bytes per token: ~1.8 kB per token for
0.5B), and ~6 GB for the vLLM engine child during generation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..calibration import calibration_prompts
from .engine import run_job

__all__ = ["extract_features", "generate", "load_features", "split_prompts"]


def split_prompts(n_train: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    ps = calibration_prompts(n_train + n_heldout, seed)
    train, held = ps[:n_train], ps[n_train:]
    seen = {p.source for p in train if p.source != "template"}
    held = [p for p in held if p.source == "template" or p.source not in seen]
    return [p.prompt for p in train], [p.prompt for p in held]


def generate(target: Path, prompts: list[str], max_new_tokens: int, work: Path, max_prompt_tokens: int = 768,
             progress: bool = True) -> dict:
    """Greedy continuations with vLLM; writes and returns ``work/tokens.json`` ({prompt_ids, tokens, wall_s})."""
    out = work / "tokens.json"
    if out.is_file():
        return json.loads(out.read_text())
    res = run_job({"model": str(target), "prompts": prompts, "max_tokens": max_new_tokens, "max_num_seqs": 128,
                   "max_prompt_tokens": max_prompt_tokens, "progress": progress}, log=work / "generate.log")
    data = {"prompt_ids": res["prompt_ids"], "tokens": res["tokens"], "wall_s": res["wall_s"]}
    work.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(out)
    return data


def extract_features(target: Path, data: dict, work: Path, threads: int = 2, progress: bool = True,
                     aux_layers: list[int] | None = None) -> dict:
    """Teacher-forced target forward per sample; writes ``work/features.safetensors`` and returns its stats.

    ``aux_layers`` (EAGLE-3): also keep, as ``aux`` [tokens, 3 x hidden], the concatenated residual streams
    **entering** those decoder layers, which is what vLLM's Qwen2 hands an EAGLE-3 head (``hidden + residual``
    before layer ``l``; ``interfaces.EagleModelMixin._maybe_add_hidden_state``). transformers'
    ``output_hidden_states`` tuple holds exactly that at index ``l`` (index 0: the embeddings, index ``l``: the
    output of layer ``l - 1``; only its last entry is replaced by the normed output), so the same pass gives both.
    Measured: ``python -m nanospec_vllm.tools.eagle.data --measure qwen2.5-coder-0.5b`` (8 calibration prompts
    + the target's 64-token continuations = 1,214 tokens, 2 threads, two alternating rounds, on a 2-core CPU
    heavily loaded by other jobs): 7.0 and 5.1 tokens/s without, 5.6 and 6.1 tokens/s with the three aux layers.
    The difference is within the load's noise; the pass costs what it cost before (20-85 tokens/s on a less
    loaded machine, see the module docstring).
    """
    out = work / "features.safetensors"
    if out.is_file():
        return json.loads((work / "features.json").read_text())
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.bfloat16)
    model.eval()
    if aux_layers and max(aux_layers) >= model.config.num_hidden_layers:
        raise ValueError(f"aux layers {aux_layers}: transformers replaces the last hidden state by the normed "
                         f"output; use ids below {model.config.num_hidden_layers}")
    seqs = [p + t for p, t in zip(data["prompt_ids"], data["tokens"])]
    feats, auxs, offsets, n = [], [], [0], 0
    t0 = time.perf_counter()
    it = enumerate(seqs)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(seqs), desc="features", unit="seq")
    with torch.inference_mode():
        for _, s in it:
            ids = torch.tensor([s])
            if aux_layers:
                o = model.model(input_ids=ids, output_hidden_states=True)
                auxs.append(torch.cat([o.hidden_states[layer][0] for layer in aux_layers], -1).to(torch.bfloat16))
            else:
                o = model.model(input_ids=ids)
            feats.append(o.last_hidden_state[0].to(torch.bfloat16))  # after the final norm, like vLLM's target
            n += len(s)
            offsets.append(n)
    wall = time.perf_counter() - t0
    tmp = out.with_suffix(".tmp")
    save_file({"features": torch.cat(feats), **({"aux": torch.cat(auxs)} if aux_layers else {}), "ids": torch.tensor([x for s in seqs for x in s], dtype=torch.int64),
               "offsets": torch.tensor(offsets, dtype=torch.int64),
               "prompt_lens": torch.tensor([len(p) for p in data["prompt_ids"]], dtype=torch.int64)}, str(tmp))
    tmp.rename(out)
    stats = {"tokens": n, "samples": len(seqs), "wall_s": wall, "tokens_per_s": n / wall,
             **({"aux_layers": list(aux_layers)} if aux_layers else {})}
    (work / "features.json").write_text(json.dumps(stats))
    return stats


def load_features(work: Path) -> dict[str, torch.Tensor]:
    return load_file(str(work / "features.safetensors"))


def measure(argv: list[str]) -> int:
    """``python -m nanospec_vllm.tools.eagle.data --measure TARGET [--prompts 8] [--tokens 64]``: tokens/s of
    the teacher-forced pass without and with the EAGLE-3 aux layers, alternating, on the target's own greedy
    continuations of calibration prompts (one vLLM engine start for those). Prints one JSON line."""
    import argparse
    import tempfile

    from .format3 import default_aux_layers
    from .train import resolve_target

    p = argparse.ArgumentParser(prog="python -m nanospec_vllm.tools.eagle.data --measure")
    p.add_argument("target")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    _, target = resolve_target(a.target)
    layers = default_aux_layers(json.loads((target / "config.json").read_text())["num_hidden_layers"])
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        data = generate(target, [c.prompt for c in calibration_prompts(a.prompts, seed=5)], a.tokens, work,
                        progress=False)
        res = {"prompts": a.prompts, "max_new_tokens": a.tokens, "threads": a.threads, "aux_layers": layers}
        for rnd in range(2):
            for name, aux in (("final_only", None), ("final_and_aux", layers)):
                for f in ("features.safetensors", "features.json"):
                    (work / f).unlink(missing_ok=True)
                st = extract_features(target, data, work, threads=a.threads, progress=False, aux_layers=aux)
                res.setdefault(name, []).append(round(st["tokens_per_s"], 1))
                res["tokens"] = st["tokens"]
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["--measure"]:
        sys.exit("usage: python -m nanospec_vllm.tools.eagle.data --measure TARGET [--prompts N] [--tokens N]")
    sys.exit(measure(sys.argv[2:]))
