/* test_main.c - the mustafar.h test suite (one translation unit).

   Build (CPU only):
       cc -std=c99 -O2 -DMUSTAFAR_NO_CUDA -Wall -Wextra -Wpedantic -Werror \
          tests/test_main.c -lm -o test_mustafar
   With CUDA: drop -DMUSTAFAR_NO_CUDA, add -I<cuda>/include and link
   -lcudart -lnvrtc.  Also compiles as C++ (g++ -x c++ -std=c++11).

   Usage: test_mustafar [--backend cpu|cuda|all] [--filter SUBSTRING]
                        [--exclude SUBSTRING] [--quick] [--seed N] [--verbose]
   Default backend: the CPU, plus CUDA when a CUDA context can be created
   (otherwise one line "GPU cases skipped: <reason>" and those cases count
   as skipped).  An explicit cuda/all without a GPU fails.
   Output: a "FAIL test[backend]: file:line: message" line per failed check
   (at most 20 per test), then exactly one last line
   "N passed, M failed" (", K skipped" when GPU cases were skipped).
   Exit status nonzero iff M > 0.  Every run prints its random seed first;
   --seed N reproduces it (a test's data depend only on the seed and the
   test's name, so --filter keeps them). */
#define _POSIX_C_SOURCE 200809L   /* setenv, getpid, ftruncate (JIT cache test) */
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"

#include "tb_common.h"
#include "test_convert.h"
#include "test_prune.h"
#include "tb_model.h"
#include "test_attention.h"
#include "test_cache.h"
#include "test_errors.h"
#include "test_jit.h"
#include "test_robust.h"
#include "test_cpu.h"
#ifndef MUSTAFAR_NO_CUDA
#include "test_gpu_faults.h"
#endif

typedef void (*tb_test_fn)(mustafar_context *ctx);

typedef struct tb_test {
    const char *name;
    tb_test_fn fn;
    int per_backend;     /* 1: runs once per backend with that context; 2: CUDA only */
} tb_test;

static const tb_test k_tests[] = {
    /* case 1: conversions (pure functions, backend independent) */
    {"test_f16_to_f32_exhaustive", test_f16_to_f32_exhaustive, 0},
    {"test_bf16_to_f32_exhaustive", test_bf16_to_f32_exhaustive, 0},
    {"test_f16_bf16_roundtrip_and_nan", test_f16_bf16_roundtrip_and_nan, 0},
    {"test_f16_halfway_exhaustive", test_f16_halfway_exhaustive, 0},
    {"test_bf16_halfway_exhaustive", test_bf16_halfway_exhaustive, 0},
    {"test_f16_bf16_special_values", test_f16_bf16_special_values, 0},
    {"test_f32_to_16_random", test_f32_to_16_random, 0},
    /* cases 2, 3: pruning and the record format */
    {"test_kept_count", test_kept_count, 0},
    {"test_record_bytes", test_record_bytes, 0},
    {"test_prune_reference", test_prune_reference, 1},
    {"test_compress_format", test_compress_format, 1},
    {"test_prune_large_batch", test_prune_large_batch, 1},
    {"test_append_records", test_append_records, 1},
    /* case 4: attention through the cache */
    {"test_cache_attention", test_cache_attention, 1},
    {"test_cache_attention_long", test_cache_attention_long, 1},
    /* case 5: cache semantics */
    {"test_cache_stats_and_pages", test_cache_stats_and_pages, 1},
    {"test_cache_pool_sharing", test_cache_pool_sharing, 1},
    {"test_cache_append_paths", test_cache_append_paths, 1},
    {"test_cache_decode_step", test_cache_decode_step, 1},
    {"test_cache_layout_view", test_cache_layout_view, 1},
    /* case 6: stateless paged layer */
    {"test_paged_stateless", test_paged_stateless, 1},
    /* case 7: errors */
    {"test_status_strings", test_status_strings, 0},
    {"test_errors_context", test_errors_context, 0},
    {"test_errors_stateless", test_errors_stateless, 1},
    {"test_errors_cache_create", test_errors_cache_create, 1},
    {"test_errors_cache_calls", test_errors_cache_calls, 1},
    {"test_errors_sequence_too_long", test_errors_sequence_too_long, 1},
    {"test_errors_alignment", test_errors_alignment, 1},
    /* case 8: save and restore, corrupt input, defects */
    {"test_save_load_roundtrip", test_save_load_roundtrip, 1},
    {"test_load_corrupt", test_load_corrupt, 1},
    {"test_corrupt_records", test_corrupt_records, 1},
    {"test_robust_defects", test_robust_defects, 1},
    /* the CPU backend's SIMD paths and thread configurations */
    {"test_cpu_paths", test_cpu_paths, 0},
    {"test_cpu_corrupt_records", test_cpu_corrupt_records, 0},
    {"test_cpu_select_exact", test_cpu_select_exact, 0},
#ifndef MUSTAFAR_NO_CUDA
    /* device and pinned memory running out */
    {"test_gpu_faults", test_gpu_faults, 2},
#endif
#if !defined(MUSTAFAR_NO_CUDA) && !defined(_WIN32)
    /* the on-disk cubin cache */
    {"test_jit_disk_cache", test_jit_disk_cache, 2},
#endif
};

static int g_passed = 0, g_failed = 0, g_skipped = 0;

