/* test_cpu.h - the CPU backend's SIMD paths and thread configurations.

   Every path the machine has (scalar, forced by MUSTAFAR_CPU_SIMD; AVX2 and,
   where the CPU has AVX-512 F/BW/VL/VBMI2, AVX-512 on x86-64; NEON on ARM64) runs with 1, 2 and 3 threads, on the built-in pool
   and on a user parallel-for, through the attention cases (float64
   reference), the stateless paged layer, long sequences (several token
   splits, each over 2 or 3 KV heads in lockstep, and the split combine) and the record format (byte-exact
   against the reference encoder).  Then records with a corrupt bitmap:
   every path reads at most the record and agrees with the scalar path. */

#ifndef _WIN32
#include <pthread.h>

typedef struct tc_pool_arg {
    void (*task)(void *, int);
    void *data;
    int first, count, stride;
} tc_pool_arg;

static void *tc_run_strided(void *p)
{
    tc_pool_arg *a = (tc_pool_arg *)p;
    int i;
    for (i = a->first; i < a->count; i += a->stride) a->task(a->data, i);
    return NULL;
}
#endif

static int g_tc_parallel_calls;

/* A user parallel-for: three threads per call taking every third index (on
   Windows the indices run in reverse order on the calling thread). */
static void tc_parallel_for(void (*task)(void *task_data, int index), void *task_data, int count,
                            void *user_data)
{
    int *calls = (int *)user_data;
    (*calls)++;
#ifdef _WIN32
    {
        int i;
        for (i = count - 1; i >= 0; i--) task(task_data, i);
    }
#else
    {
        pthread_t th[2];
        tc_pool_arg args[3];
        int t, started[2] = {0, 0};
        for (t = 0; t < 3; t++) {
            args[t].task = task;
            args[t].data = task_data;
            args[t].first = t;
            args[t].count = count;
            args[t].stride = 3;
        }
        for (t = 1; t < 3; t++) started[t - 1] = !pthread_create(&th[t - 1], NULL, tc_run_strided, &args[t]);
        for (t = 1; t < 3; t++)
            if (!started[t - 1]) tc_run_strided(&args[t]);
        tc_run_strided(&args[0]);
        for (t = 1; t < 3; t++)
            if (started[t - 1]) pthread_join(th[t - 1], NULL);
    }
#endif
}

static void tc_setenv(const char *value)
{
#ifdef _WIN32
    char buf[64];
    snprintf(buf, sizeof buf, "MUSTAFAR_CPU_SIMD=%s", value ? value : "");
    _putenv(buf);
#else
    if (value) setenv("MUSTAFAR_CPU_SIMD", value, 1);
    else unsetenv("MUSTAFAR_CPU_SIMD");
#endif
}

/* A CPU context on a forced path; NULL (and a failure) if it cannot be made. */
static mustafar_context *tc_context(const char *simd, int threads, int callback)
{
    mustafar_context_desc cd;
    mustafar_context *ctx = NULL;
    memset(&cd, 0, sizeof cd);
    cd.backend = MUSTAFAR_BACKEND_CPU;
    cd.num_threads = threads;
    if (callback) {
        cd.parallel_for = tc_parallel_for;
        cd.parallel_for_user_data = &g_tc_parallel_calls;
    }
    tc_setenv(simd);
    CHECK_ST(NULL, mustafar_context_create(&cd, &ctx), MUSTAFAR_OK);
    tc_setenv(NULL);
    return ctx;
}

static const char *const k_tc_simd_names[4] = {"scalar", "avx2", "neon", "avx512"};

/* The paths this machine runs: scalar always; AVX2 where the best is AVX2 or
   AVX-512; the best one.  Says once when an x86-64 machine has no AVX-512. */
static int tc_paths(int *paths)
{
    const int best = mustafar__cpu_best_simd();
    int n = 0;
    paths[n++] = MUSTAFAR__SIMD_SCALAR;
    if (best == MUSTAFAR__SIMD_AVX512) paths[n++] = MUSTAFAR__SIMD_AVX2;
    if (best != MUSTAFAR__SIMD_SCALAR) paths[n++] = best;
#if defined(MUSTAFAR__CPU_X86)
    static int said;
    if (best != MUSTAFAR__SIMD_AVX512 && !said) {
        said = 1;
        printf("  note: %s: this CPU (or build) has no AVX-512 F/BW/VL/VBMI2; the AVX-512 path is "
               "not tested here\n", g_cur_test);
    }
#endif
    return n;
}

