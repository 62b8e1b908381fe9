/* test_attention.h - case 4 (decode attention through the cache API against
   a float64 reference) and case 6 (the stateless paged layer on memory the
   test owns, with a non-identity page table and a caller-managed window). */

typedef struct attn_case {
    int D, bf16, hkv, hq, W, page;
    float ks, vs;
    int layers;
    float scale;    /* explicit scale used on every other check (0.0f on the others) */
    int outlier;
} attn_case;

/* GQA group sizes 1, 3, 4, 8; windows 0/16/64; pages 8/16/24/32 (24: tiles
   straddle pages); all (K, V) sparsities; head_dim 64/128/256; both
   dtypes; 2-3 layers.  The first four run under --quick. */
static const attn_case k_attn_cases[] = {
    /*  D  bf16 hkv hq  W  page  ks     vs    layers scale  outlier */
    {128, 0, 2, 8, 16, 16, 0.5f, 0.5f, 3, 0.05f, 1},
    {64, 1, 2, 16, 64, 8, 0.7f, 0.5f, 2, 0.2f, 1},
    {256, 1, 2, 2, 0, 32, 0.7f, 0.7f, 2, 0.03f, 1},
    {128, 0, 2, 16, 0, 16, 0.0f, 0.0f, 2, 0.07f, 1},
    {128, 1, 2, 16, 64, 16, 0.7f, 0.7f, 2, 0.1f, 1},
    {64, 0, 2, 8, 16, 24, 0.7f, 0.5f, 2, 0.2f, 1},
    {256, 0, 2, 16, 16, 16, 0.5f, 0.5f, 2, 0.04f, 0},
    {64, 1, 2, 2, 64, 16, 0.0f, 0.0f, 2, 0.1f, 0},
    {128, 1, 2, 8, 0, 16, 0.7f, 0.5f, 3, 0.07f, 1},
    {64, 0, 2, 16, 0, 16, 0.7f, 0.7f, 2, 0.1f, 1},
    {256, 0, 2, 2, 64, 16, 0.7f, 0.5f, 2, 0.05f, 1},
    {128, 0, 3, 9, 16, 16, 0.7f, 0.7f, 2, 0.08f, 1},
    {256, 1, 1, 4, 16, 8, 0.5f, 0.7f, 2, 0.05f, 1},
    {128, 0, 2, 8, 16, 32, 0.9f, 0.9f, 2, 0.08f, 1},
    {128, 0, 2, 2, 0, 16, 0.7f, 0.7f, 2, 0.06f, 1},
    {64, 0, 2, 8, 4, 16, 0.5f, 0.8f, 2, 0.0f, 1},
    {64, 0, 2, 8, 0, 16, 0.0f, 0.8f, 2, 0.0f, 1},
    {64, 0, 2, 8, 0, 16, 0.5f, 0.8f, 2, 0.0f, 1},
    {64, 0, 2, 8, 0, 16, 0.7f, 0.8f, 2, 0.0f, 0},
    {128, 0, 2, 8, 0, 16, 0.5f, 0.8f, 2, 0.0f, 1},
    /* kept values concentrated in the first bitmap word (outlier 2) */
    {64, 0, 2, 8, 0, 16, 0.7f, 0.8f, 2, 0.0f, 2},
    {64, 0, 2, 8, 4, 16, 0.5f, 0.8f, 2, 0.0f, 2},
    {64, 0, 2, 8, 0, 16, 0.7f, 0.7f, 2, 0.0f, 2},
    {128, 1, 2, 8, 0, 16, 0.7f, 0.8f, 2, 0.0f, 2},
};

static double g_attn_err[2], g_attn_effect_max, g_attn_effect_sum;
static long g_attn_effect_n;

