/* test_prune.h - cases 2 and 3: pruning against a brute-force reference,
   kept counts, record sizes, and the record format against an encoder
   written here from the documentation. */

static const int k_dims[3] = {64, 128, 256};

static void test_kept_count(mustafar_context *ctx)
{
    static const struct { int d; float s; int n; } ok[] = {
        {64, 0.5f, 32}, {128, 0.5f, 64}, {256, 0.5f, 128},
        {64, 0.7f, 20}, {128, 0.7f, 39}, {256, 0.7f, 77},     /* 0.7*128 -> 89 pruned */
        {64, 0.0f, 64}, {128, 0.0f, 128}, {256, 0.0f, 256},
        {64, 0.9f, 7}, {128, 0.9f, 13}, {256, 0.9f, 26},
        {128, 0.25f, 96}, {128, 0.75f, 32}, {128, 0.999f, 1}, {64, 0.3f, 45},
    };
    static const struct { int d; float s; } bad[] = {
        {128, -0.1f}, {128, 1.0f}, {128, 1.5f}, {100, 0.5f}, {0, 0.5f}, {-128, 0.5f}, {32, 0.5f},
        {512, 0.5f},
    };
    size_t i;
    (void)ctx;
    for (i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        int got = mustafar_kept_count(ok[i].d, ok[i].s);
        CHECK(got == ok[i].n, "mustafar_kept_count(%d, %g) = %d, expected %d", ok[i].d,
              (double)ok[i].s, got, ok[i].n);
        CHECK(ref_kept(ok[i].d, ok[i].s) == ok[i].n, "test bug: ref_kept(%d, %g)", ok[i].d,
              (double)ok[i].s);
    }
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int got = mustafar_kept_count(bad[i].d, bad[i].s);
        CHECK(got == 0, "mustafar_kept_count(%d, %g) = %d, expected 0 (invalid)", bad[i].d,
              (double)bad[i].s, got);
    }
    CHECK(mustafar_kept_count(128, (float)NAN) == 0, "mustafar_kept_count(128, NaN) != 0");
    CHECK(mustafar_kept_count(128, (float)INFINITY) == 0, "mustafar_kept_count(128, Inf) != 0");
}

static void test_record_bytes(mustafar_context *ctx)
{
    static const float sp[6] = {0.0f, 0.25f, 0.5f, 0.7f, 0.9f, 0.999f};
    int di, si, t;
    (void)ctx;
    CHECK(MUSTAFAR_FORMAT_VERSION >= 1, "MUSTAFAR_FORMAT_VERSION must be defined and >= 1");
    CHECK(mustafar_record_bytes(128, 0.7f, MUSTAFAR_DTYPE_F16) == 96,
          "record_bytes(128, 0.7, F16) = %zu, expected 96", mustafar_record_bytes(128, 0.7f, MUSTAFAR_DTYPE_F16));
    CHECK(mustafar_record_bytes(128, 0.5f, MUSTAFAR_DTYPE_F16) == 144,
          "record_bytes(128, 0.5, F16) = %zu, expected 144", mustafar_record_bytes(128, 0.5f, MUSTAFAR_DTYPE_F16));
    CHECK(mustafar_record_bytes(64, 0.7f, MUSTAFAR_DTYPE_F16) == 48,
          "record_bytes(64, 0.7, F16) = %zu, expected 48", mustafar_record_bytes(64, 0.7f, MUSTAFAR_DTYPE_F16));
    CHECK(mustafar_record_bytes(256, 0.7f, MUSTAFAR_DTYPE_F16) == 192,
          "record_bytes(256, 0.7, F16) = %zu, expected 192", mustafar_record_bytes(256, 0.7f, MUSTAFAR_DTYPE_F16));
    CHECK(mustafar_record_bytes(128, 0.7f, MUSTAFAR_DTYPE_F16) * 1000 <= 375 * 256,
          "record at 0.7 is more than 37.5 %% of dense");
    for (di = 0; di < 3; di++) {
        int D = k_dims[di];
        for (si = 0; si < 6; si++) {
            size_t want = ref_record_bytes(D, ref_kept(D, sp[si]));
            for (t = 0; t < 3; t++) {
                mustafar_dtype dt = (mustafar_dtype)t;    /* DEFAULT (fp16), F16, BF16 */
                size_t got = mustafar_record_bytes(D, sp[si], dt);
                CHECK(got == want && got % 16 == 0, "record_bytes(%d, %g, dtype %d) = %zu, expected %zu",
                      D, (double)sp[si], t, got, want);
            }
        }
    }
    CHECK(mustafar_record_bytes(128, 0.5f, (mustafar_dtype)7) == 0, "record_bytes with dtype 7 != 0");
    CHECK(mustafar_record_bytes(100, 0.5f, MUSTAFAR_DTYPE_F16) == 0, "record_bytes with head_dim 100 != 0");
    CHECK(mustafar_record_bytes(128, 1.0f, MUSTAFAR_DTYPE_F16) == 0, "record_bytes with sparsity 1 != 0");
    CHECK(mustafar_record_bytes(128, -0.1f, MUSTAFAR_DTYPE_F16) == 0, "record_bytes with sparsity -0.1 != 0");
    CHECK(mustafar_record_bytes(128, (float)NAN, MUSTAFAR_DTYPE_F16) == 0, "record_bytes with NaN sparsity != 0");
}