static void test_cpu_paths(mustafar_context *unused)
{
    static const int threads[5] = {1, 2, 3, 2, 3}, callback[5] = {0, 0, 0, 1, 1};
    char saved[sizeof g_cur_test];
    int paths[4], np = tc_paths(paths), pi, ci, i;
    MUSTAFAR__UNUSED(unused);
    memcpy(saved, g_cur_test, sizeof saved);
    for (pi = 0; pi < np; pi++)
        for (ci = 0; ci < 5; ci++) {
            const char *name = k_tc_simd_names[paths[pi]];
            mustafar_context *ctx = tc_context(name, threads[ci], callback[ci]);
            int calls_before = g_tc_parallel_calls;
            tb_rng r;
            if (!ctx) continue;
            snprintf(g_cur_test, sizeof g_cur_test, "%.100s[%s, %d threads, %s]", saved, name, threads[ci],
                     callback[ci] ? "callback" : "pool");
            CHECK(ctx->cpu && ctx->cpu->simd == paths[pi], "SIMD path %d, expected %d",
                  ctx->cpu ? ctx->cpu->simd : -1, paths[pi]);
            tb_rng_for_test(&r, g_cur_test);
            /* --quick (the sanitizer runs): fewer cases, still several token
               splits per KV head */
            for (i = 0; i < (g_quick ? 2 : 4) && g_cur_failures <= TB_MAX_PRINTED; i++)
                run_attn_case(ctx, &r, &k_attn_cases[i], i);
            {
                static const int lens[3] = {1500, 333, 2}, lens_quick[2] = {600, 3};
                if (g_quick) {
                    long_case(ctx, &r, 64, MUSTAFAR_DTYPE_BF16, 3, 9, 16, 0.5f, 0.7f, 2, lens_quick);
                } else {
                    long_case(ctx, &r, 128, MUSTAFAR_DTYPE_F16, 2, 8, 32, 0.7f, 0.5f, 3, lens);
                    long_case(ctx, &r, 64, MUSTAFAR_DTYPE_BF16, 3, 9, 0, 0.5f, 0.7f, 3, lens);
                }
            }
            test_paged_stateless(ctx);
            test_compress_format(ctx);
            test_prune_large_batch(ctx);
            if (callback[ci] && threads[ci] > 1)
                CHECK(g_tc_parallel_calls > calls_before, "the user parallel-for was not called");
            if (!callback[ci])
                CHECK(g_tc_parallel_calls == calls_before, "a parallel-for that was not given was called");
            mustafar_context_destroy(ctx);
        }
    memcpy(g_cur_test, saved, sizeof saved);
}

/* Attention over records whose bitmaps hold more or fewer bits than the kept
   count, in a pool allocated to the byte (ASan sees any read past it): every
   path and thread count gives the scalar path's output. */