static void run_attn_case(mustafar_context *ctx, tb_rng *r, const attn_case *c, int ci)
{
    static const int lens_full[5] = {0, 1, 7, 100, 300};
    static const int lens_quick[5] = {0, 1, 7, 100, 130};
    const int *lens = g_quick ? lens_quick : lens_full;
    mustafar_dtype dt = c->bf16 ? MUSTAFAR_DTYPE_BF16 : MUSTAFAR_DTYPE_F16;
    mustafar_cache_desc d;
    tm_model m;
    int idx[5], rem[5], i, l, step, pages = 0;
    char what[160];
    snprintf(what, sizeof what, "case %d (D=%d %s Hkv=%d Hq=%d W=%d page=%d s=%g/%g)", ci, c->D,
             tb_dtname(dt), c->hkv, c->hq, c->W, c->page, (double)c->ks, (double)c->vs);
    for (i = 0; i < 5; i++) pages += (lens[i] + c->page - 1) / c->page;
    tm_desc(&d, c->layers, c->hkv, c->hq, c->D, dt, c->ks, c->vs, c->W, c->page,
            (int64_t)(pages + 2) * c->page, 8);
    if (!tm_create(&m, ctx, r, &d, c->outlier)) return;
    for (i = 0; i < 5; i++) {
        idx[i] = tm_add(&m);
        rem[i] = lens[i];
        if (idx[i] < 0) { tm_destroy(&m); return; }
    }
    /* Steps mixing prefill chunks (many tokens) and decode (1 token per
       sequence per call), in shuffled sequence order; a sequence that is
       done sometimes takes part with 0 tokens.  Every layer gets its own
       data; after each layer's append its attention is checked, so layers
       are also checked while they hold different lengths. */
    for (step = 0;; step++) {
        int part[5], nt[5], np = 0, perm[5], pp[5], pn[5], left = 0;
        for (i = 0; i < 5; i++) left += rem[i];
        if (left == 0) break;
        for (i = 0; i < 5; i++) {
            if (rem[i] > 0 && (step == 0 || tb_unif(r) < 0.8)) {
                int t;
                if (step == 0) t = tb_int(r, 1, rem[i]);
                else if (tb_unif(r) < 0.5) t = 1;
                else t = tb_int(r, 1, rem[i] < 80 ? rem[i] : 80);
                part[np] = idx[i];
                nt[np++] = t;
                rem[i] -= t;
            } else if (rem[i] == 0 && tb_unif(r) < 0.2) {
                part[np] = idx[i];
                nt[np++] = 0;
            }
        }
        if (np == 0) continue;
        for (i = 0; i < np; i++) perm[i] = i;
        tb_shuffle_int(r, perm, np);
        for (i = 0; i < np; i++) { pp[i] = part[perm[i]]; pn[i] = nt[perm[i]]; }
        for (l = 0; l < c->layers; l++) {
            int all[5];
            if (!tm_append(&m, l, np, pp, pn)) { tm_destroy(&m); return; }
            for (i = 0; i < 5; i++) all[i] = idx[i];
            tb_shuffle_int(r, all, 5);
            tm_check_attention(&m, l, 5, all, (step % 2) ? c->scale : 0.0f, what);
        }
        if (g_cur_failures > TB_MAX_PRINTED) break;
    }
    for (i = 0; i < 5; i++)
        for (l = 0; l < c->layers; l++)
            CHECK(mustafar_cache_sequence_length(m.cache, m.seq[idx[i]].id, l) == lens[i],
                  "%s: sequence length %d, expected %d", what,
                  mustafar_cache_sequence_length(m.cache, m.seq[idx[i]].id, l), lens[i]);
    tb_info("%s: %ld checks, max rel error %.2e (bound %.0e); pruning changes the output by "
            "%.2e on average, %.2e at most", what, m.checks, m.max_err, tb_attn_tol(dt),
            m.effect_n ? m.sum_prune_effect / (double)m.effect_n : 0.0, m.max_prune_effect);
    if (m.max_err > g_attn_err[c->bf16]) g_attn_err[c->bf16] = m.max_err;
    if (m.max_prune_effect > g_attn_effect_max) g_attn_effect_max = m.max_prune_effect;
    g_attn_effect_sum += m.sum_prune_effect;
    g_attn_effect_n += m.effect_n;
    tm_destroy(&m);
}

