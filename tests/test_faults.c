/* test_faults.c - allocation-failure injection.

   The library allocates through MUSTAFAR_MALLOC / MUSTAFAR_FREE, defined
   here to a counting allocator that can fail the n-th allocation of a call.
   For every scenario (a public call on a prepared context and cache) and
   every n from 1 up to the number of allocations the call makes, the test
   arms the n-th allocation to fail (once, then "from the n-th on"), makes
   the call, and checks that
     - it returns MUSTAFAR_ERROR_OUT_OF_MEMORY with a message (or succeeds,
       if the failure was of something optional), and an object it creates
       is NULL;
     - the cache answers exactly as before: stats, every sequence's length
       per layer, attention of every live sequence in every layer, and the
       saved stream, byte for byte (decode_step: as its header says, the
       tokens stay appended when only the attention fails: then exactly as
       after mustafar_cache_append of them);
     - a file the call writes is as before (save_file: the old file under
       the real name, no temporary left);
     - the same call made again without a fault gives exactly what it gives
       on a fresh fixture (the cache still works);
     - after teardown no allocation is live (and LeakSanitizer finds none).

   Build: see the Makefile (test_faults: -fsanitize=address,undefined,
   -DMUSTAFAR_NO_CUDA; test_faults_cuda: CUDA code compiled in, loaded at
   run time, none usable here).  Output: a FAIL line per failed check, then
   "N passed, M failed". */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <math.h>
#include <unistd.h>   /* getpid */

static long g_calls;        /* allocations since arming */
static long g_fail_at;      /* 0: never fail */
static int g_fail_after;    /* 1: fail the n-th and every later one */
static long g_failed;       /* allocations refused since arming */
static long g_live;         /* library blocks live */
static size_t g_bytes;      /* bytes allocated since arming */

static void *tf_malloc(size_t n)
{
    void *p;
    g_calls++;
    if (g_fail_at && (g_calls == g_fail_at || (g_fail_after && g_calls > g_fail_at))) {
        g_failed++;
        return NULL;
    }
    p = malloc(n);
    if (p) { g_live++; g_bytes += n; }
    return p;
}
static void tf_free(void *p)
{
    if (p) { g_live--; free(p); }
}
#if !defined(MUSTAFAR_NO_CUDA) && !defined(_WIN32)
/* With CUDA compiled in, AUTO loads the CUDA runtime, finds no driver and
   unloads it.  The C++ runtime the CUDA runtime pulls in keeps a 72 KiB
   emergency exception pool that LeakSanitizer reports as leaked once its
   library is unloaded (the stack then names no module, so no suppression
   matches).  Libraries stay loaded in this test, so that what LSan reports
   is the library's own. */
#  include <dlfcn.h>
#  define dlclose(h) tf_keep_loaded(h)
static int tf_keep_loaded(void *h) { (void)h; return 0; }
#endif
#define MUSTAFAR_MALLOC(n) tf_malloc(n)
#define MUSTAFAR_FREE(p) tf_free(p)
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"

static int g_pass, g_fail;
static const char *g_scenario;
static long g_n;
static int g_mode;
#define CHECK(cond, ...) do { if (cond) g_pass++; else { g_fail++; \
    printf("FAIL %s n=%ld%s: line %d: ", g_scenario, g_n, g_mode ? "+" : "", __LINE__); \
    printf(__VA_ARGS__); printf("\n"); } } while (0)

static void arm(long n, int after) { g_calls = 0; g_failed = 0; g_bytes = 0; g_fail_at = n; g_fail_after = after; }
static void disarm(void) { g_fail_at = 0; }

/* ---- fixture ------------------------------------------------------------- */
#define TF_LAYERS 2
#define TF_HKV 2
#define TF_HQ 4
#define TF_D 64
#define TF_W 4
#define TF_PAGE 8
#define TF_MAXSEQ 4
#define TF_MAXTOK 40

