/* test_robust.h - case 8: save and restore, corrupt streams and records, and
   the lifetime and overflow defects, each as a reproducer. */

typedef struct tr_buffer { unsigned char *data; size_t size, cap; } tr_buffer;

static size_t tr_write(void *user, const void *data, size_t bytes)
{
    tr_buffer *b = (tr_buffer *)user;
    if (b->size + bytes > b->cap) {
        b->cap = (b->size + bytes) * 2;
        b->data = (unsigned char *)realloc(b->data, b->cap);
        if (!b->data) return 0;
    }
    memcpy(b->data + b->size, data, bytes);
    b->size += bytes;
    return bytes;
}

/* A model cache with three sequences: one inside the window, one over it
   with a partial last page, one a few pages long; the layers differ in
   length (the second layer lags by 3 tokens). */
static int tr_fill(tm_model *m, mustafar_context *ctx, tb_rng *r, mustafar_dtype dt, int page)
{
    mustafar_cache_desc d;
    int ids[3], n0[3] = {5, 37, 90}, n1[3] = {5, 34, 87}, i;
    tm_desc(&d, 2, 2, 4, 64, dt, 0.7f, 0.5f, 8, page, 1024, 8);
    if (!tm_create(m, ctx, r, &d, 1)) return 0;
    for (i = 0; i < 3; i++) ids[i] = tm_add(m);
    tm_append(m, 0, 3, ids, n0);
    tm_append(m, 1, 3, ids, n1);
    return 1;
}

static void tr_save(mustafar_cache *c, int seq_id, tr_buffer *b)
{
    b->size = 0;
    CHECK_ST(NULL, mustafar_cache_save(c, seq_id, tr_write, b), MUSTAFAR_OK);
}

