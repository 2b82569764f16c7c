/* The logits store's C kernels (issue 15, item 3): the fused CPU selection of the top-p/top-k
 * entries, their flattening to id order, the top-k shard encoder and the sampled store's Gumbel-max
 * draws (further below).
 *
 * One call handles a range of rows of an fp32 [rows, stride] logits chunk. Per row it makes three
 * passes over the row's `cols` valid columns, all from cache: group maxima (also the row maximum and
 * a NaN check), the sum of exp(x - max) (an AVX2 exp, accumulated in float64) and a compare pass
 * that collects the entries above a threshold bisected on the group maxima (a little more than k
 * of them). Those are radix-sorted (decreasing value, ties: smaller id first, the order of
 * `megatron_kd.logits.truncation`) and the top-p prefix of the first k is counted in float64.
 *
 * The definition is the one of truncation.py's module docstring; the log-sum-exp is computed here
 * (float64 sum of a float32 exp with < 2 ulp error, rounded to float32), so a stored log-prob may
 * differ from the eager path's (torch.logsumexp) by about one float32 ulp of the log-sum-exp.
 * Rows holding a NaN are not handled: the call returns 1 and the caller takes the eager path.
 *
 * Plain C with the CPython API and AVX2/FMA intrinsics (function attributes: the module builds on
 * any x86-64 compiler; `available()` says whether this CPU can run it). No torch headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KD_HAVE_X86 1
#define KD_AVX2 __attribute__((target("avx2,fma")))
#else
#define KD_HAVE_X86 0
#endif

#if KD_HAVE_X86

/* exp of 8 floats, for arguments <= 0 or +inf (x - max): < 2 ulp on [-87.3, 0], exactly 0 below
 * -87.3 (and for -inf), +inf for +inf. Range reduction x = n ln2 + r, |r| <= ln2 / 2, then the
 * degree-7 Taylor polynomial of e^r (truncation error < 1e-8 relative) and 2^n by the exponent. */
KD_AVX2 static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);    /* includes -inf */
    __m256 over = _mm256_cmp_ps(x, _mm256_set1_ps(88.0f), _CMP_GT_OQ);
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - n ln2 with ln2 split in a high part exact in float and the rest */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* n in [-126, 127]: 2^n = (n + 127) << 23 */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    y = _mm256_andnot_ps(under, y);
    return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
}

/* sum_j exp(x_j - m) in float64 (m finite or 0). */
KD_AVX2 static double row_expsum(const float *x, int64_t cols, float m) {
    __m256 mv = _mm256_set1_ps(m);
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    if (j < cols) {  /* the tail through the same exp, padded with -inf (exp = 0) */
        float t[8];
        for (int i = 0; i < 8; i++) t[i] = (j + i < cols) ? x[j + i] - m : -INFINITY;
        __m256 e = exp8(_mm256_loadu_ps(t));
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double d[4];
    _mm256_storeu_pd(d, _mm256_add_pd(s0, s1));
    return (d[0] + d[1]) + (d[2] + d[3]);
}

static inline uint32_t ordered_bits(float v) {
    float z = v + 0.0f; /* -0.0 -> +0.0: they compare equal */
    uint32_t b;
    memcpy(&b, &z, sizeof b);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

static inline float from_ordered(uint32_t b) {
    b = (b & 0x80000000u) ? (b & 0x7FFFFFFFu) : ~b;
    float v;
    memcpy(&v, &b, sizeof v);
    return v;
}

/* Work buffers of one thread, sized for rows of `cols` columns. */
typedef struct {
    float *bm;            /* group maxima */
    int32_t *ci, *ci2;    /* candidate column ids (radix sort ping-pong) */
    uint32_t *ck, *ck2;   /* candidate sort keys (ordered bits of the maximum - of the value: ascending =
                           * decreasing value) */
} work_t;

/* Columns per group of the maxima: the largest power of two B <= 64 with B * B * k <= cols. The
 * groups are strided (group j = columns j, j + cols / B, ...), so their maxima are vertical SIMD
 * maxima; the last cols % B columns are groups of one. */
static int64_t group_size(int64_t cols, int64_t k) {
    int64_t b = 1;
    while (b < 64 && (2 * b) * (2 * b) * k <= cols) b *= 2;
    return b;
}

/* Row maximum and the group maxima into bm (returns their number); *nan set when the row holds a NaN. */
KD_AVX2 static int64_t row_groups(const float *x, int64_t cols, int64_t B, float *bm, float *mx, int *nan) {
    int64_t nb = cols / B, j = 0;
    __m256 m = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
    for (; j + 8 <= nb; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        for (int64_t i = 1; i < B; i++) {
            __m256 w = _mm256_loadu_ps(x + i * nb + j);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(w, w, _CMP_UNORD_Q));
            v = _mm256_max_ps(v, w);
        }
        _mm256_storeu_ps(bm + j, v);
        m = _mm256_max_ps(m, v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    float best = lanes[0];
    for (int i = 1; i < 8; i++) best = lanes[i] > best ? lanes[i] : best;
    int isnan_any = _mm256_movemask_ps(bad) != 0;
    for (; j < nb; j++) {  /* scalar remainder of the groups */
        float v = x[j];
        isnan_any |= v != v;
        for (int64_t i = 1; i < B; i++) {
            float u = x[i * nb + j];
            isnan_any |= u != u;
            v = u > v ? u : v;
        }
        bm[j] = v;
        best = v > best ? v : best;
    }
    int64_t n = nb;
    for (int64_t c = nb * B; c < cols; c++) {  /* the last cols % B columns: groups of one */
        isnan_any |= x[c] != x[c];
        bm[n++] = x[c];
        best = x[c] > best ? x[c] : best;
    }
    *nan = isnan_any;
    *mx = best;
    return n;
}

KD_AVX2 static int64_t count_ge(const float *v, int64_t n, float t) {
    __m256 tv = _mm256_set1_ps(t);
    int64_t c = 0, j = 0;
    for (; j + 8 <= n; j += 8) c += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + j), tv, _CMP_GE_OQ)));
    for (; j < n; j++) c += v[j] >= t;
    return c;
}