typedef struct tf_fix {
    mustafar_context *ctx;
    mustafar_cache *cache;
    mustafar_cache_desc desc;
    int ids[TF_MAXSEQ], nseq;
    uint16_t k[TF_MAXSEQ * TF_MAXTOK * TF_HKV * TF_D], v[TF_MAXSEQ * TF_MAXTOK * TF_HKV * TF_D];
    uint16_t q[TF_MAXSEQ * TF_HQ * TF_D], out[TF_MAXSEQ * TF_HQ * TF_D];
    unsigned char *stream; size_t stream_size;   /* a saved stream of the fixture */
    char path[256];
    /* a stateless layout of caller-owned pages */
    mustafar_paged_kv kv;
    int32_t table[2 * 8];
    mustafar_paged_seq seqs[2];
    unsigned char *kp, *vp;
    uint16_t *kw, *vw;
    size_t kp_bytes, vp_bytes, w_bytes;
} tf_fix;

static uint32_t g_rng;
static float tf_rand(void)
{
    g_rng = g_rng * 1664525u + 1013904223u;
    return ((float)(g_rng >> 8) / 16777216.0f) * 2.0f - 1.0f;
}
static void tf_fill(uint16_t *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = mustafar_f32_to_f16(tf_rand());
}

static void tf_desc(mustafar_cache_desc *d)
{
    memset(d, 0, sizeof *d);
    d->num_layers = TF_LAYERS;
    d->num_kv_heads = TF_HKV;
    d->num_q_heads = TF_HQ;
    d->head_dim = TF_D;
    d->k_sparsity = 0.7f;
    d->v_sparsity = 0.5f;
    d->dense_window = TF_W;
    d->page_size = TF_PAGE;
    d->capacity_tokens = 256;
    d->max_sequences = TF_MAXSEQ;
}

static int tf_append(tf_fix *f, int nseq, const int *ids, const int *nt)
{
    int l;
    for (l = 0; l < TF_LAYERS; l++)
        if (mustafar_cache_append(f->cache, l, nseq, ids, nt, f->k, f->v) != MUSTAFAR_OK) return 0;
    return 1;
}

/* A CPU context, a cache with three sequences (inside the window, with a
   partial page, a few pages), a saved stream of it, and a stateless layout. */
