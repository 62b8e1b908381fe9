/* test_cache.h - case 5: cache semantics (lengths, stats, pages, removal,
   sharing of the pool, the documented layout seen through the stateless
   view). */

static int tm_maxlen(const tm_model *m, int i)
{
    int l, x = 0;
    for (l = 0; l < m->L; l++)
        if (m->seq[i].len[l] > x) x = m->seq[i].len[l];
    return x;
}

/* Stats against the model: counts and bytes as documented. */
static void tm_check_stats(tm_model *m, const char *what)
{
    mustafar_cache_stats st;
    int64_t tv = 0, comp = 0, pmin = 0, pmax = 0;
    int live = 0, i, l;
    int64_t krec = (int64_t)ref_record_bytes(m->D, m->nk), vrec = (int64_t)ref_record_bytes(m->D, m->nv);
    int64_t dense_tok = (int64_t)m->D * 2 * 2;   /* K + V of one (token, layer, head), 2-byte elements */
    memset(&st, 0, sizeof st);
    if (!CHECK_ST(m->ctx, mustafar_cache_stats_get(m->cache, &st), MUSTAFAR_OK)) return;
    for (i = 0; i < m->nseq; i++) {
        int mx;
        if (!m->seq[i].live) continue;
        live++;
        for (l = 0; l < m->L; l++) {
            int len = m->seq[i].len[l], nc = len > m->W ? len - m->W : 0;
            tv += (int64_t)len * m->hkv;
            comp += (int64_t)nc * m->hkv;
        }
        mx = tm_maxlen(m, i);
        pmax += (mx + m->page - 1) / m->page;
        pmin += ((mx > m->W ? mx - m->W : 0) + m->page - 1) / m->page;
    }
    CHECK(st.sequences == live, "%s: stats.sequences %d, expected %d", what, st.sequences, live);
    CHECK(st.token_vectors == tv, "%s: stats.token_vectors %" PRId64 ", expected %" PRId64, what, st.token_vectors, tv);
    CHECK(st.compressed_vectors == comp, "%s: stats.compressed_vectors %" PRId64 ", expected %" PRId64, what,
          st.compressed_vectors, comp);
    CHECK(st.dense_bytes == tv * dense_tok, "%s: stats.dense_bytes %" PRId64 ", expected %" PRId64, what,
          st.dense_bytes, tv * dense_tok);
    CHECK(st.record_bytes == comp * (krec + vrec) + (tv - comp) * dense_tok,
          "%s: stats.record_bytes %" PRId64 ", expected %" PRId64 " (records + window data)", what,
          st.record_bytes, comp * (krec + vrec) + (tv - comp) * dense_tok);
    if (st.dense_bytes > 0)
        CHECK(fabs(st.compression_ratio - (double)st.record_bytes / (double)st.dense_bytes) < 1e-12,
              "%s: compression_ratio %g != record_bytes / dense_bytes", what, st.compression_ratio);
    CHECK(st.reserved_bytes >= st.record_bytes, "%s: reserved_bytes %" PRId64 " < record_bytes %" PRId64,
          what, st.reserved_bytes, st.record_bytes);
    CHECK(st.pages_used >= 0 && st.pages_used <= st.pages_total, "%s: pages_used %" PRId64 " of %" PRId64,
          what, st.pages_used, st.pages_total);
    /* pages hold at least the compressed positions, at most every position */
    CHECK(st.pages_used >= pmin && st.pages_used <= pmax, "%s: pages_used %" PRId64 " outside [%" PRId64
          ", %" PRId64 "]", what, st.pages_used, pmin, pmax);
}

static int64_t tm_pages_used(tm_model *m)
{
    mustafar_cache_stats st;
    memset(&st, 0, sizeof st);
    CHECK_ST(m->ctx, mustafar_cache_stats_get(m->cache, &st), MUSTAFAR_OK);
    return st.pages_used;
}