/* ---- pruning data ------------------------------------------------------- */

enum { KIND_NORMAL, KIND_OUTLIER, KIND_TIES, KIND_SPECIAL, KIND_BITS, KIND_COUNT };
static const char *const k_kind_names[KIND_COUNT] = {"normal", "outlier", "ties", "nan-inf", "random-bits"};

static uint16_t tb_rand_nan(tb_rng *r, mustafar_dtype dt)
{
    uint16_t h;
    do {
        if (tb_is_bf16(dt)) h = (uint16_t)(0x7F80 | (tb_u32(r) & 0x7F) | (tb_u32(r) & 0x8000));
        else h = (uint16_t)(0x7C00 | (tb_u32(r) & 0x3FF) | (tb_u32(r) & 0x8000));
    } while (!tb_is_nan16(dt, h) || h == 0xFFFF);   /* 0xFFFF is the poison */
    return h;
}
static uint16_t tb_inf(mustafar_dtype dt, int neg)
{
    uint16_t h = (uint16_t)(tb_is_bf16(dt) ? 0x7F80 : 0x7C00);
    return (uint16_t)(neg ? (h | 0x8000) : h);
}

/* count vectors of D elements of one kind.  Outlier channels (x20, like the
   few large channels of post-RoPE keys) are the same for every vector. */
static void prune_gen(tb_rng *r, mustafar_dtype dt, int kind, int D, int n, uint16_t *x, int count)
{
    int v, c, outl[4];
    for (c = 0; c < 4; c++) outl[c] = tb_int(r, 0, D - 1);
    for (v = 0; v < count; v++) {
        uint16_t *p = x + (size_t)v * D;
        switch (kind) {
        case KIND_NORMAL:
            tb_fill_normal(r, dt, p, (size_t)D, 1.0);
            break;
        case KIND_OUTLIER:
            for (c = 0; c < D; c++) {
                double m = (c == outl[0] || c == outl[1] || c == outl[2] || c == outl[3]) ? 20.0 : 1.0;
                p[c] = tb_d2h(dt, m * tb_normal(r));
            }
            break;
        case KIND_TIES: {
            /* a small set incl. +0 and -0; some vectors nearly all zero so
               that zeros are kept (lower index first, -0 stays -0) */
            static const double vals[7] = {0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0};
            int sparse = (v % 3 == 0);
            for (c = 0; c < D; c++) {
                int k = tb_int(r, 0, 6);
                if (sparse && tb_int(r, 0, 9) > 0) k = tb_int(r, 0, 1);
                p[c] = tb_d2h(dt, vals[k]);
            }
            break;
        }
        case KIND_SPECIAL: {
            /* NaN (various payloads and signs) and +-Inf; every 4th vector
               has more NaNs than kept slots, every 4th+1 more Infs */
            int nnan = (v % 4 == 0) ? n + tb_int(r, 1, 4) : tb_int(r, 0, 6);
            int ninf = (v % 4 == 1) ? n + tb_int(r, 1, 4) : tb_int(r, 0, 6);
            tb_fill_normal(r, dt, p, (size_t)D, 1.0);
            if (nnan > D) nnan = D;
            if (ninf > D) ninf = D;
            for (c = 0; c < ninf; c++) p[tb_int(r, 0, D - 1)] = tb_inf(dt, tb_int(r, 0, 1));
            for (c = 0; c < nnan; c++) p[tb_int(r, 0, D - 1)] = tb_rand_nan(r, dt);
            break;
        }
        default:
            for (c = 0; c < D; c++) {
                uint16_t h;
                do h = (uint16_t)tb_u32(r); while (h == 0xFFFF);
                p[c] = h;
            }
            break;
        }
    }
}

