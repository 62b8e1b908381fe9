/* tb_common.h - shared helpers of the mustafar.h test suite.

   Included once, by test_main.c, after mustafar.h (one translation unit).
   Everything here is independent of the library: the references for the
   fp16/bf16 decoding, pruning, the record format and attention are written
   from the documentation, never by calling the library.  The only library
   calls used to build test inputs are mustafar_f32_to_f16/bf16 (rounding of
   random inputs to the dtype), which are tested exhaustively on their own.

   Must compile as C99 and as C++11 with -Wall -Wextra -Wpedantic -Werror:
   every malloc is cast, enums are never assigned from int without a cast,
   no designated initialisers, no gotos. */
#ifndef TB_COMMON_H
#define TB_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <math.h>
#include <time.h>
#include <inttypes.h>


#define TB_PI 3.14159265358979323846

/* ---- runner state and checks -------------------------------------------- */

static int g_quick = 0;            /* --quick: smaller sizes (sanitizer runs) */
static int g_verbose = 0;          /* --verbose: informational lines */
static uint64_t g_seed = 0;        /* --seed N, else from the clock */
static char g_cur_test[160] = "";  /* name of the running test instance */
static int g_cur_failures = 0;     /* failed checks in the running instance */

#define TB_MAX_PRINTED 20          /* FAIL lines printed per test instance */

#if defined(__MINGW32__) && defined(__MINGW_PRINTF_FORMAT)
/* printf is MinGW's C99 one (with %zu) or msvcrt's, as __USE_MINGW_ANSI_STDIO says */
#define TB_PRINTF_LIKE(a, b) __attribute__((format(__MINGW_PRINTF_FORMAT, a, b)))
#elif defined(__GNUC__) || defined(__clang__)
#define TB_PRINTF_LIKE(a, b) __attribute__((format(printf, a, b)))
#else
#define TB_PRINTF_LIKE(a, b)
#endif

static void tb_fail(const char *file, int line, const char *fmt, ...) TB_PRINTF_LIKE(3, 4);
static void tb_fail(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    const char *base = strrchr(file, '/');
    g_cur_failures++;
    if (g_cur_failures > TB_MAX_PRINTED) return;
    printf("FAIL %s: %s:%d: ", g_cur_test, base ? base + 1 : file, line);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

static void tb_info(const char *fmt, ...) TB_PRINTF_LIKE(1, 2);
static void tb_info(const char *fmt, ...)
{
    va_list ap;
    if (!g_verbose) return;
    printf("info %s: ", g_cur_test);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

/* CHECK(cond, printf-format, args...): record a failure and go on. */
#define CHECK(cond, ...) \
    do { if (!(cond)) tb_fail(__FILE__, __LINE__, __VA_ARGS__); } while (0)

static const char *tb_sname(mustafar_status s)
{
    const char *n = mustafar_status_string(s);
    return n ? n : "(null)";
}

/* Checks a status; for an expected failure also that mustafar_last_error(ctx)
   says something.  Returns 1 when the status is the expected one. */
static int tb_check_status(mustafar_context *ctx, mustafar_status got, mustafar_status want,
                           const char *expr, const char *file, int line)
{
    if (got != want) {
        const char *le = ctx ? mustafar_last_error(ctx) : NULL;
        tb_fail(file, line, "%s returned %s (%d), expected %s (%d); last error: %s", expr,
                tb_sname(got), (int)got, tb_sname(want), (int)want, le ? le : "-");
        return 0;
    }
    if (want != MUSTAFAR_OK && ctx) {
        const char *le = mustafar_last_error(ctx);
        if (!le || !le[0])
            tb_fail(file, line, "%s failed with %s but mustafar_last_error() is empty", expr,
                    tb_sname(got));
    }
    return 1;
}
#define CHECK_ST(ctx, expr, want) tb_check_status((ctx), (expr), (want), #expr, __FILE__, __LINE__)

/* ---- random numbers (splitmix64; never rand()) --------------------------- */

typedef struct tb_rng { uint64_t s; } tb_rng;

static uint64_t tb_next(tb_rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static uint32_t tb_u32(tb_rng *r) { return (uint32_t)(tb_next(r) >> 32); }
static double tb_unif(tb_rng *r) { return (double)(tb_next(r) >> 11) * (1.0 / 9007199254740992.0); }
/* uniform integer in [lo, hi] */
static int tb_int(tb_rng *r, int lo, int hi)
{
    if (hi <= lo) return lo;
    return lo + (int)(tb_next(r) % (uint64_t)(hi - lo + 1));
}
static double tb_normal(tb_rng *r)
{
    double u1 = tb_unif(r), u2 = tb_unif(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * TB_PI * u2);
}
static void tb_shuffle_int(tb_rng *r, int *a, int n)
{
    int i;
    for (i = n - 1; i > 0; i--) {
        int j = tb_int(r, 0, i), t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}
/* A test instance's stream depends only on the seed and its name, so that
   --filter reproduces a failure seen in a full run. */
static void tb_rng_for_test(tb_rng *r, const char *name)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *name; name++) h = (h ^ (unsigned char)*name) * 1099511628211ULL;
    r->s = g_seed ^ h;
    (void)tb_next(r);
}

/* ---- allocation ---------------------------------------------------------- */

static void *tb_xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "test: out of host memory (%zu bytes)\n", bytes);
        exit(2);
    }
    return p;
}
#define TB_NEW(type, n) ((type *)tb_xmalloc(sizeof(type) * (size_t)(n)))