static void test_save_load_roundtrip(mustafar_context *ctx)
{
    tb_rng r;
    tm_model m;
    mustafar_context_desc cd;
    mustafar_context *cpu = NULL;
    mustafar_cache_desc d2;
    mustafar_cache *c2 = NULL, *c3 = NULL;
    tr_buffer a = {0, 0, 0}, b = {0, 0, 0};
    int ids[8], n = 0, dt;
    size_t size = 0;
    for (dt = 1; dt <= 2; dt++) {
        tb_rng_for_test(&r, g_cur_test);
        if (!tr_fill(&m, ctx, &r, (mustafar_dtype)dt, 16)) return;
        tr_save(m.cache, -1, &a);
        CHECK_ST(ctx, mustafar_cache_save_size(m.cache, -1, &size), MUSTAFAR_OK);
        CHECK(size == a.size, "save_size %zu, stream %zu bytes", size, a.size);
        /* into a cache of another page size and capacity on the CPU backend */
        memset(&cd, 0, sizeof cd);
        cd.backend = MUSTAFAR_BACKEND_CPU;
        CHECK_ST(NULL, mustafar_context_create(&cd, &cpu), MUSTAFAR_OK);
        d2 = m.desc;
        d2.page_size = 8;
        d2.capacity_tokens = 4096;
        d2.max_sequences = 5;
        CHECK_ST(cpu, mustafar_cache_create(cpu, &d2, &c2), MUSTAFAR_OK);
        CHECK_ST(cpu, mustafar_cache_load_memory(c2, a.data, a.size, ids, 8, &n), MUSTAFAR_OK);
        CHECK(n == 3, "loaded %d sequences, expected 3", n);
        tr_save(c2, -1, &b);
        CHECK(b.size == a.size && !memcmp(a.data, b.data, a.size),
              "%s stream re-saved from the CPU backend differs (%zu vs %zu bytes)", tb_dtname((mustafar_dtype)dt),
              a.size, b.size);
        /* and back into a cache of the test's backend, then attention there */
        d2.page_size = 16;
        CHECK_ST(ctx, mustafar_cache_create(ctx, &d2, &c3), MUSTAFAR_OK);
        CHECK_ST(ctx, mustafar_cache_load_memory(c3, b.data, b.size, ids, 8, &n), MUSTAFAR_OK);
        if (c3 && n == 3) {
            size_t per = (size_t)m.hq * m.D;
            uint16_t *q = TB_NEW(uint16_t, 3 * per), *o1 = TB_NEW(uint16_t, 3 * per);
            uint16_t *o2 = TB_NEW(uint16_t, 3 * per);
            void *dq = tb_alloc(ctx, 3 * per * 2), *dout = tb_alloc(ctx, 3 * per * 2);
            int orig[3], l;
            size_t i;
            for (i = 0; i < 3 * per; i++) q[i] = tb_d2h(m.dt, tb_normal(&r));
            for (i = 0; i < 3; i++) orig[i] = m.seq[i].id;
            tb_upload(ctx, dq, q, 3 * per * 2);
            for (l = 0; l < 2; l++) {
                CHECK_ST(ctx, mustafar_cache_attention(m.cache, l, 3, orig, dq, dout, 0.0f), MUSTAFAR_OK);
                tb_download(ctx, o1, dout, 3 * per * 2);
                CHECK_ST(ctx, mustafar_cache_attention(c3, l, 3, ids, dq, dout, 0.0f), MUSTAFAR_OK);
                tb_download(ctx, o2, dout, 3 * per * 2);
                CHECK(!memcmp(o1, o2, 3 * per * 2), "layer %d: attention on the loaded cache differs", l);
            }
            tb_free(ctx, dq); tb_free(ctx, dout);
            free(q); free(o1); free(o2);
        }
        /* one sequence at a time, through a file */
        {
            char path[256];
            int one = -1, got = 0;
            snprintf(path, sizeof path, "%s/mustafar_test_%llu.kv", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp",
                     (unsigned long long)g_seed);
            CHECK_ST(ctx, mustafar_cache_save_file(m.cache, m.seq[1].id, path), MUSTAFAR_OK);
            CHECK_ST(ctx, mustafar_cache_load_file(m.cache, path, &one, 1, &got), MUSTAFAR_OK);
            CHECK(got == 1 && mustafar_cache_sequence_length(m.cache, one, 0) == 37 &&
                  mustafar_cache_sequence_length(m.cache, one, 1) == 34,
                  "file round trip: %d sequences, lengths %d / %d", got,
                  mustafar_cache_sequence_length(m.cache, one, 0), mustafar_cache_sequence_length(m.cache, one, 1));
            {
                char tmp[300];
                FILE *f;
                snprintf(tmp, sizeof tmp, "%s.tmp", path);
                f = fopen(tmp, "rb");
                CHECK(!f, "the temporary file %s was left behind", tmp);
                if (f) fclose(f);
            }
            remove(path);
            CHECK_ST(ctx, mustafar_cache_save_file(m.cache, -1, "/nonexistent-dir/x.kv"), MUSTAFAR_ERROR_IO);
            /* a UTF-8 path (a player's name): the file has that name (on
               Windows too, where the ANSI calls would mangle it) */
            snprintf(path, sizeof path, "%s/mustafar_test_\xd0\x94\xd0\xb8\xd0\xbc\xd0\xb0_%llu.kv",
                     getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (unsigned long long)g_seed);
            CHECK_ST(ctx, mustafar_cache_save_file(m.cache, m.seq[1].id, path), MUSTAFAR_OK);
            CHECK_ST(ctx, mustafar_cache_save_file(m.cache, m.seq[1].id, path), MUSTAFAR_OK);  /* replaces */
            CHECK_ST(ctx, mustafar_cache_load_file(m.cache, path, &one, 1, &got), MUSTAFAR_OK);
            CHECK(got == 1 && mustafar_cache_sequence_length(m.cache, one, 0) == 37,
                  "UTF-8 path round trip: %d sequences", got);
            {
#ifdef _WIN32
                wchar_t w[300];
                FILE *f = NULL;
                if (MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, path, -1, w, 300) > 0) f = _wfopen(w, L"rb");
                CHECK(f != NULL, "no file under the UTF-8 name %s", path);
                if (f) fclose(f);
                _wremove(w);
#else
                FILE *f = fopen(path, "rb");
                CHECK(f != NULL, "no file under the UTF-8 name %s", path);
                if (f) fclose(f);
                remove(path);
#endif
            }
        }
        mustafar_cache_destroy(c3);
        mustafar_cache_destroy(c2);
        mustafar_context_destroy(cpu);
        c2 = c3 = NULL;
        cpu = NULL;
        tm_destroy(&m);
    }
    free(a.data);
    free(b.data);
}

