/* generate.c - a complete decoder-only transformer in C99 on mustafar.h.

   Loads a byte-level model of Llama layout (token embedding, RMSNorm, RoPE,
   grouped-query attention, SwiGLU MLP, output head) from a .safetensors file
   (examples/model/tiny.safetensors, trained by tools/train_model.py), keeps
   its KV cache in a mustafar_cache (K pruned after RoPE, V pruned, both per
   token by magnitude, plus a dense window of the newest tokens), and
   generates text greedily or by temperature sampling.

   Build and run from the repository root (the model's default path,
   examples/model/tiny.safetensors, is relative to it; --model sets another):
           cc -std=c99 -O2 examples/generate.c -o generate -lm -ldl -lpthread
           ./generate --prompt "def main(" --tokens 200 --ks 0.7 --vs 0.7

   Where the work runs.  The matmuls run on the CPU in plain C (one thread
   when generating; an evaluation runs its configurations on several
   threads).  The attention runs wherever the library's context is: the GPU
   when the CUDA runtime, NVRTC and a GPU are found at run time, else the CPU.
   The program moves q, k, v and the attention output through the library's
   backend-memory helpers, so the same code drives either backend.  The
   matmuls stay on the CPU on purpose: a GPU matmul would need cuBLAS (a
   second run-time-loaded library with its own ABI to declare) or kernels of
   our own compiled through the library's NVRTC path, which the library does
   not expose; for a 10 M-parameter model the CPU matmuls are fast enough,
   and the point of the example is the cache and its attention.

   Prefill and teacher-forced evaluation go through the same path as a decode
   step: for every layer, the matmuls of a block of tokens run together, then
   each token is appended to the cache and attends over what the cache holds
   at that moment (mustafar_cache_decode_step, one token at a time), so every
   query, prompt tokens included, sees pruned records for every position that
   has left the dense window.  This is the harshest setting for pruning (the
   paper keeps prefill attention dense and prunes the cache afterwards).

   Modes:
     generate [options]                       generate from --prompt
     generate --eval FILE [options]           teacher-forced bits per byte and
                                              top-1 agreement with the dense
                                              model over a grid of settings
   Options: see usage() below.
*/
#define _POSIX_C_SOURCE 200809L
#ifndef GENERATE_NO_IMPLEMENTATION
#define MUSTAFAR_IMPLEMENTATION
#endif
#include "../mustafar.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if !defined(GENERATE_NO_THREADS) && (defined(__unix__) || defined(__APPLE__))
#include <pthread.h>
#define GEN_THREADS 1
#else
#define GEN_THREADS 0
#endif

/* ======================================================================= */
/*  safetensors reader                                                     */
/* ======================================================================= */
/* File: u64 little-endian header length N, N bytes of JSON (an object of
   tensor name -> {"dtype", "shape", "data_offsets": [begin, end]} plus an
   optional "__metadata__" object of string -> string), then the data; the
   offsets count from the first byte after the header.  Every number and
   offset is checked against the file before anything is read. */

#define ST_MAX_HEADER (100u << 20)   /* the format's own bound */
#define ST_MAX_TENSORS 4096
#define ST_MAX_DIMS 8
#define ST_NAME 256

enum { ST_F16, ST_BF16, ST_F32, ST_I32, ST_U8 };

typedef struct {
    char name[ST_NAME];
    int dtype, ndim;
    uint64_t shape[ST_MAX_DIMS];
    uint64_t begin, end;             /* byte offsets into the data section */
} st_tensor;

typedef struct {
    char key[64], value[256];
} st_meta;

typedef struct {
    unsigned char *buf;              /* the whole file (owned) */
    size_t size;
    const unsigned char *data;       /* data section */
    uint64_t data_size;
    st_tensor *t;
    int nt;
    st_meta m[64];
    int nm;
} st_file;

typedef struct {
    const char *s, *end;
    char *err;
    size_t errcap;
} st_json;

static int st_fail(st_json *j, const char *what) {
    if (j->err && j->errcap) snprintf(j->err, j->errcap, "header JSON: %s", what);
    return 0;
}

static void st_ws(st_json *j) {
    while (j->s < j->end && (*j->s == ' ' || *j->s == '\t' || *j->s == '\n' || *j->s == '\r')) j->s++;
}

static int st_lit(st_json *j, char c) {
    st_ws(j);
    if (j->s < j->end && *j->s == c) { j->s++; return 1; }
    return 0;
}

/* A JSON string into out (NUL-terminated, at most cap-1 bytes, else an error). */
static int st_string(st_json *j, char *out, size_t cap) {
    size_t n = 0;
    st_ws(j);
    if (j->s >= j->end || *j->s != '"') return st_fail(j, "expected a string");
    j->s++;
    while (j->s < j->end && *j->s != '"') {
        unsigned c = (unsigned char)*j->s++;
        if (c < 0x20) return st_fail(j, "control character in a string");
        if (c == '\\') {
            if (j->s >= j->end) break;
            c = (unsigned char)*j->s++;
            switch (c) {
            case '"': case '\\': case '/': break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            case 'u': {
                unsigned v = 0;
                int i;
                if (j->end - j->s < 4) return st_fail(j, "bad \\u escape");
                for (i = 0; i < 4; i++) {
                    int h = j->s[i];
                    v = v * 16 + (unsigned)(isdigit(h) ? h - '0' : (tolower(h) >= 'a' && tolower(h) <= 'f')
                                                                    ? tolower(h) - 'a' + 10 : 99);
                    if (v > 0xFFFF) return st_fail(j, "bad \\u escape");
                }
                j->s += 4;
                if (v >= 0x80) v = '?';   /* names here are ASCII; keep others visible */
                c = v;
                break;
            }
            default: return st_fail(j, "bad escape in a string");
            }
        }
        if (n + 1 >= cap) return st_fail(j, "string too long");
        out[n++] = (char)c;
    }
    if (j->s >= j->end) return st_fail(j, "unterminated string");
    j->s++;
    out[n] = 0;
    return 1;
}

/* A non-negative integer below 2^53. */
static int st_uint(st_json *j, uint64_t *out) {
    uint64_t v = 0;
    int digits = 0;
    st_ws(j);
    while (j->s < j->end && *j->s >= '0' && *j->s <= '9') {
        v = v * 10 + (uint64_t)(*j->s++ - '0');
        if (++digits > 16 || v >= (1ull << 53)) return st_fail(j, "integer too large");
    }
    if (!digits) return st_fail(j, "expected a non-negative integer");
    if (j->s < j->end && (*j->s == '.' || *j->s == 'e' || *j->s == 'E'))
        return st_fail(j, "expected an integer");
    *out = v;
    return 1;
}

/* Skips any JSON value (depth-limited). */
static int st_skip(st_json *j, int depth) {
    char tmp[ST_NAME];
    st_ws(j);
    if (depth > 32) return st_fail(j, "nested too deeply");
    if (j->s >= j->end) return st_fail(j, "unexpected end");
    if (*j->s == '"') {
        const char *p = j->s + 1;             /* strings of any length */
        while (p < j->end && *p != '"') p += (*p == '\\') ? 2 : 1;
        if (p >= j->end) return st_fail(j, "unterminated string");
        j->s = p + 1;
        return 1;
    }
    if (*j->s == '{' || *j->s == '[') {
        char close = *j->s == '{' ? '}' : ']';
        int obj = close == '}';
        j->s++;
        if (st_lit(j, close)) return 1;
        do {
            if (obj && (!st_string(j, tmp, sizeof tmp) || !st_lit(j, ':')))
                return st_fail(j, "bad object");
            if (!st_skip(j, depth + 1)) return 0;
        } while (st_lit(j, ','));
        return st_lit(j, close) ? 1 : st_fail(j, "expected , or a closing bracket");
    }
    while (j->s < j->end && (isalnum((unsigned char)*j->s) || *j->s == '-' || *j->s == '+' ||
                             *j->s == '.'))
        j->s++;
    return 1;
}