/* ---- float bits ---------------------------------------------------------- */

static uint32_t tb_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float tb_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static int tb_isnanf(float f) { uint32_t u = tb_f2u(f); return (u & 0x7F800000u) == 0x7F800000u && (u & 0x7FFFFFu); }
static int tb_isnand(double d) { return d != d; }

/* ---- independent fp16 / bf16 decoding ------------------------------------ */

/* fp16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. */
static double ref_f16_decode(uint16_t h)
{
    int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 0) v = ldexp((double)m, -24);                   /* zero, subnormal */
    else if (e == 31) v = m ? (double)NAN : (double)INFINITY;
    else v = ldexp((double)(m + 1024), e - 25);              /* 1.m * 2^(e-15) */
    return sign ? -v : v;
}
/* bf16: 1 sign, 8 exponent (bias 127), 7 mantissa bits. */
static double ref_bf16_decode(uint16_t h)
{
    int sign = h >> 15, e = (h >> 7) & 255, m = h & 127;
    double v;
    if (e == 0) v = ldexp((double)m, -133);                  /* m * 2^-126 * 2^-7 */
    else if (e == 255) v = m ? (double)NAN : (double)INFINITY;
    else v = ldexp((double)(m + 128), e - 134);              /* 1.m * 2^(e-127) */
    return sign ? -v : v;
}

static double *g_ref_f16_table = NULL;   /* ref decode of all 65536 patterns */
static double *g_ref_bf16_table = NULL;

static void tb_tables_init(void)
{
    int i;
    if (g_ref_f16_table) return;
    g_ref_f16_table = TB_NEW(double, 65536);
    g_ref_bf16_table = TB_NEW(double, 65536);
    for (i = 0; i < 65536; i++) {
        g_ref_f16_table[i] = ref_f16_decode((uint16_t)i);
        g_ref_bf16_table[i] = ref_bf16_decode((uint16_t)i);
    }
}
static void tb_tables_free(void)
{
    free(g_ref_f16_table);
    free(g_ref_bf16_table);
    g_ref_f16_table = g_ref_bf16_table = NULL;
}

