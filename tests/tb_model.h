/* tb_model.h - a reference model of a mustafar_cache for the tests.

   The model keeps its own copy of every K/V token appended to the cache
   (the dtype bits as given, plus the reference-pruned version), per layer
   and sequence, and computes the expected attention output in float64 on
   the dense pruned cache: positions < length - dense_window are pruned with
   the reference pruner (K with k_sparsity, V with v_sparsity), the newest
   dense_window positions are dense. */

#define TM_MAX_LAYERS 4
#define TM_MAX_SEQS 64

typedef struct tm_seq {
    int id, live, cap;
    int len[TM_MAX_LAYERS];
    uint16_t *raw_k[TM_MAX_LAYERS], *raw_v[TM_MAX_LAYERS];   /* [cap][Hkv][D] */
    uint16_t *pr_k[TM_MAX_LAYERS], *pr_v[TM_MAX_LAYERS];
} tm_seq;

typedef struct tm_model {
    mustafar_context *ctx;
    mustafar_cache *cache;
    mustafar_cache_desc desc;
    int L, hkv, hq, D, W, page, nk, nv;
    float ks, vs;
    mustafar_dtype dt;
    int outlier;                         /* 1: K has 4 channels x20 per head; 2: see tm_gen */
    int out_ch[16][4];
    tb_rng *rng;
    int nseq;
    tm_seq seq[TM_MAX_SEQS];
    /* results of tm_check_attention */
    double max_err, max_prune_effect, sum_prune_effect;
    long checks, effect_n;
} tm_model;

static void tm_desc(mustafar_cache_desc *d, int layers, int hkv, int hq, int D, mustafar_dtype dt,
                    float ks, float vs, int W, int page, int64_t capacity, int max_seqs)
{
    memset(d, 0, sizeof *d);
    d->num_layers = layers;
    d->num_kv_heads = hkv;
    d->num_q_heads = hq;
    d->head_dim = D;
    d->k_sparsity = ks;
    d->v_sparsity = vs;
    d->dense_window = W;
    d->page_size = page;
    d->capacity_tokens = capacity;
    d->max_sequences = max_seqs;
    d->dtype = dt;
}

/* Creates the cache; returns 1 on success (a failure is recorded). */
static int tm_create(tm_model *m, mustafar_context *ctx, tb_rng *rng, const mustafar_cache_desc *d,
                     int outlier)
{
    int h, c;
    memset(m, 0, sizeof *m);
    m->ctx = ctx;
    m->rng = rng;
    m->desc = *d;
    m->L = d->num_layers;
    m->hkv = d->num_kv_heads;
    m->hq = d->num_q_heads ? d->num_q_heads : d->num_kv_heads;
    m->D = d->head_dim ? d->head_dim : 128;
    m->W = d->dense_window;
    m->page = d->page_size ? d->page_size : 16;
    m->ks = d->k_sparsity;
    m->vs = d->v_sparsity;
    m->dt = d->dtype == MUSTAFAR_DTYPE_BF16 ? MUSTAFAR_DTYPE_BF16 : MUSTAFAR_DTYPE_F16;
    m->nk = ref_kept(m->D, m->ks);
    m->nv = ref_kept(m->D, m->vs);
    m->outlier = outlier;
    for (h = 0; h < 16; h++)
        for (c = 0; c < 4; c++) m->out_ch[h][c] = tb_int(rng, 0, m->D - 1);
    if (m->L > TM_MAX_LAYERS) { CHECK(0, "test bug: too many layers"); return 0; }
    if (!CHECK_ST(ctx, mustafar_cache_create(ctx, d, &m->cache), MUSTAFAR_OK)) {
        m->cache = NULL;
        return 0;
    }
    return 1;
}

