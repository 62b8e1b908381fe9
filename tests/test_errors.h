/* test_errors.h - case 7: every error path returns its documented status and
   a failed call changes nothing. */

static void test_status_strings(mustafar_context *ctx)
{
    int i, j;
    (void)ctx;
    for (i = 0; i < (int)MUSTAFAR_STATUS_COUNT; i++) {
        const char *a = mustafar_status_string((mustafar_status)i);
        CHECK(a && a[0], "mustafar_status_string(%d) is NULL or empty", i);
        if (!a) continue;
        for (j = 0; j < i; j++) {
            const char *b = mustafar_status_string((mustafar_status)j);
            CHECK(!b || strcmp(a, b) != 0, "statuses %d and %d share the string \"%s\"", j, i, a);
        }
    }
    CHECK(mustafar_status_string(MUSTAFAR_STATUS_COUNT) != NULL, "status_string(COUNT) is NULL");
    CHECK(mustafar_status_string((mustafar_status)-1) != NULL, "status_string(-1) is NULL");
    CHECK(mustafar_version_string() && strcmp(mustafar_version_string(), MUSTAFAR_VERSION_STRING) == 0,
          "mustafar_version_string() != MUSTAFAR_VERSION_STRING");
}

static void test_errors_context(mustafar_context *ctx)
{
    mustafar_context_desc cd;
    mustafar_context *c2 = NULL;
    (void)ctx;
    memset(&cd, 0, sizeof cd);
    cd.backend = MUSTAFAR_BACKEND_CPU;
    CHECK_ST(NULL, mustafar_context_create(&cd, NULL), MUSTAFAR_ERROR_NULL_POINTER);
    /* AUTO: a CUDA context, or a CPU one whose last_error says why not */
    memset(&cd, 0, sizeof cd);
    if (CHECK_ST(NULL, mustafar_context_create(&cd, &c2), MUSTAFAR_OK) && c2) {
        if (mustafar_context_backend(c2) == MUSTAFAR_BACKEND_CPU) {
            const char *why = mustafar_last_error(c2);
            mustafar_context *c3 = NULL;
            mustafar_status st;
            CHECK(why && why[0], "AUTO fell back to the CPU but mustafar_last_error() is empty");
            /* then an explicit CUDA request must fail */
            cd.backend = MUSTAFAR_BACKEND_CUDA;
            st = mustafar_context_create(&cd, &c3);
            CHECK(st == MUSTAFAR_ERROR_BACKEND_UNAVAILABLE || st == MUSTAFAR_ERROR_CUDA || st == MUSTAFAR_ERROR_JIT,
                  "CUDA context without a usable GPU: %s, expected BACKEND_UNAVAILABLE", tb_sname(st));
            if (st == MUSTAFAR_OK && c3) mustafar_context_destroy(c3);
        } else {
            CHECK(mustafar_context_backend(c2) == MUSTAFAR_BACKEND_CUDA, "AUTO gave backend %d",
                  (int)mustafar_context_backend(c2));
        }
        mustafar_context_destroy(c2);
    }
}

