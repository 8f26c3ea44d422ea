"""Resource report of the torch-triton kernels without a GPU: Triton -> PTX -> ptxas (sm_90a).

    pip install torch triton            # Triton wheels ship ptxas
    python benchmarks/triton_kernel_report.py [--dims 128 64] [--out benchmarks/results]

Compiles each kernel of tq/backends/triton_kernels.py for an H100 (sm_90a) with the launch
settings tq/backends/triton_backend.py uses, and reports per setting: compile time,
registers and spill bytes (ptxas -v), shared memory, and PTX counts that tell how the
kernel was lowered (warp shuffles and shared-memory stores for the butterflies, wgmma / mma
for the tensor-core products, fma and .ftz, which the exact encode must not contain).
No device time: it answers "does it spill, does it fit shared memory, is the encode free
of fma" before a GPU run measures speed.  Writes triton_kernel_report.md / .json to --out.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")  # compile times, not cache hits

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS, environment, write_results  # noqa: E402

SECTIONS = {"codes_ptr": "*u8", "norms_ptr": "*fp16", "qjl_ptr": "*u8", "rnorms_ptr": "*fp16"}


def ptxas_info(ptx: str) -> dict:
    import triton

    try:  # the ptxas Triton itself picks for sm_90 (newer Triton ship two, for the PTX it writes)
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except (ImportError, TypeError, AttributeError):
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        err = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None}


def compile_one(fn, signature, constexprs, options, gluon=False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as Source
    else:
        from triton.compiler import ASTSource as Source
    t0 = time.time()
    k = triton.compile(Source(fn=fn, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=options)
    seconds = time.time() - t0
    ptx = k.asm["ptx"]
    row = {"compile_s": round(seconds, 1), "shared_bytes": k.metadata.shared}
    row.update(ptxas_info(ptx))
    row.update({"shfl": ptx.count("shfl.sync"), "st_shared": ptx.count("st.shared"),
                "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
                "fma": len(re.findall(r"\bfma\.", ptx)), "ftz": ptx.count(".ftz")})
    return row


def settings(dims):
    """(kernel, kind, bits, dim) settings of the launches triton_backend makes."""
    for d in dims:
        for kind, bits in [("mse", 2), ("mse", 3), ("mse", 4), ("prod", 2), ("prod", 3), ("prod", 4)]:
            yield d, kind, bits


def report(dims) -> list[dict]:
    import tq
    from tq.backends import triton_backend as trb
    from tq.backends import triton_kernels as tk

    rows = []
    for d, kind, bits in settings(dims):
        plan = tq.QuantizerConfig(d, bits, kind=kind).plan()
        p, b, prod = plan.padded_dim, plan.config.mse_bits, kind == "prod"
        base = {"dim": d, "P": p, "kind": kind, "bits": bits}
        enc_sig = {"x_ptr": "*fp16", "n": "i32", "stride_x": "i32", "signs_ptr": "*fp32", "bounds_ptr": "*fp32",
                   "cents_ptr": "*fp32", "qjl_ptr": "*fp32", "codes_ptr": "*u8", "norms_ptr": "*fp16",
                   "signs_out_ptr": "*u8", "rnorms_ptr": "*fp16"}
        if p <= 128 and b <= trb.MAX_BITS:
            consts = {"DIM": d, "P": p, "LOG2P": p.bit_length() - 1, "ROUNDS": 2, "BITS": b, "NC": False,
                      "PROD": prod, "NW": trb.GLUON_WARPS}
            sig = dict(enc_sig, **{k: "constexpr" for k in consts})
            rows.append(dict(base, kernel="encode_gluon", **compile_one(
                tk.encode_gluon, sig, consts, dict(num_warps=trb.GLUON_WARPS, **tk.STRICT), gluon=True)))
        if p <= trb.MAX_DECODE_P:
            consts = {"DIM": d, "P": p, "BITS": b, "CODE_BYTES": plan.code_bytes, "PROD": prod,
                      "R": trb.DECODE_ROWS, "NB": min(trb.DECODE_COLUMNS, p)}
            sig = dict(SECTIONS, cents_ptr="*fp32", m_ptr="*fp32", smhi_ptr="*fp32", smlo_ptr="*fp32",
                       out_ptr="*fp32", n="i32", stride_out="i32", qscale="fp32", **{k: "constexpr" for k in consts})
            rows.append(dict(base, kernel="decode_kernel", **compile_one(
                tk.decode_kernel, sig, consts, dict(num_warps=trb.DECODE_WARPS, **trb.SINGLE_STAGE))))
            consts = {"P": p, "NCENT": 1 << b, "BITS": b, "CODE_BYTES": plan.code_bytes, "PROD": prod,
                      "BM": trb.SCORE_QUERIES, "BN": trb.SCORE_ROWS}
            sig = dict({"q_ptr": "*fp32", "sq_ptr": "*fp32"}, **SECTIONS, cents_ptr="*fp32", out_ptr="*fp32",
                       m="i32", n="i32", stride_out="i32", qscale="fp32", **{k: "constexpr" for k in consts})
            rows.append(dict(base, kernel="scores_kernel", **compile_one(
                tk.scores_kernel, sig, consts, dict(num_warps=trb.SCORE_WARPS, **trb.SINGLE_STAGE))))
        if 16 <= p <= 128 and kind == "mse":
            consts = {"DIM": d, "P": p, "LOG2P": p.bit_length() - 1, "ROUNDS": 2, "BITS": b, "NW": trb.GLUON_WARPS}
            sig = dict(codes_ptr="*u8", norms_ptr="*fp16", signs_ptr="*fp32", cents_ptr="*fp32", out_ptr="*fp32",
                       n="i32", stride_out="i32", **{k: "constexpr" for k in consts})
            rows.append(dict(base, kernel="decode_gluon", **compile_one(
                tk.decode_gluon, sig, consts, dict(num_warps=trb.GLUON_WARPS, **tk.STRICT), gluon=True)))
        if 16 <= p <= 128:
            consts = {"P": p, "BITS": b, "PROD": prod, "NW": trb.GLUON_WARPS}
            sig = dict({"q_ptr": "*fp32", "sq_ptr": "*fp32"}, **SECTIONS, cents_ptr="*fp32", out_ptr="*fp32",
                       m="i32", n="i32", stride_out="i32", qscale="fp32", **{k: "constexpr" for k in consts})
            rows.append(dict(base, kernel="scores_gluon", **compile_one(
                tk.scores_gluon, sig, consts, dict(num_warps=trb.GLUON_WARPS), gluon=True)))
        print(rows[-1]["kernel"], d, kind, bits, "done", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="triton_kernel_report")
    args = ap.parse_args()
    import triton

    env = environment(["torch", "triton"])
    env["target"] = "sm_90a (H100), offline: triton.compile + the ptxas Triton ships"
    rows = report(args.dims)
    cols = ["kernel", "dim", "kind", "bits", "compile_s", "registers", "spill_bytes", "shared_bytes", "shfl",
            "st_shared", "wgmma", "mma_sync", "fma", "ftz"]
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    table += "\n".join("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows)
    notes = ("\nCounts are PTX instructions (before ptxas); registers and spills from ptxas -v. The encode must "
             "show fma 0 and ftz 0 (FORMAT.md section 2); triton " + triton.__version__ + ".\n")
    import _common
    _common.RESULTS = type(RESULTS)(args.out)
    write_results(args.stem, env, rows, table, notes)


if __name__ == "__main__":
    main()