static void test_cache_stats_and_pages(mustafar_context *ctx)
{
    tb_rng r;
    mustafar_cache_desc d;
    mustafar_cache_stats st;
    tm_model m;
    int a, b, c, e, l, ids3[3], n3[3];
    int la = g_quick ? 200 : 500;
    int64_t p0, p1;
    tb_rng_for_test(&r, g_cur_test);
    tm_desc(&d, 2, 2, 4, 128, MUSTAFAR_DTYPE_F16, 0.7f, 0.7f, 0, 16, 2048, 8);
    if (!tm_create(&m, ctx, &r, &d, 1)) return;
    memset(&st, 0, sizeof st);
    CHECK_ST(ctx, mustafar_cache_stats_get(m.cache, &st), MUSTAFAR_OK);
    CHECK(st.sequences == 0 && st.pages_used == 0 && st.token_vectors == 0,
          "fresh cache: sequences %d pages_used %" PRId64 " token_vectors %" PRId64, st.sequences,
          st.pages_used, st.token_vectors);
    CHECK(st.pages_total * 16 >= 2048 && (st.pages_total - 1) * 16 < 2048,
          "capacity 2048 tokens, page 16: pages_total %" PRId64 ", expected 128", st.pages_total);
    a = tm_add(&m);
    b = tm_add(&m);
    c = tm_add(&m);
    if (a < 0 || b < 0 || c < 0) { tm_destroy(&m); return; }
    tm_check_stats(&m, "3 empty sequences");
    ids3[0] = a; ids3[1] = b; ids3[2] = c;
    n3[0] = la; n3[1] = 37; n3[2] = 1;
    tm_append(&m, 0, 3, ids3, n3);
    /* layer 0 has the tokens, layer 1 not yet */
    CHECK(mustafar_cache_sequence_length(m.cache, m.seq[a].id, 0) == la &&
          mustafar_cache_sequence_length(m.cache, m.seq[a].id, 1) == 0,
          "after appending layer 0 only: lengths %d / %d, expected %d / 0",
          mustafar_cache_sequence_length(m.cache, m.seq[a].id, 0),
          mustafar_cache_sequence_length(m.cache, m.seq[a].id, 1), la);
    tm_check_stats(&m, "layer 0 appended");
    tm_append(&m, 1, 3, ids3, n3);
    tm_check_stats(&m, "both layers appended");
    CHECK(mustafar_cache_sequence_length(m.cache, m.seq[b].id, 1) == 37, "length of b in layer 1: %d",
          mustafar_cache_sequence_length(m.cache, m.seq[b].id, 1));
    CHECK(mustafar_cache_sequence_length(m.cache, m.seq[a].id, 2) == -1, "sequence_length of layer 2 (of 2) != -1");
    CHECK(mustafar_cache_sequence_length(m.cache, m.seq[a].id, -1) == -1, "sequence_length of layer -1 != -1");
    CHECK(mustafar_cache_sequence_length(m.cache, 987654, 0) == -1, "sequence_length of an unknown id != -1");
    memset(&st, 0, sizeof st);
    CHECK_ST(ctx, mustafar_cache_stats_get(m.cache, &st), MUSTAFAR_OK);
    /* W = 0, s = 0.7: 96 + 96 record bytes per 256 + 256 dense */
    CHECK(fabs(st.compression_ratio - 96.0 / 256.0) < 1e-9, "compression_ratio %g, expected 0.375",
          st.compression_ratio);
    p0 = st.pages_used;
    CHECK(p0 == (la + 15) / 16 + 3 + 1, "pages_used %" PRId64 ", expected %d (W = 0: one page per 16 positions)",
          p0, (la + 15) / 16 + 3 + 1);
    tm_check_all(&m, 0.0f, "stats cache");
    /* removing b frees exactly its 3 pages */
    tm_remove(&m, b);
    p1 = tm_pages_used(&m);
    CHECK(p1 == p0 - 3, "removing a 37-token sequence: pages_used %" PRId64 " -> %" PRId64 ", expected -3", p0, p1);
    CHECK(mustafar_cache_sequence_length(m.cache, m.seq[b].id, 0) == -1, "removed sequence has length %d",
          mustafar_cache_sequence_length(m.cache, m.seq[b].id, 0));
    tm_check_stats(&m, "after remove");
    /* re-adding after removal works */
    e = tm_add(&m);
    if (e >= 0) {
        int one[1], n1[1];
        one[0] = e;
        n1[0] = 40;
        for (l = 0; l < 2; l++) tm_append(&m, l, 1, one, n1);
        tm_check_stats(&m, "after re-add");
        CHECK(tm_pages_used(&m) == p1 + 3, "a 40-token sequence should take 3 pages");
        tm_check_all(&m, 0.0f, "after re-add");
    }
    tm_remove(&m, a);
    tm_remove(&m, c);
    if (e >= 0) tm_remove(&m, e);
    memset(&st, 0, sizeof st);
    CHECK_ST(ctx, mustafar_cache_stats_get(m.cache, &st), MUSTAFAR_OK);
    CHECK(st.pages_used == 0 && st.sequences == 0 && st.token_vectors == 0 && st.record_bytes == 0,
          "all removed: pages_used %" PRId64 " sequences %d token_vectors %" PRId64, st.pages_used,
          st.sequences, st.token_vectors);
    tm_destroy(&m);

    /* with a dense window: window tokens are counted dense */
    tm_desc(&d, 2, 2, 4, 64, MUSTAFAR_DTYPE_BF16, 0.5f, 0.7f, 16, 8, 1024, 8);
    if (!tm_create(&m, ctx, &r, &d, 1)) return;
    {
        int idx[4], nt[4] = {5, 16, 17, 100}, i;
        for (i = 0; i < 4; i++) idx[i] = tm_add(&m);
        for (l = 0; l < 2; l++) tm_append(&m, l, 4, idx, nt);
        tm_check_stats(&m, "window 16");
        tm_check_all(&m, 0.0f, "window 16");
        for (i = 0; i < 4; i++) nt[i] = 1;
        for (l = 0; l < 2; l++) tm_append(&m, l, 4, idx, nt);
        tm_check_stats(&m, "window 16, +1 token");
        tm_check_all(&m, 0.0f, "window 16, +1 token");
    }
    tm_destroy(&m);
}

