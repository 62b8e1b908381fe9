/* gen_seeds.c - writes the committed seed corpora (corpus/<target>/):
   cc -std=c99 -DMUSTAFAR_NO_CUDA tests/fuzz/gen_seeds.c -lm && ./a.out tests/fuzz/corpus
   The loader seeds are real streams saved from the fuzz target's cache. */
#include "fuzz_common.h"

static void put(const char *dir, const char *target, const char *name, unsigned char prefix,
                const void *data, size_t n)
{
    char path[512];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s/%s", dir, target, name);
    f = fopen(path, "wb");
    FZ_ASSERT(f);
    fputc(prefix, f);
    fwrite(data, 1, n, f);
    fclose(f);
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "corpus";
    static uint16_t k[16 * 2 * 64], v[16 * 2 * 64];
    static unsigned char buf[1 << 16];
    unsigned char bytes[3000];
    mustafar_cache_desc d;
    mustafar_cache *c;
    int a, b, nt, l, i;
    size_t w = 0;
    fz_rng_state = 7;
    for (i = 0; i < 16 * 2 * 64; i++) { k[i] = fz_half(); v[i] = fz_half(); }
    fz_desc(&d);
    FZ_ASSERT(mustafar_cache_create(fz_context(), &d, &c) == MUSTAFAR_OK);
    FZ_ASSERT(mustafar_cache_add_sequence(c, &a) == MUSTAFAR_OK);
    FZ_ASSERT(mustafar_cache_add_sequence(c, &b) == MUSTAFAR_OK);
    for (l = 0; l < 2; l++) {
        nt = 9 - l;   /* layers of different lengths */
        FZ_ASSERT(mustafar_cache_append(c, l, 1, &a, &nt, k, v) == MUSTAFAR_OK);
        nt = 2;       /* inside the window */
        FZ_ASSERT(mustafar_cache_append(c, l, 1, &b, &nt, k, v) == MUSTAFAR_OK);
    }
    FZ_ASSERT(mustafar_cache_save_memory(c, a, buf, sizeof buf, &w) == MUSTAFAR_OK);
    put(dir, "load", "one_sequence_fix", 1, buf, w);
    put(dir, "load", "one_sequence_raw", 0, buf, w);
    FZ_ASSERT(mustafar_cache_save_memory(c, -1, buf, sizeof buf, &w) == MUSTAFAR_OK);
    put(dir, "load", "two_sequences_fix", 1, buf, w);
    put(dir, "load", "header_only_fix", 1, buf, 72);
    mustafar_cache_destroy(c);

    /* records: config bytes, then records and pages from a counter pattern */
    for (i = 0; i < (int)sizeof bytes; i++) bytes[i] = (unsigned char)(i * 37 + 11);
    bytes[0] = 0; bytes[1] = 0; bytes[2] = 1; bytes[3] = 2;
    put(dir, "records", "d64_f16", bytes[0], bytes + 1, sizeof bytes - 1);
    bytes[0] = 1; bytes[1] = 1; bytes[2] = 2; bytes[3] = 0;
    put(dir, "records", "d128_bf16", bytes[0], bytes + 1, sizeof bytes - 1);
    memset(bytes + 4, 0xff, 600);   /* all-ones bitmaps, NaN values */
    put(dir, "records", "d128_all_ones", 1, bytes + 1, sizeof bytes - 1);

    /* ops: page, window, capacity, then (op, mask) pairs */
    {
        static const unsigned char s1[] = {3, 2, 60, 0, 0, 0, 0, 2, 0x5f, 4, 0x0f, 5, 0x03, 6, 0x01,
                                           7, 0x03, 1, 0x02, 4, 0x0f};
        static const unsigned char s2[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0x6f, 2, 0x6f, 2, 0x6f,
                                           3, 0x61, 5, 0x0f, 6, 0x04, 7, 0x0f};
        static const unsigned char s3[] = {5, 4, 119, 0, 0, 2, 0x61, 5, 0x01, 5, 0x01, 5, 0x01, 5, 0x01,
                                           5, 0x01, 6, 0x01, 1, 0x01, 4, 0x0f};
        put(dir, "ops", "basic", s1[0], s1 + 1, sizeof s1 - 1);
        put(dir, "ops", "pool_full", s2[0], s2 + 1, sizeof s2 - 1);
        put(dir, "ops", "decode", s3[0], s3 + 1, sizeof s3 - 1);
    }
    return 0;
}
