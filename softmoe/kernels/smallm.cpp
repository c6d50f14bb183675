// Batched float32 matmuls for stacked experts with few rows per expert (AVX-512F + FMA, OpenMP).
//
// Letters: E experts, M rows per expert (slots or capacity: small), K the reduction, N output
// columns. Every matrix is row-major and contiguous per expert, experts stacked (stride M*K...).
//
// Why not MKL: with M = 32 rows per expert each weight element is used 32 times, and MKL's
// batched GEMM spends as long packing and streaming the (E, K, N) weights as multiplying
// (120-180 GFLOP/s at E=128, D=384, H=1536 on 2 Sapphire Rapids cores, against about 400 for
// a large square matmul). These kernels never pack the large operand: they read it in place,
// software-prefetching the next tile while multiplying this one, and keep the small operand
// in cache. Three shapes cover an expert MLP's forward and backward:
//   smallm_nn  C (M, N) = A (M, K) B (K, N) [+ bias (N)]   forward: x w1 + b1, a w2 + b2
//   smallm_nt  C (M, N) = A (M, K) B (N, K)^T, M <= 64     input grads: gy w2^T, gh w1^T
//   smallm_tn  C (K, N) = A (M, K)^T B (M, N)              weight grads: a^T gy, x^T gh
// Each keeps a tile of C in 24 of the 32 vector registers (8 x 48 floats; NT 6-16 x 16-64).
// Work is split over experts (and, when E is not a multiple of the thread count, over slices
// of each expert's output) with OpenMP: the same libgomp as torch's, so no second thread pool.
// Accumulation order differs from MKL's: results agree to float32 rounding, not bitwise.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

typedef int64_t i64;

static const __mmask16 ALL = (__mmask16)0xFFFF;
static inline __mmask16 tail(i64 n) { return n >= 16 ? ALL : (__mmask16)((1u << n) - 1u); }

// The inner loop of all three kernels (inlined, with the prefetch lambda: a call would spill
// the register tile, all zmm registers being caller-saved): for k < kc, the rank-1 update
//   acc[r][v] += s[r * ls + k * ks] * vec[k * lv + 16 v : +16]   (last vector masked by `last`)
// of an R x 16NV tile of C held in registers. pf(k) issues the caller's prefetches for step k.
template <int R, int NV, class Prefetch>
static inline __attribute__((always_inline)) void rank1_updates(__m512 (&acc)[R][NV], i64 kc, const float* s, i64 ls,
                                                                i64 ks, const float* vec, i64 lv, __mmask16 last,
                                                                Prefetch pf) {
  for (i64 k = 0; k < kc; ++k) {
    pf(k);
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : ALL, vec + k * lv + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512 sv = _mm512_set1_ps(s[r * ls + k * ks]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(sv, bv[v], acc[r][v]);
    }
  }
}

template <int R, int NV>
static inline __attribute__((always_inline)) void zero_tile(__m512 (&acc)[R][NV]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
}

template <int R, int NV>
static inline __attribute__((always_inline)) void store_tile(__m512 (&acc)[R][NV], float* c, i64 ldc, __mmask16 last) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, v == NV - 1 ? last : ALL, acc[r][v]);
}

static inline __attribute__((always_inline)) void no_prefetch(i64) {}

// ---------- NN: C (M x N) = A (M x K) B (K x N) [+ bias (N)] ----------
template <int MR, int NV>
static void nn_tile(i64 kc, const float* a, i64 lda, const float* b, i64 ldb, float* c, i64 ldc,
                    const float* bias, int acc_c, __mmask16 last, const float* pf, const float* l2, i64 n_l2) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __mmask16 m = v == NV - 1 ? last : ALL;
      acc[r][v] = acc_c ? _mm512_maskz_loadu_ps(m, c + r * ldc + 16 * v)
                        : (bias ? _mm512_maskz_loadu_ps(m, bias + 16 * v) : _mm512_setzero_ps());
    }
  // pf: the next panel into L1, NV lines a k step; l2: the next k block into L2, one line a k
  // step for the first n_l2 steps
  auto both = [=](i64 k) __attribute__((always_inline)) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm_prefetch((const char*)(pf + k * ldb + 16 * v), _MM_HINT_T0);
    if (k < n_l2) _mm_prefetch((const char*)(l2 + 16 * k), _MM_HINT_T1);
  };
  auto stream = [=](i64 k) __attribute__((always_inline)) {
    if (k < n_l2) _mm_prefetch((const char*)(l2 + 16 * k), _MM_HINT_T1);
  };
  if (pf && l2)
    rank1_updates<MR, NV>(acc, kc, a, lda, 1, b, ldb, last, both);
  else if (pf)
    rank1_updates<MR, NV>(acc, kc, a, lda, 1, b, ldb, last, [=](i64 k) __attribute__((always_inline)) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm_prefetch((const char*)(pf + k * ldb + 16 * v), _MM_HINT_T0);
    });
  else if (l2)
    rank1_updates<MR, NV>(acc, kc, a, lda, 1, b, ldb, last, stream);
  else
    rank1_updates<MR, NV>(acc, kc, a, lda, 1, b, ldb, last, no_prefetch);
  store_tile<MR, NV>(acc, c, ldc, last);
}

