// tq CuPy backend: fast fused kernels for P = 8, 16, ..., 256 (docs/FORMAT.md).
//
// Layout: one thread owns one row (two threads for P = 256), E = P / L
// coordinates in registers, so the Walsh-Hadamard butterflies, the halving
// tree of squares, the boundary search and the bit packing are all
// register-resident and follow the reference's operation order exactly.
// Blocks of 128 threads work on tiles of TR = 128 / L rows; the input tile is
// staged through shared memory with coalesced 16-byte loads.  Dense products
// (Haar rotation, QJL projection) run block-wide on a shared-memory tile,
// each output accumulated sequentially over j with separately rounded
// products and sums, as the reference does.
//
// Template parameters: P (padded dimension), B (MSE bits, 0..8), PROD.
// Everything else (input dtype, norm dtype, norm correction, Haar) is a
// uniform runtime flag.
#include "quant_common.cuh"

#define TQQ_NT 128
// minimum resident blocks per SM (caps registers at 65536 / (128 * minb)):
// the MSE kernels are bandwidth kernels and want occupancy; prod kernels are
// dominated by the dense QJL product and want registers.
#ifndef TQQ_ENC_MINB_MSE
#define TQQ_ENC_MINB_MSE 3
#endif
#define TQQ_ENC_MINB(prod, b) ((prod) ? 1 : TQQ_ENC_MINB_MSE)
#ifndef TQQ_DEC_MINB
#define TQQ_DEC_MINB(prod) ((prod) ? 1 : 3)
#endif
#ifndef TQQ_SC_MINB
#define TQQ_SC_MINB(prod) ((prod) ? 1 : 2)
#endif

// Coordinates per thread (at most) of the encode and decode kernels: a row of P
// coordinates is owned by L = P / E threads (cross-lane butterfly stages and
// tree levels for L > 1).  Measured on an H200 (benchmarks/results/
// gpu_throughput_h200_emax*.md): the encoder is fastest with one thread per row
// (E = 128: 4 threads per row cost 47% more instructions in shuffles), the MSE
// decoder too, the prod decoder (dense QJL product) with E = 32.  The host
// passes the values it launches with (cupy_backend.ENC_EMAX, DEC_EMAX).
#ifndef TQQ_ENC_EMAX
#define TQQ_ENC_EMAX 128
#endif
#ifndef TQQ_DEC_EMAX_MSE
#define TQQ_DEC_EMAX_MSE 128
#endif
#ifndef TQQ_DEC_EMAX_PROD
#define TQQ_DEC_EMAX_PROD 32
#endif

template <int P, int EMAX = 128>
struct TQQShape {
  static constexpr int L = P > EMAX ? P / EMAX : 1;  // threads per row
  static constexpr int E = P / L;                    // coordinates per thread
  static constexpr int TR = TQQ_NT / L;              // rows per tile
  static constexpr int AP = P + 4;                   // shared tile pitch (floats)
  static_assert(L <= 32 && E >= 8, "a row's threads lie in one warp, with whole code bytes");
};

// ------------------------------------------------------------ register-level steps
template <int N>
struct TQQLog2 {
  static constexpr int value = N <= 1 ? 0 : 1 + TQQLog2<N / 2>::value;
};
template <>
struct TQQLog2<1> {
  static constexpr int value = 0;
};

template <int E, int L>
TQQ_D void tqq_fwht(float (&v)[E], int part) {
  constexpr int LV = TQQLog2<E>::value;
#pragma unroll
  for (int l = 0; l < LV; ++l) {
    const int h = 1 << l;
#pragma unroll
    for (int k = 0; k < E; ++k) {
      if ((k & h) == 0) {
        const float a = v[k], b = v[k + h];
        v[k] = tqq_add(a, b);
        v[k + h] = tqq_sub(a, b);
      }
    }
  }
  // stages h = E, 2E, ... across the L threads of a row (thread t holds [tE, (t+1)E)):
  // the lower thread of a pair computes a + b, the upper a - b, as the reference does
#pragma unroll
  for (int m = 1; m < L; m <<= 1) {
    const bool up = part & m;
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const float w = __shfl_xor_sync(TQQ_FULL, v[k], m);
      v[k] = up ? tqq_sub(w, v[k]) : tqq_add(v[k], w);
    }
  }
}

template <int H>
TQQ_D void tqq_halve(float* s) {  // s[k] += s[k + H] for k < H, then H/2, ..., 1
  if constexpr (H >= 1) {
#pragma unroll
    for (int k = 0; k < H; ++k) s[k] = tqq_add(s[k], s[k + H]);
    tqq_halve<H / 2>(s);
  }
}

// squares rounded, then the halving tree s[i] += s[i + half], half = P/2, ..., 1
template <int E, int L>
TQQ_D float tqq_tree_sq(const float (&v)[E]) {
  float s[E];
#pragma unroll
  for (int k = 0; k < E; ++k) s[k] = tqq_mul(v[k], v[k]);
  // levels half = P/2, ..., E pair thread t's k-th entry with thread t ^ (half / E)'s;
  // both threads of a pair form the same (commutative) sum, so every thread ends with rho
#pragma unroll
  for (int m = L / 2; m >= 1; m >>= 1) {
#pragma unroll
    for (int k = 0; k < E; ++k) s[k] = tqq_add(s[k], __shfl_xor_sync(TQQ_FULL, s[k], m));
  }
  tqq_halve<E / 2>(s);  // remaining levels: half = E/2, ..., 1
  return s[0];
}

template <int B>
TQQ_D void tqq_put(tqq_u32* W, int k, tqq_u32 q) {
  const int bit = k * B, w = bit >> 5, s = bit & 31;
  W[w] |= q << s;
  if (s + B > 32) W[w + 1] |= q >> (32 - s);
}
template <int B>
TQQ_D tqq_u32 tqq_get(const tqq_u32* W, int k) {
  const int bit = k * B, w = bit >> 5, s = bit & 31;
  tqq_u32 q = W[w] >> s;
  if (s + B > 32) q |= W[w + 1] << (32 - s);
  return q & ((1u << B) - 1u);
}

// TB bytes from global memory into little-endian words (p aligned to the access width)
template <int TB>
TQQ_D void tqq_load_bytes(tqq_u32* W, const tqq_u8* p) {
  if constexpr (TB % 16 == 0) {
#pragma unroll
    for (int c = 0; c < TB / 16; ++c) {
      const uint4 q = __ldg((const uint4*)p + c);
      W[4 * c] = q.x; W[4 * c + 1] = q.y; W[4 * c + 2] = q.z; W[4 * c + 3] = q.w;
    }
  } else if constexpr (TB % 4 == 0) {
#pragma unroll
    for (int c = 0; c < TB / 4; ++c) W[c] = __ldg((const tqq_u32*)p + c);
  } else {
#pragma unroll
    for (int c = 0; c < (TB + 3) / 4; ++c) W[c] = 0u;
#pragma unroll
    for (int c = 0; c < TB; ++c) W[c >> 2] |= ((tqq_u32)__ldg(p + c)) << (8 * (c & 3));
  }
}
template <int TB>
TQQ_D void tqq_store_bytes(tqq_u8* p, const tqq_u32* W) {
  if constexpr (TB % 16 == 0) {
#pragma unroll
    for (int c = 0; c < TB / 16; ++c) ((uint4*)p)[c] = tqq_u4(W[4 * c], W[4 * c + 1], W[4 * c + 2], W[4 * c + 3]);
  } else if constexpr (TB % 4 == 0) {
#pragma unroll
    for (int c = 0; c < TB / 4; ++c) ((tqq_u32*)p)[c] = W[c];
  } else {
#pragma unroll
    for (int c = 0; c < TB; ++c) p[c] = (tqq_u8)(W[c >> 2] >> (8 * (c & 3)));
  }
}

