// tq fused GPU decode attention over the packed TurboQuant KV cache.
// Design, layout and measurements: docs/DECODE_KERNEL.md.  Compiled at run
// time by NVRTC through CuPy (tq/cuda/_build.py), after decode_common.cuh.
//
// Storage of one layer (B sequences, H kv heads, capacity C, rotated length P):
//   kcodes [B, H, C, P*kb/8] u8    knorms [B, H, C] fp16   (LSB-first, docs/FORMAT.md)
//   vcodes [B, H, C, P*vb/8] u8    vnorms [B, H, C] fp16
//   kwin, vwin [B, H, W, D] (cache dtype): ring buffer of the last W tokens
//   lengths [B] int32: tokens per sequence; position p < lengths[b] - W is
//   compressed at row p, the others sit in window slot p % W.
//
// Kernels:
//   tq_store   : norm, rotation, quantization and packing of the tokens that
//                leave the window (bit-exact with tq's NumPy reference), and
//                the window writes.  Fixed launch shapes, no host sync.
//   tq_split_mma / tq_split_fma : flash-decoding over the compressed tokens,
//                one block per (split, kv head, sequence), partial softmax
//                state per query head of the group, values accumulated in the
//                rotated space; one more block per (kv head, sequence) attends
//                over the full-precision window.  The last block of each
//                (kv head, sequence) to finish merges everything, rotates the
//                value sum back once and writes the output (one launch).

// ---------------------------------------------------------------- dtypes
// 0 = float32, 1 = float16, 2 = bfloat16
template <int DT> struct Ty;
template <> struct Ty<0> {
  typedef float raw;
  static TQ_D float ld(const raw* p) { return *p; }
  static TQ_D raw cvt(float x) { return x; }
};
template <> struct Ty<1> {
  typedef u16 raw;
  static TQ_D float ld(const raw* p) {
    float f; u16 h = *p;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
  static TQ_D raw cvt(float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
  }
};
template <> struct Ty<2> {
  typedef u16 raw;
  static TQ_D float ld(const raw* p) { return __uint_as_float(((u32)*p) << 16); }
  static TQ_D raw cvt(float x) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
  }
};

extern __shared__ __align__(16) u8 tq_smem[];

TQ_D float h2f(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
TQ_D u16 f2h(float x) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
}
// {lo, hi} -> half2 word (lo in bits 0..15)
TQ_D u32 pack_h2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
TQ_D float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#define TQ_NEG_INF __int_as_float(0xff800000)

TQ_D float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
TQ_D float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ======================================================================
// Store: one warp per (vector, K or V).  Element j of the padded vector sits
// in lane j / E, register j % E (E = P / 32).  Every operation follows
// docs/FORMAT.md section 2 with one rounding each (explicit _rn intrinsics),
// so the bytes equal tq's NumPy reference.
// ======================================================================
// Unnormalized FWHT of a warp-distributed vector (element j in lane j / E,
// register j % E): stages h = 1, 2, 4, ... as in docs/FORMAT.md, one rounding
// per butterfly, so the result is bit-identical to the NumPy reference.
template <int E>
TQ_D void fwht_warp(float (&v)[E], int lane) {
#pragma unroll
  for (int h = 1; h < E; h <<= 1) {
#pragma unroll
    for (int r = 0; r < E; ++r) {
      if ((r & h) == 0) {
        float a = v[r], b = v[r + h];
        v[r] = __fadd_rn(a, b);
        v[r + h] = __fsub_rn(a, b);
      }
    }
  }
#pragma unroll
  for (int hl = 1; hl < 32; hl <<= 1) {
    const bool upper = (lane & hl) != 0;
#pragma unroll
    for (int r = 0; r < E; ++r) {
      float o = __shfl_xor_sync(0xffffffffu, v[r], hl);
      v[r] = upper ? __fsub_rn(o, v[r]) : __fadd_rn(v[r], o);
    }
  }
}

// Sum of squares of a warp-distributed vector in the reference's order: squares
// rounded, then the halving tree s[i] += s[i + half], half = P/2 ... 1 (the
// cross-lane halves first, then the E in-register ones).
template <int E>
TQ_D float warp_tree_sq(const float (&v)[E]) {
  float s[E];
#pragma unroll
  for (int r = 0; r < E; ++r) s[r] = __fmul_rn(v[r], v[r]);
#pragma unroll
  for (int hl = 16; hl >= 1; hl >>= 1) {
#pragma unroll
    for (int r = 0; r < E; ++r) s[r] = __fadd_rn(s[r], __shfl_xor_sync(0xffffffffu, s[r], hl));
  }
#pragma unroll
  for (int h = E / 2; h >= 1; h >>= 1) {
#pragma unroll
    for (int r = 0; r < h; ++r) s[r] = __fadd_rn(s[r], s[r + h]);
  }
  return s[0];
}

template <int P, int B>
TQ_D void compress_vec(float (&x)[P / 32], int D, const float* __restrict__ signs,
                       const float* __restrict__ bounds, const float* __restrict__ cents,
                       u8* scodes, u8* __restrict__ out_codes, u16* __restrict__ out_norm) {
  constexpr int E = P / 32;
  constexpr int NB = (1 << B) - 1;
  const int lane = threadIdx.x & 31;
  // 1. prescale by an exact power of two
  float mx = 0.f;
#pragma unroll
  for (int r = 0; r < E; ++r) mx = fmaxf(mx, fabsf(x[r]));
  mx = warp_max(mx);
  int e = 0;
  frexpf(mx, &e);
  if (mx == 0.f) e = 0;
  e = e < -126 ? -126 : (e > 126 ? 126 : e);
  const float down = ldexpf(1.f, -e), up = ldexpf(1.f, e);
  float v[E];
#pragma unroll
  for (int r = 0; r < E; ++r) v[r] = __fmul_rn(x[r], down);
  // 2. rotation: two rounds of signs + unnormalized FWHT, then * 1/P
#pragma unroll
  for (int round = 0; round < 2; ++round) {
#pragma unroll
    for (int r = 0; r < E; ++r) v[r] = __fmul_rn(v[r], __ldg(signs + round * P + lane * E + r));
    fwht_warp<E>(v, lane);
  }
#pragma unroll
  for (int r = 0; r < E; ++r) v[r] = __fmul_rn(v[r], 1.0f / P);
  // 3. norm
  const float rho = __fsqrt_rn(warp_tree_sq<E>(v));
  // 4-5. unit vector, codes (number of boundaries strictly below u)
  int idx[E];
  float c2[E];
#pragma unroll
  for (int r = 0; r < E; ++r) {
    float u = rho > 0.f ? __fdiv_rn(v[r], rho) : 0.f;
    int k = 0;
#pragma unroll
    for (int t = 0; t < NB; ++t) k += (__ldg(bounds + t) < u) ? 1 : 0;
    idx[r] = k;
    c2[r] = __ldg(cents + k);
  }
  if (D < P) {
    // padded: kappa is the norm of what decoding outputs, unrotate(c)[:D]
#pragma unroll
    for (int round = 1; round >= 0; --round) {
      fwht_warp<E>(c2, lane);
#pragma unroll
      for (int r = 0; r < E; ++r) c2[r] = __fmul_rn(c2[r], __ldg(signs + round * P + lane * E + r));
    }
#pragma unroll
    for (int r = 0; r < E; ++r) c2[r] = (lane * E + r < D) ? __fmul_rn(c2[r], 1.0f / P) : 0.f;
  }
  // 6. norm correction: kappa = |c[idx]| (or of its decoded truncation) by the same tree
  const float kappa = __fsqrt_rn(warp_tree_sq<E>(c2));
  if (lane == 0) *out_norm = f2h(__fmul_rn(__fdiv_rn(rho, kappa), up));
  // pack: LSB-first bit stream, one 32-bit word per lane
#pragma unroll
  for (int r = 0; r < E; ++r) scodes[lane * E + r] = (u8)idx[r];
  __syncwarp();
  constexpr int NW = P * B / 32;
  if (lane < NW) {
    const int b0 = lane * 32;
    u64 acc = 0;
    for (int j = b0 / B; j * B < b0 + 32 && j < P; ++j) {
      acc |= ((u64)scodes[j]) << (j * B - b0 + 8);
    }
    reinterpret_cast<u32*>(out_codes)[lane] = (u32)(acc >> 8);
  }
  __syncwarp();
}

template <int P, int DT>
TQ_D void load_vec(float (&x)[P / 32], const typename Ty<DT>::raw* __restrict__ row, int D) {
  constexpr int E = P / 32;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < E; ++r) {
    int j = lane * E + r;
    x[r] = j < D ? Ty<DT>::ld(row + j) : 0.f;
  }
}

template <int P, int DT>
TQ_D void store_vec(const float (&x)[P / 32], typename Ty<DT>::raw* __restrict__ row, int D) {
  constexpr int E = P / 32;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < E; ++r) {
    int j = lane * E + r;
    if (j < D) row[j] = Ty<DT>::cvt(x[r]);  // exact: x came from this dtype
  }
}

struct StoreArgs {
  const void* k; const void* v;              // new tokens [B, H, T, D] (strided)
  i64 skb, skh, skt, svb, svh, svt;          // element strides
  const int* nvalid;                         // [B] or null (= T)
  const int* lengths;                        // [B] before this append
  u8* kcodes; u16* knorms; u8* vcodes; u16* vnorms;
  void* kwin; void* vwin;
  const float* ksigns; const float* kbounds; const float* kcents;
  const float* vsigns; const float* vbounds; const float* vcents;
  i64 cap;
  int H, T, D, W, mode;
};

// grid (jobs, H, B), block 64: warp 0 keys, warp 1 values.
// mode 0 (T <= W): job i = new token p = L + i; compresses the token p - W
//   that held slot p % W (if any), then writes the new token there.
// mode 1: job j compresses position q = max(0, L - W) + j if it leaves the
//   window (from the window or straight from the input).
// mode 2: job i writes new token p = L + i into the window if it stays.
template <int P, int KB, int VB, int DT>
__global__ void __launch_bounds__(64) tq_store(
    const void* k_, const void* v_, i64 skb, i64 skh, i64 skt, i64 svb, i64 svh, i64 svt,
    const int* nvalid, const int* lengths, u8* kcodes, u16* knorms, u8* vcodes, u16* vnorms,
    void* kwin, void* vwin, const float* ksigns, const float* kbounds, const float* kcents,
    const float* vsigns, const float* vbounds, const float* vcents, i64 cap, int H, int T_, int D,
    int W, int mode) {
  const StoreArgs a = {k_, v_, skb, skh, skt, svb, svh, svt, nvalid, lengths, kcodes, knorms, vcodes,
                       vnorms, kwin, vwin, ksigns, kbounds, kcents, vsigns, vbounds, vcents, cap,
                       H, T_, D, W, mode};
  typedef typename Ty<DT>::raw T;
  __shared__ u8 scodes[2][P];
  const int warp = threadIdx.x >> 5;
  const int job = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int L = a.lengths[b];
  const int nv = a.nvalid ? a.nvalid[b] : a.T;
  const int Lnew = L + nv;
  const bool isk = warp == 0;
  const T* src = (const T*)(isk ? a.k : a.v) + (isk ? b * a.skb + h * a.skh : b * a.svb + h * a.svh);
  const i64 st = isk ? a.skt : a.svt;
  T* win = (T*)(isk ? a.kwin : a.vwin);
  const i64 bh = (i64)b * a.H + h;
  const int CB = P * (isk ? KB : VB) / 8;
  u8* codes = isk ? a.kcodes : a.vcodes;
  u16* norms = isk ? a.knorms : a.vnorms;
  const float* sg = isk ? a.ksigns : a.vsigns;
  const float* bd = isk ? a.kbounds : a.vbounds;
  const float* ct = isk ? a.kcents : a.vcents;
  float x[P / 32];

  auto compress = [&](int pos) {
    if (isk) compress_vec<P, KB>(x, a.D, sg, bd, ct, scodes[0], codes + (bh * a.cap + pos) * CB, norms + bh * a.cap + pos);
    else compress_vec<P, VB>(x, a.D, sg, bd, ct, scodes[1], codes + (bh * a.cap + pos) * CB, norms + bh * a.cap + pos);
  };

  if (a.mode == 0) {
    if (job >= nv) return;
    const int p = L + job;
    const int slot = p % a.W;
    T* wrow = win + (bh * a.W + slot) * a.D;
    if (p - a.W >= 0) {
      load_vec<P, DT>(x, wrow, a.D);
      __syncwarp();
      compress(p - a.W);
    }
    load_vec<P, DT>(x, src + (i64)job * st, a.D);
    store_vec<P, DT>(x, wrow, a.D);
  } else if (a.mode == 1) {
    const int base = L > a.W ? L - a.W : 0;
    const int q = base + job;
    if (q >= Lnew - a.W) return;
    if (q >= L) load_vec<P, DT>(x, src + (i64)(q - L) * st, a.D);
    else load_vec<P, DT>(x, win + (bh * a.W + (q % a.W)) * a.D, a.D);
    compress(q);
  } else {
    if (job >= nv) return;
    const int p = L + job;
    if (p < Lnew - a.W) return;
    load_vec<P, DT>(x, src + (i64)job * st, a.D);
    store_vec<P, DT>(x, win + (bh * a.W + (p % a.W)) * a.D, a.D);
  }
}