static void test_cache_attention(mustafar_context *ctx)
{
    tb_rng r;
    int n = (int)(sizeof k_attn_cases / sizeof k_attn_cases[0]), i;
    tb_rng_for_test(&r, g_cur_test);
    if (g_quick) n = 4;
    g_attn_err[0] = g_attn_err[1] = g_attn_effect_max = g_attn_effect_sum = 0.0;
    g_attn_effect_n = 0;
    for (i = 0; i < n && g_cur_failures <= TB_MAX_PRINTED; i++) run_attn_case(ctx, &r, &k_attn_cases[i], i);
    /* informational, not asserted: how far the library is from the pruned
       reference, and how far pruning moves the result from dense attention */
    printf("info %s: max relative error vs the pruned float64 reference: fp16 %.2e (bound %.0e), "
           "bf16 %.2e (bound %.0e); pruning changes the output by %.2e on average, %.2e at most\n",
           g_cur_test, g_attn_err[0], tb_attn_tol(MUSTAFAR_DTYPE_F16), g_attn_err[1],
           tb_attn_tol(MUSTAFAR_DTYPE_BF16),
           g_attn_effect_n ? g_attn_effect_sum / (double)g_attn_effect_n : 0.0, g_attn_effect_max);
}


/* Long sequences (flash-decoding splits) and a wide batch (many sequences
   in one call), chunked prefill then decode steps. */
static void long_case(mustafar_context *ctx, tb_rng *r, int D, mustafar_dtype dt, int hkv, int hq, int W,
                      float ks, float vs, int nseq, const int *lens)
{
    mustafar_cache_desc d;
    tm_model m;
    int idx[TM_MAX_SEQS], rem[TM_MAX_SEQS], i, step, pages = 0;
    char what[128];
    snprintf(what, sizeof what, "long/wide (D=%d %s Hkv=%d Hq=%d W=%d, %d sequences)", D, tb_dtname(dt),
             hkv, hq, W, nseq);
    for (i = 0; i < nseq; i++) pages += (lens[i] + 15) / 16;
    tm_desc(&d, 1, hkv, hq, D, dt, ks, vs, W, 16, (int64_t)(pages + 1) * 16, TM_MAX_SEQS);
    if (!tm_create(&m, ctx, r, &d, 1)) return;
    for (i = 0; i < nseq; i++) {
        idx[i] = tm_add(&m);
        rem[i] = lens[i];
        if (idx[i] < 0) { tm_destroy(&m); return; }
    }
    for (step = 0; step < 64; step++) {
        int nt[TM_MAX_SEQS], left = 0, all[TM_MAX_SEQS];
        for (i = 0; i < nseq; i++) {
            nt[i] = rem[i] > 1024 ? 1024 : (rem[i] > 3 && step < 8 ? rem[i] - 3 : (rem[i] > 0 ? 1 : 0));
            rem[i] -= nt[i];
            left += nt[i];
            all[i] = idx[i];
        }
        if (!left) break;
        if (!tm_append(&m, 0, nseq, idx, nt)) break;
        tb_shuffle_int(r, all, nseq);
        tm_check_attention(&m, 0, nseq, all, 0.0f, what);
        if (g_cur_failures > TB_MAX_PRINTED) break;
    }
    tb_info("%s: max rel error %.2e", what, m.max_err);
    tm_destroy(&m);
}