// Own slice [col0, col0 + E) of a staged row, converted to float32 (zero past d).
// The staged row is 16-byte aligned and padded to a multiple of 16 bytes.  FULL:
// the caller knows col0 + E <= d, so no per-coordinate test (an ISETP and an
// FSEL per coordinate otherwise: 5% of the encoder's instructions).
template <int E, bool FULL = false>
TQQ_D void tqq_read_row(const char* srow, int col0, int d_, int dt, float (&v)[E]) {
  const int d = FULL ? col0 + E : d_;
  if (dt == TQQ_F16 || dt == TQQ_BF16) {
    const bool bf = dt == TQQ_BF16;
#pragma unroll
    for (int c = 0; c < E / 8; ++c) {
      const int j0 = col0 + 8 * c;
      uint4 q = tqq_u4(0u, 0u, 0u, 0u);
      if (j0 < d) q = *(const uint4*)(srow + 2 * j0);
      const tqq_u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const tqq_u16 h = (tqq_u16)(w[t >> 1] >> (16 * (t & 1)));
        const float f = bf ? tqq_bf2f(h) : tqq_h2f(h);
        v[8 * c + t] = (j0 + t < d) ? f : 0.f;
      }
    }
  } else if (dt == TQQ_F32) {
#pragma unroll
    for (int c = 0; c < E / 4; ++c) {
      const int j0 = col0 + 4 * c;
      float4 q = tqq_f4(0.f, 0.f, 0.f, 0.f);
      if (j0 < d) q = *(const float4*)(srow + 4 * j0);
      v[4 * c] = (j0 < d) ? q.x : 0.f;
      v[4 * c + 1] = (j0 + 1 < d) ? q.y : 0.f;
      v[4 * c + 2] = (j0 + 2 < d) ? q.z : 0.f;
      v[4 * c + 3] = (j0 + 3 < d) ? q.w : 0.f;
    }
  } else {
#pragma unroll
    for (int c = 0; c < E / 2; ++c) {
      const int j0 = col0 + 2 * c;
      double2 q; q.x = 0.0; q.y = 0.0;
      if (j0 < d) q = *(const double2*)(srow + 8 * j0);
      v[2 * c] = (j0 < d) ? tqq_d2f(q.x) : 0.f;
      v[2 * c + 1] = (j0 + 1 < d) ? tqq_d2f(q.y) : 0.f;
    }
  }
}

template <int E>
TQQ_D void tqq_tile_put(float* X, int off, const float (&v)[E]) {
#pragma unroll
  for (int k = 0; k < E; k += 4) *(float4*)(X + off + k) = tqq_f4(v[k], v[k + 1], v[k + 2], v[k + 3]);
}
template <int E>
TQQ_D void tqq_tile_get(const float* X, int off, float (&v)[E]) {
#pragma unroll
  for (int k = 0; k < E; k += 4) {
    const float4 q = *(const float4*)(X + off + k);
    v[k] = q.x; v[k + 1] = q.y; v[k + 2] = q.z; v[k + 3] = q.w;
  }
}

// sum_k q[k] * v[k] for E (a multiple of 4) shared-memory floats q, in four
// independent accumulators (scores: float tolerance, not bit-specified).
template <int E>
TQQ_D float tqq_dot4(const float* q, const float (&v)[E]) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
  for (int k = 0; k < E; k += 4) {
    const float4 t = *(const float4*)(q + k);
    a0 = fmaf(t.x, v[k], a0); a1 = fmaf(t.y, v[k + 1], a1);
    a2 = fmaf(t.z, v[k + 2], a2); a3 = fmaf(t.w, v[k + 3], a3);
  }
  return (a0 + a1) + (a2 + a3);
}

// tqq_exponent of max |v| over a row held by L lanes (E coordinates each): the max of
// the magnitude bits, which order like the magnitudes
template <int E, int L>
TQQ_D int tqq_row_exponent(const float (&v)[E]) {
  tqq_u32 mb = 0u;
#pragma unroll
  for (int k = 0; k < E; ++k) mb = tqq_umax(mb, tqq_absbits(v[k]));
#pragma unroll
  for (int m = 1; m < L; m <<= 1) mb = tqq_umax(mb, __shfl_xor_sync(TQQ_FULL, mb, m));
  return tqq_exponent(__uint_as_float(mb));
}

// ------------------------------------------------------------ tensor-core helpers
// mma.sync m16n8k16 (f16 inputs, f32 accumulation) and m16n8k32 (s8 inputs); fragment
// layouts as in the PTX ISA (host emulation: quant_hostemu.cuh).
TQQ_D void tqq_mma16816(float (&c)[4], const uint4& a, tqq_u32 b0, tqq_u32 b1) {
#ifdef TQQ_HOST
  tqq_emu_mma16816(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
#endif
}

TQQ_D void tqq_imma16832(int (&c)[4], const uint4& a, tqq_u32 b0, tqq_u32 b1) {
#ifdef TQQ_HOST
  tqq_emu_imma16832(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
#endif
}

// float16 pair {x0, x1} (x0 in bits 0..15)
TQQ_D tqq_u32 tqq_h2(float x0, float x1) { return (tqq_u32)tqq_f2h(x0) | ((tqq_u32)tqq_f2h(x1) << 16); }
// x minus its float16 rounding (exact in float32)
TQQ_D float tqq_h_resid(float x) { return tqq_sub(x, tqq_h2f(tqq_f2h(x))); }
// m16n8k16 A fragment of float16 f(x) from rows r0 (row g) and r1 (row g + 8), both already
// offset to the lane's columns 2t of the k-step (8-byte aligned): columns 2t, 2t+1, 2t+8, 2t+9
template <class F>
TQQ_D uint4 tqq_a_frag(const float* r0, const float* r1, F f) {
  const float2 x00 = *(const float2*)r0, x01 = *(const float2*)(r0 + 8);
  const float2 x10 = *(const float2*)r1, x11 = *(const float2*)(r1 + 8);
  return tqq_u4(tqq_h2(f(x00.x), f(x00.y)), tqq_h2(f(x10.x), f(x10.y)),
                tqq_h2(f(x01.x), f(x01.y)), tqq_h2(f(x11.x), f(x11.y)));
}
// four int8, each round(x * scale) clamped to [-127, 127], x0 in the low byte
TQQ_D tqq_u32 tqq_i8x4(float x0, float x1, float x2, float x3, float scale) {
  const float v[4] = {x0, x1, x2, x3};
  tqq_u32 w = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    int q = __float2int_rn(tqq_mul(v[k], scale));
    q = q > 127 ? 127 : (q < -127 ? -127 : q);
    w |= ((tqq_u32)q & 0xffu) << (8 * k);
  }
  return w;
}

// ------------------------------------------------------------ block-level dense products
// acc[r] = sum_j a[r][j] * M[j*P + i] for the RPT rows at `a` (row pitch AP),
// accumulated over j = 0, 1, ... in order.  EXACT: product rounded, then sum
// rounded (the reference); otherwise fused multiply-adds (float tolerance).
template <int P, int RPT, bool EXACT>
TQQ_D void tqq_dot_rows(const float* a, const float* __restrict__ M, int i, float (&acc)[RPT]) {
  constexpr int AP = P + 4;
#pragma unroll
  for (int r = 0; r < RPT; ++r) acc[r] = 0.f;
#pragma unroll 2
  for (int j = 0; j < P; j += 4) {
    const float m0 = __ldg(M + (j + 0) * P + i), m1 = __ldg(M + (j + 1) * P + i);
    const float m2 = __ldg(M + (j + 2) * P + i), m3 = __ldg(M + (j + 3) * P + i);
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const float4 x = *(const float4*)(a + r * AP + j);
      if constexpr (EXACT) {
        acc[r] = tqq_add(acc[r], tqq_mul(x.x, m0));
        acc[r] = tqq_add(acc[r], tqq_mul(x.y, m1));
        acc[r] = tqq_add(acc[r], tqq_mul(x.z, m2));
        acc[r] = tqq_add(acc[r], tqq_mul(x.w, m3));
      } else {
        acc[r] = fmaf(x.x, m0, acc[r]);
        acc[r] = fmaf(x.y, m1, acc[r]);
        acc[r] = fmaf(x.z, m2, acc[r]);
        acc[r] = fmaf(x.w, m3, acc[r]);
      }
    }
  }
}

// Y[r][i] = sum_j X[r][j] * M[j*P + i] for the TR rows of a tile (see tqq_dot_rows).
template <int P, int TR, bool EXACT>
TQQ_D void tqq_dense(const float* X, const float* __restrict__ M, float* Y) {
  constexpr int AP = P + 4, RPT = 8, ITEMS = P * (TR / RPT);
  for (int it = threadIdx.x; it < ITEMS; it += TQQ_NT) {
    const int i = it % P, rg = it / P;
    float acc[RPT];
    tqq_dot_rows<P, RPT, EXACT>(X + rg * RPT * AP, M, i, acc);
#pragma unroll
    for (int r = 0; r < RPT; ++r) Y[(rg * RPT + r) * AP + i] = acc[r];
  }
}