/* Stateless calls: bad arguments are refused and the outputs untouched. */
static void test_errors_stateless(mustafar_context *ctx)
{
    enum { CNT = 4, D = 128 };
    tb_rng r;
    uint16_t x[CNT * D];
    unsigned char hostbuf[CNT * D * 2];
    size_t bytes = sizeof x, rec = ref_record_bytes(D, ref_kept(D, 0.5f));
    void *dx, *dy, *drec;
    int op;
    static const float bad_s[3] = {-0.1f, 1.0f, 0.0f};   /* third: NaN, set below */
    tb_rng_for_test(&r, g_cur_test);
    tb_fill_normal(&r, MUSTAFAR_DTYPE_F16, x, CNT * D, 1.0);
    dx = tb_dup(ctx, x, bytes);
    dy = tb_alloc(ctx, bytes);
    drec = tb_alloc(ctx, rec * CNT);
    /* op 0: prune, 1: compress, 2: decompress */
    for (op = 0; op < 3; op++) {
        void *out = op == 1 ? drec : dy;
        const void *in = op == 2 ? drec : dx;
        size_t ob = op == 1 ? rec * CNT : bytes;
        int k;
        mustafar_status st;
#define TB_OP(hd, sp, dt, i, o) \
    (op == 0 ? mustafar_prune(ctx, hd, sp, dt, i, o, CNT) \
     : op == 1 ? mustafar_compress(ctx, hd, sp, dt, i, o, CNT) \
               : mustafar_decompress(ctx, hd, sp, dt, i, o, CNT))
        tb_poison(ctx, out, ob);
        for (k = 0; k < 9; k++) {
            switch (k) {
            case 0: st = TB_OP(100, 0.5f, MUSTAFAR_DTYPE_F16, in, out); CHECK_ST(ctx, st, MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM); break;
            case 1: st = TB_OP(0, 0.5f, MUSTAFAR_DTYPE_F16, in, out); CHECK_ST(ctx, st, MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM); break;
            case 2: st = TB_OP(D, 0.5f, (mustafar_dtype)7, in, out); CHECK_ST(ctx, st, MUSTAFAR_ERROR_UNSUPPORTED_DTYPE); break;
            case 3: case 4: st = TB_OP(D, bad_s[k - 3], MUSTAFAR_DTYPE_F16, in, out); CHECK_ST(ctx, st, MUSTAFAR_ERROR_INVALID_SPARSITY); break;
            case 5: st = TB_OP(D, (float)NAN, MUSTAFAR_DTYPE_F16, in, out); CHECK_ST(ctx, st, MUSTAFAR_ERROR_INVALID_SPARSITY); break;
            case 6: st = TB_OP(D, 0.5f, MUSTAFAR_DTYPE_F16, NULL, out); CHECK_ST(ctx, st, MUSTAFAR_ERROR_NULL_POINTER); break;
            case 7: st = TB_OP(D, 0.5f, MUSTAFAR_DTYPE_F16, in, NULL); CHECK_ST(ctx, st, MUSTAFAR_ERROR_NULL_POINTER); break;
            default: st = TB_OP(D, (float)INFINITY, MUSTAFAR_DTYPE_F16, in, out); CHECK_ST(ctx, st, MUSTAFAR_ERROR_INVALID_SPARSITY); break;
            }
            tb_download(ctx, hostbuf, out, ob);
            CHECK(tb_all_ff(hostbuf, ob), "op %d, bad argument case %d: the output was written", op, k);
        }
#undef TB_OP
    }
    /* paged_write / paged_attention */
    {
        enum { P = 16, NP = 4, HKV = 2, HQ = 4 };
        mustafar_paged_kv kv, bad;
        int32_t pt[2 * 4] = {0, 1, -1, -1, 2, 3, -1, -1};
        int32_t rows[1] = {1}, first[1] = {0}, ntok[1] = {3}, neg[1] = {-1}, big[1] = {100};
        size_t pb = (size_t)NP * HKV * P * rec;
        void *dk = tb_alloc(ctx, pb), *dv = tb_alloc(ctx, pb), *dpt = tb_dup(ctx, pt, sizeof pt);
        uint16_t tok[3 * HKV * D], q[2 * HQ * D];
        unsigned char *pk = TB_NEW(unsigned char, pb), *pv = TB_NEW(unsigned char, pb);
        void *dtok, *dq, *dout, *dseq, *dseqbad;
        mustafar_paged_seq sq[2];
        uint16_t outh[2 * HQ * D];
        int k;
        tb_fill_normal(&r, MUSTAFAR_DTYPE_F16, tok, 3 * HKV * D, 1.0);
        tb_fill_normal(&r, MUSTAFAR_DTYPE_F16, q, 2 * HQ * D, 1.0);
        dtok = tb_dup(ctx, tok, sizeof tok);
        dq = tb_dup(ctx, q, sizeof q);
        dout = tb_alloc(ctx, sizeof q);
        tb_poison(ctx, dk, pb);
        tb_poison(ctx, dv, pb);
        memset(&kv, 0, sizeof kv);
        kv.head_dim = D; kv.dtype = MUSTAFAR_DTYPE_F16; kv.k_sparsity = 0.5f; kv.v_sparsity = 0.5f;
        kv.num_kv_heads = HKV; kv.num_q_heads = HQ; kv.page_size = P; kv.k_pages = dk; kv.v_pages = dv;
        kv.page_table = (const int32_t *)dpt; kv.page_table_stride = 4; kv.num_rows = 2; kv.num_pages = NP;
        CHECK_ST(ctx, mustafar_paged_write(ctx, NULL, 1, rows, first, ntok, dtok, dtok), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(ctx, mustafar_paged_write(ctx, &kv, -1, rows, first, ntok, dtok, dtok), MUSTAFAR_ERROR_INVALID_ARGUMENT);
        CHECK_ST(ctx, mustafar_paged_write(ctx, &kv, 1, NULL, first, ntok, dtok, dtok), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(ctx, mustafar_paged_write(ctx, &kv, 1, rows, first, ntok, NULL, dtok), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(ctx, mustafar_paged_write(ctx, &kv, 1, rows, first, neg, dtok, dtok), MUSTAFAR_ERROR_INVALID_ARGUMENT);
        {
            int32_t row2[1] = {2};   /* num_rows is 2 */
            CHECK_ST(ctx, mustafar_paged_write(ctx, &kv, 1, row2, first, ntok, dtok, dtok), MUSTAFAR_ERROR_INVALID_ARGUMENT);
        }
        CHECK_ST(ctx, mustafar_paged_write(ctx, &kv, 1, rows, neg, ntok, dtok, dtok), MUSTAFAR_ERROR_INVALID_ARGUMENT);
        /* positions 0..99 need 7 pages; the row has 4 entries */
        CHECK_ST(ctx, mustafar_paged_write(ctx, &kv, 1, rows, first, big, dtok, dtok), MUSTAFAR_ERROR_INVALID_ARGUMENT);
        for (k = 0; k < 5; k++) {
            bad = kv;
            switch (k) {
            case 0: bad.head_dim = 100; break;
            case 1: bad.dtype = (mustafar_dtype)7; break;
            case 2: bad.k_sparsity = 1.0f; break;
            case 3: bad.v_sparsity = (float)NAN; break;
            default: bad.num_q_heads = 3; break;
            }
            CHECK_ST(ctx, mustafar_paged_write(ctx, &bad, 1, rows, first, ntok, dtok, dtok),
                     k == 0 ? MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM : k == 1 ? MUSTAFAR_ERROR_UNSUPPORTED_DTYPE
                     : k < 4 ? MUSTAFAR_ERROR_INVALID_SPARSITY : MUSTAFAR_ERROR_INVALID_ARGUMENT);
        }
        tb_download(ctx, pk, dk, pb);
        tb_download(ctx, pv, dv, pb);
        CHECK(tb_all_ff(pk, pb) && tb_all_ff(pv, pb), "a failed paged_write wrote into the pages");
        /* a page id >= num_pages in the table (page ids are checked on the CPU) */
        if (!tb_is_cuda(ctx)) {
            int32_t pt2[2 * 4] = {0, 1, -1, -1, 7, 3, -1, -1};
            bad = kv;
            bad.page_table = pt2;
            CHECK_ST(ctx, mustafar_paged_write(ctx, &bad, 1, rows, first, ntok, dtok, dtok), MUSTAFAR_ERROR_INVALID_ARGUMENT);
            memcpy(pk, dk, pb);
            CHECK(tb_all_ff(pk, pb), "a failed paged_write wrote into the pages");
        }
        CHECK_ST(ctx, mustafar_paged_write(ctx, &kv, 1, rows, first, ntok, dtok, dtok), MUSTAFAR_OK);

        sq[0].row = 1; sq[0].num_compressed = 3; sq[0].num_window = 0; sq[0].reserved = 0;
        sq[1].row = 0; sq[1].num_compressed = 0; sq[1].num_window = 0; sq[1].reserved = 0;
        dseq = tb_dup(ctx, sq, sizeof sq);
        tb_poison(ctx, dout, sizeof q);
        CHECK_ST(ctx, mustafar_paged_attention(ctx, NULL, 2, (const mustafar_paged_seq *)dseq, dq, dout, 0.0f), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, -1, (const mustafar_paged_seq *)dseq, dq, dout, 0.0f), MUSTAFAR_ERROR_INVALID_ARGUMENT);
        CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, 2, NULL, dq, dout, 0.0f), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, 2, (const mustafar_paged_seq *)dseq, NULL, dout, 0.0f), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, 2, (const mustafar_paged_seq *)dseq, dq, NULL, 0.0f), MUSTAFAR_ERROR_NULL_POINTER);
        for (k = 0; k < 4; k++) {
            bad = kv;
            if (k == 0) bad.head_dim = 100;
            if (k == 1) bad.dtype = (mustafar_dtype)7;
            if (k == 2) bad.num_q_heads = 3;
            if (k == 3) bad.k_sparsity = -0.1f;
            CHECK_ST(ctx, mustafar_paged_attention(ctx, &bad, 2, (const mustafar_paged_seq *)dseq, dq, dout, 0.0f),
                     k == 0 ? MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM : k == 1 ? MUSTAFAR_ERROR_UNSUPPORTED_DTYPE
                     : k == 2 ? MUSTAFAR_ERROR_INVALID_ARGUMENT : MUSTAFAR_ERROR_INVALID_SPARSITY);
        }
        if (!tb_is_cuda(ctx)) {
            /* host-side checks of the sequence entries on the CPU backend */
            mustafar_paged_seq b2[2];
            memcpy(b2, sq, sizeof sq);
            b2[0].num_window = 1;                 /* window_size is 0 */
            dseqbad = b2;
            CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, 2, (const mustafar_paged_seq *)dseqbad, dq, dout, 0.0f), MUSTAFAR_ERROR_INVALID_ARGUMENT);
            memcpy(b2, sq, sizeof sq);
            b2[1].row = 0; b2[1].num_compressed = -2;
            CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, 2, (const mustafar_paged_seq *)dseqbad, dq, dout, 0.0f), MUSTAFAR_ERROR_INVALID_ARGUMENT);
            memcpy(b2, sq, sizeof sq);
            b2[0].num_compressed = 65;            /* past the 4-entry row */
            CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, 2, (const mustafar_paged_seq *)dseqbad, dq, dout, 0.0f), MUSTAFAR_ERROR_INVALID_ARGUMENT);
            memcpy(b2, sq, sizeof sq);
            b2[1].row = 2;                        /* num_rows is 2 */
            CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, 2, (const mustafar_paged_seq *)dseqbad, dq, dout, 0.0f), MUSTAFAR_ERROR_INVALID_ARGUMENT);
        }
        tb_download(ctx, outh, dout, sizeof q);
        CHECK(tb_all_ff(outh, sizeof q), "a failed paged_attention wrote its output");
        /* and the valid call works: sequence 1 is empty -> zeros */
        if (CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, 2, (const mustafar_paged_seq *)dseq, dq, dout, 0.0f), MUSTAFAR_OK)) {
            tb_download(ctx, outh, dout, sizeof q);
            for (k = HQ * D; k < 2 * HQ * D; k++)
                if (outh[k] != 0 && outh[k] != 0x8000) break;
            CHECK(k == 2 * HQ * D, "empty sequence: output 0x%04X", k < 2 * HQ * D ? outh[k] : 0);
            for (k = 0; k < HQ * D; k++)
                if (tb_is_nan16(MUSTAFAR_DTYPE_F16, outh[k])) break;
            CHECK(k == HQ * D, "3-token sequence: output %d is NaN", k);
        }
        tb_free(ctx, dk); tb_free(ctx, dv); tb_free(ctx, dpt); tb_free(ctx, dtok);
        tb_free(ctx, dq); tb_free(ctx, dout); tb_free(ctx, dseq);
        free(pk); free(pv);
    }
    tb_free(ctx, dx);
    tb_free(ctx, dy);
    tb_free(ctx, drec);
    /* with ctx NULL the reason is kept per thread, for mustafar_last_error(NULL) */
    CHECK(mustafar_prune(NULL, 100, 0.5f, MUSTAFAR_DTYPE_F16, x, hostbuf, CNT) ==
              MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM, "prune with ctx NULL, head_dim 100: not refused");
    CHECK(strstr(mustafar_last_error(NULL), "100") != NULL, "last_error(NULL) after head_dim 100: \"%s\"",
          mustafar_last_error(NULL));
}

