// Host emulation of the CUDA features that quant_fast.cu / quant_generic.cu
// use, so the kernels compile as ordinary C++ and run on a CPU for tests
// (tests/test_gpu_backends.py, "host emulation").  Each block runs as
// blockDim.x OS threads with real barriers; warp shuffles and ballots go
// through a per-warp buffer and barrier.  Slow, but it executes the very
// same kernel source, operation for operation (compile with
// -ffp-contract=off so the host compiler does not fuse either).
//
// Not used on the GPU.  Include this, then the kernel sources.
#pragma once
#include <barrier>
#include <cmath>
#include <math.h>  // ::fmaxf, ::fabsf, ::fmaf
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define TQQ_HOST 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// static shared memory: one object per kernel instantiation, which is right because
// tqq_emu_launch runs the blocks one after another
#define __shared__ static

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct tqq_dim3 { unsigned x, y, z; };

struct TQQEmuBlock {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> wbar;
  std::vector<std::uint64_t> wbuf;
  std::vector<uint4> wfrag;  // mma emulation: each lane's A fragment, then {b0, b1}
  std::vector<float4> smem;
};

inline thread_local tqq_dim3 threadIdx{0, 0, 0};
inline thread_local tqq_dim3 blockIdx{0, 0, 0};
inline thread_local TQQEmuBlock* tqq_emu_blk = nullptr;
inline tqq_dim3 gridDim{1, 1, 1};
inline tqq_dim3 blockDim{1, 1, 1};

#define TQQ_SMEM(name) float4* name = tqq_emu_blk->smem.data()

inline void __syncthreads() { tqq_emu_blk->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { tqq_emu_blk->wbar[threadIdx.x >> 5]->arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  static_assert(sizeof(T) <= 8, "shuffle of a wide type");
  const int t = threadIdx.x, w = t >> 5, l = t & 31;
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  tqq_emu_blk->wbuf[t] = bits;
  tqq_emu_blk->wbar[w]->arrive_and_wait();
  const std::uint64_t r = tqq_emu_blk->wbuf[(w << 5) | (l ^ o)];
  tqq_emu_blk->wbar[w]->arrive_and_wait();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

inline unsigned __ballot_sync(unsigned, bool p) {
  const int t = threadIdx.x, w = t >> 5;
  tqq_emu_blk->wbuf[t] = p ? 1u : 0u;
  tqq_emu_blk->wbar[w]->arrive_and_wait();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) m |= (unsigned)(tqq_emu_blk->wbuf[(w << 5) | l] & 1u) << l;
  tqq_emu_blk->wbar[w]->arrive_and_wait();
  return m;
}

inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned n) {
  return (unsigned)((((std::uint64_t)hi << 32) | lo) >> (n & 31u));
}

// mma.sync.m16n8k16.row.col.f32.f16.f16.f32 for one warp, fragment layout as in the
// PTX ISA (g = lane / 4, t = lane % 4): A a.x = (g, 2t..2t+1), a.y = (g+8, 2t..),
// a.z = (g, 2t+8..), a.w = (g+8, 2t+8..); B b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g);
// C c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1).  Products of
// float16 values are exact in double; each output is rounded once onto c.
inline void tqq_emu_mma16816(float (&c)[4], const uint4& a, unsigned b0, unsigned b1) {
  const int tid = threadIdx.x, w = tid >> 5, l = tid & 31;
  auto h = [](unsigned word, int hi) {
    const unsigned short u = (unsigned short)(hi ? word >> 16 : word & 0xffffu);
    _Float16 x;
    std::memcpy(&x, &u, 2);
    return (double)x;
  };
  tqq_emu_blk->wfrag[2 * tid] = a;
  tqq_emu_blk->wfrag[2 * tid + 1] = uint4{b0, b1, 0u, 0u};
  tqq_emu_blk->wbar[w]->arrive_and_wait();
  double A[16][16], Bm[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const uint4 fa = tqq_emu_blk->wfrag[2 * ((w << 5) | lane)], fb = tqq_emu_blk->wfrag[2 * ((w << 5) | lane) + 1];
    const int g = lane >> 2, t = lane & 3;
    const unsigned av[4] = {fa.x, fa.y, fa.z, fa.w};
    for (int r = 0; r < 4; ++r)
      for (int e = 0; e < 2; ++e) A[g + 8 * (r & 1)][2 * t + e + 8 * (r >> 1)] = h(av[r], e);
    for (int e = 0; e < 2; ++e) {
      Bm[2 * t + e][g] = h(fb.x, e);
      Bm[2 * t + 8 + e][g] = h(fb.y, e);
    }
  }
  tqq_emu_blk->wbar[w]->arrive_and_wait();
  const int g = l >> 2, t = l & 3;
  for (int k = 0; k < 4; ++k) {
    const int row = g + 8 * (k >> 1), col = 2 * t + (k & 1);
    double s = 0.0;
    for (int j = 0; j < 16; ++j) s += A[row][j] * Bm[j][col];
    c[k] = (float)((double)c[k] + s);
  }
}