static const float k_prune_sp[4] = {0.0f, 0.5f, 0.7f, 0.9f};

/* Case 2: mustafar_prune against the brute-force rank rule; in place too;
   ctx NULL (host) on the CPU backend. */
static void test_prune_reference(mustafar_context *ctx)
{
    tb_rng r;
    int count = g_quick ? 12 : 48;
    int di, si, ti, kind;
    tb_rng_for_test(&r, g_cur_test);
    for (di = 0; di < 3; di++)
        for (si = 0; si < 4; si++)
            for (ti = 0; ti < 2; ti++)
                for (kind = 0; kind < KIND_COUNT; kind++) {
                    int D = k_dims[di];
                    float s = k_prune_sp[si];
                    mustafar_dtype dt = ti ? MUSTAFAR_DTYPE_BF16 : MUSTAFAR_DTYPE_F16;
                    int n = ref_kept(D, s), v, bad = 0;
                    size_t elems = (size_t)count * D, bytes = elems * 2;
                    uint16_t *x = TB_NEW(uint16_t, elems), *want = TB_NEW(uint16_t, elems);
                    uint16_t *got = TB_NEW(uint16_t, elems);
                    void *dx, *dy;
                    prune_gen(&r, dt, kind, D, n, x, count);
                    for (v = 0; v < count; v++) {
                        unsigned char kb[256], kf[256];
                        int c, kept = 0, same = 1;
                        ref_prune_brute(x + (size_t)v * D, D, n, kb);
                        ref_prune_fast(x + (size_t)v * D, D, n, kf);

                        for (c = 0; c < D; c++) { kept += kb[c]; same &= kb[c] == kf[c]; }
                        CHECK(same && kept == n,
                              "test bug: brute-force and fast reference pruners disagree");
                        ref_apply(x + (size_t)v * D, kb, D, want + (size_t)v * D);
                        for (c = 0; c < D; c++)  /* NaN is always kept when there is room */
                            if (tb_is_nan16(dt, x[(size_t)v * D + c]) && !kb[c]) {
                                int nn = 0, j;
                                for (j = 0; j < D; j++) nn += tb_is_nan16(dt, x[(size_t)v * D + j]);
                                CHECK(nn > n, "test bug: a NaN was pruned with room left");
                            }
                    }
                    dx = tb_dup(ctx, x, bytes);
                    dy = tb_alloc(ctx, bytes);
                    tb_poison(ctx, dy, bytes);
                    if (CHECK_ST(ctx, mustafar_prune(ctx, D, s, dt, dx, dy, (size_t)count), MUSTAFAR_OK)) {
                        tb_download(ctx, got, dy, bytes);
                        for (v = 0; v < count && bad < 3; v++) {
                            int c = first_diff16(got + (size_t)v * D, want + (size_t)v * D, (size_t)D);
                            if (c >= 0) {
                                bad++;
                                CHECK(0, "prune D=%d s=%g %s %s: vector %d channel %d: got 0x%04X, "
                                      "expected 0x%04X (input 0x%04X, n=%d)", D, (double)s,
                                      tb_dtname(dt), k_kind_names[kind], v, c,
                                      got[(size_t)v * D + c], want[(size_t)v * D + c],
                                      x[(size_t)v * D + c], n);
                            }
                        }
                    }
                    /* in place: x == y */
                    tb_upload(ctx, dy, x, bytes);
                    if (CHECK_ST(ctx, mustafar_prune(ctx, D, s, dt, dy, dy, (size_t)count), MUSTAFAR_OK)) {
                        tb_download(ctx, got, dy, bytes);
                        v = first_diff16(got, want, elems);
                        CHECK(v < 0, "in-place prune D=%d s=%g %s %s: element %d: got 0x%04X, expected 0x%04X",
                              D, (double)s, tb_dtname(dt), k_kind_names[kind], v, v >= 0 ? got[v] : 0,
                              v >= 0 ? want[v] : 0);
                    }
                    /* ctx NULL means host pointers */
                    if (!tb_is_cuda(ctx) && kind == KIND_NORMAL) {
                        memset(got, 0xFF, bytes);
                        if (CHECK_ST(NULL, mustafar_prune(NULL, D, s, dt, x, got, (size_t)count), MUSTAFAR_OK))
                            CHECK(first_diff16(got, want, elems) < 0, "prune with ctx NULL differs");
                    }
                    tb_free(ctx, dx);
                    tb_free(ctx, dy);
                    free(x);
                    free(want);
                    free(got);
                }
}

