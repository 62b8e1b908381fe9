/* test_gpu_faults.h - the CUDA backend when device or pinned memory runs out:
   a pool larger than the GPU's memory, and cudaMalloc / cudaMallocHost
   failing in the middle of an append (each allocation point in turn).  The
   test swaps the context's runtime functions for counting ones (it is
   compiled with the implementation, so the table is reachable). */

typedef mustafar__cudaError(MUSTAFAR__CUDAAPI *tg_malloc_fn)(void **, size_t);
static tg_malloc_fn g_tg_malloc, g_tg_malloc_host;
static int g_tg_calls, g_tg_fail_at;

static mustafar__cudaError tg_count(void **p, size_t bytes, tg_malloc_fn real)
{
    if (++g_tg_calls == g_tg_fail_at) {
        *p = NULL;
        return (mustafar__cudaError)2; /* cudaErrorMemoryAllocation */
    }
    return real(p, bytes);
}
static mustafar__cudaError MUSTAFAR__CUDAAPI tg_malloc(void **p, size_t bytes)
{
    return tg_count(p, bytes, g_tg_malloc);
}
static mustafar__cudaError MUSTAFAR__CUDAAPI tg_malloc_host(void **p, size_t bytes)
{
    return tg_count(p, bytes, g_tg_malloc_host);
}

/* Counts (and with fail_at > 0 fails the fail_at-th of) the context's
   device and pinned allocations from now on. */
static void tg_arm(mustafar_context *ctx, int fail_at)
{
    mustafar__cudart_api *rt = &ctx->cuda->api.rt;
    if (rt->Malloc != tg_malloc) {
        g_tg_malloc = rt->Malloc;
        g_tg_malloc_host = rt->MallocHost;
        rt->Malloc = tg_malloc;
        rt->MallocHost = tg_malloc_host;
    }
    g_tg_calls = 0;
    g_tg_fail_at = fail_at;
}
static void tg_disarm(mustafar_context *ctx)
{
    mustafar__cudart_api *rt = &ctx->cuda->api.rt;
    if (rt->Malloc == tg_malloc) {
        rt->Malloc = g_tg_malloc;
        rt->MallocHost = g_tg_malloc_host;
    }
    g_tg_fail_at = 0;
}

/* Drops the context's device scratch and pinned staging, so that the next
   call that needs them allocates them again. */
static void tg_drop_scratch(mustafar_context *ctx)
{
    mustafar__cuda *cu = ctx->cuda;
    cu->api.rt.StreamSynchronize(cu->stream);
    if (cu->scratch) cu->api.rt.Free(cu->scratch);
    if (cu->staging) cu->api.rt.FreeHost(cu->staging);
    cu->scratch = cu->staging = NULL;
    cu->scratch_bytes = cu->staging_bytes = 0;
}