typedef void (*nn_fn)(i64, const float*, i64, const float*, i64, float*, i64, const float*, int, __mmask16, const float*,
                      const float*, i64);
#define ROW3(F, R) F<R, 1>, F<R, 2>, F<R, 3>
static const nn_fn NN[8][3] = {{ROW3(nn_tile, 1)}, {ROW3(nn_tile, 2)}, {ROW3(nn_tile, 3)}, {ROW3(nn_tile, 4)},
                               {ROW3(nn_tile, 5)}, {ROW3(nn_tile, 6)}, {ROW3(nn_tile, 7)}, {ROW3(nn_tile, 8)}};

// K block of the NN kernel: the B panel it re-reads for every 8-row tile (KC x 48 floats,
// 12 KiB) stays in L1. Measured at E=128, D=384, H=1536: 64 was the fastest of 32 to 384
// (32 and 48 within 2%, 128 28% slower, 384 70% slower).
static const i64 KC = 64;

// Rows of B at most this long (bytes) get the next k block streamed into L2 by software: the
// hardware streamer does not run far enough ahead on them. Measured at E=128, D=384, H=1536:
// a w2 (1.5 KiB rows) 1.13-1.24x faster with it; x w1 (6 KiB rows) 0.93x, so not there.
static const i64 L2_STREAM_ROW_BYTES = 2048;

// One expert's C[:, j0:j1). next_B: the B this thread multiplies next (nullptr: none), whose
// first k block is streamed during this one's last.
static void nn_one(i64 M, i64 K, i64 N, i64 j0, i64 j1, const float* A, const float* B, const float* bias, float* C,
                   const float* next_B) {
  int l2_stream = j0 == 0 && j1 == N && N * 4 <= L2_STREAM_ROW_BYTES;  // the next block is contiguous
  for (i64 kb = 0; kb < K; kb += KC) {
    i64 kc = K - kb < KC ? K - kb : KC;
    const float* l2 = kb + KC < K ? B + (kb + KC) * N : next_B;
    i64 l2_lines = !l2_stream || !l2 ? 0 : (kb + KC < K ? (K - kb - KC < KC ? K - kb - KC : KC) : (K < KC ? K : KC)) * N / 16;
    i64 streamed = 0;
    for (i64 j = j0; j < j1; j += 48) {
      i64 nw = j1 - j < 48 ? j1 - j : 48;
      int nv = (int)((nw + 15) / 16);
      __mmask16 last = tail(nw - 16 * (nv - 1));
      // the first row tile prefetches the next column tile's panel (or the next k block's first)
      const float* pf = j + 48 < j1 ? B + kb * N + j + 48 : (kb + KC < K ? B + (kb + KC) * N + j0 : nullptr);
      for (i64 m = 0; m < M; m += 8) {
        int mr = (int)(M - m < 8 ? M - m : 8);
        i64 n_l2 = l2_lines - streamed < kc ? l2_lines - streamed : kc;
        NN[mr - 1][nv - 1](kc, A + m * K + kb, K, B + kb * N + j, N, C + m * N + j, N,
                           bias ? bias + j : nullptr, kb > 0, last, m == 0 ? pf : nullptr,
                           n_l2 > 0 ? l2 + 16 * streamed : nullptr, n_l2);
        streamed += n_l2 > 0 ? n_l2 : 0;
      }
    }
  }
}

// Work items: E experts x `parts` slices of the outer range [0, L), slices aligned to `align`.
static inline void slice(i64 w, i64 parts, i64 L, i64 align, i64* e, i64* lo, i64* hi) {
  *e = w / parts;
  i64 p = w % parts, tiles = (L + align - 1) / align;
  *lo = (tiles * p / parts) * align;
  i64 h = (tiles * (p + 1) / parts) * align;
  *hi = h < L ? h : L;
}