static int tf_setup(tf_fix *f)
{
    mustafar_context_desc cd;
    int nt[3] = {3, 13, 27}, i;
    size_t rec_k, rec_v;
    memset(f, 0, sizeof *f);
    g_rng = 12345u;
    tf_fill(f->k, sizeof f->k / 2);
    tf_fill(f->v, sizeof f->v / 2);
    tf_fill(f->q, sizeof f->q / 2);
    memset(&cd, 0, sizeof cd);
    cd.backend = MUSTAFAR_BACKEND_CPU;
    if (mustafar_context_create(&cd, &f->ctx)) return 0;
    tf_desc(&f->desc);
    if (mustafar_cache_create(f->ctx, &f->desc, &f->cache)) return 0;
    f->nseq = 3;
    for (i = 0; i < 3; i++)
        if (mustafar_cache_add_sequence(f->cache, &f->ids[i])) return 0;
    if (!tf_append(f, 3, f->ids, nt)) return 0;
    if (mustafar_cache_save_size(f->cache, -1, &f->stream_size)) return 0;
    f->stream = (unsigned char *)malloc(f->stream_size);
    if (mustafar_cache_save_memory(f->cache, -1, f->stream, f->stream_size, NULL)) return 0;
    snprintf(f->path, sizeof f->path, "%s/mustafar_faults_%ld.kv",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (long)getpid());
    {
        FILE *fp = fopen(f->path, "wb");
        if (!fp) return 0;
        fwrite(f->stream, 1, f->stream_size, fp);
        fclose(fp);
    }
    /* stateless: 2 rows, 8 pages of 8 tokens, window 4 */
    rec_k = mustafar_record_bytes(TF_D, 0.7f, MUSTAFAR_DTYPE_F16);
    rec_v = mustafar_record_bytes(TF_D, 0.5f, MUSTAFAR_DTYPE_F16);
    f->kp_bytes = 8 * TF_HKV * TF_PAGE * rec_k;
    f->vp_bytes = 8 * TF_HKV * TF_PAGE * rec_v;
    f->w_bytes = 2 * TF_W * TF_HKV * TF_D * 2;
    f->kp = (unsigned char *)calloc(1, f->kp_bytes);
    f->vp = (unsigned char *)calloc(1, f->vp_bytes);
    f->kw = (uint16_t *)calloc(1, f->w_bytes);
    f->vw = (uint16_t *)calloc(1, f->w_bytes);
    {
        static const int32_t pages[16] = {0, 5, 2, 7, 0, 0, 0, 0, 1, 6, 3, 4, 0, 0, 0, 0};
        memcpy(f->table, pages, sizeof pages);   /* rows 0 and 1 share no page */
    }
    f->kv.head_dim = TF_D;
    f->kv.dtype = MUSTAFAR_DTYPE_F16;
    f->kv.k_sparsity = 0.7f;
    f->kv.v_sparsity = 0.5f;
    f->kv.num_kv_heads = TF_HKV;
    f->kv.num_q_heads = TF_HQ;
    f->kv.page_size = TF_PAGE;
    f->kv.k_pages = f->kp;
    f->kv.v_pages = f->vp;
    f->kv.page_table = f->table;
    f->kv.page_table_stride = 8;
    f->kv.num_rows = 2;
    f->kv.num_pages = 8;
    f->kv.k_window = f->kw;
    f->kv.v_window = f->vw;
    f->kv.window_size = TF_W;
    {
        int32_t rows[2] = {0, 1}, first[2] = {0, 0}, ntok[2] = {20, 9};
        if (mustafar_paged_write(f->ctx, &f->kv, 2, rows, first, ntok, f->k, f->v)) return 0;
        f->seqs[0].row = 0; f->seqs[0].num_compressed = 20; f->seqs[0].num_window = 0;
        f->seqs[1].row = 1; f->seqs[1].num_compressed = 9; f->seqs[1].num_window = 0;
    }
    return 1;
}

static void tf_teardown(tf_fix *f)
{
    mustafar_cache_destroy(f->cache);
    mustafar_context_destroy(f->ctx);
    free(f->stream);
    free(f->kp); free(f->vp); free(f->kw); free(f->vw);
    if (f->path[0]) { remove(f->path); }
}

/* ---- fingerprint: everything the cache answers ---------------------------- */
typedef struct tf_print { unsigned char *data; size_t size, cap; } tf_print;
static void tp_add(tf_print *p, const void *data, size_t n)
{
    if (p->size + n > p->cap) {
        p->cap = (p->size + n) * 2 + 256;
        p->data = (unsigned char *)realloc(p->data, p->cap);
    }
    memcpy(p->data + p->size, data, n);
    p->size += n;
}

static void tf_fingerprint(tf_fix *f, tf_print *p)
{
    mustafar_cache_stats s;
    int ids[TF_MAXSEQ], n = 0, i, l, len;
    size_t bytes = 0;
    unsigned char *buf;
    p->size = 0;
    memset(&s, 0, sizeof s);
    tp_add(p, "st", 2);
    i = mustafar_cache_stats_get(f->cache, &s);
    tp_add(p, &i, sizeof i);
    tp_add(p, &s, sizeof s);
    for (i = 0; i < TF_MAXSEQ; i++) {
        for (l = 0; l < TF_LAYERS; l++) {
            len = mustafar_cache_sequence_length(f->cache, i, l);
            tp_add(p, &len, sizeof len);
        }
        if (mustafar_cache_sequence_length(f->cache, i, 0) >= 0) ids[n++] = i;
    }
    for (l = 0; l < TF_LAYERS && n; l++) {
        memset(f->out, 0, sizeof f->out);
        i = mustafar_cache_attention(f->cache, l, n, ids, f->q, f->out, 0.0f);
        tp_add(p, &i, sizeof i);
        tp_add(p, f->out, (size_t)n * TF_HQ * TF_D * 2);
    }
    i = mustafar_cache_save_size(f->cache, -1, &bytes);
    tp_add(p, &i, sizeof i);
    buf = (unsigned char *)malloc(bytes ? bytes : 1);
    i = mustafar_cache_save_memory(f->cache, -1, buf, bytes, NULL);
    tp_add(p, &i, sizeof i);
    tp_add(p, buf, bytes);
    free(buf);
    /* the caller-owned stateless pages */
    tp_add(p, f->kp, f->kp_bytes);
    tp_add(p, f->vp, f->vp_bytes);
}