// ======================================================================
// Decode, split kernels.  Shared arguments.
// ======================================================================
struct SplitArgs {
  const void* q; i64 sqb, sqh;               // q [B, Hq, D] (element strides)
  const u8* kcodes; const u16* knorms; const u8* vcodes; const u16* vnorms;
  const int* lengths;
  const float* ksigns;                       // (2, P) key rotation signs
  const u32* ktab; const u32* vtab;          // fp16 look-up tables (mma kernel)
  const float* kcents; const float* vcents;  // float32 centroids (fma kernel)
  float* opart; float* mpart; float* lpart;  // [B, H, S, NREP, P], [B, H, S, NREP]
  i64 cap;
  int H, D, W, chunk, splits;
  float qscale;                              // softmax scale * log2(e)
  // finishing (see "Window block and finish" below)
  int* counters;                             // [B, H] arrivals, zero between calls
  float* wpart;                              // [B, H, wblocks, NREP, D + 2] window partials (o, m, l)
  const void* kwin; const void* vwin;        // [B, H, W, D] full-precision ring buffers
  const float* vsigns;                       // (2, P) value rotation signs
  void* out; i64 sob, soh;                   // [B, Hq, D] output (element strides)
  int wblocks;                               // window blocks per (kv head, sequence)
  int* steals;                               // [B, H] segments taken (tq_split_mmt), zero between
                                             // calls; null: the fixed schedule (deterministic)
};
#define TQ_SPLIT_PARAMS                                                                          \
  const void *q, i64 sqb, i64 sqh, const u8 *kcodes, const u16 *knorms, const u8 *vcodes,         \
      const u16 *vnorms, const int *lengths, const float *ksigns, const u32 *ktab_, const u32 *vtab_, \
      const float *kcents, const float *vcents, float *opart, float *mpart, float *lpart, i64 cap, \
      int H, int D, int W, int chunk, int splits, float qscale, int *counters, float *wpart,       \
      const void *kwin, const void *vwin, const float *vsigns, void *out, i64 sob, i64 soh, int wblocks, \
      int *steals
#define TQ_SPLIT_ARGS                                                                            \
  {q, sqb, sqh, kcodes, knorms, vcodes, vnorms, lengths, ksigns, ktab_, vtab_, kcents, vcents,   \
   opart, mpart, lpart, cap, H, D, W, chunk, splits, qscale, counters, wpart, kwin, vwin, vsigns, \
   out, sob, soh, wblocks, steals}

// The split kernels' arguments as one struct.  The out-of-line functions
// (window_block, split_done) take it by reference; a reference to the kernel's
// local copy would put that copy in local memory (232 bytes per thread, written
// at every block's start and read back through L1), so they get a block-wide
// copy in shared memory instead (TQ_SMEM_ARGS=0: the local copy, for A/B).
#ifndef TQ_SMEM_ARGS
#define TQ_SMEM_ARGS 1
#endif
#if TQ_SMEM_ARGS
#define TQ_FAR_ARGS(a, far)              \
  __shared__ SplitArgs far##_store;      \
  if (threadIdx.x == 0) far##_store = a; \
  __syncthreads();                       \
  const SplitArgs& far = far##_store
#else
#define TQ_FAR_ARGS(a, far) const SplitArgs& far = a
#endif

// Fast Walsh-Hadamard transform of one row of P floats held by a warp, lane l
// holding elements E l .. E l + E - 1 (E = P / 32): the butterflies of the
// reference, stride 1, 2, 4, ... (docs/FORMAT.md), x + y on the lower and x - y
// on the upper element, strides below E inside a lane, the others between lanes
// through shuffles.  No shared memory and no barrier: a block-wide version with
// a barrier after each of the 2 log2(P) stages cost ~2 us per rotation.
template <int P>
TQ_D void warp_fwht(float (&x)[P / 32]) {
  constexpr int E = P / 32;
  static_assert(E >= 1 && (E & (E - 1)) == 0, "P is a power of two >= 32");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int hh = 1; hh < E; hh <<= 1)
#pragma unroll
    for (int i = 0; i < E; ++i)
      if ((i & hh) == 0) {
        const float u = x[i], v = x[i + hh];
        x[i] = u + v;
        x[i + hh] = u - v;
      }
#pragma unroll
  for (int hl = 1; hl < 32; hl <<= 1) {
    const bool upper = lane & hl;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float o = __shfl_xor_sync(0xffffffffu, x[i], hl);
      x[i] = upper ? o - x[i] : x[i] + o;
    }
  }
}

// q of the group -> smem qs[NREP][P], rotated (pad, signs, FWHT twice, 1/P)
// and scaled by qscale; one warp per query head.  Block-wide; ends with a barrier.
// Out of line: inlined, it disturbed the register allocation of the tensor-core
// main loop (+25% instructions per tile in tq_split_mma).
template <int P, int NREP, int DT>
__device__ __noinline__ void rotate_queries(const SplitArgs& a, float* qs, int b, int h) {
  typedef typename Ty<DT>::raw T;
  constexpr int E = P / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* q = (const T*)a.q + b * a.sqb + (i64)h * NREP * a.sqh;
  const float f = a.qscale / P;
  for (int r = warp; r < NREP; r += blockDim.x >> 5) {
    float x[E];
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int j = E * lane + i;
      x[i] = j < a.D ? Ty<DT>::ld(q + r * a.sqh + j) * __ldg(a.ksigns + j) : 0.f;
    }
    warp_fwht<P>(x);
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] *= __ldg(a.ksigns + P + E * lane + i);
    warp_fwht<P>(x);
#pragma unroll
    for (int i = 0; i < E; ++i) qs[r * P + E * lane + i] = x[i] * f;
  }
  __syncthreads();
}

// ---------------------------------------------------------------- mma path
// resident blocks per SM the split kernel is compiled for (caps registers at 65536 / (128 * n))
#ifndef TQ_MMA_MINB
#define TQ_MMA_MINB 3
#endif
TQ_D void mma16816(float (&c)[4], const uint4& a, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
TQ_D u32 smem_addr(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}
// 16 bytes global -> shared (shared address dst), completing at a later cp_wait
TQ_D void cp16(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
TQ_D void cp_async16(void* dst, const void* src) { cp16(smem_addr(dst), src); }
TQ_D void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> TQ_D void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// TQ_TILE_SOURCE=1 (default): the split kernels request their tiles through TileSource
// (below); 0: the flat piece index.  tq.cuda passes every switch explicitly
// (tq/cuda/_build.py DECODE_DEFAULTS); these fallbacks serve other builds and must match.
#ifndef TQ_TILE_SOURCE
#define TQ_TILE_SOURCE 1
#endif
// tiles per segment of tq_split_mmt's tile streams (work stealing granularity)
#ifndef TQ_SEG_TILES
#define TQ_SEG_TILES 4
#endif
// TQ_STEAL=1: tq_split_mmt's warps take segments from a.steals when the host sets it
// (layout.py use_work_stealing; 0: always the fixed schedule, for A/B).
// TQ_SPLIT_INTERLEAVE=1: with a.steals set, split block id = s pairs + pair, so a pair's
// blocks are dispatched in different rounds of the SMs' slots (0: always id = pair splits
// + s, for A/B); see split_role.
#ifndef TQ_STEAL
#define TQ_STEAL 1
#endif
#ifndef TQ_SPLIT_INTERLEAVE
#define TQ_SPLIT_INTERLEAVE 1
#endif
#ifndef TQ_LATE_PREFETCH
#define TQ_LATE_PREFETCH 1
#endif
// A split warp's tile source: this lane's 16-byte pieces of a 16-token tile (key codes,
// value codes, then the key and value norms: 16 CK + 16 CV + 64 bytes, in that order in
// the pipeline stage).  The lane's pointers into its warp's first tile are computed once;
// a tile t rows further is one wide multiply-add per array and its pieces are immediate
// offsets.  (A flat piece index per lane, tested against the three array bounds at every
// tile, cost ~55 SASS instructions per tile of tq_split_mmt's main loop.)
//
// HOLES: the stages live in the unused upper halves of a look-up table whose entries are
// 256 bytes apart (TQ_PRMT_LUT): stage byte o is at hole_off<true>(o) past the stage's
// base, i.e. 128-byte runs 256 bytes apart.  A stage then takes 2 STRIDE bytes of address
// space, STRIDE = the tile rounded up to 128.  16-byte pieces never straddle a run.
template <bool HOLES>
TQ_HD constexpr u32 hole_off(u32 o) { return HOLES ? o + (o & ~127u) : o; }
template <int CK, int CV, int STAGES, int NG, bool HOLES = false>
struct TileSource {
  static constexpr u32 TILE_BYTES = 16 * CK + 16 * CV + 64;
  static constexpr u32 STRIDE = HOLES ? (TILE_BYTES + 127) / 128 * 128 : TILE_BYTES;  // stage pitch
  static constexpr u32 H = HOLES ? 2 : 1;  // address bytes per stage byte (at 128-byte granularity)
  static_assert(!HOLES || ((16 * CK) % 128 == 0 && (16 * CV) % 128 == 0), "value codes and norms start on 128-byte runs");
  const u8* k;  // key codes: piece lane + 32 u of the tile
  const u8* v;  // value codes: piece lane + 32 u
  const u8* n;  // lanes 0, 1: the key norms' pieces, lanes 2, 3: the value norms'
  u32 lane, spipe;  // spipe: this lane's first piece in stage 0 (shared address)
  // row: the warp's first tile (row of the (sequence, kv head) storage); pipe: its stages
  TQ_D TileSource(const SplitArgs& a, i64 row, u32 ln, const u8* pipe)
      : k(a.kcodes + row * CK + 16 * ln), v(a.vcodes + row * CV + 16 * ln),
        n(reinterpret_cast<const u8*>((ln < 2 ? a.knorms : a.vnorms) + row) + 16 * (ln & 1)),
        lane(ln), spipe(smem_addr(pipe) + hole_off<HOLES>(16u * ln)) {}
  // the warp's tile `it` (if below `tiles`) into its stage, then one commit group
  TQ_D void request(int it, int tiles) const {
    request_rows(it % STAGES, (u32)it * (NG * 16), it < tiles);
  }
  // the tile `rows` rows past the first one into stage `slot` (if valid), then one commit group
  TQ_D void request_rows(int slot, u32 rows, bool valid) const {
    if (valid) issue(spipe + (u32)slot * (H * STRIDE), rows);
    cp_commit();
  }
  // the tile `rows` rows past the first one into the stage at dst (its base plus this
  // lane's piece offset)
  TQ_D void issue(u32 dst, u32 rows) const {
    const u8* pk = k + (u64)rows * CK;
    const u8* pv = v + (u64)rows * CV;
#pragma unroll
    for (int u = 0; u < (CK + 31) / 32; ++u)
      if (CK % 32 == 0 || lane + 32 * u < (u32)CK) cp16(dst + H * 512u * u, pk + 512 * u);
#pragma unroll
    for (int u = 0; u < (CV + 31) / 32; ++u)
      if (CV % 32 == 0 || lane + 32 * u < (u32)CV) cp16(dst + H * (16u * CK + 512u * u), pv + 512 * u);
    if (lane < 4) cp16(dst + H * 16u * (CK + CV), n + (u64)rows * 2);
  }
};

// TQ_TRACE (benchmarks/probe_decode_latency.py only): thread 0 of each block stores
// %globaltimer at phase k in tq_trace[block][k]; compiled out otherwise.  Phases:
// 0 start, 1 tables built (split) / window partial done, 2 queries ready, 3 tiles
// done, 4 partial stored, 5 arrived, 6 finished, 7 empty split, window block: 8
// staged, 9 scored (with the softmax), 10 values; finish (warp 0): 11 weights'
// max, 12 split partials summed, 13 rotated back; 15: the block's SM + 1.
#ifdef TQ_TRACE
__device__ unsigned long long tq_trace[4096][16];
TQ_D void trace(int k) {
  if (threadIdx.x == 0 && blockIdx.x < 4096) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    tq_trace[blockIdx.x][k] = t;
    if (k == 0) {  // slot 15: the SM this block runs on, plus one (0 = no record)
      unsigned int sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      tq_trace[blockIdx.x][15] = sm + 1ull;
    }
  }
}
#else
TQ_D void trace(int) {}
#endif

// The 16 / sizeof(raw) elements of a 16-byte chunk of a full-precision row, as floats.
template <int WT>
TQ_D void chunk_floats(const uint4& c, float (&f)[16 / sizeof(typename Ty<WT>::raw)]) {
  const u32 w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (WT == 0) {
      f[i] = __uint_as_float(w[i]);
    } else if constexpr (WT == 2) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      const u16 lo = (u16)(w[i] & 0xffffu), hi = (u16)(w[i] >> 16);
      f[2 * i] = Ty<1>::ld(&lo);
      f[2 * i + 1] = Ty<1>::ld(&hi);
    }
  }
}