// QJL signs: bit i of row r is (sum_j X[r][j] * St[j*P + i] >= 0), exact order;
// written LSB-first, P/8 bytes per row.
template <int P, int TR>
TQQ_D void tqq_dense_signs(const float* X, const float* __restrict__ St, tqq_u8* __restrict__ qjl,
                           tqq_i64 row0, int rows) {
  constexpr int AP = P + 4, RPT = 8, ITEMS = P * (TR / RPT);
  const int lane = threadIdx.x & 31;
  for (int it = threadIdx.x; it < ITEMS; it += TQQ_NT) {  // ITEMS is a multiple of 128: warps stay full
    const int i = it % P, rg = it / P;
    float acc[RPT];
    tqq_dot_rows<P, RPT, true>(X + rg * RPT * AP, St, i, acc);
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const tqq_u32 bal = __ballot_sync(TQQ_FULL, tqq_ge(acc[r], 0.f));
      const int rl = rg * RPT + r;
      if constexpr (P >= 32) {
        if (lane == 0 && rl < rows) *(tqq_u32*)(qjl + (row0 + rl) * (P / 8) + (i >> 3)) = bal;
      } else {
        if ((lane % P) == 0 && rl < rows) {
          const tqq_u32 seg = bal >> lane;
          tqq_u8* dst = qjl + (row0 + rl) * (P / 8);
#pragma unroll
          for (int c = 0; c < P / 8; ++c) dst[c] = (tqq_u8)(seg >> (8 * c));
        }
      }
    }
  }
}

// ------------------------------------------------------------ QJL signs on tensor cores
// p = S r for a tile's residual rows with mma.sync m16n8k16: M = 16 rows, N = 8 output
// coordinates i, K = 16 coordinates j (in order: k-step s covers j = 16 s .. 16 s + 15).
// float16 operands carry float32 accuracy by splitting both sides, x = hi + lo
// (hi = float16(x)): p = r_hi S_hi + r_hi S_lo + r_lo S_hi, the lo lo term being below
// 2^-22 of each product.  Each row of r is scaled by a power of two (max |r_j| in
// [256, 512)) and S by one (host: qjl_mma_fragments), so no part under- or overflows;
// signs do not change under positive scaling.
//
// Error, against the bound of FORMAT.md section 5 (g |S| |r|, g = 2^-16 for P <= 128):
// the hi hi product of each k-step is a fresh mma (16 exact products; tensor cores align
// them to the largest and truncate, Fasi et al. 2021, so at most 16 ulps of the largest:
// 2^-19 of their sum), added to the total with round-to-nearest adds (2^-20 over 16
// adds); the hi lo and lo hi terms, 2^-11 smaller, are one mma chain per output (below
// 2^-24); the splits are exact to 2^-22.  Together about 2^-18 |S| |r|, against up to
// 2^-17 for the reference's own sequential sum: a sign can differ from the reference
// only where |p| is within the documented bound of zero (the tests check exactly that).
//
// X: TR rows of pitch P + 4 (scaled residuals).  sfrag: [P/8 n-tiles][P/16 k-steps][32
// lanes] of uint4 {b0, b1 of S_hi, b0, b1 of S_lo}.  Output: bit i of row r = (p_i >= 0),
// LSB-first, P/8 bytes per row.
#ifndef TQQ_QJL_MMA  // the backend passes both (cupy_backend.QJL_IMPL, QJL_MG)
#define TQQ_QJL_MMA 1
#endif
#ifndef TQQ_QJL_MG
#define TQQ_QJL_MG 1
#endif
template <int P, int TR>
struct TQQQjlMma {
  static constexpr bool ok = TQQ_QJL_MMA && P >= 32 && P <= 256 && TR % 16 == 0;
};

template <int P, int TR>
TQQ_D void tqq_mma_signs(const float* X, const uint4* __restrict__ sfrag, tqq_u8* __restrict__ qjl,
                         tqq_i64 row0, int rows) {
  constexpr int AP = P + 4, KS = P / 16, MTILES = TR / 16, NWD = P / 32;
  // m-tiles per warp pass (A in registers): more reuse of each S fragment, more registers
  constexpr int MG = (P <= 128 && MTILES >= 4 * TQQ_QJL_MG) ? TQQ_QJL_MG : 1;
  constexpr int ITEMS = MTILES / MG;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  for (int item = warp; item < ITEMS; item += TQQ_NT / 32) {
    uint4 ah[MG][KS], al[MG][KS];
#pragma unroll
    for (int m = 0; m < MG; ++m) {
      const float* r0 = X + ((item * MG + m) * 16 + g) * AP + 2 * t;
      const float* r1 = r0 + 8 * AP;
#pragma unroll
      for (int s = 0; s < KS; ++s) {
        ah[m][s] = tqq_a_frag(r0 + 16 * s, r1 + 16 * s, [](float x) { return x; });
        al[m][s] = tqq_a_frag(r0 + 16 * s, r1 + 16 * s, [](float x) { return tqq_h_resid(x); });
      }
    }
#pragma unroll 1
    for (int w = 0; w < NWD; ++w) {  // one 32-bit word of signs per row: four n-tiles
      tqq_u32 word[MG][2];
#pragma unroll
      for (int m = 0; m < MG; ++m) word[m][0] = word[m][1] = 0u;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float tot[MG][4], small[MG][4];
#pragma unroll
        for (int m = 0; m < MG; ++m)
#pragma unroll
          for (int k = 0; k < 4; ++k) tot[m][k] = small[m][k] = 0.f;
        const uint4* bf = sfrag + (tqq_i64)(4 * w + q) * KS * 32 + lane;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
          const uint4 b = __ldg(bf + s * 32);
#pragma unroll
          for (int m = 0; m < MG; ++m) {
            float c[4] = {0.f, 0.f, 0.f, 0.f};  // hi hi: a fresh accumulator per step
            tqq_mma16816(c, ah[m][s], b.x, b.y);
#pragma unroll
            for (int k = 0; k < 4; ++k) tot[m][k] = tqq_add(tot[m][k], c[k]);
            tqq_mma16816(small[m], al[m][s], b.x, b.y);  // the 2^-11 terms: one chain
            tqq_mma16816(small[m], ah[m][s], b.z, b.w);
          }
        }
#pragma unroll
        for (int m = 0; m < MG; ++m)
#pragma unroll
          for (int k = 0; k < 4; ++k) tot[m][k] = tqq_add(tot[m][k], small[m][k]);
        const int sh = 8 * q + 2 * t;  // columns 2t, 2t+1 of n-tile 4w+q
#pragma unroll
        for (int m = 0; m < MG; ++m) {
          word[m][0] |= ((tqq_ge(tot[m][0], 0.f) ? 1u : 0u) | (tqq_ge(tot[m][1], 0.f) ? 2u : 0u)) << sh;
          word[m][1] |= ((tqq_ge(tot[m][2], 0.f) ? 1u : 0u) | (tqq_ge(tot[m][3], 0.f) ? 2u : 0u)) << sh;
        }
      }
#pragma unroll
      for (int m = 0; m < MG; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          tqq_u32 x = word[m][h];
          x |= __shfl_xor_sync(TQQ_FULL, x, 1);
          x |= __shfl_xor_sync(TQQ_FULL, x, 2);
          const int rl = (item * MG + m) * 16 + g + 8 * h;
          if (t == 0 && rl < rows) *(tqq_u32*)(qjl + (row0 + rl) * (P / 8) + 4 * w) = x;
        }
      }
    }
  }
}

// The decoder's QJL product z_j = sum_i s_i S[i][j] on tensor cores: the signs s = +-1
// are exact in float16, so z = s S_hi + s S_lo (two mma per step, one float32 chain:
// decoded vectors need float32 tolerance, FORMAT.md section 5, not the encoder's bound).
// X: TR rows of signs (pitch P + 4); sfrag: qjl_mma_fragments(S^T), i.e. B[k][n] =
// 2^e S[16 s + k][8 n_tile + n]; Y[r][j] = 2^e z_j (the caller undoes 2^e).  Warps take
// (m-tile, n-range) items, so a 32-row tile keeps all four busy.
template <int P, int TR>
TQQ_D void tqq_mma_qjl_decode(const float* X, const uint4* __restrict__ sfrag, float* Y) {
  constexpr int AP = P + 4, KS = P / 16, NTL = P / 8, MTILES = TR / 16;
  constexpr int NSPLIT = MTILES >= 4 ? 1 : 4 / MTILES, NPER = NTL / NSPLIT;
  static_assert(NTL % NSPLIT == 0, "n-tiles split evenly");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  for (int item = warp; item < MTILES * NSPLIT; item += TQQ_NT / 32) {
    const int mt = item / NSPLIT, n0 = (item % NSPLIT) * NPER;
    const float* r0 = X + (mt * 16 + g) * AP + 2 * t;
    const float* r1 = r0 + 8 * AP;
    uint4 a[KS];
#pragma unroll
    for (int s = 0; s < KS; ++s) a[s] = tqq_a_frag(r0 + 16 * s, r1 + 16 * s, [](float x) { return x; });
#pragma unroll 2
    for (int nt = n0; nt < n0 + NPER; ++nt) {
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      const uint4* bf = sfrag + (tqq_i64)nt * KS * 32 + lane;
#pragma unroll
      for (int s = 0; s < KS; ++s) {
        const uint4 b = __ldg(bf + s * 32);
        tqq_mma16816(c, a[s], b.z, b.w);
        tqq_mma16816(c, a[s], b.x, b.y);
      }
      float* y0 = Y + (mt * 16 + g) * AP + 8 * nt + 2 * t;
      *(float2*)y0 = make_float2(c[0], c[1]);
      *(float2*)(y0 + 8 * AP) = make_float2(c[2], c[3]);
    }
  }
}