static int tp_equal(const tf_print *a, const tf_print *b)
{
    return a->size == b->size && !memcmp(a->data, b->data, a->size);
}

/* ---- scenarios ------------------------------------------------------------ */
/* op: the call under test; returns its status.  The create calls leave
   what they made in g_made_ctx / g_made_cache. */
static mustafar_context *g_made_ctx;
static mustafar_cache *g_made_cache;
static int g_loaded_ids[TF_MAXSEQ], g_loaded;
static uint16_t g_scratch_out[TF_MAXSEQ * TF_HQ * TF_D];

static mustafar_status op_context_cpu(tf_fix *f)
{
    mustafar_context_desc cd;
    (void)f;
    memset(&cd, 0, sizeof cd);
    cd.backend = MUSTAFAR_BACKEND_CPU;
    return mustafar_context_create(&cd, &g_made_ctx);
}
static mustafar_status op_context_auto(tf_fix *f)
{
    mustafar_context_desc cd;
    (void)f;
    memset(&cd, 0, sizeof cd);
    cd.backend = MUSTAFAR_BACKEND_AUTO;
    cd.disable_jit_cache = 1;
    return mustafar_context_create(&cd, &g_made_ctx);
}
static mustafar_status op_cache_create(tf_fix *f)
{
    mustafar_cache_desc d;
    tf_desc(&d);
    return mustafar_cache_create(f->ctx, &d, &g_made_cache);
}
static mustafar_status op_add_sequence(tf_fix *f)
{
    int id;
    return mustafar_cache_add_sequence(f->cache, &id);
}
static mustafar_status op_remove_sequence(tf_fix *f) { return mustafar_cache_remove_sequence(f->cache, f->ids[1]); }
static mustafar_status op_append_prefill(tf_fix *f)
{
    int nt[3] = {9, 12, 1};
    return mustafar_cache_append(f->cache, 0, 3, f->ids, nt, f->k, f->v);
}
static mustafar_status op_append_decode(tf_fix *f)
{
    int nt[3] = {1, 1, 1};
    return mustafar_cache_append(f->cache, 1, 3, f->ids, nt, f->k, f->v);
}
static mustafar_status op_attention(tf_fix *f)
{
    return mustafar_cache_attention(f->cache, 1, 3, f->ids, f->q, g_scratch_out, 0.0f);
}
static mustafar_status op_decode_step(tf_fix *f)
{
    int nt[3] = {1, 1, 1};
    return mustafar_cache_decode_step(f->cache, 0, 3, f->ids, nt, f->k, f->v, f->q, g_scratch_out, 0.0f);
}
static mustafar_status op_decode_step_append(tf_fix *f)   /* what decode_step may leave */
{
    int nt[3] = {1, 1, 1};
    return mustafar_cache_append(f->cache, 0, 3, f->ids, nt, f->k, f->v);
}
static size_t tf_sink(void *user, const void *data, size_t bytes)
{
    (void)user; (void)data;
    return bytes;
}
typedef struct tf_reader { const unsigned char *data; size_t size, at; } tf_reader;
static size_t tf_read(void *user, void *data, size_t bytes)
{
    tf_reader *r = (tf_reader *)user;
    if (bytes > r->size - r->at) bytes = r->size - r->at;
    memcpy(data, r->data + r->at, bytes);
    r->at += bytes;
    return bytes;
}
static mustafar_status op_save(tf_fix *f) { return mustafar_cache_save(f->cache, -1, tf_sink, NULL); }
static mustafar_status op_save_one(tf_fix *f) { return mustafar_cache_save(f->cache, f->ids[2], tf_sink, NULL); }
static mustafar_status op_save_memory(tf_fix *f)
{
    unsigned char *buf = (unsigned char *)malloc(f->stream_size);
    mustafar_status st = mustafar_cache_save_memory(f->cache, -1, buf, f->stream_size, NULL);
    free(buf);
    return st;
}
static mustafar_status op_save_file(tf_fix *f)
{
    /* over the fixture's file, which holds the stream of a differently
       filled cache: a failure must leave it */
    return mustafar_cache_save_file(f->cache, f->ids[0], f->path);
}
static mustafar_status op_load(tf_fix *f)
{
    tf_reader r;
    r.data = f->stream; r.size = f->stream_size; r.at = 0;
    return mustafar_cache_load(f->cache, tf_read, &r, g_loaded_ids, TF_MAXSEQ, &g_loaded);
}
static mustafar_status op_load_memory(tf_fix *f)
{
    return mustafar_cache_load_memory(f->cache, f->stream, f->stream_size, g_loaded_ids, TF_MAXSEQ,
                                      &g_loaded);
}
static mustafar_status op_load_file(tf_fix *f)
{
    return mustafar_cache_load_file(f->cache, f->path, g_loaded_ids, TF_MAXSEQ, &g_loaded);
}
/* room for the stream's three sequences: one left, plus one free slot */
static mustafar_status prep_load(tf_fix *f)
{
    mustafar_status st = mustafar_cache_remove_sequence(f->cache, f->ids[0]);
    return st ? st : mustafar_cache_remove_sequence(f->cache, f->ids[1]);
}
static mustafar_status op_paged_write(tf_fix *f)
{
    int32_t rows[2] = {1, 0}, first[2] = {9, 20}, ntok[2] = {15, 3};
    return mustafar_paged_write(f->ctx, &f->kv, 2, rows, first, ntok, f->k, f->v);
}
static mustafar_status op_paged_attention(tf_fix *f)
{
    return mustafar_paged_attention(f->ctx, &f->kv, 2, f->seqs, f->q, g_scratch_out, 0.0f);
}
static mustafar_status op_paged_attention_view(tf_fix *f)
{
    mustafar_paged_kv kv;
    mustafar_paged_seq s[3];
    int i;
    mustafar_cache_layer_view(f->cache, 1, &kv);
    for (i = 0; i < 3; i++) mustafar_cache_sequence_view(f->cache, f->ids[i], 1, &s[i]);
    return mustafar_paged_attention(f->ctx, &kv, 3, s, f->q, g_scratch_out, 0.0f);
}
static mustafar_status op_stateless_records(tf_fix *f)
{
    static unsigned char rec[8 * 64];
    static uint16_t y[8 * TF_D];
    mustafar_status st = mustafar_prune(f->ctx, TF_D, 0.7f, MUSTAFAR_DTYPE_F16, f->k, y, 8);
    if (!st) st = mustafar_compress(f->ctx, TF_D, 0.7f, MUSTAFAR_DTYPE_F16, f->k, rec, 8);
    if (!st) st = mustafar_decompress(f->ctx, TF_D, 0.7f, MUSTAFAR_DTYPE_F16, rec, y, 8);
    return st;
}