static int st_dtype(const char *s, int *dt, int *size) {
    static const struct { const char *n; int dt, size; } k[] = {
        {"F16", ST_F16, 2}, {"BF16", ST_BF16, 2}, {"F32", ST_F32, 4}, {"I32", ST_I32, 4}, {"U8", ST_U8, 1}};
    size_t i;
    for (i = 0; i < sizeof k / sizeof k[0]; i++)
        if (!strcmp(s, k[i].n)) { *dt = k[i].dt; *size = k[i].size; return 1; }
    return 0;
}

static int st_elem_size(int dt) { return dt == ST_F32 || dt == ST_I32 ? 4 : dt == ST_U8 ? 1 : 2; }

static int st_cmp_begin(const void *a, const void *b) {
    const st_tensor *x = (const st_tensor *)a, *y = (const st_tensor *)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

static void st_close(st_file *f) {
    free(f->buf);
    free(f->t);
    memset(f, 0, sizeof *f);
}

/* Parses a file held in buf (taken over: freed by st_close, also on failure).
   Returns 1, or 0 with a sentence in err. */
static int st_parse(st_file *f, unsigned char *buf, size_t size, char *err, size_t errcap) {
    st_json j;
    uint64_t hlen = 0;
    int i;
    memset(f, 0, sizeof *f);
    f->buf = buf;
    f->size = size;
    j.err = err; j.errcap = errcap;
    if (size < 8) { snprintf(err, errcap, "file of %zu bytes is too short for a header", size); goto bad; }
    for (i = 7; i >= 0; i--) hlen = hlen << 8 | buf[i];
    if (hlen < 2 || hlen > ST_MAX_HEADER || hlen > size - 8) {
        snprintf(err, errcap, "header length %llu is not in [2, min(%u, file size %zu - 8)]",
                 (unsigned long long)hlen, ST_MAX_HEADER, size);
        goto bad;
    }
    f->data = buf + 8 + hlen;
    f->data_size = size - 8 - hlen;
    f->t = (st_tensor *)calloc(ST_MAX_TENSORS, sizeof *f->t);
    if (!f->t) { snprintf(err, errcap, "out of memory"); goto bad; }
    j.s = (const char *)buf + 8;
    j.end = j.s + hlen;
    if (!st_lit(&j, '{')) { st_fail(&j, "expected an object"); goto bad; }
    if (!st_lit(&j, '}')) do {
        char name[ST_NAME];
        if (!st_string(&j, name, sizeof name) || !st_lit(&j, ':')) { st_fail(&j, "expected \"name\":"); goto bad; }
        if (!strcmp(name, "__metadata__")) {
            if (!st_lit(&j, '{')) { st_fail(&j, "__metadata__ is not an object"); goto bad; }
            if (!st_lit(&j, '}')) do {
                st_meta *m = &f->m[f->nm];
                if (f->nm >= (int)(sizeof f->m / sizeof f->m[0])) { st_fail(&j, "too many metadata entries"); goto bad; }
                if (!st_string(&j, m->key, sizeof m->key) || !st_lit(&j, ':') ||
                    !st_string(&j, m->value, sizeof m->value)) { st_fail(&j, "bad __metadata__ entry"); goto bad; }
                f->nm++;
            } while (st_lit(&j, ','));
            if (!st_lit(&j, '}')) { st_fail(&j, "__metadata__ not closed"); goto bad; }
            continue;
        } else {
            st_tensor *t = &f->t[f->nt];
            int have = 0, k, esz = 0;
            uint64_t numel = 1;
            if (f->nt >= ST_MAX_TENSORS) { st_fail(&j, "too many tensors"); goto bad; }
            for (k = 0; k < f->nt; k++)
                if (!strcmp(f->t[k].name, name)) { snprintf(err, errcap, "tensor %s twice", name); goto bad; }
            memcpy(t->name, name, sizeof t->name);
            if (!st_lit(&j, '{')) { st_fail(&j, "tensor entry is not an object"); goto bad; }
            do {
                char key[32];
                if (!st_string(&j, key, sizeof key) || !st_lit(&j, ':')) { st_fail(&j, "bad tensor entry"); goto bad; }
                if (!strcmp(key, "dtype")) {
                    char dt[16];
                    if (!st_string(&j, dt, sizeof dt)) goto bad;
                    if (!st_dtype(dt, &t->dtype, &esz)) {
                        snprintf(err, errcap, "tensor %s: dtype %s not supported (F16, BF16, F32, I32, U8)", name, dt);
                        goto bad;
                    }
                    have |= 1;
                } else if (!strcmp(key, "shape")) {
                    if (!st_lit(&j, '[')) { st_fail(&j, "shape is not an array"); goto bad; }
                    t->ndim = 0;
                    if (!st_lit(&j, ']')) {
                        do {
                            if (t->ndim >= ST_MAX_DIMS) { st_fail(&j, "too many dimensions"); goto bad; }
                            if (!st_uint(&j, &t->shape[t->ndim])) goto bad;
                            t->ndim++;
                        } while (st_lit(&j, ','));
                        if (!st_lit(&j, ']')) { st_fail(&j, "shape not closed"); goto bad; }
                    }
                    have |= 2;
                } else if (!strcmp(key, "data_offsets")) {
                    if (!st_lit(&j, '[') || !st_uint(&j, &t->begin) || !st_lit(&j, ',') ||
                        !st_uint(&j, &t->end) || !st_lit(&j, ']')) {
                        st_fail(&j, "data_offsets is not [begin, end]");
                        goto bad;
                    }
                    have |= 4;
                } else if (!st_skip(&j, 0)) goto bad;
            } while (st_lit(&j, ','));
            if (!st_lit(&j, '}')) { st_fail(&j, "tensor entry not closed"); goto bad; }
            if (have != 7) { snprintf(err, errcap, "tensor %s lacks dtype, shape or data_offsets", name); goto bad; }
            for (k = 0; k < t->ndim; k++) {
                if (t->shape[k] && numel > UINT64_MAX / 8 / t->shape[k]) {
                    snprintf(err, errcap, "tensor %s: shape too large", name);
                    goto bad;
                }
                numel *= t->shape[k];
            }
            if (t->begin > t->end || t->end > f->data_size || t->end - t->begin != numel * (uint64_t)esz) {
                snprintf(err, errcap, "tensor %s: data_offsets [%llu, %llu] do not hold %llu elements of "
                         "%d bytes inside the %llu data bytes of the file", name,
                         (unsigned long long)t->begin, (unsigned long long)t->end,
                         (unsigned long long)numel, esz, (unsigned long long)f->data_size);
                goto bad;
            }
            f->nt++;
        }
    } while (st_lit(&j, ','));
    if (!st_lit(&j, '}')) { st_fail(&j, "expected , or } after a tensor"); goto bad; }
    st_ws(&j);
    if (j.s != j.end) { st_fail(&j, "trailing bytes after the object"); goto bad; }
    {   /* tensors must not overlap */
        st_tensor *s = (st_tensor *)malloc(sizeof *s * (size_t)(f->nt ? f->nt : 1));
        if (!s) { snprintf(err, errcap, "out of memory"); goto bad; }
        memcpy(s, f->t, sizeof *s * (size_t)f->nt);
        qsort(s, (size_t)f->nt, sizeof *s, st_cmp_begin);
        for (i = 1; i < f->nt; i++)
            if (s[i].begin < s[i - 1].end && s[i].end > s[i].begin) {
                snprintf(err, errcap, "tensors %s and %s overlap", s[i - 1].name, s[i].name);
                free(s);
                goto bad;
            }
        free(s);
    }
    return 1;
bad:
    st_close(f);
    return 0;
}

static int st_open(st_file *f, const char *path, char *err, size_t errcap) {
    FILE *fp = fopen(path, "rb");
    unsigned char *buf;
    long n;
    memset(f, 0, sizeof *f);
    if (!fp) { snprintf(err, errcap, "%s: %s", path, strerror(errno)); return 0; }
    if (fseek(fp, 0, SEEK_END) || (n = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET)) {
        snprintf(err, errcap, "%s: cannot find its size", path);
        fclose(fp);
        return 0;
    }
    buf = (unsigned char *)malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, fp) != (size_t)n) {
        snprintf(err, errcap, "%s: %s", path, buf ? "read failed" : "out of memory");
        free(buf);
        fclose(fp);
        return 0;
    }
    fclose(fp);
    if (!st_parse(f, buf, (size_t)n, err, errcap)) {
        size_t l = strlen(err);
        if (l + strlen(path) + 3 < errcap) {
            memmove(err + strlen(path) + 2, err, l + 1);
            memcpy(err, path, strlen(path));
            memcpy(err + strlen(path), ": ", 2);
        }
        return 0;
    }
    return 1;
}