// ======================================================================
// Window blocks and finish.  The split grid ends with `wblocks` blocks per (kv
// head, sequence) (split_role); window block j attends over the window tokens
// [j WB, (j + 1) WB) (WB = window_tokens <= 32, chosen by layout.split_smem_plan)
// in the original space and stores o = sum p v, m and l per query head (wpart
// [B, H, wblocks, NREP, D + 2]).  Several short blocks rather than one per pair:
// at batch 1 a single 128-token window block was the launch's critical path
// (staging, scores and values one after the other, ~11 us at 4K tokens).
// Every block that wrote a partial then arrives on the (b, h) counter; the
// last to arrive merges the split partials (rotated space), rotates the value
// sum back once, adds the window partials, normalizes and writes the output,
// and resets the counter.  One launch per decode step, no reduce kernel.
// ======================================================================
TQ_D int window_tokens(const SplitArgs& a) { return a.W > 0 ? (a.W + a.wblocks - 1) / a.wblocks : 1; }
// Window blocks of sequence b that hold tokens; block 0 always reports (an empty
// window gives m = -inf, l = 0, o = 0), so every pair has at least one arrival.
TQ_D int wblocks_used(const SplitArgs& a, int b) {
  const int nw = min(a.lengths[b], a.W), wb = window_tokens(a);
  return max(1, (nw + wb - 1) / wb);
}
// Shared memory (layout.window_smem_bytes), float32, sections 16-byte aligned:
// qo [NREP][D4] | sw [NREP][32] | K [WB][DP] | V [WB][DP], D4 = D rounded up to 4
// (zero-padded), DP = D4 + 4: the lanes of a quarter-warp read K rows whose
// 16-byte pieces fall in different banks.
// The live window positions fill slots [0, min(L, W)) in ring order, and attention
// does not depend on the order of its tokens, so block j stages slots [j WB, (j + 1) WB)
// before the sequence length arrives (one L2 round trip less on its critical path)
// and masks the slots past min(L, W) afterwards.  Returns false, without writing a
// partial, for a block past the window's tokens (block 0 always writes one).
template <int NREP, int DT, int WT>
TQ_D bool window_partial(const SplitArgs& a, int b, int h, int j) {
  typedef typename Ty<DT>::raw QT;
  typedef typename Ty<WT>::raw WTT;
  constexpr int EPC = 16 / (int)sizeof(WTT);  // elements per 16-byte piece
  constexpr int RG = NREP < 8 ? NREP : 8;     // heads per pass of the value loop
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int D = a.D, D4 = (D + 3) & ~3, DP = D4 + 4;
  const int L = a.lengths[b];  // used only after the staging loads are issued
  const int WB = window_tokens(a), t0 = j * WB, ns = max(0, min(a.W - t0, WB));  // this block's slots
  const i64 bh = (i64)b * a.H + h;
  float* qo = reinterpret_cast<float*>(tq_smem);
  float* sw = qo + NREP * D4;
  float* ks = sw + NREP * 32;
  float* vs = ks + WB * DP;
  const WTT* kw = (const WTT*)a.kwin + bh * a.W * D;
  const WTT* vw = (const WTT*)a.vwin + bh * a.W * D;
  // stage this block's K and V rows as float32, and the scaled queries (all loads in flight together)
  if ((D * (int)sizeof(WTT)) % 16 == 0) {
    const int cpr = D / EPC;
#pragma unroll 4
    for (int i = tid; i < ns * cpr; i += 128) {
      const int t = i / cpr, c = i - t * cpr;
      const i64 row = t0 + t;
      const uint4 kq = __ldg(reinterpret_cast<const uint4*>(kw + row * D) + c);
      const uint4 vq = __ldg(reinterpret_cast<const uint4*>(vw + row * D) + c);
      float kf[EPC], vf[EPC];
      chunk_floats<WT>(kq, kf);
      chunk_floats<WT>(vq, vf);
#pragma unroll
      for (int e = 0; e < EPC; e += 4) {
        *reinterpret_cast<float4*>(ks + t * DP + c * EPC + e) = make_float4(kf[e], kf[e + 1], kf[e + 2], kf[e + 3]);
        *reinterpret_cast<float4*>(vs + t * DP + c * EPC + e) = make_float4(vf[e], vf[e + 1], vf[e + 2], vf[e + 3]);
      }
    }
  } else {  // rows not 16-byte aligned (odd head_dim): element copies, zero padding
    for (int i = tid; i < ns * D4; i += 128) {
      const int t = i / D4, d = i - t * D4;
      const i64 row = t0 + t;
      ks[t * DP + d] = d < D ? Ty<WT>::ld(kw + row * D + d) : 0.f;
      vs[t * DP + d] = d < D ? Ty<WT>::ld(vw + row * D + d) : 0.f;
    }
  }
  const QT* q = (const QT*)a.q + b * a.sqb + (i64)h * NREP * a.sqh;
  for (int i = tid; i < NREP * D4; i += 128) {
    const int r = i / D4, d = i - r * D4;
    qo[i] = d < D ? Ty<DT>::ld(q + r * a.sqh + d) * a.qscale : 0.f;
  }
  const int nt = max(0, min(min(L, a.W) - t0, WB));  // live tokens among this block's slots
  if (j > 0 && nt == 0) return false;
  __syncthreads();
  trace(8);
  // scores and softmax: warp r takes heads r, r + 4, ...; lane t scores token t
  float* wp = a.wpart + (bh * a.wblocks + j) * NREP * (D + 2);
  for (int r = warp; r < NREP; r += 4) {
    float s = TQ_NEG_INF;
    if (lane < nt) {
      const float4* kr = reinterpret_cast<const float4*>(ks + lane * DP);
      const float4* qr = reinterpret_cast<const float4*>(qo + r * D4);
      float acc0 = 0.f, acc1 = 0.f;
      int c = 0;
      for (; c + 2 <= D4 / 4; c += 2) {
        const float4 k0 = kr[c], q0 = qr[c], k1 = kr[c + 1], q1 = qr[c + 1];
        acc0 = fmaf(q0.x, k0.x, acc0); acc0 = fmaf(q0.y, k0.y, acc0);
        acc0 = fmaf(q0.z, k0.z, acc0); acc0 = fmaf(q0.w, k0.w, acc0);
        acc1 = fmaf(q1.x, k1.x, acc1); acc1 = fmaf(q1.y, k1.y, acc1);
        acc1 = fmaf(q1.z, k1.z, acc1); acc1 = fmaf(q1.w, k1.w, acc1);
      }
      if (c < D4 / 4) {
        const float4 k0 = kr[c], q0 = qr[c];
        acc0 = fmaf(q0.x, k0.x, acc0); acc0 = fmaf(q0.y, k0.y, acc0);
        acc0 = fmaf(q0.z, k0.z, acc0); acc0 = fmaf(q0.w, k0.w, acc0);
      }
      s = acc0 + acc1;
    }
    const float m = warp_max(s);
    const float p = lane < nt ? exp2f(s - m) : 0.f;
    const float l = warp_sum(p);
    sw[r * 32 + lane] = p;
    if (lane == 0) { wp[r * (D + 2) + D] = m; wp[r * (D + 2) + D + 1] = l; }
  }
  __syncthreads();
  trace(9);
  // values: thread d owns output dim d of every head
  for (int d = tid; d < D; d += 128) {
    for (int r0 = 0; r0 < NREP; r0 += RG) {
      float acc[RG];
#pragma unroll
      for (int g = 0; g < RG; ++g) acc[g] = 0.f;
#pragma unroll 4
      for (int t = 0; t < nt; ++t) {
        const float v = vs[t * DP + d];
#pragma unroll
        for (int g = 0; g < RG; ++g)
          if (r0 + g < NREP) acc[g] = fmaf(sw[(r0 + g) * 32 + t], v, acc[g]);
      }
#pragma unroll
      for (int g = 0; g < RG; ++g)
        if (r0 + g < NREP) wp[(r0 + g) * (D + 2) + d] = acc[g];
    }
  }
  trace(10);
  return true;
}

// The launch is one-dimensional: ids [0, splits * H * B) are split blocks (split
// fastest, then kv head, then sequence; with work stealing kv head fastest, then sequence,
// then split), the wblocks * H * B after them the window
// blocks (window block fastest), which the hardware then schedules last, behind
// the long split blocks.  s is the split or the window block index.
TQ_D bool split_role(const SplitArgs& a, int& s, int& h, int& b) {
  const int id = blockIdx.x;
  const int nsb = (int)(gridDim.x / (a.splits + a.wblocks)) * a.splits;  // gridDim.x = (splits + wblocks) H B
  if (id < nsb) {
    // Blocks are dispatched in id order, one round of the SMs' free slots after another,
    // and the warp schedulers favour the older blocks of an SM: at batch 8 on an H100 the
    // first round finished its tiles ~35 us before the last (docs/DECODE_KERNEL.md).  With
    // the splits of a pair `pairs` ids apart, every pair holds blocks of every round, and
    // work stealing (tq_split_mmt) evens the pairs out.
    if (TQ_SPLIT_INTERLEAVE && a.steals) {
      const int pairs = nsb / a.splits;
      const int pair = id % pairs;
      s = id / pairs;
      h = pair % a.H;
      b = pair / a.H;
    } else {
      s = id % a.splits;
      h = (id / a.splits) % a.H;
      b = id / (a.splits * a.H);
    }
    return true;
  }
  const int w = id - nsb;
  s = w % a.wblocks;
  h = (w / a.wblocks) % a.H;
  b = w / (a.wblocks * a.H);
  return false;
}

// Splits of sequence b that hold compressed tokens (the others exit at once).
TQ_D int splits_used(const SplitArgs& a, int b) {
  const int nc = max(0, a.lengths[b] - a.W);
  return (nc + a.chunk - 1) / a.chunk;
}

// Count this block's arrival for (b, h); true for the last of `expected` blocks.
// The barrier orders every thread's partial stores before thread 0's arrival, an
// acquire-release atomic at GPU scope: its release half publishes them (cumulative
// through the barrier), its acquire half makes the other blocks' partials visible
// to the last one, and the closing barrier passes that on to the whole block.
// (Was: a sequentially consistent fence in every thread, the atomic, then another
// fence in the last block.)
TQ_D bool arrive_last(const SplitArgs& a, int b, int h, int expected) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = a.counters + (i64)b * a.H + h;
    int prev;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(prev) : "l"(counter) : "memory");
    last = prev == expected - 1;
    if (last) {  // every block has arrived (and taken its last segment): ready for the next call
      *counter = 0;
      if (a.steals) a.steals[(i64)b * a.H + h] = 0;
    }
  }
  __syncthreads();
  return last;
}

// E = P / 32 consecutive floats from global memory through L2 (ld.global.cg: the
// partials were written by other blocks; never a stale L1 line).
template <int E>
TQ_D void ldcg_row(const float* p, float (&v)[E]) {
  if constexpr (E % 4 == 0) {
#pragma unroll
    for (int i = 0; i < E; i += 4) {
      const float4 t = __ldcg(reinterpret_cast<const float4*>(p + i));
      v[i] = t.x; v[i + 1] = t.y; v[i + 2] = t.z; v[i + 3] = t.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < E; i += 2) {
      const float2 t = __ldcg(reinterpret_cast<const float2*>(p + i));
      v[i] = t.x; v[i + 1] = t.y;
    }
  }
}

