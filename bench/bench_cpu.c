/* CPU decode-attention and prefill-compression benchmark of mustafar.h.

   bench_cpu [--quick] [--target] [--min] [--cpu-time] [--reps N]
   (--target: only B=1, T=32k, the shape of the targets; MUSTAFAR_CPU_SIMD
   picks the SIMD path)

   Decode attention of one layer, one query token per sequence: B sequences
   of T tokens, Hq=32, Hkv=8, D=128, fp16, every token in records (no dense
   window), through mustafar_paged_attention on a CPU context with one thread
   and with all cores.  Each shape rotates over enough copies of its cache
   that one pass touches at least 512 MB, so the timings read memory, not the
   last-level cache.  Beside it: a dense fp16 decode attention written the way
   a user would (each K/V row read once per KV head for its 4 query heads,
   F16C conversion, AVX2 FMAs, online softmax over blocks, the same split
   over (sequence, KV head, tokens)), and memcpy's bandwidth measured in the
   same run.  GB/s count the record (or dense) bytes read; "% memcpy" divides
   that by memcpy's read bandwidth with the same thread count.  Then prefill
   compression (mustafar_compress of one layer's K and V, 32k tokens).
   Times are the median of --reps calls (default 7) after one warm-up call. */
#define _POSIX_C_SOURCE 200809L
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"

#include <stdlib.h>
#include <time.h>
#include <pthread.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define BENCH_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#define HQ 32
#define HKV 8
#define D 128
#define G (HQ / HKV)
#define PAGE 16
#define BLOCK 32
#define ROTATE_BYTES ((size_t)512 << 20)

#define CHECK(ctx, x)                                                                      \
    do {                                                                                   \
        mustafar_status s_ = (x);                                                          \
        if (s_ != MUSTAFAR_OK) {                                                           \
            fprintf(stderr, "%s:%d: %s: %s: %s\n", __FILE__, __LINE__, #x,                 \
                    mustafar_status_string(s_), mustafar_last_error(ctx));                 \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float rng_normal(void)
{
    uint64_t r = rng_next();
    float s = 0.0f;
    int i;
    for (i = 0; i < 4; i++) s += (float)((r >> (16 * i)) & 0xFFFF) / 65536.0f;
    return (s - 2.0f) * 1.7320508f;
}
/* --cpu-time: the process's CPU time instead of the wall clock, for a
   machine shared with other load (one thread: the time the call ran; all
   threads: the sum over them) */
static int g_cpu_time;
static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(g_cpu_time ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p) { fprintf(stderr, "out of memory (%zu bytes)\n", n); exit(1); }
    return p;
}
static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static int g_fastest; /* --min: the fastest call (a machine shared with other load) */

static double median(double *t, int n)
{
    qsort(t, (size_t)n, sizeof *t, cmp_double);
    return g_fastest ? t[0] : t[n / 2];
}

/* ---- the baseline's threads: one pthread per extra thread per call ---------- */

typedef struct run_arg { void (*fn)(void *, int, int); void *data; int tid, nthreads; } run_arg;
static void *run_thread(void *p)
{
    run_arg *a = (run_arg *)p;
    a->fn(a->data, a->tid, a->nthreads);
    return NULL;
}
static void run_threads(void (*fn)(void *, int, int), void *data, int nthreads)
{
    pthread_t th[256];
    run_arg args[256];
    int t;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    for (t = 0; t < nthreads; t++) {
        args[t].fn = fn; args[t].data = data; args[t].tid = t; args[t].nthreads = nthreads;
        if (t && pthread_create(&th[t], NULL, run_thread, &args[t])) { fprintf(stderr, "pthread_create\n"); exit(1); }
    }
    run_thread(&args[0]);
    for (t = 1; t < nthreads; t++) pthread_join(th[t], NULL);
}

/* ---- memcpy bandwidth -------------------------------------------------------- */

typedef struct copy_job { unsigned char *dst; const unsigned char *src; size_t bytes; } copy_job;
static void copy_part(void *p, int tid, int n)
{
    copy_job *c = (copy_job *)p;
    size_t part = c->bytes / (size_t)n / 64 * 64, first = part * (size_t)tid;
    memcpy(c->dst + first, c->src + first, tid == n - 1 ? c->bytes - first : part);
}
/* Bytes read per second by memcpy of 512 MB. */
static double memcpy_bandwidth(int nthreads, int reps)
{
    copy_job c;
    double t[64];
    int r;
    c.bytes = ROTATE_BYTES;
    c.src = (const unsigned char *)xmalloc(c.bytes);
    c.dst = (unsigned char *)xmalloc(c.bytes);
    memset((void *)c.src, 1, c.bytes);
    memset(c.dst, 2, c.bytes);
    for (r = 0; r <= reps; r++) {
        double t0 = now_seconds();
        run_threads(copy_part, &c, nthreads);
        if (r) t[r - 1] = now_seconds() - t0;
    }
    free((void *)c.src);
    free(c.dst);
    return (double)c.bytes / median(t, reps);
}

/* ---- dense fp16 baseline ----------------------------------------------------- */

typedef struct dense_job {
    const uint16_t *k, *v;          /* [rows][HKV][T][D] */
    const uint16_t *q;              /* [B][HQ][D] */
    uint16_t *out;
    int B, T, row0, splits, chunk;
    float scale;
    float *part;                    /* per item: acc[G][D], max[G], sum[G] */
} dense_job;
#define DENSE_ITEM_FLOATS (G * D + 2 * G)

#if defined(__x86_64__)
BENCH_AVX2 static void dense_exp(float *x)
{
    int t;
    for (t = 0; t < BLOCK; t += 8) {
        __m256 v = _mm256_max_ps(_mm256_loadu_ps(x + t), _mm256_set1_ps(-87.0f));
        __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
        __m256 p = _mm256_set1_ps(1.0f / 720.0f);
        r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
        _mm256_storeu_ps(x + t, _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))));
    }
}

