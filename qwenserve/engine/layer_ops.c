// The small operations of a bf16 decoder layer, each one call instead of a chain of torch ops.
//
// Why: on the bench model a decode step spent 10 ms of one row's 28 (18 of sixteen rows' 35) outside
// the projections: norms, q/k norms and rope, cache writes, attention and the MLP's gate, each a
// dozen small torch ops with their own dispatch and temporaries (CLAUDE.md, "Layer ops").
//
// Each operation rounds to bf16 where Transformers' Qwen3 modules do (the norm's normalized input,
// rope's two products and their sum, silu before the gate product) and computes in fp32 between, so
// the values are those of the modules but for the order of a sum (a norm's mean of squares, an
// attention's dot products). Every token and every row is computed on its own: a row's result does
// not depend on the other rows of its batch. Widths (hidden size, head size / 2, the MLP's) are
// multiples of 16, one AVX-512 vector of fp32 (layer_ops.py checks).

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m512 load16(const uint16_t *p) {  // 16 bf16 -> 16 fp32 (exact)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

// Rounded to nearest even as torch rounds; subnormals (below 1.2e-38) become zero, which torch keeps.
static inline void store16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __m512 round16(__m512 v) {  // v rounded to bf16, back in fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// e^x within about an ulp: e^x = 2^n e^r, |r| <= ln2 / 2, e^r by its Taylor series to r^7 (the next
// term is below 1e-8 of it). libm's scalar expf cost 10 ns an element: most of the MLP gate's time.
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline float exp1(float x) {
    float out[16];
    _mm512_storeu_ps(out, exp16(_mm512_set1_ps(x)));
    return out[0];
}

static float sum_of_squares(const uint16_t *x, int64_t dim) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
        __m512 v = load16(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// One row: out = weight * bf16(x * rsqrt(mean(x^2) + eps)), as Qwen3's RMSNorm.
static void norm_row(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t dim, float eps) {
    __m512 scale = _mm512_set1_ps(1.0f / sqrtf(sum_of_squares(x, dim) / (float)dim + eps));
    for (int64_t i = 0; i < dim; i += 16)
        store16(out + i, _mm512_mul_ps(load16(weight + i), round16(_mm512_mul_ps(load16(x + i), scale))));
}

// x, out: [rows, dim].
void rms_norm(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t dim, float eps) {
    #pragma omp parallel for schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * dim, weight, out + r * dim, dim, eps);
}

// The residual and the next norm: sum = bf16(hidden + delta), normed = rms_norm(sum). All [rows, dim].
void add_rms_norm(const uint16_t *hidden, const uint16_t *delta, const uint16_t *weight, uint16_t *sum,
                  uint16_t *normed, int64_t rows, int64_t dim, float eps) {
    #pragma omp parallel for schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < dim; i += 16)
            store16(sum + r * dim + i, _mm512_add_ps(load16(hidden + r * dim + i), load16(delta + r * dim + i)));
        norm_row(sum + r * dim, weight, normed + r * dim, dim, eps);
    }
}

// gate_up: [rows, 2 * width] (gate, then up); out: [rows, width] = bf16(bf16(silu(gate)) * up); width
// a multiple of 16.
void silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t width) {
    #pragma omp parallel for schedule(static) if (rows * width >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * width, *up = gate + width;
        for (int64_t i = 0; i < width; i += 16) {
            __m512 g = load16(gate + i);
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            store16(out + r * width + i, _mm512_mul_ps(round16(silu), load16(up + i)));
        }
    }
}

// One head of one token: its norm, then rope (Transformers' rotate_half form, bf16 between products).
static void norm_rope(const uint16_t *x, const uint16_t *weight, float eps, const uint16_t *cos,
                      const uint16_t *sin, uint16_t *out, int dim) {
    uint16_t normed[dim];
    norm_row(x, weight, normed, dim, eps);
    int half = dim / 2;  // a multiple of 16
    for (int i = 0; i < dim; i += 16) {
        __m512 rotated = i < half ? _mm512_sub_ps(_mm512_setzero_ps(), load16(normed + i + half)) : load16(normed + i - half);
        __m512 a = round16(_mm512_mul_ps(load16(normed + i), load16(cos + i)));
        __m512 b = round16(_mm512_mul_ps(rotated, load16(sin + i)));
        store16(out + i, _mm512_add_ps(a, b));
    }
}