// #{j : v >= th[j]} for the K = 2^B - 1 thresholds th sorted ascending (B <= 3): a
// binary descent, each step one compare and the next threshold chosen by selects
// (the linear count cost about twice the instructions).  Equal to the count because
// th is sorted: v >= th[mid] implies v >= every threshold below mid.
template <int B>
TQQ_D tqq_u32 tqq_count_sorted(float v, const float (&th)[(1 << B) - 1]) {
  if constexpr (B == 1) {
    return tqq_ge(v, th[0]) ? 1u : 0u;
  } else if constexpr (B == 2) {
    const bool b1 = tqq_ge(v, th[1]);
    const bool b0 = tqq_ge(v, b1 ? th[2] : th[0]);
    return (b1 ? 2u : 0u) | (b0 ? 1u : 0u);
  } else {
    static_assert(B == 3, "binary descent in registers for B <= 3");
    const bool b2 = tqq_ge(v, th[3]);
    const bool b1 = tqq_ge(v, b2 ? th[5] : th[1]);
    const float lo = b2 ? th[4] : th[0], hi = b2 ? th[6] : th[2];
    const bool b0 = tqq_ge(v, b1 ? hi : lo);
    return (b2 ? 4u : 0u) | (b1 ? 2u : 0u) | (b0 ? 1u : 0u);
  }
}

// ------------------------------------------------------------ encode
// Shared memory: signs 2P | centroids 256 | boundaries 256 | per-thread thresholds 16 x 128 |
// R1 = max(staging, X tile) | Y tile (Haar)
template <int P, int B, bool PROD>
__global__ void __launch_bounds__(TQQ_NT, TQQ_ENC_MINB(PROD, B))
tqq_encode(const char* __restrict__ x, tqq_i64 n, int d, tqq_i64 ldx_bytes, int dt, int flags, int vec,
           const float* __restrict__ signs, const float* __restrict__ rmat, const float* __restrict__ qmat,
           const float* __restrict__ cent, const float* __restrict__ bnd,
           tqq_u8* __restrict__ codes, void* __restrict__ norms, tqq_u8* __restrict__ qjl,
           void* __restrict__ rnorms) {
  using S = TQQShape<P, TQQ_ENC_EMAX>;
  constexpr int L = S::L, E = S::E, TR = S::TR, AP = S::AP;
  constexpr int CB = P * B / 8;  // code bytes per row
  constexpr int TB = E * B / 8;  // code bytes per thread
  constexpr int NW = B > 0 ? (E * B + 31) / 32 : 1;
  const int tid = threadIdx.x, rl = tid / L, part = tid % L;
  const bool f16n = flags & TQQ_NORM_F16, nc = flags & TQQ_NC, haar = flags & TQQ_HAAR;
  const bool pad = !haar && d < P;
  const int sz = dt == TQQ_F64 ? 8 : (dt == TQQ_F32 ? 4 : 2);
  const int rowbytes = d * sz;
  const int spb = (((rowbytes + 15) >> 4) | 1) << 4;  // odd number of 16-byte units: conflict-free
  const int xbytes = (PROD || haar) ? TR * AP * 4 : 0;
  const int r1 = TR * spb > xbytes ? TR * spb : xbytes;

  TQQ_SMEM(tqq_smem);
  float* s_sig = (float*)tqq_smem;
  float* s_cent = s_sig + 2 * P;
  float* s_bnd = s_cent + 256;
  float* s_th = s_bnd + 256;  // thread t's j-th threshold at s_th[j * 128 + t]: conflict-free
  char* R1 = (char*)(s_th + 16 * TQQ_NT);
  float* X = (float*)R1;
  float* Y = (float*)(R1 + ((r1 + 15) & ~15));

  if (!haar)
    for (int i = tid; i < 2 * P; i += TQQ_NT) s_sig[i] = signs[i];
  if constexpr (B > 0) {
    for (int i = tid; i < (1 << B); i += TQQ_NT) s_cent[i] = cent[i];
    for (int i = tid; i < (1 << B) - 1; i += TQQ_NT) s_bnd[i] = bnd[i];
  }
  __syncthreads();

  for (tqq_i64 tile = blockIdx.x; tile * TR < n; tile += gridDim.x) {
    const tqq_i64 row0 = tile * TR;
    const int rows = (int)(n - row0 < (tqq_i64)TR ? n - row0 : (tqq_i64)TR);
    // 1. stage the tile's input rows (coalesced)
    if (vec) {
      const int cpr = rowbytes >> 4, total = rows * cpr, dr = TQQ_NT / cpr, dc = TQQ_NT % cpr;
      int r = tid / cpr, c = tid % cpr;
      for (int i = tid; i < total; i += TQQ_NT) {
        const uint4 q = __ldg((const uint4*)(x + (row0 + r) * ldx_bytes) + c);
        *(uint4*)(R1 + r * spb + 16 * c) = q;
        c += dc; r += dr;
        if (c >= cpr) { c -= cpr; ++r; }
      }
    } else {
      const int total = rows * d, dr = TQQ_NT / d, dc = TQQ_NT % d;
      int r = tid / d, c = tid % d;
      for (int i = tid; i < total; i += TQQ_NT) {
        const char* src = x + (row0 + r) * ldx_bytes + (tqq_i64)c * sz;
        char* dst = R1 + r * spb + c * sz;
        if (sz == 2) *(tqq_u16*)dst = *(const tqq_u16*)src;
        else if (sz == 4) *(tqq_u32*)dst = *(const tqq_u32*)src;
        else *(tqq_u64*)dst = *(const tqq_u64*)src;
        c += dc; r += dr;
        if (c >= d) { c -= d; ++r; }
      }
    }
    __syncthreads();
    float v[E];
    if (part * E + E <= d) tqq_read_row<E, true>(R1 + rl * spb, part * E, d, dt, v);
    else tqq_read_row<E, false>(R1 + rl * spb, part * E, d, dt, v);
    __syncthreads();  // staging consumed: R1 is free
    const tqq_i64 row = row0 + rl;
    const bool valid = rl < rows;

    // 2. prescale by 2**-e
    const int e = tqq_row_exponent<E, L>(v);
    const float sc = tqq_pow2(-e);
#pragma unroll
    for (int k = 0; k < E; ++k) v[k] = tqq_mul(v[k], sc);

    // 3. rotate
    if (haar) {
      tqq_tile_put<E>(X, rl * AP + part * E, v);
      __syncthreads();
      tqq_dense<P, TR, true>(X, rmat, Y);
      __syncthreads();
      tqq_tile_get<E>(Y, rl * AP + part * E, v);
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int k = 0; k < E; ++k) v[k] = tqq_mul(v[k], s_sig[r * P + part * E + k]);
        tqq_fwht<E, L>(v, part);
      }
#pragma unroll
      for (int k = 0; k < E; ++k) v[k] = tqq_mul(v[k], 1.0f / P);
    }

    // 4. norm and unit vector
    const float rho = tqq_sqrt(tqq_tree_sq<E, L>(v));
    const bool posn = tqq_gt(rho, 0.f);
    const float p2e = tqq_pow2(e);

    // 5-6. codes and stored norm
    tqq_u32 W[NW];
    float kappa = 1.f;
    if constexpr (B > 0) {
#pragma unroll
      for (int w = 0; w < NW; ++w) W[w] = 0u;
      bool coded = false;
      if constexpr (!PROD && B <= 4) {
        if (!nc) {  // u is not needed: compare y with per-row thresholds instead of dividing every coordinate
          constexpr int K = (1 << B) - 1;
          const float inf = __uint_as_float(0x7f800000u);
          if constexpr (B <= 3) {  // up to 7 thresholds: registers, binary descent by selects
            float th[K];
#pragma unroll
            for (int j = 0; j < K; ++j)
              th[j] = posn ? tqq_threshold(s_bnd[j], rho) : (tqq_lt(s_bnd[j], 0.f) ? -inf : inf);
#pragma unroll
            for (int k = 0; k < E; ++k) tqq_put<B>(W, k, tqq_count_sorted<B>(v[k], th));
          } else {  // 15 thresholds: this thread's column of shared memory, binary search
            float* th = s_th + tid;
            for (int j = 0; j < K; ++j)
              th[j * TQQ_NT] = posn ? tqq_threshold(s_bnd[j], rho) : (tqq_lt(s_bnd[j], 0.f) ? -inf : inf);
#pragma unroll
            for (int k = 0; k < E; ++k) {
              int idx = 0;
#pragma unroll
              for (int step = 1 << (B - 1); step >= 1; step >>= 1)
                if (tqq_ge(v[k], th[(idx + step - 1) * TQQ_NT])) idx += step;
              tqq_put<B>(W, k, (tqq_u32)idx);
            }
          }
          coded = true;
        }
      }
      if (!coded) {
#pragma unroll
        for (int k = 0; k < E; ++k) v[k] = posn ? tqq_div(v[k], rho) : 0.f;
        if constexpr (B <= 2) {  // boundaries in registers
          constexpr int K = (1 << B) - 1;
          float tb[K];
#pragma unroll
          for (int j = 0; j < K; ++j) tb[j] = s_bnd[j];
#pragma unroll
          for (int k = 0; k < E; ++k) {
            tqq_u32 c = 0u;
#pragma unroll
            for (int j = 0; j < K; ++j) c += tqq_lt(tb[j], v[k]) ? 1u : 0u;
            tqq_put<B>(W, k, c);
          }
        } else {
#pragma unroll
          for (int k = 0; k < E; ++k) tqq_put<B>(W, k, (tqq_u32)tqq_quant<B>(v[k], s_bnd));
        }
      }
      if (valid) tqq_store_bytes<TB>(codes + row * CB + part * TB, W);
      float stored;
      if (nc) {
        if constexpr (PROD) tqq_tile_put<E>(X, rl * AP + part * E, v);  // keep u for the residual
#pragma unroll
        for (int k = 0; k < E; ++k) v[k] = s_cent[tqq_get<B>(W, k)];
        if (pad) {  // kappa = norm of what decoding outputs: unrotate(c)[:d]
#pragma unroll
          for (int r = 1; r >= 0; --r) {
            tqq_fwht<E, L>(v, part);
#pragma unroll
            for (int k = 0; k < E; ++k) v[k] = tqq_mul(v[k], s_sig[r * P + part * E + k]);
          }
#pragma unroll
          for (int k = 0; k < E; ++k) {
            const float t = tqq_mul(v[k], 1.0f / P);
            v[k] = (part * E + k < d) ? t : 0.f;
          }
        }
        kappa = tqq_sqrt(tqq_tree_sq<E, L>(v));
        stored = tqq_mul(tqq_div(rho, kappa), p2e);
      } else {
        stored = tqq_mul(rho, p2e);
      }
      if (valid && part == 0) tqq_store_norm(norms, row, stored, f16n);
    } else {  // prod with 1 bit: the residual is u itself
#pragma unroll
      for (int k = 0; k < E; ++k) v[k] = posn ? tqq_div(v[k], rho) : 0.f;
    }

    // 7. QJL
    if constexpr (PROD) {
      if constexpr (B > 0) {
        if (nc) {
          const float* urow = X + rl * AP + part * E;
#pragma unroll
          for (int k = 0; k < E; ++k) v[k] = tqq_sub(urow[k], tqq_div(s_cent[tqq_get<B>(W, k)], kappa));
        } else {
#pragma unroll
          for (int k = 0; k < E; ++k) v[k] = tqq_sub(v[k], s_cent[tqq_get<B>(W, k)]);
        }
      }
      const float g = tqq_mul(tqq_mul(tqq_sqrt(tqq_tree_sq<E, L>(v)), rho), p2e);
      if (valid && part == 0) tqq_store_norm(rnorms, row, g, f16n);
      if constexpr (TQQQjlMma<P, TR>::ok) {  // scale the row: max |r_j| to [256, 512)
        const int er = 9 - tqq_row_exponent<E, L>(v);
        const float rs = tqq_pow2(er < 126 ? er : 126);
#pragma unroll
        for (int k = 0; k < E; ++k) v[k] = tqq_mul(v[k], rs);
      }
      tqq_tile_put<E>(X, rl * AP + part * E, v);
      __syncthreads();
      if constexpr (TQQQjlMma<P, TR>::ok)
        tqq_mma_signs<P, TR>(X, (const uint4*)qmat, qjl, row0, rows);  // qmat: S fragments
      else
        tqq_dense_signs<P, TR>(X, qmat, qjl, row0, rows);
    }
    if (PROD || haar) __syncthreads();  // tiles are reused by the next iteration
  }
}

