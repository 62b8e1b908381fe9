/* test_threads.c - separate contexts used from separate threads at once,
   built with -fsanitize=thread (make test).

   Each thread creates its own context and cache, appends (prefill and
   decode), attends, saves, loads into a second cache of its own, attends
   there, and destroys everything; every thread's results must equal the
   same work done on the main thread before the threads start, bit for bit.
   The work is one function, tt_work, over a context descriptor: to run it
   on another backend or a threaded CPU backend, add an entry to
   k_configs (a descriptor and a name) - nothing else changes.

   Usage: test_threads [threads] [rounds].  Output: FAIL lines, then
   "N passed, M failed". */
#define _POSIX_C_SOURCE 200809L
#if !defined(MUSTAFAR_NO_CUDA) && !defined(_WIN32)
/* With CUDA compiled in, an AUTO context loads the CUDA runtime and, with
   no usable device, unloads it.  dlclose in one thread and dlopen of the
   same library in another are serialised by ld.so's own lock, which TSan
   does not see: once the mapping is reused it reports the library's
   destructors and constructors (no symbols: the library is gone) as races.
   Libraries stay loaded in this test, so that what TSan reports is ours. */
#  include <dlfcn.h>
#  define dlclose(h) tt_keep_loaded(h)
static int tt_keep_loaded(void *h) { (void)h; return 0; }
#endif
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TT_LAYERS 2
#define TT_HKV 2
#define TT_HQ 4
#define TT_D 128
#define TT_SEQS 3
#define TT_PREFILL 40
#define TT_DECODE 6
#define TT_TOKENS (TT_PREFILL + TT_DECODE)

typedef struct tt_config {
    const char *name;
    mustafar_context_desc desc;          /* backend and its options */
} tt_config;

typedef struct tt_result {
    uint16_t out[TT_LAYERS][TT_SEQS * TT_HQ * TT_D];      /* attention after decode */
    uint16_t loaded[TT_LAYERS][TT_SEQS * TT_HQ * TT_D];   /* the same on the loaded copy */
    size_t stream_size;
    uint64_t stream_hash;
    char error[512];                     /* empty: every call succeeded */
} tt_result;

typedef struct tt_job {
    const tt_config *config;
    int seed, rounds;
    tt_result result;
} tt_job;

static uint32_t tt_next(uint32_t *s) { *s = *s * 1664525u + 1013904223u; return *s >> 8; }

#define TT_TRY(call) do { mustafar_status st_ = (call); if (st_) { \
    snprintf(r->error, sizeof r->error, "%s: %s (%.150s)", #call, mustafar_status_string(st_), \
             ctx ? mustafar_last_error(ctx) : "no context"); goto done; } } while (0)

/* The whole life of a context, as one thread would use it. */
static void tt_work(const tt_config *config, int seed, tt_result *r)
{
    mustafar_context *ctx = NULL;
    mustafar_cache *c = NULL, *c2 = NULL;
    mustafar_cache_desc d;
    uint16_t *k = NULL, *v = NULL, *q = NULL, *out = NULL;
    unsigned char *stream = NULL;
    const size_t tok = (size_t)TT_SEQS * TT_TOKENS * TT_HKV * TT_D, qn = (size_t)TT_SEQS * TT_HQ * TT_D;
    int ids[TT_SEQS], ids2[TT_SEQS], nt[TT_SEQS], n = 0, i, l, step;
    uint32_t s = (uint32_t)seed * 2654435761u + 1;
    size_t j, w = 0;
    uint16_t *hk = (uint16_t *)malloc(tok * 2), *hv = (uint16_t *)malloc(tok * 2);
    uint16_t *hq = (uint16_t *)malloc(qn * 2);
    memset(r, 0, sizeof *r);
    for (j = 0; j < tok; j++) {
        hk[j] = mustafar_f32_to_f16((float)tt_next(&s) / 8388608.0f - 1.0f);
        hv[j] = mustafar_f32_to_f16((float)tt_next(&s) / 8388608.0f - 1.0f);
    }
    for (j = 0; j < qn; j++) hq[j] = mustafar_f32_to_f16((float)tt_next(&s) / 8388608.0f - 1.0f);
    TT_TRY(mustafar_context_create(&config->desc, &ctx));
    TT_TRY(mustafar_memory_alloc(ctx, tok * 2, (void **)&k));
    TT_TRY(mustafar_memory_alloc(ctx, tok * 2, (void **)&v));
    TT_TRY(mustafar_memory_alloc(ctx, qn * 2, (void **)&q));
    TT_TRY(mustafar_memory_alloc(ctx, qn * 2, (void **)&out));
    TT_TRY(mustafar_memory_upload(ctx, k, hk, tok * 2));
    TT_TRY(mustafar_memory_upload(ctx, v, hv, tok * 2));
    TT_TRY(mustafar_memory_upload(ctx, q, hq, qn * 2));
    memset(&d, 0, sizeof d);
    d.num_layers = TT_LAYERS;
    d.num_kv_heads = TT_HKV;
    d.num_q_heads = TT_HQ;
    d.head_dim = TT_D;
    d.k_sparsity = 0.7f;
    d.v_sparsity = 0.5f;
    d.dense_window = 8;
    d.page_size = 16;
    d.capacity_tokens = 1024;
    d.max_sequences = 2 * TT_SEQS;
    TT_TRY(mustafar_cache_create(ctx, &d, &c));
    for (i = 0; i < TT_SEQS; i++) {
        TT_TRY(mustafar_cache_add_sequence(c, &ids[i]));
        nt[i] = TT_PREFILL - 7 * i;
    }
    for (l = 0; l < TT_LAYERS; l++) TT_TRY(mustafar_cache_append(c, l, TT_SEQS, ids, nt, k, v));
    for (step = 0; step < TT_DECODE; step++)
        for (l = 0; l < TT_LAYERS; l++) {
            for (i = 0; i < TT_SEQS; i++) nt[i] = 1;
            TT_TRY(mustafar_cache_decode_step(c, l, TT_SEQS, ids, nt, k, v, q, out, 0.0f));
        }
    for (l = 0; l < TT_LAYERS; l++) {
        TT_TRY(mustafar_cache_attention(c, l, TT_SEQS, ids, q, out, 0.0f));
        TT_TRY(mustafar_memory_download(ctx, r->out[l], out, qn * 2));
    }
    TT_TRY(mustafar_cache_save_size(c, -1, &r->stream_size));
    stream = (unsigned char *)malloc(r->stream_size);
    TT_TRY(mustafar_cache_save_memory(c, -1, stream, r->stream_size, &w));
    r->stream_hash = 1469598103934665603ull;
    for (j = 0; j < w; j++) r->stream_hash = (r->stream_hash ^ stream[j]) * 1099511628211ull;
    TT_TRY(mustafar_cache_create(ctx, &d, &c2));
    TT_TRY(mustafar_cache_load_memory(c2, stream, w, ids2, TT_SEQS, &n));
    for (l = 0; l < TT_LAYERS; l++) {
        TT_TRY(mustafar_cache_attention(c2, l, n, ids2, q, out, 0.0f));
        TT_TRY(mustafar_memory_download(ctx, r->loaded[l], out, qn * 2));
    }
    TT_TRY(mustafar_cache_remove_sequence(c, ids[1]));
done:

    if (ctx) {
        mustafar_memory_free(ctx, k); mustafar_memory_free(ctx, v);
        mustafar_memory_free(ctx, q); mustafar_memory_free(ctx, out);
    }
    mustafar_cache_destroy(c2);
    mustafar_cache_destroy(c);
    mustafar_context_destroy(ctx);
    free(stream); free(hk); free(hv); free(hq);
}