/* Stable LSD radix sort of (key, id) pairs by key ascending, 8 bits a pass, only over the bits
 * the keys use (keys relative to the row maximum: usually 3 passes, not 4). The result is in
 * (*k_out, *i_out), one of the two buffer pairs. */
static void radix_sort(uint32_t *k, int32_t *id, uint32_t *k2, int32_t *id2, int64_t n, uint32_t **k_out,
                       int32_t **i_out) {
    uint32_t any = 0;
    for (int64_t i = 0; i < n; i++) any |= k[i];
    for (int shift = 0; shift < 32 && (any >> shift); shift += 8) {
        int32_t hist[256];
        memset(hist, 0, sizeof hist);
        for (int64_t i = 0; i < n; i++) hist[(k[i] >> shift) & 255]++;
        if (hist[(k[0] >> shift) & 255] == n) continue;
        int32_t sum = 0;
        for (int d = 0; d < 256; d++) {
            int32_t h = hist[d];
            hist[d] = sum;
            sum += h;
        }
        for (int64_t i = 0; i < n; i++) {
            int32_t p = hist[(k[i] >> shift) & 255]++;
            k2[p] = k[i];
            id2[p] = id[i];
        }
        uint32_t *tk = k; k = k2; k2 = tk;
        int32_t *ti = id; id = id2; id2 = ti;
    }
    *k_out = k;
    *i_out = id;
}

/* The k largest entries of the row, sorted (decreasing value, ties: smaller id first), into ids.
 * A threshold t with at least k group maxima >= t (so at least k entries >= t, and every top-k entry
 * >= t) is bisected over the ordered float bits on the group maxima until few entries pass; the
 * entries >= t are then collected in column order and radix-sorted by value (a stable sort, so
 * ties keep the smaller id first). */
