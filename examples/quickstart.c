/* quickstart.c - a compressed KV cache with mustafar.h, start to finish.

   Builds a cache for 2 layers (8 KV heads, 32 query heads, head_dim 128,
   70 % sparsity for K and V, fp16), appends a 1000-token prefill and 20 decode
   steps of synthetic data, runs decode attention after every step and compares
   it with exact attention computed in double precision.

   Build:  cc -std=c99 -O2 quickstart.c -o quickstart -lm -ldl
   It runs on the GPU when the CUDA runtime, NVRTC and a GPU are found at
   run time, else on the CPU; no CUDA header or library is needed to build.
*/
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LAYERS   2
#define HKV      8      /* KV heads */
#define HQ       32     /* query heads: GQA group of 4 */
#define D        128    /* head_dim */
#define SPARSITY 0.7f   /* fraction of every token vector pruned */
#define WINDOW   32     /* newest tokens kept dense */
#define PREFILL  1000
#define STEPS    20
#define TOKENS   (PREFILL + STEPS)

static mustafar_context *ctx;

static void check(mustafar_status st, const char *what) {
    if (st == MUSTAFAR_OK) return;
    fprintf(stderr, "%s failed: %s: %s\n", what, mustafar_status_string(st),
            mustafar_last_error(ctx));
    exit(1);
}

/* ---- buffers in the backend's memory: device memory for CUDA, else host -- */
static void *buf_alloc(size_t bytes) {
    void *p = NULL;
    check(mustafar_memory_alloc(ctx, bytes, &p), "mustafar_memory_alloc");
    return p;
}

/* dir 0: host -> buffer, 1: buffer -> host (waits for the library's queued work) */
static void buf_copy(void *dst, const void *src, size_t bytes, int dir) {
    if (dir) check(mustafar_memory_download(ctx, dst, src, bytes), "mustafar_memory_download");
    else check(mustafar_memory_upload(ctx, dst, src, bytes), "mustafar_memory_upload");
}

static void buf_free(void *p) { mustafar_memory_free(ctx, p); }

/* ---- synthetic data ------------------------------------------------------ */
static uint64_t rng = 0x9E3779B97F4A7C15ull;

static double uniform(void) {                   /* xorshift64*, in (0, 1) */
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return ((double)((rng * 0x2545F4914F6CDD1Dull) >> 11) + 0.5) / 9007199254740992.0;
}

static float randn(void) {                      /* Box-Muller */
    return (float)(sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()));
}

/* Post-RoPE keys have a few channels of much larger magnitude in every token. */
static float key_channel_scale(int c) {
    switch (c) { case 5: return 12.0f; case 37: return 20.0f;
                 case 70: return 15.0f; case 101: return 10.0f; default: return 1.0f; }
}

static double f16_table[65536];                 /* fp16 -> double, filled in main */
static uint16_t h16(float x) { return mustafar_f32_to_f16(x); }
static double f64(uint16_t h) { return f16_table[h]; }

/* Exact attention of one layer in double: out[HQ][D].  Tokens t < split are
   read from k_old/v_old, the rest from k/v (both [TOKENS][HKV][D]). */
static void reference(const uint16_t *k_old, const uint16_t *v_old, const uint16_t *k,
                      const uint16_t *v, int split, int len, const uint16_t *q, double *out) {
    static double w[TOKENS];
    for (int h = 0; h < HQ; h++) {
        int kvh = h / (HQ / HKV);
        double mx = -1e300, sum = 0.0;
        for (int t = 0; t < len; t++) {
            const uint16_t *kt = (t < split ? k_old : k) + ((size_t)t * HKV + kvh) * D;
            double s = 0.0;
            for (int c = 0; c < D; c++) s += f64(q[h * D + c]) * f64(kt[c]);
            w[t] = s / sqrt((double)D);
            if (w[t] > mx) mx = w[t];
        }
        for (int t = 0; t < len; t++) { w[t] = exp(w[t] - mx); sum += w[t]; }
        for (int c = 0; c < D; c++) out[h * D + c] = 0.0;
        for (int t = 0; t < len; t++) {
            const uint16_t *vt = (t < split ? v_old : v) + ((size_t)t * HKV + kvh) * D;
            for (int c = 0; c < D; c++) out[h * D + c] += w[t] / sum * f64(vt[c]);
        }
    }
}