static void *tt_thread(void *arg)
{
    tt_job *job = (tt_job *)arg;
    int i;
    for (i = 0; i < job->rounds; i++) tt_work(job->config, job->seed, &job->result);
    return NULL;
}

static int g_pass, g_fail;
#define CHECK(cond, ...) do { if (cond) g_pass++; else { g_fail++; printf("FAIL "); \
    printf(__VA_ARGS__); printf("\n"); } } while (0)

#ifdef MUSTAFAR_NO_CUDA
#  define TT_CONFIGS 1
#else
#  define TT_CONFIGS 2
#endif
static tt_config k_configs[TT_CONFIGS];

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 4, rounds = argc > 2 ? atoi(argv[2]) : 2, i, cfg;
    tt_job *jobs;
    tt_result *expect;
    if (threads < 1) threads = 1;
    memset(k_configs, 0, sizeof k_configs);
    k_configs[0].name = "CPU backend";
    k_configs[0].desc.backend = MUSTAFAR_BACKEND_CPU;
#ifndef MUSTAFAR_NO_CUDA
    /* AUTO: every thread probes for CUDA at once (loads the runtime, finds
       a device or falls back to the CPU) */
    k_configs[1].name = "AUTO backend";
    k_configs[1].desc.backend = MUSTAFAR_BACKEND_AUTO;
    k_configs[1].desc.disable_jit_cache = 1;
#endif
    jobs = (tt_job *)calloc((size_t)threads, sizeof *jobs);
    expect = (tt_result *)calloc((size_t)threads, sizeof *expect);
    for (cfg = 0; cfg < (int)(sizeof k_configs / sizeof k_configs[0]); cfg++) {
        const tt_config *config = &k_configs[cfg];
        pthread_t *tid = (pthread_t *)calloc((size_t)threads, sizeof *tid);
        /* the same work on this thread alone first: the expected results */
        for (i = 0; i < threads; i++) {
            tt_work(config, i % 2 ? 1000 + i : 7, &expect[i]);
            CHECK(!expect[i].error[0], "%s, alone, seed %d: %s", config->name, i, expect[i].error);
        }
        for (i = 0; i < threads; i++) {
            jobs[i].config = config;
            jobs[i].seed = i % 2 ? 1000 + i : 7;   /* some threads do identical work */
            jobs[i].rounds = rounds;
            CHECK(pthread_create(&tid[i], NULL, tt_thread, &jobs[i]) == 0, "pthread_create %d", i);
        }
        for (i = 0; i < threads; i++) pthread_join(tid[i], NULL);
        for (i = 0; i < threads; i++) {
            const tt_result *a = &jobs[i].result, *e = &expect[i];
            CHECK(!a->error[0], "%s, thread %d: %s", config->name, i, a->error);
            CHECK(!memcmp(a->out, e->out, sizeof a->out), "%s, thread %d: attention differs", config->name, i);
            CHECK(!memcmp(a->loaded, e->out, sizeof a->loaded),
                  "%s, thread %d: attention on the loaded copy differs", config->name, i);
            CHECK(a->stream_size == e->stream_size && a->stream_hash == e->stream_hash,
                  "%s, thread %d: saved stream differs", config->name, i);
        }
        printf("%s: %d threads x %d rounds\n", config->name, threads, rounds);
        free(tid);
    }
    free(jobs); free(expect);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail != 0;
}