static void test_cpu_corrupt_records(mustafar_context *unused)
{
    const int D = 128, hq = 8, page = 4, npages = 3, len = page * npages;
    const float s = 0.7f;
    const size_t rec = mustafar_record_bytes(D, s, MUSTAFAR_DTYPE_F16);
    unsigned char *k = TB_NEW(unsigned char, rec * page * npages);
    unsigned char *v = TB_NEW(unsigned char, rec * page * npages);
    uint16_t *x = TB_NEW(uint16_t, (size_t)len * D), q[8 * 128], want[8 * 128], got[8 * 128];
    int32_t table[3] = {2, 0, 1};
    mustafar_paged_kv kv;
    mustafar_paged_seq seq;
    int paths[4], np = tc_paths(paths), pi, th, i, c;
    tb_rng r;
    MUSTAFAR__UNUSED(unused);
    tb_rng_for_test(&r, g_cur_test);
    for (i = 0; i < len * D; i++) x[i] = mustafar_f32_to_f16((float)tb_normal(&r));
    for (i = 0; i < hq * D; i++) q[i] = mustafar_f32_to_f16((float)tb_normal(&r));
    CHECK_ST(NULL, mustafar_compress(NULL, D, s, MUSTAFAR_DTYPE_F16, x, k, (size_t)len), MUSTAFAR_OK);
    CHECK_ST(NULL, mustafar_compress(NULL, D, s, MUSTAFAR_DTYPE_F16, x, v, (size_t)len), MUSTAFAR_OK);
    /* last record of the pool: every bit set; the one before: bits of its
       values moved up a byte; the first: no bit set */
    for (i = 0; i < npages * page; i += page) {
        memset(k + (size_t)(i + page - 1) * rec, 0xFF, (size_t)D / 8);
        memset(v + (size_t)(i + page - 1) * rec, 0xFF, (size_t)D / 8);
        k[(size_t)(i + page - 2) * rec + 3] = 0xFF;
        memset(v + (size_t)i * rec, 0, (size_t)D / 8);
    }
    memset(&kv, 0, sizeof kv);
    kv.head_dim = D;
    kv.dtype = MUSTAFAR_DTYPE_F16;
    kv.k_sparsity = kv.v_sparsity = s;
    kv.num_kv_heads = 1;
    kv.num_q_heads = hq;
    kv.page_size = page;
    kv.k_pages = k;
    kv.v_pages = v;
    kv.page_table = table;
    kv.page_table_stride = npages;
    kv.num_rows = 1;
    kv.num_pages = npages;
    seq.row = 0;
    seq.num_compressed = len;
    seq.num_window = 0;
    seq.reserved = 0;
    for (pi = 0; pi < np; pi++)
        for (th = 1; th <= 3; th += 2) {
            mustafar_context *ctx = tc_context(k_tc_simd_names[paths[pi]], th, 0);
            if (!ctx) continue;
            CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, 1, &seq, q, pi || th > 1 ? got : want, 0.0f),
                     MUSTAFAR_OK);
            if (pi || th > 1)
                for (c = 0; c < hq * D; c++) {
                    double a = mustafar_f16_to_f32(want[c]), b = mustafar_f16_to_f32(got[c]);
                    if (!(fabs(a - b) <= 2e-3 * (1.0 + fabs(a)))) {
                        CHECK(0, "%s, %d threads: output %d is %g, scalar path %g",
                              k_tc_simd_names[paths[pi]], th, c, b, a);
                        break;
                    }
                }
            mustafar_context_destroy(ctx);
        }
    free(k);
    free(v);
    free(x);
}

/* Each SIMD path's kept-channel selection against mustafar__select_kept for
   every kept count, on vectors of heavy ties, random bit patterns (Inf, NaN,
   signed zeros) and all-equal keys. */
static void test_cpu_select_exact(mustafar_context *unused)
{
    static const int dims[3] = {64, 128, 256};
    int paths[4], np = tc_paths(paths), pi, di, kind, kept, rep, c;
    uint16_t x[256];
    uint32_t want[8], got[8];
    tb_rng r;
    MUSTAFAR__UNUSED(unused);
    tb_rng_for_test(&r, g_cur_test);
    for (pi = 1; pi < np; pi++)
        for (di = 0; di < 3; di++)
            for (kind = 0; kind < 3; kind++)
                for (rep = 0; rep < (g_quick ? 1 : 3); rep++)
                    for (kept = 1; kept <= dims[di]; kept++) {
                        const int d = dims[di];
                        for (c = 0; c < d; c++) {
                            const uint32_t u = tb_u32(&r);
                            x[c] = (uint16_t)(kind == 0 ? (u & 0x8000u) | 0x3C00u | (u >> 16 & 7u)
                                              : kind == 1 ? u >> 8 : 0x4000u);
                        }
                        mustafar__select_kept(x, d, kept, want);
                        mustafar__cpu_select_kept(paths[pi], x, d, kept, got);
                        if (memcmp(want, got, (size_t)d / 8)) {
                            CHECK(0, "%s: D=%d kept=%d kind %d: bitmap differs from the reference",
                                  k_tc_simd_names[paths[pi]], d, kept, kind);
                            return;
                        }
                    }
}
