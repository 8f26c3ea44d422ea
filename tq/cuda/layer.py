"""PackedKVLayer: one attention layer's TurboQuant KV cache on the GPU, with fused decode.

See docs/DECODE_KERNEL.md for the layout, the kernels and the measurements.
Needs torch (CUDA) and CuPy; both are imported when a layer is created.
"""
from __future__ import annotations

import math

import numpy as np

from . import _build as B
from .layout import (_check_bits, _check_head_dim, compressed_rows, fma_smem_bytes, layer_nbytes,
                     lut_words, mma_smem_bytes, mmt_smem_bytes, padded_dim, plan_splits, plan_bucket, exact_split,
                     quantizer_config, split_smem_plan, choose_split_kernel,
                     use_work_stealing)

LOG2E = 1.4426950408889634


class PackedKVLayer:
    """Compressed K/V of one layer for ``batch`` sequences, in preallocated device storage.

    Keys and values are TurboQuant_mse codes (hadamard rotation, norm
    correction, float16 norms: exactly tq's ``Quantizer(head_dim, bits,
    kind="mse", rotation="hadamard", seed=..., norm_correction=True)`` bytes)
    in rows ``[batch, num_kv_heads, rows, P*bits/8]`` plus norms
    ``[batch, num_kv_heads, rows]``; the last ``window`` tokens of each
    sequence stay in full precision (``dtype``) in a ring buffer and are merged
    exactly.  Appending never copies history; sequences may have different
    lengths (``n_valid`` in :meth:`append`).

    Args:
        num_kv_heads, head_dim: the layer's KV shape (head_dim 33..256; P = next_pow2).
        key_bits, value_bits: 2, 3 or 4 each (presets K4/V4, K3/V3, K4/V2, K3/V2).
        seed: quantizer seed for keys; values use ``value_seed`` (default: the same seed).
        window: full-precision recent tokens per sequence (0 disables the window).
        batch: number of sequences.  capacity: most tokens a sequence may hold.
        device, dtype: where the storage lives; ``dtype`` (bfloat16, float16 or
            float32) is the window's precision and what ``append`` expects.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, key_bits: int = 4, value_bits: int = 4,
                 seed: int = 0, window: int = 128, batch: int = 1, capacity: int = 4096,
                 device="cuda", dtype=None, *, value_seed: int | None = None):
        import torch

        self._torch = torch
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = _check_head_dim(head_dim)
        self.key_bits = _check_bits(key_bits, "key_bits")
        self.value_bits = _check_bits(value_bits, "value_bits")
        self.window = int(window)
        self.batch = int(batch)
        self.capacity = int(capacity)
        if self.num_kv_heads < 1 or self.batch < 1 or self.capacity < 1 or self.window < 0:
            raise ValueError("num_kv_heads, batch and capacity must be >= 1 and window >= 0")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError("PackedKVLayer lives on a CUDA device")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype if dtype is not None else torch.bfloat16
        self._wt = B.dtype_code(self.dtype)
        self.p = padded_dim(self.head_dim)
        self.key_config = quantizer_config(self.head_dim, self.key_bits, int(seed))
        self.value_config = quantizer_config(self.head_dim, self.value_bits,
                                             int(seed if value_seed is None else value_seed))
        kp, vp = self.key_config.plan(), self.value_config.plan()
        dev = self.device
        f32 = torch.float32

        def dev_f32(a):
            return torch.tensor(np.ascontiguousarray(a, np.float32), dtype=f32, device=dev)

        self._ksigns, self._vsigns = dev_f32(kp.signs), dev_f32(vp.signs)
        self._kbounds, self._vbounds = dev_f32(kp.boundaries), dev_f32(vp.boundaries)
        self._kcents, self._vcents = dev_f32(kp.centroids), dev_f32(vp.centroids)
        self._ktab = torch.tensor(lut_words(kp.centroids, self.key_bits).view(np.int32), device=dev)
        self._vtab = torch.tensor(lut_words(vp.centroids, self.value_bits).view(np.int32), device=dev)

        self.rows = compressed_rows(self.capacity, self.window)
        bh = (self.batch, self.num_kv_heads)
        self.ck, self.cv = self.p * self.key_bits // 8, self.p * self.value_bits // 8
        self.kcodes = torch.zeros(bh + (self.rows, self.ck), dtype=torch.uint8, device=dev)
        self.vcodes = torch.zeros(bh + (self.rows, self.cv), dtype=torch.uint8, device=dev)
        self.knorms = torch.zeros(bh + (self.rows,), dtype=torch.float16, device=dev)
        self.vnorms = torch.zeros(bh + (self.rows,), dtype=torch.float16, device=dev)
        w = max(self.window, 1)
        self.kwin = torch.zeros(bh + (w, self.head_dim), dtype=self.dtype, device=dev)
        self.vwin = torch.zeros(bh + (w, self.head_dim), dtype=self.dtype, device=dev)
        #: tokens per sequence, on the device (read by the kernels; graph-safe)
        self.lengths = torch.zeros(self.batch, dtype=torch.int32, device=dev)
        #: arrivals per (sequence, kv head) during a decode launch; the last block resets it
        self._counters = torch.zeros(self.batch * self.num_kv_heads, dtype=torch.int32, device=dev)
        #: tile segments taken per (sequence, kv head) by the mmt kernel's warps (work
        #: stealing); the last block resets it
        self._steals = torch.zeros(self.batch * self.num_kv_heads, dtype=torch.int32, device=dev)
        #: the schedule of the last decode launch: "steal" or "fixed" (decode_attention)
        self.last_schedule: str | None = None
        self._host_len = np.zeros(self.batch, np.int64)
        self._ws: dict = {}
        self._plans: dict = {}       # (plan_bucket(nc_max), blocks per SM, impl, n_rep) -> splits
        self._smem_plans: dict = {}  # (module id, impl, n_rep, splits) -> (shared memory, window blocks)
        self._launchers: dict = {}
        self._sms = torch.cuda.get_device_properties(dev).multi_processor_count

    # ------------------------------------------------------------ info
    @property
    def seq_lengths(self) -> list[int]:
        """Tokens held per sequence (host mirror; no device sync)."""
        return [int(x) for x in self._host_len]

    @property
    def max_length(self) -> int:
        """Tokens held by the longest sequence (host mirror; no device sync)."""
        return int(self._host_len.max())

    def nbytes(self) -> int:
        """Every device byte this layer allocated (codes, norms, window, lengths)."""
        return layer_nbytes(self.batch, self.num_kv_heads, self.head_dim, self.key_bits,
                            self.value_bits, self.capacity, self.window, self.kwin.element_size())

    def used_nbytes(self) -> int:
        """Bytes that hold the current tokens (compressed rows + occupied window slots)."""
        per = self.num_kv_heads * (self.ck + self.cv + 4)
        wb = 2 * self.num_kv_heads * self.head_dim * self.kwin.element_size()
        tot = 0
        for n in self._host_len:
            nc = max(0, int(n) - self.window)
            tot += nc * per + (int(n) - nc) * wb
        return tot

    def __repr__(self) -> str:
        return (f"PackedKVLayer(K{self.key_bits}/V{self.value_bits}, batch={self.batch}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, window={self.window}, "
                f"capacity={self.capacity}, lengths={self.seq_lengths}, nbytes={self.nbytes()})")

    # ------------------------------------------------------------ helpers
    def _module(self, kind: str, nrep: int = 1, qt: int | None = None, ot: int | None = None):
        qt = self._wt if qt is None else qt
        ot = qt if ot is None else ot
        return B.get_module(kind, self.p, self.key_bits, self.value_bits, nrep, self._wt, qt, ot)

    def _stream(self):
        return B.cupy_stream(self._torch.cuda.current_stream(self.device))

    #: force this many splits per (sequence, kv head) in decode_attention (benchmarks and
    #: probes; None: the planner's choice, tq.cuda.layout.plan_splits)
    split_override: int | None = None
    #: (kernel, splits, chunk) of the last decode launch
    last_plan: tuple | None = None

    #: "raw" launches through cuLaunchKernel with per-call-site ctypes parameters
    #: (low host overhead); "cupy" through CuPy's RawKernel call.  Falls back to
    #: "cupy" if the raw path is unavailable.
    launch_mode = "raw"

    def _stream_handle(self) -> int:
        f = getattr(self._torch._C, "_cuda_getCurrentRawStream", None)
        if f is not None:
            return f(self.device.index)
        return self._torch.cuda.current_stream(self.device).cuda_stream

    def _launch(self, mod, which, grid, block, make_args, smem=0, key=None, updates=()):
        """Launch ``which``; ``make_args()`` builds all parameters (NumPy scalars).

        Raw mode keeps one RawLauncher per ``key`` and only rewrites the
        parameters listed in ``updates`` ((index, Python value) pairs) on reuse.
        """
        if PackedKVLayer.launch_mode == "raw":
            try:
                tc = self._torch.cuda
                ctx = tc.device(self.device) if tc.current_device() != self.device.index else None
                if ctx is not None:
                    ctx.__enter__()
                try:
                    if key is not None:
                        key = (id(mod), key)  # a launcher belongs to one compiled module
                    lau = self._launchers.get(key) if key is not None else None
                    if lau is None:
                        lau = mod.make_launcher(which, make_args(), smem, self.device.index)
                        if key is not None:
                            self._launchers[key] = lau
                    else:
                        cells = lau.cells
                        for i, val in updates:
                            cells[i].value = val
                    lau(grid, block[0], self._stream_handle())
                finally:
                    if ctx is not None:
                        ctx.__exit__(None, None, None)
                return
            except (AttributeError, ImportError, TypeError, KeyError):
                PackedKVLayer.launch_mode = "cupy"
        import cupy as cp

        with cp.cuda.Device(self.device.index):
            mod.launch(which, grid, block, make_args(), shared_mem=smem, stream=self._stream())

    def reset(self) -> None:
        self.lengths.zero_()
        self._host_len[:] = 0

    def host_state(self):
        """The host's mirror of the lengths (``set_host_state`` puts it back: a CUDA graph
        capture runs the Python of ``append`` without running its kernels)."""
        return self._host_len.copy()

    def set_host_state(self, state) -> None:
        self._host_len = state.copy()

    def advance_host(self, tokens: int) -> None:
        """Advance the host mirror by ``tokens`` per sequence (after a replayed append)."""
        self._host_len = self._host_len + int(tokens)

    def reorder(self, index) -> None:
        """Reorder/select sequences along the batch (beam search); same batch size."""
        t = self._torch
        index = t.as_tensor(index, device=self.device, dtype=t.long)
        if index.numel() != self.batch:
            raise ValueError("reorder keeps the batch size")
        for name in ("kcodes", "vcodes", "knorms", "vnorms", "kwin", "vwin", "lengths"):
            getattr(self, name).copy_(getattr(self, name).index_select(0, index))
        self._host_len = self._host_len[index.cpu().numpy()]

    # ------------------------------------------------------------ append
    def append(self, k, v, n_valid=None) -> None:
        """Append tokens: k, v [batch, num_kv_heads, T, head_dim] (post-RoPE).

        ``n_valid`` (host ints, one per sequence, each <= T) appends only the
        first n_valid[b] tokens of sequence b (right-padded input); default all T.
        Tokens that leave the window are compressed by the fused store kernel;
        without ``n_valid`` the call launches fixed shapes and never syncs.
        """
        t = self._torch
        if k.shape != v.shape or k.dim() != 4:
            raise ValueError(f"k and v must be [batch, heads, T, head_dim] of one shape, got {tuple(k.shape)}, {tuple(v.shape)}")
        bsz, h, tn, d = k.shape
        if (bsz, h, d) != (self.batch, self.num_kv_heads, self.head_dim):
            raise ValueError(f"expected [{self.batch}, {self.num_kv_heads}, T, {self.head_dim}], got {tuple(k.shape)}")
        if tn == 0:
            return
        if k.device != self.device or v.device != self.device:
            raise ValueError(f"k and v must be on {self.device}")
        if k.dtype != self.dtype:
            k = k.to(self.dtype)
        if v.dtype != self.dtype:
            v = v.to(self.dtype)
        if k.stride(-1) != 1:
            k = k.contiguous()
        if v.stride(-1) != 1:
            v = v.contiguous()
        if n_valid is None:
            nv = np.full(self.batch, tn, np.int64)
            nv_dev = None
        else:
            nv = np.asarray(n_valid, np.int64).reshape(-1)
            if nv.shape != (self.batch,) or (nv < 0).any() or (nv > tn).any():
                raise ValueError(f"n_valid must be {self.batch} ints in [0, {tn}]")
            nv_dev = t.tensor(nv.astype(np.int32), device=self.device)
        new_len = self._host_len + nv
        new_max = int(new_len.max())
        if new_max > self.capacity:
            raise ValueError(f"append would hold {new_max} tokens; capacity is {self.capacity}")
        mod = self._module("store")

        def common():
            return (B.ptr(k), B.ptr(v), B.i64(k.stride(0)), B.i64(k.stride(1)), B.i64(k.stride(2)),
                    B.i64(v.stride(0)), B.i64(v.stride(1)), B.i64(v.stride(2)), B.ptr(nv_dev),
                    B.ptr(self.lengths), B.ptr(self.kcodes), B.ptr(self.knorms), B.ptr(self.vcodes),
                    B.ptr(self.vnorms), B.ptr(self.kwin), B.ptr(self.vwin), B.ptr(self._ksigns),
                    B.ptr(self._kbounds), B.ptr(self._kcents), B.ptr(self._vsigns), B.ptr(self._vbounds),
                    B.ptr(self._vcents), B.i64(self.rows), B.i32(self.num_kv_heads), B.i32(tn),
                    B.i32(self.head_dim), B.i32(self.window))
        ks, vs = k.stride(), v.stride()
        upd = ((0, k.data_ptr()), (1, v.data_ptr()), (2, ks[0]), (3, ks[1]), (4, ks[2]), (5, vs[0]),
               (6, vs[1]), (7, vs[2]), (8, 0 if nv_dev is None else nv_dev.data_ptr()), (24, tn))
        grid = (tn, self.num_kv_heads, self.batch)
        if self.window > 0 and tn <= self.window:
            self._launch(mod, "store", grid, (64,), lambda: common() + (B.i32(0),), key=("store", 0), updates=upd)
        else:
            self._launch(mod, "store", grid, (64,), lambda: common() + (B.i32(1),), key=("store", 1), updates=upd)
            if self.window > 0:
                self._launch(mod, "store", grid, (64,), lambda: common() + (B.i32(2),), key=("store", 2), updates=upd)
        if nv_dev is None:
            self.lengths.add_(tn)
        else:
            self.lengths.add_(nv_dev)
        self._host_len = new_len

    # ------------------------------------------------------------ decode
    def _base_smem(self, which: str, nrep: int, mod) -> int:
        """Dynamic shared memory of the split kernel's main loop."""
        P, kb, vb = self.p, self.key_bits, self.value_bits
        if which == "mmt":
            return mmt_smem_bytes(P, kb, vb, nrep, mod.mmt_stages, mod.prmt_level)
        if which in ("mma", "mma_v1"):
            return mma_smem_bytes(P, kb, vb, nrep, lut=(which == "mma"))
        return fma_smem_bytes(P, kb, vb, nrep)

    def _smem_plan(self, which: str, nrep: int, splits: int, mod) -> tuple[int, int]:
        """(dynamic shared memory, window blocks per pair) of a split launch, computed once per shape."""
        key = (id(mod), which, nrep, splits)  # compile-time variants differ in shared memory
        plan = self._smem_plans.get(key)
        if plan is None:
            plan = split_smem_plan(self._base_smem(which, nrep, mod), self.p, nrep, self.head_dim, self.window,
                                   splits, blocks_per_sm=self._blocks_per_sm(which, mod))
            self._smem_plans[key] = plan
        return plan

    def auto_impl(self, nrep: int, nc_max: int, mod=None) -> str:
        """The split kernel "auto" picks (tq.cuda.layout.choose_split_kernel); ``mod``, the
        decode module (requested here if not given), tells whether mmt uses the
        byte-permute tables (it depends on the compile-time variant, not on the dtypes)."""
        if mod is None:
            mod = self._module("decode", nrep)
        return choose_split_kernel(self.batch, self.num_kv_heads, nrep, nc_max, prmt=mod.mmt_prmt)

    @staticmethod
    def _blocks_per_sm(which: str, mod) -> int:
        """Resident split blocks per SM the launch plan assumes (register-bound)."""
        return mod.mmt_blocks if which == "mmt" else 3

    def _workspace(self, n: int):
        t = self._torch
        ws = self._ws.get("buf")
        if ws is None or ws.numel() < n:
            ws = t.empty(max(n, 1024), dtype=t.float32, device=self.device)
            self._ws["buf"] = ws
        return ws

    def decode_attention(self, q, scaling: float | None = None, *, out=None, out_dtype=None,
                         impl: str = "auto", max_len: int | None = None):
        """Attention of one new query token per sequence over everything stored.

        q: [batch, num_q_heads, head_dim] (or [batch, num_q_heads, 1, head_dim]),
        num_q_heads a multiple of num_kv_heads (GQA).  Returns [batch,
        num_q_heads, head_dim] in ``out_dtype`` (default q's dtype).
        ``impl``: "auto" (see ``auto_impl``), "mmt" (tensor cores, heads on the
        mma's n side: large grids), "mma" (tensor cores, heads on the m side: small
        grids; both fp16 operands, float32 accumulation) or "fma" (float32 throughout).  ``max_len``: plan the launch for this
        many tokens instead of the current longest sequence, so the launch
        shape stays fixed across steps (CUDA graphs).

        On the grids where it pays (``tq.cuda.layout.use_work_stealing``: the mmt kernel,
        one wave of split blocks, three or more per SM) the warps take their tiles from a
        per-(sequence, kv head) counter (work stealing), so the float32 sums, and the
        output's last bits, may differ from call to call; under
        ``torch.use_deterministic_algorithms(True)`` the fixed schedule is taken and
        repeated calls return identical bits.  ``last_schedule`` tells which ran.
        """
        t = self._torch
        squeeze = False
        if q.dim() == 4:
            if q.shape[2] != 1:
                raise ValueError("decode_attention takes one query token per sequence")
            q = q[:, :, 0]
            squeeze = True
        if q.dim() != 3 or q.shape[0] != self.batch or q.shape[2] != self.head_dim:
            raise ValueError(f"q must be [{self.batch}, H_q, {self.head_dim}], got {tuple(q.shape)}")
        hq = q.shape[1]
        if hq % self.num_kv_heads:
            raise ValueError(f"{hq} query heads is not a multiple of {self.num_kv_heads} kv heads")
        nrep = hq // self.num_kv_heads
        if q.stride(-1) != 1:
            q = q.contiguous()
        if q.device != self.device:
            raise ValueError(f"q must be on {self.device}")
        if impl not in ("auto", "mma", "fma", "mma_v1", "mmt"):
            raise ValueError(f"impl must be 'auto', 'mmt', 'mma' or 'fma', got {impl!r}")
        if impl == "fma" and nrep > 32:
            raise ValueError("at most 32 query heads per kv head")
        qt = B.dtype_code(q.dtype)
        out_dtype = q.dtype if out_dtype is None else out_dtype
        ot = B.dtype_code(out_dtype)
        if out is None:
            out = t.empty((self.batch, hq, self.head_dim), dtype=out_dtype, device=self.device)
        elif out.shape != (self.batch, hq, self.head_dim) or out.dtype != out_dtype or out.stride(-1) != 1:
            raise ValueError("out must be [batch, H_q, head_dim] of out_dtype with unit last stride")
        scale = (1.0 / math.sqrt(self.head_dim)) if scaling is None else float(scaling)
        qscale = B.f32(scale * LOG2E)
        longest = self.max_length
        if max_len is not None:
            if int(max_len) < longest:
                raise ValueError(f"max_len={max_len} is below the longest sequence ({longest})")
            longest = int(max_len)
        nc_max = max(0, longest - self.window)
        mod = self._module("decode", nrep, qt, ot)
        if impl == "auto":
            impl = self.auto_impl(nrep, nc_max, mod)
        which = impl
        bps = self._blocks_per_sm(which, mod)
        splits = self.split_override
        if splits is None:
            bucket = plan_bucket(nc_max)  # the split count is searched once per bucket, not per token
            pkey = (bucket, bps, which, nrep)
            splits = self._plans.get(pkey)
            if splits is None:
                _, wblocks = self._smem_plan(which, nrep, 0, mod)  # the window plan does not depend on the splits
                splits = plan_splits(bucket, self.batch, self.num_kv_heads, self._sms, blocks_per_sm=bps,
                                     window_blocks=wblocks if self.window > 0 else 0)[0]
                self._plans[pkey] = splits
        chunk = exact_split(splits, nc_max)
        self.last_plan = (which, splits, chunk)
        H, P = self.num_kv_heads, self.p
        smod = self._module("decode_v1", nrep, qt, ot) if which == "mma_v1" else mod
        smem, wblocks = self._smem_plan(which, nrep, splits, mod)
        npart = self.batch * H * max(splits, 1) * nrep
        ws = self._workspace(npart * (P + 2) + self.batch * H * wblocks * nrep * (self.head_dim + 2))
        # work stealing reorders the float sums between calls; torch's deterministic mode
        # (torch.use_deterministic_algorithms) takes the fixed schedule instead
        steal = (not t.are_deterministic_algorithms_enabled()
                 and use_work_stealing(which, self.head_dim, splits * H * self.batch, self._sms, bps))
        steals = self._steals.data_ptr() if steal else 0
        self.last_schedule = "steal" if steal else "fixed"
        opart = ws.data_ptr()
        mpart = opart + 4 * npart * P
        lpart = mpart + 4 * npart
        wpart = lpart + 4 * npart
        qs0, qs1 = q.stride(0), q.stride(1)
        qptr, optr = q.data_ptr(), out.data_ptr()
        so0, so1 = out.stride(0), out.stride(1)

        def sargs():
            return (B.ptr(q), B.i64(qs0), B.i64(qs1), B.ptr(self.kcodes),
                    B.ptr(self.knorms), B.ptr(self.vcodes), B.ptr(self.vnorms), B.ptr(self.lengths),
                    B.ptr(self._ksigns), B.ptr(self._ktab), B.ptr(self._vtab), B.ptr(self._kcents),
                    B.ptr(self._vcents), np.uint64(opart), np.uint64(mpart), np.uint64(lpart),
                    B.i64(self.rows), B.i32(H), B.i32(self.head_dim), B.i32(self.window), B.i32(chunk),
                    B.i32(splits), qscale, B.ptr(self._counters), np.uint64(wpart), B.ptr(self.kwin),
                    B.ptr(self.vwin), B.ptr(self._vsigns), B.ptr(out), B.i64(so0), B.i64(so1),
                    B.i32(wblocks), np.uint64(steals))
        # one-dimensional grid: the split blocks, then wblocks window blocks per (kv head,
        # sequence); the last block of each pair to finish writes the output
        # (tq/kernels/decode.cu, split_role / arrive_last)
        self._launch(smod, which, ((splits + wblocks) * H * self.batch,), (128,), sargs, smem,
                     key=(which, nrep, qt, ot, splits, steals),
                     updates=((0, qptr), (1, qs0), (2, qs1), (13, opart), (14, mpart), (15, lpart), (20, chunk),
                              (22, float(qscale)), (24, wpart), (28, optr), (29, so0), (30, so1)))
        return out[:, :, None] if squeeze else out