BENCH_AVX2 static void dense_item(const dense_job *J, int item)
{
    const int b = item / (HKV * J->splits), h = item / J->splits % HKV, sp = item % J->splits;
    const int first = sp * J->chunk, end = first + J->chunk < J->T ? first + J->chunk : J->T;
    const size_t head = ((size_t)(J->row0 + b) * HKV + h) * J->T;
    float *acc = J->part + (size_t)item * DENSE_ITEM_FLOATS, *mx = acc + G * D, *sum = mx + G;
    float qf[G][D], sc[G][BLOCK];
    int g, c, t, tb, j;
    for (g = 0; g < G; g++) {
        const uint16_t *qh = J->q + ((size_t)b * HQ + h * G + g) * D;
        for (c = 0; c < D; c++) qf[g][c] = mustafar_f16_to_f32(qh[c]) * J->scale;
        mx[g] = -INFINITY;
        sum[g] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * G * D);
    for (tb = first; tb < end; tb += BLOCK) {
        const int nb = end - tb < BLOCK ? end - tb : BLOCK;
        for (t = 0; t < nb; t++) {
            const uint16_t *kr = J->k + (head + (size_t)(tb + t)) * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, hs;
            __m128 s;
            float o[4];
            for (j = 0; j < D / 8; j++) {
                __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(kr + 8 * j)));
                a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(qf[0] + 8 * j), a0);
                a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(qf[1] + 8 * j), a1);
                a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(qf[2] + 8 * j), a2);
                a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(qf[3] + 8 * j), a3);
            }
            hs = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            s = _mm_add_ps(_mm256_castps256_ps128(hs), _mm256_extractf128_ps(hs, 1));
            _mm_storeu_ps(o, s);
            for (g = 0; g < G; g++) sc[g][t] = o[g];
        }
        for (g = 0; g < G; g++) {
            float m = mx[g];
            for (t = 0; t < nb; t++) if (sc[g][t] > m) m = sc[g][t];
            if (m != mx[g]) {
                float corr = expf(mx[g] - m);
                for (c = 0; c < D; c++) acc[g * D + c] *= corr;
                sum[g] *= corr;
                mx[g] = m;
            }
            for (t = 0; t < nb; t++) sc[g][t] -= m;
            for (; t < BLOCK; t++) sc[g][t] = -INFINITY;
            dense_exp(sc[g]);
            for (t = 0; t < nb; t++) sum[g] += sc[g][t];
        }
        for (t = 0; t < nb; t++) {
            const uint16_t *vr = J->v + (head + (size_t)(tb + t)) * D;
            const __m256 w0 = _mm256_set1_ps(sc[0][t]), w1 = _mm256_set1_ps(sc[1][t]);
            const __m256 w2 = _mm256_set1_ps(sc[2][t]), w3 = _mm256_set1_ps(sc[3][t]);
            for (j = 0; j < D / 8; j++) {
                __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(vr + 8 * j)));
                float *a = acc + 8 * j;
                _mm256_storeu_ps(a, _mm256_fmadd_ps(w0, x, _mm256_loadu_ps(a)));
                _mm256_storeu_ps(a + D, _mm256_fmadd_ps(w1, x, _mm256_loadu_ps(a + D)));
                _mm256_storeu_ps(a + 2 * D, _mm256_fmadd_ps(w2, x, _mm256_loadu_ps(a + 2 * D)));
                _mm256_storeu_ps(a + 3 * D, _mm256_fmadd_ps(w3, x, _mm256_loadu_ps(a + 3 * D)));
            }
        }
    }
}
#endif