/* More sequences than the fixture's own attention calls: the context's work
   space must grow (its allocation fails in turn, keeping the old one). */
static mustafar_status op_paged_attention_grow(tf_fix *f)
{
    static uint16_t q[2 * TF_MAXSEQ * TF_HQ * TF_D], out[2 * TF_MAXSEQ * TF_HQ * TF_D];
    mustafar_paged_kv kv;
    mustafar_paged_seq s[2 * TF_MAXSEQ];
    int i;
    mustafar_cache_layer_view(f->cache, 0, &kv);
    for (i = 0; i < 2 * TF_MAXSEQ; i++) mustafar_cache_sequence_view(f->cache, f->ids[i % 3], 0, &s[i]);
    for (i = 0; i < 2 * TF_MAXSEQ * TF_HQ * TF_D; i++) q[i] = f->q[i % (TF_MAXSEQ * TF_HQ * TF_D)];
    return mustafar_paged_attention(f->ctx, &kv, 2 * TF_MAXSEQ, s, q, out, 0.0f);
}

typedef struct tf_scenario {
    const char *name;
    mustafar_status (*op)(tf_fix *f);
    int creates;                       /* 1: context, 2: cache */
    mustafar_status (*partial)(tf_fix *f);   /* a documented partial effect, or NULL */
    mustafar_status (*prep)(tf_fix *f);      /* uncounted preparation, or NULL */
} tf_scenario;