// qkv: [tokens, (heads + 2 * kv_heads) * dim], a fused projection's output. Writes q, normed and
// rotated, to q_out [tokens, heads, dim], and each token's k (normed, rotated) and v into the cache
// at [slots[t], head, writes[t]] (cache buffers [slots, kv_heads, positions, dim]).
void qk_rope_store(const uint16_t *qkv, int64_t tokens, int heads, int kv_heads, int dim,
                   const uint16_t *q_weight, const uint16_t *k_weight, float eps, const uint16_t *cos,
                   const uint16_t *sin, uint16_t *q_out, uint16_t *keys, uint16_t *values,
                   const int64_t *slots, const int64_t *writes, int64_t positions) {
    int64_t width = (int64_t)(heads + 2 * kv_heads) * dim;
    #pragma omp parallel for schedule(static) if (tokens >= 64)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *row = qkv + t * width, *c = cos + t * dim, *s = sin + t * dim;
        for (int h = 0; h < heads; h++)
            norm_rope(row + h * dim, q_weight, eps, c, s, q_out + (t * heads + h) * dim, dim);
        for (int h = 0; h < kv_heads; h++) {
            int64_t at = ((slots[t] * kv_heads + h) * positions + writes[t]) * dim;
            norm_rope(row + (heads + h) * dim, k_weight, eps, c, s, keys + at, dim);
            const uint16_t *v = row + (heads + kv_heads + h) * dim;
            memcpy(values + at, v, dim * sizeof(uint16_t));
        }
    }
}

static float dot(const uint16_t *a, const uint16_t *b, int dim) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < dim; i += 16) acc = _mm512_fmadd_ps(load16(a + i), load16(b + i), acc);
    return _mm512_reduce_add_ps(acc);
}

// acc[0..32) (or [0..64) when `wide`) = sum_j p[j] v[j], rows of v `dim` apart; the sums stay in registers.
static inline void accumulate(const float *p, const uint16_t *v, int64_t span, int dim, float *acc, int wide) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < span; j++) {
        __m512 weight = _mm512_set1_ps(p[j]);
        const uint16_t *row = v + j * dim;
        a0 = _mm512_fmadd_ps(weight, load16(row), a0);
        a1 = _mm512_fmadd_ps(weight, load16(row + 16), a1);
        if (wide) {
            a2 = _mm512_fmadd_ps(weight, load16(row + 32), a2);
            a3 = _mm512_fmadd_ps(weight, load16(row + 48), a3);
        }
    }
    _mm512_storeu_ps(acc, a0);
    _mm512_storeu_ps(acc + 16, a1);
    if (wide) {
        _mm512_storeu_ps(acc + 32, a2);
        _mm512_storeu_ps(acc + 48, a3);
    }
}

// out = sum_j softmax(scores)[j] v[j] (scores overwritten), v's rows `dim` apart.
static void softmax_weighted(float *scores, int64_t span, const uint16_t *v, int dim, float *acc, uint16_t *out) {
    float best = -INFINITY, total = 0.0f;
    for (int64_t j = 0; j < span; j++) best = scores[j] > best ? scores[j] : best;
    int64_t j = 0;
    for (; j + 16 <= span; j += 16)
        _mm512_storeu_ps(scores + j, exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(best))));
    for (; j < span; j++) scores[j] = exp1(scores[j] - best);
    for (j = 0; j < span; j++) total += scores[j];
    for (int c = 0, wide; c < dim; c += wide ? 64 : 32) {
        wide = dim - c >= 64;
        accumulate(scores, v + c, span, dim, acc + c, wide);
    }
    __m512 inverse_total = _mm512_set1_ps(1.0f / total);
    for (int i = 0; i < dim; i += 16) store16(out + i, _mm512_mul_ps(_mm512_loadu_ps(acc + i), inverse_total));
}

// One query (a decode step's token) per row against positions 0..lengths[r] of its slot slots[r]:
// q [rows, heads, dim], out [rows, heads * dim], dim a multiple of 32; softmax in fp32. The heads
// sharing a kv head are done together: its keys and values come from memory once, then from cache.
// Returns 0, or -1 where a thread's buffers could not be allocated (out is then incomplete).
int decode_attention(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int64_t *slots,
                     const int64_t *lengths, int64_t rows, int heads, int kv_heads, int dim, int64_t positions,
                     float scale, uint16_t *out) {
    int group = heads / kv_heads;
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; r++) longest = lengths[r] + 1 > longest ? lengths[r] + 1 : longest;
    int failed = 0;
    #pragma omp parallel if (rows * heads * longest >= 16384)
    {
        float *scores = malloc(sizeof(float) * group * longest), *acc = malloc(sizeof(float) * dim);
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < rows * kv_heads; task++) {
            if (!scores || !acc) {
                #pragma omp atomic write
                failed = 1;
                continue;
            }
            int64_t r = task / kv_heads, span = lengths[r] + 1, first = r * heads + task % kv_heads * group;
            const uint16_t *k = keys + (slots[r] * kv_heads + task % kv_heads) * positions * dim;
            const uint16_t *v = values + (slots[r] * kv_heads + task % kv_heads) * positions * dim;
            for (int64_t j = 0; j < span; j++)
                for (int g = 0; g < group; g++) scores[g * longest + j] = dot(q + (first + g) * dim, k + j * dim, dim) * scale;
            for (int g = 0; g < group; g++)
                softmax_weighted(scores + g * longest, span, v, dim, acc, out + (first + g) * dim);
        }
        free(scores);
        free(acc);
    }
    return failed ? -1 : 0;
}

