"""Resource report of tq's CUDA kernels without a GPU: NVRTC -> PTX -> ptxas -> SASS.

    pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12     # libnvrtc and ptxas
    python benchmarks/kernel_report.py [--module decode|quant] [--kernels "EXPR;EXPR"]
                                       [--nvdisasm PATH] [--define -DNAME=V ...] [--out DIR]

For each kernel: registers, stack frame, spills (ptxas -v, sm_90) and, when
nvdisasm is found (Triton wheels ship one in triton/backends/nvidia/bin), the
instruction count of its longest loop by opcode: the main loop of the decode
split kernel, the tile loop of the encode kernel.  This answers "did an array go
to local memory, how many instructions per tile" at no device time
(docs/DECODE_KERNEL.md, notes).  Writes kernel_report.md / .json to --out.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment  # noqa: E402

DEFAULT = {
    "decode": "tq_split_mma<128,4,4,4,1,2,1,2,2>;tq_split_mma<128,3,2,4,1,2,1,2,2>;"
              "tq_split_fma<128,4,4,4,2,2,2>;tq_store<128,4,4,2>",
    "quant": "tqq_encode<128,3,false>;tqq_decode<128,3,false>;tqq_scores<128,3,false>",
}


def _find(pattern: str) -> str | None:
    for root in sys.path:
        hits = glob.glob(os.path.join(root, pattern))
        if hits:
            return hits[0]
    return None


def source(module: str) -> tuple[str, list[str]]:
    if module == "decode":
        from tq.cuda._build import kernel_source
        return kernel_source(), ["-std=c++17", "-default-device"]
    kdir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tq", "kernels")
    with open(os.path.join(kdir, "quant_common.cuh")) as f:
        common = f.read()
    with open(os.path.join(kdir, "quant_fast.cu")) as f:
        text = f.read()
    return text.replace('#include "quant_common.cuh"', common), ["--std=c++17", "-fmad=false", "-default-device"]


def nvrtc_ptx(lib, src: str, names: list[str], opts: list[str]) -> str:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"tq.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    for n in names:
        lib.nvrtcAddNameExpression(prog, n.encode())
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        raise RuntimeError("NVRTC compilation failed:\n" + log.value.decode())
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def loop_stats(sass: str) -> dict:
    """name -> instructions, and the main loop's length and opcode counts (the longest
    backward-branch loop holding an HMMA where there is one, else the longest loop)."""
    out = {}
    for f in re.split(r"\n\s*\.text\.", sass)[1:]:
        name = f.split(":")[0]
        ins, labels = [], {}
        for line in f.split("\n"):
            lm = re.match(r"\s*\.(L_x_\d+):", line)
            if lm:
                labels[lm.group(1)] = len(ins)
            m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
            if m:
                ins.append(m.group(2).strip())
        loops = [(labels[m.group(1)], i) for i, t in enumerate(ins)
                 for m in [re.search(r"BRA.*(L_x_\d+)", t)] if m and labels.get(m.group(1), i) < i]
        entry = {"instructions": len(ins)}
        # a back edge from an out-of-line retry block (e.g. an mbarrier wait placed after the
        # function's exit) spans code that is not the loop: such ranges hold an EXIT, RET or CALL
        loops = [lp for lp in loops if not any(re.match(r"(@!?P\w+\s+)?(EXIT|RET|CALL)", t)
                                               for t in ins[lp[0]:lp[1]])]
        mma = [lp for lp in loops if any("HMMA" in t for t in ins[lp[0]:lp[1] + 1])]
        if mma or loops:  # the tensor-core main loop where there is one, else the longest loop
            a, b = max(mma or loops, key=lambda x: x[1] - x[0])
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in ins[a:b + 1])
            entry["longest_loop"] = b - a + 1
            entry["loop_ops"] = dict(ops.most_common(12))
        out[name] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", choices=("decode", "quant"), default="decode")
    ap.add_argument("--kernels", default=None, help="';'-separated template expressions")
    ap.add_argument("--define", action="append", default=[], help="extra NVRTC option, e.g. -DTQ_MMA_MINB=4")
    ap.add_argument("--nvrtc", default=None, help="path of libnvrtc.so (default: the nvidia-cuda-nvrtc wheel)")
    ap.add_argument("--ptxas", default=None)
    ap.add_argument("--nvdisasm", default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--sass", default=None, help="also write the disassembly to this file")
    a = ap.parse_args()
    nvrtc = a.nvrtc or _find("nvidia/cuda_nvrtc/lib/libnvrtc.so*")
    ptxas = a.ptxas or _find("nvidia/cuda_nvcc/bin/ptxas")
    nvdisasm = a.nvdisasm or _find("triton/backends/nvidia/bin/nvdisasm")
    if not nvrtc or not ptxas:
        sys.exit("needs libnvrtc and ptxas: pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 "
                 "(or pass --nvrtc / --ptxas)")
    names = (a.kernels or DEFAULT[a.module]).split(";")
    src, opts = source(a.module)
    ptx = nvrtc_ptx(ctypes.CDLL(nvrtc), src, names, opts + ["--gpu-architecture=compute_90"] + a.define)
    with tempfile.TemporaryDirectory() as tmp:
        pf, cf = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(pf, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-arch=sm_90", "-v", pf, "-o", cf], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        res, cur = {}, None
        for line in r.stderr.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                cur = m.group(1)
                res[cur] = {}
            elif cur and "stack frame" in line:
                res[cur]["stack_spill"] = line.strip()
            elif cur and "registers" in line:
                res[cur]["registers"] = int(re.search(r"Used (\d+) registers", line).group(1))
        if nvdisasm:
            d = subprocess.run([nvdisasm, "-c", cf], capture_output=True, text=True)
            if a.sass:
                with open(a.sass, "w") as f:
                    f.write(d.stdout)
            for name, st in loop_stats(d.stdout).items():
                res.setdefault(name, {}).update(st)
    env = environment(())
    env.update(command=" ".join(sys.argv), module=a.module, kernels=names, defines=a.define,
               ptxas=subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
    lines = [f"# kernel_report ({a.module})", ""] + [f"- {k}: {v}" for k, v in env.items()] + [
        "", "| kernel (mangled) | registers | stack / spills | instructions | longest loop | loop opcodes |",
        "|---|---|---|---|---|---|"]
    for name, st in res.items():
        lines.append(f"| `{name[:60]}` | {st.get('registers', '')} | {st.get('stack_spill', '')} | "
                     f"{st.get('instructions', '')} | {st.get('longest_loop', '')} | {st.get('loop_ops', '')} |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"kernel_report_{a.module}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, f"kernel_report_{a.module}.json"), "w") as f:
        json.dump({"environment": env, "kernels": res}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