static const tf_scenario k_scenarios[] = {
    {"context_create(CPU)", op_context_cpu, 1, NULL, NULL},
    {"context_create(AUTO)", op_context_auto, 1, NULL, NULL},
    {"cache_create", op_cache_create, 2, NULL, NULL},
    {"cache_add_sequence", op_add_sequence, 0, NULL, NULL},
    {"cache_remove_sequence", op_remove_sequence, 0, NULL, NULL},
    {"cache_append(prefill)", op_append_prefill, 0, NULL, NULL},
    {"cache_append(decode)", op_append_decode, 0, NULL, NULL},
    {"cache_attention", op_attention, 0, NULL, NULL},
    {"cache_decode_step", op_decode_step, 0, op_decode_step_append, NULL},
    {"cache_save(all)", op_save, 0, NULL, NULL},
    {"cache_save(one)", op_save_one, 0, NULL, NULL},
    {"cache_save_memory", op_save_memory, 0, NULL, NULL},
    {"cache_save_file", op_save_file, 0, NULL, NULL},
    {"cache_load", op_load, 0, NULL, prep_load},
    {"cache_load_memory", op_load_memory, 0, NULL, prep_load},
    {"cache_load_file", op_load_file, 0, NULL, prep_load},
    {"paged_write", op_paged_write, 0, NULL, NULL},
    {"paged_attention", op_paged_attention, 0, NULL, NULL},
    {"paged_attention(cache view)", op_paged_attention_view, 0, NULL, NULL},
    {"paged_attention(work space grows)", op_paged_attention_grow, 0, NULL, NULL},
    {"prune/compress/decompress", op_stateless_records, 0, NULL, NULL},
};

static int read_file(const char *path, tf_print *p)
{
    FILE *fp = fopen(path, "rb");
    unsigned char buf[4096];
    size_t n;
    p->size = 0;
    if (!fp) return 0;
    while ((n = fread(buf, 1, sizeof buf, fp)) > 0) tp_add(p, buf, n);
    fclose(fp);
    return 1;
}

/* A fresh fixture with the scenario's preparation. */
static int tf_prepare(const tf_scenario *s, tf_fix *f)
{
    if (!tf_setup(f)) return 0;
    return !s->prep || s->prep(f) == MUSTAFAR_OK;
}

static mustafar_status run_op(const tf_scenario *s, tf_fix *f, long n, int after)
{
    mustafar_status st;
    arm(n, after);
    st = s->op(f);
    disarm();
    return st;
}