static void dense_part(void *p, int tid, int n)
{
    const dense_job *J = (const dense_job *)p;
    int items = J->B * HKV * J->splits, i;
    for (i = tid; i < items; i += n) {
#if defined(__x86_64__)
        dense_item(J, i);
#endif
    }
}

static void dense_attention(dense_job *J, int nthreads)
{
    int b, h, g, c, sp;
    run_threads(dense_part, J, nthreads);
    for (b = 0; b < J->B; b++)
        for (h = 0; h < HKV; h++)
            for (g = 0; g < G; g++) {
                const float *part = J->part + (size_t)(b * HKV + h) * J->splits * DENSE_ITEM_FLOATS;
                float m = -INFINITY, s = 0.0f, r[D];
                for (sp = 0; sp < J->splits; sp++)
                    if (part[sp * DENSE_ITEM_FLOATS + G * D + g] > m) m = part[sp * DENSE_ITEM_FLOATS + G * D + g];
                for (c = 0; c < D; c++) r[c] = 0.0f;
                for (sp = 0; sp < J->splits; sp++) {
                    const float *ps = part + sp * DENSE_ITEM_FLOATS;
                    float w = expf(ps[G * D + g] - m);
                    s += ps[G * D + G + g] * w;
                    for (c = 0; c < D; c++) r[c] += ps[g * D + c] * w;
                }
                for (c = 0; c < D; c++)
                    J->out[((size_t)b * HQ + h * G + g) * D + c] = mustafar_f32_to_f16(r[c] / s);
            }
}

/* ---- one shape ----------------------------------------------------------------- */

static int g_reps = 7;
static double g_copy[2];            /* memcpy read bytes/s: [0] one thread, [1] all */
static int g_cores;

static void fill_f16(uint16_t *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = mustafar_f32_to_f16(rng_normal());
}