/* Appends whose job and page lists take each way to the GPU kernel: in the
   small parameter block (<= 48 sequences, <= 96 new pages), in the wide one
   (<= 128 sequences, <= 3072 new pages) and uploaded (more); page size 2
   makes the page counts large with few tokens.  Then appends of >= 65536
   (position, KV head) items, where one lane group compresses both K and V
   of an item, starting from a full window.  Every phase is checked against
   the model; on the CPU the same calls are a plain model check. */
static void test_cache_append_paths(mustafar_context *ctx)
{
    tb_rng r;
    mustafar_cache_desc d;
    tm_model m;
    int idx[63], nt[63], i, three[3];
    tb_rng_for_test(&r, g_cur_test);
    tm_desc(&d, 1, 1, 2, 64, MUSTAFAR_DTYPE_F16, 0.5f, 0.5f, 4, 2, 20000, 63);
    if (!tm_create(&m, ctx, &r, &d, 1)) return;
    for (i = 0; i < 63; i++) {
        idx[i] = tm_add(&m);
        if (idx[i] < 0) { tm_destroy(&m); return; }
    }
    nt[0] = 6300;                                  /* 3148 new pages: uploaded */
    tm_append(&m, 0, 1, idx, nt);
    tm_check_all(&m, 0.0f, "3148 new pages in one append");
    for (i = 0; i < 60; i++) nt[i] = 9;             /* 60 sequences: wide block */
    tm_append(&m, 0, 60, idx + 3, nt);
    tm_check_all(&m, 0.0f, "60 sequences in one append");
    three[0] = idx[0]; three[1] = idx[1]; three[2] = idx[2];
    nt[0] = nt[1] = nt[2] = 300;                    /* ~450 new pages: wide block */
    tm_append(&m, 0, 3, three, nt);
    tm_check_all(&m, 0.0f, "450 new pages in one append");
    for (i = 0; i < 63; i++) nt[i] = 1;             /* a decode step of 63 sequences: wide */
    tm_append(&m, 0, 63, idx, nt);
    tm_append(&m, 0, 3, three, nt);                 /* of 3: small block */
    tm_check_all(&m, 0.0f, "decode steps of 63 and 3 sequences");
    nt[0] = 6200;                                  /* 3100 new pages, the first from the ring: uploaded */
    tm_append(&m, 0, 1, idx, nt);
    tm_check_all(&m, 0.0f, "3100 new pages after a full window");
    tm_destroy(&m);

    tm_desc(&d, 1, 4, 8, 64, MUSTAFAR_DTYPE_BF16, 0.7f, 0.5f, 8, 16, 17000, 2);
    if (!tm_create(&m, ctx, &r, &d, 1)) return;
    idx[0] = tm_add(&m);
    if (idx[0] < 0) { tm_destroy(&m); return; }
    nt[0] = 8;                                     /* a full window ... */
    tm_append(&m, 0, 1, idx, nt);
    nt[0] = g_quick ? 4000 : 16400;                /* ... then 65600 items, K and V per lane group */
    tm_append(&m, 0, 1, idx, nt);
    tm_check_all(&m, 0.0f, g_quick ? "16000 items in one append" : "65600 items in one append");
    tm_destroy(&m);
}