// One warp per query head r (nsv split and nwu window partials): the split and window weights (max over all
// partials), the weighted sum of the split partials in registers (lane l:
// elements E l ..), the inverse rotation (warp_fwht), the window partials, 1/L,
// the store.  No block barrier.  Every load that depends on nothing (this lane's
// split and window max and sum, the first SB split partials, the first NWR
// window partials) is issued before the first use: one L2 round trip where the
// weights, then the partials, then the window were three.  Shared memory: the
// split weights [NREP][splits], each row written and read by its own warp.
template <int P, int NREP, int OT>
TQ_D void finish(const SplitArgs& a, int b, int h, int nsv, int nwu) {
  typedef typename Ty<OT>::raw OTT;
  constexpr int E = P / 32;
  // SB splits at a time (64 registers; 2 round trips for 32 splits at P = 128)
  constexpr int SB = 64 / E < 8 ? 8 : 64 / E;
  constexpr int NWR = 4;  // window partials prefetched (ceil(128 / 32))
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 bh = (i64)b * a.H + h;
  const i64 pb = bh * a.splits * NREP;
  const int WP = a.D + 2;  // window partial pitch: o[D], m, l
  const float* wb = a.wpart + bh * a.wblocks * NREP * WP;
  OTT* out = (OTT*)a.out + b * a.sob + (i64)h * NREP * a.soh;
  for (int r = warp; r < NREP; r += blockDim.x >> 5) {
    float* wts = reinterpret_cast<float*>(tq_smem) + r * max(a.splits, 1);
    const float* mp = a.mpart + pb + r;  // split s: mp[s NREP]
    const float* lp = a.lpart + pb + r;
    const float* op = a.opart + (pb + r) * P + E * lane;  // split s: op + s NREP P
    const float* wr = wb + r * WP;                        // window block j: wr + j NREP WP
    // 1. independent loads
    const float ms = lane < nsv ? __ldcg(mp + lane * NREP) : TQ_NEG_INF;
    const float ls = lane < nsv ? __ldcg(lp + lane * NREP) : 0.f;
    const float mw = lane < nwu ? __ldcg(wr + (i64)lane * NREP * WP + a.D) : TQ_NEG_INF;
    const float lw = lane < nwu ? __ldcg(wr + (i64)lane * NREP * WP + a.D + 1) : 0.f;
    float v[SB][E];
#pragma unroll
    for (int u = 0; u < SB; ++u)
      if (u < nsv) ldcg_row<E>(op + (i64)u * NREP * P, v[u]);
    float sg0[E], sg1[E];  // value rotation signs of this lane's elements
#pragma unroll
    for (int i = 0; i < E; ++i) { sg0[i] = __ldg(a.vsigns + E * lane + i); sg1[i] = __ldg(a.vsigns + P + E * lane + i); }
    float wo[NWR][E];
#pragma unroll
    for (int jw = 0; jw < NWR; ++jw)
#pragma unroll
      for (int i = 0; i < E; ++i)
        wo[jw][i] = (jw < nwu && E * lane + i < a.D) ? __ldcg(wr + (i64)jw * NREP * WP + E * lane + i) : 0.f;
    // 2. weights (lanes past 32 splits or window blocks: a second pass, rare)
    float M = fmaxf(ms, mw);
    for (int s = lane + 32; s < nsv; s += 32) M = fmaxf(M, __ldcg(mp + s * NREP));
    for (int jw = lane + 32; jw < nwu; jw += 32) M = fmaxf(M, __ldcg(wr + (i64)jw * NREP * WP + a.D));
    M = warp_max(M);
    trace(11);
    const float ws = ms == TQ_NEG_INF ? 0.f : exp2f(ms - M);
    const float aw = mw == TQ_NEG_INF ? 0.f : exp2f(mw - M);  // lane j: window block j's weight
    if (lane < nsv) wts[lane] = ws;
    float Ls = ws * ls + aw * lw;
    for (int s = lane + 32; s < nsv; s += 32) {
      const float m2 = __ldcg(mp + s * NREP);
      const float w = m2 == TQ_NEG_INF ? 0.f : exp2f(m2 - M);
      wts[s] = w;
      Ls += w * __ldcg(lp + s * NREP);
    }
    for (int jw = lane + 32; jw < nwu; jw += 32) {
      const float m2 = __ldcg(wr + (i64)jw * NREP * WP + a.D);
      Ls += (m2 == TQ_NEG_INF ? 0.f : exp2f(m2 - M)) * __ldcg(wr + (i64)jw * NREP * WP + a.D + 1);
    }
    Ls = warp_sum(Ls);
    const float linv = Ls > 0.f ? 1.f / Ls : 0.f;
    __syncwarp();
    // 3. split partials: 4 partial sums per element (split s goes to sum s % 4)
    float x[E];
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = 0.f;
    if (nsv > 0) {
      float acc[4][E];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int i = 0; i < E; ++i) acc[u][i] = 0.f;
      for (int s0 = 0; s0 < nsv; s0 += SB) {
        if (s0 > 0) {
#pragma unroll
          for (int u = 0; u < SB; ++u)
            if (s0 + u < nsv) ldcg_row<E>(op + (i64)(s0 + u) * NREP * P, v[u]);
        }
#pragma unroll
        for (int u = 0; u < SB; ++u) {
          if (s0 + u < nsv) {
            const float w = wts[s0 + u];
#pragma unroll
            for (int i = 0; i < E; ++i) acc[u & 3][i] = fmaf(w, v[u][i], acc[u & 3][i]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < E; ++i)
        x[i] = (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]);
      trace(12);
      // inverse rotation: FWHT, signs 1, FWHT, signs 0 and 1/P
      warp_fwht<P>(x);
#pragma unroll
      for (int i = 0; i < E; ++i) x[i] *= sg1[i];
      warp_fwht<P>(x);
#pragma unroll
      for (int i = 0; i < E; ++i) x[i] *= sg0[i] * (1.0f / P);
    }
    trace(13);
    // 4. window partials, in block order
#pragma unroll
    for (int jw = 0; jw < NWR; ++jw) {
      const float w = __shfl_sync(0xffffffffu, aw, jw);
      if (jw < nwu)
#pragma unroll
        for (int i = 0; i < E; ++i) x[i] = fmaf(w, wo[jw][i], x[i]);
    }
    for (int jw = NWR; jw < nwu; ++jw) {
      const float w = __shfl_sync(0xffffffffu, aw, jw & 31);
      const float m2 = __ldcg(wr + (i64)jw * NREP * WP + a.D);
      const float wj = jw < 32 ? w : (m2 == TQ_NEG_INF ? 0.f : exp2f(m2 - M));
#pragma unroll
      for (int i = 0; i < E; ++i)
        if (E * lane + i < a.D) x[i] = fmaf(wj, __ldcg(wr + (i64)jw * NREP * WP + E * lane + i), x[i]);
    }
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int d = E * lane + i;
      if (d < a.D) out[r * a.soh + d] = Ty<OT>::cvt(x[i] * linv);
    }
  }
}

// The arrival of a block that wrote its partial (split or window block): the
// non-empty splits and window blocks are expected; the last one finishes.
// Not inlined, like window_block: kept out of the split kernels' main loop, whose
// register allocation and instruction count they would otherwise disturb (the
// SASS loop grew by ~15%).
template <int P, int NREP, int OT>
__device__ __noinline__ void split_done(const SplitArgs& a, int b, int h) {
  trace(4);
  // counted before the arrival, so the finishing block's first loads need no length
  const int nsv = splits_used(a, b), nwu = wblocks_used(a, b);
  const bool last = arrive_last(a, b, h, nsv + nwu);
  trace(5);
  if (last) {
    finish<P, NREP, OT>(a, b, h, nsv, nwu);
    trace(6);
  }
}
// A window block's whole job (blocks past the tokens of a short window write nothing).
template <int P, int NREP, int DT, int WT, int OT>
__device__ __noinline__ void window_block(const SplitArgs& a, int b, int h, int j) {
  if (!window_partial<NREP, DT, WT>(a, b, h, j)) return;
  trace(1);
  split_done<P, NREP, OT>(a, b, h);
}


// N bytes at p (aligned to the largest power of two <= 16 dividing N) -> words
template <int N>
TQ_D void load_seg(const u8* p, u32* w) {
  constexpr int A = (N % 16 == 0) ? 16 : (N % 8 == 0) ? 8 : (N % 4 == 0) ? 4 : (N % 2 == 0) ? 2 : 1;
  if constexpr (A == 16) {
#pragma unroll
    for (int i = 0; i < N / 16; ++i) {
      uint4 t = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = t.x; w[4 * i + 1] = t.y; w[4 * i + 2] = t.z; w[4 * i + 3] = t.w;
    }
  } else if constexpr (A == 8) {
#pragma unroll
    for (int i = 0; i < N / 8; ++i) {
      uint2 t = reinterpret_cast<const uint2*>(p)[i];
      w[2 * i] = t.x; w[2 * i + 1] = t.y;
    }
  } else if constexpr (A == 4) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) w[i] = reinterpret_cast<const u32*>(p)[i];
  } else if constexpr (A == 2) {
#pragma unroll
    for (int i = 0; i < (N + 3) / 4; ++i) w[i] = 0;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) w[i / 2] |= ((u32) reinterpret_cast<const u16*>(p)[i]) << (16 * (i & 1));
  } else {
#pragma unroll
    for (int i = 0; i < (N + 3) / 4; ++i) w[i] = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) w[i / 4] |= ((u32)p[i]) << (8 * (i & 3));
  }
  w[(N + 3) / 4] = 0;
}

// Byte offset of this lane's copy of look-up entry `field` (W bits at stream
// bit BIT of the words w): (field << S) | lane * 4.  Tables hold 32 copies of
// each entry (one per bank), so a warp's look-ups never conflict.  S = 7 packs the
// entries (128 bytes each); S = 8 (TQ_PRMT_LUT) spaces them 256 bytes apart, so that
// a byte-aligned 8-bit field becomes an offset in one byte permute (PRMT: the field's
// byte above lane * 4) instead of a shift and a mask.
#ifndef TQ_PRMT_LUT
#define TQ_PRMT_LUT 1
#endif
template <int W, int SH, int S>
TQ_D u32 lut_off_reg(u32 x, u32 lane4);
template <int W, int BIT, int S = 7>
TQ_D u32 lut_off(const u32* w, u32 lane4) {
  constexpr int wi = BIT >> 5, sh = BIT & 31;
  if constexpr (sh + W <= 32) {
    return lut_off_reg<W, sh, S>(w[wi], lane4);
  } else {
    constexpr u32 M = ((1u << W) - 1u) << S;
    return (tq_funnel(w[wi], w[wi + 1], sh - S) & M) | lane4;
  }
}
// same for a field already isolated in a register at bit SH
template <int W, int SH, int S = 7>
TQ_D u32 lut_off_reg(u32 x, u32 lane4) {
  constexpr u32 M = ((1u << W) - 1u) << S;
  if constexpr (S == 8 && W == 8 && SH % 8 == 0) return tq_prmt(x, lane4, 0x5504u | ((SH / 8) << 4));
  else if constexpr (SH >= S) return ((x >> (SH - S)) & M) | lane4;
  else return ((x << (S - SH)) & M) | lane4;
}
// compile-time loop: f(IC<I>{}) for I in [I0, N)
template <int V> struct IC { static constexpr int value = V; };
template <int I, int N, class F>
TQ_D void sfor(F& f) {
  if constexpr (I < N) {
    f(IC<I>{});
    sfor<I + 1, N>(f);
  }
}
__host__ __device__ constexpr int cmax(int x, int y) { return x > y ? x : y; }
// The lane index from %laneid.  The look-up offsets OR it into every table address;
// derived from threadIdx.x, ptxas rematerialized it as (4 tid) & 0x7c inside the
// main loop, one extra instruction per look-up (+25% per tile in tq_split_mma).
TQ_D u32 lane_id() {
  u32 r;
  asm("mov.u32 %0, %%laneid;" : "=r"(r));
  return r;
}
TQ_D u32 lut_ld(u32 off) { return *reinterpret_cast<const u32*>(tq_smem + off); }

// Pair table: entry e = half2 {c[e & (2^B - 1)], c[e >> B]} (two codes per
// look-up), 32 copies per entry, entries 2^S bytes apart (lut_off).  Block-wide.
template <int B, int S = 7>
TQ_D void fill_lut(u32* lut, const float* cents) {
  constexpr int NE = 1 << (2 * B);
  for (int i = threadIdx.x; i < NE * 8; i += blockDim.x) {
    const int e = i >> 3;
    const u32 v = pack_h2(cents[e & ((1 << B) - 1)], cents[e >> B]);
    reinterpret_cast<uint4*>(lut)[i + (S == 8 ? e << 3 : 0)] = make_uint4(v, v, v, v);
  }
}
// This thread's centroid for the pair tables: keys in threads [0, 2^KB), values in
// [32, 32 + 2^VB) (when VB != KB).  Loaded at the block's start, so the global
// round trip overlaps the other prologue loads.
template <int KB, int VB>
TQ_D float load_centroid(const float* __restrict__ kcents, const float* __restrict__ vcents) {
  static_assert(KB <= 4 && VB <= 4, "pair tables are built for up to 4 bits");
  const int tid = threadIdx.x;
  if (tid < (1 << KB)) return __ldg(kcents + tid);
  if (VB != KB && tid >= 32 && tid < 32 + (1 << VB)) return __ldg(vcents + tid - 32);
  return 0.f;
}
// The key table at smem, the value table at smem + voff (when VB != KB), from the
// centroids of load_centroid (staged in shared memory: reading them from global
// memory inside the fill loop put a round trip in every iteration, 16 for 4 bits;
// ncu: the largest long-scoreboard stall of a batch-1 launch).  Block-wide.
template <int KB, int VB, int S = 7>
TQ_D void build_luts(u8* smem, int voff, float cent) {
  __shared__ float cs[2][16];
  const int tid = threadIdx.x;
  if (tid < (1 << KB)) cs[0][tid] = cent;
  if (VB != KB && tid >= 32 && tid < 32 + (1 << VB)) cs[1][tid - 32] = cent;
  __syncthreads();
  fill_lut<KB, S>(reinterpret_cast<u32*>(smem), cs[0]);
  if constexpr (VB != KB) fill_lut<VB, S>(reinterpret_cast<u32*>(smem + voff), cs[1]);
}
template <int B> struct LutSize { static constexpr int bytes = (1 << (2 * B)) * 128; };

