"""``configs_dir`` finds the shipped configs in a checkout, through ``$NANOSPEC_CONFIGS``, and says where it
looked when they are nowhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanospec_vllm.tools import configs_dir


def test_checkout_and_override(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("NANOSPEC_CONFIGS", raising=False)
    assert configs_dir() == Path(__file__).resolve().parents[2] / "configs"
    (tmp_path / "nanospec.yaml").write_text("method: draft_model\n")
    monkeypatch.setenv("NANOSPEC_CONFIGS", str(tmp_path))
    assert configs_dir() == tmp_path


def test_missing_names_the_places(tmp_path, monkeypatch) -> None:
    from nanospec_vllm import config

    monkeypatch.setenv("NANOSPEC_CONFIGS", str(tmp_path / "nope"))
    monkeypatch.setattr(config, "__file__", str(tmp_path / "a" / "b" / "c.py"))
    monkeypatch.setattr(config.sys, "prefix", str(tmp_path / "prefix"))
    with pytest.raises(FileNotFoundError, match="NANOSPEC_CONFIGS"):
        configs_dir()