/* Every corruption of a stream fails with a clear status and leaves the
   cache exactly as it was. */
static void test_load_corrupt(mustafar_context *ctx)
{
    tb_rng r;
    tm_model m, other;
    tm_snap before, after;
    tr_buffer a = {0, 0, 0};
    uint16_t *q;
    unsigned char *bad;
    int ids[8], n = 0, k, trials = g_quick ? 40 : 150;
    size_t per;
    tb_rng_for_test(&r, g_cur_test);
    if (!tr_fill(&m, ctx, &r, MUSTAFAR_DTYPE_F16, 16)) return;
    tr_save(m.cache, -1, &a);
    per = (size_t)TM_MAX_SEQS * m.hq * m.D;
    q = TB_NEW(uint16_t, per);
    for (k = 0; k < (int)per; k++) q[k] = tb_d2h(m.dt, tb_normal(&r));
    tm_snapshot(&m, &before, q);
    bad = TB_NEW(unsigned char, a.size + 16);
    for (k = 0; k < trials; k++) {
        size_t cut = (size_t)tb_int(&r, 0, (int)a.size - 1), at = (size_t)tb_int(&r, 0, (int)a.size - 1);
        mustafar_status st;
        memcpy(bad, a.data, a.size);
        st = mustafar_cache_load_memory(m.cache, bad, cut, ids, 8, &n);   /* truncated */
        CHECK(st == MUSTAFAR_ERROR_INVALID_FILE && n == 0, "truncated to %zu of %zu bytes: %s", cut, a.size,
              tb_sname(st));
        bad[at] ^= (unsigned char)(1u << tb_int(&r, 0, 7));              /* one bit flipped */
        st = mustafar_cache_load_memory(m.cache, bad, a.size, ids, 8, &n);
        CHECK(st != MUSTAFAR_OK && n == 0, "bit flipped at byte %zu of %zu: loaded", at, a.size);
    }
    memcpy(bad, a.data, a.size);
    memset(bad + a.size, 0, 16);
    CHECK_ST(ctx, mustafar_cache_load_memory(m.cache, bad, a.size + 16, ids, 8, &n), MUSTAFAR_ERROR_INVALID_FILE);
    CHECK_ST(ctx, mustafar_cache_load_memory(m.cache, a.data, a.size, ids, 2, &n), MUSTAFAR_ERROR_INVALID_ARGUMENT);
    /* a negative room for ids is refused, not read as a large unsigned one */
    CHECK_ST(ctx, mustafar_cache_load_memory(m.cache, a.data, a.size, ids, -1, &n), MUSTAFAR_ERROR_INVALID_ARGUMENT);
    CHECK(n == 0, "max_ids -1: %d sequences loaded", n);
    /* a stream of another shape */
    {
        mustafar_cache_desc d;
        tm_desc(&d, 2, 2, 4, 64, MUSTAFAR_DTYPE_F16, 0.5f, 0.5f, 8, 16, 1024, 8);
        if (tm_create(&other, ctx, &r, &d, 0)) {
            CHECK_ST(ctx, mustafar_cache_load_memory(other.cache, a.data, a.size, ids, 8, &n),
                     MUSTAFAR_ERROR_INVALID_FILE);
            CHECK(strstr(mustafar_last_error(ctx), "K kept count") != NULL, "shape mismatch message: %s",
                  mustafar_last_error(ctx));
            tm_destroy(&other);
        }
        /* too little room: 4 free sequences of 8, and a pool of 2 pages */
        tm_desc(&d, 2, 2, 4, 64, MUSTAFAR_DTYPE_F16, 0.7f, 0.5f, 8, 16, 32, 8);
        d.max_sequence_length = 128;
        if (tm_create(&other, ctx, &r, &d, 0)) {
            CHECK_ST(ctx, mustafar_cache_load_memory(other.cache, a.data, a.size, ids, 8, &n),
                     MUSTAFAR_ERROR_POOL_FULL);
            CHECK(tm_pages_used(&other) == 0, "a refused load left %" PRId64 " pages used", tm_pages_used(&other));
            tm_destroy(&other);
        }
    }
    tm_snapshot(&m, &after, q);
    tm_snap_compare(&m, &before, &after, "corrupt loads");
    tm_snap_free(&before);
    tm_snap_free(&after);
    free(bad);
    free(q);
    free(a.data);
    tm_destroy(&m);
}