static void test_errors_cache_create(mustafar_context *ctx)
{
    mustafar_cache_desc d, b;
    mustafar_cache *c = NULL;
    mustafar_status st;
    int k;
    tm_desc(&d, 2, 2, 4, 128, MUSTAFAR_DTYPE_F16, 0.5f, 0.5f, 8, 16, 256, 4);
    CHECK_ST(ctx, mustafar_cache_create(ctx, NULL, &c), MUSTAFAR_ERROR_NULL_POINTER);
    CHECK_ST(ctx, mustafar_cache_create(ctx, &d, NULL), MUSTAFAR_ERROR_NULL_POINTER);
    for (k = 0; k < 17; k++) {
        mustafar_status want = MUSTAFAR_ERROR_INVALID_ARGUMENT;
        b = d;
        switch (k) {
        case 0: b.num_layers = 0; break;
        case 1: b.num_layers = -1; break;
        case 2: b.num_kv_heads = 0; break;
        case 3: b.num_q_heads = 3; break;               /* not a multiple of Hkv = 2 */
        case 4: b.num_q_heads = -2; break;
        case 5: b.head_dim = 100; want = MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM; break;
        case 6: b.dtype = (mustafar_dtype)7; want = MUSTAFAR_ERROR_UNSUPPORTED_DTYPE; break;
        case 7: b.k_sparsity = -0.1f; want = MUSTAFAR_ERROR_INVALID_SPARSITY; break;
        case 8: b.k_sparsity = 1.0f; want = MUSTAFAR_ERROR_INVALID_SPARSITY; break;
        case 9: b.v_sparsity = (float)NAN; want = MUSTAFAR_ERROR_INVALID_SPARSITY; break;
        case 10: b.v_sparsity = 1.0f; want = MUSTAFAR_ERROR_INVALID_SPARSITY; break;
        case 11: b.capacity_tokens = 0; break;
        case 12: b.dense_window = -1; break;
        case 13: b.page_size = -16; break;
        case 14: b.max_sequences = -1; break;
        case 15: b.max_sequence_length = -5; break;
        default: b.capacity_tokens = -100; break;
        }
        c = NULL;
        if (!CHECK_ST(ctx, mustafar_cache_create(ctx, &b, &c), want)) {
            CHECK(0, "(cache_create bad-description case %d)", k);
            if (c) mustafar_cache_destroy(c);
        }
    }
    c = NULL;
    if (CHECK_ST(ctx, mustafar_cache_create(ctx, &d, &c), MUSTAFAR_OK)) mustafar_cache_destroy(c);
    /* defaults only: a pool of 8 tokens gets pages of 8 (the default 16 is
       capped by the default max length, the capacity) */
    memset(&b, 0, sizeof b);
    b.num_layers = 1;
    b.num_kv_heads = 1;
    b.capacity_tokens = 8;
    c = NULL;
    if (CHECK_ST(ctx, mustafar_cache_create(ctx, &b, &c), MUSTAFAR_OK)) {
        mustafar_cache_stats st;
        memset(&st, 0, sizeof st);
        CHECK_ST(ctx, mustafar_cache_stats_get(c, &st), MUSTAFAR_OK);
        CHECK(st.pages_total == 1, "capacity 8 with default pages: %lld pages", (long long)st.pages_total);
        mustafar_cache_destroy(c);
    }
    /* 32 layers x 8 heads x 2^20 tokens (2 x 25.8 GB of records) do not fit
       a 32-bit address space: refused, not wrapped */
    if (sizeof(size_t) == 4) {
        tm_desc(&b, 32, 8, 32, 128, MUSTAFAR_DTYPE_F16, 0.7f, 0.7f, 32, 16, (int64_t)1 << 20, 64);
        c = NULL;
        if (!CHECK_ST(ctx, mustafar_cache_create(ctx, &b, &c), MUSTAFAR_ERROR_INVALID_ARGUMENT) && c)
            mustafar_cache_destroy(c);
        /* 30000 tokens of the same: 2 x 737 MB of 96-byte records fit (the
           check once costed every record at its dense worst, 288 bytes, and
           refused); the allocation itself may still fail */
        tm_desc(&b, 32, 8, 32, 128, MUSTAFAR_DTYPE_F16, 0.7f, 0.7f, 32, 16, 30000, 1);
        c = NULL;
        st = mustafar_cache_create(ctx, &b, &c);
        CHECK(st == MUSTAFAR_OK || st == MUSTAFAR_ERROR_OUT_OF_MEMORY, "2 x 737 MB on 32 bits: %s (%s)",
              mustafar_status_string(st), mustafar_last_error(ctx));
        if (c) mustafar_cache_destroy(c);
    }
}

