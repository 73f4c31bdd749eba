// y[m, n] = sum_k x[m, k] * w[n, k] with Intel AMX tiles, over weights packed once at start-up.
//
// Why: a decode step of 16 rows is a matrix of 16 rows against every weight; AVX-512 dot products
// (bf16_rows.c) are compute-bound there on this CPU, and torch's kernel reads the weights at about
// half the memory rate (CLAUDE.md, "bf16 kernels"). One AMX tile product multiplies 16 rows by a
// 32 x 16 block of weights, so the weights stream at the memory rate for 1 to 16 rows alike.
//
// Packed layout (amx_pack): for each block of 16 outputs and each 32 inputs, 1 KiB holding 16 rows
// (pairs of inputs) of 16 outputs x 2 inputs: the layout of an AMX B tile. Blocks of one output block
// follow each other, so a block of outputs is one sequential read.
//
// Each output is computed by the same tile operations whatever M or the thread, so a row's result
// does not depend on the other rows of its batch (batched decoding equals solo decoding).

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define GROUP 4  // output blocks of 16 computed together (4 accumulator tiles)
#define AHEAD 2  // weight blocks prefetched ahead of the one being read

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

// The kernel asks Linux for AMX once per process; 0 where it is refused.
int amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

// w: [N, K] -> packed [N / 16, K / 32, 16, 32] of `size`-byte elements (bf16 weights, or int8 ones
// to be widened to bf16 on the way: int8_rows); N a multiple of 16, K of 32.
void amx_pack(const char *w, char *packed, int64_t N, int64_t K, int size) {
    int64_t blocks_k = K / 32;
    #pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < N / 16; nb++)
        for (int64_t kb = 0; kb < blocks_k; kb++) {
            char *out = packed + (nb * blocks_k + kb) * 512 * size;
            for (int pair = 0; pair < 16; pair++)
                for (int n = 0; n < 16; n++)
                    memcpy(out + (pair * 32 + n * 2) * size, w + ((nb * 16 + n) * K + kb * 32 + pair * 2) * size,
                           2 * size);
        }
}

static void configure(int rows) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 7; t++) config.colsb[t] = 64;  // tile 7 unused: a tile without rows must have no columns
    for (int t = 0; t < GROUP; t++) config.rows[t] = rows;  // accumulators: rows x 16 fp32
    config.rows[4] = rows;                                  // activations: rows x 32 bf16
    config.rows[5] = config.rows[6] = 16;                   // weights: 16 pairs x 16 outputs
    _tile_loadconfig(&config);
}

static inline uint16_t round_bf16(float value) {
    union { float f; uint32_t u; } bits = {value};
    if ((bits.u & 0x7F800000u) == 0x7F800000u) return (uint16_t)(bits.u >> 16);  // inf, nan
    return (uint16_t)((bits.u + 0x7FFFu + ((bits.u >> 16) & 1u)) >> 16);
}

// The accumulator tile into y (times the int8 weights' per-output scales, if any), rounded to bf16.
static void store(int tile, uint16_t *y, int64_t m, int rows, int64_t n, int64_t N, const float *scales) {
    float out[16 * 16];
    switch (tile) {  // tile numbers are immediates
        case 0: _tile_stored(0, out, 64); break;
        case 1: _tile_stored(1, out, 64); break;
        case 2: _tile_stored(2, out, 64); break;
        default: _tile_stored(3, out, 64); break;
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 16; c++)
            y[(m + r) * N + n + c] = round_bf16(scales ? out[r * 16 + c] * scales[n + c] : out[r * 16 + c]);
}

// Four weight streams at once are more than the hardware prefetcher follows at the memory rate:
// asking for the blocks AHEAD ahead measured 16 -> 20 GB/s (CLAUDE.md). Past the end it is harmless.
static inline void prefetch_block(const uint16_t *block) {
    for (int line = 0; line < 16; line++) _mm_prefetch((const char *)block + line * 64, _MM_HINT_T0);
}

// One step of 32 inputs: the activation rows at xk (row stride K) times four weight tiles, added to
// accumulators 0-3 (tile numbers are immediates, so the four are written out).
static inline __attribute__((always_inline)) void four_products(
        const uint16_t *xk, int64_t K, const uint16_t *b0, const uint16_t *b1, const uint16_t *b2,
        const uint16_t *b3) {
    _tile_loadd(4, xk, K * 2);
    _tile_loadd(5, b0, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, b1, 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, b2, 64);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, b3, 64);
    _tile_dpbf16ps(3, 4, 6);
}

// Four output blocks (b: their packed weights, one after the other) into outputs n..n+64 of rows m..m+rows.
static void group_of_four(const uint16_t *b, const uint16_t *x, uint16_t *y, int64_t n, int64_t m,
                          int rows, int64_t N, int64_t K, const float *scales) {
    int64_t blocks_k = K / 32, stride = blocks_k * 512;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t kb = 0; kb < blocks_k; kb++, b += 512) {
        for (int t = 0; t < GROUP; t++) prefetch_block(b + t * stride + AHEAD * 512);
        four_products(x + m * K + kb * 32, K, b, b + stride, b + 2 * stride, b + 3 * stride);
    }
    for (int t = 0; t < GROUP; t++) store(t, y, m, rows, n + t * 16, N, scales);
}