static int tb_is_bf16(mustafar_dtype dt) { return dt == MUSTAFAR_DTYPE_BF16; }
static const char *tb_dtname(mustafar_dtype dt) { return tb_is_bf16(dt) ? "bf16" : "f16"; }
static const double *tb_table(mustafar_dtype dt) { return tb_is_bf16(dt) ? g_ref_bf16_table : g_ref_f16_table; }
static double tb_h2d(mustafar_dtype dt, uint16_t h) { return tb_table(dt)[h]; }
static int tb_is_nan16(mustafar_dtype dt, uint16_t h)
{
    if (tb_is_bf16(dt)) return (h & 0x7F80) == 0x7F80 && (h & 0x7F);
    return (h & 0x7C00) == 0x7C00 && (h & 0x3FF);
}
/* Rounds a test input to the dtype (library rounding, tested separately). */
static uint16_t tb_d2h(mustafar_dtype dt, double v)
{
    float f = (float)v;
    return tb_is_bf16(dt) ? mustafar_f32_to_bf16(f) : mustafar_f32_to_f16(f);
}

/* ---- backend memory ------------------------------------------------------ */
/* Host malloc/memcpy for the CPU backend; cudaMalloc/cudaMemcpy for CUDA. */

static int tb_is_cuda(mustafar_context *ctx)
{
    return ctx && mustafar_context_backend(ctx) == MUSTAFAR_BACKEND_CUDA;
}

/* Backend memory through the library's own helpers (no CUDA header needed). */
static void *tb_alloc(mustafar_context *ctx, size_t bytes)
{
    void *p = NULL;
    mustafar_status st;
    if (!tb_is_cuda(ctx)) return tb_xmalloc(bytes);
    st = mustafar_memory_alloc(ctx, bytes ? bytes : 16, &p);
    if (st) {
        fprintf(stderr, "test: mustafar_memory_alloc(%zu): %s\n", bytes, mustafar_last_error(ctx));
        exit(2);
    }
    return p;
}
static void tb_free(mustafar_context *ctx, void *p)
{
    if (!p) return;
    if (tb_is_cuda(ctx)) mustafar_memory_free(ctx, p);
    else free(p);
}
static void tb_check_cuda(mustafar_context *ctx, const char *what, const char *file, int line)
{
    if (tb_is_cuda(ctx) && mustafar_context_synchronize(ctx))
        tb_fail(file, line, "%s: %s", what, mustafar_last_error(ctx));
}
static void tb_upload(mustafar_context *ctx, void *dst, const void *src, size_t bytes)
{
    if (!tb_is_cuda(ctx)) {
        if (bytes) memcpy(dst, src, bytes);
    } else if (mustafar_memory_upload(ctx, dst, src, bytes)) {
        tb_fail(__FILE__, __LINE__, "upload: %s", mustafar_last_error(ctx));
    }
}
static void tb_download(mustafar_context *ctx, void *dst, const void *src, size_t bytes)
{
    if (!tb_is_cuda(ctx)) {
        if (bytes) memcpy(dst, src, bytes);
    } else if (mustafar_memory_download(ctx, dst, src, bytes)) {
        tb_fail(__FILE__, __LINE__, "download: %s", mustafar_last_error(ctx));
    }
}
/* Fills with 0xFF bytes: 0xFFFF is a NaN in fp16 and bf16. */
static void tb_poison(mustafar_context *ctx, void *p, size_t bytes)
{
    if (!tb_is_cuda(ctx)) {
        memset(p, 0xFF, bytes);
    } else {
        unsigned char *ff = (unsigned char *)tb_xmalloc(bytes);
        memset(ff, 0xFF, bytes);
        tb_upload(ctx, p, ff, bytes);
        free(ff);
        tb_check_cuda(ctx, "poison", __FILE__, __LINE__);
    }
}
/* Allocates backend memory holding a copy of host data. */
static void *tb_dup(mustafar_context *ctx, const void *src, size_t bytes)
{
    void *p = tb_alloc(ctx, bytes);
    tb_upload(ctx, p, src, bytes);
    return p;
}
static int tb_all_ff(const void *p, size_t bytes)
{
    const unsigned char *b = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < bytes; i++)
        if (b[i] != 0xFF) return 0;
    return 1;
}

static int first_diff16(const uint16_t *a, const uint16_t *b, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (a[i] != b[i]) return (int)i;
    return -1;
}
static int first_diff8(const unsigned char *a, const unsigned char *b, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (a[i] != b[i]) return (int)i;
    return -1;
}