// A tensor-core split block's partial: the value sum, its NG token groups' sums
// (slices [NG][NREP][P], each already scaled to the block's max) added in group
// order by all threads at once, and per head the max and softmax sum over the
// groups (sm_m / sm_l [NG][16]).  (Adding the groups one warp at a time, with a
// barrier after each, cost ~5 us per block: half of a batch-1 launch at 4K.)
// Shared-memory index of element i of the token groups' sums [NG][NREP][P]: one
// float of padding after every 32.  The lanes of a warp store elements that lie a
// multiple of 32 floats apart (the accumulator fragments), so without padding
// they all hit one bank (16-way conflicts; ~1 us per block at batch 1).
__host__ __device__ constexpr int slice_at(int i) { return i + (i >> 5); }
template <int NREP, int P, int NG> struct SliceBytes { static constexpr int value = 4 * slice_at(NG * NREP * P); };

template <int P, int NREP, int NG>
TQ_D void store_block_partial(const SplitArgs& a, i64 bh, int s, const float* slices,
                              const float* sm_m, const float* sm_l) {
  const i64 ob = (bh * a.splits + s) * NREP;
  for (int i = threadIdx.x; i < NREP * P; i += blockDim.x) {
    float v = slices[slice_at(i)];
#pragma unroll
    for (int w = 1; w < NG; ++w) v += slices[slice_at(w * NREP * P + i)];
    a.opart[ob * P + i] = v;
  }
  if (threadIdx.x < NREP) {
    const int r = threadIdx.x;
    float M = TQ_NEG_INF, Lsum = 0.f;
    for (int w = 0; w < NG; ++w) M = fmaxf(M, sm_m[w * 16 + r]);
    for (int w = 0; w < NG; ++w) {
      const float mw = sm_m[w * 16 + r];
      if (mw != TQ_NEG_INF) Lsum += sm_l[w * 16 + r] * fast_exp2(mw - M);
    }
    a.mpart[ob + r] = M;
    a.lpart[ob + r] = Lsum;
  }
}

// Tensor-core split kernel: 4 warps; each warp walks 16-token tiles with a
// cp.async pipeline of its own, S = Q K^T and O += P V with mma.m16n8k16
// (fp16 operands, fp32 accumulators).  Coordinates and tokens are permuted
// inside a tile so every lane reads contiguous bytes (docs/DECODE_KERNEL.md).
// DSPLIT = 2 (P = 256): two warps share tiles, each owns half of the dims.
// LUT = 1: centroid pairs from a bank-replicated shared-memory table (v2);
// LUT = 0: byte-permute look-ups in registers (v1, integer-pipe bound).
template <int P, int KB, int VB, int NREP, int DSPLIT, int DT, int LUT, int WT, int OT>
__global__ void __launch_bounds__(128, TQ_MMA_MINB) tq_split_mma(TQ_SPLIT_PARAMS) {
  const SplitArgs a = TQ_SPLIT_ARGS;
  TQ_FAR_ARGS(a, far);
  constexpr int STAGES = 4;
  constexpr int CK = P * KB / 8, CV = P * VB / 8;
  constexpr int TILE_BYTES = 16 * CK + 16 * CV + 64;
  constexpr int SK = P * KB / 32;           // K segment bytes per lane (P/4 codes)
  constexpr int SV = P * VB / 64 / DSPLIT;  // V segment bytes per lane (P/8/DSPLIT codes)
  constexpr int NJ = P / 8 / DSPLIT;        // n-tiles of the output per warp
  constexpr int NG = 4 / DSPLIT;            // token groups in the block
  constexpr bool QREG = P <= 128;           // query fragments in registers
  constexpr int KLUT = LUT ? LutSize<KB>::bytes : 0;
  constexpr int VLUT_OFF = (LUT && VB != KB) ? KLUT : 0;
  constexpr int LUT_BYTES = LUT ? (KLUT + (VB != KB ? LutSize<VB>::bytes : 0)) : 0;
  static_assert(NREP <= 16, "mma path takes up to 16 query heads per kv head");
  u8* pipe = tq_smem + LUT_BYTES;                                          // 4 warps * STAGES * TILE_BYTES
  uint4* qf = reinterpret_cast<uint4*>(pipe + 4 * STAGES * TILE_BYTES);   // [P/16][32]
  // the token groups' sums [NG][NREP][P] reuse the region above at the end (layout.py)
  constexpr int HEAD = cmax(LUT_BYTES + 4 * STAGES * TILE_BYTES + (P / 16) * 32 * 16, SliceBytes<NREP, P, NG>::value);
  float* qs = reinterpret_cast<float*>(tq_smem + HEAD);                    // [NREP][P] rotated queries
  float* sm_m = qs + NREP * P;                                             // [NG][16]
  float* sm_l = sm_m + NG * 16;                                            // [NG][16]

  int s, h, b;
  trace(0);
  if (!split_role(a, s, h, b)) {
    window_block<P, NREP, DT, WT, OT>(far, b, h, s);
    return;
  }
  const float cent = LUT ? load_centroid<KB, VB>(a.kcents, a.vcents) : 0.f;
  const int len = a.lengths[b];  // used once the first tiles are in flight
  const int start = s * a.chunk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int tg = warp / DSPLIT, dh = warp % DSPLIT;
  const u32 lane4 = lane_id() * 4u;  // %laneid: not rematerialized from threadIdx (see lane_id)

  const i64 bh = (i64)b * a.H + h;
  u8* mypipe = pipe + warp * STAGES * TILE_BYTES;
  // The first tiles are requested before the sequence length arrives: this warp's tiles
  // of the chunk inside the allocation, trimmed to the live tokens below (one L2
  // round trip less before the main loop; tiles past them are never read).
  const int atiles = (int)((min((i64)a.chunk, a.cap - start) + 15) / 16);
  int mytiles = atiles > tg ? (atiles - tg + NG - 1) / NG : 0;

#if TQ_TILE_SOURCE
  const TileSource<CK, CV, STAGES, NG> src(a, bh * a.cap + start + 16 * tg, lane, mypipe);
  auto issue = [&](int it) { src.request(it, mytiles); };
#else
  const u8* kc = a.kcodes + bh * a.cap * CK;
  const u8* vc = a.vcodes + bh * a.cap * CV;
  const u16* kn = a.knorms + bh * a.cap;
  const u16* vn = a.vnorms + bh * a.cap;
  auto issue = [&](int it) {
    if (it < mytiles) {
      const int tok = start + 16 * (tg + it * NG);
      u8* st = mypipe + (it % STAGES) * TILE_BYTES;
      const u8* gk = kc + (i64)tok * CK;
      const u8* gv = vc + (i64)tok * CV;
      for (int i = lane; i < CK + CV + 4; i += 32) {
        const u8* src;
        if (i < CK) src = gk + 16 * i;
        else if (i < CK + CV) src = gv + 16 * (i - CK);
        else if (i < CK + CV + 2) src = reinterpret_cast<const u8*>(kn + tok) + 16 * (i - CK - CV);
        else src = reinterpret_cast<const u8*>(vn + tok) + 16 * (i - CK - CV - 2);
        cp_async16(st + 16 * i, src);
      }
    }
    cp_commit();
  };
#endif
  // the first tiles are in flight while the look-up tables and the queries are prepared
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) issue(i);
  const int nc = max(0, len - a.W);
  const int end = min(nc, start + a.chunk);
  if (start >= end) {  // empty split: let the requested tiles land before the block exits
    cp_wait<0>();
    trace(7);
    return;
  }
  {
    const int ntiles = (end - start + 15) / 16;
    mytiles = ntiles > tg ? (ntiles - tg + NG - 1) / NG : 0;
  }

  if constexpr (LUT) {
    build_luts<KB, VB>(tq_smem, VLUT_OFF, cent);
  }
  trace(1);
  rotate_queries<P, NREP, DT>(far, qs, b, h);
  for (int i = threadIdx.x; i < (P / 16) * 32; i += blockDim.x) {
    const int c = i / 32, ln = i % 32, gg = ln >> 2, tt = ln & 3;
    const int j = tt * (P / 4) + 4 * c;
    uint4 f;
    f.x = gg < NREP ? pack_h2(qs[gg * P + j], qs[gg * P + j + 1]) : 0u;
    f.y = gg + 8 < NREP ? pack_h2(qs[(gg + 8) * P + j], qs[(gg + 8) * P + j + 1]) : 0u;
    f.z = gg < NREP ? pack_h2(qs[gg * P + j + 2], qs[gg * P + j + 3]) : 0u;
    f.w = gg + 8 < NREP ? pack_h2(qs[(gg + 8) * P + j + 2], qs[(gg + 8) * P + j + 3]) : 0u;
    qf[i] = f;
  }
  u32 ktab[4], vtab[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) { ktab[i] = __ldg(a.ktab + i); vtab[i] = __ldg(a.vtab + i); }
  __syncthreads();
  trace(2);
  uint4 qreg[QREG ? P / 16 : 1];
  if constexpr (QREG) {
#pragma unroll
    for (int c = 0; c < P / 16; ++c) qreg[c] = qf[c * 32 + lane];
  }


  float acc[NJ][4];