KD_AVX2 static void row_topk(const float *x, int64_t cols, int64_t k, const float *bm, int64_t nbm, float mx,
                            work_t *w, int64_t *ids) {
    /* count(bm >= lo) >= k always holds; count(bm >= hi) < k once hi is set. Value bisection from
     * [mx - 16, mx] (most rows of an LM: the top-k lie within 16 nats of the maximum), widened
     * downwards when fewer than k group maxima are there; -inf as the last resort. */
    int64_t slack = k / 2 + 16;
    float lo = -INFINITY, hi = mx;  /* hi = mx is not known to have fewer than k: checked at the end */
    if (isfinite(mx)) {
        for (float width = 16.0f; width <= 1024.0f; width *= 4.0f) {
            int64_t c = count_ge(bm, nbm, mx - width);
            if (c >= k) {
                lo = mx - width;
                if (c <= k + slack) goto found;
                break;
            }
            hi = mx - width;
        }
        for (int it = 0; it < 64 && isfinite(lo); it++) {
            float mid = lo + (hi - lo) * 0.5f;
            if (!(mid > lo && mid < hi)) break;  /* float resolution reached */
            int64_t c = count_ge(bm, nbm, mid);
            if (c >= k) {
                lo = mid;
                if (c <= k + slack) break;
            } else {
                hi = mid;
            }
        }
        if (hi == mx && count_ge(bm, nbm, mx) >= k) lo = mx;  /* k or more group maxima tie at the top */
    }
found:;
    float t = lo;
    const uint32_t top = ordered_bits(mx);
    uint32_t *ck_out;
    int32_t *ci_out;
    __m256 tv = _mm256_set1_ps(t);
    int64_t c = 0, j = 0;
    for (; j + 8 <= cols; j += 8) {
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), tv, _CMP_GE_OQ));
        while (mask) {
            int i = __builtin_ctz(mask);
            mask &= mask - 1;
            w->ci[c] = (int32_t)(j + i);
            w->ck[c++] = top - ordered_bits(x[j + i]);
        }
    }
    for (; j < cols; j++)
        if (x[j] >= t) {
            w->ci[c] = (int32_t)j;
            w->ck[c++] = top - ordered_bits(x[j]);
        }
    radix_sort(w->ck, w->ci, w->ck2, w->ci2, c, &ck_out, &ci_out);
    for (int64_t i = 0; i < k; i++) ids[i] = ci_out[i];
}

/* Rows [r0, r1) of (ids [rows, k], lp [rows, k], counts [rows]): each row's first counts[r] entries,
 * sorted by id (ids distinct within a row, in [0, 2^31)), to out_ids / out_lp from offsets[r]. */
static void flatten_rows(const int64_t *ids, const float *lp, const int64_t *counts, const int64_t *offsets,
                         int64_t k, int64_t r0, int64_t r1, int64_t *out_ids, float *out_lp, uint32_t *kb,
                         int32_t *ib) {
    for (int64_t r = r0; r < r1; r++) {
        int64_t n = counts[r];
        for (int64_t j = 0; j < n; j++) {
            kb[j] = (uint32_t)ids[r * k + j];
            ib[j] = (int32_t)j;
        }
        uint32_t *ks;
        int32_t *is;
        radix_sort(kb, ib, kb + k, ib + k, n, &ks, &is);
        int64_t o = offsets[r];
        for (int64_t j = 0; j < n; j++) {
            out_ids[o + j] = ks[j];
            out_lp[o + j] = lp[r * k + is[j]];
        }
    }
}

/* Rows [r0, r1): returns 1 at the first row holding a NaN (outputs then incomplete), else 0. */
static int select_rows(const float *x, int64_t stride, int64_t cols, int64_t k, double top_p,
                       int64_t r0, int64_t r1, int64_t *ids, float *lp, int64_t *counts, float *lse_out,
                       work_t *w) {
    int64_t B = group_size(cols, k);
    for (int64_t r = r0; r < r1; r++) {
        const float *row = x + r * stride;
        int nan = 0;
        float m;
        int64_t nbm = row_groups(row, cols, B, w->bm, &m, &nan);
        if (nan) return 1;
        float mf = isinf(m) ? 0.0f : m;  /* torch.logsumexp's rule: an infinite max counts as 0 */
        float lse = (float)(log(row_expsum(row, cols, mf)) + (double)mf);
        if (lse_out) lse_out[r] = lse;
        int64_t *rid = ids + r * k;
        row_topk(row, cols, k, w->bm, nbm, m, w, rid);
        double cum = 0.0;
        int64_t n = 0;
        for (int64_t j = 0; j < k; j++) {
            double l = (double)row[rid[j]] - (double)lse;
            double p = exp(l);
            cum += p;
            /* kept when the mass before it is < top_p: (cum - p), as the eager path's cumsum */
            if ((top_p >= 1.0 || cum - p < top_p) && isfinite(l)) n++;  /* top_p >= 1: every finite entry */
            lp[r * k + j] = (float)l;
        }
        counts[r] = n < 1 ? 1 : n;
    }
    return 0;
}

static int cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}


/* ---- Gumbel-max draws of the sampled store (sampling.py `draw_tokens`, TP = 1, stages 1 and 2) ----
 * The caller computes each row's block log-sum-exps `lse` [rows, B] (float64) and the draw keys
 * `dkeys` [rows, N] in torch, as the eager path does; this replaces the eager path's two
 * [rows, N, B] and [rows, N, block] noise tensors (a dozen passes each) by one pass per draw. The
 * hash is the integer mix of sampling.py (exact); the Gumbel noise -log(-log(u)) uses the float64
 * log below (< 1 ulp, like torch's), so scores can differ from the eager path's in the last bit and
 * a draw can differ only where two scores of one race tie to ~1e-16 (not seen in the tests). */