static i64 n_parts(i64 E, int nt) { return (E % nt == 0 || E >= 4 * nt) ? 1 : nt; }

extern "C" void smallm_nn(i64 E, i64 M, i64 K, i64 N, const float* A, const float* B, const float* bias, float* C,
                          int nt) {
  i64 parts = n_parts(E, nt), W = E * parts;
#pragma omp parallel num_threads(nt)
  {
    // contiguous runs of work items per thread (as schedule(static)), so that a thread knows
    // its next expert
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    i64 w0 = W * t / n, w1 = W * (t + 1) / n;
    for (i64 w = w0; w < w1; ++w) {
      i64 e, lo, hi;
      slice(w, parts, N, 48, &e, &lo, &hi);
      const float* next_B = parts == 1 && w + 1 < w1 ? B + (e + 1) * K * N : nullptr;
      if (lo < hi)
        nn_one(M, K, N, lo, hi, A + e * M * K, B + e * K * N, bias ? bias + e * N : nullptr, C + e * M * N, next_B);
    }
  }
}

// ---------- NT: C (M x N) = A (M x K) B^T, B (N x K) row-major ----------
// Computed as C^T = B A^T: R rows of B broadcast against A^T (packed K x 16*MV, vectorised
// over m); tiles of C^T go to a small staging block that gathers then write to C row by row.
// The next R rows of B are prefetched into L2, not L1: packed A^T alone (K x 16*MV floats,
// 48 KiB at K=384, M=32) fills L1 (gy w2^T 1.02-1.07x against prefetching into L1).
template <int R, int MV>
static void nt_tile(i64 K, const float* b, i64 ldb, const float* p, float* st, const float* pf) {
  __m512 acc[R][MV];
  zero_tile<R, MV>(acc);
  if (pf)
    rank1_updates<R, MV>(acc, K, b, ldb, 1, p, 16 * MV, ALL, [=](i64 k) __attribute__((always_inline)) {
      if ((k & 15) == 0) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(pf + r * ldb + k), _MM_HINT_T1);
      }
    });
  else
    rank1_updates<R, MV>(acc, K, b, ldb, 1, p, 16 * MV, ALL, no_prefetch);
  store_tile<R, MV>(acc, st, 16 * MV, ALL);
}

typedef void (*nt_fn)(i64, const float*, i64, const float*, float*, const float*);
static const int NT_R[4] = {16, 12, 8, 6};
#define NTROW(MV, R)                                                                                         \
  {nt_tile<1, MV>, nt_tile<2, MV>, nt_tile<3, MV>, nt_tile<4, MV>, nt_tile<5, MV>, nt_tile<6, MV>,          \
   nt_tile<(7 <= R ? 7 : R), MV>, nt_tile<(8 <= R ? 8 : R), MV>, nt_tile<(9 <= R ? 9 : R), MV>,              \
   nt_tile<(10 <= R ? 10 : R), MV>, nt_tile<(11 <= R ? 11 : R), MV>, nt_tile<(12 <= R ? 12 : R), MV>,        \
   nt_tile<(13 <= R ? 13 : R), MV>, nt_tile<(14 <= R ? 14 : R), MV>, nt_tile<(15 <= R ? 15 : R), MV>,        \
   nt_tile<(16 <= R ? 16 : R), MV>}
static const nt_fn NT[4][16] = {NTROW(1, 16), NTROW(2, 12), NTROW(3, 8), NTROW(4, 6)};
static const i64 NT_CHUNK = 96;  // rows of C^T staged at a time: a multiple of every NT_R and of 16

