/* fuzz_ops.c - a sequence of cache operations driven by the input: add,
   remove, append (prefill or decode, one layer or all), attention,
   decode_step, save of one sequence and load of it back, save of all and
   load into a second cache.  A model of the lengths is kept; promises
   checked: every call either succeeds or fails with an expected status
   (pool full, too many sequences, sequence too long) and then leaves the
   cache as it was; lengths follow the model; a sequence loaded back from
   its own stream attends bit for bit like the original. */
#include "fuzz_common.h"

#define MAXSEQ 4
#define LAYERS 2
#define HKV 2
#define HQ 4
#define D 64
#define MAXTOK 24

static uint16_t g_k[MAXSEQ * MAXTOK * HKV * D], g_v[MAXSEQ * MAXTOK * HKV * D];
static uint16_t g_q[MAXSEQ * HQ * D], g_o1[MAXSEQ * HQ * D], g_o2[MAXSEQ * HQ * D];
static unsigned char g_stream[1 << 18];   /* 4 sequences of 40 tokens need ~82 KB */

typedef struct model { int live[MAXSEQ]; int len[MAXSEQ][LAYERS]; } model;

static void check_model(mustafar_cache *c, const model *m)
{
    int i, l;
    for (i = 0; i < MAXSEQ; i++)
        for (l = 0; l < LAYERS; l++)
            FZ_ASSERT(mustafar_cache_sequence_length(c, i, l) == (m->live[i] ? m->len[i][l] : -1));
}