#define KD_M32 0xFFFFFFFFull

static inline uint64_t mix32_1(uint64_t x) {
    x ^= x >> 16;
    x = (x * 0x7FEB352Dull) & KD_M32;
    x ^= x >> 15;
    x = (x * 0x2C1B3C6Dull) & KD_M32;
    x ^= x >> 15;
    x = (x * 0x297A2D39ull) & KD_M32;
    return x ^ (x >> 16);
}

/* mix32_1 on four 64-bit lanes holding values < 2^32 (products of < 2^32 by < 2^31: exact in 64 bits) */
KD_AVX2 static inline __m256i mix32_4(__m256i x) {
    const __m256i m = _mm256_set1_epi64x((long long)KD_M32);
    x = _mm256_xor_si256(x, _mm256_srli_epi64(x, 16));
    x = _mm256_and_si256(_mm256_mul_epu32(x, _mm256_set1_epi64x(0x7FEB352D)), m);
    x = _mm256_xor_si256(x, _mm256_srli_epi64(x, 15));
    x = _mm256_and_si256(_mm256_mul_epu32(x, _mm256_set1_epi64x(0x2C1B3C6D)), m);
    x = _mm256_xor_si256(x, _mm256_srli_epi64(x, 15));
    x = _mm256_and_si256(_mm256_mul_epu32(x, _mm256_set1_epi64x(0x297A2D39)), m);
    return _mm256_xor_si256(x, _mm256_srli_epi64(x, 16));
}

/* Exact float64 of four 64-bit lanes holding integers in [0, 2^52). */
KD_AVX2 static inline __m256d small_u64_to_pd(__m256i v) {
    const __m256i magic = _mm256_set1_epi64x(0x4330000000000000LL); /* 2^52 */
    return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(v, magic)), _mm256_set1_pd(4503599627370496.0));
}

/* Natural log of four positive normal doubles (no zeros, infinities, NaNs or subnormals: the
 * arguments here are uniforms in [2^-33, 1) and their negated logs), < 1 ulp: x = 2^k (1 + f) with
 * 1 + f in [sqrt(2)/2, sqrt(2)), s = f / (2 + f), log(1 + f) = f - s (f - R(s^2)) through the
 * classical degree-14 minimax polynomial in s, and k ln2 in two parts. */
KD_AVX2 static inline __m256d log4(__m256d x) {
    const __m256i bits = _mm256_castpd_si256(x);
    __m256d k = _mm256_sub_pd(small_u64_to_pd(_mm256_srli_epi64(bits, 52)), _mm256_set1_pd(1023.0));
    __m256d m = _mm256_castsi256_pd(_mm256_or_si256(
        _mm256_and_si256(bits, _mm256_set1_epi64x(0x000FFFFFFFFFFFFFLL)), _mm256_set1_epi64x(0x3FF0000000000000LL)));
    __m256d big = _mm256_cmp_pd(m, _mm256_set1_pd(1.4142135623730951), _CMP_GE_OQ);
    m = _mm256_blendv_pd(m, _mm256_mul_pd(m, _mm256_set1_pd(0.5)), big);
    k = _mm256_add_pd(k, _mm256_and_pd(big, _mm256_set1_pd(1.0)));
    const __m256d f = _mm256_sub_pd(m, _mm256_set1_pd(1.0));
    const __m256d s = _mm256_div_pd(f, _mm256_add_pd(_mm256_set1_pd(2.0), f));
    const __m256d z = _mm256_mul_pd(s, s), w = _mm256_mul_pd(z, z);
    __m256d t1 = _mm256_fmadd_pd(w, _mm256_set1_pd(1.531383769920937332e-01), _mm256_set1_pd(2.222219843214978396e-01));
    t1 = _mm256_fmadd_pd(w, t1, _mm256_set1_pd(3.999999999940941908e-01));
    t1 = _mm256_mul_pd(w, t1);
    __m256d t2 = _mm256_fmadd_pd(w, _mm256_set1_pd(1.479819860511658591e-01), _mm256_set1_pd(1.818357216161805012e-01));
    t2 = _mm256_fmadd_pd(w, t2, _mm256_set1_pd(2.857142874366239149e-01));
    t2 = _mm256_fmadd_pd(w, t2, _mm256_set1_pd(6.666666666666735130e-01));
    t2 = _mm256_mul_pd(z, t2);
    const __m256d r = _mm256_add_pd(t1, t2);
    const __m256d hfsq = _mm256_mul_pd(_mm256_set1_pd(0.5), _mm256_mul_pd(f, f));
    /* k ln2_hi - ((hfsq - (s (hfsq + R) + k ln2_lo)) - f) */
    __m256d inner = _mm256_fmadd_pd(s, _mm256_add_pd(hfsq, r), _mm256_mul_pd(k, _mm256_set1_pd(1.90821492927058770002e-10)));
    inner = _mm256_sub_pd(_mm256_sub_pd(hfsq, inner), f);
    return _mm256_sub_pd(_mm256_mul_pd(k, _mm256_set1_pd(6.93147180369123816490e-01)), inner);
}

