"""The compiled (non-interpreted) Triton path builds for a Hopper GPU without one: the interpreter is lenient
about types (loop-carried values, scalar/block mixes), the real compiler is not. Uses the ptxas bundled with the
triton wheel; skipped when triton or its CUDA backend is missing.

Runs in a subprocess: triton cannot mix interpreted and compiled kernels in one process, and the other kernel
tests run under ``TRITON_INTERPRET=1``. ``python tests/kernels/test_triton_compile.py`` runs the same check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernels

VARIANTS = [  # weight dtype, ids dtype, row_index?, BLOCK_C, BLOCK_H
    ("bf16", "i32", False, 16, 256), ("fp16", "i64", True, 16, 256), ("fp32", "i32", True, 8, 64),
    ("bf16", "i32", True, 64, 512),
]


def _compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanospec_vllm.ops import triton_kernels as tk

    target = GPUTarget("cuda", 90, 32)
    opts = {"enable_fp_fusion": True}
    for weight, ids, has_ri, block_c, block_h in VARIANTS:
        sig = {
            "hidden_ptr": "*bf16", "weight_ptr": f"*{weight}", "ids_ptr": f"*{ids}", "counts_ptr": "*i32",
            "row_index_ptr": "*i32", "scores_ptr": "*fp32", "part_score_ptr": "*fp32", "part_id_ptr": "*i64",
            **{k: "i32" for k in ("H", "C", "Vw", "V_INDEX", "CHUNK", "NUM_SPLITS", "stride_hb", "stride_wr",
                                  "stride_ib", "stride_sb")},
            "HAS_ROW_INDEX": "constexpr", "BLOCK_C": "constexpr", "BLOCK_H": "constexpr",
        }
        src = ASTSource(triton.jit(tk._scores_kernel), sig,
                        {"HAS_ROW_INDEX": has_ri, "BLOCK_C": block_c, "BLOCK_H": block_h})
        assert triton.compile(src, target=target, options=opts).asm.get("cubin")
    sig = {"part_score_ptr": "*fp32", "part_id_ptr": "*i64", "tok_ptr": "*i64", "best_ptr": "*fp32",
           "NUM_SPLITS": "i32", "BLOCK_S": "constexpr"}
    src = ASTSource(triton.jit(tk._reduce_kernel), sig, {"BLOCK_S": 256})
    assert triton.compile(src, target=target, options=opts).asm.get("cubin")
    print(f"compiled {len(VARIANTS) + 1} kernels for sm_90")


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton")
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("triton's CUDA backend has no ptxas here")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], check=False, env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    _compile_all()
