"""Byte accounting and launch planning for the GPU packed KV layer (pure Python).

Everything here is NumPy-only so it runs (and is tested) on machines without a
GPU.  The layout is described in docs/DECODE_KERNEL.md; the per-vector bytes
are those of docs/FORMAT.md (mse kind, hadamard rotation, float16 norms).
"""
from __future__ import annotations

import os

import numpy as np

from ..config import QuantizerConfig, next_pow2

__all__ = [
    "PRESETS", "padded_dim", "code_bytes", "bytes_per_token", "bf16_bytes_per_token",
    "compressed_rows", "layer_nbytes", "plan_splits", "mma_smem_bytes", "fma_smem_bytes",
    "window_smem_bytes", "window_plan", "use_work_stealing", "WINDOW_BLOCK_TOKENS", "finish_smem_bytes", "split_smem_plan", "mmt_smem_bytes", "mmt_config", "mmt_prmt", "mmt_holes_fit", "smem_share", "choose_split_kernel", "lut_words", "max_context", "quantizer_config", "SUPPORTED_BITS",
    "SUPPORTED_HEAD_DIMS", "decode_bytes_read", "splits_math_ok",
]

#: (key bits, value bits) of the presets the decode kernel is tuned and benchmarked for.
PRESETS = {"K4/V4": (4, 4), "K3/V3": (3, 3), "K4/V2": (4, 2), "K3/V2": (3, 2)}
SUPPORTED_BITS = (2, 3, 4)
#: head dims whose padded length P = next_pow2(d) is 64, 128 or 256 (d = 80, 96 pad to 128)
SUPPORTED_HEAD_DIMS = range(33, 257)

ROW_ALIGN = 64          # compressed rows are allocated in multiples of this (16-token tiles, 4 warps)
NORM_BYTES = 2          # float16 norms


def padded_dim(head_dim: int) -> int:
    """Rotated length P = next_pow2(head_dim) (docs/FORMAT.md); the kernels take 64..256."""
    return next_pow2(head_dim)


def quantizer_config(head_dim: int, bits: int, seed: int) -> QuantizerConfig:
    """The tq configuration the layer stores (and tq's reference reproduces byte for byte)."""
    return QuantizerConfig(head_dim, bits, kind="mse", rotation="hadamard", seed=seed,
                           norm_dtype="float16", norm_correction=True)


def code_bytes(head_dim: int, bits: int) -> int:
    return padded_dim(head_dim) * bits // 8


def bytes_per_token(head_dim: int, key_bits: int, value_bits: int, num_kv_heads: int = 1) -> int:
    """Compressed bytes of one token of one layer (codes + norms of K and V)."""
    return num_kv_heads * (code_bytes(head_dim, key_bits) + code_bytes(head_dim, value_bits) + 2 * NORM_BYTES)


def bf16_bytes_per_token(head_dim: int, num_kv_heads: int = 1) -> int:
    return num_kv_heads * 2 * head_dim * 2