/* A large batch (many GPU blocks) of random-bit vectors: prune, compress
   and decompress against the (fast, brute-force-checked) reference. */
static void large_batch(mustafar_context *ctx, tb_rng *r, int D, float s, mustafar_dtype dt, int count)
{
    int n = ref_kept(D, s), v, d;
    size_t rec = ref_record_bytes(D, n), elems = (size_t)count * D;
    uint16_t *x = TB_NEW(uint16_t, elems), *want = TB_NEW(uint16_t, elems), *got = TB_NEW(uint16_t, elems);
    unsigned char *wrec = TB_NEW(unsigned char, rec * count), *grec = TB_NEW(unsigned char, rec * count);
    void *dx, *dy, *drec;
    prune_gen(r, dt, KIND_BITS, D, n, x, count / 2);
    prune_gen(r, dt, KIND_NORMAL, D, n, x + (size_t)(count / 2) * D, count - count / 2);
    for (v = 0; v < count; v++) {
        ref_prune_vec(x + (size_t)v * D, D, n, want + (size_t)v * D);
        ref_encode_vec(x + (size_t)v * D, D, n, rec, wrec + (size_t)v * rec);
    }
    dx = tb_dup(ctx, x, elems * 2);
    dy = tb_alloc(ctx, elems * 2);
    drec = tb_alloc(ctx, rec * count);
    tb_poison(ctx, dy, elems * 2);
    if (CHECK_ST(ctx, mustafar_prune(ctx, D, s, dt, dx, dy, (size_t)count), MUSTAFAR_OK)) {
        tb_download(ctx, got, dy, elems * 2);
        d = first_diff16(got, want, elems);
        CHECK(d < 0, "prune of %d vectors (D=%d s=%g %s): element %d is 0x%04X, expected 0x%04X", count, D,
              (double)s, tb_dtname(dt), d, d >= 0 ? got[d] : 0, d >= 0 ? want[d] : 0);
    }
    tb_poison(ctx, drec, rec * count);
    if (CHECK_ST(ctx, mustafar_compress(ctx, D, s, dt, dx, drec, (size_t)count), MUSTAFAR_OK)) {
        tb_download(ctx, grec, drec, rec * count);
        d = first_diff8(grec, wrec, rec * count);
        CHECK(d < 0, "compress of %d vectors (D=%d s=%g %s): byte %d of record %d differs", count, D,
              (double)s, tb_dtname(dt), d >= 0 ? (int)((size_t)d % rec) : 0, d >= 0 ? (int)((size_t)d / rec) : 0);
        tb_poison(ctx, dy, elems * 2);
        if (CHECK_ST(ctx, mustafar_decompress(ctx, D, s, dt, drec, dy, (size_t)count), MUSTAFAR_OK)) {
            tb_download(ctx, got, dy, elems * 2);
            d = first_diff16(got, want, elems);
            CHECK(d < 0, "decompress of %d records (D=%d s=%g %s): element %d is 0x%04X, expected 0x%04X",
                  count, D, (double)s, tb_dtname(dt), d, d >= 0 ? got[d] : 0, d >= 0 ? want[d] : 0);
        }
    }
    /* count 0 is a valid no-op */
    CHECK_ST(ctx, mustafar_prune(ctx, D, s, dt, dx, dy, 0), MUSTAFAR_OK);
    tb_free(ctx, dx);
    tb_free(ctx, dy);
    tb_free(ctx, drec);
    free(x); free(want); free(got); free(wrec); free(grec);
}

