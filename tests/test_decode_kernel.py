"""Tests of the GPU packed KV layer (tq.cuda): store bytes, decode attention, layout maths.

GPU tests (marked ``gpu``) skip cleanly without CUDA or CuPy; the byte
accounting, launch planning, look-up tables and float64 references run anywhere.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

import tq
from tq.cuda import layout as L
from tq.packing import unpack_bits


# ----------------------------------------------------------------- CPU tests
def test_bytes_per_token_matches_format():
    # docs/FORMAT.md: d=128 mse 4 bits = 64 + 2, 3 bits = 48 + 2, 2 bits = 32 + 2 (per head)
    assert L.bytes_per_token(128, 4, 4) == 132
    assert L.bytes_per_token(128, 3, 2) == 84
    assert L.bytes_per_token(128, 4, 2, num_kv_heads=8) == 8 * (64 + 32 + 4)
    assert L.bytes_per_token(96, 3, 3) == 2 * (48 + 2)   # padded to P = 128
    assert L.bf16_bytes_per_token(128, 8) == 4096
    for d in (64, 80, 96, 128, 256):
        for kb, vb in L.PRESETS.values():
            plan_k = L.quantizer_config(d, kb, 0).plan()
            plan_v = L.quantizer_config(d, vb, 0).plan()
            assert L.bytes_per_token(d, kb, vb) == plan_k.bytes_per_vector + plan_v.bytes_per_vector


def test_layer_nbytes_and_max_context():
    n = L.layer_nbytes(2, 8, 128, 4, 4, capacity=1000, window=128)
    rows = L.compressed_rows(1000, 128)
    assert rows % 64 == 0 and rows >= 872
    assert n == 2 * rows * 8 * 132 + 2 * 2 * 8 * 128 * 128 * 2 + 8 + 4 * 2 * 8
    # bf16: 80 GB / (32 layers * 4096 B) tokens
    assert L.max_context(80 * 10**9, num_layers=32, num_kv_heads=8, head_dim=128,
                         key_bits=None, value_bits=None) == 80 * 10**9 // (32 * 4096)
    c = L.max_context(80 * 10**9, num_layers=32, num_kv_heads=8, head_dim=128, key_bits=3, value_bits=2)
    assert 5.5 < c / (80 * 10**9 // (32 * 4096)) < 6.2   # 4096 / 672 = 6.1x


@pytest.mark.parametrize("batch", [1, 3, 8, 32, 200])
def test_plan_splits_covers(batch):
    rng = np.random.default_rng(batch)
    for nc in [0, 1, 15, 64, 100, 4000, 32640, 130944, 10**6] + list(rng.integers(1, 300000, 20)):
        s, c = L.plan_splits(int(nc), batch, 8)
        assert L.splits_math_ok(s, c, int(nc)), (nc, s, c)
        assert s <= 1024


def test_plan_splits_model():
    """The planner's three terms: waves of blocks, window blocks crowded out of a single
    wave, and the finishing block's merge batches of 16 split partials."""
    # 256 pairs on 396 slots: three splits fill two waves instead of leaving a third idle
    assert L.plan_splits(32640, 32, 8) == (3, 10880)
    # batch 1, 4K tokens: 16 splits (one merge batch) rather than 31 (two)
    assert L.plan_splits(3968, 1, 8, window_blocks=4) == (16, 256)
    # batch 1 (8 pairs, a small grid): balance the SMs.  32K and 128K tokens: 32 splits, two
    # blocks on most SMs, not the 45-62 that would fill the slots (probe on an H100: 128K x 1,
    # 81 us against 90 us for 45 splits and 105 us for 62)
    for bps in (3, 4):
        for wb in (0, 4):
            assert L.plan_splits(32640, 1, 8, blocks_per_sm=bps, window_blocks=wb) == (32, 1024)
            assert L.plan_splits(130944, 1, 8, blocks_per_sm=bps, window_blocks=wb) == (32, 4096)
    # one block per SM streams slower than two sharing it: 2 sequences x 8 heads x 16 splits
    assert L.plan_splits(130944, 2, 8) == (16, 8192)
    # a small grid never takes a second wave
    rng = np.random.default_rng(0)
    for nc in list(rng.integers(1, 2 * 10**6, 50)):
        for batch, bps in ((1, 3), (1, 4), (2, 3), (4, 4)):
            sp, _ = L.plan_splits(int(nc), batch, 8, blocks_per_sm=bps)
            assert sp * batch * 8 <= 132 * bps