static void bench_shape(int B, int T, float s, double *dense_ms)
{
    const size_t rec = mustafar_record_bytes(D, s, MUSTAFAR_DTYPE_F16);
    const size_t call_bytes = (size_t)B * T * HKV * 2 * rec;
    const int pages_per_seq = (T + PAGE - 1) / PAGE;
    int copies = (int)((ROTATE_BYTES + call_bytes - 1) / call_bytes), rows, p, i, th;
    uint16_t *src = (uint16_t *)xmalloc((size_t)PAGE * D * 2 * 64), *q, *out;
    mustafar_paged_kv kv;
    mustafar_paged_seq *seqs;
    int32_t *table;
    double ms[2];
    if (copies < 1) copies = 1;
    rows = copies * B;
    fill_f16(src, (size_t)PAGE * D * 64);
    memset(&kv, 0, sizeof kv);
    kv.head_dim = D; kv.dtype = MUSTAFAR_DTYPE_F16; kv.k_sparsity = s; kv.v_sparsity = s;
    kv.num_kv_heads = HKV; kv.num_q_heads = HQ; kv.page_size = PAGE;
    kv.num_rows = rows; kv.num_pages = rows * pages_per_seq; kv.page_table_stride = pages_per_seq;
    kv.k_pages = xmalloc((size_t)kv.num_pages * HKV * PAGE * rec);
    kv.v_pages = xmalloc((size_t)kv.num_pages * HKV * PAGE * rec);
    table = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)kv.num_pages);
    for (p = 0; p < kv.num_pages; p++) table[p] = p;
    kv.page_table = table;
    /* records of 64 different page-size runs of random vectors, reused */
    for (p = 0; p < kv.num_pages * HKV; p++) {
        const uint16_t *x = src + (size_t)(p % 64) * PAGE * D;
        CHECK(NULL, mustafar_compress(NULL, D, s, MUSTAFAR_DTYPE_F16, x,
                                      (unsigned char *)kv.k_pages + (size_t)p * PAGE * rec, PAGE));
        CHECK(NULL, mustafar_compress(NULL, D, s, MUSTAFAR_DTYPE_F16, src + (size_t)((p + 7) % 64) * PAGE * D,
                                      (unsigned char *)kv.v_pages + (size_t)p * PAGE * rec, PAGE));
    }
    seqs = (mustafar_paged_seq *)xmalloc(sizeof *seqs * (size_t)rows);
    for (i = 0; i < rows; i++) { seqs[i].row = i; seqs[i].num_compressed = T; seqs[i].num_window = 0; seqs[i].reserved = 0; }
    q = (uint16_t *)xmalloc((size_t)B * HQ * D * 2);
    out = (uint16_t *)xmalloc((size_t)B * HQ * D * 2);
    fill_f16(q, (size_t)B * HQ * D);
    for (th = 0; th < 2; th++) {
        mustafar_context_desc cd;
        mustafar_context *ctx;
        double t[64];
        int r;
        memset(&cd, 0, sizeof cd);
        cd.backend = MUSTAFAR_BACKEND_CPU;
        cd.num_threads = th ? 0 : 1;
        CHECK(NULL, mustafar_context_create(&cd, &ctx));
        for (r = 0; r <= g_reps; r++) {
            double t0 = now_seconds();
            CHECK(ctx, mustafar_paged_attention(ctx, &kv, B, seqs + (size_t)(r % copies) * B, q, out, 0.0f));
            if (r) t[r - 1] = now_seconds() - t0;
        }
        ms[th] = median(t, g_reps) * 1e3;
        mustafar_context_destroy(ctx);
    }
    for (th = 0; th < 2; th++) {
        double gbs = (double)call_bytes / (ms[th] * 1e-3) / 1e9;
        printf("| %d | %5d | %.1f | %s | %8.2f | %6.2f | %5.1f %% | %8.2f | %4.2fx |\n", B, T, (double)s,
               th ? "all" : "1", ms[th], gbs, 100.0 * gbs * 1e9 / g_copy[th], dense_ms[th],
               dense_ms[th] / ms[th]);
    }
    fflush(stdout);
    free(kv.k_pages); free(kv.v_pages); free(table); free(seqs); free(q); free(out); free(src);
}

/* The dense baseline of one (B, T): [0] one thread, [1] all. */
static void bench_dense(int B, int T, double *ms)
{
    const size_t call_bytes = (size_t)B * T * HKV * D * 2 * 2;
    int copies = (int)((ROTATE_BYTES + call_bytes - 1) / call_bytes), th, r;
    size_t elems = (size_t)copies * B * HKV * T * D, total;
    uint16_t *k = (uint16_t *)xmalloc(elems * 2), *v = (uint16_t *)xmalloc(elems * 2);
    uint16_t *q = (uint16_t *)xmalloc((size_t)B * HQ * D * 2), *out = (uint16_t *)xmalloc((size_t)B * HQ * D * 2);
    dense_job J;
    fill_f16(k, (size_t)T * D < elems ? (size_t)T * D : elems);
    for (total = (size_t)T * D; total < elems; total += (size_t)T * D)
        memcpy(k + total, k, sizeof(uint16_t) * ((elems - total) < (size_t)T * D ? elems - total : (size_t)T * D));
    memcpy(v, k, elems * 2);
    fill_f16(q, (size_t)B * HQ * D);
    J.k = k; J.v = v; J.q = q; J.out = out; J.B = B; J.T = T;
    J.scale = 1.0f / sqrtf((float)D);
    for (th = 0; th < 2; th++) {
        int nthreads = th ? g_cores : 1;
        int64_t chunk = nthreads > 1 ? ((int64_t)B * T * HKV + 4 * nthreads - 1) / (4 * nthreads) : T;
        double t[64];
        if (chunk < 256) chunk = 256;
        chunk = (chunk + BLOCK - 1) / BLOCK * BLOCK;
        if (chunk > T) chunk = T;
        J.chunk = (int)chunk;
        J.splits = (int)((T + chunk - 1) / chunk);
        J.part = (float *)xmalloc(sizeof(float) * DENSE_ITEM_FLOATS * (size_t)B * HKV * J.splits);
        for (r = 0; r <= g_reps; r++) {
            double t0 = now_seconds();
            J.row0 = (r % copies) * B;
            dense_attention(&J, nthreads);
            if (r) t[r - 1] = now_seconds() - t0;
        }
        ms[th] = median(t, g_reps) * 1e3;
        free(J.part);
    }
    free(k); free(v); free(q); free(out);
}