static void test_cache_attention_long(mustafar_context *ctx)
{
    static const int lens_long[4] = {4100, 1000, 17, 1};
    static const int lens_long_q[2] = {700, 5};
    static const int lens_32k[1] = {32768};   /* a 32k-token sequence: many splits */
    int wide[TM_MAX_SEQS], i;
    tb_rng r;
    tb_rng_for_test(&r, g_cur_test);
    if (g_quick) {
        long_case(ctx, &r, 128, MUSTAFAR_DTYPE_F16, 2, 16, 32, 0.7f, 0.7f, 2, lens_long_q);
        return;
    }
    long_case(ctx, &r, 128, MUSTAFAR_DTYPE_F16, 2, 16, 32, 0.7f, 0.7f, 4, lens_long);
    long_case(ctx, &r, 256, MUSTAFAR_DTYPE_BF16, 1, 8, 0, 0.5f, 0.7f, 4, lens_long);
    long_case(ctx, &r, 128, MUSTAFAR_DTYPE_BF16, 1, 4, 64, 0.7f, 0.7f, 1, lens_32k);
    for (i = 0; i < TM_MAX_SEQS; i++) wide[i] = tb_int(&r, 0, 300);
    long_case(ctx, &r, 64, MUSTAFAR_DTYPE_F16, 4, 32, 16, 0.7f, 0.5f, TM_MAX_SEQS, wide);
}

/* ---- case 6: stateless paged layer ------------------------------------- */

typedef struct paged_case {
    int D, bf16, hkv, hq, page, W;
    float ks, vs;
} paged_case;

static const paged_case k_paged_cases[] = {
    {128, 0, 2, 8, 16, 16, 0.7f, 0.5f},
    {64, 1, 2, 4, 8, 0, 0.5f, 0.5f},
    {256, 0, 1, 4, 32, 8, 0.7f, 0.7f},
    {128, 1, 4, 4, 16, 32, 0.0f, 0.7f},
};

#define PG_NSEQ 5