static void tm_destroy(tm_model *m)
{
    int i, l;
    if (m->cache) mustafar_cache_destroy(m->cache);
    m->cache = NULL;
    for (i = 0; i < m->nseq; i++)
        for (l = 0; l < TM_MAX_LAYERS; l++) {
            free(m->seq[i].raw_k[l]);
            free(m->seq[i].raw_v[l]);
            free(m->seq[i].pr_k[l]);
            free(m->seq[i].pr_v[l]);
        }
    m->nseq = 0;
}

/* Adds a sequence; returns its index in m->seq (or -1). */
static int tm_add(tm_model *m)
{
    int id = -1, i;
    tm_seq *s;
    if (m->nseq >= TM_MAX_SEQS) { CHECK(0, "test bug: too many sequences"); return -1; }
    if (!CHECK_ST(m->ctx, mustafar_cache_add_sequence(m->cache, &id), MUSTAFAR_OK)) return -1;
    for (i = 0; i < m->nseq; i++)
        CHECK(!(m->seq[i].live && m->seq[i].id == id), "add_sequence returned id %d, already live", id);
    s = &m->seq[m->nseq];
    memset(s, 0, sizeof *s);
    s->id = id;
    s->live = 1;
    for (i = 0; i < m->L; i++)
        CHECK(mustafar_cache_sequence_length(m->cache, id, i) == 0,
              "new sequence %d has length %d in layer %d", id, mustafar_cache_sequence_length(m->cache, id, i), i);
    return m->nseq++;
}

static void tm_remove(tm_model *m, int idx)
{
    int l;
    if (CHECK_ST(m->ctx, mustafar_cache_remove_sequence(m->cache, m->seq[idx].id), MUSTAFAR_OK)) {
        m->seq[idx].live = 0;
        for (l = 0; l < TM_MAX_LAYERS; l++) m->seq[idx].len[l] = 0;
    }
}

static int tm_find_live(const tm_model *m, int id)
{
    int i;
    for (i = 0; i < m->nseq; i++)
        if (m->seq[i].live && m->seq[i].id == id) return i;
    return -1;
}

static void tm_reserve(tm_model *m, tm_seq *s, int need)
{
    int l, ncap;
    size_t per = (size_t)m->hkv * m->D;
    if (need <= s->cap) return;
    ncap = s->cap ? s->cap : 16;
    while (ncap < need) ncap *= 2;
    for (l = 0; l < m->L; l++) {
        uint16_t **arrs[4];
        int a;
        arrs[0] = &s->raw_k[l]; arrs[1] = &s->raw_v[l]; arrs[2] = &s->pr_k[l]; arrs[3] = &s->pr_v[l];
        for (a = 0; a < 4; a++) {
            uint16_t *p = TB_NEW(uint16_t, (size_t)ncap * per);
            if (*arrs[a]) memcpy(p, *arrs[a], (size_t)s->cap * per * 2);
            free(*arrs[a]);
            *arrs[a] = p;
        }
    }
    s->cap = ncap;
}

/* Random K (outlier 1, post-RoPE-like: a few channels x20) and V for ntok
   tokens.  outlier 2: K and V both concentrated, as a trained model's are
   (channels below D/4 x20), so that every kept value of a sparse record
   lies in its first bitmap word and the later words are empty. */
static void tm_gen(tm_model *m, uint16_t *k, uint16_t *v, int ntok)
{
    int t, h, c;
    for (t = 0; t < ntok; t++)
        for (h = 0; h < m->hkv; h++)
            for (c = 0; c < m->D; c++) {
                size_t i = ((size_t)t * m->hkv + h) * m->D + c;
                double sc = 1.0, sv = 1.0;
                if (m->outlier == 1 && (c == m->out_ch[h % 16][0] || c == m->out_ch[h % 16][1] ||
                                        c == m->out_ch[h % 16][2] || c == m->out_ch[h % 16][3]))
                    sc = 20.0;
                if (m->outlier == 2 && c < m->D / 4) sc = sv = 20.0;
                k[i] = tb_d2h(m->dt, sc * tb_normal(m->rng));
                v[i] = tb_d2h(m->dt, sv * tb_normal(m->rng));
            }
}