/* Standard Gumbel noise of four 32-bit hashes: u = (h + 0.5) / 2^32 (exact), -log(-log(u)). */
KD_AVX2 static inline __m256d gumbel4(__m256i h) {
    const __m256d u = _mm256_mul_pd(_mm256_add_pd(small_u64_to_pd(h), _mm256_set1_pd(0.5)),
                                    _mm256_set1_pd(2.3283064365386963e-10));
    const __m256d neg = _mm256_set1_pd(-0.0);
    return _mm256_xor_pd(log4(_mm256_xor_pd(log4(u), neg)), neg);
}

/* Index of the first maximum of v[0..n) (the first entry for an all -inf row, as torch's argmax). */
static inline int64_t first_argmax(const double *v, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Rows [r0, r1): out[r, d] = the draw of key dkeys[r, d] (see sampling.py), -1 for an empty row.
 * x fp32 [rows, stride] (the first cols columns used), lse float64 [rows, nb] (nb = ceil(cols / block)),
 * scratch: 4 * (max(nb, block) + 4) doubles. */
KD_AVX2 static void draw_rows(const float *x, int64_t stride, int64_t cols, const double *lse, int64_t nb, int64_t block,
                              const int64_t *dkeys, int64_t n_draws, int64_t r0, int64_t r1, int64_t *out,
                              double *scratch) {
    const int64_t nb4 = (nb + 3) & ~(int64_t)3, bl4 = (block + 3) & ~(int64_t)3;
    uint64_t *bhash = (uint64_t *)scratch;                 /* [nb4]: mix32((b ^ salt) & M32) */
    double *score = scratch + nb4;                         /* [max(nb4, bl4)] */
    for (int64_t b = 0; b < nb4; b++) bhash[b] = mix32_1(((uint64_t)b ^ 0x68E31DA4ull) & KD_M32);
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * stride;
        const double *lr = lse + r * nb;
        for (int64_t d = 0; d < n_draws; d++) {
            const __m256i key = _mm256_set1_epi64x(dkeys[r * n_draws + d]);
            /* stage 1: the block race lse_b + G_b */
            for (int64_t b = 0; b < nb4; b += 4) {
                __m256i h = mix32_4(_mm256_xor_si256(key, _mm256_loadu_si256((const __m256i *)(bhash + b))));
                _mm256_storeu_pd(score + b, gumbel4(h));
            }
            for (int64_t b = 0; b < nb; b++) score[b] += lr[b];
            const int64_t chosen = first_argmax(score, nb);
            const double best = score[chosen];
            if (!isfinite(best)) {
                out[r * n_draws + d] = -1;
                continue;
            }
            /* stage 2: the id race x_v + G_v inside the chosen block (ids past cols: -inf) */
            const int64_t base = chosen * block;
            for (int64_t j = 0; j < bl4; j += 4) {
                const __m256i id = _mm256_add_epi64(_mm256_set1_epi64x(base + j), _mm256_setr_epi64x(0, 1, 2, 3));
                __m256i ih = mix32_4(_mm256_and_si256(_mm256_xor_si256(id, _mm256_set1_epi64x(0x5BD1E995)),
                                                      _mm256_set1_epi64x((long long)KD_M32)));
                _mm256_storeu_pd(score + j, gumbel4(mix32_4(_mm256_xor_si256(key, ih))));
            }
            for (int64_t j = 0; j < block; j++) {
                const int64_t v = base + j;
                score[j] = v < cols ? score[j] + (double)xr[v] : -INFINITY;
            }
            const int64_t a = first_argmax(score, block);
            out[r * n_draws + d] = isfinite(score[a]) ? base + a : -1;
        }
    }
}

#endif /* KD_HAVE_X86 */

