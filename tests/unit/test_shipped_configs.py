"""Every shipped speculative config (``configs/*.yaml``, ``configs/examples/*.yaml``) parses and validates the way
``--speculative-config FILE`` reads it, so an example a user copies never fails on its own keys."""

from __future__ import annotations

import pytest

from nanospec_vllm.config import configs_dir, load_config_file, split_speculative_config

FILES = sorted([*configs_dir().glob("*.yaml"), *(configs_dir() / "examples").glob("*.yaml")])


def test_the_configs_were_found() -> None:
    assert len(FILES) >= 6 and any(f.name == "nanospec.yaml" for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_shipped_config_validates(path) -> None:
    data = load_config_file(path)
    if path.name == "nanospec.yaml" or "method" in data:  # a speculative config (serve.yaml is a server config)
        rest, ns = split_speculative_config(data, source=str(path))
        assert ns is not None, f"{path.name} has no nanospec block"
        if path.name != "nanospec.yaml":
            assert rest.get("method") in ("draft_model", "eagle", "eagle3") and rest.get("model")