static void test_prune_large_batch(mustafar_context *ctx)
{
    tb_rng r;
    int count = g_quick ? 700 : 5000;
    tb_rng_for_test(&r, g_cur_test);
    large_batch(ctx, &r, 128, 0.7f, MUSTAFAR_DTYPE_F16, count);
    large_batch(ctx, &r, 256, 0.5f, MUSTAFAR_DTYPE_BF16, count / 2);
    large_batch(ctx, &r, 64, 0.9f, MUSTAFAR_DTYPE_F16, count + 3);
}

/* Case 3: records byte-exact against the reference encoder (poisoned
   output, so the padding must be written as zeros); decompress of the
   library's records and of our own records equals the reference pruning
   bitwise, and equals mustafar_prune. */
static void test_compress_format(mustafar_context *ctx)
{
    tb_rng r;
    int count = g_quick ? 8 : 32;
    int di, si, ti, kind;
    tb_rng_for_test(&r, g_cur_test);
    for (di = 0; di < 3; di++)
        for (si = 0; si < 4; si++)
            for (ti = 0; ti < 2; ti++)
                for (kind = 0; kind < KIND_COUNT; kind++) {
                    int D = k_dims[di];
                    float s = k_prune_sp[si];
                    mustafar_dtype dt = ti ? MUSTAFAR_DTYPE_BF16 : MUSTAFAR_DTYPE_F16;
                    int n = ref_kept(D, s), v;
                    size_t rec = ref_record_bytes(D, n), elems = (size_t)count * D;
                    size_t bytes = elems * 2, rbytes = rec * (size_t)count;
                    uint16_t *x = TB_NEW(uint16_t, elems), *want = TB_NEW(uint16_t, elems);
                    uint16_t *got = TB_NEW(uint16_t, elems), *pr = TB_NEW(uint16_t, elems);
                    unsigned char *wrec = TB_NEW(unsigned char, rbytes), *grec = TB_NEW(unsigned char, rbytes);
                    void *dx, *drec, *dy;
                    const char *what = k_kind_names[kind];
                    CHECK(mustafar_record_bytes(D, s, dt) == rec, "record_bytes(%d, %g) = %zu, expected %zu",
                          D, (double)s, mustafar_record_bytes(D, s, dt), rec);
                    prune_gen(&r, dt, kind, D, n, x, count);
                    for (v = 0; v < count; v++) {
                        ref_encode_vec(x + (size_t)v * D, D, n, rec, wrec + (size_t)v * rec);
                        ref_prune_vec(x + (size_t)v * D, D, n, want + (size_t)v * D);
                    }
                    dx = tb_dup(ctx, x, bytes);
                    drec = tb_alloc(ctx, rbytes);
                    dy = tb_alloc(ctx, bytes);
                    tb_poison(ctx, drec, rbytes);
                    if (CHECK_ST(ctx, mustafar_compress(ctx, D, s, dt, dx, drec, (size_t)count), MUSTAFAR_OK)) {
                        tb_download(ctx, grec, drec, rbytes);
                        for (v = 0; v < count; v++) {
                            int b = first_diff8(grec + (size_t)v * rec, wrec + (size_t)v * rec, rec);
                            if (b >= 0) {
                                CHECK(0, "compress D=%d s=%g %s %s: record %d byte %d (%s) is 0x%02X, expected "
                                      "0x%02X", D, (double)s, tb_dtname(dt), what, v, b,
                                      b < D / 8 ? "bitmap" : (b < D / 8 + 2 * n ? "values" : "padding"),
                                      grec[(size_t)v * rec + b], wrec[(size_t)v * rec + b]);
                                break;
                            }
                        }
                        /* decompress(compress(x)) */
                        tb_poison(ctx, dy, bytes);
                        if (CHECK_ST(ctx, mustafar_decompress(ctx, D, s, dt, drec, dy, (size_t)count), MUSTAFAR_OK)) {
                            tb_download(ctx, got, dy, bytes);
                            v = first_diff16(got, want, elems);
                            CHECK(v < 0, "decompress(compress(x)) D=%d s=%g %s %s: element %d: 0x%04X, expected 0x%04X",
                                  D, (double)s, tb_dtname(dt), what, v, v >= 0 ? got[v] : 0, v >= 0 ? want[v] : 0);
                        }
                    }
                    /* decompress of records made by the reference encoder */
                    tb_upload(ctx, drec, wrec, rbytes);
                    tb_poison(ctx, dy, bytes);
                    if (CHECK_ST(ctx, mustafar_decompress(ctx, D, s, dt, drec, dy, (size_t)count), MUSTAFAR_OK)) {
                        tb_download(ctx, got, dy, bytes);
                        v = first_diff16(got, want, elems);
                        CHECK(v < 0, "decompress(reference records) D=%d s=%g %s %s: element %d: 0x%04X, expected 0x%04X",
                              D, (double)s, tb_dtname(dt), what, v, v >= 0 ? got[v] : 0, v >= 0 ? want[v] : 0);
                    }
                    /* == mustafar_prune(x) */
                    tb_poison(ctx, dy, bytes);
                    if (CHECK_ST(ctx, mustafar_prune(ctx, D, s, dt, dx, dy, (size_t)count), MUSTAFAR_OK)) {
                        tb_download(ctx, pr, dy, bytes);
                        CHECK(first_diff16(pr, want, elems) < 0, "prune(x) != decompress(compress(x)) D=%d s=%g %s %s",
                              D, (double)s, tb_dtname(dt), what);
                    }
                    tb_free(ctx, dx);
                    tb_free(ctx, drec);
                    tb_free(ctx, dy);
                    free(x);
                    free(want);
                    free(got);
                    free(pr);
                    free(wrec);
                    free(grec);
                }
}

