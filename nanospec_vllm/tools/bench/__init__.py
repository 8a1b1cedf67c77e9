"""``nanospec bench ...``: kernels, draft-step, e2e, coverage, soak, serve-load (a module or a small package each;
``micro_bench_main`` is the shared main of kernels and draft-step)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["micro_bench_main"]


def micro_bench_main(prog: str, argv: list[str] | None, parse: Callable[[list[str]], tuple[Any, str | None, str | None]],
                     markdown: Callable[[dict], str], run: Callable[[Any, list[str], str | None], Any],
                     setup: Callable[[Any], None] | None = None) -> int:
    """The ``main`` of the microbenchmarks (``bench kernels``, ``bench draft-step``): ``parse(argv)`` gives
    ``(settings, json_path, markdown_from)``; with ``--markdown FILE`` print ``markdown(json of FILE)``; refuse
    ``--device cuda`` without a CUDA device (exit 2); else ``setup(settings)`` (optional) and
    ``run(settings, argv, json_path)``."""
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    s, json_path, markdown_from = parse(argv)
    if markdown_from:
        with open(markdown_from) as f:
            print(markdown(json.load(f)))
        return 0
    if s.device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if setup is not None:
        setup(s)
    run(s, argv, json_path)
    return 0