/* The fingerprint after the call succeeds on a fresh fixture. */
static long reference(const tf_scenario *s, tf_print *before, tf_print *after, tf_print *partial)
{
    tf_fix *f = (tf_fix *)calloc(1, sizeof *f);
    long calls;
    mustafar_status st;
    if (!tf_prepare(s, f)) { CHECK(0, "fixture setup failed"); free(f); return 0; }
    tf_fingerprint(f, before);
    st = run_op(s, f, 0, 0);
    calls = g_calls;
    CHECK(st == MUSTAFAR_OK, "the call without a fault returned %s: %s", mustafar_status_string(st),
          mustafar_last_error(f->ctx));
    if (g_made_ctx) { mustafar_context_destroy(g_made_ctx); g_made_ctx = NULL; }
    if (g_made_cache) { mustafar_cache_destroy(g_made_cache); g_made_cache = NULL; }
    tf_fingerprint(f, after);
    tf_teardown(f);
    partial->size = 0;
    if (s->partial) {
        tf_prepare(s, f);
        s->partial(f);
        tf_fingerprint(f, partial);
        tf_teardown(f);
    }
    free(f);
    CHECK(g_live == 0, "%ld blocks live after the reference run", g_live);
    return calls;
}

static void run_scenario(const tf_scenario *s)
{
    tf_print before = {0, 0, 0}, after = {0, 0, 0}, partial = {0, 0, 0}, now = {0, 0, 0};
    tf_print file_before = {0, 0, 0}, file_now = {0, 0, 0};
    long calls, n;
    int mode, failures = 0;
    g_scenario = s->name;
    g_n = 0; g_mode = 0;
    calls = reference(s, &before, &after, &partial);
    for (mode = 0; mode < 2; mode++) {
        g_mode = mode;
        for (n = 1; n <= calls; n++) {
            tf_fix *f = (tf_fix *)calloc(1, sizeof *f);
            mustafar_status st;
            long live0, failed;
            char tmp[300];
            g_n = n;
            if (!tf_prepare(s, f)) { CHECK(0, "fixture setup failed"); free(f); continue; }
            read_file(f->path, &file_before);
            live0 = g_live;
            st = run_op(s, f, n, mode);
            failed = g_failed;
            if (s->creates) {
                mustafar_context *made_ctx = g_made_ctx;
                mustafar_cache *made_cache = g_made_cache;
                if (st) {
                    failures++;
                    CHECK(st == MUSTAFAR_ERROR_OUT_OF_MEMORY, "returned %s", mustafar_status_string(st));
                    CHECK(!made_ctx && !made_cache, "a failed create left an object");
                    CHECK(g_live == live0, "%ld blocks leaked by the failed create", g_live - live0);
                    if (s->creates == 2) CHECK(strstr(mustafar_last_error(f->ctx), "alloc") != NULL,
                                               "message: %s", mustafar_last_error(f->ctx));
                } else {
                    /* a fault in something optional (AUTO's CUDA probe): the
                       object must work */
                    CHECK(failed > 0 || n > g_calls, "no fault injected, yet n <= calls");
                    if (made_ctx) {
                        mustafar_cache *c = NULL;
                        mustafar_cache_desc d;
                        tf_desc(&d);
                        CHECK(mustafar_cache_create(made_ctx, &d, &c) == MUSTAFAR_OK,
                              "the context made despite the fault does not work");
                        mustafar_cache_destroy(c);
                    }
                }
                if (made_ctx) mustafar_context_destroy(made_ctx);
                if (made_cache) mustafar_cache_destroy(made_cache);
                g_made_ctx = NULL; g_made_cache = NULL;
                CHECK(g_live == live0, "%ld blocks live after destroying what the call made",
                      g_live - live0);
            } else {
                if (st != MUSTAFAR_OK) {
                    failures++;
                    CHECK(st == MUSTAFAR_ERROR_OUT_OF_MEMORY, "returned %s: %s", mustafar_status_string(st),
                          mustafar_last_error(f->ctx));
                    CHECK(mustafar_last_error(f->ctx)[0] != 0, "no message");
                    CHECK(g_live == live0, "%ld blocks leaked by the failed call", g_live - live0);
                    tf_fingerprint(f, &now);
                    CHECK(tp_equal(&now, &before) || (s->partial && tp_equal(&now, &partial)),
                          "the cache changed after the failed call");
                    /* a file the call writes: as before, no temporary */
                    read_file(f->path, &file_now);
                    CHECK(tp_equal(&file_now, &file_before), "the file changed after the failed save");
                    snprintf(tmp, sizeof tmp, "%s.tmp", f->path);
                    {
                        FILE *fp = fopen(tmp, "rb");
                        CHECK(!fp, "temporary file left behind");
                        if (fp) fclose(fp);
                    }
                    /* the cache still works: the call again, no fault */
                    if (!(s->partial && tp_equal(&now, &partial))) {
                        st = run_op(s, f, 0, 0);
                        CHECK(st == MUSTAFAR_OK, "the call again without a fault: %s",
                              mustafar_status_string(st));
                        tf_fingerprint(f, &now);
                        CHECK(tp_equal(&now, &after), "the call again gives another result");
                    }
                } else {
                    /* succeeded: either no fault reached, or it was tolerated
                       (then the result must be the normal one) */
                    tf_fingerprint(f, &now);
                    CHECK(tp_equal(&now, &after), "succeeded despite %ld refused allocations, "
                          "with another result", failed);
                }
            }
            tf_teardown(f);
            free(f);
            CHECK(g_live == 0, "%ld blocks live after teardown", g_live);
        }
    }
    printf("%-30s %2ld allocations, %d failed calls checked\n", s->name, calls, failures);
    free(before.data); free(after.data); free(partial.data); free(now.data);
    free(file_before.data); free(file_now.data);
}