/* One configuration of test_cache_decode_step: sequences of lens[] tokens,
   then steps alternating between the two layers. */
static void decode_step_case(mustafar_context *ctx, tb_rng *r, const mustafar_cache_desc *d,
                             const int *lens, int n, int steps)
{
    char what[5][200];
    tm_model m;
    int idx[TM_MAX_SEQS], nt[TM_MAX_SEQS], ids[TM_MAX_SEQS], i, l, step;
    const int many[5] = {0, 1, 3, 17, 40};
    tm_query query;
    uint16_t *q, *out;
    if (!tm_create(&m, ctx, r, d, 1)) return;
    {
        static const char *const kinds[5] = {"one token", "0 to 40 tokens", "no tokens",
                                             "3000 (quick: 600) tokens and of one", ""};
        for (i = 0; i < 4; i++)
            snprintf(what[i], sizeof what[i], "decode step of %s (D=%d Hkv=%d Hq=%d W=%d s=%g/%g)", kinds[i],
                     m.D, m.hkv, m.hq, m.W, (double)m.ks, (double)m.vs);
    }
    for (i = 0; i < n; i++) {
        idx[i] = tm_add(&m);
        if (idx[i] < 0) { tm_destroy(&m); return; }
        ids[i] = m.seq[idx[i]].id;
        nt[i] = lens[i];
    }
    for (l = 0; l < 2; l++) tm_append(&m, l, n, idx, nt);
    for (step = 0; step < steps; step++)
        tm_step(&m, step % 2, n, idx, NULL, step % 3 ? 0 : 20, what[0]);
    for (i = 0; i < n; i++) nt[i] = many[i % 5];
    for (l = 0; l < 2; l++) tm_step(&m, l, n, idx, nt, 0, what[1]);
    for (i = 0; i < n; i++) nt[i] = 0;          /* nothing appended: a plain attention */
    for (l = 0; l < 2; l++) tm_step(&m, l, n, idx, nt, 20, what[2]);
    /* an append long enough that the attention's first tiles would reach
       its new records before it writes them, were they not waited for; the
       attention calls queued before keep the GPU behind the host, so that
       the step's two kernels run back to back */
    for (i = 0; i < n; i++) nt[i] = i == 0 ? (g_quick ? 600 : 3000) : 1;
    for (l = 0; l < 2; l++) tm_step(&m, l, n, idx, nt, 40, what[3]);
    /* failed steps append nothing */
    q = TB_NEW(uint16_t, (size_t)n * m.hq * m.D);
    out = TB_NEW(uint16_t, (size_t)n * m.hq * m.D);
    tb_fill_normal(r, m.dt, q, (size_t)n * m.hq * m.D, 1.0);
    query.q = q;
    query.out_host = out;
    query.scale = 0.0f;
    query.null_q = 1;
    query.busy = 0;
    for (i = 0; i < n; i++) nt[i] = 1;
    CHECK_ST(ctx, tm_append_query(&m, 0, n, ids, nt, 0, 0, &query), MUSTAFAR_ERROR_NULL_POINTER);
    CHECK(tb_all_ff(out, (size_t)n * m.hq * m.D * 2), "a step without q wrote its output");
    query.null_q = 0;
    nt[n - 1] = -1;
    CHECK_ST(ctx, tm_append_query(&m, 0, n, ids, nt, 0, 0, &query), MUSTAFAR_ERROR_INVALID_ARGUMENT);
    CHECK(tb_all_ff(out, (size_t)n * m.hq * m.D * 2), "a step with a negative count wrote its output");
    for (i = 0; i < n; i++)
        for (l = 0; l < 2; l++)
            CHECK(mustafar_cache_sequence_length(m.cache, ids[i], l) == m.seq[idx[i]].len[l],
                  "sequence %d layer %d: length %d after failed steps, expected %d", ids[i], l,
                  mustafar_cache_sequence_length(m.cache, ids[i], l), m.seq[idx[i]].len[l]);
    tm_check_all(&m, 0.0f, "after the decode steps");
    free(q);
    free(out);
    tm_destroy(&m);
}