def test_bucketed_plan_is_exact_at_every_length():
    """decode_attention searches the split count once per length bucket (plan_bucket) and fits
    the chunk to the current length (exact_split): the splits must still cover every token
    in 64-aligned chunks, the bucket sit within 1/32 above the length, and at the lengths the
    planner's tests pin down the bucketed plan launch the same splits."""
    for nc in list(range(0, 5000)) + [32640, 130944, 10**6 + 7]:
        b = L.plan_bucket(nc)
        assert nc <= b <= nc + max(64, nc / 32) and b % 64 == 0, (nc, b)
        if nc:
            assert L.plan_bucket(b) == b   # a bucket's top belongs to the bucket
        for batch in (1, 8, 32):
            sp = L.plan_splits(b, batch, 8)[0]
            c = L.exact_split(sp, nc)
            assert L.splits_math_ok(-(-nc // c) if nc else sp, c, nc), (nc, sp, c)
            assert sp * c >= nc and (nc == 0 or sp * (c - 64) < nc)
    assert L.plan_splits(L.plan_bucket(32640), 1, 8)[0] == 32
    assert L.plan_splits(L.plan_bucket(130944), 1, 8)[0] == 32
    assert L.plan_splits(L.plan_bucket(32640), 32, 8)[0] == 3


def _emulate_lut8(x: np.ndarray, tab: np.ndarray, bits: int) -> np.ndarray:
    """NumPy model of tq_lut8 (decode_common.cuh): 8 codes per int -> 8 fp16 bit patterns."""
    def prmt(a, b, s):
        v = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
        r = np.zeros_like(a, dtype=np.uint64)
        for n in range(4):
            sel = (s >> np.uint32(4 * n)) & np.uint32(7)
            r |= ((v >> (np.uint64(8) * sel.astype(np.uint64))) & np.uint64(0xFF)) << np.uint64(8 * n)
        return r.astype(np.uint32)

    u32 = np.uint32
    x = x.astype(u32)
    t0, t1, t2, t3 = (np.full_like(x, u32(w)) for w in tab)
    if bits == 2:
        z = x & u32(0xFFFF)
        z = (z | (z << u32(8))) & u32(0x00FF00FF)
        z = (z | (z << u32(4))) & u32(0x0F0F0F0F)
        z = (z | (z << u32(2))) & u32(0x33333333)
        halves = []
        for zz in (z, z >> u32(16)):
            lo, hi = prmt(t0, t1, zz), prmt(t0, t1, zz | u32(0x4444))
            halves += [prmt(lo, hi, np.full_like(x, 0x5140)), prmt(lo, hi, np.full_like(x, 0x7362))]
    elif bits == 3:
        z = x & u32(0xFFFFFF)
        z = ((z & u32(0xFFF000)) << u32(4)) | (z & u32(0xFFF))
        z = ((z & u32(0x0FC00FC0)) << u32(2)) | (z & u32(0x003F003F))
        z = ((z & u32(0x38383838)) << u32(1)) | (z & u32(0x07070707))
        halves = []
        for zz in (z, z >> u32(16)):
            lo, hi = prmt(t0, t1, zz), prmt(t2, t3, zz)
            halves += [prmt(lo, hi, np.full_like(x, 0x5140)), prmt(lo, hi, np.full_like(x, 0x7362))]
    else:
        nx = ~x
        t = (nx >> u32(3)) & u32(0x11111111)
        m = (x ^ (t * u32(7))) & u32(0x77777777)
        n = nx & u32(0x88888888)
        sa = n << u32(4)
        halves = []
        for k, mm in enumerate((m, m >> u32(16))):
            lo, hi = prmt(t0, t1, mm), prmt(t2, t3, mm)
            for j, sel in enumerate((0x5140, 0x7362)):
                ssel = [0x4000, 0x5010, 0x6020, 0x7030][2 * k + j]
                sg = prmt(sa, n, np.full_like(x, ssel)) & u32(0x80008000)
                halves.append(prmt(lo, hi, np.full_like(x, sel)) ^ sg)
    out = np.stack(halves, axis=-1)  # [..., 4] words
    return np.stack([out & u32(0xFFFF), out >> u32(16)], axis=-1).reshape(*x.shape, 8).astype(np.uint16)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_lut_words_lookup(bits, d):
    plan = L.quantizer_config(d, bits, 0).plan()
    tab = L.lut_words(plan.centroids, bits)
    rng = np.random.default_rng(bits * 1000 + d)
    codes = rng.integers(0, 1 << bits, size=(4096, 8))
    x = np.zeros(4096, np.uint64)
    for i in range(8):
        x |= codes[:, i].astype(np.uint64) << np.uint64(bits * i)
    got = _emulate_lut8(x.astype(np.uint32), tab, bits)
    want = plan.centroids.astype(np.float16).view(np.uint16)[codes]
    np.testing.assert_array_equal(got, want)


def test_lut_header_compiles_on_host(tmp_path):
    """The byte-permute look-up of decode_common.cuh, built for the CPU, equals unpacking."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    hdr = os.path.join(os.path.dirname(tq.__file__), "kernels", "decode_common.cuh")
    src = tmp_path / "t.cpp"
    src.write_text(f'#include <cstdio>\n#include "{hdr}"\n' + r"""
int main() {
  unsigned int tab[4]; unsigned long long x; int bits;
  while (scanf("%d %x %x %x %x %llx", &bits, &tab[0], &tab[1], &tab[2], &tab[3], &x) == 6) {
    unsigned int out[4];
    if (bits == 2) tq_lut8<2>((unsigned)x, tab, out);
    if (bits == 3) tq_lut8<3>((unsigned)x, tab, out);
    if (bits == 4) tq_lut8<4>((unsigned)x, tab, out);
    printf("%08x %08x %08x %08x\n", out[0], out[1], out[2], out[3]);
  }
}
""")
    exe = tmp_path / "t"
    subprocess.run([cxx, "-std=c++17", "-O1", str(src), "-o", str(exe)], check=True)
    rng = np.random.default_rng(7)
    lines, wants = [], []
    for bits in (2, 3, 4):
        plan = L.quantizer_config(128, bits, 0).plan()
        tab = L.lut_words(plan.centroids, bits)
        c16 = plan.centroids.astype(np.float16).view(np.uint16)
        for _ in range(500):
            codes = rng.integers(0, 1 << bits, 8)
            x = sum(int(c) << (bits * i) for i, c in enumerate(codes))
            lines.append(f"{bits} {tab[0]:x} {tab[1]:x} {tab[2]:x} {tab[3]:x} {x:x}")
            wants.append(c16[codes])
    res = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
    for line, want in zip(res.stdout.split("\n"), wants):
        words = [int(w, 16) for w in line.split()]
        got = [(w >> (16 * k)) & 0xFFFF for w in words for k in (0, 1)]
        assert got == list(want)


def test_torch_reference_decode_matches_numpy():
    torch = pytest.importorskip("torch")
    from tq.cuda.reference import dequantize_rows

    rng = np.random.default_rng(3)
    for d, bits in [(128, 4), (96, 3), (64, 2), (256, 3)]:
        x = rng.standard_normal((50, d)).astype(np.float32) * 3
        q = tq.Quantizer(d, bits, kind="mse", rotation="hadamard", seed=5, norm_correction=True, backend="numpy")
        c = q.compress(x)
        ref = q.decompress(c)
        got = dequantize_rows(q.plan, torch.from_numpy(c.parts.codes), torch.from_numpy(c.parts.norms.astype(np.float32)))
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ----------------------------------------------------------------- GPU tests
def _gpu():
    try:
        import cupy  # noqa: F401
        import torch
    except Exception:
        pytest.skip("needs torch and CuPy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch


def _make_kv(torch, rng, b, h, t, d, offset=0.0, dtype=None):
    dtype = dtype or torch.bfloat16
    k = torch.from_numpy(rng.standard_normal((b, h, t, d)).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal((b, h, t, d)).astype(np.float32))
    if offset:
        k = k + offset * torch.from_numpy(rng.standard_normal((1, h, 1, d)).astype(np.float32))
    return k.to(dtype).cuda(), v.to(dtype).cuda()


def _check_store_bytes(layer, k_all, v_all):
    """Compressed rows of the layer == tq's NumPy reference of the same vectors."""
    kq = tq.Quantizer.from_config(layer.key_config, backend="numpy")
    vq = tq.Quantizer.from_config(layer.value_config, backend="numpy")
    for b, n in enumerate(layer.seq_lengths):
        nc = max(0, n - layer.window)
        if nc == 0:
            continue
        for src, qz, codes, norms in ((k_all, kq, layer.kcodes, layer.knorms), (v_all, vq, layer.vcodes, layer.vnorms)):
            x = src[b][:, :nc].float().cpu().numpy().reshape(-1, layer.head_dim)
            ref = qz.compress(x).parts
            got_c = codes[b, :, :nc].cpu().numpy().reshape(-1, codes.shape[-1])
            got_n = norms[b, :, :nc].cpu().numpy().reshape(-1)
            np.testing.assert_array_equal(got_c, ref.codes)
            np.testing.assert_array_equal(got_n.view(np.uint16), ref.norms.view(np.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("preset", list(L.PRESETS))
def test_store_bytes_equal_reference(d, preset):
    torch = _gpu()
    from tq.cuda import PackedKVLayer

    kb, vb = L.PRESETS[preset]
    rng = np.random.default_rng(d + 17 * kb + vb)
    b, h, w = 3, 2, 16
    layer = PackedKVLayer(h, d, kb, vb, seed=11, window=w, batch=b, capacity=200, dtype=torch.bfloat16)
    ks, vs = [], []
    k, v = _make_kv(torch, rng, b, h, 40, d, offset=4.0)      # T > W: compress-then-window path
    layer.append(k, v)
    ks.append(k); vs.append(v)
    for _ in range(20):                                      # decode steps through the fused path
        k, v = _make_kv(torch, rng, b, h, 1, d)
        layer.append(k, v)
        ks.append(k); vs.append(v)
    k, v = _make_kv(torch, rng, b, h, 5, d)                  # 1 < T <= W
    layer.append(k, v)
    ks.append(k); vs.append(v)
    torch.cuda.synchronize()
    assert layer.seq_lengths == [65] * b
    assert layer.lengths.cpu().tolist() == [65] * b
    _check_store_bytes(layer, torch.cat(ks, 2), torch.cat(vs, 2))


@pytest.mark.gpu
def test_store_ragged_and_no_window():
    torch = _gpu()
    from tq.cuda import PackedKVLayer
    from tq.cuda.reference import dequantize_layer

    rng = np.random.default_rng(5)
    for w in (0, 8):
        layer = PackedKVLayer(2, 128, 3, 2, seed=1, window=w, batch=3, capacity=100)
        k, v = _make_kv(torch, rng, 3, 2, 30, 128)
        layer.append(k, v, n_valid=[30, 3, 0])
        assert layer.seq_lengths == [30, 3, 0]
        k2, v2 = _make_kv(torch, rng, 3, 2, 1, 128)
        layer.append(k2, v2)
        assert layer.seq_lengths == [31, 4, 1]
        K, V, lens = dequantize_layer(layer)
        # window tokens are exact; sequence 2 holds only the decode token
        if w:
            torch.testing.assert_close(K[2, :, 0].float(), k2[2, :, 0].float())
            torch.testing.assert_close(K[1, :, :3].float(), k[1, :, :3].float())
        full = [torch.cat([k[i, :, :n], k2[i]], 1) for i, n in enumerate([30, 3, 0])]
        fullv = [torch.cat([v[i, :, :n], v2[i]], 1) for i, n in enumerate([30, 3, 0])]
        for b in range(3):
            nc = max(0, lens[b] - w)
            if nc:
                x = full[b][:, :nc].float().cpu().numpy().reshape(-1, 128)
                ref = tq.Quantizer.from_config(layer.key_config).compress(x).parts
                np.testing.assert_array_equal(layer.kcodes[b, :, :nc].cpu().numpy().reshape(-1, 48), ref.codes)
                xv = fullv[b][:, :nc].float().cpu().numpy().reshape(-1, 128)
                refv = tq.Quantizer.from_config(layer.value_config).compress(xv).parts
                np.testing.assert_array_equal(layer.vcodes[b, :, :nc].cpu().numpy().reshape(-1, 32), refv.codes)


def _decode_case(torch, d, kb, vb, lens, w, nrep, impl, offset=0.0, hkv=2, qdtype=None, seed=0):
    from tq.cuda import PackedKVLayer
    from tq.cuda.reference import attention, dequantize_layer, rel_err

    rng = np.random.default_rng(seed)
    b = len(lens)
    layer = PackedKVLayer(hkv, d, kb, vb, seed=seed, window=w, batch=b, capacity=max(lens) + 8)
    t = max(lens)
    k, v = _make_kv(torch, rng, b, hkv, t, d, offset=offset)
    layer.append(k, v, n_valid=lens)
    q = torch.from_numpy(rng.standard_normal((b, hkv * nrep, d)).astype(np.float32)).cuda()
    if offset:
        q = q * 2
    q = q.to(qdtype or torch.float32)
    out = torch.full((b, hkv * nrep, d), float("nan"), device="cuda", dtype=torch.float32)
    layer.decode_attention(q, out=out, out_dtype=torch.float32, impl=impl)
    K, V, ll = dequantize_layer(layer)
    ref = attention(q.double(), K, V, ll)
    return rel_err(out, ref), out, ref


@pytest.mark.gpu
@pytest.mark.parametrize("preset", list(L.PRESETS))
@pytest.mark.parametrize("impl", ["fma", "mma", "mmt"])
def test_decode_matches_reference(preset, impl):
    torch = _gpu()
    kb, vb = L.PRESETS[preset]
    tol = 2e-5 if impl == "fma" else 3e-3
    for offset in (0.0, 3.0):
        err, out, _ = _decode_case(torch, 128, kb, vb, [1500, 700, 130, 5], 64, 4, impl, offset=offset)
        assert torch.isfinite(out).all()
        assert err < tol, (preset, impl, offset, err)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80, 96, 256])
@pytest.mark.parametrize("impl", ["fma", "mma", "mmt"])
def test_decode_head_dims(d, impl):
    torch = _gpu()
    tol = 2e-5 if impl == "fma" else 3e-3
    for kb, vb in [(4, 2), (3, 3)]:
        err, _, _ = _decode_case(torch, d, kb, vb, [900, 77], 32, 2, impl)
        assert err < tol, (d, kb, vb, impl, err)


@pytest.mark.gpu
@pytest.mark.parametrize("nrep", [1, 3, 8, 12, 16])
def test_decode_gqa_groups_and_window_edges(nrep):
    torch = _gpu()
    for impl in ("fma", "mma", "mmt"):
        for w, lens in [(0, [300, 64]), (128, [100, 1]), (128, [128, 129])]:
            err, _, _ = _decode_case(torch, 128, 4, 4, lens, w, nrep, impl, hkv=2)
            assert err < (2e-5 if impl == "fma" else 3e-3), (nrep, impl, w, lens, err)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [33, 100])
def test_decode_unaligned_rows_and_partial_window_blocks(d):
    """Rows of 66 and 200 bytes (window staged element by element) and windows that
    do not divide into 32-token blocks (100 slots: 4 blocks of 25; 40: 2 of 20)."""
    torch = _gpu()
    for impl in ("fma", "mma", "mmt"):
        for w, lens in [(100, [250, 37, 100]), (40, [41, 3, 0])]:
            err, out, _ = _decode_case(torch, d, 4, 2, lens, w, 3, impl)
            assert torch.isfinite(out).all() and err < (2e-5 if impl == "fma" else 3e-3), (d, impl, w, lens, err)


@pytest.mark.gpu
def test_decode_bf16_query_and_output():
    torch = _gpu()
    from tq.cuda import PackedKVLayer

    layer = PackedKVLayer(8, 128, 3, 2, seed=2, window=128, batch=2, capacity=3000)
    rng = np.random.default_rng(9)
    k, v = _make_kv(torch, rng, 2, 8, 2500, 128)
    layer.append(k, v)
    q = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    out = layer.decode_attention(q, scaling=0.1)
    assert out.shape == (2, 32, 1, 128) and out.dtype == torch.bfloat16
    ref = layer.decode_attention(q.float()[:, :, 0], scaling=0.1, impl="fma")
    assert float((out[:, :, 0].float() - ref).norm() / ref.norm()) < 1e-2


def test_split_smem_plan():
    """Window blocks of at most 32 tokens, fewer tokens only where staging would cost the split
    blocks occupancy; the launch's shared memory covers every role of the grid."""
    from tq.cuda.layout import (finish_smem_bytes, mma_smem_bytes, smem_share, split_smem_plan,
                                window_plan, window_smem_bytes)

    # D4 = 128: queries 4 x 128, weights 4 x 32, K and V rows of 132 floats
    assert window_smem_bytes(4, 128, 32) == 4 * (4 * 128 + 4 * 32 + 2 * 32 * 132)
    assert window_smem_bytes(1, 33, 8) == 4 * (36 + 32 + 2 * 8 * 40)    # odd head_dim: rows padded to 36 + 4
    base = mma_smem_bytes(128, 4, 4, 4)                                  # about 72 KiB
    need, wblocks = split_smem_plan(base, 128, 4, 128, 128, 40)
    assert wblocks == 4 and need == base                                 # 4 blocks of 32 tokens, staged for free
    assert window_plan(100, 4, 128, base) == (4, 25)                     # 100 slots: 4 blocks of 25 tokens
    assert window_plan(1, 4, 128, base) == (1, 1)
    assert window_plan(0, 4, 128, base) == (1, 1)                        # no window: one (empty) block reports
    # 16 heads of 256 dims: 32 staged rows exceed the share of one of 3 blocks, so 16-token blocks
    big = window_smem_bytes(16, 256, 32)
    assert big > smem_share(3) >= window_smem_bytes(16, 256, 16)
    need, wblocks = split_smem_plan(1024, 256, 16, 256, 128, 40)
    assert wblocks == 8 and need == window_smem_bytes(16, 256, 16)
    # the last block's merge scratch grows with the splits
    need, _ = split_smem_plan(base, 256, 16, 256, 128, 1024)
    assert need >= finish_smem_bytes(256, 16, 1024) == 4 * 1024 * 16


def test_mmt_config_and_kernel_choice(monkeypatch):
    """tq_split_mmt's pipeline depth and occupancy fit the SM's shared memory, and
    impl="auto" takes it for grids that fill the GPU, and for all grids where it uses
    the byte-permute tables."""
    from tq.cuda.layout import (choose_split_kernel, mmt_config, mmt_holes_fit, mmt_prmt, mmt_smem_bytes,
                                smem_share)
    monkeypatch.delenv("TQ_MMT_CONFIG", raising=False)
    for p in (64, 128, 256):
        for kb in (2, 3, 4):
            for vb in (2, 3, 4):
                for nrep in (1, 4, 8, 16):
                    st, mb = mmt_config(p, kb, vb, nrep)
                    assert 2 <= st <= 4 and mmt_smem_bytes(p, kb, vb, nrep, st) <= smem_share(mb)
                    assert mb <= (4 if nrep <= 8 else 3)   # 128 registers only up to 8 heads
    assert mmt_config(128, 4, 4, 4) == (2, 4)     # the 32 KiB K4 pair table leaves room for 2 stages
    assert mmt_config(128, 3, 2, 4) == (4, 4)
    # byte-permute layout: a 64 KiB key table (3 blocks at most), the pipeline in its holes
    for level, vbs in ((1, (4,)), (2, (2, 4))):   # TQ_PRMT_LUT=1: K4/V4; 2: also K4/V2
        for p in (64, 128, 256):
            for kb in (2, 3, 4):
                for vb in (2, 3, 4):
                    for nrep in (1, 4, 8, 16):
                        pr = mmt_prmt(p, kb, vb, nrep, level)
                        assert pr == (kb == 4 and vb in vbs and p <= 128 and nrep <= 8)
                        st, mb = mmt_config(p, kb, vb, nrep, level)
                        assert mmt_smem_bytes(p, kb, vb, nrep, st, level) <= smem_share(mb)
                        if pr:
                            assert mb == 3 and mmt_holes_fit(p, kb, vb, st)
                            assert mmt_smem_bytes(p, kb, vb, nrep, st, level) > 65536
                        else:
                            assert (st, mb) == mmt_config(p, kb, vb, nrep)
                            assert mmt_smem_bytes(p, kb, vb, nrep, st, level) == mmt_smem_bytes(p, kb, vb, nrep, st)
    assert mmt_config(128, 4, 4, 4, 1) == (3, 3)   # 4 stages of 17 runs per warp would need 272 holes
    assert mmt_config(128, 4, 2, 4, 2) == (4, 3)   # 16 value-table entries + 16 x 13 runs
    assert mmt_config(128, 4, 2, 4, 1) == mmt_config(128, 4, 2, 4)
    assert not mmt_holes_fit(128, 4, 4, 4) and mmt_holes_fit(128, 4, 4, 3)
    monkeypatch.setenv("TQ_MMT_CONFIG", "3,3")
    assert mmt_config(128, 4, 4, 4) == (3, 3)
    assert choose_split_kernel(1, 8, 4, 131072) == "mma"     # 8 pairs: small grid
    assert choose_split_kernel(8, 8, 4, 4096) == "mma"
    assert choose_split_kernel(8, 8, 4, 32768) == "mmt"
    assert choose_split_kernel(32, 8, 4, 4096) == "mmt"
    assert choose_split_kernel(32, 8, 32, 32768) == "fma"
    # with the byte-permute tables mmt also takes the small grids ...
    for batch, nc in ((1, 4096), (1, 131072), (8, 4096)):
        assert choose_split_kernel(batch, 8, 4, nc, prmt=True) == "mmt"
    assert choose_split_kernel(1, 8, 32, 4096, prmt=True) == "fma"   # ... but not past 16 heads


# (field bits W, stream bit BIT, log2 entry pitch S) of decode.cu's lut_off: byte-aligned
# 8-bit fields with S = 8 take the PRMT path, the others shifts, straddling fields a funnel
LUT_OFF_CASES = [(8, 0, 8), (8, 8, 8), (8, 16, 8), (8, 24, 8), (8, 48, 8), (8, 28, 8), (4, 0, 8), (4, 12, 8),
                 (4, 28, 8), (6, 30, 8), (8, 0, 7), (8, 24, 7), (8, 28, 7), (6, 0, 7), (6, 30, 7), (4, 60, 7)]


def test_lut_offsets_on_host(tmp_path):
    """decode.cu's lut_off, built for the CPU: the offset of this lane's copy of the field's
    table entry is (field << S) | lane * 4 for both entry pitches (128 bytes, and 256 bytes
    with the byte-permute path of TQ_PRMT_LUT), fields inside a word or across two."""
    import re

    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    kdir = os.path.join(os.path.dirname(tq.__file__), "kernels")
    with open(os.path.join(kdir, "decode.cu")) as f:
        text = f.read()
    m = re.search(r"template <int W, int SH, int S>\nTQ_D u32 lut_off_reg\(u32 x, u32 lane4\);.*?(?=\n// compile-time loop)", text, re.S)
    assert m, "lut_off not found in decode.cu"
    calls = "\n".join(f'    printf("%u\\n", lut_off<{w}, {b}, {s}>(wd, lane4));' for w, b, s in LUT_OFF_CASES)
    src = tmp_path / "lut.cpp"
    src.write_text(f'#include <cstdio>\n#include "{os.path.join(kdir, "decode_common.cuh")}"\n#define TQ_D inline\n'
                   + m.group(0) + r"""
int main() {
  u32 wd[3], lane;
  while (scanf("%x %x %u", &wd[0], &wd[1], &lane) == 3) {
    wd[2] = 0;
    const u32 lane4 = lane * 4;
""" + calls + r"""
  }
}
""")
    exe = tmp_path / "lut"
    subprocess.run([cxx, "-std=c++17", "-O1", str(src), "-o", str(exe)], check=True)
    rng = np.random.default_rng(11)
    words = rng.integers(0, 1 << 32, size=(300, 2), dtype=np.uint64)
    lanes = rng.integers(0, 32, size=300)
    res = subprocess.run([str(exe)], input="".join(f"{a:x} {b:x} {ln}\n" for (a, b), ln in zip(words, lanes)),
                         capture_output=True, text=True, check=True)
    got = np.array(res.stdout.split(), dtype=np.int64).reshape(300, len(LUT_OFF_CASES))
    for j, (w, bit, s) in enumerate(LUT_OFF_CASES):
        stream = [int(a) | (int(b) << 32) for a, b in words]
        want = [(((x >> bit) & ((1 << w) - 1)) << s) | (4 * int(ln)) for x, ln in zip(stream, lanes)]
        np.testing.assert_array_equal(got[:, j], want, err_msg=str((w, bit, s)))


def test_module_cache_follows_compile_variants(monkeypatch):
    """TQ_DECODE_DEFINES is read when the first module is requested and set_decode_defines
    switches variants: each variant gets its own module (benchmarks time variants side by
    side in one process), the same variant the cached one."""
    from tq.cuda import _build

    built = []

    class FakeModule:
        def __init__(self, kind, p, kb, vb, nrep, wt, qt, ot, defines=()):
            self.defines = defines
            built.append(defines)

    monkeypatch.setattr(_build, "Module", FakeModule)
    _build._get_module.cache_clear()
    _build._get_store.cache_clear()
    try:
        monkeypatch.delenv("TQ_DECODE_DEFINES", raising=False)
        _build.set_decode_defines(None)
        base = _build.get_module("decode", 128, 4, 4, 4)
        _build.set_decode_defines("-DTQ_TILE_SOURCE=1  -DX=2")
        tile = _build.get_module("decode", 128, 4, 4, 4)
        assert tile is not base and tile.defines == ("-DTQ_TILE_SOURCE=1", "-DX=2")
        assert _build.get_module("decode", 128, 4, 4, 4) is tile
        _build.set_decode_defines("")
        assert _build.get_module("decode", 128, 4, 4, 4) is base and base.defines == ()
        assert _build.get_module("store", 128, 4, 4).defines == ()
        monkeypatch.setenv("TQ_DECODE_DEFINES", "-DTQ_TILE_SOURCE=1 -DX=2")
        _build.set_decode_defines(None)  # read the environment again
        assert _build.get_module("decode", 128, 4, 4, 4) is tile
        assert len(built) == 3
        assert _build.define_value(("-DTQ_TILE_SOURCE=1", "-DX=0x10", "-DY"), "X") == 16
        assert _build.define_value(("-DTQ_TILE_SOURCE=1", "-DY"), "Y") == 1
        assert _build.define_value(("-DTQ_TILE_SOURCE=1",), "Z") == 0
        assert _build.define_value(("-DTQ_TILE_SOURCE=0",), "TQ_PRMT_LUT") == _build.DECODE_DEFAULTS["TQ_PRMT_LUT"]
        assert _build.define_value(("-DTQ_PRMT_LUT=2",), "TQ_PRMT_LUT") == 2
        # NVRTC gets every default switch explicitly, unless the variant sets it
        assert _build.compile_defines(()) == tuple(f"-D{k}={v}" for k, v in _build.DECODE_DEFAULTS.items())
        assert _build.compile_defines(("-DTQ_TILE_SOURCE=0", "-DX=2")) == (
            "-DTQ_PRMT_LUT=1", "-DTQ_SEG_TILES=4", "-DTQ_STEAL=1", "-DTQ_SPLIT_INTERLEAVE=1",
            "-DTQ_LATE_PREFETCH=1", "-DTQ_TILE_SOURCE=0", "-DX=2")
    finally:
        _build.set_decode_defines(None)
        _build._get_module.cache_clear()
        _build._get_store.cache_clear()



def test_kernel_switch_fallbacks_match_python_defaults():
    """decode.cu's #ifndef fallbacks (used by builds outside tq.cuda, e.g. kernel_report)
    equal tq.cuda's DECODE_DEFAULTS, which NVRTC always receives explicitly."""
    import re

    from tq.cuda import _build

    src = _build.kernel_source()
    for name, value in _build.DECODE_DEFAULTS.items():
        m = re.search(rf"#ifndef {name}\n#define {name} (\d+)\n#endif", src)
        assert m, name
        assert int(m.group(1)) == value, name

# (CK, CV, stages, token groups) of TileSource instantiations: bytes per row of 2-, 3- and
# 4-bit codes at P = 64, 128, 256, the mma/mmt pipeline depths, and DSPLIT = 2 (two groups)
# (CK, CV, stages, token groups, stages in the table's holes)
TILE_SOURCE_CASES = [(64, 64, 2, 4, 0), (48, 32, 4, 4, 0), (64, 32, 3, 4, 0), (24, 24, 4, 4, 0), (32, 16, 4, 4, 0),
                     (16, 16, 4, 4, 0), (96, 64, 3, 2, 0), (128, 128, 2, 2, 0), (64, 16, 2, 2, 0),
                     (64, 64, 3, 4, 1), (64, 32, 4, 4, 1), (32, 32, 4, 4, 1), (32, 16, 4, 4, 1)]


def _hole_off(o: int) -> int:
    """decode.cu hole_off<true>: stage byte o in 128-byte runs 256 bytes apart."""
    return o + (o & ~127)


def test_tile_source_requests_every_piece_once(tmp_path):
    """decode.cu's TileSource (TQ_TILE_SOURCE=1), built for the CPU with cp.async recorded:
    the 32 lanes request each 16-byte piece of a tile (key codes, value codes, key and value
    norms) exactly once, from the tile's rows and into its stage, as the flat piece index
    of the default path does.  With HOLES (TQ_PRMT_LUT) every piece lands in the upper
    128 bytes of a 256-byte table entry, at hole_off of its stage offset."""
    import re

    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    with open(os.path.join(os.path.dirname(tq.__file__), "kernels", "decode.cu")) as f:
        text = f.read()
    m = re.search(r"template <bool HOLES>\nTQ_HD constexpr u32 hole_off.*?\nstruct TileSource \{.*?\n\};\n", text, re.S)
    assert m, "TileSource not found in decode.cu"
    cases = "\n".join(f"  if (ck == {a} && cv == {b} && st == {c} && ng == {d} && ho == {e}) run<{a}, {b}, {c}, {d}, {bool(e)}>(row, it, tiles);".replace("True", "true").replace("False", "false")
                      for a, b, c, d, e in TILE_SOURCE_CASES)
    src = tmp_path / "tile.cpp"
    src.write_text(r"""#include <cstdio>
typedef unsigned char u8; typedef unsigned short u16; typedef unsigned int u32;
typedef unsigned long long u64; typedef long long i64;
#define TQ_D inline
#define TQ_HD inline
struct SplitArgs { const u8* kcodes; const u16* knorms; const u8* vcodes; const u16* vnorms; };
static u8 arrays[4][1 << 22];  // key codes, value codes, key norms, value norms
static u8 pipe[1 << 16];
static u32 cur_lane;
inline u32 smem_addr(const void* p) { return (u32)((const u8*)p - pipe); }
inline void cp16(u32 dst, const void* s) {
  const u8* p = (const u8*)s;
  for (int a = 0; a < 4; ++a)
    if (p >= arrays[a] && p < arrays[a] + sizeof(arrays[a])) { printf("%u %u %d %ld\n", cur_lane, dst, a, (long)(p - arrays[a])); return; }
  printf("%u %u -1 0\n", cur_lane, dst);
}
inline void cp_commit() { printf("commit %u\n", cur_lane); }
""" + m.group(0) + r"""
template <int CK, int CV, int ST, int NG, bool HO> void run(long row, int it, int tiles) {
  SplitArgs a{arrays[0], (const u16*)arrays[2], arrays[1], (const u16*)arrays[3]};
  for (u32 lane = 0; lane < 32; ++lane) {
    cur_lane = lane;
    TileSource<CK, CV, ST, NG, HO> s(a, row, lane, pipe + (HO ? 128 : 64));
    s.request(it, tiles);
  }
}
int main() {
  int ck, cv, st, ng, ho, it, tiles; long row;
  while (scanf("%d %d %d %d %d %ld %d %d", &ck, &cv, &st, &ng, &ho, &row, &it, &tiles) == 8) {
""" + cases + r"""
    printf("end\n");
  }
}
""")
    exe = tmp_path / "tile"
    subprocess.run([cxx, "-std=c++17", "-O1", str(src), "-o", str(exe)], check=True)
    jobs = [(ck, cv, st, ng, ho, row, it, tiles) for ck, cv, st, ng, ho in TILE_SOURCE_CASES
            for row, it, tiles in ((0, 0, 1), (64 * 3 + 16, 5, 9), (4096 + 48, 2, 2), (128, 3, 3))]
    res = subprocess.run([str(exe)], input="".join(" ".join(map(str, j)) + "\n" for j in jobs),
                         capture_output=True, text=True, check=True)
    blocks = res.stdout.split("end\n")[:-1]
    assert len(blocks) == len(jobs)
    for (ck, cv, st, ng, ho, row, it, tiles), out in zip(jobs, blocks):
        lines = out.split("\n")[:-1]
        commits = [ln for ln in lines if ln.startswith("commit")]
        assert len(commits) == 32  # one commit group per lane, with or without a tile
        got = sorted(tuple(int(x) for x in ln.split()[1:]) for ln in lines if not ln.startswith("commit"))
        want = []
        if it < tiles:
            r = row + it * ng * 16
            tile = 16 * ck + 16 * cv + 64
            if ho:  # stages 2 x (tile rounded up to 128) apart, from the first hole (byte 128)
                stage, where = 128 + (it % st) * 2 * (-(-tile // 128) * 128), _hole_off
            else:
                stage, where = 64 + (it % st) * tile, (lambda o: o)
            for i in range(ck + cv + 4):
                if i < ck:
                    piece = (0, r * ck + 16 * i)
                elif i < ck + cv:
                    piece = (1, r * cv + 16 * (i - ck))
                elif i < ck + cv + 2:
                    piece = (2, 2 * r + 16 * (i - ck - cv))
                else:
                    piece = (3, 2 * r + 16 * (i - ck - cv - 2))
                want.append((stage + where(16 * i),) + piece)
            if ho:  # never in the lower half of an entry (the key table's copies)
                bad = [d for d, *_ in got if d % 256 < 128 or d % 256 + 16 > 256]
                assert not bad, (ck, cv, st, ho, it, bad[:8])
        assert got == sorted(want), (ck, cv, st, ng, row, it, tiles)


def test_work_stealing_rule():
    """Stealing only for mmt at head dims up to 128 on one wave of split blocks with more
    than two per SM (the grids where it measured faster, layout.use_work_stealing)."""
    rule = L.use_work_stealing
    assert rule("mmt", 128, 512, 132, 4) and rule("mmt", 64, 384, 132, 3)
    assert not rule("mmt", 128, 256, 132, 3)        # batch 1: two blocks per SM
    assert not rule("mmt", 128, 600, 132, 4)        # more than one wave
    assert not rule("mma", 128, 384, 132, 3) and not rule("fma", 128, 384, 132, 4)
    assert not rule("mmt", 256, 384, 132, 3)        # two warps share a token group


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "mma", "fma"])
def test_decode_token_by_token_reuses_plans(impl):
    """Decoding token by token reuses one launch plan per length bucket and one launcher per
    split count (the chunk is rewritten per call): every step across bucket boundaries, with
    the planner's splits, forced splits that leave trailing blocks empty, and a fixed
    ``max_len``, matches the reference."""
    torch = _gpu()
    from tq.cuda import PackedKVLayer
    from tq.cuda.reference import attention, dequantize_layer, rel_err

    rng = np.random.default_rng(11)
    lens = [1000, 700]
    layer = PackedKVLayer(2, 128, 3, 2, seed=3, window=64, batch=2, capacity=1400)
    k, v = _make_kv(torch, rng, 2, 2, max(lens), 128)
    layer.append(k, v, n_valid=lens)
    tol = 2e-5 if impl == "fma" else 3e-3
    plans = set()
    for step in range(150):
        k1, v1 = _make_kv(torch, rng, 2, 2, 1, 128)
        layer.append(k1, v1)
        q = torch.from_numpy(rng.standard_normal((2, 8, 128)).astype(np.float32)).cuda()
        layer.split_override = 7 if step % 3 == 1 else None
        max_len = 1300 if step % 3 == 2 else None
        out = layer.decode_attention(q, out_dtype=torch.float32, impl=impl, max_len=max_len)
        plans.add(layer.last_plan)
        if step % 10 == 0 or step % 3 == 1:
            K, V, ll = dequantize_layer(layer)
            err = rel_err(out, attention(q.double(), K, V, ll))
            assert err < tol, (step, layer.last_plan, err)
    layer.split_override = None
    assert len(layer._plans) <= 4          # three buckets crossed (and max_len's)
    assert len(plans) > 3                  # ... while the chunk followed the length


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["K4/V4", "K3/V2"])
def test_mmt_work_stealing_and_deterministic_schedule(preset):
    """The mmt kernel's warps take tile segments from a per-pair counter that the last
    block resets: every call must cover each token once (a counter left over would skip
    segments), long and short sequences of one batch alike.  Under
    torch.use_deterministic_algorithms the fixed schedule returns identical bits call
    after call, and both schedules match the reference."""
    torch = _gpu()
    from tq.cuda import PackedKVLayer
    from tq.cuda.reference import attention, dequantize_layer, rel_err

    kb, vb = L.PRESETS[preset]
    rng = np.random.default_rng(5)
    lens = [20000, 3000, 64, 9000, 1, 17000, 128, 20000]
    layer = PackedKVLayer(8, 128, kb, vb, seed=5, window=128, batch=8, capacity=max(lens) + 64)
    k, v = _make_kv(torch, rng, 8, 8, max(lens), 128)
    layer.append(k, v, n_valid=lens)
    q = torch.from_numpy(rng.standard_normal((8, 32, 128)).astype(np.float32)).cuda()
    K, V, ll = dequantize_layer(layer)
    ref = attention(q.double(), K, V, ll)
    outs = []
    for _ in range(4):
        outs.append(layer.decode_attention(q, out_dtype=torch.float32, impl="mmt"))
        assert layer.last_schedule == "steal"
    for out in outs:
        assert rel_err(out, ref) < 3e-3
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        fixed = [layer.decode_attention(q, out_dtype=torch.float32, impl="mmt") for _ in range(3)]
        assert layer.last_schedule == "fixed"
    finally:
        torch.use_deterministic_algorithms(prev)
    assert rel_err(fixed[0], ref) < 3e-3
    for f in fixed[1:]:
        assert torch.equal(f, fixed[0])
    # the two schedules sum the same terms in different orders
    assert float((outs[0] - fixed[0]).norm() / fixed[0].norm()) < 1e-4
