#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: the CUDA checks and benchmarks of NanoSpec, results under OUT.
#
#   scripts/gpu_bench.sh OUT_DIR          # from a checkout; needs python3 with torch (CUDA) + triton; no vLLM,
#                                         # no install (PYTHONPATH=the checkout)
#
# Steps, each under its own time limit, each recorded in OUT/summary.md with its exit status and duration (a
# failed step does not stop the later ones; the script exits non-zero if any step failed):
#   1. env.json                  python, torch, CUDA, triton, GPU, commit, date
#   2. kernel-tests.txt          pytest tests/kernels (the sparse head on CUDA vs the reference), if pytest is there
#   3. host-sync-tests.txt       pytest tests/unit/test_host_sync.py on CUDA under torch.cuda.set_sync_debug_mode
#                                ("error"), if pydantic is importable (the runtime parses its config with it);
#                                skipped, and said so, otherwise
#   4. kernels-cuda.{json,txt}     nanospec bench kernels --device cuda (sparse head vs dense lm_head)
#   5. union-cuda.{json,txt}       nanospec bench kernels --device cuda --union: per-request (Triton), union,
#                                  union-score, auto and dense at batch 1..256 on four head shapes, random full
#                                  sets and the real sets of docs/benchmarks/union-cpu-sets.jsonl (no CUDA cost
#                                  model is fitted yet: `auto` rows take the per-request path; `--fit` on this
#                                  JSON prints one)
#   6. draft-step-cuda.{json,txt}  one EAGLE draft step (layer + head) at Llama-3.1-8B / Qwen2.5-7B shapes,
#                                  batch 1..64, dense vs sparse head, CUDA graphs, ms/step and GB/s
# OUT then holds 10 files; summary.md ends with the markdown tables of the benchmarks (made from the JSON files;
# `python -m nanospec_vllm.tools.bench.<kernels|draft_step> --markdown FILE.json` makes them again).
# Budget: about 7 minutes on an H200 (the step limits add up to 13.75 minutes). Env: PYTHON (default python3),
# GPU_BENCH_SKIP_TESTS=1 skips steps 2-3.
set -uo pipefail

OUT=${1:?usage: scripts/gpu_bench.sh OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
FAILED=0
echo "| step | status | seconds |" > "$OUT/summary.md"
echo "|---|---|---:|" >> "$OUT/summary.md"

step() {  # step NAME LIMIT_S LOG CMD...
    local name=$1 limit=$2 log=$3 t0 rc
    shift 3
    echo "== $name (limit ${limit}s) -> $log"
    t0=$(date +%s)
    if [ "$log" = - ]; then
        timeout "$limit" "$@" 2>&1
        rc=$?
    else
        timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
        rc=${PIPESTATUS[0]}
    fi
    [ "$rc" -eq 0 ] || FAILED=1
    echo "| $name | $([ "$rc" -eq 0 ] && echo ok || echo "failed (rc=$rc)") | $(( $(date +%s) - t0 )) |" >> "$OUT/summary.md"
}

skip() {  # skip NAME WHY
    echo "== $1: skipped ($2)"
    echo "| $1 | skipped: $2 | 0 |" >> "$OUT/summary.md"
}

step env 30 - "$PY" - "$OUT/env.json" <<'PYEOF'
import datetime, json, platform, subprocess, sys
import torch
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
info["commit"] = r.stdout.strip() or None
info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                    check=False).stdout.strip())
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"), indent=1)
sys.exit(0 if info["cuda_available"] else 3)
PYEOF

if [ "${GPU_BENCH_SKIP_TESTS:-0}" = 1 ]; then
    skip kernel-tests "GPU_BENCH_SKIP_TESTS=1"
    skip host-sync-tests "GPU_BENCH_SKIP_TESTS=1"
elif ! "$PY" -c "import pytest" 2>/dev/null; then
    skip kernel-tests "no pytest"
    skip host-sync-tests "no pytest"
else
    step kernel-tests 90 kernel-tests.txt "$PY" -m pytest -q -p no:cacheprovider tests/kernels
    if "$PY" -c "import pydantic" 2>/dev/null; then
        step host-sync-tests 45 host-sync-tests.txt "$PY" -m pytest -q -p no:cacheprovider -rs tests/unit/test_host_sync.py
    else
        skip host-sync-tests "pydantic is not installed (carry its wheels to run it)"
    fi
fi

step bench-kernels 120 kernels-cuda.txt "$PY" -m nanospec_vllm.tools.bench.kernels --device cuda \
    --json "$OUT/kernels-cuda.json"

step bench-union 240 union-cuda.txt "$PY" -m nanospec_vllm.tools.bench.kernels --device cuda --union \
    --sets docs/benchmarks/union-cpu-sets.jsonl --json "$OUT/union-cuda.json"

step bench-draft-step 300 draft-step-cuda.txt "$PY" -m nanospec_vllm.tools.bench.draft_step --device cuda \
    --json "$OUT/draft-step-cuda.json"

for b in kernels:kernels-cuda kernels:union-cuda draft_step:draft-step-cuda; do
    if [ -f "$OUT/${b#*:}.json" ]; then
        { echo; echo "## ${b#*:}"; echo; "$PY" -m "nanospec_vllm.tools.bench.${b%%:*}" --markdown "$OUT/${b#*:}.json"; } \
            >> "$OUT/summary.md" 2>&1
    fi
done
echo
cat "$OUT/summary.md"
exit $FAILED