/* mustafar_cache_decode_step (append, then attention; on sm_90+ the
   attention reads the older records while the append still compresses the
   tokens leaving the window): every step's output against the float64
   reference, for sequences below, at and far past the window (long ones
   split over many blocks), steps of one token, then of 0 to 40, of none,
   then one that compresses 3000 positions of a sequence; failed steps (no
   q, a negative count) append nothing. */
static void test_cache_decode_step(mustafar_context *ctx)
{
    tb_rng r;
    mustafar_cache_desc d;
    const int lens[5] = {0, 7, 8, 600, 5000}, lens2[3] = {3000, 15, 200};
    const int lens_q[5] = {0, 7, 8, 300, 900}, lens2_q[3] = {600, 15, 200};  /* --quick */
    tb_rng_for_test(&r, g_cur_test);
    tm_desc(&d, 2, 2, 8, 128, MUSTAFAR_DTYPE_F16, 0.7f, 0.7f, 8, 16, 16384, 5);
    decode_step_case(ctx, &r, &d, g_quick ? lens_q : lens, 5, g_quick ? 8 : 24);
    tm_desc(&d, 2, 2, 32, 64, MUSTAFAR_DTYPE_BF16, 0.5f, 0.7f, 16, 8, 8192, 3);
    decode_step_case(ctx, &r, &d, g_quick ? lens2_q : lens2, 3, g_quick ? 4 : 12);
    /* the shape of examples/model (D=64, 8/2 heads) with a window of 4 and V 0.8 */
    tm_desc(&d, 2, 2, 8, 64, MUSTAFAR_DTYPE_F16, 0.5f, 0.8f, 4, 16, 8192, 3);
    decode_step_case(ctx, &r, &d, g_quick ? lens2_q : lens2, 3, g_quick ? 4 : 12);
    tm_desc(&d, 2, 2, 8, 64, MUSTAFAR_DTYPE_F16, 0.5f, 0.5f, 4, 16, 8192, 3);
    decode_step_case(ctx, &r, &d, g_quick ? lens2_q : lens2, 3, g_quick ? 4 : 12);
    tm_desc(&d, 2, 2, 8, 64, MUSTAFAR_DTYPE_F16, 0.5f, 0.8f, 8, 16, 8192, 3);
    decode_step_case(ctx, &r, &d, g_quick ? lens2_q : lens2, 3, g_quick ? 4 : 12);
}

/* Sequences of different lengths share one pool; a full pool refuses,
   removal makes room for another sequence. */
