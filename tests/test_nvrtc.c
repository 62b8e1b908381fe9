/* Compiles the embedded kernel source with NVRTC for every SM from 75 up that
   the installed NVRTC supports, for a few kernel configurations.  Needs no
   GPU.  Ends with the runner's line "N passed, M failed". */
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"

int main(void)
{
    static const char *const configs[][8] = {
        {"-DMUSTAFAR_D=128", "-DMUSTAFAR_BF16=0", "-DMUSTAFAR_K_KEPT=39", "-DMUSTAFAR_V_KEPT=39",
         "-DMUSTAFAR_GROUP=4", "-DMUSTAFAR_PAGE_SIZE=16", "-DMUSTAFAR_WARPS=4", "-DMUSTAFAR_STAGES=3"},
        {"-DMUSTAFAR_D=64", "-DMUSTAFAR_BF16=1", "-DMUSTAFAR_K_KEPT=32", "-DMUSTAFAR_V_KEPT=20",
         "-DMUSTAFAR_GROUP=1", "-DMUSTAFAR_PAGE_SIZE=8", "-DMUSTAFAR_WARPS=4", "-DMUSTAFAR_STAGES=2"},
        {"-DMUSTAFAR_D=256", "-DMUSTAFAR_BF16=1", "-DMUSTAFAR_K_KEPT=77", "-DMUSTAFAR_V_KEPT=128",
         "-DMUSTAFAR_GROUP=20", "-DMUSTAFAR_PAGE_SIZE=16", "-DMUSTAFAR_WARPS=2", "-DMUSTAFAR_STAGES=3"},
        /* the wide append kernel's own library (a 30 KB parameter block) */
        {"-DMUSTAFAR_D=128", "-DMUSTAFAR_BF16=0", "-DMUSTAFAR_K_KEPT=39", "-DMUSTAFAR_V_KEPT=39",
         "-DMUSTAFAR_GROUP=4", "-DMUSTAFAR_PAGE_SIZE=16", "-DMUSTAFAR_WARPS=4", "-DMUSTAFAR_APPEND_WIDE=1"}};
    int archs[64], narch = 0, i, c, passed = 0, failed = 0;
    char *text = mustafar__kernel_text();
    if (!text || nvrtcGetNumSupportedArchs(&narch) != NVRTC_SUCCESS || narch > 64 ||
        nvrtcGetSupportedArchs(archs) != NVRTC_SUCCESS) {
        printf("FAIL nvrtc: cannot list supported archs\n0 passed, 1 failed\n");
        return 1;
    }
    for (i = 0; i < narch; i++) {
        char arch[48], sm[32];
        if (archs[i] < 75) continue;
        snprintf(arch, sizeof arch, "--gpu-architecture=sm_%d", archs[i]);
        snprintf(sm, sizeof sm, "-DMUSTAFAR_SM=%d", archs[i]);
        for (c = 0; c < (int)(sizeof configs / sizeof configs[0]); c++) {
            const char *argv[11];
            void *cubin = NULL;
            size_t size = 0;
            mustafar_context ctx;
            int k;
            memset(&ctx, 0, sizeof ctx);
            argv[0] = MUSTAFAR__SPLIT_COMPILE;   /* as the library compiles */
            argv[1] = arch;
            argv[2] = sm;
            for (k = 0; k < 8; k++) argv[3 + k] = configs[c][k];
            if (mustafar__nvrtc_compile(&ctx, text, argv, 11, &cubin, &size) == MUSTAFAR_OK) {
                passed++;
                printf("ok   sm_%d config %d: %zu-byte cubin\n", archs[i], c, size);
            } else {
                failed++;
                printf("FAIL sm_%d config %d: %s\n", archs[i], c, ctx.message);
            }
            MUSTAFAR_FREE(cubin);
        }
    }
    {   /* an NVRTC that rejects the parallel-compile option: compiled again without it */
        const char *argv[11] = {"-split-compile=unknown", "--gpu-architecture=sm_90", "-DMUSTAFAR_SM=90"};
        void *cubin = NULL;
        size_t size = 0;
        mustafar_context ctx;
        memset(&ctx, 0, sizeof ctx);
        for (c = 0; c < 8; c++) argv[3 + c] = configs[0][c];
        if (mustafar__nvrtc_compile(&ctx, text, argv, 11, &cubin, &size) == MUSTAFAR_OK && size > 0 &&
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
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