/* Records from an untrusted source: any bitmap (more or fewer bits than the
   kept count), NaN and Inf values.  Decoding reads at most the kept count of
   values, so nothing is read past a record (ASan checks it); a record with
   fewer bits set than the kept count gives zeros for the values it lacks. */
static void test_corrupt_records(mustafar_context *ctx)
{
    enum { D = 128, CNT = 64 };
    tb_rng r;
    size_t rec = mustafar_record_bytes(D, 0.7f, MUSTAFAR_DTYPE_F16);
    int kept = mustafar_kept_count(D, 0.7f), i, c;
    unsigned char *recs = TB_NEW(unsigned char, CNT * rec);
    uint16_t *out = TB_NEW(uint16_t, CNT * D);
    void *drec, *dout;
    tb_rng_for_test(&r, g_cur_test);
    for (i = 0; i < (int)(CNT * rec); i++) recs[i] = (unsigned char)tb_u32(&r);
    for (i = 0; i < CNT; i++) {     /* some all-ones and all-zero bitmaps, NaN/Inf values */
        if (i % 4 == 0) memset(recs + i * rec, 0xFF, (size_t)D / 8);
        if (i % 4 == 1) memset(recs + i * rec, 0x00, (size_t)D / 8);
        if (i % 4 == 2) { recs[i * rec + D / 8] = 0x00; recs[i * rec + D / 8 + 1] = 0x7C; }  /* +Inf */
        if (i % 4 == 3) { recs[i * rec + D / 8] = 0xFF; recs[i * rec + D / 8 + 1] = 0x7F; }  /* NaN */
    }
    drec = tb_dup(ctx, recs, CNT * rec);
    dout = tb_alloc(ctx, (size_t)CNT * D * 2);
    CHECK_ST(ctx, mustafar_decompress(ctx, D, 0.7f, MUSTAFAR_DTYPE_F16, drec, dout, CNT), MUSTAFAR_OK);
    tb_download(ctx, out, dout, (size_t)CNT * D * 2);
    for (i = 0; i < CNT; i++) {
        int nonzero = 0;
        for (c = 0; c < D; c++) nonzero += out[i * D + c] != 0;
        CHECK(nonzero <= kept, "corrupt record %d decoded to %d nonzero values, more than %d kept", i,
              nonzero, kept);
        if (i % 4 == 1) CHECK(nonzero == 0, "an all-zero bitmap decoded to %d values", nonzero);
    }
    tb_free(ctx, drec);
    tb_free(ctx, dout);
    free(recs);
    free(out);
}