/* ---- the store codec's encoder, top-k layout (codec.py `_encode` with values, no draws) ---------
 * Returns 0, or 1 on input the numpy encoder refuses or that this one does not handle (a count
 * above 255, an id out of range or not increasing inside a token, a non-finite log-prob, a
 * width beyond the table): the caller then runs the numpy encoder, which raises its own error. */
#if defined(__FLT16_MAX__)
#define KD_HAVE_F16 1
static inline int bit_length64(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }

/* OR the low `width` (<= 25) bits of val at bit `pos` of buf (little-endian bit order; buf has 8
 * bytes of slack past the last field). */
static inline void put_field(uint8_t *buf, int64_t pos, int width, uint64_t val) {
    if (!width) return;
    uint64_t v = val << (pos & 7);
    uint8_t *b = buf + (pos >> 3);
    for (int i = 0; v; i++, v >>= 8) b[i] |= (uint8_t)v;
}

static int encode_topk(const int64_t *counts, int64_t T, const int64_t *ids, const float *lp, const int64_t *seg_len,
                       int64_t S, int id_bits, double step, const int64_t *value_widths, int n_widths,
                       int64_t max_q, uint8_t *out_count, uint8_t *out_widths, uint16_t *out_top,
                       int64_t *out_seg_bytes, int64_t *tok_bits, int64_t *q, uint8_t *payload, int64_t payload_cap,
                       int64_t *payload_len) {
    /* pass 1: per token top, widths, bits; per entry quantised gaps q */
    if (id_bits < 1 || id_bits > 25) return 1;
    int64_t e = 0;
    for (int64_t t = 0; t < T; t++) {
        int64_t n = counts[t];
        if (n < 0 || n > 255) return 1;
        out_count[t] = (uint8_t)n;
        if (!n) {
            out_widths[t] = 0;
            out_top[t] = 0;
            tok_bits[t] = 0;
            continue;
        }
        double top = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            double v = (double)lp[e + j];
            if (!isfinite(v)) return 1;
            top = v > top ? v : top;
        }
        _Float16 h = (_Float16)top;
        memcpy(&out_top[t], &h, sizeof h);
        double topd = (double)h;
        uint64_t gmax = 0, qmax = 0;
        if (ids[e] < 0 || ids[e] >= ((int64_t)1 << id_bits)) return 1;
        for (int64_t j = 0; j < n; j++) {
            if (j) {
                int64_t g = ids[e + j] - ids[e + j - 1] - 1;
                if (g < 0 || ids[e + j] >= ((int64_t)1 << id_bits)) return 1;
                gmax = (uint64_t)g > gmax ? (uint64_t)g : gmax;
            }
            double r = rint((topd - (double)lp[e + j]) / step);
            int64_t qq = r < 0 ? 0 : (r > (double)max_q ? max_q : (int64_t)r);
            q[e + j] = qq;
            qmax = (uint64_t)qq > qmax ? (uint64_t)qq : qmax;
        }
        int idw = bit_length64(gmax), vneed = bit_length64(qmax), vcode = 0;
        while (vcode < n_widths && value_widths[vcode] < vneed) vcode++;
        if (idw > 25 || vcode >= n_widths || vcode > 7) return 1;
        out_widths[t] = (uint8_t)(idw | (vcode << 5));
        tok_bits[t] = id_bits + (n - 1) * idw + n * value_widths[vcode];
        e += n;
    }
    /* segments: byte-aligned runs of tokens */
    int64_t t0 = 0, total = 0;
    for (int64_t s = 0; s < S; s++) {
        if (seg_len[s] < 0 || t0 + seg_len[s] > T) return 1;
        int64_t bits = 0;
        for (int64_t t = t0; t < t0 + seg_len[s]; t++) bits += tok_bits[t];
        out_seg_bytes[s] = (bits + 7) / 8;
        total += out_seg_bytes[s];
        t0 += seg_len[s];
    }
    if (t0 != T || total + 8 > payload_cap) return 1;
    memset(payload, 0, (size_t)(total + 8));
    /* pass 2: the fields */
    int64_t pos0 = 0;
    e = 0;
    t0 = 0;
    for (int64_t s = 0; s < S; s++) {
        int64_t pos = pos0 * 8;
        for (int64_t t = t0; t < t0 + seg_len[s]; t++) {
            int64_t n = counts[t];
            if (!n) continue;
            int idw = out_widths[t] & 31;
            int vw = (int)value_widths[out_widths[t] >> 5];
            put_field(payload, pos, id_bits, (uint64_t)ids[e]);
            int64_t p = pos + id_bits;
            for (int64_t j = 1; j < n; j++, p += idw) put_field(payload, p, idw, (uint64_t)(ids[e + j] - ids[e + j - 1] - 1));
            for (int64_t j = 0; j < n; j++, p += vw) put_field(payload, p, vw, (uint64_t)q[e + j]);
            pos = p;
            e += n;
        }
        pos0 += out_seg_bytes[s];
        t0 += seg_len[s];
    }
    *payload_len = total;
    return 0;
}
#else
#define KD_HAVE_F16 0
#endif


