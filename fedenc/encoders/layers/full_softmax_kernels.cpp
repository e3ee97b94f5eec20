// The exp'd-logit full-softmax loss of full_softmax.py in AVX2/FMA kernels (x86-64), built and
// loaded by native_softmax.py. Plain C ABI, no torch headers: it compiles in about 2 s.
//
// Why: on the 2-core reference machine (Zen 3) MKL runs this loss's products, one dimension of
// 100, at roughly half the FMA units' peak, and every pass between them (normalising the items,
// exp, row sums, the normalisation's backward) reads a 1.6 MB block back from L3. Here the catalog is
// cut into panels of W = 24 items; a panel's unit item vectors are packed once into L1, and every
// product, exp and sum on it runs while it is there. Threads take units of 48 panels as they
// free up; each unit keeps its own partial sums, which the caller adds up in unit order: the
// result depends neither on timing nor on the thread count.
//
// Shapes: B sessions padded to bpad (a multiple of 4), width d padded to dp (a multiple of 8),
// both with zeros. Padded dims add nothing to any product; a padded session row gets exp(0) = 1
// for every item, which only lands in that row's own sums, dropped by the caller (and its factor
// in the backward is 0).
//
// Sums run in two levels: each 96-item group is summed from zero (in registers), and those group
// sums are added to the unit's running totals (the row sums in double). One float sum over 20k
// items lost about 8x the accuracy of PyTorch's blockwise sums.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int W = 24;  // items per panel: three 8-float vectors
constexpr int NP = 4;  // panels per update of the session-gradient sum (96 items)
// Panels per unit of work (a multiple of NP): threads take units as they free up, so a core
// slowed by a neighbour does not hold the other back, and the forward's partial sums are kept
// per unit, making the result independent of the thread count.
constexpr int64_t CHUNK = 48;