def compressed_rows(capacity: int, window: int) -> int:
    """Rows to allocate for compressed tokens: positions < capacity - window, rounded up."""
    need = max(capacity - window, 1)
    return -(-need // ROW_ALIGN) * ROW_ALIGN


def layer_nbytes(batch: int, num_kv_heads: int, head_dim: int, key_bits: int, value_bits: int,
                 capacity: int, window: int, dtype_bytes: int = 2) -> int:
    """Device bytes a PackedKVLayer allocates (storage, window, lengths and the
    per-(sequence, kv head) arrival counters of the decode launch; no workspace)."""
    rows = compressed_rows(capacity, window)
    comp = batch * rows * bytes_per_token(head_dim, key_bits, value_bits, num_kv_heads)
    win = 2 * batch * num_kv_heads * max(window, 1) * head_dim * dtype_bytes
    return comp + win + 4 * batch + 4 * batch * num_kv_heads


def max_context(free_bytes: int, *, num_layers: int, num_kv_heads: int, head_dim: int,
                key_bits: int | None, value_bits: int | None, batch: int = 1, window: int = 128) -> int:
    """Longest context whose cache fits in ``free_bytes`` (bits None = bf16 cache)."""
    if key_bits is None:
        per_tok = bf16_bytes_per_token(head_dim, num_kv_heads)
        return int(free_bytes // (num_layers * batch * per_tok))
    per_tok = bytes_per_token(head_dim, key_bits, value_bits, num_kv_heads)
    fixed = num_layers * batch * 2 * num_kv_heads * window * head_dim * 2
    if free_bytes <= fixed:
        return 0
    return int((free_bytes - fixed) // (num_layers * batch * per_tok)) + window


def plan_splits(nc_max: int, batch: int, num_kv_heads: int, num_sms: int = 132,
                blocks_per_sm: int = 3, min_chunk: int = 128, max_splits: int = 1024,
                block_overhead_tokens: int = 256, window_blocks: int = 0,
                merge_batch_tokens: int = 256) -> tuple[int, int]:
    """(splits, chunk) for flash-decoding over ``nc_max`` compressed tokens.

    Every (sequence, kv head) gets ``splits`` blocks of ``chunk`` tokens (a multiple
    of 64: four warps of 16-token tiles, never below ``min_chunk`` unless one split
    covers everything).  The choice minimizes a modelled time in token units:

    - ``waves * (chunk + block_overhead_tokens)``, a wave being one round of
      ``num_sms * blocks_per_sm`` resident blocks: one split per sequence and head
      leaves most of the GPU idle when batch * heads is a little under one wave, and
      a few splits more fill two full waves instead (e.g. 256 pairs on 396 slots:
      three splits run 1.5x faster than one);
    - one more block overhead when the grid is a single wave of split blocks but
      its ``window_blocks`` per pair do not fit beside them (they would wait for a
      split block to leave);
    - ``merge_batch_tokens`` per 16 splits: the finishing block loads 16 split
      partials per L2 round trip (tq/kernels/decode.cu, finish).  Measured on an
      H200 at batch 1 and 4K tokens: 16 splits 18.0 us, 31 splits 18.7 us.

    Small grids (at most ``num_sms / 4`` pairs, e.g. batch 1 with 8 kv heads) choose
    among many split counts, and there the balance between SMs decides: the time is
    that of the busiest SM, ``ceil(blocks / num_sms)`` blocks of ``chunk`` tokens each,
    and a block alone on its SM streams about 1.2x slower than
    two that share it; a second wave is never taken.  Measured on an H100 at batch 1, 128K tokens
    (benchmarks/results/decode_b1_splits_h100.md): 32 splits (two blocks on most SMs)
    81 us, 45 splits (three on most) 90 us, 16 splits (one each) 94 us, 62 splits
    (two waves) 105 us (mma, K4/V4).
    """
    if nc_max <= 0:
        return 0, ROW_ALIGN
    slots = max(1, num_sms * blocks_per_sm)
    pairs = max(1, batch * num_kv_heads)

    def chunk_for(sp):
        c = -(-nc_max // sp)
        return -(-c // ROW_ALIGN) * ROW_ALIGN

    small = 4 * pairs <= num_sms
    # (a small grid stays within one wave: a second one was slower in every measurement)
    limit = max(1, min(max_splits, -(-nc_max // min_chunk), slots // pairs if small else 4 * (-(-slots // pairs))))
    best = None
    for sp in range(1, limit + 1):
        c = chunk_for(sp)
        sp_eff = -(-nc_max // c)                       # splits that hold tokens
        blocks = sp_eff * pairs
        waves = -(-blocks // slots)
        crowded = waves == 1 and (sp_eff + window_blocks) * pairs > slots
        if small:                                      # the busiest SM's tokens
            per_sm = -(-blocks // num_sms)
            main = per_sm * c * (1.2 if per_sm == 1 else 1.0) + block_overhead_tokens
        else:
            main = waves * (c + block_overhead_tokens)
        t = (main + (block_overhead_tokens if crowded else 0)
             + merge_batch_tokens * -(-sp_eff // 16))
        cost = (t, sp_eff)
        if best is None or cost < best[0]:
            best = (cost, sp_eff, c)
    _, splits, chunk = best
    return splits, chunk


def plan_bucket(nc: int) -> int:
    """The length a decode launch plan is computed for: ``nc`` rounded up to a multiple of
    ``max(64, 2**(bitlen(nc) - 6))``, so at most 1/32 above ``nc`` (and a multiple of 64).

    The plan (``plan_splits``: the split count) is then reused for every length of the
    bucket, instead of being searched again at every decoded token (15-33 us of Python
    per call); ``exact_split`` fits the chunk to the current length."""
    nc = int(nc)
    if nc <= 0:
        return 0
    g = max(ROW_ALIGN, 1 << max(0, nc.bit_length() - 6))
    return -(-nc // g) * g


def exact_split(splits: int, nc: int) -> int:
    """The chunk (tokens per split, a multiple of 64) that spreads ``nc`` tokens over
    ``splits`` blocks as evenly as 64-token alignment allows; splits past the last
    token exit at once in the kernels."""
    if splits <= 0 or nc <= 0:
        return ROW_ALIGN
    c = -(-int(nc) // int(splits))
    return -(-c // ROW_ALIGN) * ROW_ALIGN


def _tile_bytes(p: int, kb: int, vb: int) -> int:
    """One 16-token pipeline tile: key codes, value codes, key and value norms."""
    return 16 * (p * kb // 8) + 16 * (p * vb // 8) + 64


def _tensor_core_smem_bytes(p: int, kb: int, vb: int, nrep: int, stages: int, lut: bool,
                            query_fragment_bytes: int) -> int:
    """Shared memory of a tensor-core split kernel: pair look-up tables (32 copies of
    2^(2b) half2 entries per distinct bit width), the per-warp cp.async pipeline,
    the query fragments (or, at the end, the token groups' value sums, whichever
    is larger), the rotated queries, the softmax state."""
    luts = 0
    if lut:
        luts = (1 << (2 * kb)) * 128 + ((1 << (2 * vb)) * 128 if vb != kb else 0)
    return _split_smem_bytes(p, nrep, luts + 4 * stages * _tile_bytes(p, kb, vb), query_fragment_bytes)


def _split_smem_bytes(p: int, nrep: int, pipe_end: int, query_fragment_bytes: int) -> int:
    """Tables and pipeline up to ``pipe_end`` (decode.cu PIPE_END), then the query
    fragments; the token groups' value sums [ng][nrep][p] (fp32, one float of padding
    per 32: slice_at in decode.cu) reuse that region at the end; then the rotated
    queries and the softmax state."""
    ng = 4 // (2 if p >= 256 else 1)
    sums = ng * nrep * p
    head = max(pipe_end + query_fragment_bytes, 4 * (sums + sums // 32))
    return head + nrep * p * 4 + 2 * ng * 16 * 4


def mma_smem_bytes(p: int, kb: int, vb: int, nrep: int, stages: int = 4, lut: bool = True) -> int:
    """Dynamic shared memory of tq_split_mma (query fragments: uint4 [P/16][32])."""
    return _tensor_core_smem_bytes(p, kb, vb, nrep, stages, lut, (p // 16) * 32 * 16)


def fma_smem_bytes(p: int, kb: int, vb: int, nrep: int) -> int:
    tile = 128
    floats = 2 * nrep * p + 2 * nrep * tile + 3 * nrep + 32
    return 4 * floats + 4 * (tile * (p * vb // 32) + 1)


#: most window tokens one window block attends over (tq/kernels/decode.cu, window_partial:
#: one token per lane for the scores)
WINDOW_BLOCK_TOKENS = 32


def window_smem_bytes(nrep: int, head_dim: int, tokens: int) -> int:
    """A window block of the split grid (tq/kernels/decode.cu, window_partial), float32:
    scaled queries [NREP][D4], weights [NREP][32], then its ``tokens`` staged K and V
    rows [tokens][D4 + 4] each (D4 = head_dim rounded up to a multiple of 4)."""
    d4 = -(-head_dim // 4) * 4
    return 4 * (nrep * d4 + nrep * WINDOW_BLOCK_TOKENS + 2 * tokens * (d4 + 4))


def window_plan(window: int, nrep: int, head_dim: int, budget: int) -> tuple[int, int]:
    """(window blocks per (sequence, kv head), tokens per block) for a window of
    ``window`` slots: blocks of at most 32 tokens (fewer, down to 1, while the staged
    rows would exceed ``budget`` bytes of shared memory), so that at small batch the
    window is scored by several blocks in parallel instead of one long block."""
    if window <= 0:
        return 1, 1
    tokens = WINDOW_BLOCK_TOKENS
    while tokens > 1 and window_smem_bytes(nrep, head_dim, tokens) > budget:
        tokens //= 2
    blocks = -(-window // tokens)
    return blocks, -(-window // blocks)


def finish_smem_bytes(p: int, nrep: int, splits: int) -> int:
    """The last block of a (kv head, sequence): the split weights [NREP][splits]
    (float32; the merged sums stay in registers, one warp per query head)."""
    return 4 * max(splits, 1) * nrep


#: shared memory of one SM (H100 / H200: 228 KiB), of which 1 KiB is reserved per resident block
SM_SMEM = 228 * 1024


def smem_share(blocks_per_sm: int) -> int:
    """Dynamic shared memory one of ``blocks_per_sm`` resident blocks may take."""
    return SM_SMEM // blocks_per_sm - 1024


#: the share of one of the 3 resident blocks of tq_split_mma (register-bound at 3 per SM)
SPLIT_SMEM_SHARE = smem_share(3)


def mmt_prmt(p: int, kb: int, vb: int, nrep: int, prmt: int) -> bool:
    """Whether tq_split_mmt uses the byte-permute table layout for a configuration
    (``prmt``: the value of TQ_PRMT_LUT, on by default with TQ_TILE_SOURCE): 4-bit keys
    and values (with ``prmt`` >= 2 also 2-bit values, measured mixed on an H100), head
    dims up to 128, up to 8 heads per kv head (decode.cu, ``PR``; there 3 blocks per SM
    fit)."""
    return bool(prmt) and kb == 4 and (vb == 4 or (vb == 2 and prmt >= 2)) and p <= 128 and nrep <= 8


def _mmt_tile_runs(p: int, kb: int, vb: int) -> int:
    """128-byte runs of one pipeline stage in the table holes (decode.cu TileSource, HOLES)."""
    return -(-_tile_bytes(p, kb, vb) // 128)


def mmt_smem_bytes(p: int, kb: int, vb: int, nrep: int, stages: int, prmt: int = 0) -> int:
    """Dynamic shared memory of tq_split_mmt with a pipeline of ``stages`` tiles per
    warp (Q^T fragments: uint2 [P/16][ceil(nrep / 8)][32]).

    ``prmt`` (TQ_PRMT_LUT, where ``mmt_prmt`` holds): the key table takes 256 entries 256 bytes apart (64 KiB),
    the value table and the pipeline live in the unused upper 128 bytes of its entries,
    and the query fragments, rotated queries and softmax state follow it."""
    qf = (p // 16) * -(-nrep // 8) * 32 * 8
    if not mmt_prmt(p, kb, vb, nrep, prmt):
        return _tensor_core_smem_bytes(p, kb, vb, nrep, stages, True, qf)
    return _split_smem_bytes(p, nrep, 256 * 256, qf)


def mmt_holes_fit(p: int, kb: int, vb: int, stages: int) -> bool:
    """The byte-permute layout's value table and 4 warps x ``stages`` tiles fit the
    key table's 256 holes of 128 bytes."""
    vtable = (1 << (2 * vb)) if vb != kb else 0
    return vtable + 4 * stages * _mmt_tile_runs(p, kb, vb) <= 256


def mmt_config(p: int, kb: int, vb: int, nrep: int, prmt: int = 0) -> tuple[int, int]:
    """(pipeline stages, resident blocks per SM) of tq_split_mmt for a configuration.

    Up to 8 heads per kv head the kernel fits 128 registers, so 4 blocks (16 warps)
    per SM are resident when shared memory allows: the deepest pipeline (4, 3, then
    2 tiles per warp) that fits a quarter of the SM.  Otherwise 3 blocks with the
    deepest pipeline that fits a third.  With the byte-permute layout (``prmt``: TQ_PRMT_LUT,
    where ``mmt_prmt`` holds; a 64 KiB
    table) at most 3 blocks fit, and the pipeline must fit the table's holes.
    ``TQ_MMT_CONFIG="stages,blocks"`` overrides (benchmarks)."""
    env = os.environ.get("TQ_MMT_CONFIG")
    if env:
        st, mb = (int(x) for x in env.split(","))
        return st, mb
    pr = mmt_prmt(p, kb, vb, nrep, prmt)
    for minb in ((4, 3) if nrep <= 8 else (3,)):
        for st in (4, 3, 2):
            if pr and not mmt_holes_fit(p, kb, vb, st):
                continue
            if mmt_smem_bytes(p, kb, vb, nrep, st, prmt) <= smem_share(minb):
                return st, minb
    return 2, 2


#: the transposed kernel pays off from this many (sequence, kv head) pairs and
#: pairs x compressed tokens up (H100 and H200 tables in docs/DECODE_KERNEL.md)
MMT_MIN_PAIRS = 32
MMT_MIN_WORK = 1 << 19


def use_work_stealing(impl: str, head_dim: int, split_blocks: int, num_sms: int,
                      blocks_per_sm: int) -> bool:
    """Whether a decode launch takes the work-stealing schedule (tq_split_mmt's warps take
    16-token-tile segments of their (sequence, kv head) from a counter, and a pair's split
    blocks are interleaved with the other pairs' in the launch order; decode.cu split_role).

    It pays where the split blocks fill one wave with three or more blocks on an SM: the
    warp schedulers favour an SM's older blocks, so under the fixed schedule the blocks
    dispatched first finish long before the last (batch 8 on an H100: 35 us apart within an
    SM at 32K tokens).  Measured on an H100 against the fixed schedule in the same run
    (benchmarks/results/decode_steal_variants_h100.md): batch 8, 32K / 128K tokens, 2.6 /
    3.5% faster for K3/V2 and 0 / 2.7% for K4/V4; with two blocks per SM (batch 1) 4-6%
    slower and with several waves (batch 32, 128K, K4/V4) 10% slower, so not there.  Only
    the mmt kernel with one warp per token group (head dims up to 128) steals."""
    return (impl == "mmt" and head_dim <= 128
            and 2 * num_sms < split_blocks <= num_sms * blocks_per_sm)


def choose_split_kernel(batch: int, num_kv_heads: int, nrep: int, nc_max: int,
                        prmt: bool = False) -> str:
    """The split kernel of ``impl="auto"``: "mmt" (heads on the mma's n side, up to 4
    blocks per SM) once the grid fills the GPU, "mma" (heads on the m side) on small grids,
    where its shorter prologue and fewer splits win, "fma" past 16 heads per kv head.

    ``prmt``: whether tq_split_mmt uses the byte-permute table layout for this
    configuration (``mmt_prmt``).  With it mmt wins on small grids too: batch 1 on an
    H100, K4/V4, 4K to 128K tokens, mmt is 3-6% faster than mma
    (benchmarks/results/decode_b1_impls_h100.md)."""
    if nrep > 16:
        return "fma"
    if prmt:
        return "mmt"
    pairs = batch * num_kv_heads
    return "mmt" if pairs >= MMT_MIN_PAIRS and pairs * nc_max >= MMT_MIN_WORK else "mma"


def split_smem_plan(base: int, p: int, nrep: int, head_dim: int, window: int, splits: int,
                    blocks_per_sm: int = 3) -> tuple[int, int]:
    """(dynamic shared memory, window blocks per pair) for a split launch whose main
    loop needs ``base`` bytes.  The window blocks stage their rows within the larger
    of ``base`` and the share of one of ``blocks_per_sm`` resident blocks, so the
    window never costs the split blocks occupancy (``window_plan``)."""
    wblocks, tokens = window_plan(window, nrep, head_dim, max(base, smem_share(blocks_per_sm)))
    need = max(base, window_smem_bytes(nrep, head_dim, tokens), finish_smem_bytes(p, nrep, splits))
    return need, wblocks


def lut_words(centroids: np.ndarray, bits: int) -> np.ndarray:
    """The decode kernel's byte-permute look-up tables (tq/kernels/decode_common.cuh).

    fp16 centroids split into low and high bytes, four per 32-bit word.  For 4
    bits only the positive half is stored; the codebook must be symmetric.
    """
    c16 = np.asarray(centroids, np.float32).astype(np.float16)
    if c16.shape != (1 << bits,):
        raise ValueError(f"expected {1 << bits} centroids, got {c16.shape}")
    u = c16.view(np.uint16).astype(np.uint32)
    lo, hi = u & 0xFF, u >> 8

    def pack(b):
        return int(b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24))

    if bits == 2:
        words = [pack(lo), pack(hi), 0, 0]
    elif bits == 3:
        words = [pack(lo[:4]), pack(lo[4:]), pack(hi[:4]), pack(hi[4:])]
    elif bits == 4:
        if not np.array_equal(c16, -c16[::-1]):
            raise ValueError("4-bit look-up needs a symmetric codebook")
        m = slice(8, 16)
        lo8, hi8 = lo[m], hi[m]
        words = [pack(lo8[:4]), pack(lo8[4:]), pack(hi8[:4]), pack(hi8[4:])]
    else:
        raise ValueError(f"bits must be 2, 3 or 4, got {bits}")
    return np.array(words, np.uint32)


def decode_bytes_read(lengths, window: int, num_kv_heads: int, head_dim: int,
                      key_bits: int, value_bits: int, dtype_bytes: int = 2) -> int:
    """Bytes a decode step must read: compressed rows, window rows (not q/out)."""
    total = 0
    per = bytes_per_token(head_dim, key_bits, value_bits, num_kv_heads)
    for n in lengths:
        nc = max(0, int(n) - window)
        total += nc * per + (int(n) - nc) * bf16_bytes_per_token(head_dim, num_kv_heads) * dtype_bytes // 2
    return total


def _check_bits(bits: int, what: str) -> int:
    if isinstance(bits, bool) or int(bits) != bits or bits not in SUPPORTED_BITS:
        raise ValueError(f"{what} must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def _check_head_dim(d: int) -> int:
    if isinstance(d, bool) or int(d) != d or not 33 <= d <= 256:
        raise ValueError(f"head_dim must be an integer in 33..256 (padded length 64..256), got {d!r}")
    return int(d)


def splits_math_ok(splits: int, chunk: int, nc_max: int) -> bool:
    """Invariant the kernels rely on: the splits cover [0, nc_max) in 64-aligned chunks."""
    return nc_max <= 0 or (chunk % ROW_ALIGN == 0 and splits * chunk >= nc_max and (splits - 1) * chunk < nc_max)