static PyObject *py_available(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#if KD_HAVE_X86
    return PyBool_FromLong(cpu_ok());
#else
    Py_RETURN_FALSE;
#endif
}

/* 1 where this build and this CPU run the AVX2 kernels; otherwise 0 with a RuntimeError set (the
 * entry points below then return NULL: their bodies exist only in x86-64 builds). */
static int require_avx2(void) {
#if KD_HAVE_X86
    if (cpu_ok()) return 1;
    PyErr_SetString(PyExc_RuntimeError, "_topk_native: this CPU has no AVX2/FMA");
#else
    PyErr_SetString(PyExc_RuntimeError, "_topk_native: built without x86-64 support");
#endif
    return 0;
}

static PyObject *py_select_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long xa, ida, lpa, na, lsea;
    long long stride, cols, k, r0, r1;
    double top_p;
    if (!PyArg_ParseTuple(args, "KLLLdLLKKKK", &xa, &stride, &cols, &k, &top_p, &r0, &r1, &ida, &lpa, &na, &lsea))
        return NULL;
    if (!require_avx2()) return NULL;
#if KD_HAVE_X86
    if (k < 1 || k > cols || cols < 1 || stride < cols || r0 < 0 || r1 < r0) {
        PyErr_SetString(PyExc_ValueError, "_topk_native.select_rows: need 1 <= k <= cols <= stride, 0 <= r0 <= r1");
        return NULL;
    }
    work_t w;
    void *mem = malloc((size_t)cols * (sizeof(float) + 2 * sizeof(int32_t) + 2 * sizeof(uint32_t)));
    if (!mem) return PyErr_NoMemory();
    w.bm = (float *)mem;
    w.ci = (int32_t *)(w.bm + cols);
    w.ci2 = w.ci + cols;
    w.ck = (uint32_t *)(w.ci2 + cols);
    w.ck2 = w.ck + cols;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = select_rows((const float *)(uintptr_t)xa, stride, cols, k, top_p, r0, r1, (int64_t *)(uintptr_t)ida,
                     (float *)(uintptr_t)lpa, (int64_t *)(uintptr_t)na, (float *)(uintptr_t)lsea, &w);
    Py_END_ALLOW_THREADS
    free(mem);
    return PyLong_FromLong(rc);
#else
    return NULL;
#endif
}

static PyObject *py_flatten_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long ida, lpa, na, offa, oia, ola;
    long long k, r0, r1;
    if (!PyArg_ParseTuple(args, "KKKKLLLKK", &ida, &lpa, &na, &offa, &k, &r0, &r1, &oia, &ola)) return NULL;
    if (k < 1 || r0 < 0 || r1 < r0) {
        PyErr_SetString(PyExc_ValueError, "_topk_native.flatten_rows: need k >= 1, 0 <= r0 <= r1");
        return NULL;
    }
    if (!require_avx2()) return NULL;
#if KD_HAVE_X86
    void *mem = malloc((size_t)(2 * k) * (sizeof(uint32_t) + sizeof(int32_t)));
    if (!mem) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    flatten_rows((const int64_t *)(uintptr_t)ida, (const float *)(uintptr_t)lpa, (const int64_t *)(uintptr_t)na,
                 (const int64_t *)(uintptr_t)offa, k, r0, r1, (int64_t *)(uintptr_t)oia, (float *)(uintptr_t)ola,
                 (uint32_t *)mem, (int32_t *)((uint32_t *)mem + 2 * k));
    Py_END_ALLOW_THREADS
    free(mem);
    Py_RETURN_NONE;
#else
    return NULL;
#endif
}