/* What MEMORY says: stats.allocated_bytes is what cache_create allocated;
   load_memory does not copy the stream; a decode step, once the context's
   work space has grown, allocates 3 small blocks and frees them. */
static void check_memory_doc(void)
{
    tf_fix f;
    mustafar_cache *c = NULL;
    mustafar_cache_stats st;
    int ids[3], nt[3] = {1, 1, 1};
    long live;
    g_scenario = "memory figures";
    g_n = 0;
    if (!tf_setup(&f)) { CHECK(0, "fixture setup failed"); return; }
    arm(0, 0);
    CHECK(mustafar_cache_create(f.ctx, &f.desc, &c) == MUSTAFAR_OK, "cache_create failed");
    if (c) {
        const size_t created = g_bytes;
        memset(&st, 0, sizeof st);
        mustafar_cache_stats_get(c, &st);
        CHECK((size_t)st.allocated_bytes == created, "allocated_bytes %lld, cache_create allocated %zu",
              (long long)st.allocated_bytes, created);
        /* load_memory reads the records in place: less than the stream is allocated */
        {
            int got = 0, loaded[TF_MAXSEQ];
            arm(0, 0);
            CHECK(mustafar_cache_load_memory(c, f.stream, f.stream_size, loaded, TF_MAXSEQ, &got) ==
                      MUSTAFAR_OK && got > 0, "load_memory of the fixture's stream failed");
            CHECK(g_bytes < f.stream_size / 2, "load_memory of a %zu-byte stream allocated %zu bytes",
                  f.stream_size, g_bytes);
        }
        mustafar_cache_destroy(c);
    }
    memcpy(ids, f.ids, sizeof ids);
    /* the first step may grow the context's attention work space; a step
       after it allocates 3 small blocks (append jobs, pages, sequence list)
       and frees them */
    CHECK(mustafar_cache_decode_step(f.cache, 0, 3, ids, nt, f.k, f.v, f.q, f.out, 0.0f) == MUSTAFAR_OK,
          "decode_step failed");
    live = g_live;
    arm(0, 0);
    CHECK(mustafar_cache_decode_step(f.cache, 1, 3, ids, nt, f.k, f.v, f.q, f.out, 0.0f) == MUSTAFAR_OK,
          "decode_step failed");
    CHECK(g_live == live && g_calls == 3 && g_bytes < 1024, "decode step: %ld allocations (%zu bytes), "
          "%ld blocks left live", g_calls, g_bytes, g_live - live);
    tf_teardown(&f);
}

int main(void)
{
    size_t i;
    for (i = 0; i < sizeof k_scenarios / sizeof k_scenarios[0]; i++) run_scenario(&k_scenarios[i]);
    check_memory_doc();
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail != 0;
}
