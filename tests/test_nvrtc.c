#define _POSIX_C_SOURCE 200809L
/* Compiles the embedded kernel source with NVRTC for every SM from 75 up that
   the installed NVRTC supports, for a few kernel configurations, with the
   library's own option list (mustafar__kernel_options).  Needs no GPU.  The
   compiles run on one thread per core and report as they finish.  Ends with
   the runner's line "N passed, M failed". */
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"
#include <pthread.h>
#include <unistd.h>

typedef struct config {
    int d;
    mustafar_dtype dtype;
    int k_kept, v_kept, group, page_size, warps, stages, append_wide;
} config;

static const config configs[] = {
    {128, MUSTAFAR_DTYPE_F16, 39, 39, 4, 16, 4, 3, 0},
    {64, MUSTAFAR_DTYPE_BF16, 32, 20, 1, 8, 4, 2, 0},
    {256, MUSTAFAR_DTYPE_BF16, 77, 128, 20, 16, 2, 3, 0},
    {128, MUSTAFAR_DTYPE_F16, 39, 39, 4, 16, 4, 3, 1},   /* the wide append kernel's own library */
};
#define NCONFIGS ((int)(sizeof configs / sizeof configs[0]))

static char *text;
static mustafar__cuda cuda_state;       /* the loaded NVRTC, shared by the compile threads */
static int archs[64], narch, next_job, passed, failed;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void *worker(void *unused)
{
    (void)unused;
    for (;;) {
        int job, sm;
        const config *c;
        char options[512];
        void *cubin = NULL;
        size_t size = 0;
        mustafar_context ctx;
        mustafar_status st;
        pthread_mutex_lock(&lock);
        job = next_job++;
        pthread_mutex_unlock(&lock);
        if (job >= narch * NCONFIGS) return NULL;
        sm = archs[job / NCONFIGS];
        c = &configs[job % NCONFIGS];
        memset(&ctx, 0, sizeof ctx);
        ctx.cuda = &cuda_state;
        mustafar__kernel_options(options, sizeof options, sm, c->d, c->dtype, c->k_kept, c->v_kept,
                                 c->group, c->page_size, c->warps, c->stages, c->append_wide);
        st = mustafar__compile_cubin(&ctx, text, sm, options, &cubin, &size);
        pthread_mutex_lock(&lock);
        if (st == MUSTAFAR_OK) {
            passed++;
            printf("ok   sm_%d config %d: %zu-byte cubin\n", sm, job % NCONFIGS, size);
        } else {
            failed++;
            printf("FAIL sm_%d config %d: %s\n", sm, job % NCONFIGS, ctx.message);
        }
        fflush(stdout);
        pthread_mutex_unlock(&lock);
        MUSTAFAR_FREE(cubin);
    }
}

int main(void)
{
    int all[64], nall = 0, i, nthreads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    pthread_t threads[64];
    char why[2048];
    if (!mustafar__cuda_api_load(&cuda_state.api, getenv("MUSTAFAR_CUDA_PATH"), why, sizeof why)) {
        printf("NVRTC compile skipped: %s\n0 passed, 0 failed, 1 skipped\n", why);
        return 0;
    }
    text = mustafar__kernel_text();
    if (!text || cuda_state.api.nvrtc.GetNumSupportedArchs(&nall) != MUSTAFAR__NVRTC_SUCCESS ||
        nall > 64 || cuda_state.api.nvrtc.GetSupportedArchs(all) != MUSTAFAR__NVRTC_SUCCESS) {
        printf("FAIL nvrtc: cannot list supported archs\n0 passed, 1 failed\n");
        return 1;
    }
    for (i = 0; i < nall; i++)
        if (all[i] >= 75) archs[narch++] = all[i];
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    printf("compiling %d configurations for %d archs on %d threads\n", NCONFIGS, narch, nthreads);
    fflush(stdout);
    for (i = 0; i < nthreads; i++) pthread_create(&threads[i], NULL, worker, NULL);
    for (i = 0; i < nthreads; i++) pthread_join(threads[i], NULL);
    {   /* an NVRTC that rejects the parallel-compile option: compiled again without it */
        char options[512];
        const char *argv[32] = {"-split-compile=unknown", "--gpu-architecture=sm_90"};
        int argc = 2;
        char *tok;
        void *cubin = NULL;
        size_t size = 0;
        mustafar_context ctx;
        memset(&ctx, 0, sizeof ctx);
        ctx.cuda = &cuda_state;
        mustafar__kernel_options(options, sizeof options, 90, 128, MUSTAFAR_DTYPE_F16, 39, 39, 4, 16,
                                 4, 3, 0);
        for (tok = options; *tok && argc < 32;) {
            argv[argc++] = tok;
            while (*tok && *tok != ' ') tok++;
            if (*tok) *tok++ = 0;
        }
        if (mustafar__nvrtc_compile(&ctx, text, argv, argc, &cubin, &size) == MUSTAFAR_OK && size > 0 &&
            !ctx.message[0]) {
            passed++;
            printf("ok   rejected -split-compile: compiled without it (%zu-byte cubin)\n", size);
        } else {
            failed++;
            printf("FAIL rejected -split-compile: '%s'\n", ctx.message);
        }
        MUSTAFAR_FREE(cubin);
    }
    MUSTAFAR_FREE(text);
    {   /* a compile error comes back as MUSTAFAR_ERROR_JIT with the NVRTC log */
        const char *argv[1] = {"--gpu-architecture=sm_90"};
        void *cubin = NULL;
        size_t size = 0;
        mustafar_context ctx;
        mustafar_status st;
        memset(&ctx, 0, sizeof ctx);
        ctx.cuda = &cuda_state;
        st = mustafar__nvrtc_compile(&ctx, "extern \"C\" __global__ void k() { undeclared(); }",
                                     argv, 1, &cubin, &size);
        if (st == MUSTAFAR_ERROR_JIT && strstr(ctx.message, "undeclared")) {
            passed++;
            printf("ok   compile error reported with the NVRTC log\n");
        } else {
            failed++;
            printf("FAIL compile error: status %s, message '%s'\n", mustafar_status_string(st),
                   ctx.message);
        }
        MUSTAFAR_FREE(cubin);
    }
    mustafar__cuda_api_unload(&cuda_state.api);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