/* The records an append writes (through the cache, one token at a time and
   in one large call) are the reference encoder's, on tie-heavy, outlier and
   plain data, with K and V of different sparsities. */
static void test_append_records(mustafar_context *ctx)
{
    static const struct { int D; float ks, vs; } cases[] = {
        {64, 0.5f, 0.8f}, {64, 0.7f, 0.8f}, {128, 0.5f, 0.7f}, {128, 0.7f, 0.7f}, {256, 0.9f, 0.5f}};
    tb_rng r;
    size_t ci;
    int ti;
    tb_rng_for_test(&r, g_cur_test);
    for (ci = 0; ci < sizeof cases / sizeof cases[0]; ci++)
        for (ti = 0; ti < 2; ti++) {
            const int D = cases[ci].D, hkv = 2, page = 16, T = 90, big = 60;
            const mustafar_dtype dt = ti ? MUSTAFAR_DTYPE_BF16 : MUSTAFAR_DTYPE_F16;
            const int nk = ref_kept(D, cases[ci].ks), nv = ref_kept(D, cases[ci].vs);
            const size_t krec = ref_record_bytes(D, nk), vrec = ref_record_bytes(D, nv);
            const size_t per = (size_t)hkv * D;
            mustafar_cache_desc d;
            mustafar_cache *c = NULL;
            mustafar_paged_kv kv;
            uint16_t *k = TB_NEW(uint16_t, (size_t)T * per), *v = TB_NEW(uint16_t, (size_t)T * per);
            unsigned char *kp = NULL, *vp = NULL, want[1024], keep[256];
            int32_t table[8];
            void *dk, *dv;
            int seq = -1, t, h, bad = 0, one = 1, n = big;
            /* token t's K and V: ties, outliers, plain, or concentrated in
               the first D/4 channels (as a trained model's often are), by token */
            for (t = 0; t < T; t++) {
                size_t e;
                prune_gen(&r, dt, t % 4 == 0 ? KIND_TIES : t % 4 == 1 ? KIND_OUTLIER : KIND_NORMAL, D, nk,
                          k + (size_t)t * per, hkv);
                prune_gen(&r, dt, t % 4 == 0 ? KIND_TIES : KIND_NORMAL, D, nv, v + (size_t)t * per, hkv);
                if (t % 4 == 3)
                    for (e = 0; e < per; e++)
                        if ((int)(e % (size_t)D) < D / 4) {
                            k[(size_t)t * per + e] = tb_d2h(dt, 20.0 * tb_h2d(dt, k[(size_t)t * per + e]));
                            v[(size_t)t * per + e] = tb_d2h(dt, 20.0 * tb_h2d(dt, v[(size_t)t * per + e]));
                        }
            }
            memset(&d, 0, sizeof d);
            d.num_layers = 1; d.num_kv_heads = hkv; d.head_dim = D; d.dtype = dt;
            d.k_sparsity = cases[ci].ks; d.v_sparsity = cases[ci].vs; d.page_size = page;
            d.capacity_tokens = T; d.max_sequences = 1;
            dk = tb_dup(ctx, k, (size_t)T * per * 2);
            dv = tb_dup(ctx, v, (size_t)T * per * 2);
            if (CHECK_ST(ctx, mustafar_cache_create(ctx, &d, &c), MUSTAFAR_OK) &&
                CHECK_ST(ctx, mustafar_cache_add_sequence(c, &seq), MUSTAFAR_OK) &&
                CHECK_ST(ctx, mustafar_cache_append(c, 0, 1, &seq, &n, dk, dv), MUSTAFAR_OK)) {
                for (t = big; t < T; t++)
                    CHECK_ST(ctx, mustafar_cache_append(c, 0, 1, &seq, &one, (uint16_t *)dk + (size_t)t * per,
                                                        (uint16_t *)dv + (size_t)t * per), MUSTAFAR_OK);
                if (CHECK_ST(ctx, mustafar_cache_layer_view(c, 0, &kv), MUSTAFAR_OK)) {
                    const size_t kbytes = (size_t)kv.num_pages * hkv * page * krec;
                    const size_t vbytes = (size_t)kv.num_pages * hkv * page * vrec;
                    kp = TB_NEW(unsigned char, kbytes);
                    vp = TB_NEW(unsigned char, vbytes);
                    tb_download(ctx, kp, kv.k_pages, kbytes);
                    tb_download(ctx, vp, kv.v_pages, vbytes);
                    tb_download(ctx, table, kv.page_table, sizeof(int32_t) * (size_t)((T + page - 1) / page));
                    for (t = 0; t < T && bad < 3; t++)
                        for (h = 0; h < hkv && bad < 3; h++) {
                            const size_t slot = ((size_t)table[t / page] * hkv + h) * page + t % page;
                            int kv_i;
                            for (kv_i = 0; kv_i < 2; kv_i++) {   /* K, then V */
                                const uint16_t *x = (kv_i ? v : k) + (size_t)t * per + (size_t)h * D;
                                const size_t rec = kv_i ? vrec : krec;
                                ref_prune_fast(x, D, kv_i ? nv : nk, keep);
                                ref_encode(x, keep, D, rec, want);
                                if (!memcmp((kv_i ? vp : kp) + slot * rec, want, rec)) continue;
                                bad++;
                                CHECK(0, "D=%d %s K %g / V %g: token %d head %d: %c record differs from the "
                                      "reference (%s)", D, tb_dtname(dt), (double)cases[ci].ks,
                                      (double)cases[ci].vs, t, h, kv_i ? 'V' : 'K',
                                      t < big ? "large append" : "one token");
                            }
                        }
                }
            }
            mustafar_cache_destroy(c);
            tb_free(ctx, dk);
            tb_free(ctx, dv);
            free(k); free(v); free(kp); free(vp);
        }
}