// mma.sync.m16n8k32.row.col.s32.s8.s8.s32: A a.x = (g, 4t..4t+3), a.y = (g+8, 4t..),
// a.z = (g, 4t+16..), a.w = (g+8, 4t+16..), byte i -> column +i; B b0 = (k 4t..4t+3, n g),
// b1 = (k 4t+16..); C as above.  Exact integer arithmetic.
inline void tqq_emu_imma16832(int (&c)[4], const uint4& a, unsigned b0, unsigned b1) {
  const int tid = threadIdx.x, w = tid >> 5, l = tid & 31;
  auto s8 = [](unsigned word, int i) { return (int)(signed char)((word >> (8 * i)) & 0xffu); };
  tqq_emu_blk->wfrag[2 * tid] = a;
  tqq_emu_blk->wfrag[2 * tid + 1] = uint4{b0, b1, 0u, 0u};
  tqq_emu_blk->wbar[w]->arrive_and_wait();
  int A[16][32], Bm[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    const uint4 fa = tqq_emu_blk->wfrag[2 * ((w << 5) | lane)], fb = tqq_emu_blk->wfrag[2 * ((w << 5) | lane) + 1];
    const int g = lane >> 2, t = lane & 3;
    const unsigned av[4] = {fa.x, fa.y, fa.z, fa.w};
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 4; ++i) A[g + 8 * (r & 1)][4 * t + i + 16 * (r >> 1)] = s8(av[r], i);
    for (int i = 0; i < 4; ++i) {
      Bm[4 * t + i][g] = s8(fb.x, i);
      Bm[4 * t + 16 + i][g] = s8(fb.y, i);
    }
  }
  tqq_emu_blk->wbar[w]->arrive_and_wait();
  const int g = l >> 2, t = l & 3;
  for (int k = 0; k < 4; ++k) {
    const int row = g + 8 * (k >> 1), col = 2 * t + (k & 1);
    int s = 0;
    for (int j = 0; j < 32; ++j) s += A[row][j] * Bm[j][col];
    c[k] += s;
  }
}

inline unsigned __byte_perm(unsigned x, unsigned y, unsigned sel) {
  const std::uint64_t v = ((std::uint64_t)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((sel >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
inline int __float2int_rn(float f) { return (int)std::nearbyint(f); }

// One rounding per call; the host compiler must not contract (-ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __double2float_rn(double d) { return (float)d; }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
template <class T>
inline T __ldg(const T* p) { return *p; }

inline float tqq_host_h2f(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short tqq_host_f2h(float f) { _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h; }

// Run body() as grid blocks of `block` threads with `smem` bytes of shared memory.
template <class F>
inline void tqq_emu_launch(int grid, int block, std::size_t smem, F body) {
  gridDim = {(unsigned)grid, 1, 1};
  blockDim = {(unsigned)block, 1, 1};
  for (int b = 0; b < grid; ++b) {
    TQQEmuBlock blk;
    blk.bar = std::make_unique<std::barrier<>>(block);
    for (int w = 0; w < (block + 31) / 32; ++w) blk.wbar.push_back(std::make_unique<std::barrier<>>(32));
    blk.wbuf.assign((block + 31) / 32 * 32, 0);
    blk.wfrag.assign((block + 31) / 32 * 64, uint4{0u, 0u, 0u, 0u});
    blk.smem.assign(smem / 16 + 1, float4{NAN, NAN, NAN, NAN});  // poisoned, like uninitialized memory
    std::vector<std::thread> ts;
    for (int t = 0; t < block; ++t)
      ts.emplace_back([&, t, b] {
        threadIdx = {(unsigned)t, 0, 0};
        blockIdx = {(unsigned)b, 0, 0};
        tqq_emu_blk = &blk;
        body();
      });
    for (auto& th : ts) th.join();
  }
}