static void test_cache_pool_sharing(mustafar_context *ctx)
{
    tb_rng r;
    mustafar_cache_desc d;
    tm_model m;
    int A, B, C, D2, ids[2], nt[2], ck[3];
    tb_rng_for_test(&r, g_cur_test);
    tm_desc(&d, 1, 1, 1, 64, MUSTAFAR_DTYPE_F16, 0.5f, 0.5f, 0, 16, 1024, 4);
    if (!tm_create(&m, ctx, &r, &d, 0)) return;
    A = tm_add(&m);
    B = tm_add(&m);
    if (A < 0 || B < 0) { tm_destroy(&m); return; }
    ids[0] = A; ids[1] = B; nt[0] = 640; nt[1] = 384;
    tm_append(&m, 0, 2, ids, nt);
    CHECK(tm_pages_used(&m) == 64, "640 + 384 tokens in pages of 16: pages_used %" PRId64 ", expected 64",
          tm_pages_used(&m));
    C = tm_add(&m);
    if (C < 0) { tm_destroy(&m); return; }
    {
        int cid = m.seq[C].id, one = 1;
        CHECK_ST(ctx, tm_append_ex(&m, 0, 1, &cid, &one, 0, 0), MUSTAFAR_ERROR_POOL_FULL);
        CHECK(mustafar_cache_sequence_length(m.cache, cid, 0) == 0, "failed append changed the length");
    }
    tm_remove(&m, A);
    CHECK(tm_pages_used(&m) == 24, "after removing the 640-token sequence: pages_used %" PRId64 ", expected 24",
          tm_pages_used(&m));
    ids[0] = C; nt[0] = 600;
    tm_append(&m, 0, 1, ids, nt);
    D2 = tm_add(&m);
    if (D2 >= 0) {
        ids[0] = D2; nt[0] = 32;
        tm_append(&m, 0, 1, ids, nt);
        CHECK(tm_pages_used(&m) == 64, "pages_used %" PRId64 ", expected 64", tm_pages_used(&m));
        ck[0] = B; ck[1] = C; ck[2] = D2;
        tm_check_attention(&m, 0, 3, ck, 0.0f, "shared pool");
        tm_check_stats(&m, "shared pool");
    }
    tm_destroy(&m);
}

/* The layout documented in CONCEPTS, read back through
   mustafar_cache_layer_view / mustafar_cache_sequence_view: every record is
   the reference encoding of its token, every window slot holds its dense
   token, pages are never shared; mustafar_paged_attention on the view and
   mustafar_cache_attention both match the float64 reference (and each other
   bitwise on the CPU backend).  Sequence lengths are {3, 16, 17, 50, 130} x
   scale, all but two tokens appended in one call. */