// ------------------------------------------------------------ decode
// Shared memory: signs 2P | centroids 256 | (unused) 256 | output staging 128 x TQQ_WP |
// X tile | Y tile (prod or Haar)
#ifndef TQQ_WP  // the backend passes it (cupy_backend.DECODE_WP), which sizes the shared memory
#define TQQ_WP 36  // output staging pitch (floats): one thread's 32-column slice, conflict-free float4s
#endif
template <int P, int B, bool PROD>
__global__ void __launch_bounds__(TQQ_NT, TQQ_DEC_MINB(PROD))
tqq_decode(const tqq_u8* __restrict__ codes, const void* __restrict__ norms, const tqq_u8* __restrict__ qjl,
           const void* __restrict__ rnorms, tqq_i64 n, int d, int flags, const float* __restrict__ signs,
           const float* __restrict__ rmat, const float* __restrict__ qmat, const float* __restrict__ cent,
           float qscale, float* __restrict__ out) {
  using S = TQQShape<P, PROD ? TQQ_DEC_EMAX_PROD : TQQ_DEC_EMAX_MSE>;
  constexpr int L = S::L, E = S::E, TR = S::TR, AP = S::AP;
  constexpr int CB = P * B / 8, TB = E * B / 8;
  constexpr int NW = B > 0 ? (E * B + 31) / 32 : 1;
  constexpr int QB = E / 8;  // sign bytes per thread
  const int tid = threadIdx.x, rl = tid / L, part = tid % L;
  const bool f16n = flags & TQQ_NORM_F16, haar = flags & TQQ_HAAR;
  TQQ_SMEM(tqq_smem);
  float* s_sig = (float*)tqq_smem;
  float* s_cent = s_sig + 2 * P;
  float* Wst = s_cent + 512;
  float* X = Wst + TQQ_NT * TQQ_WP;
  float* Y = X + TR * AP;
  if (!haar)
    for (int i = tid; i < 2 * P; i += TQQ_NT) s_sig[i] = signs[i];
  if constexpr (B > 0)
    for (int i = tid; i < (1 << B); i += TQQ_NT) s_cent[i] = cent[i];
  __syncthreads();

  for (tqq_i64 tile = blockIdx.x; tile * TR < n; tile += gridDim.x) {
    const tqq_i64 row = tile * TR + rl;
    const bool valid = row < n;
    const tqq_i64 rr = valid ? row : n - 1;
    float v[E];
    if constexpr (B > 0) {
      tqq_u32 W[NW];
      tqq_load_bytes<TB>(W, codes + rr * CB + part * TB);
      const float nu = tqq_load_norm(norms, rr, f16n);
#pragma unroll
      for (int k = 0; k < E; ++k) v[k] = s_cent[tqq_get<B>(W, k)] * nu;
    } else {
#pragma unroll
      for (int k = 0; k < E; ++k) v[k] = 0.f;
    }
    if constexpr (PROD) {
      tqq_u32 Q[(QB + 3) / 4];
      tqq_load_bytes<QB>(Q, qjl + rr * (P / 8) + part * QB);
      float sg[E];
#pragma unroll
      for (int k = 0; k < E; ++k) sg[k] = ((Q[k >> 5] >> (k & 31)) & 1u) ? 1.f : -1.f;
      tqq_tile_put<E>(X, rl * AP + part * E, sg);
      __syncthreads();
      const float g = tqq_load_norm(rnorms, rr, f16n) * qscale;  // tensor cores: qscale includes 2^-e
      if constexpr (TQQQjlMma<P, TR>::ok) {
        tqq_mma_qjl_decode<P, TR>(X, (const uint4*)qmat, Y);  // qmat: fragments of 2^e S^T
      } else {
        tqq_dense<P, TR, false>(X, qmat, Y);  // z_j = sum_i s_i S[i][j]
      }
      __syncthreads();
      tqq_tile_get<E>(Y, rl * AP + part * E, sg);
#pragma unroll
      for (int k = 0; k < E; ++k) v[k] = fmaf(sg[k], g, v[k]);
      __syncthreads();
    }
    if (haar) {
      tqq_tile_put<E>(X, rl * AP + part * E, v);
      __syncthreads();
      tqq_dense<P, TR, false>(X, rmat, Y);  // x_i = sum_j y_j M[j][i]
      __syncthreads();
      tqq_tile_get<E>(Y, rl * AP + part * E, v);
      __syncthreads();
    } else {
#pragma unroll
      for (int r = 1; r >= 0; --r) {
        tqq_fwht<E, L>(v, part);
#pragma unroll
        for (int k = 0; k < E; ++k) v[k] = v[k] * s_sig[r * P + part * E + k];
      }
#pragma unroll
      for (int k = 0; k < E; ++k) v[k] = v[k] * (1.0f / P);
    }
    // 4. store.  Per-thread row stores would touch 32 lines per instruction; instead each
    // warp stages its lanes' slices, 32 columns at a time, and writes whole 128-byte pieces.
    bool staged = false;
    if constexpr (E % 32 == 0) {
      if ((d & 3) == 0) {
        const int lane = tid & 31, wrow0 = (tid & ~31) / L;  // the warp's first tile row
        float* wb = Wst + (tid & ~31) * TQQ_WP;
#pragma unroll
        for (int c = 0; c < E / 32; ++c) {
#pragma unroll
          for (int k = 0; k < 32; k += 4)
            *(float4*)(wb + lane * TQQ_WP + k) = tqq_f4(v[32 * c + k], v[32 * c + k + 1], v[32 * c + k + 2], v[32 * c + k + 3]);
          __syncwarp();
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int pc = 4 * i + (lane >> 3), j = 4 * (lane & 7);  // piece = source lane, float offset
            const tqq_i64 prow = tile * TR + wrow0 + pc / L;
            const int col = (pc % L) * E + 32 * c + j;
            if (prow < n && col < d) *(float4*)(out + prow * d + col) = *(const float4*)(wb + pc * TQQ_WP + j);
          }
          __syncwarp();
        }
        staged = true;
      }
    }
    if (valid && !staged) {
      float* o = out + row * d;
      const int j0 = part * E;
#pragma unroll
      for (int k = 0; k < E; ++k)
        if (j0 + k < d) o[j0 + k] = v[k];
    }
  }
}

