/* fuzz_common.h - shared by the libFuzzer targets (one per .c file).
   Built with clang -fsanitize=fuzzer,address,undefined -DMUSTAFAR_NO_CUDA;
   a target aborts (FZ_ASSERT) when the library breaks a promise. */
#define MUSTAFAR_IMPLEMENTATION
#include "../../mustafar.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FZ_FN static __attribute__((unused))
#define FZ_ASSERT(cond) do { if (!(cond)) { \
    fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #cond); abort(); } } while (0)

/* Input consumed byte by byte; zeros once it runs out. */
typedef struct fz_in { const uint8_t *p; size_t n; } fz_in;
FZ_FN unsigned fz_u8(fz_in *in)
{
    if (!in->n) return 0;
    in->n--;
    return *in->p++;
}
FZ_FN uint32_t fz_u32(fz_in *in)
{
    uint32_t x = fz_u8(in);
    x |= (uint32_t)fz_u8(in) << 8;
    x |= (uint32_t)fz_u8(in) << 16;
    return x | (uint32_t)fz_u8(in) << 24;
}

static uint32_t fz_rng_state;
FZ_FN uint16_t fz_half(void)   /* a random fp16 in (-2, 2) */
{
    fz_rng_state = fz_rng_state * 1664525u + 1013904223u;
    return mustafar_f32_to_f16(((float)(fz_rng_state >> 8) / 16777216.0f) * 4.0f - 2.0f);
}

FZ_FN mustafar_context *fz_context(void)
{
    static mustafar_context *ctx;
    if (!ctx) {
        mustafar_context_desc cd;
        memset(&cd, 0, sizeof cd);
        cd.backend = MUSTAFAR_BACKEND_CPU;
        FZ_ASSERT(mustafar_context_create(&cd, &ctx) == MUSTAFAR_OK);
    }
    return ctx;
}

/* The small cache of the loader and ops targets. */
FZ_FN void fz_desc(mustafar_cache_desc *d)
{
    memset(d, 0, sizeof *d);
    d->num_layers = 2;
    d->num_kv_heads = 2;
    d->num_q_heads = 4;
    d->head_dim = 64;
    d->k_sparsity = 0.7f;
    d->v_sparsity = 0.5f;
    d->dense_window = 3;
    d->page_size = 4;
    d->capacity_tokens = 96;
    d->max_sequences = 4;
    d->max_sequence_length = 40;
}

FZ_FN void fz_stats(mustafar_cache *c, mustafar_cache_stats *s)
{
    memset(s, 0, sizeof *s);
    FZ_ASSERT(mustafar_cache_stats_get(c, s) == MUSTAFAR_OK);
}
FZ_FN int fz_stats_equal(const mustafar_cache_stats *a, const mustafar_cache_stats *b)
{
    return a->sequences == b->sequences && a->pages_used == b->pages_used &&
           a->token_vectors == b->token_vectors && a->compressed_vectors == b->compressed_vectors &&
           a->record_bytes == b->record_bytes && a->reserved_bytes == b->reserved_bytes;
}