#pragma unroll
  for (int j = 0; j < NJ; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m0 = TQ_NEG_INF, m1 = TQ_NEG_INF, l0 = 0.f, l1 = 0.f;

  for (int it = 0; it < mytiles; ++it) {
    cp_wait<STAGES - 2>();
    __syncwarp();
    issue(it + STAGES - 1);
    const u8* st = mypipe + (it % STAGES) * TILE_BYTES;
    const u8* sk = st;
    const u8* sv = st + 16 * CK;
    const u16* snk = reinterpret_cast<const u16*>(st + 16 * CK + 16 * CV);
    const u16* snv = snk + 16;
    const int tok0 = start + 16 * (tg + it * NG);
    const int nvld = min(16, end - tok0);

    // ---- scores S[head][token] for the 16 tokens (two n-tiles)
    float sc[2][4];
#pragma unroll
    for (int z = 0; z < 2; ++z) sc[z][0] = sc[z][1] = sc[z][2] = sc[z][3] = 0.f;
    {
      u32 wk[2][SK / 4 + 2];
#pragma unroll
      for (int z = 0; z < 2; ++z) {
        const int row = 4 * (g >> 1) + 2 * z + (g & 1);
        load_seg<SK>(sk + row * CK + t * SK, wk[z]);
      }
      auto kchunk = [&](auto ic) {   // 16-coordinate chunk c = code pairs 2c, 2c+1 of the lane
        constexpr int c = decltype(ic)::value;
        uint4 qa;
        if constexpr (QREG) qa = qreg[c]; else qa = qf[c * 32 + lane];
        // (for NREP <= 8 the fragment registers .y/.w already hold zeros: rows g + 8 of qf)
#pragma unroll
        for (int z = 0; z < 2; ++z) {
          u32 b0, b1;
          if constexpr (LUT) {
            b0 = lut_ld(lut_off<2 * KB, (2 * c) * 2 * KB>(wk[z], lane4));
            b1 = lut_ld(lut_off<2 * KB, (2 * c + 1) * 2 * KB>(wk[z], lane4));
          } else {
            constexpr int bit = (c / 2) * 8 * KB, wi = bit >> 5, sh = bit & 31;
            u32 x;
            if constexpr (sh + 8 * KB <= 32) x = wk[z][wi] >> sh;
            else x = tq_funnel(wk[z][wi], wk[z][wi + 1], sh);
            u32 hk[4];
            tq_lut8<KB>(x, ktab, hk);
            b0 = hk[2 * (c & 1)];
            b1 = hk[2 * (c & 1) + 1];
          }
          mma16816(sc[z], qa, b0, b1);
        }
      };
      sfor<0, P / 16>(kchunk);
    }
    // ---- scale by key norms, mask, online softmax (rows g and g + 8)
    float nk[4], nvv[4];
    {
      uint2 t2 = reinterpret_cast<const uint2*>(snk)[t];
      nk[0] = h2f(t2.x & 0xffff); nk[1] = h2f(t2.x >> 16); nk[2] = h2f(t2.y & 0xffff); nk[3] = h2f(t2.y >> 16);
      t2 = reinterpret_cast<const uint2*>(snv)[t];
      nvv[0] = h2f(t2.x & 0xffff); nvv[1] = h2f(t2.x >> 16); nvv[2] = h2f(t2.y & 0xffff); nvv[3] = h2f(t2.y >> 16);
    }
    float mx0 = TQ_NEG_INF, mx1 = TQ_NEG_INF;
#pragma unroll
    for (int z = 0; z < 2; ++z) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ti = 4 * t + 2 * z + (e & 1);
        const float v = ti < nvld ? sc[z][e] * nk[2 * z + (e & 1)] : TQ_NEG_INF;
        sc[z][e] = v;
        if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
      }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    if constexpr (NREP > 8) {
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    // rescale only when some row's running max moved (warp-uniform branch)
    if (__any_sync(0xffffffffu, mn0 > m0 || (NREP > 8 && mn1 > m1))) {
      const float al0 = fast_exp2(m0 - mn0), al1 = fast_exp2(m1 - mn1);
      l0 *= al0;
      l1 *= al1;
#pragma unroll
      for (int j = 0; j < NJ; ++j) { acc[j][0] *= al0; acc[j][1] *= al0; acc[j][2] *= al1; acc[j][3] *= al1; }
    }
    m0 = mn0; m1 = mn1;
    float pw[2][4];
#pragma unroll
    for (int z = 0; z < 2; ++z) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (NREP <= 8 && e >= 2) { pw[z][e] = 0.f; continue; }
        const int ti = 4 * t + 2 * z + (e & 1);
        const float p = fast_exp2(sc[z][e] - (e < 2 ? mn0 : mn1));
        if (e < 2) l0 += p; else l1 += p;
        pw[z][e] = ti < nvld ? p * nvv[2 * z + (e & 1)] : 0.f;
      }
    }
    uint4 pa;
    pa.x = pack_h2(pw[0][0], pw[0][1]);
    pa.y = NREP > 8 ? pack_h2(pw[0][2], pw[0][3]) : 0u;
    pa.z = pack_h2(pw[1][0], pw[1][1]);
    pa.w = NREP > 8 ? pack_h2(pw[1][2], pw[1][3]) : 0u;

    // ---- O += P' V over this warp's dims (tokens 4t .. 4t+3 of the tile)
    {
      u32 wv[4][(SV + 3) / 4 + 2];
#pragma unroll
      for (int r = 0; r < 4; ++r) load_seg<SV>(sv + (4 * t + r) * CV + g * (SV * DSPLIT) + dh * SV, wv[r]);
      if constexpr (LUT && VB == 3) {
        auto vpair = [&](auto ic) {
          constexpr int jp = decltype(ic)::value;
          const u32 A = lut_ld(VLUT_OFF + lut_off<6, 6 * jp>(wv[0], lane4));
          const u32 Bv = lut_ld(VLUT_OFF + lut_off<6, 6 * jp>(wv[1], lane4));
          const u32 C = lut_ld(VLUT_OFF + lut_off<6, 6 * jp>(wv[2], lane4));
          const u32 Dv = lut_ld(VLUT_OFF + lut_off<6, 6 * jp>(wv[3], lane4));
          mma16816(acc[2 * jp], pa, tq_prmt(A, Bv, 0x5410u), tq_prmt(C, Dv, 0x5410u));
          mma16816(acc[2 * jp + 1], pa, tq_prmt(A, Bv, 0x7632u), tq_prmt(C, Dv, 0x7632u));
        };
        sfor<0, NJ / 2>(vpair);
      } else if constexpr (LUT) {
        // interleave the codes of two tokens so one field = (token A, token B) of one dim
        constexpr int FW = 2 * VB, PER = 32 / FW;
        constexpr u32 MLO = VB == 4 ? 0x0f0f0f0fu : 0x33333333u;
        auto vword = [&](auto iw) {
          constexpr int wi = decltype(iw)::value;
          const u32 x01 = (wv[0][wi] & MLO) | ((wv[1][wi] << VB) & ~MLO);
          const u32 y01 = ((wv[0][wi] >> VB) & MLO) | (wv[1][wi] & ~MLO);
          const u32 x23 = (wv[2][wi] & MLO) | ((wv[3][wi] << VB) & ~MLO);
          const u32 y23 = ((wv[2][wi] >> VB) & MLO) | (wv[3][wi] & ~MLO);
          auto vfield = [&](auto ii) {
            constexpr int i = decltype(ii)::value;
            constexpr int jt = 2 * (wi * PER + i);
            if constexpr (jt < NJ) {
              mma16816(acc[jt], pa, lut_ld(VLUT_OFF + lut_off_reg<FW, FW * i>(x01, lane4)),
                       lut_ld(VLUT_OFF + lut_off_reg<FW, FW * i>(x23, lane4)));
              mma16816(acc[jt + 1], pa, lut_ld(VLUT_OFF + lut_off_reg<FW, FW * i>(y01, lane4)),
                       lut_ld(VLUT_OFF + lut_off_reg<FW, FW * i>(y23, lane4)));
            }
          };
          sfor<0, PER>(vfield);
        };
        sfor<0, (NJ / 2 + PER - 1) / PER>(vword);
      } else {
#pragma unroll
        for (int gi = 0; gi < NJ / 8; ++gi) {
          u32 hv[4][4];
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int bit = gi * 8 * VB, wi = bit >> 5, sh = bit & 31;
            const u32 x = (sh + 8 * VB <= 32) ? (wv[r][wi] >> sh) : tq_funnel(wv[r][wi], wv[r][wi + 1], sh);
            tq_lut8<VB>(x, vtab, hv[r]);
          }
#pragma unroll
          for (int xx = 0; xx < 4; ++xx) {
            mma16816(acc[gi * 8 + 2 * xx], pa, tq_prmt(hv[0][xx], hv[1][xx], 0x5410u), tq_prmt(hv[2][xx], hv[3][xx], 0x5410u));
            mma16816(acc[gi * 8 + 2 * xx + 1], pa, tq_prmt(hv[0][xx], hv[1][xx], 0x7632u), tq_prmt(hv[2][xx], hv[3][xx], 0x7632u));
          }
        }
      }
    }
  }
  cp_wait<0>();
  trace(3);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);

  // ---- merge the token groups of the block (deterministic order)
  __syncthreads();
  if (dh == 0 && t == 0) {
    sm_m[tg * 16 + g] = m0; sm_m[tg * 16 + g + 8] = m1;
    sm_l[tg * 16 + g] = l0; sm_l[tg * 16 + g + 8] = l1;
  }
  __syncthreads();
  float M0 = TQ_NEG_INF, M1 = TQ_NEG_INF;
#pragma unroll
  for (int w = 0; w < NG; ++w) { M0 = fmaxf(M0, sm_m[w * 16 + g]); M1 = fmaxf(M1, sm_m[w * 16 + g + 8]); }
  const float f0 = m0 == TQ_NEG_INF ? 0.f : fast_exp2(m0 - M0);
  const float f1 = m1 == TQ_NEG_INF ? 0.f : fast_exp2(m1 - M1);
  float* slices = reinterpret_cast<float*>(tq_smem);  // [NG][NREP][P] (slice_at), over the tables and pipeline
  const int sl0 = tg * NREP * P;
#pragma unroll
  for (int j = 0; j < NJ; ++j)  // accumulator rows: g (e < 2) and g + 8 (e >= 2, heads only if NREP > 8)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (g < NREP) slices[slice_at(sl0 + g * P + (2 * t + e) * (P / 8) + dh * NJ + j)] = acc[j][e] * f0;
  if constexpr (NREP > 8) {
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 2; e < 4; ++e)
        if (g + 8 < NREP) slices[slice_at(sl0 + (g + 8) * P + (2 * t + (e & 1)) * (P / 8) + dh * NJ + j)] = acc[j][e] * f1;
  }
  __syncthreads();
  store_block_partial<P, NREP, NG>(a, bh, s, reinterpret_cast<const float*>(tq_smem), sm_m, sm_l);
  split_done<P, NREP, OT>(far, b, h);
}