// 2^x for |x| < 126: 2^n times the Taylor series of 2^f = e^(f ln 2), f in [-0.5, 0.5], to
// degree 7 (truncation error below 6e-9, under float rounding).
inline __m256 exp2_ps(__m256 x) {
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5252733804059838e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428441e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821576e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// In place: the 8 rows of an 8 x 8 block become its columns.
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

inline __m256i lanes_below(int valid) {
  alignas(32) int m[8];
  for (int l = 0; l < 8; ++l) m[l] = l < valid ? -1 : 0;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
}

inline float sum8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// 1 / max(||e||, 1e-12) of a row of d floats (as full_softmax.inverse_norms; the squares are
// summed in float32, so a row past ~1e19 gets 1 / inf = 0, like torch's norm for d >= 5).
inline float inverse_norm(const float* e, int d, int full, __m256i tail) {
  __m256 ss = _mm256_setzero_ps();
  for (int v = 0; v < full; ++v) {
    const __m256 x = _mm256_loadu_ps(e + 8 * v);
    ss = _mm256_fmadd_ps(x, x, ss);
  }
  if (8 * full < d) {
    const __m256 x = _mm256_maskload_ps(e + 8 * full, tail);
    ss = _mm256_fmadd_ps(x, x, ss);
  }
  return 1.0f / std::max(std::sqrt(sum8(ss)), 1e-12f);
}

// Q[j][k] = r_j e_jk for the panel's w items (item-major, dp wide; zero past d and past w) and
// P = Qᵀ (dp x W, k-major): the layout whose rows the tiles load along items. r_j is 1, or,
// with r_out, each row's inverse norm, computed here and written there (the rows are read here
// anyway: a separate pass over the table cost about 1 ms a step).
void pack(const float* E, int64_t ld, float* r_out, int w, int d, int dp, float* P, float* Q) {
  const int full = d / 8;
  const __m256i tail = lanes_below(d - 8 * full);
  for (int j = 0; j < W; ++j) {
    float* q = Q + j * dp;
    if (j < w) {
      const float* e = E + j * ld;
      const float rj = r_out ? (r_out[j] = inverse_norm(e, d, full, tail)) : 1.0f;
      const __m256 s = _mm256_set1_ps(rj);
      for (int v = 0; v < full; ++v)
        _mm256_storeu_ps(q + 8 * v, _mm256_mul_ps(_mm256_loadu_ps(e + 8 * v), s));
      if (8 * full < dp)  // masked: never reads past the row's d floats
        _mm256_storeu_ps(q + 8 * full, _mm256_mul_ps(_mm256_maskload_ps(e + 8 * full, tail), s));
    } else {
      for (int v = 0; v < dp / 8; ++v) _mm256_storeu_ps(q + 8 * v, _mm256_setzero_ps());
    }
  }
  for (int jb = 0; jb < W / 8; ++jb)
    for (int kb = 0; kb < dp / 8; ++kb) {
      __m256 t[8];
      for (int i = 0; i < 8; ++i) t[i] = _mm256_loadu_ps(Q + (jb * 8 + i) * dp + kb * 8);
      transpose8(t);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(P + (kb * 8 + i) * W + jb * 8, t[i]);
    }
}

// The 4 x 24 register tile: c[r][0..24) = sum_k A[4k + r] * B[k * ldb + 0..24).
inline void tile_4x24(const float* A, const float* B, int64_t ldb, int K, __m256 c[4][3]) {
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < 3; ++v) c[r][v] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    const __m256 b2 = _mm256_loadu_ps(b + 16);
    const float* a = A + 4 * k;
    __m256 x = _mm256_broadcast_ss(a);
    c[0][0] = _mm256_fmadd_ps(x, b0, c[0][0]);
    c[0][1] = _mm256_fmadd_ps(x, b1, c[0][1]);
    c[0][2] = _mm256_fmadd_ps(x, b2, c[0][2]);
    x = _mm256_broadcast_ss(a + 1);
    c[1][0] = _mm256_fmadd_ps(x, b0, c[1][0]);
    c[1][1] = _mm256_fmadd_ps(x, b1, c[1][1]);
    c[1][2] = _mm256_fmadd_ps(x, b2, c[1][2]);
    x = _mm256_broadcast_ss(a + 2);
    c[2][0] = _mm256_fmadd_ps(x, b0, c[2][0]);
    c[2][1] = _mm256_fmadd_ps(x, b1, c[2][1]);
    c[2][2] = _mm256_fmadd_ps(x, b2, c[2][2]);
    x = _mm256_broadcast_ss(a + 3);
    c[3][0] = _mm256_fmadd_ps(x, b0, c[3][0]);
    c[3][1] = _mm256_fmadd_ps(x, b1, c[3][1]);
    c[3][2] = _mm256_fmadd_ps(x, b2, c[3][2]);
  }
}

// acc[r][0..8 NV) += sum_j Z[r][j] Q[j][0..8 NV) for r < 4, over the items of np consecutive
// panels (their Z rows zstride apart, w_last items in the last one), summed from zero and then
// added to acc. The unroll pragmas keep the accumulators in registers (without them GCC spills
// them every step).
template <int NV>
inline void acc_tile(const float* Z, int64_t zstride, int np, int w_last, const float* Q, int dp,
                     float* acc, int64_t lda) {
  __m256 c[4][NV];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = _mm256_setzero_ps();
  for (int pp = 0; pp < np; ++pp) {
    const float* z = Z + pp * zstride;
    const float* q = Q + pp * W * dp;
    const int w = pp + 1 == np ? w_last : W;
    for (int j = 0; j < w; ++j) {
      __m256 b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(q + j * dp + 8 * v);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m256 x = _mm256_broadcast_ss(z + r * W + j);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(x, b[v], c[r][v]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* a = acc + r * lda + 8 * v;
      _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), c[r][v]));
    }
}

struct Forward {
  const float* S;  // [bpad/4][d][4]: the sessions times log2(e), 4 rows interleaved
  int bpad, d, dp;
  const float* E;  // the first item's row of the table
  int64_t ld;
  float* r;  // out: 1 / ||e_j|| (the items normalised with it), or null: items as they are
  int64_t n;
  float* Z;  // out: [panels][bpad][W], exp of every logit (0 past the last item)