/* Bad calls on a live cache: each is refused with its status and every
   observable (lengths per layer, stats, attention of every sequence in
   every layer) is identical afterwards; then the cache still works. */
static void test_errors_cache_calls(mustafar_context *ctx)
{
    tb_rng r;
    mustafar_cache_desc d;
    tm_model m;
    tm_snap s0, s1;
    uint16_t *qfix, *outh;
    int A, B, C, Dd, idx3[3], n3[3], ids[3], nt[3], l, id_extra = -1;
    size_t per;
    tb_rng_for_test(&r, g_cur_test);
    /* 16 pages of 16; max_sequence_length = capacity = 256 */
    tm_desc(&d, 2, 2, 4, 64, MUSTAFAR_DTYPE_F16, 0.5f, 0.5f, 8, 16, 256, 4);
    if (!tm_create(&m, ctx, &r, &d, 1)) return;
    per = (size_t)m.hq * m.D;
    qfix = TB_NEW(uint16_t, TM_MAX_SEQS * per);
    outh = TB_NEW(uint16_t, TM_MAX_SEQS * per);
    tb_fill_normal(&r, m.dt, qfix, TM_MAX_SEQS * per, 1.0);
    A = tm_add(&m); B = tm_add(&m); C = tm_add(&m); Dd = tm_add(&m);
    if (A < 0 || B < 0 || C < 0 || Dd < 0) { tm_destroy(&m); free(qfix); free(outh); return; }
    idx3[0] = A; idx3[1] = B; idx3[2] = C;
    n3[0] = 100; n3[1] = 60; n3[2] = 10;
    for (l = 0; l < 2; l++) tm_append(&m, l, 3, idx3, n3);
    {
        int one[1], n1[1];
        one[0] = Dd; n1[0] = 5;
        for (l = 0; l < 2; l++) tm_append(&m, l, 1, one, n1);
    }
    ids[0] = m.seq[A].id; ids[1] = m.seq[B].id; ids[2] = m.seq[C].id;
    tm_snapshot(&m, &s0, qfix);

#define TB_AFTER(what) do { tm_snapshot(&m, &s1, qfix); tm_snap_compare(&m, &s0, &s1, what); tm_snap_free(&s1); } while (0)
    /* append: pool full on the last of three (A and B would fit) */
    nt[0] = 1; nt[1] = 1; nt[2] = 200;
    CHECK_ST(ctx, tm_append_ex(&m, 0, 3, ids, nt, 0, 0), MUSTAFAR_ERROR_POOL_FULL);
    TB_AFTER("pool-full append");
    /* unknown id last */
    nt[2] = 1;
    { int bad[3]; bad[0] = ids[0]; bad[1] = ids[1]; bad[2] = 31337;
      CHECK_ST(ctx, tm_append_ex(&m, 0, 3, bad, nt, 0, 0), MUSTAFAR_ERROR_UNKNOWN_SEQUENCE);
      bad[2] = -1;
      CHECK_ST(ctx, tm_append_ex(&m, 1, 3, bad, nt, 0, 0), MUSTAFAR_ERROR_UNKNOWN_SEQUENCE);
      TB_AFTER("append to an unknown sequence");
      bad[2] = ids[0];  /* duplicate */
      CHECK_ST(ctx, tm_append_ex(&m, 0, 3, bad, nt, 0, 0), MUSTAFAR_ERROR_DUPLICATE_SEQUENCE);
      TB_AFTER("append with a duplicate id"); }
    nt[2] = -1;
    CHECK_ST(ctx, tm_append_ex(&m, 0, 3, ids, nt, 0, 0), MUSTAFAR_ERROR_INVALID_ARGUMENT);
    nt[2] = 1;
    CHECK_ST(ctx, tm_append_ex(&m, 2, 3, ids, nt, 0, 0), MUSTAFAR_ERROR_INVALID_ARGUMENT);
    CHECK_ST(ctx, tm_append_ex(&m, -1, 3, ids, nt, 0, 0), MUSTAFAR_ERROR_INVALID_ARGUMENT);
    CHECK_ST(ctx, tm_append_ex(&m, 0, -1, ids, nt, 0, 0), MUSTAFAR_ERROR_INVALID_ARGUMENT);
    CHECK_ST(ctx, tm_append_ex(&m, 0, 3, ids, nt, 1, 0), MUSTAFAR_ERROR_NULL_POINTER);
    CHECK_ST(ctx, tm_append_ex(&m, 0, 3, ids, nt, 0, 1), MUSTAFAR_ERROR_NULL_POINTER);
    CHECK_ST(ctx, tm_append_ex(&m, 0, 3, NULL, nt, 0, 0), MUSTAFAR_ERROR_NULL_POINTER);
    CHECK_ST(ctx, tm_append_ex(&m, 0, 3, ids, NULL, 0, 0), MUSTAFAR_ERROR_NULL_POINTER);
    CHECK_ST(NULL, mustafar_cache_append(NULL, 0, 0, ids, nt, NULL, NULL), MUSTAFAR_ERROR_NULL_POINTER);
    TB_AFTER("bad append arguments");
    /* attention: refused, output untouched */
    {
        int bad[1], k;
        mustafar_status st;
        bad[0] = 4242;
        for (k = 0; k < 6; k++) {
            memset(outh, 0, TM_MAX_SEQS * per * 2);
            switch (k) {
            case 0: st = tm_attention_raw(&m, 0, 1, bad, qfix, outh, 0.0f, 0, 0); CHECK_ST(ctx, st, MUSTAFAR_ERROR_UNKNOWN_SEQUENCE); break;
            case 1: st = tm_attention_raw(&m, 2, 3, ids, qfix, outh, 0.0f, 0, 0); CHECK_ST(ctx, st, MUSTAFAR_ERROR_INVALID_ARGUMENT); break;
            case 2: st = tm_attention_raw(&m, 0, -1, ids, qfix, outh, 0.0f, 0, 0); CHECK_ST(ctx, st, MUSTAFAR_ERROR_INVALID_ARGUMENT); break;
            case 3: st = tm_attention_raw(&m, 0, 3, ids, qfix, outh, 0.0f, 1, 0); CHECK_ST(ctx, st, MUSTAFAR_ERROR_NULL_POINTER); break;
            case 4: st = tm_attention_raw(&m, 0, 3, NULL, qfix, outh, 0.0f, 0, 0); CHECK_ST(ctx, st, MUSTAFAR_ERROR_NULL_POINTER); break;
            default: st = tm_attention_raw(&m, 0, 3, ids, qfix, outh, 0.0f, 0, 1); CHECK_ST(ctx, st, MUSTAFAR_ERROR_NULL_POINTER); break;
            }
            /* tm_attention_raw downloaded max(nseq, 1) poisoned outputs */
            CHECK(tb_all_ff(outh, (size_t)(k == 0 || k == 2 ? 1 : 3) * per * 2), "failed attention (case %d) wrote its output", k);
        }
    }
    /* views, lengths, stats, add/remove */
    {
        mustafar_paged_kv kv;
        mustafar_paged_seq sv;
        int tmp = -7;
        CHECK_ST(ctx, mustafar_cache_layer_view(m.cache, 2, &kv), MUSTAFAR_ERROR_INVALID_ARGUMENT);
        CHECK_ST(ctx, mustafar_cache_layer_view(m.cache, 0, NULL), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(NULL, mustafar_cache_layer_view(NULL, 0, &kv), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(ctx, mustafar_cache_sequence_view(m.cache, 5555, 0, &sv), MUSTAFAR_ERROR_UNKNOWN_SEQUENCE);
        CHECK_ST(ctx, mustafar_cache_sequence_view(m.cache, ids[0], 2, &sv), MUSTAFAR_ERROR_INVALID_ARGUMENT);
        CHECK_ST(ctx, mustafar_cache_sequence_view(m.cache, ids[0], 0, NULL), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(NULL, mustafar_cache_stats_get(NULL, NULL), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(ctx, mustafar_cache_stats_get(m.cache, NULL), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(ctx, mustafar_cache_add_sequence(m.cache, NULL), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(NULL, mustafar_cache_add_sequence(NULL, &tmp), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK_ST(ctx, mustafar_cache_remove_sequence(m.cache, 99999), MUSTAFAR_ERROR_UNKNOWN_SEQUENCE);
        CHECK_ST(ctx, mustafar_cache_remove_sequence(m.cache, -1), MUSTAFAR_ERROR_UNKNOWN_SEQUENCE);
        CHECK_ST(NULL, mustafar_cache_remove_sequence(NULL, 0), MUSTAFAR_ERROR_NULL_POINTER);
        CHECK(mustafar_cache_sequence_length(m.cache, 99999, 0) == -1, "length of an unknown id != -1");
        CHECK(mustafar_cache_sequence_length(NULL, ids[0], 0) == -1, "length with a NULL cache != -1");
        /* 4 of max_sequences 4 are live */
        CHECK_ST(ctx, mustafar_cache_add_sequence(m.cache, &id_extra), MUSTAFAR_ERROR_TOO_MANY_SEQUENCES);
        TB_AFTER("bad view/stats/add/remove calls");
    }
    /* a removed id is unknown everywhere */
    {
        int did = m.seq[Dd].id, bad[2], n2[2];
        uint16_t *q2 = TB_NEW(uint16_t, per);
        tm_remove(&m, Dd);
        tm_snap_free(&s0);
        tm_snapshot(&m, &s0, qfix);
        bad[0] = ids[0]; bad[1] = did; n2[0] = 1; n2[1] = 1;
        CHECK_ST(ctx, tm_append_ex(&m, 0, 2, bad, n2, 0, 0), MUSTAFAR_ERROR_UNKNOWN_SEQUENCE);
        CHECK_ST(ctx, tm_attention_raw(&m, 0, 1, &did, q2, outh, 0.0f, 0, 0), MUSTAFAR_ERROR_UNKNOWN_SEQUENCE);
        CHECK_ST(ctx, mustafar_cache_remove_sequence(m.cache, did), MUSTAFAR_ERROR_UNKNOWN_SEQUENCE);
        CHECK(mustafar_cache_sequence_length(m.cache, did, 0) == -1, "removed id has a length");
        TB_AFTER("calls with a removed sequence id");
        free(q2);
    }
#undef TB_AFTER
    /* still consistent: one more decode step and the reference agrees */
    nt[0] = nt[1] = nt[2] = 1;
    for (l = 0; l < 2; l++) tm_append(&m, l, 3, idx3, nt);
    tm_check_all(&m, 0.0f, "after the refused calls");
    tm_check_stats(&m, "after the refused calls");
    tm_snap_free(&s0);
    tm_destroy(&m);
    free(qfix);
    free(outh);
}

/* max_sequence_length: refused on the last of two, nothing changes; the
   limit itself is reachable. */
static void test_errors_sequence_too_long(mustafar_context *ctx)
{
    tb_rng r;
    mustafar_cache_desc d;
    tm_model m;
    tm_snap s0, s1;
    uint16_t *qfix;
    int A, B, idx[2], nt[2], ids[2], l;
    tb_rng_for_test(&r, g_cur_test);
    tm_desc(&d, 2, 1, 2, 128, MUSTAFAR_DTYPE_BF16, 0.7f, 0.7f, 0, 16, 1024, 4);
    d.max_sequence_length = 40;
    if (!tm_create(&m, ctx, &r, &d, 0)) return;
    qfix = TB_NEW(uint16_t, TM_MAX_SEQS * (size_t)m.hq * m.D);
    tb_fill_normal(&r, m.dt, qfix, TM_MAX_SEQS * (size_t)m.hq * m.D, 1.0);
    A = tm_add(&m);
    B = tm_add(&m);
    if (A < 0 || B < 0) { tm_destroy(&m); free(qfix); return; }
    idx[0] = A; idx[1] = B; nt[0] = 30; nt[1] = 10;
    for (l = 0; l < 2; l++) tm_append(&m, l, 2, idx, nt);
    ids[0] = m.seq[A].id; ids[1] = m.seq[B].id;
    tm_snapshot(&m, &s0, qfix);
    nt[0] = 5; nt[1] = 31;                       /* B would reach 41 > 40 */
    CHECK_ST(ctx, tm_append_ex(&m, 0, 2, ids, nt, 0, 0), MUSTAFAR_ERROR_SEQUENCE_TOO_LONG);
    tm_snapshot(&m, &s1, qfix);
    tm_snap_compare(&m, &s0, &s1, "too-long append");
    tm_snap_free(&s1);
    nt[0] = 10; nt[1] = 30;                      /* exactly 40 each */
    for (l = 0; l < 2; l++) tm_append(&m, l, 2, idx, nt);
    nt[0] = 1;
    CHECK_ST(ctx, tm_append_ex(&m, 0, 1, ids, nt, 0, 0), MUSTAFAR_ERROR_SEQUENCE_TOO_LONG);
    tm_check_all(&m, 0.0f, "at max_sequence_length");
    tm_snap_free(&s0);
    tm_destroy(&m);
    free(qfix);
    /* a window (32) and pages (16) longer than the longest sequence (12):
       both taken as 12, so every token stays dense; decoded up to the end */
    tm_desc(&d, 1, 2, 4, 64, MUSTAFAR_DTYPE_F16, 0.7f, 0.7f, 32, 16, 64, 2);
    d.max_sequence_length = 12;
    if (!tm_create(&m, ctx, &r, &d, 0)) return;
    A = tm_add(&m);
    if (A < 0) { tm_destroy(&m); return; }
    idx[0] = A;
    nt[0] = 5;
    tm_append(&m, 0, 1, idx, nt);
    tm_check_all(&m, 0.0f, "window and page past the max length, 5 tokens");
    for (l = 5; l < 12; l++) {
        nt[0] = 1;
        tm_append(&m, 0, 1, idx, nt);
    }
    tm_check_all(&m, 0.0f, "window and page past the max length, 12 tokens");
    ids[0] = m.seq[A].id;
    CHECK_ST(ctx, tm_append_ex(&m, 0, 1, ids, nt, 0, 0), MUSTAFAR_ERROR_SEQUENCE_TOO_LONG);
    tm_destroy(&m);
}

/* The CUDA backend moves vectors and records in 16-byte units: a device
   pointer off that alignment is refused up front (nothing launched, the
   cache unchanged); the CPU backend takes any element-aligned pointer. */
static void test_errors_alignment(mustafar_context *ctx)
{
    enum { D = 64, N = 4 };
    const mustafar_status want = tb_is_cuda(ctx) ? MUSTAFAR_ERROR_INVALID_ARGUMENT : MUSTAFAR_OK;
    tb_rng r;
    mustafar_cache_desc d;
    mustafar_cache *cache = NULL;
    uint16_t x[(N + 1) * D];
    size_t rec = ref_record_bytes(D, ref_kept(D, 0.5f));
    unsigned char *dx, *drec;
    int id = -1, n = N;
    tb_rng_for_test(&r, g_cur_test);
    tb_fill_normal(&r, MUSTAFAR_DTYPE_F16, x, (N + 1) * D, 1.0);
    dx = (unsigned char *)tb_dup(ctx, x, sizeof x);
    drec = (unsigned char *)tb_alloc(ctx, rec * (N + 1));
    CHECK_ST(ctx, mustafar_compress(ctx, D, 0.5f, MUSTAFAR_DTYPE_F16, dx + 2, drec, N), want);
    CHECK_ST(ctx, mustafar_compress(ctx, D, 0.5f, MUSTAFAR_DTYPE_F16, dx, drec + 8, N), want);
    CHECK_ST(ctx, mustafar_prune(ctx, D, 0.5f, MUSTAFAR_DTYPE_F16, dx, dx + 2 * D + 4, 1), want);
    memset(&d, 0, sizeof d);
    d.num_layers = 1;
    d.num_kv_heads = 1;
    d.head_dim = D;
    d.k_sparsity = d.v_sparsity = 0.5f;
    d.dense_window = 2;
    d.page_size = 4;
    d.capacity_tokens = 64;
    d.max_sequences = 1;
    if (CHECK_ST(ctx, mustafar_cache_create(ctx, &d, &cache), MUSTAFAR_OK) &&
        CHECK_ST(ctx, mustafar_cache_add_sequence(cache, &id), MUSTAFAR_OK)) {
        CHECK_ST(ctx, mustafar_cache_append(cache, 0, 1, &id, &n, dx + 2, dx), want);
        CHECK(mustafar_cache_sequence_length(cache, id, 0) == (tb_is_cuda(ctx) ? 0 : N),
              "sequence length %d after a misaligned append", mustafar_cache_sequence_length(cache, id, 0));
        CHECK_ST(ctx, mustafar_cache_attention(cache, 0, 1, &id, dx, dx + 2 * D + 6, 0.0f), want);
    }
    mustafar_cache_destroy(cache);
    tb_free(ctx, dx);
    tb_free(ctx, drec);
}