/* ---- reference pruning --------------------------------------------------- */
/* Rule of the documentation: keep the n elements of largest key = bits &
   0x7FFF (for both fp16 and bf16), ties towards the lower channel index.
   keep[c] is 1 for a kept channel (a kept element may well be +-0). */

static int ref_kept(int D, double s)
{
    return D - (int)floor(s * (double)D + 1e-6);
}

/* O(D^2) brute force: rank = others with a larger key, or an equal key and
   a lower index; keep iff rank < n. */
static void ref_prune_brute(const uint16_t *x, int D, int n, unsigned char *keep)
{
    int i, j;
    for (i = 0; i < D; i++) {
        int ki = x[i] & 0x7FFF, rank = 0;
        for (j = 0; j < D; j++) {
            int kj = x[j] & 0x7FFF;
            if (kj > ki || (kj == ki && j < i)) rank++;
        }
        keep[i] = (unsigned char)(rank < n);
    }
}

static int tb_cmp_desc_u16(const void *a, const void *b)
{
    int x = *(const uint16_t *)a, y = *(const uint16_t *)b;
    return (y > x) - (y < x);
}
/* O(D log D): threshold = n-th largest key; keep every key above it, then
   the lowest-index elements equal to it.  Checked against the brute force. */
static void ref_prune_fast(const uint16_t *x, int D, int n, unsigned char *keep)
{
    uint16_t keys[256];
    int c, above = 0, need;
    uint16_t t;
    for (c = 0; c < D; c++) keys[c] = (uint16_t)(x[c] & 0x7FFF);
    qsort(keys, (size_t)D, sizeof keys[0], tb_cmp_desc_u16);
    t = keys[n - 1];
    for (c = 0; c < D; c++)
        if ((x[c] & 0x7FFF) > t) above++;
    need = n - above;
    for (c = 0; c < D; c++) {
        int k = x[c] & 0x7FFF;
        keep[c] = 0;
        if (k > t) keep[c] = 1;
        else if (k == t && need > 0) { keep[c] = 1; need--; }
    }
}
/* y = pruned x: kept elements bit-identical, others +0. */
static void ref_apply(const uint16_t *x, const unsigned char *keep, int D, uint16_t *y)
{
    int c;
    for (c = 0; c < D; c++) y[c] = keep[c] ? x[c] : (uint16_t)0;
}
static void ref_prune_vec(const uint16_t *x, int D, int n, uint16_t *y)
{
    unsigned char keep[256];
    ref_prune_fast(x, D, n, keep);
    ref_apply(x, keep, D, y);
}

/* ---- reference record encoder -------------------------------------------- */

static size_t ref_record_bytes(int D, int n)
{
    size_t b = (size_t)D / 8 + 2 * (size_t)n;
    return (b + 15) / 16 * 16;
}
/* [bitmap: little-endian uint32 words, bit c%32 of word c/32]
   [n kept values in channel order, little-endian][zero padding]. */
static void ref_encode(const uint16_t *x, const unsigned char *keep, int D, size_t rec,
                       unsigned char *out)
{
    uint32_t words[8];
    int c, w, k = 0;
    memset(out, 0, rec);
    memset(words, 0, sizeof words);
    for (c = 0; c < D; c++)
        if (keep[c]) words[c / 32] |= (uint32_t)1u << (c % 32);
    for (w = 0; w < D / 32; w++) {
        out[4 * w + 0] = (unsigned char)(words[w] & 0xFF);
        out[4 * w + 1] = (unsigned char)((words[w] >> 8) & 0xFF);
        out[4 * w + 2] = (unsigned char)((words[w] >> 16) & 0xFF);
        out[4 * w + 3] = (unsigned char)((words[w] >> 24) & 0xFF);
    }
    for (c = 0; c < D; c++) {
        if (!keep[c]) continue;
        out[D / 8 + 2 * k] = (unsigned char)(x[c] & 0xFF);
        out[D / 8 + 2 * k + 1] = (unsigned char)(x[c] >> 8);
        k++;
    }
}
static void ref_encode_vec(const uint16_t *x, int D, int n, size_t rec, unsigned char *out)
{
    unsigned char keep[256];
    ref_prune_fast(x, D, n, keep);
    ref_encode(x, keep, D, rec, out);
}