// ------------------------------------------------------------ inner products from packed codes
// out[q][row] = nu * <qr_q, c[idx]> + gamma * qjl_scale * <sq_q, 2 bits - 1>
// Each row's codes are read once and scored against up to 16 queries (rotated
// once, held in shared memory); the host launches once per 16 queries.
// Shared memory: centroids 256 | qr m*P | sq m*P.
#define TQQ_QC 16
template <int P, int B, bool PROD>
__global__ void __launch_bounds__(TQQ_NT, TQQ_SC_MINB(PROD))
tqq_scores(const tqq_u8* __restrict__ codes, const void* __restrict__ norms, const tqq_u8* __restrict__ qjl,
           const void* __restrict__ rnorms, tqq_i64 n, int flags, const float* __restrict__ qr,
           const float* __restrict__ sq, int m, const float* __restrict__ cent, float qscale,
           float* __restrict__ out) {
  using S = TQQShape<P>;
  constexpr int L = S::L, E = S::E, TR = S::TR;
  constexpr int CB = P * B / 8, TB = E * B / 8;
  constexpr int NW = B > 0 ? (E * B + 31) / 32 : 1;
  constexpr int QB = E / 8;
  const int tid = threadIdx.x, rl = tid / L, part = tid % L;
  const bool f16n = flags & TQQ_NORM_F16;
  TQQ_SMEM(tqq_smem);
  float* s_cent = (float*)tqq_smem;
  float* s_q = s_cent + 256;
  float* s_s = s_q + m * P;
  if constexpr (B > 0)
    for (int i = tid; i < (1 << B); i += TQQ_NT) s_cent[i] = cent[i];
  for (int i = tid; i < m * P; i += TQQ_NT) {
    if constexpr (B > 0) s_q[i] = qr[i];
    if constexpr (PROD) s_s[i] = sq[i];
  }
  __syncthreads();

  // software pipelining: the next row's codes are loaded while this one is scored
  const tqq_i64 stride = (tqq_i64)gridDim.x * TR;
  tqq_i64 base = (tqq_i64)blockIdx.x * TR;
  tqq_u32 Wn[NW], Qn[(QB + 3) / 4];
  float nun = 0.f, gn = 0.f;
  auto fetch = [&](tqq_i64 b0) {
    const tqq_i64 r = b0 + rl < n ? b0 + rl : n - 1;
    if constexpr (B > 0) {
      tqq_load_bytes<TB>(Wn, codes + r * CB + part * TB);
      nun = tqq_load_norm(norms, r, f16n);
    }
    if constexpr (PROD) {
      tqq_load_bytes<QB>(Qn, qjl + r * (P / 8) + part * QB);
      gn = tqq_load_norm(rnorms, r, f16n) * qscale;
    }
  };
  if (base < n) fetch(base);
  for (; base < n; base += stride) {
    const tqq_i64 row = base + rl;
    const bool valid = row < n;
    tqq_u32 W[NW], Q[(QB + 3) / 4];
#pragma unroll
    for (int w = 0; w < NW; ++w) W[w] = Wn[w];
#pragma unroll
    for (int w = 0; w < (QB + 3) / 4; ++w) Q[w] = Qn[w];
    const float nu = nun, g = gn;
    if (base + stride < n) fetch(base + stride);
    float res[TQQ_QC];
#pragma unroll
    for (int qq = 0; qq < TQQ_QC; ++qq) res[qq] = 0.f;
    if constexpr (B > 0) {
      float c[E];
#pragma unroll
      for (int k = 0; k < E; ++k) c[k] = s_cent[tqq_get<B>(W, k)];
#pragma unroll
      for (int qq = 0; qq < TQQ_QC; ++qq) {
        if (qq < m) {
          res[qq] = tqq_dot4<E>(s_q + qq * P + part * E, c) * nu;
        }
      }
    }
    if constexpr (PROD) {
      float s[E];
#pragma unroll
      for (int k = 0; k < E; ++k) s[k] = ((Q[k >> 5] >> (k & 31)) & 1u) ? 1.f : -1.f;
#pragma unroll
      for (int qq = 0; qq < TQQ_QC; ++qq) {
        if (qq < m) {
          res[qq] = fmaf(tqq_dot4<E>(s_s + qq * P + part * E, s), g, res[qq]);
        }
      }
    }
    if constexpr (L == 2) {
#pragma unroll
      for (int qq = 0; qq < TQQ_QC; ++qq) res[qq] += __shfl_xor_sync(TQQ_FULL, res[qq], 1);
    }
    if (valid && part == 0) {
#pragma unroll
      for (int qq = 0; qq < TQQ_QC; ++qq)
        if (qq < m) out[(tqq_i64)qq * n + row] = res[qq];
    }
  }
}

// ------------------------------------------------------------ inner products on tensor cores
// The same scores as tqq_scores, for P = 32..256 and B <= 4 MSE bits, with
// mma.sync m16n8k16 (f16 inputs, f32 accumulation): M = 16 queries, N = 8 rows,
// K = 16 coordinates.  float32 accuracy from float16 operands by splitting
// both sides, x = hi + lo: <q, c> = q_hi c_hi + q_hi c_lo + q_lo c_hi (the lo lo
// term is below float32 rounding).  QJL signs are exact in float16, so the
// QJL term is s q_hi + s q_lo.  Queries are scaled by a power of two per
// query (max |q| to [256, 512)) and the centroid tables by one per codebook,
// so no hi or lo part under- or overflows; the scales are undone on output.
//
// K order: lane (g, t) = (lane / 4, lane % 4) of a warp owns the coordinates
// [t P/4, (t+1) P/4) of row g of its 8-row tile; k-step s takes its
// coordinates 4s..4s+3 as the fragment positions 2t, 2t+1 (b0) and 2t+8, 2t+9
// (b1).  The A fragment (queries) uses the same positions for the same lane,
// so a lane's codes are contiguous bytes (one 16-byte load for P = 128, B = 4)
// and its query fragments are built once per block into shared memory.
//
// Centroid look-ups go through pair tables: a pair of codes (2B bits) indexes
// a {hi, lo} pair of half2 words, i.e. b0 or b1 directly.  The tables are
// replicated 16 times, copy i in bank pair i, and lane l reads copy l % 16:
// a random look-up by 32 lanes costs the minimum two shared-memory wavefronts.
// Shared memory: static pair table 2^(2B) * 128 B; dynamic:
// A fragments (P/16 steps x {hi, lo} x 32 lanes x 16 B, twice for prod) |
// staged scaled queries 16 P floats | inverse scales 32 floats.
// 8-row tiles per warp iteration: 4 (32 rows); 2 with the QJL term, whose accumulators
// and sign words would not fit in registers four times over
#define TQQ_MMA_TILES(PROD) ((PROD) ? 2 : 4)
// resident blocks per SM: 4 (128 registers) where the kernel fits, else 3
#ifndef TQQ_SCM_MINB
#define TQQ_SCM_MINB(P, PROD) (((PROD) || (P) > 128) ? 3 : 4)
#endif

