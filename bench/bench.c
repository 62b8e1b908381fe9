/* Decode-attention and append benchmark of mustafar.h on the CUDA backend.

   bench [--quick] [--csv FILE] [--row B,T,D] [--sparsity S] [--init | --no-init]

   For every row: a cache of B sequences of T tokens (Llama-3-8B attention
   shapes by default, K with outlier channels), timed with CUDA events (10
   warm-up calls, median of 50), rotating over enough sequence sets that the
   bytes touched exceed 4x the L2 cache.  Reports the sparse kernel at s=0.5
   and 0.7 and the library's own dense path (s=0: every element kept) on the
   same shapes, the bytes each one reads, achieved bandwidth, and the floor
   (bytes / measured device copy bandwidth).  Also: prefill compression and
   per-step append throughput, and cold/warm JIT init. */
#define _POSIX_C_SOURCE 199309L
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"

#include <stdlib.h>
#include <time.h>

#define CHECK_CUDA(x)                                                                        \
    do {                                                                                     \
        cudaError_t e_ = (x);                                                                \
        if (e_ != cudaSuccess) {                                                             \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)
#define CHECK(ctx, x)                                                                        \
    do {                                                                                     \
        mustafar_status s_ = (x);                                                            \
        if (s_ != MUSTAFAR_OK) {                                                             \
            fprintf(stderr, "%s:%d: %s: %s: %s\n", __FILE__, __LINE__, #x,                   \
                    mustafar_status_string(s_), mustafar_last_error(ctx));                   \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
/* Roughly normal: sum of four uniforms, centred and scaled. */
static float rng_normal(void)
{
    uint64_t r = rng_next();
    float s = 0.0f;
    int i;
    for (i = 0; i < 4; i++) s += (float)((r >> (16 * i)) & 0xFFFF) / 65536.0f;
    return (s - 2.0f) * 1.7320508f;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* A pool of random token vectors on the host: K with outlier channels
   (channels c % 32 == 5 scaled 12x, as in post-RoPE keys), V plain. */
typedef struct pool { uint16_t *k, *v; size_t vectors; int d; } pool;

static void pool_make(pool *p, size_t vectors, int d, mustafar_dtype dt)
{
    size_t i;
    p->vectors = vectors;
    p->d = d;
    p->k = (uint16_t *)malloc(vectors * d * 2);
    p->v = (uint16_t *)malloc(vectors * d * 2);
    for (i = 0; i < vectors * (size_t)d; i++) {
        float kx = rng_normal() * ((i % d) % 32 == 5 ? 12.0f : 1.0f);
        float vx = rng_normal();
        p->k[i] = dt == MUSTAFAR_DTYPE_BF16 ? mustafar_f32_to_bf16(kx) : mustafar_f32_to_f16(kx);
        p->v[i] = dt == MUSTAFAR_DTYPE_BF16 ? mustafar_f32_to_bf16(vx) : mustafar_f32_to_f16(vx);
    }
}

typedef struct row {
    int batch, tokens, hq, hkv, d;
    float sparsity;
} row;

typedef struct result {
    double ms, bytes, append_ms, step_append_ms, prefill_s, prefill_bytes;
} result;

static double copy_bandwidth(void)
{
    size_t bytes = (size_t)1 << 30;
    void *a, *b;
    float t[20], ms;
    int i;
    cudaEvent_t e0, e1;
    CHECK_CUDA(cudaMalloc(&a, bytes));
    CHECK_CUDA(cudaMalloc(&b, bytes));
    CHECK_CUDA(cudaMemset(a, 1, bytes));
    CHECK_CUDA(cudaEventCreate(&e0));
    CHECK_CUDA(cudaEventCreate(&e1));
    for (i = 0; i < 3; i++) CHECK_CUDA(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    for (i = 0; i < 20; i++) {
        CHECK_CUDA(cudaEventRecord(e0, 0));
        CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0));
        CHECK_CUDA(cudaEventRecord(e1, 0));
        CHECK_CUDA(cudaEventSynchronize(e1));
        CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        t[i] = ms;
    }
    qsort(t, 20, sizeof t[0], cmp_float);
    cudaFree(a);
    cudaFree(b);
    return 2.0 * bytes / (t[10] * 1e-3);
}

/* Builds the cache (timing the prefill), then times decode attention and the
   per-step append of one token per sequence. */
static result run_row(mustafar_context *ctx, const row *r, const pool *pl, size_t l2_bytes, int quick)
{
    mustafar_cache_desc d;
    mustafar_cache *cache;
    result res;
    const int window = 32, chunk = 2048;
    size_t krec = mustafar_record_bytes(r->d, r->sparsity, MUSTAFAR_DTYPE_F16);
    double set_bytes = (double)r->batch * r->hkv *
                       ((double)(r->tokens - window) * 2 * krec + (double)window * 4 * r->d);
    int sets = (int)(4.0 * l2_bytes / set_bytes) + 1, s, i, b, iters = quick ? 20 : 50;
    int *ids, *counts;
    uint16_t *dk, *dv, *dq, *dout;
    size_t max_chunk_vectors;
    float *times;
    cudaEvent_t e0, e1;
    if (sets > 64) sets = 64;
    memset(&res, 0, sizeof res);
    memset(&d, 0, sizeof d);
    d.num_layers = 1;
    d.num_kv_heads = r->hkv;
    d.num_q_heads = r->hq;
    d.head_dim = r->d;
    d.k_sparsity = d.v_sparsity = r->sparsity;
    d.dense_window = window;
    d.page_size = 16;
    d.max_sequences = sets * r->batch;
    d.capacity_tokens = (int64_t)sets * r->batch * (r->tokens + 16 + 512);
    d.max_sequence_length = r->tokens + 512;
    CHECK(ctx, mustafar_cache_create(ctx, &d, &cache));
    ids = (int *)malloc(sizeof(int) * d.max_sequences);
    counts = (int *)malloc(sizeof(int) * d.max_sequences);
    for (i = 0; i < d.max_sequences; i++) CHECK(ctx, mustafar_cache_add_sequence(cache, &ids[i]));
    max_chunk_vectors = (size_t)r->batch * chunk * r->hkv;
    CHECK_CUDA(cudaMalloc((void **)&dk, max_chunk_vectors * r->d * 2));
    CHECK_CUDA(cudaMalloc((void **)&dv, max_chunk_vectors * r->d * 2));
    /* prefill, chunk by chunk for a whole batch set at a time */
    {
        size_t off = 0;
        for (s = 0; s < sets; s++) {
            int done = 0;
            while (done < r->tokens) {
                int n = r->tokens - done < chunk ? r->tokens - done : chunk;
                size_t nvec = (size_t)r->batch * n * r->hkv;
                if (nvec > pl->vectors) { fprintf(stderr, "pool too small\n"); exit(1); }
                if (off + nvec > pl->vectors) off = (size_t)(rng_next() % (pl->vectors - nvec + 1));
                CHECK_CUDA(cudaMemcpy(dk, pl->k + off * r->d, nvec * r->d * 2, cudaMemcpyHostToDevice));
                CHECK_CUDA(cudaMemcpy(dv, pl->v + off * r->d, nvec * r->d * 2, cudaMemcpyHostToDevice));
                off += nvec;
                for (b = 0; b < r->batch; b++) counts[b] = n;
                CHECK(ctx, mustafar_cache_append(cache, 0, r->batch, ids + s * r->batch, counts, dk, dv));
                done += n;
            }
        }
        CHECK_CUDA(cudaDeviceSynchronize());
    }
    CHECK_CUDA(cudaMalloc((void **)&dq, (size_t)r->batch * r->hq * r->d * 2));
    CHECK_CUDA(cudaMalloc((void **)&dout, (size_t)r->batch * r->hq * r->d * 2));
    CHECK_CUDA(cudaMemcpy(dq, pl->k, (size_t)r->batch * r->hq * r->d * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaEventCreate(&e0));
    CHECK_CUDA(cudaEventCreate(&e1));
    times = (float *)malloc(sizeof(float) * iters);
    for (i = 0; i < 10 + iters; i++) {
        float ms;
        int set = i % sets;
        CHECK_CUDA(cudaEventRecord(e0, 0));
        CHECK(ctx, mustafar_cache_attention(cache, 0, r->batch, ids + set * r->batch, dq, dout, 0.0f));
        CHECK_CUDA(cudaEventRecord(e1, 0));
        CHECK_CUDA(cudaEventSynchronize(e1));
        CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= 10) times[i - 10] = ms;
    }
    qsort(times, iters, sizeof(float), cmp_float);
    res.ms = times[iters / 2];
    res.bytes = set_bytes + 2.0 * r->batch * r->hq * r->d * 2;
    /* one decode step's append: one token per sequence, each evicting one
       token from the window into a record.  Timed as a pipelined stream of
       50 steps (the host runs ahead, as in a decode loop), per step. */
    for (b = 0; b < r->batch; b++) counts[b] = 1;
    for (i = 0; i < 3; i++) {
        float ms;
        int k;
        CHECK_CUDA(cudaEventRecord(e0, 0));
        for (k = 0; k < 50; k++)
            CHECK(ctx, mustafar_cache_append(cache, 0, r->batch, ids + (k % sets) * r->batch,
                                             counts, dk, dv));
        CHECK_CUDA(cudaEventRecord(e1, 0));
        CHECK_CUDA(cudaEventSynchronize(e1));
        CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        times[i] = ms / 50;
    }
    qsort(times, 3, sizeof(float), cmp_float);
    res.append_ms = times[1];
    /* what the append adds to a decode step: 50 decode steps
       (mustafar_cache_decode_step: append, then attention) against 50
       attentions alone, both queued back to back, alternated 5 times; the
       median difference per step.  The host's calls overlap the GPU's
       work here, as in a decode loop. */
    for (i = 0; i < 5; i++) {
        float ms[2];
        int k, pass, with_append;
        for (pass = 0; pass < 2; pass++) {   /* the order alternates between repetitions */
            with_append = pass ^ (i & 1);
            CHECK_CUDA(cudaEventRecord(e0, 0));
            for (k = 0; k < 50; k++) {
                const int *set_ids = ids + (k % sets) * r->batch;
                if (with_append)
                    CHECK(ctx, mustafar_cache_decode_step(cache, 0, r->batch, set_ids, counts, dk, dv, dq,
                                                          dout, 0.0f));
                else
                    CHECK(ctx, mustafar_cache_attention(cache, 0, r->batch, set_ids, dq, dout, 0.0f));
            }
            CHECK_CUDA(cudaEventRecord(e1, 0));
            CHECK_CUDA(cudaEventSynchronize(e1));
            CHECK_CUDA(cudaEventElapsedTime(&ms[with_append], e0, e1));
        }
        times[i] = (ms[1] - ms[0]) / 50;
    }
    qsort(times, 5, sizeof(float), cmp_float);
    res.step_append_ms = times[2];
    /* prefill throughput: the first set's sequences are dropped and prefilled
       again, T tokens in chunks, the appends queued back to back (the host
       runs ahead, as in an engine's layer loop) between two events; every
       chunk reuses the input of the last chunk uploaded above */
    for (b = 0; b < r->batch; b++) {
        CHECK(ctx, mustafar_cache_remove_sequence(cache, ids[b]));
        CHECK(ctx, mustafar_cache_add_sequence(cache, &ids[b]));
    }
    {
        int done = 0;
        float ms;
        CHECK_CUDA(cudaEventRecord(e0, 0));
        while (done < r->tokens) {
            int n = r->tokens - done < chunk ? r->tokens - done : chunk;
            size_t nvec = (size_t)r->batch * n * r->hkv;
            for (b = 0; b < r->batch; b++) counts[b] = n;
            CHECK(ctx, mustafar_cache_append(cache, 0, r->batch, ids, counts, dk, dv));
            res.prefill_bytes += nvec * r->d * 2.0 * 2 + (double)nvec * 2 * krec;
            done += n;
        }
        CHECK_CUDA(cudaEventRecord(e1, 0));
        CHECK_CUDA(cudaEventSynchronize(e1));
        CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        res.prefill_s = ms * 1e-3;
    }
    free(times);
    free(ids);
    free(counts);
    cudaFree(dk); cudaFree(dv); cudaFree(dq); cudaFree(dout);
    cudaEventDestroy(e0); cudaEventDestroy(e1);
    mustafar_cache_destroy(cache);
    return res;
}

/* Cold init (disk cache disabled: NVRTC compiles) and warm init (cubin
   from the disk cache written by an earlier context): context creation plus
   the first call that needs the kernels, median of 3 each.  Every cold run
   uses a configuration not compiled before in this process (another kept
   count), so nothing but the disk cache could make it faster. */
static void init_times(double *cold_ms, double *warm_ms)
{
    static const float sparsity[4] = {0.70f, 0.60f, 0.55f, 0.65f};
    char dir[256];
    double t[2][3];
    int pass, rep;
    uint16_t *dx, *dr;
    snprintf(dir, sizeof dir, "/tmp/mustafar-bench-cache-%ld", (long)time(NULL));
    CHECK_CUDA(cudaMalloc((void **)&dx, 128 * 2));
    CHECK_CUDA(cudaMalloc((void **)&dr, 512));
    CHECK_CUDA(cudaMemset(dx, 0, 256));
    for (rep = 0; rep < 4; rep++) {
        for (pass = 0; pass < 2; pass++) {
            mustafar_context_desc cd;
            mustafar_context *ctx;
            double t0;
            memset(&cd, 0, sizeof cd);
            cd.backend = MUSTAFAR_BACKEND_CUDA;
            cd.jit_cache_dir = dir;
            cd.disable_jit_cache = pass == 0;
            CHECK_CUDA(cudaDeviceSynchronize());
            t0 = now_seconds();
            CHECK(NULL, mustafar_context_create(&cd, &ctx));
            CHECK(ctx, mustafar_compress(ctx, 128, pass ? 0.7f : sparsity[rep], MUSTAFAR_DTYPE_F16,
                                         dx, dr, 1));
            CHECK_CUDA(cudaDeviceSynchronize());
            if (rep > 0) t[pass][rep - 1] = (now_seconds() - t0) * 1e3;
            mustafar_context_destroy(ctx);
        }
    }
    for (pass = 0; pass < 2; pass++) {
        double *v = t[pass], m;
        if (v[0] > v[1]) { m = v[0]; v[0] = v[1]; v[1] = m; }
        if (v[1] > v[2]) { m = v[1]; v[1] = v[2]; v[2] = m; }
        if (v[0] > v[1]) { m = v[0]; v[0] = v[1]; v[1] = m; }
    }
    *cold_ms = t[0][1];
    *warm_ms = t[1][1];
    cudaFree(dx);
    cudaFree(dr);
}

int main(int argc, char **argv)
{
    static const row grid[] = {
        {1, 4096, 32, 8, 128, 0}, {1, 32768, 32, 8, 128, 0}, {1, 131072, 32, 8, 128, 0},
        {8, 4096, 32, 8, 128, 0}, {8, 32768, 32, 8, 128, 0},
        {32, 4096, 32, 8, 128, 0}, {32, 32768, 32, 8, 128, 0},
        {8, 32768, 32, 8, 64, 0}, {8, 32768, 16, 8, 256, 0}};
    static const float sparsities[] = {0.0f, 0.5f, 0.7f};
    int quick = 0, i, j, l2 = 0;
    const char *only = NULL;   /* --row B,T,D: only that row */
    int init_only = 0;         /* --init: only the JIT init times; --no-init: none */
    int init_skip = 0;
    float only_sparsity = -1;  /* --sparsity S: only that sparsity */
    const char *csv_path = "bench/results.csv";
    FILE *csv;
    mustafar_context_desc cd;
    char why[512] = "";
    mustafar_context *ctx;
    pool pl;
    double copy_bw, cold = 0, warm = 0;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv_path = argv[++i];
        else if (!strcmp(argv[i], "--row") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--init")) init_only = 1;
        else if (!strcmp(argv[i], "--no-init")) init_skip = 1;
        else if (!strcmp(argv[i], "--sparsity") && i + 1 < argc) only_sparsity = (float)atof(argv[++i]);
    }
    memset(&cd, 0, sizeof cd);
    cd.backend = MUSTAFAR_BACKEND_CUDA;
    cd.error_buffer = why;                 /* the reason when no context is made */
    cd.error_buffer_size = sizeof why;
    if (mustafar_context_create(&cd, &ctx) != MUSTAFAR_OK) {
        fprintf(stderr, "bench: no CUDA context: %s\n", why);
        return 1;
    }
    printf("%s\n", mustafar_last_error(ctx));
    CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
    copy_bw = copy_bandwidth();
    if (init_only) init_skip = 0;
    if (!init_skip) init_times(&cold, &warm);
    printf("device copy bandwidth (read + write): %.0f GB/s; L2 %d MB\n", copy_bw / 1e9, l2 >> 20);
    if (init_skip) printf("JIT init: not measured (--no-init)\n");
    else printf("JIT init: cold (NVRTC compile) %.1f ms, warm (disk cache) %.1f ms\n", cold, warm);
    if (init_only) {
        mustafar_context_destroy(ctx);
        return 0;
    }
    pool_make(&pl, (size_t)1 << 20, 256, MUSTAFAR_DTYPE_F16);
    pl.vectors = pl.vectors * 256 / 128;   /* the pool viewed as D=128 vectors */
    csv = fopen(csv_path, "w");
    if (!csv) { perror(csv_path); return 1; }
    fprintf(csv, "batch,tokens,hq,hkv,d,sparsity,ms,bytes,gbps,floor_ms,append_ms,step_append_ms,prefill_gbps\n");
    printf("%5s %7s %4s %4s %4s %5s %9s %9s %8s %7s %9s %10s %10s %9s\n", "B", "T", "Hq", "Hkv", "D",
           "s", "time_ms", "MB_read", "GB/s", "%copy", "floor_ms", "append_ms", "in_step_ms", "prefillGB/s");
    for (i = 0; i < (int)(sizeof grid / sizeof grid[0]); i++) {
        if (quick && grid[i].tokens * grid[i].batch > 8 * 32768) continue;
        if (only) {
            char want[64];
            snprintf(want, sizeof want, "%d,%d,%d", grid[i].batch, grid[i].tokens, grid[i].d);
            if (strcmp(want, only)) continue;
        }
        for (j = 0; j < 3; j++) {
            row r = grid[i];
            result res;
            double gbps, floor_ms;
            size_t pool_vectors = pl.vectors;
            r.sparsity = sparsities[j];
            if (only_sparsity >= 0 && fabsf(r.sparsity - only_sparsity) > 1e-3f) continue;
            pl.vectors = pool_vectors * 128 / r.d;
            pl.d = r.d;
            res = run_row(ctx, &r, &pl, (size_t)l2, quick);
            pl.vectors = pool_vectors;
            gbps = res.bytes / (res.ms * 1e-3) / 1e9;
            floor_ms = res.bytes / copy_bw * 1e3;
            printf("%5d %7d %4d %4d %4d %5.2f %9.4f %9.1f %8.0f %6.0f%% %9.4f %10.4f %10.4f %9.0f\n",
                   r.batch, r.tokens, r.hq, r.hkv, r.d, r.sparsity, res.ms, res.bytes / 1e6, gbps,
                   100.0 * gbps * 1e9 / copy_bw, floor_ms, res.append_ms, res.step_append_ms,
                   res.prefill_s > 0 ? res.prefill_bytes / res.prefill_s / 1e9 : 0.0);
            fprintf(csv, "%d,%d,%d,%d,%d,%.2f,%.5f,%.0f,%.1f,%.5f,%.5f,%.5f,%.1f\n", r.batch, r.tokens,
                    r.hq, r.hkv, r.d, r.sparsity, res.ms, res.bytes, gbps, floor_ms, res.append_ms,
                    res.step_append_ms, res.prefill_s > 0 ? res.prefill_bytes / res.prefill_s / 1e9 : 0.0);
            fflush(stdout);
        }
    }
    fprintf(csv, "# copy_gbps=%.1f cold_init_ms=%.1f warm_init_ms=%.1f\n", copy_bw / 1e9, cold, warm);
    fclose(csv);
    free(pl.k);
    free(pl.v);
    mustafar_context_destroy(ctx);
    return 0;
}