/* The defects found by an adversarial user, each a reproducer. */
static void test_robust_defects(mustafar_context *ctx)
{
    mustafar_cache_desc d;
    mustafar_cache *c = NULL;
    mustafar_context_desc cd;
    mustafar_context *own = NULL;
    mustafar_paged_kv kv;
    mustafar_cache_stats stats;
    int seq = -1;
    /* capacity near INT64_MAX: refused, no overflow (UBSan) and no huge allocation */
    memset(&d, 0, sizeof d);
    d.num_layers = 1; d.num_kv_heads = 1; d.k_sparsity = d.v_sparsity = 0.5f;
    d.capacity_tokens = INT64_MAX;
    CHECK_ST(ctx, mustafar_cache_create(ctx, &d, &c), MUSTAFAR_ERROR_INVALID_ARGUMENT);
    /* a page larger than the longest sequence: taken as the longest sequence */
    d.capacity_tokens = 1024;
    d.page_size = INT32_MAX;
    c = NULL;
    if (CHECK_ST(ctx, mustafar_cache_create(ctx, &d, &c), MUSTAFAR_OK)) {
        if (CHECK_ST(ctx, mustafar_cache_layer_view(c, 0, &kv), MUSTAFAR_OK))
            CHECK(kv.page_size == 1024, "page size INT32_MAX, max length 1024: pages of %d", kv.page_size);
        mustafar_cache_destroy(c);
        c = NULL;
    }
    /* out = NULL updates the message */
    d.page_size = 16;
    memset(&cd, 0, sizeof cd);
    cd.backend = mustafar_context_backend(ctx);
    if (!CHECK_ST(NULL, mustafar_context_create(&cd, &own), MUSTAFAR_OK)) return;
    CHECK_ST(own, mustafar_cache_create(own, &d, &c), MUSTAFAR_OK);
    if (!c) { mustafar_context_destroy(own); return; }
    CHECK_ST(own, mustafar_cache_add_sequence(c, &seq), MUSTAFAR_OK);
    mustafar_cache_remove_sequence(c, 12345);                 /* an older, unrelated message */
    CHECK_ST(own, mustafar_cache_stats_get(c, NULL), MUSTAFAR_ERROR_NULL_POINTER);
    CHECK(strstr(mustafar_last_error(own), "NULL") != NULL, "stats_get(NULL): last_error '%s'", mustafar_last_error(own));
    mustafar_cache_remove_sequence(c, 12345);
    CHECK_ST(own, mustafar_cache_layer_view(c, 0, NULL), MUSTAFAR_ERROR_NULL_POINTER);
    CHECK(strstr(mustafar_last_error(own), "NULL") != NULL, "layer_view(NULL): last_error '%s'", mustafar_last_error(own));
    mustafar_cache_remove_sequence(c, 12345);
    CHECK_ST(own, mustafar_cache_sequence_view(c, seq, 0, NULL), MUSTAFAR_ERROR_NULL_POINTER);
    CHECK(strstr(mustafar_last_error(own), "NULL") != NULL, "sequence_view(NULL): last_error '%s'", mustafar_last_error(own));
    /* paged_write past int32 positions: refused by the check, not by wrapping */
    if (CHECK_ST(own, mustafar_cache_layer_view(c, 0, &kv), MUSTAFAR_OK)) {
        int32_t row = 0, first = INT32_MAX, count = 1;
        uint16_t k[128], v[128];
        memset(k, 0, sizeof k);
        memset(v, 0, sizeof v);
        if (!tb_is_cuda(own))
            CHECK_ST(own, mustafar_paged_write(own, &kv, 1, &row, &first, &count, k, v),
                     MUSTAFAR_ERROR_INVALID_ARGUMENT);
    }
    /* the context destroyed before its cache: the cache's memory goes with
       it, the handle answers WRONG_BACKEND, and destroying it is safe */
    mustafar_context_destroy(own);
    CHECK_ST(NULL, mustafar_cache_stats_get(c, &stats), MUSTAFAR_ERROR_WRONG_BACKEND);
    CHECK_ST(NULL, mustafar_cache_add_sequence(c, &seq), MUSTAFAR_ERROR_WRONG_BACKEND);
    CHECK(mustafar_cache_sequence_length(c, 0, 0) == -1, "sequence_length on an orphaned cache");
    mustafar_cache_destroy(c);
}