/* A decode step's query side: q [n][Hq][D] (host), out_host receives the
   output (poisoned before the call, downloaded even when it fails). */
typedef struct tm_query {
    const uint16_t *q;
    uint16_t *out_host;
    float scale;
    int null_q;
    int busy;    /* attention calls queued just before the step, which the GPU
                    still runs when the step's kernels are queued */
} tm_query;

/* Appends to sequence ids (arbitrary, possibly invalid) with ntok[i]
   tokens each (negative counts get no data); on MUSTAFAR_OK the tokens are
   recorded in the model.  kdev/vdev may be overridden to test NULL.  With
   a query, the call is mustafar_cache_decode_step instead. */
static mustafar_status tm_append_query(tm_model *m, int layer, int n, const int *ids, const int *ntok,
                                       int null_k, int null_v, const tm_query *query)
{
    int total = 0, i, off;
    size_t per = (size_t)m->hkv * m->D, qbytes = (size_t)(n > 0 ? n : 1) * m->hq * m->D * 2;
    uint16_t *k, *v;
    void *dk, *dv, *dq = NULL, *dout = NULL, *dbusy;
    mustafar_status st;
    for (i = 0; i < n; i++)
        if (ntok && ntok[i] > 0) total += ntok[i];
    k = TB_NEW(uint16_t, (size_t)total * per);
    v = TB_NEW(uint16_t, (size_t)total * per);
    tm_gen(m, k, v, total);
    dk = tb_dup(m->ctx, k, (size_t)total * per * 2);
    dv = tb_dup(m->ctx, v, (size_t)total * per * 2);
    if (query) {
        dq = tb_alloc(m->ctx, qbytes);
        dout = tb_alloc(m->ctx, qbytes);
        if (n > 0) tb_upload(m->ctx, dq, query->q, qbytes);
        tb_poison(m->ctx, dout, qbytes);
        dbusy = query->busy ? tb_alloc(m->ctx, qbytes) : NULL;
        for (i = 0; i < query->busy; i++)
            CHECK_ST(m->ctx, mustafar_cache_attention(m->cache, layer, n, ids, dq, dbusy, 0.0f), MUSTAFAR_OK);
        st = mustafar_cache_decode_step(m->cache, layer, n, ids, ntok, null_k ? NULL : dk,
                                        null_v ? NULL : dv, query->null_q ? NULL : dq, dout,
                                        query->scale);
        tb_download(m->ctx, query->out_host, dout, qbytes);
        tb_free(m->ctx, dq);
        tb_free(m->ctx, dout);
        if (dbusy) tb_free(m->ctx, dbusy);
    } else {
        st = mustafar_cache_append(m->cache, layer, n, ids, ntok, null_k ? NULL : dk, null_v ? NULL : dv);
    }
    if (st == MUSTAFAR_OK) {
        for (i = 0, off = 0; i < n; i++) {
            int idx = tm_find_live(m, ids[i]), t;
            tm_seq *s;
            if (idx < 0) { CHECK(0, "append of unknown sequence %d succeeded", ids[i]); continue; }
            s = &m->seq[idx];
            tm_reserve(m, s, s->len[layer] + ntok[i]);
            for (t = 0; t < ntok[i]; t++, off++) {
                int h;
                size_t dst = (size_t)(s->len[layer] + t) * per, src = (size_t)off * per;
                memcpy(s->raw_k[layer] + dst, k + src, per * 2);
                memcpy(s->raw_v[layer] + dst, v + src, per * 2);
                for (h = 0; h < m->hkv; h++) {
                    ref_prune_vec(k + src + (size_t)h * m->D, m->D, m->nk, s->pr_k[layer] + dst + (size_t)h * m->D);
                    ref_prune_vec(v + src + (size_t)h * m->D, m->D, m->nv, s->pr_v[layer] + dst + (size_t)h * m->D);
                }
            }
            s->len[layer] += ntok[i];
        }
    }
    tb_free(m->ctx, dk);
    tb_free(m->ctx, dv);
    free(k);
    free(v);
    return st;
}