static void test_gpu_faults(mustafar_context *unused)
{
    mustafar_context_desc cd;
    mustafar_context *ctx = NULL;
    mustafar_cache_desc d;
    mustafar_cache *c = NULL;
    size_t free_bytes = 0, total_bytes = 0, per_token;
    tb_rng r;
    tm_model m;
    tm_snap before, after;
    uint16_t *q = NULL, *k = NULL, *v = NULL;
    void *dk = NULL, *dv = NULL;
    int idx[3] = {0, 1, 2}, ids[3], fill[3] = {40, 9, 75}, grow[3] = {700, 1, 900};
    int i, n, clean_calls = 0, total = 0;
    (void)unused;
    memset(&cd, 0, sizeof cd);
    cd.backend = MUSTAFAR_BACKEND_CUDA;
    if (!CHECK_ST(NULL, mustafar_context_create(&cd, &ctx), MUSTAFAR_OK)) return;
    if (ctx->cuda->api.rt.MemGetInfo(&free_bytes, &total_bytes) != 0) {
        CHECK(0, "cudaMemGetInfo failed");
        mustafar_context_destroy(ctx);
        return;
    }

    /* 1. A pool larger than the GPU: the K pool (0.6x of the device) fits,
       the V pool then does not.  Clear status and message; the K pool is
       released (a cache of 0.8x of the device fits right after). */
    memset(&d, 0, sizeof d);
    d.num_layers = 32; d.num_kv_heads = 8; d.head_dim = 128;
    d.k_sparsity = d.v_sparsity = 0.0f;   /* 272-byte records */
    per_token = (size_t)d.num_layers * d.num_kv_heads * 272;
    d.capacity_tokens = (int64_t)(0.6 * (double)total_bytes / (double)per_token);
    CHECK_ST(ctx, mustafar_cache_create(ctx, &d, &c), MUSTAFAR_ERROR_OUT_OF_MEMORY);
    CHECK(c == NULL, "a failed cache_create left a cache");
    CHECK(strstr(mustafar_last_error(ctx), "cudaMalloc") && strstr(mustafar_last_error(ctx), "free"),
          "pool too large: last_error '%s'", mustafar_last_error(ctx));
    tb_info("pool of %.1f GB on a %.1f GB device: %s", 1.2 * (double)total_bytes / 1e9,
            (double)total_bytes / 1e9, mustafar_last_error(ctx));
    d.capacity_tokens = (int64_t)(0.4 * (double)free_bytes / (double)per_token);
    if (CHECK_ST(ctx, mustafar_cache_create(ctx, &d, &c), MUSTAFAR_OK)) mustafar_cache_destroy(c);
    c = NULL;

    /* 2. cudaMalloc or cudaMallocHost failing at each allocation point of an
       append that needs scratch and staging (job and page lists in global
       memory: the parameter-block paths are turned off for this context). */
    tb_rng_for_test(&r, g_cur_test);
    tm_desc(&d, 2, 2, 8, 128, MUSTAFAR_DTYPE_F16, 0.7f, 0.5f, 16, 16, 4096, 4);
    if (!tm_create(&m, ctx, &r, &d, 1)) { mustafar_context_destroy(ctx); return; }
    for (i = 0; i < 3; i++) ids[i] = m.seq[tm_add(&m)].id;
    tm_append(&m, 0, 3, idx, fill);
    tm_append(&m, 1, 3, idx, fill);
    ctx->cuda->wide_params = 0;
    for (i = 0; i < 3; i++) total += grow[i];
    k = TB_NEW(uint16_t, (size_t)total * m.hkv * m.D);
    v = TB_NEW(uint16_t, (size_t)total * m.hkv * m.D);
    q = TB_NEW(uint16_t, (size_t)TM_MAX_SEQS * m.hq * m.D);
    tm_gen(&m, k, v, total);
    tb_fill_normal(&r, m.dt, q, (size_t)3 * m.hq * m.D, 1.0);
    dk = tb_dup(ctx, k, (size_t)total * m.hkv * m.D * 2);
    dv = tb_dup(ctx, v, (size_t)total * m.hkv * m.D * 2);
    tm_snapshot(&m, &before, q);
    for (n = 1; n < 16; n++) {
        mustafar_status st;
        tg_drop_scratch(ctx);
        tg_arm(ctx, n);
        st = mustafar_cache_append(m.cache, 0, 3, ids, grow, dk, dv);
        clean_calls = g_tg_calls;
        tg_disarm(ctx);
        if (st == MUSTAFAR_OK) break;
        CHECK(st == MUSTAFAR_ERROR_OUT_OF_MEMORY, "allocation %d failed: status %s (%s)", n,
              tb_sname(st), mustafar_last_error(ctx));
        CHECK(strstr(mustafar_last_error(ctx), "cudaMalloc") != NULL, "allocation %d failed: last_error '%s'",
              n, mustafar_last_error(ctx));
        tm_snapshot(&m, &after, q);
        tm_snap_compare(&m, &before, &after, "a failed device allocation in an append");
        tm_snap_free(&after);
    }
    tb_info("append with its lists in global memory: %d device/pinned allocations, each failed in turn",
            n - 1);
    CHECK(n >= 3, "only %d allocation points were reached (scratch and staging expected)", n - 1);
    CHECK(n < 16 && clean_calls == n - 1, "the append did not succeed once no allocation failed (%d calls)",
          clean_calls);
    /* the append that went through is the model's too */
    if (n < 16) {
        size_t per = (size_t)m.hkv * m.D;
        int off = 0, t, h;
        for (i = 0; i < 3; i++) {
            tm_seq *s = &m.seq[idx[i]];
            tm_reserve(&m, s, s->len[0] + grow[i]);
            for (t = 0; t < grow[i]; t++, off++) {
                size_t dst = (size_t)(s->len[0] + t) * per, src = (size_t)off * per;
                memcpy(s->raw_k[0] + dst, k + src, per * 2);
                memcpy(s->raw_v[0] + dst, v + src, per * 2);
                for (h = 0; h < m.hkv; h++) {
                    ref_prune_vec(k + src + (size_t)h * m.D, m.D, m.nk, s->pr_k[0] + dst + (size_t)h * m.D);
                    ref_prune_vec(v + src + (size_t)h * m.D, m.D, m.nv, s->pr_v[0] + dst + (size_t)h * m.D);
                }
            }
            s->len[0] += grow[i];
        }
        tm_check_all(&m, 0.0f, "after the failed appends, the one that succeeded");
        tm_step(&m, 1, 3, idx, NULL, 0, "a decode step after them");
    }
    tm_snap_free(&before);
    tb_free(ctx, dk);
    tb_free(ctx, dv);
    free(k);
    free(v);
    free(q);
    tm_destroy(&m);
    mustafar_context_destroy(ctx);
}