  // Panels [p0, p1): Z, the row sums of Z into sums[bpad], and, when acc is not null,
  // sum_j Z[b][j] r_j e_j into acc[bpad][dp] (the session gradient up to a factor per row).
  void run(int64_t p0, int64_t p1, float* sums, float* acc) const {
    std::vector<float> P(static_cast<size_t>(dp) * W), Q(static_cast<size_t>(NP) * W * dp);
    std::vector<float> part(static_cast<size_t>(bpad) * 8);  // a group's 8-lane partial sums
    std::vector<double> total(bpad, 0.0);
    for (int64_t sp = p0; sp < p1; sp += NP) {
      const int np = static_cast<int>(std::min<int64_t>(NP, p1 - sp));
      std::fill(part.begin(), part.end(), 0.0f);
      int w = W;
      for (int pp = 0; pp < np; ++pp) {
        const int64_t p = sp + pp;
        const int64_t j0 = p * W;
        w = static_cast<int>(std::min<int64_t>(W, n - j0));  // only the last panel is short
        pack(E + j0 * ld, ld, r ? r + j0 : nullptr, w, d, dp, P.data(), Q.data() + pp * W * dp);
        float* zp = Z + p * bpad * W;
        __m256 keep[3];  // exp2 of a padding lane's 0 is 1: zero it
        for (int v = 0; v < 3; ++v)
          keep[v] = _mm256_castsi256_ps(lanes_below(std::max(0, std::min(8, w - 8 * v))));
        for (int g = 0; g < bpad / 4; ++g) {
          __m256 c[4][3];
          tile_4x24(S + static_cast<int64_t>(g) * d * 4, P.data(), W, d, c);
          for (int rr = 0; rr < 4; ++rr) {
            float* out = zp + (g * 4 + rr) * W;
            float* ps = part.data() + (g * 4 + rr) * 8;
            __m256 s = _mm256_loadu_ps(ps);
            for (int v = 0; v < 3; ++v) {
              const __m256 z = _mm256_and_ps(exp2_ps(c[rr][v]), keep[v]);
              s = _mm256_add_ps(s, z);
              _mm256_storeu_ps(out + 8 * v, z);
            }
            _mm256_storeu_ps(ps, s);
          }
        }
      }
      for (int b = 0; b < bpad; ++b)
        for (int l = 0; l < 8; ++l) total[b] += part[b * 8 + l];
      if (acc != nullptr) {
        const float* zs = Z + sp * bpad * W;
        const int64_t zstride = static_cast<int64_t>(bpad) * W;
        const int nv = dp / 8;
        int v = 0;
        while (v < nv) {  // chunks of 3 vectors, then 2 (13 = 3 + 3 + 3 + 2 + 2)
          const int rem = nv - v;
          if (rem >= 5 || rem == 3) {
            for (int g = 0; g < bpad / 4; ++g)
              acc_tile<3>(zs + g * 4 * W, zstride, np, w, Q.data() + 8 * v, dp,
                          acc + static_cast<int64_t>(g) * 4 * dp + 8 * v, dp);
            v += 3;
          } else if (rem >= 2) {
            for (int g = 0; g < bpad / 4; ++g)
              acc_tile<2>(zs + g * 4 * W, zstride, np, w, Q.data() + 8 * v, dp,
                          acc + static_cast<int64_t>(g) * 4 * dp + 8 * v, dp);
            v += 2;
          } else {
            for (int g = 0; g < bpad / 4; ++g)
              acc_tile<1>(zs + g * 4 * W, zstride, np, w, Q.data() + 8 * v, dp,
                          acc + static_cast<int64_t>(g) * 4 * dp + 8 * v, dp);
            v += 1;
          }
        }
      }
    }
    for (int b = 0; b < bpad; ++b) sums[b] = static_cast<float>(total[b]);
  }
};

// Adam (L2 weight decay, no amsgrad) applied to each item row as soon as its gradient is
// known, with the gradient's sparse extra rows (the targets' one-hot part and the tied input
// lookup's rows) added first, one by one in the order a dense gradient would get them
// (index_add), so that a row's gradient has the same bits either way: item xidx[x] (sorted,
// distinct) gets xrows[xoff[x]], ..., xrows[xoff[x + 1] - 1]. The gradient is then never written
// out, nor read back by a separate optimizer pass.
struct AdamRows {
  float* M;  // exp_avg rows, ldm apart
  float* V;  // exp_avg_sq rows
  int64_t ldm;
  float lr_c1;   // lr / (1 - beta1^t)
  float one_b1;  // 1 - beta1
  float b2, one_b2;
  float inv_c2;  // 1 / sqrt(1 - beta2^t)
  float eps, wd;
  const int64_t* xidx;
  const int64_t* xoff;  // [xm + 1]
  const float* xrows;   // [xoff[xm]][d]
  int64_t xm;

