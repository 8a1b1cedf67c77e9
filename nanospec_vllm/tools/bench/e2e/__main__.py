"""``python -m nanospec_vllm.tools.bench.e2e``: the command (and each engine job's entry point)."""

import sys

from .run import main

sys.exit(main())
