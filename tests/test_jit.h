/* test_jit.h - the on-disk cubin cache of the CUDA backend (CUDA only). */

#if !defined(MUSTAFAR_NO_CUDA) && !defined(_WIN32)   /* POSIX file calls; no GPU under Wine */
#include <dirent.h>
#include <unistd.h>

/* Path of the single *.cubin entry in dir (returns 0 if none, -1 if several). */
static int jit_entry(const char *dir, char *path, size_t cap)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;
    if (!d) return 0;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len > 6 && !strcmp(e->d_name + len - 6, ".cubin")) {
            snprintf(path, cap, "%s/%s", dir, e->d_name);
            n++;
        }
    }
    closedir(d);
    return n == 1 ? 1 : (n ? -1 : 0);
}

static long jit_file_size(const char *path)
{
    long n;
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fclose(f);
    return n;
}

/* A fresh context on `dir` compresses 64 random vectors; the records must
   equal the CPU's (so whatever the cache held, the kernels are right). */
static void jit_round(const char *dir, const uint16_t *x, const unsigned char *want, size_t rec,
                      const char *what)
{
    mustafar_context_desc cd;
    mustafar_context *ctx = NULL;
    void *dx, *dr;
    unsigned char *got = (unsigned char *)malloc(64 * rec);
    memset(&cd, 0, sizeof cd);
    cd.backend = MUSTAFAR_BACKEND_CUDA;
    cd.jit_cache_dir = dir;
    CHECK_ST(NULL, mustafar_context_create(&cd, &ctx), MUSTAFAR_OK);
    if (!ctx) { free(got); return; }
    dx = tb_alloc(ctx, 64 * 128 * 2);
    dr = tb_alloc(ctx, 64 * rec);
    tb_upload(ctx, dx, x, 64 * 128 * 2);
    CHECK_ST(ctx, mustafar_compress(ctx, 128, 0.7f, MUSTAFAR_DTYPE_F16, dx, dr, 64), MUSTAFAR_OK);
    tb_download(ctx, got, dr, 64 * rec);
    CHECK(!memcmp(got, want, 64 * rec), "%s: GPU records differ from the CPU's", what);
    tb_free(ctx, dx);
    tb_free(ctx, dr);
    mustafar_context_destroy(ctx);
    free(got);
}

static void test_jit_disk_cache(mustafar_context *unused)
{
    char dir[256], path[512];
    uint16_t x[64 * 128];
    unsigned char *want;
    size_t rec = mustafar_record_bytes(128, 0.7f, MUSTAFAR_DTYPE_F16);
    long size;
    tb_rng r;
    int i;
    (void)unused;
    tb_rng_for_test(&r, g_cur_test);
    for (i = 0; i < 64 * 128; i++) x[i] = mustafar_f32_to_f16((float)tb_normal(&r));
    want = (unsigned char *)malloc(64 * rec);
    CHECK_ST(NULL, mustafar_compress(NULL, 128, 0.7f, MUSTAFAR_DTYPE_F16, x, want, 64), MUSTAFAR_OK);
    snprintf(dir, sizeof dir, "/tmp/mustafar-test-jit-%ld-%u", (long)getpid(), (unsigned)tb_next(&r));

    jit_round(dir, x, want, rec, "cold start");
    CHECK(jit_entry(dir, path, sizeof path) == 1, "no single cache entry written in %s", dir);
    size = jit_file_size(path);
    CHECK(size > 1024, "cache entry %s has %ld bytes", path, size);

    jit_round(dir, x, want, rec, "warm start");
    CHECK(jit_file_size(path) == size, "a valid entry was rewritten");

    {   /* truncated entry: detected, recompiled, rewritten whole */
        FILE *f = fopen(path, "r+b");
        CHECK(f && ftruncate(fileno(f), size / 2) == 0, "could not truncate %s", path);
        if (f) fclose(f);
    }
    jit_round(dir, x, want, rec, "truncated entry");
    CHECK(jit_file_size(path) == size, "truncated entry not rewritten (%ld bytes)", jit_file_size(path));

    {   /* one flipped payload byte: the checksum catches it */
        FILE *f = fopen(path, "r+b");
        int c;
        CHECK(f != NULL, "could not open %s", path);
        if (f) {
            fseek(f, size / 2, SEEK_SET);
            c = fgetc(f);
            fseek(f, size / 2, SEEK_SET);
            fputc(c ^ 0x5a, f);
            fclose(f);
        }
    }
    jit_round(dir, x, want, rec, "corrupted entry");

    {   /* MUSTAFAR_CACHE_DIR=off: nothing is written */
        char off_dir[300];
        mustafar_context_desc cd;
        mustafar_context *ctx = NULL;
        snprintf(off_dir, sizeof off_dir, "%s-unused", dir);
        setenv("MUSTAFAR_CACHE_DIR", "off", 1);
        memset(&cd, 0, sizeof cd);
        cd.backend = MUSTAFAR_BACKEND_CUDA;
        CHECK_ST(NULL, mustafar_context_create(&cd, &ctx), MUSTAFAR_OK);
        if (ctx) {
            void *dx = tb_alloc(ctx, 128 * 2), *dr = tb_alloc(ctx, rec);
            tb_upload(ctx, dx, x, 128 * 2);
            CHECK_ST(ctx, mustafar_compress(ctx, 128, 0.7f, MUSTAFAR_DTYPE_F16, dx, dr, 1), MUSTAFAR_OK);
            CHECK(ctx->cuda->cache_dir[0] == 0, "cache dir is '%s' with MUSTAFAR_CACHE_DIR=off",
                  ctx->cuda->cache_dir);
            tb_free(ctx, dx);
            tb_free(ctx, dr);
            mustafar_context_destroy(ctx);
        }
        unsetenv("MUSTAFAR_CACHE_DIR");
    }
    remove(path);
    rmdir(dir);
    free(want);
}
#endif