  // p ← p - lr_c1 m / (sqrt(v) inv_c2 + eps) for g + wd p, on 8 lanes.
  inline void lanes(__m256 g, __m256& p, __m256& m, __m256& v) const {
    g = _mm256_fmadd_ps(p, _mm256_set1_ps(wd), g);
    m = _mm256_fmadd_ps(_mm256_set1_ps(one_b1), _mm256_sub_ps(g, m), m);
    v = _mm256_fmadd_ps(_mm256_set1_ps(one_b2), _mm256_mul_ps(g, g),
                        _mm256_mul_ps(_mm256_set1_ps(b2), v));
    const __m256 den =
        _mm256_fmadd_ps(_mm256_sqrt_ps(v), _mm256_set1_ps(inv_c2), _mm256_set1_ps(eps));
    p = _mm256_fnmadd_ps(_mm256_set1_ps(lr_c1), _mm256_div_ps(m, den), p);
  }

  // Row `row` (p: its d floats) with gradient g (d floats, then tail lanes of 0 to the next
  // multiple of 8 when gpad); x walks xidx.
  void step(int64_t row, float* p, const float* g, bool gpad, int d, __m256i tail,
            int64_t& x) const {
    while (x < xm && xidx[x] < row) ++x;
    int64_t e0 = 0, e1 = 0;  // the row's extra rows
    if (x < xm && xidx[x] == row) e0 = xoff[x], e1 = xoff[x + 1];
    float* m = M + row * ldm;
    float* v = V + row * ldm;
    const int full = d / 8;
    for (int k = 0; k < full; ++k) {
      __m256 gv = _mm256_loadu_ps(g + 8 * k);
      for (int64_t e = e0; e < e1; ++e) gv = _mm256_add_ps(gv, _mm256_loadu_ps(xrows + e * d + 8 * k));
      __m256 pv = _mm256_loadu_ps(p + 8 * k), mv = _mm256_loadu_ps(m + 8 * k);
      __m256 vv = _mm256_loadu_ps(v + 8 * k);
      lanes(gv, pv, mv, vv);
      _mm256_storeu_ps(p + 8 * k, pv);
      _mm256_storeu_ps(m + 8 * k, mv);
      _mm256_storeu_ps(v + 8 * k, vv);
    }
    if (8 * full < d) {  // masked: plain loads and stores only for whole vectors (AMD's masked
      const int k = full;  // stores are slow)
      __m256 gv = gpad ? _mm256_loadu_ps(g + 8 * k) : _mm256_maskload_ps(g + 8 * k, tail);
      for (int64_t e = e0; e < e1; ++e)
        gv = _mm256_add_ps(gv, _mm256_maskload_ps(xrows + e * d + 8 * k, tail));
      __m256 pv = _mm256_maskload_ps(p + 8 * k, tail), mv = _mm256_maskload_ps(m + 8 * k, tail);
      __m256 vv = _mm256_maskload_ps(v + 8 * k, tail);
      lanes(gv, pv, mv, vv);
      _mm256_maskstore_ps(p + 8 * k, tail, pv);
      _mm256_maskstore_ps(m + 8 * k, tail, mv);
      _mm256_maskstore_ps(v + 8 * k, tail, vv);
    }
  }
};

struct Backward {
  const float* SF;  // [dp/4][bpad][4]: column b holds f_b s_b, 4 dims interleaved
  int bpad, d, dp;
  float* E;  // read; updated in place with adam
  int64_t ld;
  const float* r;
  int64_t n;
  const float* Z;
  float* G;  // out: the items' gradient rows, G[j * ldg + k] (null with adam)
  int64_t ldg;
  const AdamRows* adam;  // not null: each row's gradient goes to Adam instead of G