static const char *st_meta_get(const st_file *f, const char *key) {
    int i;
    for (i = 0; i < f->nm; i++)
        if (!strcmp(f->m[i].key, key)) return f->m[i].value;
    return NULL;
}

/* The tensor `name` as float, checked against the expected shape (ndim
   entries of dims; -1 accepts any).  Returns a malloc'd array or NULL. */
static float *st_get_f32(const st_file *f, const char *name, int ndim, const int64_t *dims, char *err,
                         size_t errcap, uint64_t *count) {
    const st_tensor *t = NULL;
    uint64_t n = 1, i;
    float *out;
    int k;
    for (k = 0; k < f->nt; k++)
        if (!strcmp(f->t[k].name, name)) t = &f->t[k];
    if (!t) { snprintf(err, errcap, "tensor %s is missing", name); return NULL; }
    if (t->ndim != ndim) { snprintf(err, errcap, "tensor %s has %d dimensions, expected %d", name, t->ndim, ndim); return NULL; }
    for (k = 0; k < ndim; k++) {
        if (dims && dims[k] >= 0 && t->shape[k] != (uint64_t)dims[k]) {
            snprintf(err, errcap, "tensor %s: dimension %d is %llu, expected %lld", name, k,
                     (unsigned long long)t->shape[k], (long long)dims[k]);
            return NULL;
        }
        n *= t->shape[k];
    }
    out = (float *)malloc(sizeof(float) * (size_t)(n ? n : 1));
    if (!out) { snprintf(err, errcap, "out of memory for %s", name); return NULL; }
    for (i = 0; i < n; i++) {
        const unsigned char *p = f->data + t->begin + i * (uint64_t)st_elem_size(t->dtype);
        uint32_t u;
        int32_t s;
        switch (t->dtype) {
        case ST_F16: out[i] = mustafar_f16_to_f32((uint16_t)(p[0] | p[1] << 8)); break;
        case ST_BF16: out[i] = mustafar_bf16_to_f32((uint16_t)(p[0] | p[1] << 8)); break;
        case ST_F32: u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
                     memcpy(&out[i], &u, 4); break;
        case ST_I32: u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
                     memcpy(&s, &u, 4); out[i] = (float)s; break;
        default: out[i] = p[0]; break;
        }
    }
    if (count) *count = n;
    return out;
}

/* ======================================================================= */
/*  model                                                                  */
/* ======================================================================= */
typedef struct {
    float *attn_norm, *wq, *wk, *wv, *wo;    /* weights [out][in], as in PyTorch */
    float *mlp_norm, *wg, *wu, *wd;
} layer_w;

typedef struct {
    int vocab, dm, nl, hq, hkv, hd, dff, context;
    float eps, theta;
    float *embed, *norm, *head;
    layer_w *L;
} model;

static void model_free(model *m) {
    int l;
    if (m->L)
        for (l = 0; l < m->nl; l++) {
            layer_w *w = &m->L[l];
            free(w->attn_norm); free(w->wq); free(w->wk); free(w->wv); free(w->wo);
            free(w->mlp_norm); free(w->wg); free(w->wu); free(w->wd);
        }
    free(m->L); free(m->embed); free(m->norm); free(m->head);
    memset(m, 0, sizeof *m);
}

static int meta_int(const st_file *f, const char *key, int lo, int hi, int *out, char *err, size_t cap) {
    const char *s = st_meta_get(f, key);
    char *end;
    long v;
    if (!s) { snprintf(err, cap, "metadata %s is missing", key); return 0; }
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        snprintf(err, cap, "metadata %s = \"%s\" is not an integer in [%d, %d]", key, s, lo, hi);
        return 0;
    }
    *out = (int)v;
    return 1;
}

static int meta_float(const st_file *f, const char *key, float *out, char *err, size_t cap) {
    const char *s = st_meta_get(f, key);
    char *end;
    double v;
    if (!s) { snprintf(err, cap, "metadata %s is missing", key); return 0; }
    v = strtod(s, &end);
    if (*end || end == s || !(v > 0) || v > 1e9) {
        snprintf(err, cap, "metadata %s = \"%s\" is not a positive number", key, s);
        return 0;
    }
    *out = (float)v;
    return 1;
}

/* Loads a model from a parsed file; 1 or 0 with a sentence in err. */
static int model_load(model *m, const st_file *f, char *err, size_t cap) {
    char name[ST_NAME];
    int l;
    memset(m, 0, sizeof *m);
    if (!meta_int(f, "vocab", 2, 1 << 20, &m->vocab, err, cap) ||
        !meta_int(f, "d_model", 1, 1 << 16, &m->dm, err, cap) ||
        !meta_int(f, "n_layers", 1, 1024, &m->nl, err, cap) ||
        !meta_int(f, "n_heads", 1, 1024, &m->hq, err, cap) ||
        !meta_int(f, "n_kv_heads", 1, 1024, &m->hkv, err, cap) ||
        !meta_int(f, "head_dim", 1, 1024, &m->hd, err, cap) ||
        !meta_int(f, "d_ff", 1, 1 << 18, &m->dff, err, cap) ||
        !meta_int(f, "context", 1, 1 << 24, &m->context, err, cap) ||
        !meta_float(f, "norm_eps", &m->eps, err, cap) || !meta_float(f, "rope_theta", &m->theta, err, cap))
        return 0;
    if (m->hq % m->hkv) { snprintf(err, cap, "n_heads %d is not a multiple of n_kv_heads %d", m->hq, m->hkv); return 0; }
    if (m->hd != 64 && m->hd != 128 && m->hd != 256) {
        snprintf(err, cap, "head_dim %d: mustafar.h supports 64, 128 and 256", m->hd);
        return 0;
    }
    m->L = (layer_w *)calloc((size_t)m->nl, sizeof *m->L);
    if (!m->L) { snprintf(err, cap, "out of memory"); return 0; }
    {
        int64_t e[2] = {m->vocab, m->dm}, n[1] = {m->dm};
        if (!(m->embed = st_get_f32(f, "model.embed_tokens.weight", 2, e, err, cap, NULL)) ||
            !(m->head = st_get_f32(f, "lm_head.weight", 2, e, err, cap, NULL)) ||
            !(m->norm = st_get_f32(f, "model.norm.weight", 1, n, err, cap, NULL)))
            goto bad;
    }
    for (l = 0; l < m->nl; l++) {
        layer_w *w = &m->L[l];
        int64_t d1[1] = {m->dm};
        int64_t q[2] = {(int64_t)m->hq * m->hd, m->dm}, kv[2] = {(int64_t)m->hkv * m->hd, m->dm};
        int64_t o[2] = {m->dm, (int64_t)m->hq * m->hd}, up[2] = {m->dff, m->dm}, dn[2] = {m->dm, m->dff};
#define GET(field, suffix, nd, dims)                                                       \
        snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix);                      \
        if (!(w->field = st_get_f32(f, name, nd, dims, err, cap, NULL))) goto bad;
        GET(attn_norm, "input_layernorm.weight", 1, d1)
        GET(wq, "self_attn.q_proj.weight", 2, q)
        GET(wk, "self_attn.k_proj.weight", 2, kv)
        GET(wv, "self_attn.v_proj.weight", 2, kv)
        GET(wo, "self_attn.o_proj.weight", 2, o)
        GET(mlp_norm, "post_attention_layernorm.weight", 1, d1)
        GET(wg, "mlp.gate_proj.weight", 2, up)
        GET(wu, "mlp.up_proj.weight", 2, up)
        GET(wd, "mlp.down_proj.weight", 2, dn)
#undef GET
    }
    return 1;