static void run_one(const tb_test *t, mustafar_context *ctx, const char *backend)
{
    if (backend) snprintf(g_cur_test, sizeof g_cur_test, "%s[%s]", t->name, backend);
    else snprintf(g_cur_test, sizeof g_cur_test, "%s", t->name);
    g_cur_failures = 0;
    if (g_verbose) { printf("run  %s\n", g_cur_test); fflush(stdout); }
    t->fn(ctx);
    if (g_cur_failures) {
        if (g_cur_failures > TB_MAX_PRINTED)
            printf("FAIL %s: (%d more failed checks not shown)\n", g_cur_test, g_cur_failures - TB_MAX_PRINTED);
        g_failed++;
    } else {
        g_passed++;
    }
    fflush(stdout);
}

static void usage(const char *argv0)
{
    fprintf(stderr, "usage: %s [--backend cpu|cuda|all] [--filter SUBSTRING] [--exclude SUBSTRING] [--quick] [--seed N] [--verbose]\n",
            argv0);
}

int main(int argc, char **argv)
{
    const char *backend = NULL, *filter = NULL, *exclude = NULL;
    int want_cpu = 1, want_cuda = 1, cuda_required = 0, seed_given = 0, i;
    size_t ti, ntests = sizeof k_tests / sizeof k_tests[0];
    mustafar_context *cpu = NULL, *cuda = NULL;
    mustafar_context_desc cd;

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--backend") && i + 1 < argc) backend = argv[++i];
        else if (!strcmp(argv[i], "--filter") && i + 1 < argc) filter = argv[++i];
        else if (!strcmp(argv[i], "--exclude") && i + 1 < argc) exclude = argv[++i];
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) { g_seed = strtoull(argv[++i], NULL, 0); seed_given = 1; }
        else if (!strcmp(argv[i], "--quick")) g_quick = 1;
        else if (!strcmp(argv[i], "--verbose") || !strcmp(argv[i], "-v")) g_verbose = 1;
        else { usage(argv[0]); return 2; }
    }
    if (backend) {
        if (!strcmp(backend, "cpu")) { want_cpu = 1; want_cuda = 0; }
        else if (!strcmp(backend, "cuda")) { want_cpu = 0; want_cuda = 1; cuda_required = 1; }
        else if (!strcmp(backend, "all")) { want_cpu = 1; want_cuda = 1; cuda_required = 1; }
        else { usage(argv[0]); return 2; }
    }
    if (!seed_given) {
        tb_rng r;
        r.s = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 32);
        g_seed = tb_next(&r) & 0xFFFFFFFFFFFFull;
    }
    printf("seed %" PRIu64 " (reproduce with --seed %" PRIu64 "), mustafar %s%s\n", g_seed, g_seed,
           mustafar_version_string() ? mustafar_version_string() : "?", g_quick ? ", quick" : "");
    fflush(stdout);
    tb_tables_init();

    memset(&cd, 0, sizeof cd);
    cd.backend = MUSTAFAR_BACKEND_CPU;
    if (mustafar_context_create(&cd, &cpu) != MUSTAFAR_OK || !cpu) {
        printf("FAIL setup: could not create a CPU context\n");
        g_failed++;
        cpu = NULL;
    }
    if (want_cuda) {
        mustafar_status st;
        memset(&cd, 0, sizeof cd);
        cd.backend = MUSTAFAR_BACKEND_CUDA;
        st = mustafar_context_create(&cd, &cuda);
        if (st != MUSTAFAR_OK || !cuda || mustafar_context_backend(cuda) != MUSTAFAR_BACKEND_CUDA) {
            /* the reason: AUTO falls back to the CPU and says why */
            mustafar_context *autox = NULL;
            const char *why = NULL;
            if (st == MUSTAFAR_OK && cuda) mustafar_context_destroy(cuda);
            cuda = NULL;
            memset(&cd, 0, sizeof cd);
            if (mustafar_context_create(&cd, &autox) == MUSTAFAR_OK && autox) why = mustafar_last_error(autox);
            if (cuda_required)
                printf("FAIL setup: --backend %s but no CUDA context: %s (%s)\n", backend,
                       why && why[0] ? why : "no reason given", tb_sname(st));
            else
                printf("GPU cases skipped: %s (%s)\n", why && why[0] ? why : "no reason given", tb_sname(st));
            if (cuda_required) g_failed++;
            if (autox) mustafar_context_destroy(autox);
        }
    }

    for (ti = 0; ti < ntests; ti++) {
        const tb_test *t = &k_tests[ti];
        if (filter && !strstr(t->name, filter)) continue;
        if (exclude && strstr(t->name, exclude)) continue;
        if (!t->per_backend) {
            run_one(t, cpu, NULL);
            continue;
        }
        if (want_cpu && t->per_backend == 1) {
            if (cpu) run_one(t, cpu, "cpu");
            else g_failed++;
        }
        if (want_cuda) {
            if (cuda) run_one(t, cuda, "cuda");
            else if (!cuda_required) g_skipped++;
            /* required and missing: already counted as a setup failure */
        }
    }

    if (cuda) mustafar_context_destroy(cuda);
    if (cpu) mustafar_context_destroy(cpu);
    tb_tables_free();
    if (g_skipped) printf("%d passed, %d failed, %d skipped\n", g_passed, g_failed, g_skipped);
    else printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed > 0 ? 1 : 0;
}
