/* fuzz_load.c - the stream loader (mustafar_cache_load_memory) on a small
   cache holding one sequence.  With the first byte odd, the target first
   rewrites the header's and each section's checksum to match, so that
   mutations reach the checks behind them (lengths, payload size, room).
   Promise checked: a failed load leaves the cache as it was; a successful
   one adds sequences that save back to the same stream and can be attended
   and removed. */
#include "fuzz_common.h"

#define LAYERS 2

static uint64_t fnv(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}
static void put64(uint8_t *p, uint64_t x)
{
    int i;
    for (i = 0; i < 8; i++) p[i] = (uint8_t)(x >> (8 * i));
}
static uint64_t get64(const uint8_t *p)
{
    uint64_t x = 0;
    int i;
    for (i = 7; i >= 0; i--) x = x << 8 | p[i];
    return x;
}

static void fix_checksums(uint8_t *s, size_t n)
{
    size_t at = 72;
    if (n < 72) return;
    put64(s + 64, fnv(s, 64));
    while (at + 4 + 4 * LAYERS + 8 <= n) {
        size_t start = at;
        uint64_t payload = get64(s + at + 4 + 4 * LAYERS);
        at += 4 + 4 * LAYERS + 8;
        if (payload > n - at || n - at - payload < 8) return;
        at += (size_t)payload;
        put64(s + at, fnv(s + start, at - start));
        at += 8;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static mustafar_cache *cache;
    static uint16_t q[4 * 4 * 64], out[4 * 4 * 64];
    mustafar_cache_stats before, after;
    int ids[4], n = -1, i;
    uint8_t *s;
    mustafar_status st;
    if (!cache) {
        mustafar_cache_desc d;
        int id, nt = 9, l;
        static uint16_t k[9 * 2 * 64], v[9 * 2 * 64];
        fz_desc(&d);
        FZ_ASSERT(mustafar_cache_create(fz_context(), &d, &cache) == MUSTAFAR_OK);
        FZ_ASSERT(mustafar_cache_add_sequence(cache, &id) == MUSTAFAR_OK);
        fz_rng_state = 1;
        for (i = 0; i < 9 * 2 * 64; i++) { k[i] = fz_half(); v[i] = fz_half(); }
        for (i = 0; i < 4 * 4 * 64; i++) q[i] = fz_half();
        for (l = 0; l < 2; l++)
            FZ_ASSERT(mustafar_cache_append(cache, l, 1, &id, &nt, k, v) == MUSTAFAR_OK);
    }
    if (!size) return 0;
    s = (uint8_t *)malloc(size);
    memcpy(s, data + 1, size - 1);
    if (data[0] & 1) fix_checksums(s, size - 1);
    fz_stats(cache, &before);
    st = mustafar_cache_load_memory(cache, s, size - 1, ids, 4, &n);
    if (st) {
        FZ_ASSERT(n == 0);
        FZ_ASSERT(mustafar_last_error(fz_context())[0] != 0);
        fz_stats(cache, &after);
        FZ_ASSERT(fz_stats_equal(&before, &after));
    } else {
        FZ_ASSERT(n >= 0 && n <= 3);
        if (n) {
            /* the loaded sequences save back to the same sections */
            size_t bytes = 0, w = 0;
            uint8_t *again;
            int l;
            for (l = 0; l < 2; l++)
                FZ_ASSERT(mustafar_cache_attention(cache, l, n, ids, q, out, 0.0f) == MUSTAFAR_OK);
            if (n == 1) {
                FZ_ASSERT(mustafar_cache_save_size(cache, ids[0], &bytes) == MUSTAFAR_OK);
                FZ_ASSERT(bytes == size - 1);
                again = (uint8_t *)malloc(bytes);
                FZ_ASSERT(mustafar_cache_save_memory(cache, ids[0], again, bytes, &w) == MUSTAFAR_OK);
                /* the library version field (bytes 16..19) is the writer's */
                FZ_ASSERT(w == bytes && !memcmp(again + 72, s + 72, bytes - 72));
                free(again);
            }
        }
        for (i = 0; i < n; i++) FZ_ASSERT(mustafar_cache_remove_sequence(cache, ids[i]) == MUSTAFAR_OK);
        fz_stats(cache, &after);
        FZ_ASSERT(fz_stats_equal(&before, &after));
    }
    free(s);
    return 0;
}