  // Panels [p0, p1): g_j = sum_b Z[b][j] f_b s_b (the gradient of ê_j), mapped to that of e_j,
  // r_j g_j - r_j^3 (g_j . e_j) e_j, when r is not null. The tiles leave the panel's gradient
  // k-major; it is turned item-major in L1 and each row finished from the table's own row (an
  // earlier version re-packed the panel's unit rows k-major for this and cost 1.3x the time).
  void run(int64_t p0, int64_t p1) const {
    std::vector<float> H(static_cast<size_t>(W) * dp), T(static_cast<size_t>(dp) * W), g(dp);
    const int full = d / 8, nv = dp / 8;
    const __m256i tail = lanes_below(d - 8 * full);
    int64_t x = adam ? std::lower_bound(adam->xidx, adam->xidx + adam->xm, p0 * W) - adam->xidx : 0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j0 = p * W;
      const int w = static_cast<int>(std::min<int64_t>(W, n - j0));
      const float* zp = Z + p * bpad * W;
      for (int gr = 0; gr < (d + 3) / 4; ++gr) {  // rows past that stay 0 (d = 100: 25, not 26)
        __m256 c[4][3];
        tile_4x24(SF + static_cast<int64_t>(gr) * bpad * 4, zp, W, bpad, c);
        for (int rr = 0; rr < 4; ++rr)
          for (int v = 0; v < 3; ++v)
            _mm256_storeu_ps(T.data() + (gr * 4 + rr) * W + 8 * v, c[rr][v]);
      }
      // T (k-major) to H (item-major), through 8 x 8 register transposes.
      for (int kb = 0; kb < nv; ++kb)
        for (int jb = 0; jb < W / 8; ++jb) {
          __m256 t[8];
          for (int i = 0; i < 8; ++i) t[i] = _mm256_loadu_ps(T.data() + (kb * 8 + i) * W + jb * 8);
          transpose8(t);
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(H.data() + (jb * 8 + i) * dp + kb * 8, t[i]);
        }
      for (int j = 0; j < w; ++j) {
        const int64_t row = j0 + j;
        const float* h = H.data() + j * dp;
        float* e = E + row * ld;
        // With adam the finished row goes to g (dp wide, zero past d) and then into the step.
        float* out = adam ? g.data() : G + row * ldg;
        if (r == nullptr) {
          for (int k = 0; k < full; ++k) _mm256_storeu_ps(out + 8 * k, _mm256_loadu_ps(h + 8 * k));
          if (8 * full < d) _mm256_maskstore_ps(out + 8 * full, tail, _mm256_loadu_ps(h + 8 * full));
        } else {
          __m256 dot = _mm256_setzero_ps();
          for (int k = 0; k < full; ++k)
            dot = _mm256_fmadd_ps(_mm256_loadu_ps(h + 8 * k), _mm256_loadu_ps(e + 8 * k), dot);
          if (8 * full < d)
            dot = _mm256_fmadd_ps(_mm256_loadu_ps(h + 8 * full), _mm256_maskload_ps(e + 8 * full, tail),
                                  dot);
          const float rj = r[row];
          const __m256 rv = _mm256_set1_ps(rj);
          // r (h.e) first: r^3 alone leaves float's normal range for rows past norm ~1e13.
          const __m256 coef = _mm256_set1_ps(rj * sum8(dot) * (rj * rj));
          for (int k = 0; k < full; ++k)
            _mm256_storeu_ps(out + 8 * k, _mm256_fnmadd_ps(coef, _mm256_loadu_ps(e + 8 * k),
                                                           _mm256_mul_ps(rv, _mm256_loadu_ps(h + 8 * k))));
          if (8 * full < d)
            _mm256_maskstore_ps(out + 8 * full, tail,
                                _mm256_fnmadd_ps(coef, _mm256_maskload_ps(e + 8 * full, tail),
                                                 _mm256_mul_ps(rv, _mm256_loadu_ps(h + 8 * full))));
        }
        if (adam) adam->step(row, e, out, true, d, tail, x);
      }
    }
  }
};