static PyObject *py_encode_topk(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long ca, ia, la, sa, vwa, oca, owa, ota, osa, tba, qa, pa;
    long long T, S, nw, maxq, cap;
    int id_bits;
    double step;
    if (!PyArg_ParseTuple(args, "KLKKKLidKLLKKKKKKKL", &ca, &T, &ia, &la, &sa, &S, &id_bits, &step, &vwa, &nw, &maxq,
                          &oca, &owa, &ota, &osa, &tba, &qa, &pa, &cap))
        return NULL;
#if KD_HAVE_F16
    int64_t len = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = encode_topk((const int64_t *)(uintptr_t)ca, T, (const int64_t *)(uintptr_t)ia, (const float *)(uintptr_t)la,
                     (const int64_t *)(uintptr_t)sa, S, id_bits, step, (const int64_t *)(uintptr_t)vwa, (int)nw, maxq,
                     (uint8_t *)(uintptr_t)oca, (uint8_t *)(uintptr_t)owa, (uint16_t *)(uintptr_t)ota,
                     (int64_t *)(uintptr_t)osa, (int64_t *)(uintptr_t)tba, (int64_t *)(uintptr_t)qa,
                     (uint8_t *)(uintptr_t)pa, cap, &len);
    Py_END_ALLOW_THREADS
    return rc ? PyLong_FromLong(-1) : PyLong_FromLongLong(len);
#else
    return PyLong_FromLong(-1);
#endif
}

static PyObject *py_draw_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long xa, la, ka, oa;
    long long stride, cols, nb, block, n_draws, r0, r1;
    if (!PyArg_ParseTuple(args, "KLLKLLKLLLK", &xa, &stride, &cols, &la, &nb, &block, &ka, &n_draws, &r0, &r1, &oa))
        return NULL;
    if (cols < 1 || stride < cols || block < 1 || nb != (cols + block - 1) / block || n_draws < 1 || r0 < 0 || r1 < r0) {
        PyErr_SetString(PyExc_ValueError, "_topk_native.draw_rows: need cols <= stride, nb = ceil(cols / block), "
                                          "n_draws >= 1, 0 <= r0 <= r1");
        return NULL;
    }
    if (!require_avx2()) return NULL;
#if KD_HAVE_X86
    const int64_t width = (nb > block ? nb : block) + 4;
    double *scratch = (double *)malloc((size_t)(2 * width) * sizeof(double));
    if (!scratch) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    draw_rows((const float *)(uintptr_t)xa, stride, cols, (const double *)(uintptr_t)la, nb, block,
              (const int64_t *)(uintptr_t)ka, n_draws, r0, r1, (int64_t *)(uintptr_t)oa, scratch);
    Py_END_ALLOW_THREADS
    free(scratch);
    Py_RETURN_NONE;
#else
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", py_available, METH_NOARGS, "Whether this CPU runs the kernel (AVX2 + FMA)."},
    {"select_rows", py_select_rows, METH_VARARGS,
     "select_rows(x_ptr, stride, cols, k, top_p, r0, r1, ids_ptr, lp_ptr, counts_ptr, lse_ptr) -> 0, or 1 on a "
     "NaN row. x fp32 [rows, stride] (first cols columns used), ids int64 [rows, k], lp fp32 [rows, k], "
     "counts int64 [rows], lse fp32 [rows] (lse_ptr 0: not written)."},
    {"flatten_rows", py_flatten_rows, METH_VARARGS,
     "flatten_rows(ids_ptr, lp_ptr, counts_ptr, offsets_ptr, k, r0, r1, out_ids_ptr, out_lp_ptr): each row's kept "
     "entries sorted by id, at offsets[r] of the flat outputs (int64 / fp32)."},
    {"encode_topk", py_encode_topk, METH_VARARGS,
     "encode_topk(counts, T, ids, lp_f32, seg_len, S, id_bits, step, value_widths, n_widths, max_q, out_count, "
     "out_widths, out_top_f16, out_seg_bytes, scratch_tok_bits[T], scratch_q[E], payload, payload_cap) -> payload "
     "bytes, or -1 where the numpy encoder must run (all arguments but the scalars are data pointers)."},
    {"draw_rows", py_draw_rows, METH_VARARGS,
     "draw_rows(x_ptr, stride, cols, lse_ptr, nb, block, dkeys_ptr, n_draws, r0, r1, out_ptr): the sampled store's "
     "Gumbel-max draws (sampling.py draw_tokens at TP = 1): x fp32 [rows, stride], lse float64 [rows, nb], dkeys "
     "int64 [rows, n_draws], out int64 [rows, n_draws] (-1: empty row)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_topk_native",
                                    "The logits store's C kernels: CPU top-p/top-k selection, flattening, top-k encoder, Gumbel-max draws.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__topk_native(void) { return PyModule_Create(&module); }