// ---------------------------------------------------------------- mmt path
// Transposed tensor-core split kernel ("heads on the n side").  With a few
// query heads per kv head (GQA), putting the heads on the m side of
// m16n8k16 (tq_split_mma) wastes 12 of its 16 rows: twice the mma and twice
// the accumulator registers that are needed.  Here the tokens and the dims
// take the 16-wide m side, the heads (up to 8 per n-tile) the n side:
//   S^T[token][head] = K Q^T    A = key centroids (16 tokens x 16 dims), B = Q^T
//   O^T[dim][head]  += V^T P^T  A = value centroids (16 dims x 16 tokens), B = P^T
// P^T is S^T's accumulator fragment transposed in registers (movmatrix), two
// instructions per tile.  Per 16-token tile and head n-tile: P/16 mma for the
// scores, P/16/DSPLIT for the values; accumulators 2 P/DSPLIT floats per lane.
// Look-ups (pair tables, bank-replicated) as in tq_split_mma.  STAGES: cp.async
// tiles per warp; MINB: resident blocks per SM the registers are capped for.
TQ_D u32 movm_trans(u32 x) {
  u32 r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

template <int P, int KB, int VB, int NREP, int DSPLIT, int DT, int WT, int OT, int STAGES, int MINB>
__global__ void __launch_bounds__(128, MINB) tq_split_mmt(TQ_SPLIT_PARAMS) {
  const SplitArgs a = TQ_SPLIT_ARGS;
  TQ_FAR_ARGS(a, far);
  constexpr int CK = P * KB / 8, CV = P * VB / 8;
  constexpr int TILE_BYTES = 16 * CK + 16 * CV + 64;
  constexpr int SK = P * KB / 32;           // key bytes per lane and row (P/4 codes)
  constexpr int NC = P / 8 / DSPLIT;        // value codes per lane and row
  constexpr int SV = NC * VB / 8;           // value bytes per lane and row
  constexpr int NM = NC / 2;                // m-tiles (16 dims) of O^T per warp
  constexpr int NH = (NREP + 7) / 8;        // n-tiles (8 heads)
  constexpr int NG = 4 / DSPLIT;            // token groups in the block
  constexpr bool QREG = P <= 128;           // query fragments in registers
  // PR (TQ_PRMT_LUT, 4-bit keys and values, or 2-bit values with TQ_PRMT_LUT=2, P <= 128,
  // up to 8 heads; layout.py mmt_prmt; 3 blocks per SM fit): the
  // key table's entries are 256 bytes apart (lut_off, S = 8), so every key look-up and
  // 4-bit value look-up is one PRMT.  The value table (2 bits) and the cp.async stages
  // fill the table's upper halves (TileSource, HOLES); the query fragments follow the
  // 64 KB table.
  constexpr bool PR = TQ_PRMT_LUT && TQ_TILE_SOURCE && KB == 4 && (VB == 4 || (VB == 2 && TQ_PRMT_LUT >= 2)) &&
                     P <= 128 && NREP <= 8;
  constexpr int LS = PR ? 8 : 7;            // log2 of a table entry's pitch
  using Stages = TileSource<CK, CV, STAGES, NG, PR>;  // the stages' layout (HOLES = PR)
  constexpr int HS = Stages::H;             // address bytes per stage byte
  constexpr int STRIDE = Stages::STRIDE;    // stage pitch
  constexpr int NVH = PR && VB != KB ? 1 << (2 * VB) : 0;  // value-table entries in the holes
  static_assert(!PR || NVH + 4 * STAGES * STRIDE / 128 <= 256, "value table and stages fit the key table's holes");
  static_assert(!PR || 128 % (2 * CV) == 0, "a lane's token pairs 2t, 2t + 1 share a 128-byte run");
  constexpr int KLUT = PR ? 256 * 256 : LutSize<KB>::bytes;
  constexpr int VLUT_OFF = VB != KB ? (PR ? 128 : KLUT) : 0;
  constexpr int LUT_BYTES = PR ? KLUT : KLUT + (VB != KB ? LutSize<VB>::bytes : 0);
  constexpr int PIPE_END = PR ? KLUT : LUT_BYTES + 4 * STAGES * TILE_BYTES;
  static_assert(NREP <= 16, "mmt path takes up to 16 query heads per kv head");
  static_assert(STAGES >= 2, "at least one tile in flight while one is computed");
  u8* pipe = PR ? tq_smem + 256 * NVH + 128 : tq_smem + LUT_BYTES;          // 4 warps * STAGES stages
  uint2* qf = reinterpret_cast<uint2*>(tq_smem + PIPE_END);                 // [P/16][NH][32]
  // the token groups' sums [NG][NREP][P] reuse the region above at the end (layout.py)
  constexpr int HEAD = cmax(PIPE_END + (P / 16) * NH * 32 * 8, SliceBytes<NREP, P, NG>::value);
  float* qs = reinterpret_cast<float*>(tq_smem + HEAD);                     // [NREP][P] rotated queries
  float* sm_m = qs + NREP * P;                                              // [NG][16]
  float* sm_l = sm_m + NG * 16;                                             // [NG][16]

  int s, h, b;
  trace(0);
  if (!split_role(a, s, h, b)) {
    window_block<P, NREP, DT, WT, OT>(far, b, h, s);
    return;
  }
  const float cent = load_centroid<KB, VB>(a.kcents, a.vcents);
  const int len = a.lengths[b];  // (its load overlaps the centroids')
  const int start = s * a.chunk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int tg = warp / DSPLIT, dh = warp % DSPLIT;
  const u32 lane4 = lane_id() * 4u;  // %laneid: not rematerialized from threadIdx (see lane_id)

  const i64 bh = (i64)b * a.H + h;
  u8* mypipe = pipe + warp * STAGES * (HS * STRIDE);
#if TQ_TILE_SOURCE
  // Each warp streams segments of SEG consecutive tiles of its (sequence, kv head): its
  // first one is segment s NG + tg, the next ones come from the pair's counter (a.steals:
  // warps that run faster take more, so the pair's blocks finish together; measured on an
  // H100 at batch 8, the static split blocks of an SM finished up to 35 us apart, docs/
  // DECODE_KERNEL.md) or, without it, every NW-th segment (a fixed schedule: deterministic
  // sums).  Tiles are requested while they lie inside the allocation and, once the length
  // is known, the live tokens (TQ_LATE_PREFETCH=0 requests the first before it arrives).
  constexpr int SEG = TQ_SEG_TILES;
  static_assert(STAGES - 1 < SEG, "the issue side runs less than one segment ahead");
  // (DSPLIT = 2: the two warps of a token group share its tiles, so the fixed schedule)
  int* const stl = TQ_STEAL && DSPLIT == 1 ? a.steals : nullptr;
  const Stages src(a, bh * a.cap, lane, mypipe);
  int iseg = s * NG + tg;          // segment of the issue position
  int nxt = 0;                     // lane 0: the segment after iseg (taken ahead)
  int nw = 0;                      // warps of the pair (known with the length)
  int ntl = (int)((a.cap + 15) / 16);  // valid tiles: the allocation's, then the live ones
  auto issue = [&](int pos) {
    if (pos % SEG == 0 && pos > 0) {
      if (stl) {
        iseg = __shfl_sync(0xffffffffu, nxt, 0);
        if (lane == 0) nxt = nw + atomicAdd(stl + bh, 1);
      } else {
        iseg += nw;
      }
    }
    const int tile = iseg * SEG + pos % SEG;
    src.request_rows(pos % STAGES, 16u * (u32)tile, tile < ntl);
  };
#else
  const int atiles = (int)((min((i64)a.chunk, a.cap - start) + 15) / 16);
  int mytiles = atiles > tg ? (atiles - tg + NG - 1) / NG : 0;
  // every lane copies 16-byte pieces of its warp's tiles; the sources are 64-bit
  // bases plus 32-bit offsets, so one copy costs an add and a wide multiply-add
  static_assert(!PR, "the table-hole pipeline takes TileSource");
  constexpr int NCHUNK = CK + CV + 4;  // 16-byte pieces per tile: key codes, value codes, norms
  const i64 row0 = bh * a.cap + start + 16 * tg;
  const u8* gk = a.kcodes + row0 * CK;
  const u8* gv = a.vcodes + row0 * CV;
  const u8* gkn = reinterpret_cast<const u8*>(a.knorms + row0);
  const u8* gvn = reinterpret_cast<const u8*>(a.vnorms + row0);
  const u32 spipe = smem_addr(mypipe) + 16u * lane;  // this lane's first piece in stage 0
  auto issue = [&](int it) {
    if (it < mytiles) {
      const u32 tk = (u32)it * (NG * 16);  // tokens past this warp's first tile
      const u32 dst = spipe + (u32)(it % STAGES) * TILE_BYTES;
#pragma unroll
      for (int u = 0; u < (NCHUNK + 31) / 32; ++u) {
        const int i = lane + 32 * u;
        if (i < NCHUNK) {
          const u8* src;
          if (i < CK) src = gk + (tk * CK + 16u * i);
          else if (i < CK + CV) src = gv + (tk * CV + 16u * (i - CK));
          else if (i < CK + CV + 2) src = gkn + (tk * 2u + 16u * (i - CK - CV));
          else src = gvn + (tk * 2u + 16u * (i - CK - CV - 2));
          cp16(dst + 512u * u, src);
        }
      }
    }
    cp_commit();
  };
#endif
  // TQ_LATE_PREFETCH: when the first tiles are requested.  0: here, before the length and
  // the centroids arrive (their loads then wait behind the SM's tile requests); 1
  // (default): once the tables are built; 2: after the query fragments.  Side by side on
  // an H100 (decode_prefetch_variants_h100.md) 1 was 0-6% faster than 0 on every mmt grid.
  auto prologue = [&]() {
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) issue(i);
  };
  if (TQ_LATE_PREFETCH == 0) prologue();
  const int nc = max(0, len - a.W);
  const int end = min(nc, start + a.chunk);
  if (start >= end) {  // empty split: let the requested tiles land before the block exits
    cp_wait<0>();
    trace(7);
    return;
  }
#if TQ_TILE_SOURCE
  ntl = (nc + 15) / 16;
  nw = ((nc + a.chunk - 1) / a.chunk) * NG;  // the blocks past the live splits exited above
  if (stl && lane == 0) nxt = nw + atomicAdd(stl + bh, 1);
#else
  {
    const int ntiles = (end - start + 15) / 16;
    mytiles = ntiles > tg ? (ntiles - tg + NG - 1) / NG : 0;
  }
#endif

  build_luts<KB, VB, LS>(tq_smem, VLUT_OFF, cent);
  if (TQ_LATE_PREFETCH == 1) prologue();
  trace(1);
  rotate_queries<P, NREP, DT>(far, qs, b, h);
  // B fragments of Q^T: k = dims t P/4 + 4c + {0,1 | 2,3}, n = head 8 nh + g
  for (int i = threadIdx.x; i < (P / 16) * NH * 32; i += blockDim.x) {
    const int ln = i & 31, cn = i >> 5, c = cn / NH, nh = cn % NH;
    const int head = 8 * nh + (ln >> 2);
    const int j = (ln & 3) * (P / 4) + 4 * c;
    uint2 f;
    f.x = head < NREP ? pack_h2(qs[head * P + j], qs[head * P + j + 1]) : 0u;
    f.y = head < NREP ? pack_h2(qs[head * P + j + 2], qs[head * P + j + 3]) : 0u;
    qf[i] = f;
  }
  __syncthreads();
  if (TQ_LATE_PREFETCH == 2) prologue();
  trace(2);
  uint2 qreg[QREG ? (P / 16) * NH : 1];
  if constexpr (QREG) {
#pragma unroll
    for (int i = 0; i < (P / 16) * NH; ++i) qreg[i] = qf[i * 32 + lane];
  }

  // acc[nh][m][e]: dim 2m + (e >> 1) of this lane's codes, head 8 nh + 2t + (e & 1)
  float acc[NH][NM][4];
#pragma unroll
  for (int nh = 0; nh < NH; ++nh)
#pragma unroll
    for (int m = 0; m < NM; ++m) acc[nh][m][0] = acc[nh][m][1] = acc[nh][m][2] = acc[nh][m][3] = 0.f;
  float mrun[NH][2], lrun[NH][2];  // heads 8 nh + 2t + c: running max, lane-partial sum
#pragma unroll
  for (int nh = 0; nh < NH; ++nh) { mrun[nh][0] = mrun[nh][1] = TQ_NEG_INF; lrun[nh][0] = lrun[nh][1] = 0.f; }

  // this lane's key rows g, g + 8 and value rows 2t (+ 1, 8, 9) in a stage (hole_off)
  const u32 koff = hole_off<PR>(g * CK + t * SK);
  const u32 voff = hole_off<PR>((2 * t) * CV + g * (SV * DSPLIT) + dh * SV);
#if TQ_TILE_SOURCE
  int cseg = iseg;  // segment of the computed position (the issue side is in it at its start)
  for (int it = 0;; ++it) {
#else
  for (int it = 0; it < mytiles; ++it) {
#endif
    cp_wait<STAGES - 2>();
    __syncwarp();  // the tile's pieces from every lane have landed; the refilled stage is consumed
    issue(it + STAGES - 1);
#if TQ_TILE_SOURCE
    if (it % SEG == 0) cseg = iseg;
    const int tile = cseg * SEG + it % SEG;
    if (tile >= ntl) break;  // segments only grow: nothing of this warp's is left
    const int nvld = min(16, nc - 16 * tile);
#else
    const int nvld = min(16, end - (start + 16 * (tg + it * NG)));
#endif
    const u8* st = mypipe + (it % STAGES) * (HS * STRIDE);
    const u8* sk = st + koff;
    const u8* sv = st + HS * 16 * CK + voff;
    const u16* snk = reinterpret_cast<const u16*>(st + HS * (16 * CK + 16 * CV));
    const u16* snv = snk + 16;

    // ---- S^T: tokens g and g + 8 of the tile, heads 8 nh + 2t + {0, 1}
    float sc[NH][4];
#pragma unroll
    for (int nh = 0; nh < NH; ++nh) sc[nh][0] = sc[nh][1] = sc[nh][2] = sc[nh][3] = 0.f;
    {
      u32 wk[2][SK / 4 + 2];
      load_seg<SK>(sk, wk[0]);
      load_seg<SK>(sk + HS * 8 * CK, wk[1]);
      auto kchunk = [&](auto ic) {  // dims t P/4 + 4c .. + 3: code pairs 2c, 2c + 1 of the lane
        constexpr int c = decltype(ic)::value;
        uint4 ka;
        ka.x = lut_ld(lut_off<2 * KB, (2 * c) * 2 * KB, LS>(wk[0], lane4));
        ka.y = lut_ld(lut_off<2 * KB, (2 * c) * 2 * KB, LS>(wk[1], lane4));
        ka.z = lut_ld(lut_off<2 * KB, (2 * c + 1) * 2 * KB, LS>(wk[0], lane4));
        ka.w = lut_ld(lut_off<2 * KB, (2 * c + 1) * 2 * KB, LS>(wk[1], lane4));
#pragma unroll
        for (int nh = 0; nh < NH; ++nh) {
          uint2 qb;
          if constexpr (QREG) qb = qreg[c * NH + nh]; else qb = qf[(c * NH + nh) * 32 + lane];
          mma16816(sc[nh], ka, qb.x, qb.y);
        }
      };
      sfor<0, P / 16>(kchunk);
    }
    // ---- key norms, mask, online softmax per head (column)
    const float nk0 = h2f(snk[g]), nk1 = h2f(snk[g + 8]);
    const float nv0 = h2f(snv[g]), nv1 = h2f(snv[g + 8]);
    const bool ok0 = g < nvld, ok1 = g + 8 < nvld;
    // The running max moves only if some lane holds a score above it: that test is
    // lane-local, and only then are the maxima reduced over the 8 lanes of a head and
    // the sums rescaled (the result equals rescaling at every tile).
    float mx[NH][2];
    bool up = false;
#pragma unroll
    for (int nh = 0; nh < NH; ++nh) {
      sc[nh][0] = ok0 ? sc[nh][0] * nk0 : TQ_NEG_INF;
      sc[nh][1] = ok0 ? sc[nh][1] * nk0 : TQ_NEG_INF;
      sc[nh][2] = ok1 ? sc[nh][2] * nk1 : TQ_NEG_INF;
      sc[nh][3] = ok1 ? sc[nh][3] * nk1 : TQ_NEG_INF;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        mx[nh][c] = fmaxf(sc[nh][c], sc[nh][c + 2]);
        up = up || mx[nh][c] > mrun[nh][c];
      }
    }
    if (__any_sync(0xffffffffu, up)) {
#pragma unroll
      for (int nh = 0; nh < NH; ++nh) {
        float al[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float v = mx[nh][c];
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
          v = fmaxf(mrun[nh][c], v);
          al[c] = fast_exp2(mrun[nh][c] - v);
          mrun[nh][c] = v;
          lrun[nh][c] *= al[c];
        }
#pragma unroll
        for (int m = 0; m < NM; ++m) { acc[nh][m][0] *= al[0]; acc[nh][m][1] *= al[1]; acc[nh][m][2] *= al[0]; acc[nh][m][3] *= al[1]; }
      }
    }
    u32 pb0[NH], pb1[NH];  // B fragments of P^T (tokens x heads), value norms folded in
#pragma unroll
    for (int nh = 0; nh < NH; ++nh) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[e] = fast_exp2(sc[nh][e] - mrun[nh][e & 1]);
        lrun[nh][e & 1] += p[e];
      }
      pb0[nh] = movm_trans(pack_h2(ok0 ? p[0] * nv0 : 0.f, ok0 ? p[1] * nv0 : 0.f));
      pb1[nh] = movm_trans(pack_h2(ok1 ? p[2] * nv1 : 0.f, ok1 ? p[3] * nv1 : 0.f));
    }

    // ---- O^T += V^T P^T: tokens 2t, 2t + 1, 2t + 8, 2t + 9; this lane's NC codes of each
    {
      u32 wv[4][(SV + 3) / 4 + 2];
      load_seg<SV>(sv, wv[0]);
      load_seg<SV>(sv + CV, wv[1]);  // same 128-byte run as token 2t (PR)
      load_seg<SV>(sv + HS * 8 * CV, wv[2]);
      load_seg<SV>(sv + HS * 8 * CV + CV, wv[3]);
      if constexpr (VB == 3) {
        // pair table of two dims of one token; prmt regroups them per dim
        auto vpair = [&](auto ic) {
          constexpr int m = decltype(ic)::value;
          const u32 A = lut_ld(VLUT_OFF + lut_off<6, 6 * m>(wv[0], lane4));
          const u32 Bv = lut_ld(VLUT_OFF + lut_off<6, 6 * m>(wv[1], lane4));
          const u32 C = lut_ld(VLUT_OFF + lut_off<6, 6 * m>(wv[2], lane4));
          const u32 Dv = lut_ld(VLUT_OFF + lut_off<6, 6 * m>(wv[3], lane4));
          const uint4 va = make_uint4(tq_prmt(A, Bv, 0x5410u), tq_prmt(A, Bv, 0x7632u),
                                      tq_prmt(C, Dv, 0x5410u), tq_prmt(C, Dv, 0x7632u));
#pragma unroll
          for (int nh = 0; nh < NH; ++nh) mma16816(acc[nh][m], va, pb0[nh], pb1[nh]);
        };
        sfor<0, NM>(vpair);
      } else {
        // interleave two tokens' codes so one field = (token A, token B) of one dim
        constexpr int FW = 2 * VB, PER = 32 / FW;
        constexpr u32 MLO = VB == 4 ? 0x0f0f0f0fu : 0x33333333u;
        static_assert(VB == 2 || VB == 4, "value bits 2, 3 or 4");
        auto vword = [&](auto iw) {
          constexpr int wi = decltype(iw)::value;
          const u32 x01 = (wv[0][wi] & MLO) | ((wv[1][wi] << VB) & ~MLO);
          const u32 y01 = ((wv[0][wi] >> VB) & MLO) | (wv[1][wi] & ~MLO);
          const u32 x23 = (wv[2][wi] & MLO) | ((wv[3][wi] << VB) & ~MLO);
          const u32 y23 = ((wv[2][wi] >> VB) & MLO) | (wv[3][wi] & ~MLO);
          auto vfield = [&](auto ii) {
            constexpr int i = decltype(ii)::value;
            constexpr int m = wi * PER + i;
            if constexpr (m < NM) {
              const uint4 va = make_uint4(lut_ld(VLUT_OFF + lut_off_reg<FW, FW * i, LS>(x01, lane4)),
                                          lut_ld(VLUT_OFF + lut_off_reg<FW, FW * i, LS>(y01, lane4)),
                                          lut_ld(VLUT_OFF + lut_off_reg<FW, FW * i, LS>(x23, lane4)),
                                          lut_ld(VLUT_OFF + lut_off_reg<FW, FW * i, LS>(y23, lane4)));
#pragma unroll
              for (int nh = 0; nh < NH; ++nh) mma16816(acc[nh][m], va, pb0[nh], pb1[nh]);
            }
          };
          sfor<0, PER>(vfield);
        };
        sfor<0, (NM + PER - 1) / PER>(vword);
      }
    }
  }
  cp_wait<0>();
  trace(3);