// One output block (the last ones of an N that is not a multiple of 64): the same operations per output.
static void single_block(const uint16_t *b, const uint16_t *x, uint16_t *y, int64_t n, int64_t m,
                         int rows, int64_t N, int64_t K, const float *scales) {
    _tile_zero(0);
    for (int64_t kb = 0; kb < K / 32; kb++, b += 512) {
        _tile_loadd(4, x + m * K + kb * 32, K * 2);
        _tile_loadd(5, b, 64);
        _tile_dpbf16ps(0, 4, 5);
    }
    store(0, y, m, rows, n, N, scales);
}

// The output blocks nb..nb+count (packed weights b) for every row of x.
static void blocks(const uint16_t *b, const uint16_t *x, uint16_t *y, int64_t nb, int64_t count, int64_t M,
                   int64_t N, int64_t K, const float *scales, int *configured) {
    int64_t stride = K / 32 * 512;
    for (int64_t m = 0; m < M; m += 16) {
        int rows = M - m < 16 ? (int)(M - m) : 16;
        if (rows != *configured) configure(*configured = rows);
        if (count == GROUP) group_of_four(b, x, y, nb * 16, m, rows, N, K, scales);
        else
            for (int64_t i = 0; i < count; i++) single_block(b + i * stride, x, y, (nb + i) * 16, m, rows, N, K, scales);
    }
}

// x: [M, K] bf16, y: [M, N] bf16, packed bf16 weights as amx_pack left them.
void amx_rows(const uint16_t *packed, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K,
              int threads) {
    int64_t blocks_n = N / 16, stride = K / 32 * 512;
    #pragma omp parallel num_threads(threads)
    {
        int configured = -1;
        #pragma omp for schedule(static)
        for (int64_t nb = 0; nb < blocks_n; nb += GROUP) {
            int64_t count = blocks_n - nb < GROUP ? blocks_n - nb : GROUP;
            blocks(packed + nb * stride, x, y, nb, count, M, N, K, NULL, &configured);
        }
        if (configured >= 0) _tile_release();
    }
}

// int8 values to bf16 (exact: every int8 is a bf16), same order; count a multiple of 32. The source is
// read once, from memory: prefetching ahead of it measured 8.8 -> 10.4 GB/s of int8 (CLAUDE.md).
static void widen(const int8_t *q, uint16_t *out, int64_t count) {
    for (int64_t i = 0; i < count; i += 32) {
        if ((i & 63) == 0) _mm_prefetch((const char *)(q + i + 2048), _MM_HINT_T0);
        __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i))));
        __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i + 16))));
        _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
}

// Decode (at most 16 rows): each block of int8 weights is widened just before its tile product, into
// a buffer that stays in L1, so that widening overlaps the memory stream and the tile work.
static void int8_group_of_four(const int8_t *q, const uint16_t *x, uint16_t *y, int64_t n, int rows,
                               int64_t N, int64_t K, const float *scales) {
    int64_t blocks_k = K / 32, stride = blocks_k * 512;
    uint16_t wide[GROUP][512] __attribute__((aligned(64)));
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t kb = 0; kb < blocks_k; kb++, q += 512) {
        for (int t = 0; t < GROUP; t++) widen(q + t * stride, wide[t], 512);
        four_products(x + kb * 32, K, wide[0], wide[1], wide[2], wide[3]);
    }
    for (int t = 0; t < GROUP; t++) store(t, y, 0, rows, n + t * 16, N, scales);
}

// Weight-only int8. Decode steps widen block by block (above); longer inputs (prefill) widen a whole
// group of output blocks once into a buffer of the thread's and multiply every row block from it.
// Both apply the same tile operations to each output, so a row's result does not depend on M.
// Returns 0, or -1 where a thread's buffer could not be allocated (y is then incomplete).
int amx_rows_int8(const int8_t *packed, const float *scales, const uint16_t *x, uint16_t *y, int64_t M,
                  int64_t N, int64_t K, int threads) {
    int64_t blocks_n = N / 16, stride = K / 32 * 512;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        int configured = -1;
        uint16_t *wide = NULL;  // only for prefill and a last partial group: decode steps do without
        #pragma omp for schedule(static)
        for (int64_t nb = 0; nb < blocks_n; nb += GROUP) {
            int64_t count = blocks_n - nb < GROUP ? blocks_n - nb : GROUP;
            if (M <= 16 && count == GROUP) {
                if ((int)M != configured) configure(configured = (int)M);
                int8_group_of_four(packed + nb * stride, x, y, nb * 16, (int)M, N, K, scales);
                continue;
            }
            if (!wide && !(wide = aligned_alloc(64, GROUP * stride * sizeof(uint16_t)))) {
                #pragma omp atomic write
                failed = 1;
                continue;
            }
            widen(packed + nb * stride, wide, count * stride);
            blocks(wide, x, y, nb, count, M, N, K, scales, &configured);
        }
        free(wide);
        if (configured >= 0) _tile_release();
    }
    return failed ? -1 : 0;
}

// Rows `ids` of the weight, unpacked into out [count, K]: an embedding tied to a packed lm_head.
void amx_gather(const uint16_t *packed, const int64_t *ids, uint16_t *out, int64_t count, int64_t K) {
    int64_t blocks_k = K / 32;
    for (int64_t i = 0; i < count; i++) {
        int64_t nb = ids[i] / 16, n = ids[i] % 16;
        for (int64_t kb = 0; kb < blocks_k; kb++) {
            const uint16_t *block = packed + (nb * blocks_k + kb) * 512;
            for (int pair = 0; pair < 16; pair++)
                for (int e = 0; e < 2; e++) out[i * K + kb * 32 + pair * 2 + e] = block[pair * 32 + n * 2 + e];
        }
    }
}