// Returns 0, or 1 if the per-thread packing buffers could not be allocated (C untouched).
extern "C" int smallm_nt(i64 E, i64 M, i64 K, i64 N, const float* A, const float* B, float* C, int nt) {
  int mv = (int)((M + 15) / 16), R = NT_R[mv - 1];  // M <= 64
  i64 mp = 16 * mv;
  i64 parts = n_parts(E, nt), W = E * parts;
  size_t per_thread = (size_t)((K + NT_CHUNK) * mp);  // floats: packed A^T, then the staging block
  float* buffers = (float*)aligned_alloc(64, per_thread * 4 * (size_t)nt);  // a multiple of 64 bytes
  if (!buffers) return 1;
#pragma omp parallel num_threads(nt)
  {
    float* pk = buffers + per_thread * (size_t)omp_get_thread_num();
    float* st = pk + K * mp;
    __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                     _mm512_set1_epi32((int)mp));
    i64 packed = -1;
#pragma omp for schedule(static)
    for (i64 w = 0; w < W; ++w) {
      i64 e, lo, hi;
      slice(w, parts, N, NT_CHUNK, &e, &lo, &hi);
      if (lo >= hi) continue;
      const float* a = A + e * M * K;
      if (packed != e) {
        for (i64 k = 0; k < K; ++k)
          for (i64 m = 0; m < mp; ++m) pk[k * mp + m] = m < M ? a[m * K + k] : 0.f;
        packed = e;
      }
      const float* b = B + e * N * K;
      float* c = C + e * M * N;
      for (i64 n0 = lo; n0 < hi; n0 += NT_CHUNK) {
        i64 n1 = hi - n0 < NT_CHUNK ? hi : n0 + NT_CHUNK;
        for (i64 n = n0; n < n1; n += R) {
          int r = (int)(n1 - n < R ? n1 - n : R);
          const float* pf = n + R < hi ? b + (n + R) * K : nullptr;
          NT[mv - 1][r - 1](K, b + n * K, K, pk, st + (n - n0) * mp, pf);
        }
        for (i64 m = 0; m < M; ++m)
          for (i64 j = n0; j < n1; j += 16) {
            __mmask16 msk = tail(n1 - j);
            __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), msk, idx, st + (j - n0) * mp + m, 4);
            _mm512_mask_storeu_ps(c + m * N + j, msk, v);
          }
      }
    }
  }
  free(buffers);
  return 0;
}

// ---------- TN: C (K x N) = A^T B, A (M x K), B (M x N); reduction over the small M ----------
template <int R, int NV>
static void tn_tile(i64 M, const float* a, i64 lda, const float* b, i64 ldb, float* c, i64 ldc, __mmask16 last,
                    int stream) {
  __m512 acc[R][NV];
  zero_tile<R, NV>(acc);
  rank1_updates<R, NV>(acc, M, a, 1, lda, b, ldb, last, no_prefetch);
  if (!stream) {
    store_tile<R, NV>(acc, c, ldc, last);
    return;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_stream_ps(c + r * ldc + 16 * v, acc[r][v]);
}

typedef void (*tn_fn)(i64, const float*, i64, const float*, i64, float*, i64, __mmask16, int);
static const tn_fn TN[8][3] = {{ROW3(tn_tile, 1)}, {ROW3(tn_tile, 2)}, {ROW3(tn_tile, 3)}, {ROW3(tn_tile, 4)},
                               {ROW3(tn_tile, 5)}, {ROW3(tn_tile, 6)}, {ROW3(tn_tile, 7)}, {ROW3(tn_tile, 8)}};

extern "C" void smallm_tn(i64 E, i64 M, i64 K, i64 N, const float* A, const float* B, float* C, int nt) {
  i64 parts = n_parts(E, nt), W = E * parts;
  // C is written once and not read back here: non-temporal stores skip fetching its lines
  // first (1.35x at E=128, D=384, H=1536); they need 64-byte aligned rows.
  int can_stream = (N % 16 == 0) && (((uintptr_t)C) % 64 == 0);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (i64 w = 0; w < W; ++w) {
    i64 e, lo, hi;
    slice(w, parts, K, 8, &e, &lo, &hi);
    const float* a = A + e * M * K;
    const float* b = B + e * M * N;
    float* c = C + e * K * N;
    // Tile order: column tiles outermost when C has more rows than columns (a^T gy: 1.12-1.17x
    // at E=128, D=384, H=1536), row tiles outermost otherwise (x^T gh: 0.96x the other way).
    // Either way each element of C sums over m in the same order: the same bits.
    i64 nj = (N + 47) / 48, nk = (hi - lo + 7) / 8;
    int columns_outer = hi - lo > N;
    for (i64 i = 0; i < nj * nk; ++i) {
      i64 k = lo + 8 * (columns_outer ? i % nk : i / nj), j = 48 * (columns_outer ? i / nk : i % nj);
      int r = (int)(hi - k < 8 ? hi - k : 8);
      i64 nw = N - j < 48 ? N - j : 48;
      int nv = (int)((nw + 15) / 16);
      TN[r - 1][nv - 1](M, a + k, K, b + j, N, c + k * N + j, N, tail(nw - 16 * (nv - 1)), can_stream && nw == 48);
    }
    if (can_stream) _mm_sfence();  // streaming stores are weakly ordered: fence before the barrier
  }
}