// ---- a whole decode step ------------------------------------------------------------------------

void amx_rows(const uint16_t *packed, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K, int threads);
int amx_rows_int8(const int8_t *packed, const float *scales, const uint16_t *x, uint16_t *y, int64_t M, int64_t N,
                  int64_t K, int threads);

// One layer's weights (packed as amx_pack left them; `scales` NULL for bf16, per-output for int8),
// norms and cache buffers: what decode_layers reads, laid out as layer_ops.py's LayerPointers.
typedef struct {
    const void *qkv, *o, *gate_up, *down;
    const float *qkv_scales, *o_scales, *gate_up_scales, *down_scales;
    const uint16_t *input_norm, *post_norm, *q_norm, *k_norm;
    uint16_t *keys, *values;
} layer_pointers;

static int project(const void *packed, const float *scales, const uint16_t *x, uint16_t *y, int64_t M, int64_t N,
                   int64_t K, int threads) {
    if (scales) return amx_rows_int8(packed, scales, x, y, M, N, K, threads);
    amx_rows(packed, x, y, M, N, K, threads);
    return 0;
}

// A decode step (one token per row) through every layer, the same calls in the same order as
// layer_ops.py's LayerOpsDecoder._run, without returning to Python between them. hidden [rows, dim]
// (the embedded tokens) is overwritten; normed [rows, dim] receives the final norm of the last
// layer's output (the lm_head's input). sizes: dim, heads, kv_heads, head_dim, intermediate. Row r
// writes its key and value at writes[r] and attends to positions 0..lengths[r].
// Returns 0, or -1 where a buffer could not be allocated.
int decode_layers(const layer_pointers *layers, int count, uint16_t *hidden, uint16_t *normed,
                  const uint16_t *final_norm, int64_t rows, const int64_t *sizes, float eps, float qk_eps,
                  const uint16_t *cos, const uint16_t *sin, const int64_t *slots, const int64_t *writes,
                  const int64_t *lengths, int64_t positions, float scale, int threads) {
    int64_t dim = sizes[0], heads = sizes[1], kv_heads = sizes[2], head_dim = sizes[3], inner = sizes[4];
    int64_t qkv_width = (heads + 2 * kv_heads) * head_dim, widest = qkv_width > 2 * inner ? qkv_width : 2 * inner;
    uint16_t *wide = malloc(rows * widest * 2), *q = malloc(rows * heads * head_dim * 2);
    uint16_t *mixed = malloc(rows * (inner > heads * head_dim ? inner : heads * head_dim) * 2);
    uint16_t *delta = malloc(rows * dim * 2);
    int failed = !wide || !q || !mixed || !delta;
    if (!failed) rms_norm(hidden, layers[0].input_norm, normed, rows, dim, eps);
    for (int i = 0; i < count && !failed; i++) {
        const layer_pointers *l = layers + i;
        failed |= project(l->qkv, l->qkv_scales, normed, wide, rows, qkv_width, dim, threads);
        qk_rope_store(wide, rows, heads, kv_heads, head_dim, l->q_norm, l->k_norm, qk_eps, cos, sin, q, l->keys,
                      l->values, slots, writes, positions);
        failed |= decode_attention(q, l->keys, l->values, slots, lengths, rows, heads, kv_heads, head_dim, positions,
                                   scale, mixed);
        failed |= project(l->o, l->o_scales, mixed, delta, rows, dim, heads * head_dim, threads);
        add_rms_norm(hidden, delta, l->post_norm, hidden, normed, rows, dim, eps);
        failed |= project(l->gate_up, l->gate_up_scales, normed, wide, rows, 2 * inner, dim, threads);
        silu_mul(wide, mixed, rows, inner);
        failed |= project(l->down, l->down_scales, mixed, delta, rows, dim, inner, threads);
        add_rms_norm(hidden, delta, i + 1 < count ? layers[i + 1].input_norm : final_norm, hidden, normed, rows, dim,
                     eps);
    }
    free(wide);
    free(q);
    free(mixed);
    free(delta);
    return failed ? -1 : 0;
}