/* ---- reference attention (float64) --------------------------------------- */
/* out[D] = softmax(scale * q . k_t) . v_t over L tokens; k[t], v[t] point to
   token vectors of D elements (already pruned where the cache prunes).
   If probs is not NULL it receives nothing; sc is scratch of L doubles. */
static void ref_attend(mustafar_dtype dt, int D, const uint16_t *q, int L,
                       const uint16_t *const *k, const uint16_t *const *v, double scale,
                       double *sc, double *out)
{
    const double *tab = tb_table(dt);
    double qd[256], mx = -INFINITY, sum = 0.0;
    int t, d;
    for (d = 0; d < D; d++) { qd[d] = tab[q[d]]; out[d] = 0.0; }
    if (L <= 0) return;
    for (t = 0; t < L; t++) {
        double s = 0.0;
        for (d = 0; d < D; d++) s += qd[d] * tab[k[t][d]];
        sc[t] = s * scale;
        if (sc[t] > mx) mx = sc[t];
    }
    for (t = 0; t < L; t++) {
        double w = exp(sc[t] - mx);
        sum += w;
        for (d = 0; d < D; d++) out[d] += w * tab[v[t][d]];
    }
    for (d = 0; d < D; d++) out[d] /= sum;
}

/* Relative error ||got - ref|| / ||ref|| of D outputs given as dtype bits;
   returns +Inf when an output is NaN (e.g. never written: 0xFFFF poison). */
static double tb_rel_err(mustafar_dtype dt, const uint16_t *got, const double *ref, int D,
                         int *nan_count)
{
    double num = 0.0, den = 0.0;
    int d, nans = 0;
    for (d = 0; d < D; d++) {
        double g = tb_h2d(dt, got[d]);
        if (tb_isnand(g)) { nans++; continue; }
        num += (g - ref[d]) * (g - ref[d]);
        den += ref[d] * ref[d];
    }
    if (nan_count) *nan_count = nans;
    if (nans) return INFINITY;
    if (den == 0.0) return num == 0.0 ? 0.0 : INFINITY;
    return sqrt(num / den);
}
static double tb_rel_diff(const double *a, const double *ref, int D)
{
    double num = 0.0, den = 0.0;
    int d;
    for (d = 0; d < D; d++) {
        num += (a[d] - ref[d]) * (a[d] - ref[d]);
        den += ref[d] * ref[d];
    }
    return den > 0.0 ? sqrt(num / den) : 0.0;
}

/* Error bound for attention outputs, relative in the 2-norm per (seq, head).
   The library accumulates in fp32 from exact dtype inputs, so the dominant
   error is the final rounding of out to the dtype: at most 2^-11 (fp16) or
   2^-8 (bf16) relative per element, hence at most that in the norm.  fp32
   accumulation over <= 300 tokens adds ~1e-6.  A kernel that also rounds the
   softmax weights to the dtype before P.V adds another ~2^-11 (2^-8) of
   mostly independent errors.  So 2e-3 (4x the fp16 output rounding) and
   1e-2 (2.5x the bf16 one) leave room for that and for nothing else: a wrong
   token, a missed page, a wrong scale or a record of another token changes
   the result by 1e-1..1e0 (see the informational "pruning changes the
   output by" numbers: dropping 30-70 % of small elements moves it ~1e-1). */
static double tb_attn_tol(mustafar_dtype dt) { return tb_is_bf16(dt) ? 1e-2 : 2e-3; }

/* Random token data, rounded to the dtype. */
static void tb_fill_normal(tb_rng *r, mustafar_dtype dt, uint16_t *x, size_t n, double sd)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = tb_d2h(dt, sd * tb_normal(r));
}

#endif /* TB_COMMON_H */