bad:
    model_free(m);
    return 0;
}

static int model_open(model *m, const char *path, char *err, size_t cap) {
    st_file f;
    int ok;
    if (!st_open(&f, path, err, cap)) return 0;
    ok = model_load(m, &f, err, cap);
    if (!ok) {
        size_t l = strlen(err);
        if (l + strlen(path) + 3 < cap) {
            memmove(err + strlen(path) + 2, err, l + 1);
            memcpy(err, path, strlen(path));
            memcpy(err + strlen(path), ": ", 2);
        }
    }
    st_close(&f);
    return ok;
}

/* y[t][o] = sum_i x[t][i] w[o][i]  (+= when acc): T tokens, in -> out.
   Blocked 4 tokens x 4 outputs so each loaded weight serves four tokens. */
static void matmul(float *y, const float *x, const float *w, int T, int in, int out, int acc) {
    int t0, o, i;
    if (T == 1) {                       /* one token (a decode step): 4 outputs at a time */
        for (o = 0; o + 3 < out; o += 4) {
            const float *w0 = w + (size_t)o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
            float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
            for (i = 0; i < in; i++) {
                a0 += x[i] * w0[i]; a1 += x[i] * w1[i]; a2 += x[i] * w2[i]; a3 += x[i] * w3[i];
            }
            if (acc) { y[o] += a0; y[o + 1] += a1; y[o + 2] += a2; y[o + 3] += a3; }
            else { y[o] = a0; y[o + 1] = a1; y[o + 2] = a2; y[o + 3] = a3; }
        }
        for (; o < out; o++) {
            float a = 0;
            for (i = 0; i < in; i++) a += x[i] * w[(size_t)o * in + i];
            y[o] = acc ? y[o] + a : a;
        }
        return;
    }
    for (t0 = 0; t0 < T; t0 += 4) {
        int nt = T - t0 < 4 ? T - t0 : 4;
        const float *x0 = x + (size_t)t0 * in;
        const float *x1 = x0 + (nt > 1 ? in : 0), *x2 = x0 + (nt > 2 ? 2 * in : 0),
                    *x3 = x0 + (nt > 3 ? 3 * in : 0);
        for (o = 0; o + 1 < out; o += 2) {
            const float *w0 = w + (size_t)o * in, *w1 = w0 + in;
            float a00 = 0, a01 = 0, a10 = 0, a11 = 0, a20 = 0, a21 = 0, a30 = 0, a31 = 0;
            for (i = 0; i < in; i++) {
                float u = w0[i], v = w1[i];
                a00 += x0[i] * u; a01 += x0[i] * v;
                a10 += x1[i] * u; a11 += x1[i] * v;
                a20 += x2[i] * u; a21 += x2[i] * v;
                a30 += x3[i] * u; a31 += x3[i] * v;
            }
            {
                float r[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
                int t;
                for (t = 0; t < nt; t++) {
                    float *yy = y + (size_t)(t0 + t) * out + o;
                    if (acc) { yy[0] += r[t][0]; yy[1] += r[t][1]; }
                    else { yy[0] = r[t][0]; yy[1] = r[t][1]; }
                }
            }
        }
        for (; o < out; o++) {
            const float *w0 = w + (size_t)o * in;
            int t;
            for (t = 0; t < nt; t++) {
                const float *xx = x0 + (size_t)t * in;
                float a = 0;
                for (i = 0; i < in; i++) a += xx[i] * w0[i];
                if (acc) y[(size_t)(t0 + t) * out + o] += a;
                else y[(size_t)(t0 + t) * out + o] = a;
            }
        }
    }
}

static void rmsnorm(float *y, const float *x, const float *w, int T, int d, float eps) {
    int t, i;
    for (t = 0; t < T; t++) {
        double ss = 0;
        for (i = 0; i < d; i++) ss += (double)x[(size_t)t * d + i] * x[(size_t)t * d + i];
        {
            float r = (float)(1.0 / sqrt(ss / d + eps));
            for (i = 0; i < d; i++) y[(size_t)t * d + i] = x[(size_t)t * d + i] * r * w[i];
        }
    }
}

/* Rotary embedding of nh heads of one token at position pos (the "rotate
   half" layout of Llama: channel i pairs with i + D/2). */
static void rope(float *x, int nh, int D, int pos, float theta) {
    int h, i;
    for (i = 0; i < D / 2; i++) {
        double inv = 1.0 / pow((double)theta, (double)(2 * i) / D);
        double a = (double)pos * inv;
        float c = (float)cos(a), s = (float)sin(a);
        for (h = 0; h < nh; h++) {
            float *v = x + (size_t)h * D;
            float x0 = v[i], x1 = v[i + D / 2];
            v[i] = x0 * c - x1 * s;
            v[i + D / 2] = x1 * c + x0 * s;
        }
    }
}

/* ======================================================================= */
/*  a running model: weights, a mustafar cache, scratch                    */
/* ======================================================================= */
typedef struct {
    const model *m;
    mustafar_context *ctx;
    mustafar_cache *cache;
    int seq, maxT, cap, pos;                /* block capacity, sequence capacity, tokens so far */
    float ks, vs;
    int window;
    /* host scratch [maxT][...] */
    float *x, *h, *q, *k, *v, *att, *g, *u;
    uint16_t *hq16, *hk16, *hv16, *ho16;
    /* backend memory (device memory on CUDA) */
    void *dq, *dk, *dv, *dout;
    /* float64 reference attention instead of the cache (tests): the raw
       fp16 K/V of every layer and their pruned copies, [layer][pos][Hkv][D].
       The cache then runs beside it on the same fp16 q/k/v, and
       cache_error keeps its largest |cache - float64| over every output
       channel, step and layer, relative to the largest |V| of that head. */
    int reference;
    uint16_t *rk, *rv, *rkp, *rvp, *co16;
    double *o64, *vmax, cache_error;
    char err[1024];
} runner;

static void runner_free(runner *r) {
    if (r->ctx) {
        if (r->dq) mustafar_memory_free(r->ctx, r->dq);
        if (r->dk) mustafar_memory_free(r->ctx, r->dk);
        if (r->dv) mustafar_memory_free(r->ctx, r->dv);
        if (r->dout) mustafar_memory_free(r->ctx, r->dout);
        if (r->cache) mustafar_cache_destroy(r->cache);
        mustafar_context_destroy(r->ctx);
    }
    free(r->x); free(r->h); free(r->q); free(r->k); free(r->v); free(r->att); free(r->g); free(r->u);
    free(r->hq16); free(r->hk16); free(r->hv16); free(r->ho16);
    free(r->rk); free(r->rv); free(r->rkp); free(r->rvp); free(r->co16); free(r->o64); free(r->vmax);
    memset(r, 0, sizeof *r);
}

/* backend: MUSTAFAR_BACKEND_*; cpu_threads: the CPU backend's threads (0: one
   per core; 1 where several runners run at once); maxT: most tokens of one
   forward call; capacity: most tokens of the sequence. */
static int runner_init(runner *r, const model *m, mustafar_backend backend, int cpu_threads, float ks,
                       float vs, int window, int maxT, int capacity, int reference) {
    mustafar_context_desc cd;
    mustafar_cache_desc d;
    mustafar_status st;
    size_t qd = (size_t)m->hq * m->hd, kd = (size_t)m->hkv * m->hd, wide = (size_t)m->dff;
    memset(r, 0, sizeof *r);
    r->m = m; r->ks = ks; r->vs = vs; r->window = window; r->maxT = maxT; r->cap = capacity;
    r->reference = reference;
    if (qd > wide) wide = qd;
    if ((size_t)m->vocab > wide) wide = (size_t)m->vocab;
    memset(&cd, 0, sizeof cd);
    cd.backend = backend;
    cd.num_threads = cpu_threads;
    cd.error_buffer = r->err;
    cd.error_buffer_size = sizeof r->err;
    st = mustafar_context_create(&cd, &r->ctx);
    if (st) { r->ctx = NULL; return 0; }
    memset(&d, 0, sizeof d);
    d.num_layers = m->nl; d.num_kv_heads = m->hkv; d.num_q_heads = m->hq; d.head_dim = m->hd;
    d.k_sparsity = ks; d.v_sparsity = vs; d.dense_window = window; d.page_size = 16;
    d.capacity_tokens = capacity; d.max_sequences = 1; d.dtype = MUSTAFAR_DTYPE_F16;
    st = mustafar_cache_create(r->ctx, &d, &r->cache);
    if (!st) st = mustafar_cache_add_sequence(r->cache, &r->seq);
    if (!st) st = mustafar_memory_alloc(r->ctx, (size_t)maxT * qd * 2, &r->dq);
    if (!st) st = mustafar_memory_alloc(r->ctx, (size_t)maxT * kd * 2, &r->dk);
    if (!st) st = mustafar_memory_alloc(r->ctx, (size_t)maxT * kd * 2, &r->dv);
    if (!st) st = mustafar_memory_alloc(r->ctx, (size_t)maxT * qd * 2, &r->dout);
    if (st) {
        snprintf(r->err, sizeof r->err, "%s: %.900s", mustafar_status_string(st), mustafar_last_error(r->ctx));
        return 0;
    }
    r->x = (float *)malloc(sizeof(float) * maxT * m->dm);
    r->h = (float *)malloc(sizeof(float) * maxT * m->dm);
    r->q = (float *)malloc(sizeof(float) * maxT * qd);
    r->k = (float *)malloc(sizeof(float) * maxT * kd);
    r->v = (float *)malloc(sizeof(float) * maxT * kd);
    r->att = (float *)malloc(sizeof(float) * maxT * qd);
    r->g = (float *)malloc(sizeof(float) * maxT * wide);
    r->u = (float *)malloc(sizeof(float) * maxT * wide);
    r->hq16 = (uint16_t *)malloc(2 * maxT * qd);
    r->ho16 = (uint16_t *)malloc(2 * maxT * qd);
    r->hk16 = (uint16_t *)malloc(2 * maxT * kd);
    r->hv16 = (uint16_t *)malloc(2 * maxT * kd);
    if (reference) {
        size_t all = (size_t)m->nl * capacity * kd * 2;
        r->rk = (uint16_t *)malloc(all); r->rv = (uint16_t *)malloc(all);
        r->rkp = (uint16_t *)malloc(all); r->rvp = (uint16_t *)malloc(all);
        r->co16 = (uint16_t *)malloc(2 * maxT * qd);
        r->o64 = (double *)malloc(sizeof(double) * maxT * qd);
        r->vmax = (double *)malloc(sizeof(double) * maxT * m->hq);
    }
    if (!r->x || !r->h || !r->q || !r->k || !r->v || !r->att || !r->g || !r->u || !r->hq16 || !r->ho16 ||
        !r->hk16 || !r->hv16 || (reference && (!r->rk || !r->rv || !r->rkp || !r->rvp || !r->co16 || !r->o64 || !r->vmax))) {
        snprintf(r->err, sizeof r->err, "out of host memory");
        return 0;
    }
    return 1;
}

#define RUN_CHECK(call)                                                                    \
    do {                                                                                   \
        mustafar_status st_ = (call);                                                      \
        if (st_) {                                                                         \
            snprintf(r->err, sizeof r->err, "%s: %s: %.700s", #call, mustafar_status_string(st_), \
                     mustafar_last_error(r->ctx));                                         \
            return 0;                                                                      \
        }                                                                                  \
    } while (0)

/* The pruning rule written out independently of the library (for the
   reference only): of each vector keep exactly n = D - floor(s*D) elements,
   the n largest |x|, ties to the lower channel; zero the others.  An element
   is kept when fewer than n elements rank above it. */
static void reference_prune(const uint16_t *in, uint16_t *out, size_t vectors, int D, float s) {
    int p = (int)floor((double)s * D + 1e-6), n = D - p, i, j;
    size_t v;
    for (v = 0; v < vectors; v++) {
        const uint16_t *x = in + v * (size_t)D;
        for (i = 0; i < D; i++) {
            double a = fabs((double)mustafar_f16_to_f32(x[i]));
            int above = 0;
            for (j = 0; j < D; j++) {
                double b = fabs((double)mustafar_f16_to_f32(x[j]));
                above += b > a || (b == a && j < i);
            }
            out[v * (size_t)D + i] = above < n ? x[i] : 0;
        }
    }
}

/* Float64 attention of token t of the block (at sequence length len after
   its append) over the stored fp16 K/V of layer l, with the cache's rule:
   positions [0, len - window) pruned, the rest dense.  vmax[h]: the largest
   |V| that head h attended over. */
static void reference_attention(runner *r, int l, int len, const uint16_t *q16, uint16_t *o16, double *o64,
                                double *vmax) {
    const model *m = r->m;
    int D = m->hd, g = m->hq / m->hkv, h, j, c;
    int ncomp = len > r->window ? len - r->window : 0;
    size_t kd = (size_t)m->hkv * D;
    double *w = (double *)malloc(sizeof(double) * (size_t)len);
    for (h = 0; h < m->hq; h++) {
        int kvh = h / g;
        double mx = -1e300, sum = 0, acc[256];
        for (j = 0; j < len; j++) {
            const uint16_t *kk = (j < ncomp ? r->rkp : r->rk) + ((size_t)l * r->cap + j) * kd + (size_t)kvh * D;
            double s = 0;
            for (c = 0; c < D; c++) s += (double)mustafar_f16_to_f32(q16[h * D + c]) * mustafar_f16_to_f32(kk[c]);
            w[j] = s / sqrt((double)D);
            if (w[j] > mx) mx = w[j];
        }
        for (j = 0; j < len; j++) { w[j] = exp(w[j] - mx); sum += w[j]; }
        for (c = 0; c < D; c++) acc[c] = 0;
        vmax[h] = 0;
        for (j = 0; j < len; j++) {
            const uint16_t *vv = (j < ncomp ? r->rvp : r->rv) + ((size_t)l * r->cap + j) * kd + (size_t)kvh * D;
            for (c = 0; c < D; c++) {
                double x = mustafar_f16_to_f32(vv[c]);
                acc[c] += w[j] * x;
                if (fabs(x) > vmax[h]) vmax[h] = fabs(x);
            }
        }
        for (c = 0; c < D; c++) {
            o64[h * D + c] = acc[c] / sum;
            o16[h * D + c] = mustafar_f32_to_f16((float)(acc[c] / sum));
        }
    }
    free(w);
}

/* Layer l of the block's T tokens through the cache, one decode step each
   (token t is appended, then its query attends); out16: [T][Hq][D]. */
static int cache_steps(runner *r, int l, int T, uint16_t *out16) {
    size_t qd = (size_t)r->m->hq * r->m->hd, kd = (size_t)r->m->hkv * r->m->hd;
    int one = 1, t;
    RUN_CHECK(mustafar_memory_upload(r->ctx, r->dq, r->hq16, 2 * T * qd));
    RUN_CHECK(mustafar_memory_upload(r->ctx, r->dk, r->hk16, 2 * T * kd));
    RUN_CHECK(mustafar_memory_upload(r->ctx, r->dv, r->hv16, 2 * T * kd));
    for (t = 0; t < T; t++)
        RUN_CHECK(mustafar_cache_decode_step(r->cache, l, 1, &r->seq, &one, (uint16_t *)r->dk + t * kd,
                                             (uint16_t *)r->dv + t * kd, (uint16_t *)r->dq + t * qd,
                                             (uint16_t *)r->dout + t * qd, 0.0f));
    RUN_CHECK(mustafar_memory_download(r->ctx, out16, r->dout, 2 * T * qd));
    return 1;
}

/* Runs T tokens through the model at positions pos.., appending them to the
   cache.  logits: [T][vocab] for every token, or [1][vocab] of the last one
   when all_logits is 0; NULL skips the output head. */
static int forward(runner *r, const int *tokens, int T, float *logits, int all_logits) {
    const model *m = r->m;
    int D = m->hd, dm = m->dm, l, t, i;
    size_t qd = (size_t)m->hq * D, kd = (size_t)m->hkv * D;
    if (T < 1 || T > r->maxT) { snprintf(r->err, sizeof r->err, "block of %d tokens (1..%d)", T, r->maxT); return 0; }
    for (t = 0; t < T; t++) {
        int tok = tokens[t];
        if (tok < 0 || tok >= m->vocab) { snprintf(r->err, sizeof r->err, "token %d outside the vocabulary", tok); return 0; }
        memcpy(r->x + (size_t)t * dm, m->embed + (size_t)tok * dm, sizeof(float) * dm);
    }
    for (l = 0; l < m->nl; l++) {
        const layer_w *w = &m->L[l];
        rmsnorm(r->h, r->x, w->attn_norm, T, dm, m->eps);
        matmul(r->q, r->h, w->wq, T, dm, (int)qd, 0);
        matmul(r->k, r->h, w->wk, T, dm, (int)kd, 0);
        matmul(r->v, r->h, w->wv, T, dm, (int)kd, 0);
        for (t = 0; t < T; t++) {
            rope(r->q + t * qd, m->hq, D, r->pos + t, m->theta);
            rope(r->k + t * kd, m->hkv, D, r->pos + t, m->theta);
        }
        for (i = 0; i < (int)(T * qd); i++) r->hq16[i] = mustafar_f32_to_f16(r->q[i]);
        for (i = 0; i < (int)(T * kd); i++) {
            r->hk16[i] = mustafar_f32_to_f16(r->k[i]);
            r->hv16[i] = mustafar_f32_to_f16(r->v[i]);
        }
        if (r->reference) {
            size_t off = ((size_t)l * r->cap + r->pos) * kd;
            memcpy(r->rk + off, r->hk16, 2 * T * kd);
            memcpy(r->rv + off, r->hv16, 2 * T * kd);
            reference_prune(r->hk16, r->rkp + off, (size_t)T * m->hkv, D, r->ks);
            reference_prune(r->hv16, r->rvp + off, (size_t)T * m->hkv, D, r->vs);
            for (t = 0; t < T; t++)
                reference_attention(r, l, r->pos + t + 1, r->hq16 + t * qd, r->ho16 + t * qd, r->o64 + t * qd,
                                    r->vmax + t * m->hq);
            /* the cache beside the reference, on the same inputs: checked
               step by step, not through the logits, because pruning is not
               continuous (an output one fp16 step off can change which
               elements a later vector keeps, and the two runs then part) */
            if (!cache_steps(r, l, T, r->co16)) return 0;
            for (i = 0; i < (int)(T * qd); i++) {
                double e = fabs(mustafar_f16_to_f32(r->co16[i]) - r->o64[i]) /
                           (r->vmax[i / D] > 0 ? r->vmax[i / D] : 1.0);
                if (!(e <= r->cache_error)) r->cache_error = e;   /* NaN sticks */
            }
        } else if (!cache_steps(r, l, T, r->ho16)) {
            return 0;
        }
        /* the output rounded to fp16 as the cache returns it */
        for (i = 0; i < (int)(T * qd); i++) r->att[i] = mustafar_f16_to_f32(r->ho16[i]);
        matmul(r->x, r->att, w->wo, T, (int)qd, dm, 1);
        rmsnorm(r->h, r->x, w->mlp_norm, T, dm, m->eps);
        matmul(r->g, r->h, w->wg, T, dm, m->dff, 0);
        matmul(r->u, r->h, w->wu, T, dm, m->dff, 0);
        for (i = 0; i < T * m->dff; i++) r->g[i] = r->g[i] / (1.0f + expf(-r->g[i])) * r->u[i];
        matmul(r->x, r->g, w->wd, T, m->dff, dm, 1);
    }
    r->pos += T;
    if (logits) {
        int first = all_logits ? 0 : T - 1, n = T - first;
        rmsnorm(r->h, r->x + (size_t)first * dm, m->norm, n, dm, m->eps);
        matmul(logits, r->h, m->head, n, dm, m->vocab, 0);
    }
    return 1;
}

#ifndef GENERATE_NO_MAIN  /* tests/test_model.c takes the model code only */
/* ======================================================================= */
/*  teacher-forced evaluation over a grid of settings                      */
/* ======================================================================= */
typedef struct {
    float ks, vs;
    int window;
    /* results */
    double nll;                 /* nats, summed over positions */
    long long hits;             /* next byte predicted (argmax == target) */
    unsigned char *argmax;      /* [segments][ctx] */
    double kv_bytes_per_token;  /* K+V bytes held per token at the end, all layers */
    double ratio;               /* of dense fp16 */
    double seconds;
    int ok;
    char err[512];
} eval_job;

typedef struct {
    const model *m;
    const unsigned char *text;
    size_t text_len;
    int ctx, segments;
    int threads;                 /* runners at once */
    mustafar_backend backend;
    eval_job *jobs;
    int njobs, next;
#if GEN_THREADS
    pthread_mutex_t lock;
#endif
} eval_plan;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Segment s: bytes [start, start + ctx + 1) spread evenly over the text. */
static size_t segment_start(const eval_plan *p, int s) {
    size_t span = p->text_len - (size_t)p->ctx - 1;
    return p->segments > 1 ? span / (size_t)(p->segments - 1) * (size_t)s : 0;
}

static void eval_one(const eval_plan *p, eval_job *j) {
    const model *m = p->m;
    int s, t, *tok = (int *)malloc(sizeof(int) * p->ctx);
    float *logits = (float *)malloc(sizeof(float) * (size_t)p->ctx * m->vocab);
    double t0 = now_s();
    j->nll = 0; j->hits = 0; j->ok = 0;
    if (!tok || !logits) { snprintf(j->err, sizeof j->err, "out of memory"); goto done; }
    for (s = 0; s < p->segments; s++) {
        const unsigned char *seg = p->text + segment_start(p, s);
        runner r;
        if (!runner_init(&r, m, p->backend, p->threads > 1 ? 1 : 0, j->ks, j->vs, j->window, p->ctx, p->ctx, 0)) {
            snprintf(j->err, sizeof j->err, "%.500s", r.err);
            runner_free(&r);
            goto done;
        }
        for (t = 0; t < p->ctx; t++) tok[t] = seg[t];
        if (!forward(&r, tok, p->ctx, logits, 1)) {
            snprintf(j->err, sizeof j->err, "%.500s", r.err);
            runner_free(&r);
            goto done;
        }
        if (s == 0) {
            mustafar_cache_stats cs;
            mustafar_cache_stats_get(r.cache, &cs);
            j->kv_bytes_per_token = (double)cs.record_bytes / p->ctx;
            j->ratio = cs.compression_ratio;
        }
        runner_free(&r);
        for (t = 0; t < p->ctx; t++) {
            const float *lg = logits + (size_t)t * m->vocab;
            int a = 0, c, target = seg[t + 1];
            double mx = lg[0], sum = 0;
            for (c = 1; c < m->vocab; c++)
                if (lg[c] > lg[a]) a = c;
            mx = lg[a];
            for (c = 0; c < m->vocab; c++) sum += exp((double)lg[c] - mx);
            j->nll += log(sum) + mx - lg[target];
            j->hits += a == target;
            j->argmax[(size_t)s * p->ctx + t] = (unsigned char)a;
        }
    }
    j->ok = 1;
done:
    j->seconds = now_s() - t0;
    free(tok);
    free(logits);
}

#if GEN_THREADS
static void *eval_worker(void *arg) {
    eval_plan *p = (eval_plan *)arg;
    for (;;) {
        int i;
        pthread_mutex_lock(&p->lock);
        i = p->next++;
        pthread_mutex_unlock(&p->lock);
        if (i >= p->njobs) return NULL;
        eval_one(p, &p->jobs[i]);
    }
}
#endif

static int run_eval(const model *m, const char *path, int ctx, int segments, const char *grid, int threads,
                    mustafar_backend backend, const char *csv) {
    static const float sp[] = {0.3f, 0.5f, 0.7f, 0.8f, 0.9f};
    int windows_full[] = {0, 32, 128}, windows_quick[] = {0, 32};
    eval_plan p;
    FILE *fp;
    long n;
    unsigned char *text;
    int i, nw, k;
    const int *ws;
    double t0 = now_s();
    memset(&p, 0, sizeof p);
    fp = fopen(path, "rb");
    if (!fp) { fprintf(stderr, "%s: %s\n", path, strerror(errno)); return 1; }
    fseek(fp, 0, SEEK_END);
    n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    text = (unsigned char *)malloc((size_t)n + 1);
    if (!text || fread(text, 1, (size_t)n, fp) != (size_t)n) { fprintf(stderr, "%s: read failed\n", path); return 1; }
    fclose(fp);
    if (n < ctx + 1) { fprintf(stderr, "%s: %ld bytes, fewer than --ctx %d + 1\n", path, n, ctx); return 1; }
    p.m = m; p.text = text; p.text_len = (size_t)n; p.ctx = ctx; p.segments = segments; p.threads = threads; p.backend = backend;
    p.jobs = (eval_job *)calloc(64, sizeof *p.jobs);
    /* job 0: the dense model (s = 0 keeps every element; no window needed) */
    p.jobs[p.njobs].ks = 0; p.jobs[p.njobs].vs = 0; p.jobs[p.njobs].window = 0; p.njobs++;
    if (strcmp(grid, "full") && strcmp(grid, "kv") && strcmp(grid, "quick")) {
        fprintf(stderr, "--grid %s: full, kv or quick\n", grid);
        return 2;
    }
    if (strcmp(grid, "quick")) { ws = windows_full; nw = 3; }
    else { ws = windows_quick; nw = 2; }
    for (k = 0; k < nw; k++) {
        if (strcmp(grid, "quick")) {
            for (i = 0; i < 5; i++) {        /* K and V together, K only, V only (full) */
                eval_job a = {0}, b = {0}, c = {0};
                a.ks = a.vs = sp[i]; a.window = ws[k];
                b.ks = sp[i]; b.window = ws[k];
                c.vs = sp[i]; c.window = ws[k];
                p.jobs[p.njobs++] = a;
                if (!strcmp(grid, "full")) { p.jobs[p.njobs++] = b; p.jobs[p.njobs++] = c; }
            }
        } else {                             /* quick: K and V together at 0.5 and 0.7 */
            eval_job a = {0}, b = {0};
            a.ks = a.vs = 0.5f; a.window = ws[k];
            b.ks = b.vs = 0.7f; b.window = ws[k];
            p.jobs[p.njobs++] = a; p.jobs[p.njobs++] = b;
        }
    }
    for (i = 0; i < p.njobs; i++) {
        p.jobs[i].argmax = (unsigned char *)malloc((size_t)segments * ctx);
        if (!p.jobs[i].argmax) { fprintf(stderr, "out of memory\n"); return 1; }
    }
    fprintf(stderr, "eval: %d settings x %d segments of %d bytes of %s on %d thread(s)\n", p.njobs, segments,
            ctx, path, threads);
#if GEN_THREADS
    if (threads > 1) {
        pthread_t th[256];
        if (threads > 256) threads = 256;
        pthread_mutex_init(&p.lock, NULL);
        for (i = 0; i < threads; i++) pthread_create(&th[i], NULL, eval_worker, &p);
        for (i = 0; i < threads; i++) pthread_join(th[i], NULL);
        pthread_mutex_destroy(&p.lock);
    } else
#endif
        for (i = 0; i < p.njobs; i++) eval_one(&p, &p.jobs[i]);
    for (i = 0; i < p.njobs; i++)
        if (!p.jobs[i].ok) { fprintf(stderr, "eval failed (K %.1f V %.1f W %d): %s\n", p.jobs[i].ks,
                                     p.jobs[i].vs, p.jobs[i].window, p.jobs[i].err); return 1; }
    fp = csv ? fopen(csv, csv[0] && strstr(csv, "+") ? "a" : "w") : NULL;
    if (csv && !fp) { fprintf(stderr, "%s: %s\n", csv, strerror(errno)); return 1; }
    {
        double total = (double)segments * ctx;
        const eval_job *d = &p.jobs[0];
        printf("teacher-forced, %d segment(s) of %d bytes, backend %s; bits/byte and top-1 vs the dense model;\n"
               "held B/tok: the cache's bytes at the segment's end (records and dense window, all layers) per token\n",
               segments, ctx, backend == MUSTAFAR_BACKEND_CUDA ? "CUDA" : backend == MUSTAFAR_BACKEND_CPU ? "CPU" : "auto");
        printf("%6s %6s %6s %10s %10s %8s %10s %8s\n", "K s", "V s", "window", "bits/byte", "delta", "top-1",
               "held B/tok", "% dense");
        for (i = 0; i < p.njobs; i++) {
            const eval_job *j = &p.jobs[i];
            long long agree = 0;
            size_t q;
            double bpb = j->nll / total / log(2.0), dbpb = bpb - d->nll / total / log(2.0);
            for (q = 0; q < (size_t)total; q++) agree += j->argmax[q] == d->argmax[q];
            printf("%6.1f %6.1f %6d %10.4f %+10.4f %7.2f%% %10.0f %7.1f%%\n", j->ks, j->vs, j->window, bpb, dbpb,
                   100.0 * agree / total, j->kv_bytes_per_token, 100.0 * j->ratio);
            if (fp)
                fprintf(fp, "library,%d,%d,%.2f,%.2f,%d,%.5f,%.5f,%.5f,%.1f,%.4f\n", ctx, segments, j->ks, j->vs,
                        j->window, bpb, dbpb, (double)agree / total, j->kv_bytes_per_token, j->ratio);
        }
    }
    if (fp) fclose(fp);
    fprintf(stderr, "eval: %.1f s\n", now_s() - t0);
    for (i = 0; i < p.njobs; i++) free(p.jobs[i].argmax);
    free(p.jobs);
    free(text);
    return 0;
}

/* ======================================================================= */
/*  generation                                                             */
/* ======================================================================= */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double uniform01(void) {
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

static int sample(const float *lg, int n, float temp) {
    int i, a = 0;
    double mx, sum = 0, u;
    for (i = 1; i < n; i++) if (lg[i] > lg[a]) a = i;
    if (temp <= 0) return a;
    mx = lg[a];
    for (i = 0; i < n; i++) sum += exp((lg[i] - mx) / temp);
    u = uniform01() * sum;
    for (i = 0; i < n; i++) {
        u -= exp((lg[i] - mx) / temp);
        if (u <= 0) return i;
    }
    return a;
}

static void put_byte(int c) {
    if (c == '\n' || c == '\t' || (c >= 32 && c < 127)) putchar(c);
    else if (c >= 128) putchar(c);     /* UTF-8 bytes pass through */
    else printf("\\x%02x", c);
}

static void usage(void) {
    fprintf(stderr,
        "usage: generate [--model FILE] [--prompt TEXT] [--tokens N] [--temp T] [--seed N]\n"
        "                [--ks S] [--vs S] [--window W] [--backend auto|cpu|cuda]\n"
        "       generate --eval FILE [--ctx N] [--segments N] [--grid quick|kv|full]\n"
        "                [--threads N] [--csv OUT] [--model FILE] [--backend ...]\n"
        "  --ks/--vs    K and V sparsity (default 0.7 / 0.7), --window dense window (32)\n"
        "  --temp 0     greedy (default); > 0 samples with that temperature\n"
        "  --grid       quick: dense, K=V 0.5/0.7 at windows 0/32; kv: dense, K=V\n"
        "               0.3-0.9 at windows 0/32/128; full: kv plus K only and V only\n");
}

int main(int argc, char **argv) {
    const char *model_path = "examples/model/tiny.safetensors", *prompt = "def ", *eval_path = NULL;
    const char *grid = "quick", *csv = NULL;
    int ntok = 200, window = 32, ctx = 512, segments = 1, threads = 1, i;
    float ks = 0.7f, vs = 0.7f, temp = 0.0f;
    mustafar_backend backend = MUSTAFAR_BACKEND_AUTO;
    char err[1024];
    model m;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        if (!v) { fprintf(stderr, "%s needs a value\n", a); usage(); return 2; }
        i++;
        if (!strcmp(a, "--model")) model_path = v;
        else if (!strcmp(a, "--prompt")) prompt = v;
        else if (!strcmp(a, "--tokens")) ntok = atoi(v);
        else if (!strcmp(a, "--temp")) temp = (float)atof(v);
        else if (!strcmp(a, "--seed")) rng_state = (uint64_t)strtoull(v, NULL, 10) * 0x9E3779B97F4A7C15ull + 1;
        else if (!strcmp(a, "--ks")) ks = (float)atof(v);
        else if (!strcmp(a, "--vs")) vs = (float)atof(v);
        else if (!strcmp(a, "--window")) window = atoi(v);
        else if (!strcmp(a, "--eval")) eval_path = v;
        else if (!strcmp(a, "--ctx")) ctx = atoi(v);
        else if (!strcmp(a, "--segments")) segments = atoi(v);
        else if (!strcmp(a, "--grid")) grid = v;
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--csv")) csv = v;
        else if (!strcmp(a, "--backend"))
            backend = !strcmp(v, "cpu") ? MUSTAFAR_BACKEND_CPU : !strcmp(v, "cuda") ? MUSTAFAR_BACKEND_CUDA
                                                                                   : MUSTAFAR_BACKEND_AUTO;
        else { fprintf(stderr, "unknown option %s\n", a); usage(); return 2; }
    }
    if (!model_open(&m, model_path, err, sizeof err)) { fprintf(stderr, "cannot load the model: %s\n", err); return 1; }
    if (eval_path) {
        int rc;
        if (ctx < 1 || segments < 1 || threads < 1) { fprintf(stderr, "bad --ctx, --segments or --threads\n"); return 2; }
        rc = run_eval(&m, eval_path, ctx, segments, grid, threads, backend, csv);
        model_free(&m);
        return rc;
    }
    {
        int plen = (int)strlen(prompt), cap, *tok, n, next;
        float *logits = (float *)malloc(sizeof(float) * m.vocab);
        runner r;
        double t0, t1, t2;
        mustafar_cache_stats cs;
        if (plen < 1) { fprintf(stderr, "the prompt is empty\n"); return 2; }
        if (ntok < 0) ntok = 0;
        cap = plen + ntok;
        tok = (int *)malloc(sizeof(int) * (size_t)cap);
        for (i = 0; i < plen; i++) tok[i] = (unsigned char)prompt[i];
        if (!runner_init(&r, &m, backend, 0, ks, vs, window, plen, cap, 0)) {
            fprintf(stderr, "cannot set up the cache: %s\n", r.err);
            return 1;
        }
        printf("model: %s: %d layers, d_model %d, %d query heads, %d KV heads, head_dim %d, d_ff %d\n",
               model_path, m.nl, m.dm, m.hq, m.hkv, m.hd, m.dff);
        printf("cache: K %.0f %% / V %.0f %% pruned, dense window %d, backend %s (matmuls on the CPU)\n",
               100.0 * ks, 100.0 * vs, window,
               mustafar_context_backend(r.ctx) == MUSTAFAR_BACKEND_CUDA ? "CUDA" : "CPU");
        printf("----\n%s", prompt);
        fflush(stdout);
        t0 = now_s();
        if (!forward(&r, tok, plen, logits, 0)) { fprintf(stderr, "\nforward: %s\n", r.err); return 1; }
        t1 = now_s();
        n = plen;
        for (i = 0; i < ntok; i++) {
            next = sample(logits, m.vocab, temp);
            tok[n++] = next;
            put_byte(next);
            fflush(stdout);
            if (i + 1 < ntok && !forward(&r, &tok[n - 1], 1, logits, 0)) { fprintf(stderr, "\nforward: %s\n", r.err); return 1; }
        }
        t2 = now_s();
        mustafar_cache_stats_get(r.cache, &cs);
        printf("\n----\nprefill: %d tokens in %.3f s (%.0f tokens/s); decode: %d tokens in %.3f s (%.1f tokens/s)\n",
               plen, t1 - t0, plen / (t1 - t0), ntok, t2 - t1, ntok > 1 ? (ntok - 1) / (t2 - t1) : 0.0);
        printf("KV cache: %lld bytes held for %d tokens vs %lld dense fp16 (%.1f %%; %lld token vectors, "
               "%lld compressed)\n", (long long)cs.record_bytes, mustafar_cache_sequence_length(r.cache, r.seq, 0),
               (long long)cs.dense_bytes, 100.0 * cs.compression_ratio, (long long)cs.token_vectors,
               (long long)cs.compressed_vectors);
        runner_free(&r);
        free(tok);
        free(logits);
    }
    model_free(&m);
    return 0;
}
#endif