#pragma unroll
  for (int nh = 0; nh < NH; ++nh)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float l = lrun[nh][c];
      l += __shfl_xor_sync(0xffffffffu, l, 4);
      l += __shfl_xor_sync(0xffffffffu, l, 8);
      l += __shfl_xor_sync(0xffffffffu, l, 16);
      lrun[nh][c] = l;
    }

  // ---- merge the token groups of the block (deterministic order)
  __syncthreads();
  if (dh == 0 && g == 0) {
#pragma unroll
    for (int nh = 0; nh < NH; ++nh)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        sm_m[tg * 16 + 8 * nh + 2 * t + c] = mrun[nh][c];
        sm_l[tg * 16 + 8 * nh + 2 * t + c] = lrun[nh][c];
      }
  }
  __syncthreads();
  float fsc[NH][2];
#pragma unroll
  for (int nh = 0; nh < NH; ++nh)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float M = TQ_NEG_INF;
#pragma unroll
      for (int w = 0; w < NG; ++w) M = fmaxf(M, sm_m[w * 16 + 8 * nh + 2 * t + c]);
      fsc[nh][c] = mrun[nh][c] == TQ_NEG_INF ? 0.f : fast_exp2(mrun[nh][c] - M);
    }
  float* slices = reinterpret_cast<float*>(tq_smem);  // [NG][NREP][P] (slice_at), over the tables and pipeline
  const int sl0 = tg * NREP * P;
#pragma unroll
  for (int nh = 0; nh < NH; ++nh)
#pragma unroll
    for (int m = 0; m < NM; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int head = 8 * nh + 2 * t + (e & 1);
        if (head < NREP) slices[slice_at(sl0 + head * P + g * (P / 8) + dh * NC + 2 * m + (e >> 1))] = acc[nh][m][e] * fsc[nh][e & 1];
      }
  __syncthreads();
  store_block_partial<P, NREP, NG>(a, bh, s, reinterpret_cast<const float*>(tq_smem), sm_m, sm_l);
  split_done<P, NREP, OT>(far, b, h);
}

// ---------------------------------------------------------------- fma path
// Plain float32 split kernel (the precise path and the reference for the
// mma kernel): 128 threads, 128-token tiles; scores one token per thread,
// values one coordinate per thread.
template <int P, int KB, int VB, int NREP, int DT, int WT, int OT>
__global__ void __launch_bounds__(128, 4) tq_split_fma(TQ_SPLIT_PARAMS) {
  const SplitArgs a = TQ_SPLIT_ARGS;
  TQ_FAR_ARGS(a, far);
  constexpr int CK = P * KB / 8, CV = P * VB / 8;
  constexpr int TILE = 128;
  constexpr int JU = (P + 127) / 128;
  u8* smem = tq_smem;
  float* qs = reinterpret_cast<float*>(smem);   // [NREP][P]
  float* qT = qs + NREP * P;                      // [P][NREP]
  float* sc = qT + NREP * P;                      // [NREP][TILE]
  float* pw = sc + NREP * TILE;                   // [TILE][NREP]
  float* mrun = pw + NREP * TILE;                 // [NREP]
  float* lrun = mrun + NREP;                      // [NREP]
  float* alpha = lrun + NREP;                     // [NREP]
  float* cks = alpha + NREP;                      // [16]
  float* cvs = cks + 16;                          // [16]
  u32* vt = reinterpret_cast<u32*>(cvs + 16);     // [TILE][CV/4] + 1

  int s, h, b;
  trace(0);
  if (!split_role(a, s, h, b)) {
    window_block<P, NREP, DT, WT, OT>(far, b, h, s);
    return;
  }
  const int nc = max(0, a.lengths[b] - a.W);
  const int start = s * a.chunk;
  const int end = min(nc, start + a.chunk);
  if (start >= end) {
    trace(7);
    return;
  }
  const int tid = threadIdx.x;
  rotate_queries<P, NREP, DT>(far, qs, b, h);
  for (int i = tid; i < NREP * P; i += 128) qT[(i % P) * NREP + i / P] = qs[i];
  if (tid < (1 << KB)) cks[tid] = a.kcents[tid];
  if (tid < (1 << VB)) cvs[tid] = a.vcents[tid];
  if (tid < NREP) { mrun[tid] = TQ_NEG_INF; lrun[tid] = 0.f; }
  __syncthreads();

  const i64 bh = (i64)b * a.H + h;
  const u8* kc = a.kcodes + bh * a.cap * CK;
  const u8* vc = a.vcodes + bh * a.cap * CV;
  const u16* kn = a.knorms + bh * a.cap;
  const u16* vn = a.vnorms + bh * a.cap;
  float acc[NREP][JU];
#pragma unroll
  for (int r = 0; r < NREP; ++r)
#pragma unroll
    for (int u = 0; u < JU; ++u) acc[r][u] = 0.f;

  for (int t0 = start; t0 < end; t0 += TILE) {
    const int nt = min(TILE, end - t0);
    // scores
    {
      float sr[NREP];
#pragma unroll
      for (int r = 0; r < NREP; ++r) sr[r] = 0.f;
      if (tid < nt) {
        const u32* row = reinterpret_cast<const u32*>(kc + (i64)(t0 + tid) * CK);
        for (int gi = 0; gi < P / 8; ++gi) {
          const int bit = gi * 8 * KB, wi = bit >> 5, sh = bit & 31;
          const u32 w0 = row[wi];
          const u32 w1 = (sh + 8 * KB > 32) ? row[wi + 1] : 0u;
          const u32 x = tq_funnel(w0, w1, sh);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float c = cks[(x >> (KB * i)) & ((1 << KB) - 1)];
            const int j = gi * 8 + i;
#pragma unroll
            for (int r = 0; r < NREP; ++r) sr[r] = fmaf(qT[j * NREP + r], c, sr[r]);
          }
        }
        const float nk = h2f(kn[t0 + tid]);
#pragma unroll
        for (int r = 0; r < NREP; ++r) sc[r * TILE + tid] = sr[r] * nk;
      } else {
#pragma unroll
        for (int r = 0; r < NREP; ++r) sc[r * TILE + tid] = TQ_NEG_INF;
      }
      // stage the value codes of the tile
      for (int i = tid; i < nt * (CV / 4); i += 128)
        vt[i] = reinterpret_cast<const u32*>(vc + (i64)t0 * CV)[i];
      if (tid == 0) vt[nt * (CV / 4)] = 0u;
    }
    __syncthreads();
    // softmax bookkeeping, one warp per head
    const int warp = tid >> 5, lane = tid & 31;
    for (int r = warp; r < NREP; r += 4) {
      float mx = TQ_NEG_INF;
      for (int i = lane; i < TILE; i += 32) mx = fmaxf(mx, sc[r * TILE + i]);
      mx = warp_max(mx);
      const float mo = mrun[r];
      const float mn = fmaxf(mo, mx);
      float ls = 0.f;
      for (int i = lane; i < TILE; i += 32) {
        const float p = exp2f(sc[r * TILE + i] - mn);
        ls += p;
        pw[i * NREP + r] = i < nt ? p * h2f(vn[t0 + i]) : 0.f;
      }
      ls = warp_sum(ls);
      __syncwarp();
      if (lane == 0) {
        const float al = exp2f(mo - mn);
        alpha[r] = al;
        mrun[r] = mn;
        lrun[r] = lrun[r] * al + ls;
      }
    }
    __syncthreads();
    // values
#pragma unroll
    for (int u = 0; u < JU; ++u) {
      const int j = tid + 128 * u;
      if (j < P) {
#pragma unroll
        for (int r = 0; r < NREP; ++r) acc[r][u] *= alpha[r];
        const int bit = j * VB, wi = bit >> 5, sh = bit & 31;
        for (int i = 0; i < nt; ++i) {
          const u32* row = vt + i * (CV / 4);
          const u32 x = tq_funnel(row[wi], row[wi + 1], sh);
          const float c = cvs[x & ((1 << VB) - 1)];
#pragma unroll
          for (int r = 0; r < NREP; ++r) acc[r][u] = fmaf(pw[i * NREP + r], c, acc[r][u]);
        }
      }
    }
    __syncthreads();
  }
  const i64 ob = (bh * a.splits + s) * NREP;
#pragma unroll
  for (int u = 0; u < JU; ++u) {
    const int j = tid + 128 * u;
    if (j < P) {
#pragma unroll
      for (int r = 0; r < NREP; ++r) a.opart[(ob + r) * P + j] = acc[r][u];
    }
  }
  if (tid < NREP) { a.mpart[ob + tid] = mrun[tid]; a.lpart[ob + tid] = lrun[tid]; }
  split_done<P, NREP, OT>(far, b, h);
}