static void run_paged_case(mustafar_context *ctx, tb_rng *r, const paged_case *c, int ci)
{
    static const int lens_full[PG_NSEQ] = {0, 1, 13, 70, 200};
    static const int lens_quick[PG_NSEQ] = {0, 1, 13, 70, 90};
    const int *lens = g_quick ? lens_quick : lens_full;
    mustafar_dtype dt = c->bf16 ? MUSTAFAR_DTYPE_BF16 : MUSTAFAR_DTYPE_F16;
    int D = c->D, hkv = c->hkv, hq = c->hq, P = c->page, W = c->W;
    int nk = ref_kept(D, c->ks), nv = ref_kept(D, c->vs);
    size_t krec = ref_record_bytes(D, nk), vrec = ref_record_bytes(D, nv), per = (size_t)hkv * D;
    int nrows = PG_NSEQ + 2, rowperm[PG_NSEQ + 2], row[PG_NSEQ], nc[PG_NSEQ], npg[PG_NSEQ];
    int maxpg = 0, total = 0, stride, num_pages, i, j, k, t, h, call;
    int32_t *pt;
    uint16_t *rk[PG_NSEQ], *rv[PG_NSEQ], *pk[PG_NSEQ], *pv[PG_NSEQ];
    int *owner_seq, *owner_pos;
    size_t kpb, vpb, winb = 0;
    void *dkp, *dvp, *dpt, *dkw = NULL, *dvw = NULL;
    mustafar_paged_kv kv;
    char what[128];
    snprintf(what, sizeof what, "paged case %d (D=%d %s Hkv=%d Hq=%d page=%d W=%d s=%g/%g)", ci, D,
             tb_dtname(dt), hkv, hq, P, W, (double)c->ks, (double)c->vs);

    for (i = 0; i < nrows; i++) rowperm[i] = i;
    tb_shuffle_int(r, rowperm, nrows);
    for (i = 0; i < PG_NSEQ; i++) {
        row[i] = rowperm[i];
        nc[i] = lens[i] > W ? lens[i] - W : 0;
        npg[i] = (nc[i] + P - 1) / P;
        if (npg[i] > maxpg) maxpg = npg[i];
        total += npg[i];
        rk[i] = TB_NEW(uint16_t, (size_t)(lens[i] + 1) * per);
        rv[i] = TB_NEW(uint16_t, (size_t)(lens[i] + 1) * per);
        pk[i] = TB_NEW(uint16_t, (size_t)(lens[i] + 1) * per);
        pv[i] = TB_NEW(uint16_t, (size_t)(lens[i] + 1) * per);
        tb_fill_normal(r, dt, rk[i], (size_t)lens[i] * per, 1.0);
        tb_fill_normal(r, dt, rv[i], (size_t)lens[i] * per, 1.0);
        for (t = 0; t < lens[i]; t++)
            for (h = 0; h < hkv; h++) {
                rk[i][(size_t)t * per + (size_t)h * D + 3] = tb_d2h(dt, 20.0 * tb_normal(r));  /* outlier */
                ref_prune_vec(rk[i] + (size_t)t * per + (size_t)h * D, D, nk, pk[i] + (size_t)t * per + (size_t)h * D);
                ref_prune_vec(rv[i] + (size_t)t * per + (size_t)h * D, D, nv, pv[i] + (size_t)t * per + (size_t)h * D);
            }
    }
    stride = maxpg + 3;
    num_pages = total + 3;
    /* page table: unused entries -1; pages handed out from the top down,
       round-robin over the sequences (reverse order, interleaved) */
    pt = TB_NEW(int32_t, (size_t)nrows * stride);
    for (i = 0; i < nrows * stride; i++) pt[i] = -1;
    owner_seq = TB_NEW(int, num_pages);
    owner_pos = TB_NEW(int, num_pages);
    for (i = 0; i < num_pages; i++) owner_seq[i] = -1;
    for (j = 0, k = 0; j < maxpg; j++)
        for (i = 0; i < PG_NSEQ; i++)
            if (j < npg[i]) {
                int id = num_pages - 1 - k++;
                pt[(size_t)row[i] * stride + j] = id;
                owner_seq[id] = i;
                owner_pos[id] = j * P;
            }
    kpb = (size_t)num_pages * hkv * P * krec;
    vpb = (size_t)num_pages * hkv * P * vrec;
    dkp = tb_alloc(ctx, kpb);
    dvp = tb_alloc(ctx, vpb);
    tb_poison(ctx, dkp, kpb);
    tb_poison(ctx, dvp, vpb);
    dpt = tb_dup(ctx, pt, (size_t)nrows * stride * 4);
    if (W > 0) {
        /* the caller's ring: position p at slot p % W; other slots NaN */
        uint16_t *kw, *vw;
        winb = (size_t)nrows * W * per * 2;
        kw = TB_NEW(uint16_t, winb / 2);
        vw = TB_NEW(uint16_t, winb / 2);
        memset(kw, 0xFF, winb);
        memset(vw, 0xFF, winb);
        for (i = 0; i < PG_NSEQ; i++)
            for (t = nc[i]; t < lens[i]; t++) {
                size_t o = ((size_t)row[i] * W + (size_t)(t % W)) * per;
                memcpy(kw + o, rk[i] + (size_t)t * per, per * 2);
                memcpy(vw + o, rv[i] + (size_t)t * per, per * 2);
            }
        dkw = tb_dup(ctx, kw, winb);
        dvw = tb_dup(ctx, vw, winb);
        free(kw);
        free(vw);
    }
    memset(&kv, 0, sizeof kv);
    kv.head_dim = D;
    kv.dtype = dt;
    kv.k_sparsity = c->ks;
    kv.v_sparsity = c->vs;
    kv.num_kv_heads = hkv;
    kv.num_q_heads = hq;
    kv.page_size = P;
    kv.k_pages = dkp;
    kv.v_pages = dvp;
    kv.page_table = (const int32_t *)dpt;
    kv.page_table_stride = stride;
    kv.num_rows = nrows;
    kv.num_pages = num_pages;
    kv.k_window = dkw;
    kv.v_window = dvw;
    kv.window_size = W;

    /* mustafar_paged_write in two calls: positions [0, split) then
       [split, nc), the second call in reverse sequence order */
    {
        int split[PG_NSEQ];
        for (i = 0; i < PG_NSEQ; i++) split[i] = tb_int(r, 0, nc[i]);
        for (call = 0; call < 2; call++) {
            int32_t rows[PG_NSEQ], first[PG_NSEQ], ntok[PG_NSEQ];
            int tot = 0, o = 0;
            uint16_t *kb, *vb;
            void *dk, *dv;
            for (j = 0; j < PG_NSEQ; j++) {
                i = call ? PG_NSEQ - 1 - j : j;
                rows[j] = row[i];
                first[j] = call ? split[i] : 0;
                ntok[j] = call ? nc[i] - split[i] : split[i];
                tot += ntok[j];
            }
            kb = TB_NEW(uint16_t, (size_t)(tot + 1) * per);
            vb = TB_NEW(uint16_t, (size_t)(tot + 1) * per);
            for (j = 0; j < PG_NSEQ; j++) {
                i = call ? PG_NSEQ - 1 - j : j;
                memcpy(kb + (size_t)o * per, rk[i] + (size_t)first[j] * per, (size_t)ntok[j] * per * 2);
                memcpy(vb + (size_t)o * per, rv[i] + (size_t)first[j] * per, (size_t)ntok[j] * per * 2);
                o += ntok[j];
            }
            dk = tb_dup(ctx, kb, (size_t)(tot + 1) * per * 2);
            dv = tb_dup(ctx, vb, (size_t)(tot + 1) * per * 2);
            CHECK_ST(ctx, mustafar_paged_write(ctx, &kv, PG_NSEQ, rows, first, ntok, dk, dv), MUSTAFAR_OK);
            tb_free(ctx, dk);
            tb_free(ctx, dv);
            free(kb);
            free(vb);
        }
    }
    /* every written record equals the reference encoding; every other byte
       of the pages (other pages, slots past the end) is untouched */
    {
        unsigned char *kp = TB_NEW(unsigned char, kpb), *vp = TB_NEW(unsigned char, vpb);
        unsigned char *wr = TB_NEW(unsigned char, krec > vrec ? krec : vrec);
        int bad = 0, pg, s;
        tb_download(ctx, kp, dkp, kpb);
        tb_download(ctx, vp, dvp, vpb);
        for (pg = 0; pg < num_pages && bad < 3; pg++)
            for (h = 0; h < hkv && bad < 3; h++)
                for (s = 0; s < P && bad < 3; s++) {
                    size_t ko = (((size_t)pg * hkv + h) * P + s) * krec, vo = (((size_t)pg * hkv + h) * P + s) * vrec;
                    int sq = owner_seq[pg], pos = sq >= 0 ? owner_pos[pg] + s : -1;
                    if (sq >= 0 && pos < nc[sq]) {
                        ref_encode_vec(rk[sq] + (size_t)pos * per + (size_t)h * D, D, nk, krec, wr);
                        if (memcmp(kp + ko, wr, krec)) { bad++; CHECK(0, "%s: K record of seq %d pos %d head %d (page %d slot %d) differs from the reference encoding", what, sq, pos, h, pg, s); }
                        ref_encode_vec(rv[sq] + (size_t)pos * per + (size_t)h * D, D, nv, vrec, wr);
                        if (memcmp(vp + vo, wr, vrec)) { bad++; CHECK(0, "%s: V record of seq %d pos %d head %d (page %d slot %d) differs from the reference encoding", what, sq, pos, h, pg, s); }
                    } else {
                        if (!tb_all_ff(kp + ko, krec) || !tb_all_ff(vp + vo, vrec)) {
                            bad++;
                            CHECK(0, "%s: paged_write wrote page %d head %d slot %d, which holds no written position", what, pg, h, s);
                        }
                    }
                }
        free(kp);
        free(vp);
        free(wr);
    }
    /* attention: all sequences in random order, scale 0 then explicit */
    {
        int order[PG_NSEQ], rep;
        size_t qper = (size_t)hq * D;
        uint16_t *q = TB_NEW(uint16_t, PG_NSEQ * qper), *out = TB_NEW(uint16_t, PG_NSEQ * qper);
        double *ref = TB_NEW(double, qper), *sc = TB_NEW(double, 512);
        mustafar_paged_seq seqs[PG_NSEQ];
        void *dseqs, *dq, *dout;
        for (i = 0; i < PG_NSEQ; i++) order[i] = i;
        for (rep = 0; rep < 2; rep++) {
            float scale = rep ? 0.11f : 0.0f;
            double sd = rep ? 0.11 : 1.0 / sqrt((double)D);
            tb_shuffle_int(r, order, PG_NSEQ);
            for (j = 0; j < PG_NSEQ; j++) {
                i = order[j];
                seqs[j].row = row[i];
                seqs[j].num_compressed = nc[i];
                seqs[j].num_window = lens[i] - nc[i];
                seqs[j].reserved = 0;
            }
            tb_fill_normal(r, dt, q, PG_NSEQ * qper, 1.0);
            dseqs = tb_dup(ctx, seqs, sizeof seqs);
            dq = tb_dup(ctx, q, PG_NSEQ * qper * 2);
            dout = tb_alloc(ctx, PG_NSEQ * qper * 2);
            tb_poison(ctx, dout, PG_NSEQ * qper * 2);
            if (CHECK_ST(ctx, mustafar_paged_attention(ctx, &kv, PG_NSEQ, (const mustafar_paged_seq *)dseqs, dq, dout, scale),
                         MUSTAFAR_OK)) {
                tb_download(ctx, out, dout, PG_NSEQ * qper * 2);
                for (j = 0; j < PG_NSEQ; j++) {
                    const uint16_t **kptr, **vptr;
                    i = order[j];
                    kptr = (const uint16_t **)tb_xmalloc(sizeof(uint16_t *) * (size_t)(lens[i] + 1));
                    vptr = (const uint16_t **)tb_xmalloc(sizeof(uint16_t *) * (size_t)(lens[i] + 1));
                    for (h = 0; h < hq; h++) {
                        int kvh = h / (hq / hkv), nans = 0;
                        double e;
                        const uint16_t *o = out + (size_t)j * qper + (size_t)h * D;
                        for (t = 0; t < lens[i]; t++) {
                            size_t off = (size_t)t * per + (size_t)kvh * D;
                            kptr[t] = (t < nc[i] ? pk[i] : rk[i]) + off;
                            vptr[t] = (t < nc[i] ? pv[i] : rv[i]) + off;
                        }
                        if (lens[i] == 0) {
                            for (t = 0; t < D; t++)
                                if (tb_h2d(dt, o[t]) != 0.0) break;
                            CHECK(t == D, "%s: empty sequence: output element %d is 0x%04X, expected 0", what, t, t < D ? o[t] : 0);
                            continue;
                        }
                        ref_attend(dt, D, q + (size_t)j * qper + (size_t)h * D, lens[i], kptr, vptr, sd, sc, ref);
                        e = tb_rel_err(dt, o, ref, D, &nans);
                        CHECK(nans == 0, "%s: seq %d (len %d) head %d: %d NaN outputs", what, i, lens[i], h, nans);
                        CHECK(nans > 0 || e <= tb_attn_tol(dt), "%s: seq %d (len %d) head %d scale %g: relative error %.3g > %.3g",
                              what, i, lens[i], h, (double)scale, e, tb_attn_tol(dt));
                    }
                    free((void *)kptr);
                    free((void *)vptr);
                }
            }
            tb_free(ctx, dseqs);
            tb_free(ctx, dq);
            tb_free(ctx, dout);
        }
        free(q);
        free(out);
        free(ref);
        free(sc);
    }
    for (i = 0; i < PG_NSEQ; i++) { free(rk[i]); free(rv[i]); free(pk[i]); free(pv[i]); }
    free(pt);
    free(owner_seq);
    free(owner_pos);
    tb_free(ctx, dkp);
    tb_free(ctx, dvp);
    tb_free(ctx, dpt);
    tb_free(ctx, dkw);
    tb_free(ctx, dvw);
}

static void test_paged_stateless(mustafar_context *ctx)
{
    tb_rng r;
    int i, n = (int)(sizeof k_paged_cases / sizeof k_paged_cases[0]);
    tb_rng_for_test(&r, g_cur_test);
    for (i = 0; i < n; i++) run_paged_case(ctx, &r, &k_paged_cases[i], i);
}
