// The last pass of Soft MoE's routing backward, for few slots (AVX-512F + FMA, OpenMP).
//
// Letters: B sequences, N tokens, D width, S slots. Given dL/dlogits g (over the logits x w
// before the per-token factor r, i.e. already multiplied by r), it computes
//   dx[b,n,:] = sum_s Dw[b,n,s] gxs[b,s,:] + sum_s g[b,n,s] w[:,s] - c[b,n] x[b,n,:]
//   dw[:,s]   = sum_{b,n} g[b,n,s] x[b,n,:]
// (c = r^2 sum_s(dL/dlogits * logits), the gradient through the normalisation; none without it)
// in one read of x and one write of dx. With torch ops that is four passes over (B, N, D)
// tensors: dx = Dw gxs (bmm), dx += g w^T (addmm_), dx -= c x (addcmul_), dw = g^T x (mm), each
// with S = 8-32 columns, where MKL's matmuls are bound by memory, not arithmetic.
//
// Parallel over sequences; each thread sums its part of dw^T (S x D) in a buffer of its own,
// and the parts are added in thread order: deterministic for a given thread count. Results
// agree with torch's to float32 rounding (another summation order), not bitwise.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

static inline __mmask16 tail16(i64 n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

// One sequence's columns [d0, d0 + 16 V) (the last vector masked by `last`) for the SC slots
// from s0, over all its N tokens: dL/dw^T of those slots and columns summed in registers
// (SC x V vectors) and added to acc_w once; dx accumulated over the slot chunks (the first
// writes it, the others add).
template <int SC, int V>
static void column_block(i64 N, i64 S, i64 D, i64 s0, i64 d0, const float* x, const float* Dw, const float* g,
                         const float* gxs_b, i64 ss, const float* wT, const float* c, float* dx, float* acc_w,
                         __mmask16 last) {
  __m512 dw[SC][V];
#pragma GCC unroll 8
  for (int s = 0; s < SC; ++s)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) dw[s][v] = _mm512_setzero_ps();
  for (i64 n = 0; n < N; ++n) {
    const float* xr = x + n * D + d0;
    float* dxr = dx + n * D + d0;
    const float *Dn = Dw + n * S + s0, *gn = g + n * S + s0;
    __m512 xv[V], acc[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      __mmask16 m = v == V - 1 ? last : (__mmask16)0xFFFF;
      xv[v] = _mm512_maskz_loadu_ps(m, xr + 16 * v);
      acc[v] = s0 == 0 ? (c ? _mm512_mul_ps(_mm512_set1_ps(-c[n]), xv[v]) : _mm512_setzero_ps())
                       : _mm512_maskz_loadu_ps(m, dxr + 16 * v);
    }
#pragma GCC unroll 8
    for (int s = 0; s < SC; ++s) {
      __m512 bd = _mm512_set1_ps(Dn[s]), bg = _mm512_set1_ps(gn[s]);
      const float* gs = gxs_b + (s0 + s) * ss + d0;
      const float* ws = wT + (s0 + s) * D + d0;
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) {
        __mmask16 m = v == V - 1 ? last : (__mmask16)0xFFFF;
        acc[v] = _mm512_fmadd_ps(bd, _mm512_maskz_loadu_ps(m, gs + 16 * v), acc[v]);
        acc[v] = _mm512_fmadd_ps(bg, _mm512_maskz_loadu_ps(m, ws + 16 * v), acc[v]);
        dw[s][v] = _mm512_fmadd_ps(bg, xv[v], dw[s][v]);
      }
    }
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(dxr + 16 * v, v == V - 1 ? last : (__mmask16)0xFFFF, acc[v]);
  }
#pragma GCC unroll 8
  for (int s = 0; s < SC; ++s)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      __mmask16 m = v == V - 1 ? last : (__mmask16)0xFFFF;
      float* a = acc_w + (s0 + s) * D + d0 + 16 * v;
      _mm512_mask_storeu_ps(a, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a), dw[s][v]));
    }
}

typedef void (*block_fn)(i64, i64, i64, i64, i64, const float*, const float*, const float*, const float*, i64,
                         const float*, const float*, float*, float*, __mmask16);
#define BLOCKS(V) {column_block<1, V>, column_block<2, V>, column_block<3, V>, column_block<4, V>, \
                   column_block<5, V>, column_block<6, V>, column_block<7, V>, column_block<8, V>}
static const block_fn BLOCK[2][8] = {BLOCKS(1), BLOCKS(2)};

// x, dx (B, N, D), Dw, g (B, N, S) contiguous; gxs row (b, s) at gxs + b*sb + s*ss, D contiguous;
// wT (S, D) contiguous (w transposed); c (B, N) or null; dwT (S, D) is written.
// Returns 0, or 1 if the per-thread buffers could not be allocated (outputs untouched).
extern "C" int routing_dx_dw(i64 B, i64 N, i64 D, i64 S, const float* x, const float* Dw, const float* g,
                             const float* gxs, i64 sb, i64 ss, const float* wT, const float* c, float* dx,
                             float* dwT, int nt) {
  if (nt > B) nt = (int)(B > 0 ? B : 1);
  size_t part = (size_t)(S * D);
  float* parts = (float*)calloc(part * (size_t)nt, sizeof(float));
  if (!parts) return 1;
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num(), n_t = omp_get_num_threads();
    float* acc_w = parts + part * (size_t)t;
    for (i64 b = B * t / n_t; b < B * (t + 1) / n_t; ++b) {
      const float* cb = c ? c + b * N : nullptr;
      for (i64 d0 = 0; d0 < D; d0 += 32) {
        i64 w = D - d0 < 32 ? D - d0 : 32;
        int v = w > 16 ? 2 : 1;
        for (i64 s0 = 0; s0 < S; s0 += 8) {
          int sc = (int)(S - s0 < 8 ? S - s0 : 8);
          BLOCK[v - 1][sc - 1](N, S, D, s0, d0, x + b * N * D, Dw + b * N * S, g + b * N * S, gxs + b * sb, ss, wT,
                               cb, dx + b * N * D, acc_w, tail16(w - 16 * (v - 1)));
        }
      }
    }
  }
  memcpy(dwT, parts, part * sizeof(float));
  for (int t = 1; t < nt; ++t) {
    const float* p = parts + part * (size_t)t;
    for (size_t i = 0; i < part; ++i) dwT[i] += p[i];
  }
  free(parts);
  return 0;
}