static mustafar_status tm_append_ex(tm_model *m, int layer, int n, const int *ids, const int *ntok,
                                    int null_k, int null_v)
{
    return tm_append_query(m, layer, n, ids, ntok, null_k, null_v, NULL);
}

/* Appends by model index; expects success. */
static int tm_append(tm_model *m, int layer, int n, const int *idx, const int *ntok)
{
    int ids[TM_MAX_SEQS], i;
    for (i = 0; i < n; i++) ids[i] = m->seq[idx[i]].id;
    return CHECK_ST(m->ctx, tm_append_ex(m, layer, n, ids, ntok, 0, 0), MUSTAFAR_OK);
}

/* Reference output of one sequence and layer for q [Hq][D] into out
   [Hq][D]; pruned = 0 gives the reference without pruning. */
static void tm_ref(const tm_model *m, int layer, int idx, const uint16_t *q, double scale, int pruned,
                   double *out)
{
    const tm_seq *s = &m->seq[idx];
    int Lt = s->len[layer], nc = Lt - m->W, h, t, g = m->hq / m->hkv;
    const uint16_t **kp = (const uint16_t **)tb_xmalloc(sizeof(uint16_t *) * (size_t)(Lt + 1));
    const uint16_t **vp = (const uint16_t **)tb_xmalloc(sizeof(uint16_t *) * (size_t)(Lt + 1));
    double *sc = TB_NEW(double, Lt + 1);
    size_t per = (size_t)m->hkv * m->D;
    if (scale == 0.0) scale = 1.0 / sqrt((double)m->D);
    for (h = 0; h < m->hq; h++) {
        int kvh = h / g;
        for (t = 0; t < Lt; t++) {
            size_t o = (size_t)t * per + (size_t)kvh * m->D;
            int comp = pruned && t < nc;
            kp[t] = (comp ? s->pr_k[layer] : s->raw_k[layer]) + o;
            vp[t] = (comp ? s->pr_v[layer] : s->raw_v[layer]) + o;
        }
        ref_attend(m->dt, m->D, q + (size_t)h * m->D, Lt, kp, vp, scale, sc, out + (size_t)h * m->D);
    }
    free((void *)kp);
    free((void *)vp);
    free(sc);
}

/* Runs mustafar_cache_attention (poisoned output) and downloads the output
   into out_host even when it fails (callers check it is untouched). */
static mustafar_status tm_attention_raw(tm_model *m, int layer, int n, const int *ids, const uint16_t *q,
                                        uint16_t *out_host, float scale, int null_q, int null_out)
{
    size_t bytes = (size_t)(n > 0 ? n : 1) * m->hq * m->D * 2;
    void *dq = tb_alloc(m->ctx, bytes), *dout = tb_alloc(m->ctx, bytes);
    mustafar_status st;
    if (n > 0) tb_upload(m->ctx, dq, q, bytes);
    tb_poison(m->ctx, dout, bytes);
    st = mustafar_cache_attention(m->cache, layer, n, ids, null_q ? NULL : dq, null_out ? NULL : dout, scale);
    tb_download(m->ctx, out_host, dout, bytes);
    tb_free(m->ctx, dq);
    tb_free(m->ctx, dout);
    return st;
}

/* Compares outputs [n][Hq][D] of the model sequences idx[] with the
   reference; empty sequences must give exact zeros. */