static void expect_failed(mustafar_cache *c, mustafar_status st, const mustafar_cache_stats *before)
{
    mustafar_cache_stats after;
    FZ_ASSERT(st == MUSTAFAR_ERROR_POOL_FULL || st == MUSTAFAR_ERROR_TOO_MANY_SEQUENCES ||
              st == MUSTAFAR_ERROR_SEQUENCE_TOO_LONG);
    fz_stats(c, &after);
    FZ_ASSERT(fz_stats_equal(before, &after));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mustafar_cache_desc d;
    mustafar_cache *c = NULL, *c2 = NULL;
    mustafar_cache_stats before;
    model m;
    fz_in in;
    int steps = 0, i, l;
    static int filled;
    in.p = data;
    in.n = size;
    fz_desc(&d);
    d.page_size = 1 + fz_u8(&in) % 6;
    d.dense_window = fz_u8(&in) % 5;
    d.capacity_tokens = 8 + fz_u8(&in) % 120;
    d.max_sequence_length = 24;   /* short sequences, many operations per second */
    FZ_ASSERT(mustafar_cache_create(fz_context(), &d, &c) == MUSTAFAR_OK);
    memset(&m, 0, sizeof m);
    if (!filled) {
        filled = 1;   /* the data once: the input drives the operations */
        fz_rng_state = 3;
        for (i = 0; i < MAXSEQ * MAXTOK * HKV * D; i++) { g_k[i] = fz_half(); g_v[i] = fz_half(); }
        for (i = 0; i < MAXSEQ * HQ * D; i++) g_q[i] = fz_half();
    }
    while (in.n && steps++ < 32) {
        unsigned op = fz_u8(&in) % 8;
        int ids[MAXSEQ], nt[MAXSEQ], n = 0, id, got = 0;
        mustafar_status st;
        /* a set of live sequences from a mask */
        unsigned mask = fz_u8(&in);
        for (i = 0; i < MAXSEQ; i++)
            if (m.live[i] && (mask >> i & 1)) { ids[n] = i; nt[n] = (int)(mask >> 4) % 7; n++; }
        fz_stats(c, &before);
        switch (op) {
        case 0:   /* add */
            st = mustafar_cache_add_sequence(c, &id);
            if (st) expect_failed(c, st, &before);
            else { FZ_ASSERT(!m.live[id]); m.live[id] = 1; memset(m.len[id], 0, sizeof m.len[id]); }
            break;
        case 1:   /* remove */
            if (!n) break;
            FZ_ASSERT(mustafar_cache_remove_sequence(c, ids[0]) == MUSTAFAR_OK);
            m.live[ids[0]] = 0;
            break;
        case 2:   /* append to every layer */
        case 3:   /* append to one layer (layers may differ in length) */
            for (l = 0; l < LAYERS; l++) {
                if (op == 3 && l != (int)(mask & 1)) continue;
                fz_stats(c, &before);
                st = mustafar_cache_append(c, l, n, ids, nt, g_k, g_v);
                if (st) { expect_failed(c, st, &before); break; }
                for (i = 0; i < n; i++) m.len[ids[i]][l] += nt[i];
            }
            break;
        case 4:   /* attention */
            for (l = 0; l < LAYERS; l++)
                FZ_ASSERT(mustafar_cache_attention(c, l, n, ids, g_q, g_o1, 0.0f) == MUSTAFAR_OK);
            break;
        case 5:   /* decode step: one token each */
            for (i = 0; i < n; i++) nt[i] = 1;
            l = (int)(mask & 1);
            st = mustafar_cache_decode_step(c, l, n, ids, nt, g_k, g_v, g_q, g_o1, 0.0f);
            if (st) expect_failed(c, st, &before);
            else for (i = 0; i < n; i++) m.len[ids[i]][l] += 1;
            break;
        case 6: { /* save one, load it back, attend both */
            size_t w = 0;
            if (!n) break;
            FZ_ASSERT(mustafar_cache_save_memory(c, ids[0], g_stream, sizeof g_stream, &w) == MUSTAFAR_OK);
            st = mustafar_cache_load_memory(c, g_stream, w, &id, 1, &got);
            if (st) { expect_failed(c, st, &before); break; }
            FZ_ASSERT(got == 1 && !m.live[id]);
            m.live[id] = 1;
            memcpy(m.len[id], m.len[ids[0]], sizeof m.len[id]);
            for (l = 0; l < LAYERS; l++) {
                FZ_ASSERT(mustafar_cache_attention(c, l, 1, &ids[0], g_q, g_o1, 0.0f) == MUSTAFAR_OK);
                FZ_ASSERT(mustafar_cache_attention(c, l, 1, &id, g_q, g_o2, 0.0f) == MUSTAFAR_OK);
                FZ_ASSERT(!memcmp(g_o1, g_o2, HQ * D * 2));
            }
            break;
        }
        case 7: { /* save all; load into a fresh cache of another page size */
            size_t w = 0;
            int lids[MAXSEQ];
            mustafar_cache_desc d2 = d;
            d2.page_size = 1 + (int)(mask % 7);
            d2.capacity_tokens = 256;
            FZ_ASSERT(mustafar_cache_save_memory(c, -1, g_stream, sizeof g_stream, &w) == MUSTAFAR_OK);
            FZ_ASSERT(mustafar_cache_create(fz_context(), &d2, &c2) == MUSTAFAR_OK);
            FZ_ASSERT(mustafar_cache_load_memory(c2, g_stream, w, lids, MAXSEQ, &got) == MUSTAFAR_OK);
            FZ_ASSERT(got == before.sequences);
            for (i = 0, n = 0; i < MAXSEQ; i++) if (m.live[i]) ids[n++] = i;
            for (l = 0; l < LAYERS && n; l++) {
                FZ_ASSERT(mustafar_cache_attention(c, l, n, ids, g_q, g_o1, 0.0f) == MUSTAFAR_OK);
                FZ_ASSERT(mustafar_cache_attention(c2, l, n, lids, g_q, g_o2, 0.0f) == MUSTAFAR_OK);
                FZ_ASSERT(!memcmp(g_o1, g_o2, (size_t)n * HQ * D * 2));
            }
            mustafar_cache_destroy(c2);
            c2 = NULL;
            break;
        }
        }
        check_model(c, &m);
    }
    mustafar_cache_destroy(c);
    return 0;
}