static void check_view_case(mustafar_context *ctx, tb_rng *r, const mustafar_cache_desc *d, int scale)
{
    tm_model m;
    int idx[5], lens[5] = {3, 16, 17, 50, 130}, nt[5], i, l, t, h;
    if (!tm_create(&m, ctx, r, d, 1)) return;
    for (i = 0; i < 5; i++) {
        idx[i] = tm_add(&m);
        if (idx[i] < 0) { tm_destroy(&m); return; }
    }
    for (i = 0; i < 5; i++) nt[i] = lens[i] * scale - 2;
    for (l = 0; l < m.L; l++) tm_append(&m, l, 5, idx, nt);
    for (t = 0; t < 2; t++) {              /* two decode steps */
        for (i = 0; i < 5; i++) nt[i] = 1;
        for (l = 0; l < m.L; l++) tm_append(&m, l, 5, idx, nt);
    }
    for (l = 0; l < m.L; l++) {
        mustafar_paged_kv kv;
        mustafar_paged_seq sv[5];
        int32_t *pt;
        unsigned char *kp, *vp, *wr;
        uint16_t *kw = NULL, *vw = NULL;
        size_t krec = ref_record_bytes(m.D, m.nk), vrec = ref_record_bytes(m.D, m.nv);
        size_t per = (size_t)m.hkv * m.D, kpb, vpb, winb;
        int maxrows = d->max_sequences, used_pages = 0, ok = 1;
        char *page_seen;
        memset(&kv, 0, sizeof kv);
        if (!CHECK_ST(ctx, mustafar_cache_layer_view(m.cache, l, &kv), MUSTAFAR_OK)) continue;
        CHECK(kv.head_dim == m.D && kv.dtype == m.dt && kv.k_sparsity == m.ks && kv.v_sparsity == m.vs &&
              kv.num_kv_heads == m.hkv && kv.num_q_heads == m.hq && kv.page_size == m.page &&
              kv.window_size == m.W && kv.num_rows == d->max_sequences,
              "layer_view(%d) fields do not match the cache description", l);
        CHECK(kv.k_pages && kv.v_pages && kv.page_table && kv.num_pages > 0 &&
              (m.W == 0 || (kv.k_window && kv.v_window)), "layer_view(%d) has NULL pointers", l);
        CHECK(kv.page_table_stride * kv.page_size >= d->capacity_tokens - m.W, "page_table_stride %d too "
              "small for max_sequence_length %d", kv.page_table_stride, (int)d->capacity_tokens);
        if (!(kv.k_pages && kv.v_pages && kv.page_table && kv.num_pages > 0 && kv.page_table_stride > 0)) continue;
        if (m.W > 0 && !(kv.k_window && kv.v_window)) continue;
        if (kv.num_rows != maxrows) continue;
        for (i = 0; i < 5; i++) {
            int len = m.seq[idx[i]].len[l], nc = len > m.W ? len - m.W : 0, j;
            memset(&sv[i], 0x55, sizeof sv[i]);
            if (!CHECK_ST(ctx, mustafar_cache_sequence_view(m.cache, m.seq[idx[i]].id, l, &sv[i]), MUSTAFAR_OK)) { ok = 0; continue; }
            CHECK(sv[i].row >= 0 && sv[i].row < maxrows, "sequence_view row %d out of [0, %d)", sv[i].row, maxrows);
            CHECK(sv[i].num_compressed == nc && sv[i].num_window == len - nc && sv[i].reserved == 0,
                  "sequence_view of a %d-token sequence (W=%d): num_compressed %d num_window %d reserved %d",
                  len, m.W, sv[i].num_compressed, sv[i].num_window, sv[i].reserved);
            for (j = 0; j < i; j++) CHECK(sv[j].row != sv[i].row, "two live sequences share row %d", sv[i].row);
            if (sv[i].row < 0 || sv[i].row >= maxrows || sv[i].num_compressed != nc) ok = 0;
        }
        if (!ok) continue;
        pt = TB_NEW(int32_t, (size_t)maxrows * kv.page_table_stride);
        tb_download(ctx, pt, kv.page_table, (size_t)maxrows * kv.page_table_stride * 4);
        kpb = (size_t)kv.num_pages * m.hkv * m.page * krec;
        vpb = (size_t)kv.num_pages * m.hkv * m.page * vrec;
        kp = TB_NEW(unsigned char, kpb);
        vp = TB_NEW(unsigned char, vpb);
        wr = TB_NEW(unsigned char, krec > vrec ? krec : vrec);
        tb_download(ctx, kp, kv.k_pages, kpb);
        tb_download(ctx, vp, kv.v_pages, vpb);
        winb = (size_t)maxrows * m.W * per * 2;
        if (m.W > 0) {
            kw = TB_NEW(uint16_t, winb / 2);
            vw = TB_NEW(uint16_t, winb / 2);
            tb_download(ctx, kw, kv.k_window, winb);
            tb_download(ctx, vw, kv.v_window, winb);
        }
        page_seen = TB_NEW(char, kv.num_pages);
        memset(page_seen, 0, (size_t)kv.num_pages);
        for (i = 0; i < 5 && ok; i++) {
            const tm_seq *s = &m.seq[idx[i]];
            int len = s->len[l], nc = sv[i].num_compressed, bad = 0;
            for (t = 0; t < (nc + m.page - 1) / m.page; t++) {
                int32_t pg = pt[(size_t)sv[i].row * kv.page_table_stride + t];
                if (pg < 0 || pg >= kv.num_pages) { CHECK(0, "page table entry %d of row %d is %d", t, sv[i].row, (int)pg); ok = 0; break; }
                CHECK(!page_seen[pg], "page %d is used twice", (int)pg);
                page_seen[pg] = 1;
                used_pages++;
            }
            for (t = 0; t < nc && ok && bad < 2; t++) {
                int32_t pg = pt[(size_t)sv[i].row * kv.page_table_stride + t / m.page];
                for (h = 0; h < m.hkv; h++) {
                    size_t ko = (((size_t)pg * m.hkv + h) * m.page + t % m.page) * krec;
                    size_t vo = (((size_t)pg * m.hkv + h) * m.page + t % m.page) * vrec;
                    ref_encode_vec(s->raw_k[l] + (size_t)t * per + (size_t)h * m.D, m.D, m.nk, krec, wr);
                    if (memcmp(kp + ko, wr, krec)) { bad++; CHECK(0, "layer %d seq %d pos %d head %d: K record differs from the reference encoding", l, s->id, t, h); }
                    ref_encode_vec(s->raw_v[l] + (size_t)t * per + (size_t)h * m.D, m.D, m.nv, vrec, wr);
                    if (memcmp(vp + vo, wr, vrec)) { bad++; CHECK(0, "layer %d seq %d pos %d head %d: V record differs from the reference encoding", l, s->id, t, h); }
                }
            }
            for (t = nc; t < len && m.W > 0 && bad < 2; t++) {
                size_t o = ((size_t)sv[i].row * m.W + (size_t)(t % m.W)) * per;
                if (memcmp(kw + o, s->raw_k[l] + (size_t)t * per, per * 2) ||
                    memcmp(vw + o, s->raw_v[l] + (size_t)t * per, per * 2)) {
                    bad++;
                    CHECK(0, "layer %d seq %d pos %d: window slot %d does not hold the dense token", l, s->id, t, t % m.W);
                }
            }
        }
        CHECK(used_pages <= tm_pages_used(&m), "%d pages referenced but pages_used %" PRId64, used_pages, tm_pages_used(&m));
        /* the same attention through the stateless call */
        if (ok) {
            size_t qb = (size_t)5 * m.hq * m.D * 2;
            uint16_t *q = TB_NEW(uint16_t, qb / 2), *o1 = TB_NEW(uint16_t, qb / 2), *o2 = TB_NEW(uint16_t, qb / 2);
            int ids[5];
            void *dseqs = tb_dup(ctx, sv, sizeof sv), *dq, *dout;
            for (i = 0; i < 5; i++) ids[i] = m.seq[idx[i]].id;
            tb_fill_normal(r, m.dt, q, qb / 2, 1.0);
            dq = tb_dup(ctx, q, qb);
            dout = tb_alloc(ctx, qb);
            tb_poison(ctx, dout, qb);
            if (CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, 5, (const mustafar_paged_seq *)dseqs, dq, dout, 0.0f), MUSTAFAR_OK) &&
                CHECK_ST(ctx, tm_attention_raw(&m, l, 5, ids, q, o1, 0.0f, 0, 0), MUSTAFAR_OK)) {
                int diff;
                tb_download(ctx, o2, dout, qb);
                /* on CUDA a device-side sequence list gives the host only a
                   length bound: the split over the sequence, and with it the
                   float summation order, may differ; the reference decides */
                diff = tb_is_cuda(ctx) ? -1 : first_diff16(o1, o2, qb / 2);
                CHECK(diff < 0, "layer %d: paged_attention on the view differs from cache_attention at element %d "
                      "(0x%04X vs 0x%04X)", l, diff, diff >= 0 ? o2[diff] : 0, diff >= 0 ? o1[diff] : 0);
                tm_compare(&m, l, 5, idx, q, o1, 0.0f, "cache_attention");
                tm_compare(&m, l, 5, idx, q, o2, 0.0f, "paged_attention on the view");
            }
            tb_free(ctx, dseqs);
            tb_free(ctx, dq);
            tb_free(ctx, dout);
            free(q);
            free(o1);
            free(o2);
        }
        free(page_seen);
        free(pt);
        free(kp);
        free(vp);
        free(wr);
        free(kw);
        free(vw);
    }
    tm_destroy(&m);
}

static void test_cache_layout_view(mustafar_context *ctx)
{
    tb_rng r;
    mustafar_cache_desc d;
    tb_rng_for_test(&r, g_cur_test);
    tm_desc(&d, 2, 2, 8, 128, MUSTAFAR_DTYPE_F16, 0.7f, 0.5f, 16, 16, 1024, 8);
    check_view_case(ctx, &r, &d, 1);
    tm_desc(&d, 2, 2, 4, 64, MUSTAFAR_DTYPE_BF16, 0.5f, 0.7f, 0, 8, 1024, 6);
    check_view_case(ctx, &r, &d, 1);
    tm_desc(&d, 1, 1, 8, 256, MUSTAFAR_DTYPE_F16, 0.9f, 0.0f, 64, 32, 1024, 5);
    check_view_case(ctx, &r, &d, 1);
    /* one append of 69040 (position, KV head) items: large enough that the
       CUDA kernel compresses K and V of an item in one lane group */
    if (tb_is_cuda(ctx)) {
        tm_desc(&d, 1, 8, 32, 128, MUSTAFAR_DTYPE_F16, 0.7f, 0.5f, 16, 16, 9216, 5);
        check_view_case(ctx, &r, &d, 40);
    }
}