static void tm_compare(tm_model *m, int layer, int n, const int *idx, const uint16_t *q,
                       const uint16_t *out, float scale, const char *what)
{
    size_t per = (size_t)m->hq * m->D;
    double *ref = TB_NEW(double, per), *refd = TB_NEW(double, per);
    double tol = tb_attn_tol(m->dt);
    int i, h;
    for (i = 0; i < n; i++) {
        const tm_seq *s = &m->seq[idx[i]];
        const uint16_t *o = out + (size_t)i * per;
        if (s->len[layer] == 0) {
            size_t e;
            for (e = 0; e < per; e++)
                if (tb_h2d(m->dt, o[e]) != 0.0) break;
            CHECK(e == per, "%s: layer %d seq %d (empty): output element %zu is 0x%04X, expected 0",
                  what, layer, s->id, e, e < per ? o[e] : 0);
            continue;
        }
        tm_ref(m, layer, idx[i], q + (size_t)i * per, (double)scale, 1, ref);
        tm_ref(m, layer, idx[i], q + (size_t)i * per, (double)scale, 0, refd);
        for (h = 0; h < m->hq; h++) {
            int nans = 0;
            double e = tb_rel_err(m->dt, o + (size_t)h * m->D, ref + (size_t)h * m->D, m->D, &nans);
            double pe = tb_rel_diff(ref + (size_t)h * m->D, refd + (size_t)h * m->D, m->D);
            if (e > m->max_err) m->max_err = e;
            if (pe > m->max_prune_effect) m->max_prune_effect = pe;
            m->sum_prune_effect += pe;
            m->effect_n++;
            CHECK(nans == 0, "%s: layer %d seq %d (len %d) head %d: %d output elements NaN (unwritten?)",
                  what, layer, s->id, s->len[layer], h, nans);
            CHECK(nans > 0 || e <= tol, "%s: layer %d seq %d (len %d) head %d: relative error %.3g > %.3g",
                  what, layer, s->id, s->len[layer], h, e, tol);
        }
    }
    m->checks++;
    free(ref);
    free(refd);
}

/* Fresh q, attention over idx[] (model indices), compare. */
static void tm_check_attention(tm_model *m, int layer, int n, const int *idx, float scale, const char *what)
{
    size_t per = (size_t)m->hq * m->D;
    uint16_t *q = TB_NEW(uint16_t, (size_t)(n + 1) * per), *out = TB_NEW(uint16_t, (size_t)(n + 1) * per);
    int ids[TM_MAX_SEQS], i;
    for (i = 0; i < n; i++) ids[i] = m->seq[idx[i]].id;
    tb_fill_normal(m->rng, m->dt, q, (size_t)n * per, 1.0);
    if (CHECK_ST(m->ctx, tm_attention_raw(m, layer, n, ids, q, out, scale, 0, 0), MUSTAFAR_OK))
        tm_compare(m, layer, n, idx, q, out, scale, what);
    free(q);
    free(out);
}

/* A decode step by model index: ntok[i] tokens each (NULL: one), a fresh
   q, `busy` attention calls queued first, mustafar_cache_decode_step, and
   its output compared with the reference over the grown sequences.
   Expects success. */
static void tm_step(tm_model *m, int layer, int n, const int *idx, const int *ntok, int busy,
                    const char *what)
{
    size_t per = (size_t)m->hq * m->D;
    uint16_t *q = TB_NEW(uint16_t, (size_t)(n + 1) * per), *out = TB_NEW(uint16_t, (size_t)(n + 1) * per);
    int ids[TM_MAX_SEQS], ones[TM_MAX_SEQS], i;
    tm_query query;
    for (i = 0; i < n; i++) {
        ids[i] = m->seq[idx[i]].id;
        ones[i] = 1;
    }
    tb_fill_normal(m->rng, m->dt, q, (size_t)n * per, 1.0);
    query.q = q;
    query.out_host = out;
    query.scale = 0.0f;
    query.null_q = 0;
    query.busy = busy;
    if (CHECK_ST(m->ctx, tm_append_query(m, layer, n, ids, ntok ? ntok : ones, 0, 0, &query), MUSTAFAR_OK))
        tm_compare(m, layer, n, idx, q, out, 0.0f, what);
    free(q);
    free(out);
}