// body(unit, first panel, end panel) for every unit of CHUNK panels, on `threads` threads of the
// OpenMP runtime torch loaded (same soname, so the same pool: a second pool's threads would
// compete with torch's while they spin after its last parallel op).
template <class F>
void chunked(int64_t panels, int threads, F&& body) {
  const int64_t chunks = (panels + CHUNK - 1) / CHUNK;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, chunks)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) body(c, c * CHUNK, std::min(panels, (c + 1) * CHUNK));
}


}  // namespace

extern "C" {

int fedenc_softmax_panel() { return W; }

int fedenc_softmax_chunk() { return static_cast<int>(CHUNK); }

// sums: [units][bpad], acc: [units][bpad][dp] or null: each unit of CHUNK panels' partial sums
// (acc zeroed here), for the caller to add in unit order. Returns the number of units.
// r: out, n inverse norms (the items are then normalised), or null (items as they are).
int fedenc_softmax_forward(const float* S, int bpad, int d, int dp, const float* E, int64_t ld,
                           float* r, int64_t n, float* Z, float* sums, float* acc, int threads) {
  const Forward f{S, bpad, d, dp, E, ld, r, n, Z};
  const int64_t panels = (n + W - 1) / W;
  chunked(panels, threads, [&](int64_t c, int64_t p0, int64_t p1) {
    float* a = acc ? acc + c * bpad * dp : nullptr;
    if (a) std::fill(a, a + static_cast<int64_t>(bpad) * dp, 0.0f);
    f.run(p0, p1, sums + c * bpad, a);
  });
  return static_cast<int>((panels + CHUNK - 1) / CHUNK);
}

void fedenc_softmax_backward(const float* SF, int bpad, int d, int dp, const float* E, int64_t ld,
                             const float* r, int64_t n, const float* Z, float* G, int64_t ldg,
                             int threads) {
  const Backward b{SF, bpad, d, dp, const_cast<float*>(E), ld, r, n, Z, G, ldg, nullptr};
  const int64_t panels = (n + W - 1) / W;
  chunked(panels, threads, [&](int64_t, int64_t p0, int64_t p1) { b.run(p0, p1); });
}

// The backward with Adam applied to every item row in place of writing G: E, M, V updated.
// xidx (sorted, distinct) and xrows [xm][d]: gradient rows added to those items first.
void fedenc_softmax_backward_adam(const float* SF, int bpad, int d, int dp, float* E, int64_t ld,
                                  const float* r, int64_t n, const float* Z, float* M, float* V,
                                  int64_t ldm, float lr_c1, float one_b1, float b2, float one_b2,
                                  float inv_c2, float eps, float wd, const int64_t* xidx,
                                  const int64_t* xoff, const float* xrows, int64_t xm,
                                  int threads) {
  const AdamRows a{M, V, ldm, lr_c1, one_b1, b2, one_b2, inv_c2, eps, wd, xidx, xoff, xrows, xm};
  const Backward b{SF, bpad, d, dp, E, ld, r, n, Z, nullptr, 0, &a};
  const int64_t panels = (n + W - 1) / W;
  chunked(panels, threads, [&](int64_t, int64_t p0, int64_t p1) { b.run(p0, p1); });
}

// The same Adam step of rows [0, n) of P from a dense gradient G (rows ldg apart): what the
// backward above does to each row, for a gradient that was written out (bit for bit the same
// update for the same gradient row).
void fedenc_adam_rows(float* P, int64_t ldp, const float* G, int64_t ldg, int64_t n, int d,
                      float* M, float* V, int64_t ldm, float lr_c1, float one_b1, float b2,
                      float one_b2, float inv_c2, float eps, float wd, int threads) {
  const AdamRows a{M, V, ldm, lr_c1, one_b1, b2, one_b2, inv_c2, eps, wd, nullptr, nullptr, nullptr, 0};
  const __m256i tail = lanes_below(d - 8 * (d / 8));
  const int64_t blocks = (n + W - 1) / W;
  chunked(blocks, threads, [&](int64_t, int64_t b0, int64_t b1) {
    int64_t x = 0;
    for (int64_t row = b0 * W; row < std::min(n, b1 * W); ++row)
      a.step(row, P + row * ldp, G + row * ldg, false, d, tail, x);
  });
}

}  // extern "C"