// (field << SH) for the F-bit field at bit POS of the lane's words
template <int POS, int F, int SH>
TQQ_D tqq_u32 tqq_field(const tqq_u32* W) {
  constexpr int w = POS >> 5, sh = POS & 31;
  constexpr tqq_u32 mask = ((1u << F) - 1u) << SH;
  tqq_u32 x;
  if constexpr (sh < SH)
    x = W[w] << (SH - sh);
  else if constexpr (sh + F <= 32)
    x = W[w] >> (sh - SH);
  else
    x = __funnelshift_r(W[w], W[w + 1], sh - SH);
  return x & mask;
}

// 8-byte shared-memory load at byte offset off of a table (ld.shared with a 32-bit address)
TQQ_D uint2 tqq_lds64(const char* table, tqq_u32 off) {
#ifdef TQQ_HOST
  return *(const uint2*)(table + off);
#else
  uint2 v;
  const tqq_u32 a = (tqq_u32)__cvta_generic_to_shared(table) + off;
  asm("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(a));
  return v;
#endif
}
TQQ_D uint4 tqq_lds128(const char* table, tqq_u32 off) {
#ifdef TQQ_HOST
  return *(const uint4*)(table + off);
#else
  uint4 v;
  const tqq_u32 a = (tqq_u32)__cvta_generic_to_shared(table) + off;
  asm("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
#endif
}

template <int I>
struct TQQInt {
  static constexpr int value = I;
};
template <int I, int N, typename F>
TQQ_D void tqq_static_for(F&& f) {  // f(TQQInt<I>{}) for I = 0..N-1, unrolled at compile time
  if constexpr (I < N) {
    f(TQQInt<I>{});
    tqq_static_for<I + 1, N>(f);
  }
}

// Four QJL sign bits x (bit k = coordinate k, 1 meaning +1) as B operands: {half2 of bits
// 0, 1; half2 of bits 2, 3; the four signs as int8; 0}.  +-1 in float16 differ only in bit
// 15, and byte k of ~(spread * 0xFE) is 0x01 where bit k is set, else 0xFF (the spread
// x * 0x204081 moves bit k to bit 8k with no carries).  Arithmetic instead of a shared
// table look-up: the shared-memory pipe is what bounds this kernel.
TQQ_D uint4 tqq_sign_frag(tqq_u32 x) {
  const tqq_u32 m1 = 0xBC00BC00u;  // (-1, -1)
  const tqq_u32 h0 = m1 ^ ((x & 1u) << 15) ^ ((x & 2u) << 30);
  const tqq_u32 h1 = m1 ^ ((x & 4u) << 13) ^ ((x & 8u) << 28);
  const tqq_u32 spread = (x * 0x204081u) & 0x01010101u;
  return tqq_u4(h0, h1, ~(spread * 0xFEu), 0u);
}

// One query set's A fragments from qs[16][P] (scaled, zero rows past m), per k-step s:
// frag[2s] = float16 hi parts (m16n8k16 A); frag[2s+1] = the int8 A of the correction.
// MSE (QJL false): {hi/4 of rows g, g+8 | lo*2^10 of rows g, g+8} for this step's 4
// coordinates, against B = {c_lo*2^10 | c_hi/4}.  QJL: for even s only, {lo*2^10 of rows
// g, g+8 at step s | the same at step s+1}, against B = the int8 signs of both steps.
template <int P, bool QJL>
TQQ_D void tqq_build_frags(const float* qs, uint4* frag, int warp, int lane) {
  const int g = lane >> 2, t = lane & 3;
  for (int s = warp; s < P / 16; s += TQQ_NT / 32) {
    const float* r0 = qs + g * P + t * (P / 4) + 4 * s;
    const float* r1 = r0 + 8 * P;
    uint4 h, c;
    h.x = tqq_h2(r0[0], r0[1]);
    h.y = tqq_h2(r1[0], r1[1]);
    h.z = tqq_h2(r0[2], r0[3]);
    h.w = tqq_h2(r1[2], r1[3]);
    auto lo8 = [](const float* r) {
      return tqq_i8x4(tqq_h_resid(r[0]), tqq_h_resid(r[1]), tqq_h_resid(r[2]), tqq_h_resid(r[3]), 1024.f);
    };
    auto hi8 = [](const float* r) {
      return tqq_i8x4(tqq_h2f(tqq_f2h(r[0])), tqq_h2f(tqq_f2h(r[1])), tqq_h2f(tqq_f2h(r[2])),
                      tqq_h2f(tqq_f2h(r[3])), 0.25f);
    };
    if constexpr (QJL) {
      c = s % 2 == 0 ? tqq_u4(lo8(r0), lo8(r1), lo8(r0 + 4), lo8(r1 + 4)) : tqq_u4(0u, 0u, 0u, 0u);
    } else {
      c = tqq_u4(hi8(r0), hi8(r1), lo8(r0), lo8(r1));
    }
    frag[(2 * s) * 32 + lane] = h;
    frag[(2 * s + 1) * 32 + lane] = c;
  }
}

// Stage up to 16 queries (m x P floats) scaled by 2^e_r, max |q_r| 2^e_r in [256, 512);
// inv[r] = 2^-e_r * extra.  Zero rows for r >= m.  All threads of the block.
template <int P>
TQQ_D void tqq_stage_queries(const float* __restrict__ q, int m, float* qs, float* inv, float extra) {
  const int tid = threadIdx.x, r = tid >> 3, part = tid & 7;  // 8 threads per query
  float mx = 0.f;
  if (r < m)
    for (int j = part; j < P; j += 8) mx = fmaxf(mx, fabsf(q[r * P + j]));
  mx = fmaxf(mx, __shfl_xor_sync(TQQ_FULL, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(TQQ_FULL, mx, 2));
  mx = fmaxf(mx, __shfl_xor_sync(TQQ_FULL, mx, 4));
  // mx = f 2^x, f in [0.5, 1): scale 2^(9 - x), clamped to a normal float32 power
  int x = ((int)((__float_as_uint(mx) >> 23) & 0xffu)) - 126;
  int e = mx > 0.f ? 9 - x : 0;
  e = e > 126 ? 126 : (e < -126 ? -126 : e);
  const float sc = __uint_as_float((tqq_u32)(e + 127) << 23);
  const float isc = __uint_as_float((tqq_u32)(127 - e) << 23);
  for (int j = part; j < P; j += 8) qs[r * P + j] = r < m ? tqq_mul(q[r * P + j], sc) : 0.f;
  if (part == 0) inv[r] = tqq_mul(isc, extra);
}

template <int P, int B, bool PROD>
__global__ void __launch_bounds__(TQQ_NT, TQQ_SCM_MINB(P, PROD))
tqq_scores_mma(const tqq_u8* __restrict__ codes, const void* __restrict__ norms, const tqq_u8* __restrict__ qjl,
               const void* __restrict__ rnorms, tqq_i64 n, int flags, const float* __restrict__ qr,
               const float* __restrict__ sq, int m, const uint4* __restrict__ tables, float cinv, float qscale,
               float* __restrict__ out) {
  static_assert(P >= 32 && P <= 256 && (P & (P - 1)) == 0 && B <= 4, "tensor-core scores: P 32..256, B <= 4");
  constexpr int KS = P / 16;                  // k-steps
  constexpr int TBC = P * B / 32;             // code bytes per lane per row
  constexpr int NWC = B > 0 ? (TBC + 3) / 4 : 1;
  constexpr int TBQ = P / 32;                 // sign bytes per lane per row
  constexpr int NWQ = (TBQ + 3) / 4;
  constexpr int CB = P * B / 8, QBR = P / 8;  // bytes per row
  constexpr int PAIR_BYTES = B > 0 ? (1 << (2 * B)) * 128 : 0;
  constexpr int FRAG = KS * 2 * 32;           // uint4 per query set
  constexpr int NT = TQQ_MMA_TILES(PROD);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const bool f16n = flags & TQQ_NORM_F16;

  // the look-up tables are static shared memory: their addresses are compile-time
  // constants, folded into the LDS offsets (a dynamic base would cost an add per look-up)
  __shared__ uint4 s_tab[PAIR_BYTES > 0 ? PAIR_BYTES / 16 : 1];
  char* s_pair = (char*)s_tab;
  TQQ_SMEM(tqq_smem);
  uint4* s_fq = (uint4*)tqq_smem;
  uint4* s_fs = s_fq + (B > 0 ? FRAG : 0);
  float* s_qs = (float*)(s_fs + (PROD ? FRAG : 0));
  float* s_inv = s_qs + 16 * P;  // [0, 16) MSE query scales, [16, 32) QJL

  for (int i = tid; i < PAIR_BYTES / 16; i += TQQ_NT) ((uint4*)s_pair)[i] = tables[i];
  if constexpr (B > 0) {
    tqq_stage_queries<P>(qr, m, s_qs, s_inv, cinv);
    __syncthreads();
    tqq_build_frags<P, false>(s_qs, s_fq, warp, lane);
    __syncthreads();
  }
  if constexpr (PROD) {
    tqq_stage_queries<P>(sq, m, s_qs, s_inv + 16, 1.0f);
    __syncthreads();
    tqq_build_frags<P, true>(s_qs, s_fs, warp, lane);
  }
  __syncthreads();
  const float iq0 = s_inv[g], iq1 = s_inv[g + 8];
  const float is0 = s_inv[16 + g], is1 = s_inv[24 + g];
  const tqq_u32 lane_off = (tqq_u32)(lane & 15) << 3;    // pair table copy (8-byte entries)

  const tqq_i64 iters = (n + 8 * NT - 1) / (8 * NT);
  const tqq_i64 wstride = (tqq_i64)gridDim.x * (TQQ_NT / 32);
  const tqq_i64 it0 = (tqq_i64)blockIdx.x * (TQQ_NT / 32) + warp;

  // The main loop, compiled once per norm dtype (no per-load branch).
  auto loop = [&](auto norm_f16) {
    constexpr bool F16 = decltype(norm_f16)::value == 1;
    auto ld_norm = [](const void* p, tqq_i64 r) {
      return F16 ? tqq_h2f(__ldg((const tqq_u16*)p + r)) : __ldg((const float*)p + r);
    };
    // next iteration's codes, signs and norms; in the last, partial iteration rows past n
    // are clamped to n - 1 (loaded, never stored)
    tqq_u32 Wn[NT][NWC], Qn[NT][NWQ];
    float nun[NT][2], gnn[NT][2];
    auto fetch = [&](tqq_i64 i0) {
      const tqq_i64 rb = i0 * (8 * NT);
      if (rb + 8 * NT <= n) {
        const tqq_u8* pc = codes + (rb + g) * CB + t * TBC;
        const tqq_u8* pq = qjl + (rb + g) * QBR + t * TBQ;
        const tqq_i64 rn = rb + 2 * t;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          if constexpr (B > 0) {
            tqq_load_bytes<TBC>(Wn[i], pc + i * 8 * CB);
            nun[i][0] = ld_norm(norms, rn + 8 * i);
            nun[i][1] = ld_norm(norms, rn + 8 * i + 1);
          }
          if constexpr (PROD) {
            tqq_load_bytes<TBQ>(Qn[i], pq + i * 8 * QBR);
            gnn[i][0] = ld_norm(rnorms, rn + 8 * i) * qscale;
            gnn[i][1] = ld_norm(rnorms, rn + 8 * i + 1) * qscale;
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          const tqq_i64 ri = rb + 8 * i, last = n - 1;
          const tqq_i64 rc = ri + g < n ? ri + g : last;
          const tqq_i64 r0 = ri + 2 * t < n ? ri + 2 * t : last, r1 = ri + 2 * t + 1 < n ? ri + 2 * t + 1 : last;
          if constexpr (B > 0) {
            tqq_load_bytes<TBC>(Wn[i], codes + rc * CB + t * TBC);
            nun[i][0] = ld_norm(norms, r0);
            nun[i][1] = ld_norm(norms, r1);
          }
          if constexpr (PROD) {
            tqq_load_bytes<TBQ>(Qn[i], qjl + rc * QBR + t * TBQ);
            gnn[i][0] = ld_norm(rnorms, r0) * qscale;
            gnn[i][1] = ld_norm(rnorms, r1) * qscale;
          }
        }
      }
    };
    tqq_i64 it = it0;
    if (it < iters) fetch(it);
    for (; it < iters; it += wstride) {
      tqq_u32 W[NT][NWC], Q[NT][NWQ];
      float nu[NT][2], gn[NT][2];
#pragma unroll
      for (int i = 0; i < NT; ++i) {
#pragma unroll
        for (int w = 0; w < NWC; ++w) W[i][w] = Wn[i][w];
#pragma unroll
        for (int w = 0; w < NWQ; ++w) Q[i][w] = Qn[i][w];
        nu[i][0] = nun[i][0]; nu[i][1] = nun[i][1];
        gn[i][0] = gnn[i][0]; gn[i][1] = gnn[i][1];
      }
      if (it + wstride < iters) fetch(it + wstride);

      float acc[NT][4], acs[NT][4];  // float16 products
      int iac[NT][4], ias[NT][4];    // int8 corrections
      tqq_u32 sprev[NT];             // QJL: the previous step's int8 signs
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        sprev[i] = 0u;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          acc[i][k] = acs[i][k] = 0.f;
          iac[i][k] = ias[i][k] = 0;
        }
      }

      tqq_static_for<0, KS>([&](auto sc) {
        constexpr int s = decltype(sc)::value;
        if constexpr (B > 0) {
          const uint4 ah = s_fq[(2 * s) * 32 + lane], a8 = s_fq[(2 * s + 1) * 32 + lane];
#pragma unroll
          for (int i = 0; i < NT; ++i) {
            // entry: {c_hi half2 of the pair, int8 {c_lo a, c_lo b, c_hi a, c_hi b}}
            const uint2 e0 = tqq_lds64(s_pair, tqq_field<(2 * s) * 2 * B, 2 * B, 7>(W[i]) | lane_off);
            const uint2 e1 = tqq_lds64(s_pair, tqq_field<(2 * s + 1) * 2 * B, 2 * B, 7>(W[i]) | lane_off);
            tqq_mma16816(acc[i], ah, e0.x, e1.x);
            tqq_imma16832(iac[i], a8, __byte_perm(e0.y, e1.y, 0x5410), __byte_perm(e0.y, e1.y, 0x7632));
          }
        }
        if constexpr (PROD) {
          const uint4 sh = s_fs[(2 * s) * 32 + lane];
#pragma unroll
          for (int i = 0; i < NT; ++i) {
            const uint4 e = tqq_sign_frag(tqq_field<4 * s, 4, 0>(Q[i]));
            tqq_mma16816(acs[i], sh, e.x, e.y);
            if constexpr (s % 2 == 1)
              tqq_imma16832(ias[i], s_fs[(2 * s - 1) * 32 + lane], sprev[i], e.z);
            else
              sprev[i] = e.z;
          }
        }
      });

      // c[0], c[1]: query g, rows 2t, 2t+1 of the tile; c[2], c[3]: query g + 8
      const tqq_i64 rb = it * (8 * NT);
      const bool full = rb + 8 * NT <= n && (n & 1) == 0;  // float2 stores: 8-byte aligned, in range
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        const tqq_i64 r0 = rb + 8 * i + 2 * t;
        float v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int c = k & 1;
          float x = 0.f;
          if constexpr (B > 0) x = fmaf((float)iac[i][k], 0x1p-8f, acc[i][k]) * (k < 2 ? iq0 : iq1) * nu[i][c];
          if constexpr (PROD) x = fmaf(fmaf((float)ias[i][k], 0x1p-10f, acs[i][k]) * (k < 2 ? is0 : is1), gn[i][c], x);
          v[k] = x;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int qi = g + 8 * h;
          if (qi < m) {
            float* o = out + (tqq_i64)qi * n + r0;
            if (full) {
              *(float2*)o = make_float2(v[2 * h], v[2 * h + 1]);
            } else {
              if (r0 < n) o[0] = v[2 * h];
              if (r0 + 1 < n) o[1] = v[2 * h + 1];
            }
          }
        }
      }
    }
  };
  if (f16n)
    loop(TQQInt<1>{});
  else
    loop(TQQInt<0>{});
}