static void bench_prefill(float s)
{
    const size_t count = (size_t)32768 * HKV;   /* one layer's K (then V) of 32k tokens */
    const size_t rec = mustafar_record_bytes(D, s, MUSTAFAR_DTYPE_F16);
    uint16_t *x = (uint16_t *)xmalloc(count * D * 2 * 2);
    unsigned char *r = (unsigned char *)xmalloc(count * rec * 2);
    int th, i;
    fill_f16(x, count * D * 2);
    for (th = 0; th < 2; th++) {
        mustafar_context_desc cd;
        mustafar_context *ctx;
        double t[64], sec, gbs;
        memset(&cd, 0, sizeof cd);
        cd.backend = MUSTAFAR_BACKEND_CPU;
        cd.num_threads = th ? 0 : 1;
        CHECK(NULL, mustafar_context_create(&cd, &ctx));
        for (i = 0; i <= g_reps; i++) {
            double t0 = now_seconds();
            CHECK(ctx, mustafar_compress(ctx, D, s, MUSTAFAR_DTYPE_F16, x, r, 2 * count));
            if (i) t[i - 1] = now_seconds() - t0;
        }
        sec = median(t, g_reps);
        gbs = (double)count * 2 * D * 2 / sec / 1e9;
        printf("| %.1f | %s | %8.2f | %6.2f | %5.1f %% |\n", (double)s, th ? "all" : "1", sec * 1e3, gbs,
               100.0 * gbs * 1e9 / g_copy[th]);
        mustafar_context_destroy(ctx);
    }
    free(x);
    free(r);
}

int main(int argc, char **argv)
{
    static const int Bs[2] = {1, 8}, Ts[2] = {4096, 32768};
    static const float Ss[3] = {0.0f, 0.5f, 0.7f};
    int quick = 0, target = 0, i, bi, ti, si;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--target")) target = 1;
        else if (!strcmp(argv[i], "--min")) g_fastest = 1;
        else if (!strcmp(argv[i], "--cpu-time")) g_cpu_time = 1;
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) g_reps = atoi(argv[++i]);
        else { fprintf(stderr, "usage: %s [--quick] [--target] [--min] [--cpu-time] [--reps N]\n", argv[0]); return 2; }
    }
    if (g_reps < 1) g_reps = 1;
    if (g_reps > 63) g_reps = 63;
    g_cores = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (g_cores < 1) g_cores = 1;
    if (g_cores > 256) g_cores = 256;
    g_copy[0] = memcpy_bandwidth(1, g_reps);
    g_copy[1] = memcpy_bandwidth(g_cores, g_reps);
    {
        static const char *const simd_names[] = {"scalar", "avx2", "neon", "avx512"};
        printf("mustafar %s CPU benchmark: %d cores, %s path, Hq=%d Hkv=%d D=%d fp16, %s of %d calls\n",
               mustafar_version_string(), g_cores, simd_names[mustafar__cpu_choose_simd()], HQ, HKV, D,
               g_fastest ? "fastest" : "median", g_reps);
    }
    printf("memcpy read bandwidth: %.2f GB/s (1 thread), %.2f GB/s (%d threads)\n\n",
           g_copy[0] / 1e9, g_copy[1] / 1e9, g_cores);
    printf("Decode attention (one layer, one query token per sequence); dense = fp16 SIMD baseline\n\n");
    printf("| B | T | s | threads | ms | GB/s | %% memcpy | dense ms | speedup |\n");
    printf("|---|---|---|---|---|---|---|---|---|\n");
    for (bi = 0; bi < 2; bi++)
        for (ti = 0; ti < 2; ti++) {
            double dense_ms[2];
            if (quick && (Bs[bi] > 1 || Ts[ti] > 4096)) continue;
            if (target && (Bs[bi] > 1 || Ts[ti] < 32768)) continue;
            bench_dense(Bs[bi], Ts[ti], dense_ms);
            for (si = 0; si < 3; si++) bench_shape(Bs[bi], Ts[ti], Ss[si], dense_ms);
        }
    printf("\nPrefill compression (mustafar_compress of 32k tokens x Hkv=8 of K and V); "
           "GB/s of dense bytes read\n\n");
    printf("| s | threads | ms | GB/s | %% memcpy |\n|---|---|---|---|---|\n");
    bench_prefill(0.5f);
    bench_prefill(0.7f);
    return 0;
}
