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

template <int R, int V>
static inline __attribute__((always_inline)) void zero_regs(__m512 (&t)[R][V]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) t[r][v] = _mm512_setzero_ps();
}

// One sequence's columns [d0, d0 + 16 V) (the last vector masked by `last`) for the SC slots
// from s0, over all its N tokens: dL/dw^T of those slots and columns summed in registers
// (SC x V vectors) and added to acc_w once; dx accumulated over the slot chunks (the first
// writes it, the others add).
template <int SC, int V>
static void column_block(i64 N, i64 S, i64 D, i64 s0, i64 d0, const float* x, const float* Dw, const float* g,
                         const float* gxs_b, i64 ss, const float* wT, const float* c, float* dx, float* acc_w,
                         __mmask16 last) {
  __m512 dw[SC][V];
  zero_regs<SC, V>(dw);
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

// ---------- the combine's backward: dL/dys and dL/dcombine in one read of dL/dy ----------
//   g_combine[b,n,s] = gy[b,n,:] . ys[b,s,:]        g_ys[b,s,:] = sum_n Cw[b,n,s] gy[b,n,:]
// With torch ops these are two bmm's, each a pass over gy (B, N, D). Here one sequence's gy
// (N x D) is read from memory once, for the dot products token by token, and read again from
// cache for g_ys in column blocks whose sums stay in registers.

// One token's S <= 8 dot products with the slots' rows (D columns, 16 at a time).
template <int SC>
static inline void token_dots(i64 D, const float* gyr, const float* ys_b, i64 ss, float* out) {
  __m512 acc[SC];
#pragma GCC unroll 8
  for (int s = 0; s < SC; ++s) acc[s] = _mm512_setzero_ps();
  for (i64 d0 = 0; d0 < D; d0 += 16) {
    __mmask16 m = tail16(D - d0);
    __m512 v = _mm512_maskz_loadu_ps(m, gyr + d0);
#pragma GCC unroll 8
    for (int s = 0; s < SC; ++s) acc[s] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, ys_b + s * ss + d0), acc[s]);
  }
#pragma GCC unroll 8
  for (int s = 0; s < SC; ++s) out[s] = _mm512_reduce_add_ps(acc[s]);
}

// Columns [d0, d0 + 16 V) of g_ys for the SC slots from s0, summed over the N tokens.
template <int SC, int V>
static void slot_block(i64 N, i64 S, i64 D, i64 s0, i64 d0, const float* gy, const float* Cw, float* g_ys_b, i64 ss,
                       __mmask16 last) {
  __m512 acc[SC][V];
  zero_regs<SC, V>(acc);
  for (i64 n = 0; n < N; ++n) {
    __m512 gv[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) gv[v] = _mm512_maskz_loadu_ps(v == V - 1 ? last : (__mmask16)0xFFFF, gy + n * D + d0 + 16 * v);
    const float* cn = Cw + n * S + s0;
#pragma GCC unroll 8
    for (int s = 0; s < SC; ++s) {
      __m512 bc = _mm512_set1_ps(cn[s]);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[s][v] = _mm512_fmadd_ps(bc, gv[v], acc[s][v]);
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < SC; ++s)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(g_ys_b + (s0 + s) * ss + d0 + 16 * v, v == V - 1 ? last : (__mmask16)0xFFFF, acc[s][v]);
}

typedef void (*dots_fn)(i64, const float*, const float*, i64, float*);
static const dots_fn DOTS[8] = {token_dots<1>, token_dots<2>, token_dots<3>, token_dots<4>,
                                token_dots<5>, token_dots<6>, token_dots<7>, token_dots<8>};
typedef void (*slot_fn)(i64, i64, i64, i64, i64, const float*, const float*, float*, i64, __mmask16);
#define SLOTS(V) {slot_block<1, V>, slot_block<2, V>, slot_block<3, V>, slot_block<4, V>, \
                  slot_block<5, V>, slot_block<6, V>, slot_block<7, V>, slot_block<8, V>}
static const slot_fn SLOT[2][8] = {SLOTS(1), SLOTS(2)};

// gy (B, N, D), Cw (B, N, S) contiguous; ys row (b, s) at ys + b*ysb + s*yss and g_ys row
// (b, s) at g_ys + b*gsb + s*gss, D contiguous; g_ys and/or g_combine (B, N, S) may be null.
extern "C" void combine_backward(i64 B, i64 N, i64 D, i64 S, const float* gy, const float* Cw, const float* ys,
                                 i64 ysb, i64 yss, float* g_ys, i64 gsb, i64 gss, float* g_combine, int nt) {
  if (nt > B) nt = (int)(B > 0 ? B : 1);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (i64 b = 0; b < B; ++b) {
    const float* gy_b = gy + b * N * D;
    if (g_combine)
      for (i64 s0 = 0; s0 < S; s0 += 8) {
        int sc = (int)(S - s0 < 8 ? S - s0 : 8);
        for (i64 n = 0; n < N; ++n)
          DOTS[sc - 1](D, gy_b + n * D, ys + b * ysb + s0 * yss, yss, g_combine + (b * N + n) * S + s0);
      }
    if (g_ys)
      for (i64 d0 = 0; d0 < D; d0 += 32) {
        i64 w = D - d0 < 32 ? D - d0 : 32;
        int v = w > 16 ? 2 : 1;
        for (i64 s0 = 0; s0 < S; s0 += 8) {
          int sc = (int)(S - s0 < 8 ? S - s0 : 8);
          SLOT[v - 1][sc - 1](N, S, D, s0, d0, gy_b, Cw + b * N * S, g_ys + b * gsb, gss, tail16(w - 16 * (v - 1)));
        }
      }
  }
}