static double rel_error(const uint16_t *out, const double *ref) {
    double num = 0.0, den = 0.0;
    for (int i = 0; i < HQ * D; i++) {
        double d = f64(out[i]) - ref[i];
        num += d * d; den += ref[i] * ref[i];
    }
    return sqrt(num / den);
}

int main(void) {
    /* 1. Context: AUTO takes the GPU when there is a usable one. */
    char why[512] = "";
    mustafar_context_desc cd;
    memset(&cd, 0, sizeof cd);
    cd.backend = MUSTAFAR_BACKEND_AUTO;
    cd.error_buffer = why;                      /* the reason, if create fails */
    cd.error_buffer_size = sizeof why;
    mustafar_status st = mustafar_context_create(&cd, &ctx);
    if (st != MUSTAFAR_OK) {
        fprintf(stderr, "mustafar_context_create failed: %s: %s\n",
                mustafar_status_string(st), why);
        return 1;
    }
    int on_gpu = mustafar_context_backend(ctx) == MUSTAFAR_BACKEND_CUDA;
    printf("mustafar.h %s, backend: %s\n", mustafar_version_string(), on_gpu ? "CUDA" : "CPU");
    if (!on_gpu && mustafar_last_error(ctx)[0])
        printf("  note: %s\n", mustafar_last_error(ctx));

    /* 2. Cache: the pool is allocated once, up front. */
    mustafar_cache_desc d;
    memset(&d, 0, sizeof d);
    d.num_layers = LAYERS; d.num_kv_heads = HKV; d.num_q_heads = HQ; d.head_dim = D;
    d.k_sparsity = SPARSITY; d.v_sparsity = SPARSITY;
    d.dense_window = WINDOW; d.page_size = 16;
    d.capacity_tokens = 4096; d.max_sequences = 4; d.dtype = MUSTAFAR_DTYPE_F16;
    mustafar_cache *cache;
    check(mustafar_cache_create(ctx, &d, &cache), "mustafar_cache_create");
    int seq;
    check(mustafar_cache_add_sequence(cache, &seq), "mustafar_cache_add_sequence");

    for (int i = 0; i < 65536; i++) f16_table[i] = (double)mustafar_f16_to_f32((uint16_t)i);

    /* 3. Synthetic K/V for every layer and token, [LAYERS][TOKENS][HKV][D] fp16. */
    size_t per_layer = (size_t)TOKENS * HKV * D, all = LAYERS * per_layer;
    uint16_t *k = (uint16_t *)malloc(all * 2), *v = (uint16_t *)malloc(all * 2);
    uint16_t *k_pruned = (uint16_t *)malloc(all * 2), *v_pruned = (uint16_t *)malloc(all * 2);
    if (!k || !v || !k_pruned || !v_pruned) { fprintf(stderr, "out of host memory\n"); return 1; }
    for (size_t i = 0; i < all; i++) {
        k[i] = h16(randn() * key_channel_scale((int)(i % D)));
        v[i] = h16(randn());
    }
    /* The same rule the cache applies, as a stateless call on host memory
       (ctx NULL): used below to tell pruning error from implementation error. */
    check(mustafar_prune(NULL, D, SPARSITY, MUSTAFAR_DTYPE_F16, k, k_pruned, all / D), "prune K");
    check(mustafar_prune(NULL, D, SPARSITY, MUSTAFAR_DTYPE_F16, v, v_pruned, all / D), "prune V");

    uint16_t *dk = (uint16_t *)buf_alloc(all * 2), *dv = (uint16_t *)buf_alloc(all * 2);
    uint16_t *dq = (uint16_t *)buf_alloc(HQ * D * 2), *dout = (uint16_t *)buf_alloc(HQ * D * 2);
    buf_copy(dk, k, all * 2, 0);
    buf_copy(dv, v, all * 2, 0);

    /* 4. Prefill: append the prompt's tokens to every layer in one call each. */
    int n = PREFILL;
    for (int l = 0; l < LAYERS; l++)
        check(mustafar_cache_append(cache, l, 1, &seq, &n, dk + l * per_layer, dv + l * per_layer),
              "mustafar_cache_append (prefill)");

    /* 5. Decode: per step and layer, append the new token and attend (one
          call: on an sm_90+ GPU the attention overlaps the append). */
    uint16_t q[HQ * D], out[HQ * D];
    static double ref[HQ * D];
    double err_dense[LAYERS] = {0}, err_pruned[LAYERS] = {0};
    for (int step = 0; step < STEPS; step++) {
        for (int l = 0; l < LAYERS; l++) {
            size_t off = l * per_layer + (size_t)(PREFILL + step) * HKV * D;
            n = 1;
            for (int i = 0; i < HQ * D; i++) q[i] = h16(randn());
            buf_copy(dq, q, sizeof q, 0);
            check(mustafar_cache_decode_step(cache, l, 1, &seq, &n, dk + off, dv + off, dq, dout, 0.0f),
                  "mustafar_cache_decode_step");
            buf_copy(out, dout, sizeof out, 1);

            /* Reference 1: dense attention on the unpruned K/V. */
            int len = mustafar_cache_sequence_length(cache, seq, l);
            const uint16_t *kl = k + l * per_layer, *vl = v + l * per_layer;
            reference(kl, vl, kl, vl, 0, len, q, ref);
            double e = rel_error(out, ref);
            if (e > err_dense[l]) err_dense[l] = e;
            /* Reference 2: exact attention on what the cache holds (pruned
               records, then the dense window). */
            mustafar_paged_seq sv;
            check(mustafar_cache_sequence_view(cache, seq, l, &sv), "mustafar_cache_sequence_view");
            reference(k_pruned + l * per_layer, v_pruned + l * per_layer, kl, vl,
                      sv.num_compressed, len, q, ref);
            e = rel_error(out, ref);
            if (e > err_pruned[l]) err_pruned[l] = e;
        }
    }

    /* 6. Report. */
    mustafar_cache_stats stats;
    check(mustafar_cache_stats_get(cache, &stats), "mustafar_cache_stats_get");
    mustafar_paged_seq sv;
    check(mustafar_cache_sequence_view(cache, seq, 0, &sv), "mustafar_cache_sequence_view");
    printf("tokens held: %d per layer (%d compressed, %d in the dense window); "
           "%lld token vectors (K or V)\n", mustafar_cache_sequence_length(cache, seq, 0),
           (int)sv.num_compressed, (int)sv.num_window, (long long)stats.token_vectors);
    printf("record: %zu bytes per token vector (dense fp16: %d)\n",
           mustafar_record_bytes(D, SPARSITY, MUSTAFAR_DTYPE_F16), D * 2);
    printf("K+V bytes: %lld held vs %lld dense -> %.1f %% of dense (%.2fx smaller)\n",
           (long long)stats.record_bytes, (long long)stats.dense_bytes,
           100.0 * stats.compression_ratio, 1.0 / stats.compression_ratio);
    printf("pool: %lld of %lld pages in use, %lld bytes reserved\n", (long long)stats.pages_used,
           (long long)stats.pages_total, (long long)stats.reserved_bytes);
    /* The data is random: with i.i.d. Gaussian values, pruning 70 % of a value
       vector removes about 22 % of its energy, so the first number is large
       by construction.  It says nothing about model quality (the paper
       measures that on real models); the second checks the implementation. */
    printf("relative L2 error of the output, worst over %d decode steps (random Gaussian data,\n"
           "the worst case for magnitude pruning: real keys and values have outlier channels\n"
           "that carry most of the energy; the paper measures quality on real models):\n", STEPS);
    for (int l = 0; l < LAYERS; l++)
        printf("  layer %d: %.4f vs dense attention (effect of %.0f %% pruning), "
               "%.6f vs exact attention on the pruned cache\n",
               l, err_dense[l], 100.0 * SPARSITY, err_pruned[l]);

    buf_free(dk); buf_free(dv); buf_free(dq); buf_free(dout);
    free(k); free(v); free(k_pruned); free(v_pruned);
    mustafar_cache_destroy(cache);
    mustafar_context_destroy(ctx);
    return 0;
}