/* All live sequences (shuffled) of every layer. */
static void tm_check_all(tm_model *m, float scale, const char *what)
{
    int idx[TM_MAX_SEQS], n = 0, i, l;
    for (i = 0; i < m->nseq; i++)
        if (m->seq[i].live) idx[n++] = i;
    for (l = 0; l < m->L; l++) {
        tb_shuffle_int(m->rng, idx, n);
        tm_check_attention(m, l, n, idx, scale, what);
    }
}

/* ---- snapshots: everything observable about a cache ------------------- */

typedef struct tm_snap {
    int len[TM_MAX_SEQS][TM_MAX_LAYERS];
    mustafar_cache_stats st;
    mustafar_status st_status;
    int n, ids[TM_MAX_SEQS];
    uint16_t *out[TM_MAX_LAYERS];
} tm_snap;

/* q: [TM_MAX_SEQS][Hq][D], fixed across the snapshots compared. */
static void tm_snapshot(tm_model *m, tm_snap *sn, const uint16_t *q)
{
    int i, l;
    size_t per = (size_t)m->hq * m->D;
    memset(sn, 0, sizeof *sn);
    for (i = 0; i < m->nseq; i++)
        for (l = 0; l < m->L; l++) sn->len[i][l] = mustafar_cache_sequence_length(m->cache, m->seq[i].id, l);
    sn->st_status = mustafar_cache_stats_get(m->cache, &sn->st);
    for (i = 0; i < m->nseq; i++)
        if (m->seq[i].live) sn->ids[sn->n++] = m->seq[i].id;
    for (l = 0; l < m->L; l++) {
        sn->out[l] = TB_NEW(uint16_t, (size_t)(sn->n + 1) * per);
        CHECK_ST(m->ctx, tm_attention_raw(m, l, sn->n, sn->ids, q, sn->out[l], 0.0f, 0, 0), MUSTAFAR_OK);
    }
}
static void tm_snap_free(tm_snap *sn)
{
    int l;
    for (l = 0; l < TM_MAX_LAYERS; l++) free(sn->out[l]);
    memset(sn, 0, sizeof *sn);
}
/* Reports every difference between two snapshots (after a failed call). */
static void tm_snap_compare(tm_model *m, const tm_snap *a, const tm_snap *b, const char *what)
{
    int i, l;
    size_t per = (size_t)m->hq * m->D;
    for (i = 0; i < m->nseq; i++)
        for (l = 0; l < m->L; l++)
            CHECK(a->len[i][l] == b->len[i][l], "after %s: sequence %d layer %d length %d -> %d", what,
                  m->seq[i].id, l, a->len[i][l], b->len[i][l]);
    CHECK(a->st_status == b->st_status && a->st.sequences == b->st.sequences &&
          a->st.pages_used == b->st.pages_used && a->st.pages_total == b->st.pages_total &&
          a->st.token_vectors == b->st.token_vectors &&
          a->st.compressed_vectors == b->st.compressed_vectors &&
          a->st.record_bytes == b->st.record_bytes && a->st.reserved_bytes == b->st.reserved_bytes &&
          a->st.dense_bytes == b->st.dense_bytes,
          "after %s: stats changed (pages_used %" PRId64 " -> %" PRId64 ", token_vectors %" PRId64
          " -> %" PRId64 ", sequences %d -> %d)", what, a->st.pages_used, b->st.pages_used,
          a->st.token_vectors, b->st.token_vectors, a->st.sequences, b->st.sequences);
    CHECK(a->n == b->n, "after %s: live sequences %d -> %d", what, a->n, b->n);
    if (a->n != b->n) return;
    for (l = 0; l < m->L; l++) {
        int d = first_diff16(a->out[l], b->out[l], (size_t)a->n * per);
        CHECK(d < 0, "after %s: attention output of layer %d changed (sequence %d, element %d)", what, l,
              d >= 0 ? a->ids[(size_t)d / per] : 0, d >= 0 ? (int)((size_t)d % per) : 0);
    }
}
