/* mustafar.h - v0.3.2 - compressed KV cache and sparse decode attention
   for LLM inference, in one C header.  Public domain / MIT (see end of file).

   WHAT IT IS

   mustafar.h prunes an LLM's Key and Value cache per token by magnitude
   (the rule of the Mustafar paper, NeurIPS 2025), stores every pruned token
   vector as one fixed-size bitmap record, and runs decode attention directly
   on those records plus a small dense window of the newest tokens.  It runs
   on NVIDIA GPUs through kernels compiled at run time with NVRTC for the GPU
   it finds, and on the CPU through the same API.

   At 70 % sparsity a head_dim-128 fp16 token vector takes 96 bytes instead of
   256 (37.5 % of dense, every byte of metadata included); at 50 %, 144 bytes.

   INTEGRATION

   Copy mustafar.h into your project.  In exactly one C or C++ file:

       #define MUSTAFAR_IMPLEMENTATION
       #include "mustafar.h"

   and build with no CUDA flags: cc app.c -lm (-ldl -lpthread on glibc
   before 2.34; nothing on Windows).  The CUDA runtime and NVRTC (CUDA 12.0
   or newer) are loaded at run time when present; without them, or without a
   usable GPU, the CPU backend serves every call.  To link CUDA instead,
   define MUSTAFAR_CUDA_LINKED and build with CUDA's include path, -lcudart
   -lnvrtc.

   CONTENTS (search for the tag)

       >>api            types and functions (after this comment)
       >>common         helpers, fp16/bf16, status, format, pruning, records,
                        the host/kernel contract, layout and checks
       >>cpu            the CPU backend
       >>cuda           the CUDA backend: state, NVRTC JIT and disk cache,
                        memory, operations
       >>dispatch       one function per operation, the backend chosen there
       >>public         context, stateless calls, cache object
       >>kernel_source  mustafar_kernels.cuh, embedded (generated)
       >>history        revision history
       >>license        MIT or public domain

   EXAMPLE (error checks left out)

       mustafar_context *ctx;  mustafar_cache *cache;  int seq;
       mustafar_context_desc cd;  mustafar_cache_desc d;
       memset(&cd, 0, sizeof cd);                      // zero fields: defaults
       cd.backend = MUSTAFAR_BACKEND_AUTO;             // the GPU if usable, else CPU
       mustafar_context_create(&cd, &ctx);
       memset(&d, 0, sizeof d);
       d.num_layers = 32; d.num_kv_heads = 8; d.num_q_heads = 32;
       d.head_dim = 128; d.k_sparsity = 0.7f; d.v_sparsity = 0.7f;
       d.dense_window = 32; d.max_sequences = 1;      // windows: 4.2 MB each
       d.capacity_tokens = 1 << 16;     // 64k tokens: 3.2 GB of records (MEMORY)
       mustafar_cache_create(ctx, &d, &cache);
       mustafar_cache_add_sequence(cache, &seq);
       int n = prompt_len;                             // prefill, then 1 per step
       for (int l = 0; l < 32; l++)    // mustafar_cache_append + _attention in one
           mustafar_cache_decode_step(cache, l, 1, &seq, &n, k[l], v[l], q[l], out[l], 0.0f);

   OPTIONS (define before including)

       MUSTAFAR_NO_CUDA        CPU backend only; no CUDA code at all.
       MUSTAFAR_CUDA_LINKED    include CUDA's headers and link -lcudart -lnvrtc
                               instead of loading them at run time.
       MUSTAFAR_API            decoration of every public function
                               (default: extern, or static with MUSTAFAR_STATIC).
       MUSTAFAR_STATIC         make every function static to the including file.
       MUSTAFAR_MALLOC(sz)     allocator (default malloc) and its MUSTAFAR_FREE(p):
       MUSTAFAR_FREE(p)        define both or neither (#error otherwise).
       MUSTAFAR_ASSERT(x)      internal assertion (default assert).

   ENVIRONMENT

       MUSTAFAR_CUDA_PATH      directories searched first for the CUDA runtime
                               and NVRTC (libcudart.so.13/.12, libnvrtc.so.13/.12;
                               cudart64_13/12.dll, nvrtc64_130_0/120_0.dll),
                               before the system's own search.
       MUSTAFAR_CACHE_DIR      where compiled kernels are cached on disk
                               (default $XDG_CACHE_HOME/mustafar, else
                               $HOME/.cache/mustafar); "off" disables the cache.
       MUSTAFAR_CPU_SIMD       scalar, avx2, avx512 or neon: the CPU backend's SIMD path
                               (read at context creation; default: the best the
                               CPU has, found with cpuid on x86-64; a path the
                               CPU lacks falls back to scalar).

   CPU THREADS

   A CPU context runs each call on mustafar_context_desc.num_threads threads
   (0: the number of cores), its own pool started on first use and joined by
   mustafar_context_destroy, or on the desc's parallel_for callback (a job
   system's).  Stateless calls with ctx == NULL, and every call of a context
   with num_threads 1, run on the calling thread (parallel_for is not
   called).  Results do not depend on the thread count; they may differ in
   the last bits between SIMD paths (AVX-512, AVX2, NEON, scalar), as the
   sums are taken in a different order.

   MEMORY

   mustafar_cache_create allocates all that a cache holds, once; its
   stats.allocated_bytes reports the total:
       K and V pools  layers x ceil(capacity_tokens / page_size) x page_size
                      x Hkv x (k_record_bytes + v_record_bytes)
       dense windows  layers x max_sequences x dense_window x Hkv x D x 2 x 2
                      bytes (K and V): max_sequences 0 means 64, so set it
                      to the number of sequences run at once
       page table     max_sequences x ceil(max_sequence_length / page_size)
                      x 4 bytes (on CUDA a host and a device copy)
   E.g. 32 layers, Hkv 8, D 128, s 0.7, 64k tokens: 3.22 GB of records;
   windows of 32 tokens add 4.2 MB per sequence (268 MB for 64).
   A CPU context keeps its attention's work space, grown to the largest call
   and freed by mustafar_context_destroy: partial results of 4 x (G(2D + 34)
   + D) bytes for each (token split, KV head), with about 4 x num_threads
   splits in all (B=1, Hq/Hkv 32/8, D 128, 16 threads: 2.6 MB).  CUDA's
   device scratch likewise stays with the context.  Other work space is
   allocated through MUSTAFAR_MALLOC and freed before the call returns (a
   CPU decode step: 3 blocks, under 1 KB for 3 sequences; a stateless call
   with ctx NULL also allocates its attention work space each time).
   mustafar_cache_load and _load_file hold the stream's records in host
   memory while they check them, before the cache changes; _load_memory
   checks them in place.

   CONCEPTS

   Layout of a token vector: head_dim (D) elements of fp16 or bf16.  Shapes are
   written outermost first: q [nseq][Hq][D] means nseq*Hq*D elements with the
   D of one head contiguous.  Query head h reads KV head h / (Hq/Hkv).

   Pruning rule: of D elements, p = floor(s*D) are set to zero and exactly
   n = D - p are kept: the n of largest magnitude, ties broken towards the
   lower channel index.  Every token vector of a cache keeps the same count,
   so every record has the same size.  The authors' PyTorch code keeps every
   |x| >= the p-th smallest magnitude, which keeps one element more than this
   rule when there are no ties; we keep exactly n so records are fixed-size.
   Magnitudes are compared as the 15 low bits of the fp16/bf16 encoding, which
   orders them exactly: +0 and -0 tie, Inf ranks above every finite value, and
   NaN ranks above Inf, so NaN is always kept (it propagates into attention
   instead of vanishing; more than n NaNs keep those with the larger payload).
   s*D is computed in double with a 1e-6 guard (0.7*128 -> 89 pruned).

   Record (format version MUSTAFAR_FORMAT_VERSION), one per token vector:
       bytes [0, D/8)            bitmap: bit c%32 of little-endian uint32 word
                                 c/32 is set when channel c is kept
       bytes [D/8, D/8 + 2n)     the n kept values, in channel order
       up to a multiple of 16    zero padding
   D=128 fp16: s=0.5 -> 144 bytes, s=0.7 -> 96 bytes (dense is 256).

   Paged cache: pages of page_size token positions, shared by all layers.
       k_pages  [layers][num_pages][Hkv][page_size][k_record_bytes]
       v_pages  [layers][num_pages][Hkv][page_size][v_record_bytes]
       page table [max_sequences][max_pages_per_sequence] int32
   Token position p of a sequence is in page table[row][p / page_size], slot
   p % page_size.  The newest dense_window positions of a sequence stay dense
   in a ring: position p lives at window slot p % dense_window of
       k_window [layers][max_sequences][dense_window][Hkv][D]
   Positions [0, num_compressed) are records; [num_compressed, length) are in
   the window.  A token leaves the window (and is compressed) when the
   sequence grows past dense_window tokens.

   Two API layers.  (a) Stateless calls on caller-owned memory: mustafar_prune,
   mustafar_compress, mustafar_decompress, mustafar_paged_write and
   mustafar_paged_attention, for engines with their own memory manager.
   (b) mustafar_cache, which owns a pool, page tables and dense windows.
   With a CUDA context every pointer is device memory, 16-byte aligned (as
   cudaMalloc returns it; others get MUSTAFAR_ERROR_INVALID_ARGUMENT), and
   work is queued on the context's stream; with a CPU context (or ctx == NULL
   in the stateless calls) every pointer is host memory.

   ERRORS

   Every call returns a mustafar_status; mustafar_status_string() names it and
   mustafar_last_error(ctx) holds a sentence about the last failure (with the
   NVRTC log or CUDA error name where there is one); mustafar_last_error(NULL)
   that of the last failed stateless call made with ctx NULL on the calling
   thread.  A failed call leaves the cache as it was.

   Calls on one context must not run concurrently from several threads;
   separate contexts may be used from separate threads at once.  Destroying
   a context releases the memory of its caches: their handles then accept
   only mustafar_cache_destroy (other calls return
   MUSTAFAR_ERROR_WRONG_BACKEND).  The CUDA backend
   switches to the context's device for each call and back to the caller's.
*/
/* ==== >>api ======================================================================= */
#ifndef MUSTAFAR_H
#define MUSTAFAR_H

#include <stddef.h>
#include <stdint.h>

#define MUSTAFAR_VERSION_MAJOR 0
#define MUSTAFAR_VERSION_MINOR 3
#define MUSTAFAR_VERSION_PATCH 2
#define MUSTAFAR_VERSION_STRING "0.3.2"
/* Version of the record and page layout; bumped on any change to them. */
#define MUSTAFAR_FORMAT_VERSION 1

#ifndef MUSTAFAR_API
#  ifdef MUSTAFAR_STATIC
#    if defined(__GNUC__) || defined(__clang__)
#      define MUSTAFAR_API static __attribute__((unused))
#    else
#      define MUSTAFAR_API static
#    endif
#  else
#    define MUSTAFAR_API extern
#  endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mustafar_status {
    MUSTAFAR_OK = 0,
    MUSTAFAR_ERROR_NULL_POINTER,        /* a required pointer was NULL */
    MUSTAFAR_ERROR_INVALID_ARGUMENT,    /* a count, size or index out of range */
    MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM,/* head_dim not 64, 128 or 256 */
    MUSTAFAR_ERROR_UNSUPPORTED_DTYPE,   /* dtype not fp16 or bf16 */
    MUSTAFAR_ERROR_INVALID_SPARSITY,    /* sparsity outside [0, 1) or NaN */
    MUSTAFAR_ERROR_UNKNOWN_SEQUENCE,    /* sequence id not live in the cache */
    MUSTAFAR_ERROR_DUPLICATE_SEQUENCE,  /* a sequence id twice in one call */
    MUSTAFAR_ERROR_TOO_MANY_SEQUENCES,  /* max_sequences already live */
    MUSTAFAR_ERROR_SEQUENCE_TOO_LONG,   /* past max_sequence_length */
    MUSTAFAR_ERROR_POOL_FULL,           /* not enough free pages */
    MUSTAFAR_ERROR_OUT_OF_MEMORY,       /* host or device allocation failed */
    MUSTAFAR_ERROR_BACKEND_UNAVAILABLE, /* CUDA asked for but not usable */
    MUSTAFAR_ERROR_WRONG_BACKEND,       /* object of another context/backend */
    MUSTAFAR_ERROR_CUDA,                /* a CUDA runtime call failed */
    MUSTAFAR_ERROR_JIT,                 /* NVRTC compile or module load failed */
    MUSTAFAR_ERROR_INVALID_FILE,        /* a saved stream is truncated, corrupt or of another shape */
    MUSTAFAR_ERROR_IO,                  /* a file or stream callback failed */
    MUSTAFAR_STATUS_COUNT
} mustafar_status;

typedef enum mustafar_dtype {
    MUSTAFAR_DTYPE_DEFAULT = 0,         /* fp16 */
    MUSTAFAR_DTYPE_F16 = 1,
    MUSTAFAR_DTYPE_BF16 = 2
} mustafar_dtype;

typedef enum mustafar_backend {
    MUSTAFAR_BACKEND_AUTO = 0,          /* CUDA if a usable GPU, else CPU */
    MUSTAFAR_BACKEND_CPU = 1,
    MUSTAFAR_BACKEND_CUDA = 2
} mustafar_backend;

typedef struct mustafar_context mustafar_context;
typedef struct mustafar_cache mustafar_cache;

typedef struct mustafar_context_desc {
    mustafar_backend backend;
    int cuda_device;               /* device ordinal (0 is the first GPU) */
    void *cuda_stream;             /* cudaStream_t for all work; NULL: default */
    const char *jit_cache_dir;     /* NULL: $MUSTAFAR_CACHE_DIR, else default */
    const char *cuda_path;         /* directories searched first for the CUDA runtime
                                      and NVRTC (':'-separated, ';' on Windows);
                                      NULL: $MUSTAFAR_CUDA_PATH */
    int disable_jit_cache;         /* nonzero: never read or write the disk cache */
    char *error_buffer;            /* optional: receives the reason if create fails */
    size_t error_buffer_size;
    /* CPU backend: threads of one call, the caller's included; 0: the number
       of cores.  With parallel_for set, the library calls it instead of
       starting its own pool: it must run task(task_data, i) for every i in
       [0, count), on any threads, and return when all have finished. */
    int num_threads;
    void (*parallel_for)(void (*task)(void *task_data, int index), void *task_data, int count,
                         void *user_data);
    void *parallel_for_user_data;
} mustafar_context_desc;

typedef struct mustafar_cache_desc {
    int num_layers;                /* required */
    int num_kv_heads;              /* required (Hkv) */
    int num_q_heads;               /* 0: = num_kv_heads; a multiple of Hkv */
    int head_dim;                  /* 0: 128; else 64, 128 or 256 */
    float k_sparsity;              /* in [0, 1); 0 keeps every element */
    float v_sparsity;
    int dense_window;              /* newest tokens kept dense; 0: none; more than
                                      max_sequence_length: max_sequence_length
                                      (every token stays dense) */
    int page_size;                 /* tokens per page; 0: 16; more than
                                      max_sequence_length: max_sequence_length */
    int64_t capacity_tokens;       /* pool size in token positions; required */
    int max_sequences;             /* 0: 64 */
    int max_sequence_length;       /* 0: capacity_tokens */
    mustafar_dtype dtype;          /* 0: fp16 */
} mustafar_cache_desc;

typedef struct mustafar_cache_stats {
    int sequences;                 /* live sequences */
    int64_t pages_used, pages_total;
    int64_t token_vectors;         /* (token, layer, KV head) vectors held, K or V */
    int64_t compressed_vectors;    /* of which in records */
    int64_t record_bytes;          /* bytes of the records and window data held */
    int64_t reserved_bytes;        /* pool pages in use + windows of live sequences */
    int64_t allocated_bytes;       /* everything the cache holds, fixed at create (MEMORY) */
    int64_t dense_bytes;           /* the same tokens stored dense (K + V) */
    double compression_ratio;      /* record_bytes / dense_bytes */
} mustafar_cache_stats;

/* Stateless paged layout, caller-owned (see CONCEPTS for the layouts). */
typedef struct mustafar_paged_kv {
    int head_dim;
    mustafar_dtype dtype;
    float k_sparsity, v_sparsity;
    int num_kv_heads, num_q_heads;
    int page_size;
    void *k_pages, *v_pages;       /* [num_pages][Hkv][page_size][record] */
    const int32_t *page_table;     /* [num_rows][page_table_stride] page ids */
    int page_table_stride;
    int num_rows;                  /* rows of the page table and the windows */
    int num_pages;                 /* page ids are checked against it on the CPU */
    void *k_window, *v_window;     /* [rows][window_size][Hkv][D]; may be NULL if 0 */
    int window_size;
} mustafar_paged_kv;

/* One sequence of a stateless call; an array of these lives in the backend's
   memory (device memory for CUDA). */
typedef struct mustafar_paged_seq {
    int32_t row;                   /* page-table row and window row */
    int32_t num_compressed;        /* positions [0, num_compressed) in pages */
    int32_t num_window;            /* then this many in the window ring */
    int32_t reserved;              /* set to 0 */
} mustafar_paged_seq;

/* ---- status, version ---------------------------------------------------- */
MUSTAFAR_API const char *mustafar_status_string(mustafar_status status);
MUSTAFAR_API const char *mustafar_version_string(void);

/* ---- context ------------------------------------------------------------ */
MUSTAFAR_API mustafar_status mustafar_context_create(const mustafar_context_desc *desc,
                                                     mustafar_context **out);
MUSTAFAR_API void mustafar_context_destroy(mustafar_context *ctx);
MUSTAFAR_API mustafar_backend mustafar_context_backend(const mustafar_context *ctx);
/* Human-readable message of the last failure, or of the AUTO fallback. */
MUSTAFAR_API const char *mustafar_last_error(const mustafar_context *ctx);

/* Waits for all work queued on the context (its CUDA stream); no-op on the CPU. */
MUSTAFAR_API mustafar_status mustafar_context_synchronize(mustafar_context *ctx);

/* ---- backend memory ------------------------------------------------------
   Memory the context's backend reads: device memory for CUDA (cudaMalloc),
   host memory for the CPU; so one program drives either backend without a
   CUDA header.  Allocations are zeroed; on CUDA 256-byte aligned, on the
   CPU as MUSTAFAR_MALLOC aligns (the CPU backend needs no alignment).  An
   upload is queued on the context's stream (src may be reused on return); a
   download waits for all queued work, then copies. */
MUSTAFAR_API mustafar_status mustafar_memory_alloc(mustafar_context *ctx, size_t bytes, void **out);
MUSTAFAR_API void mustafar_memory_free(mustafar_context *ctx, void *p);
MUSTAFAR_API mustafar_status mustafar_memory_upload(mustafar_context *ctx, void *dst,
                                                    const void *src, size_t bytes);
MUSTAFAR_API mustafar_status mustafar_memory_download(mustafar_context *ctx, void *dst,
                                                      const void *src, size_t bytes);

/* ---- fp16 / bf16 -------------------------------------------------------- */
MUSTAFAR_API float mustafar_f16_to_f32(uint16_t h);
MUSTAFAR_API uint16_t mustafar_f32_to_f16(float f);   /* round to nearest even */
MUSTAFAR_API float mustafar_bf16_to_f32(uint16_t h);
MUSTAFAR_API uint16_t mustafar_f32_to_bf16(float f);  /* round to nearest even */

/* ---- format ------------------------------------------------------------- */
/* Elements kept per token vector (n = D - floor(s*D)); 0 if arguments invalid. */
MUSTAFAR_API int mustafar_kept_count(int head_dim, float sparsity);
/* Bytes of one record; 0 if arguments invalid. */
MUSTAFAR_API size_t mustafar_record_bytes(int head_dim, float sparsity, mustafar_dtype dtype);

/* ---- stateless operations (layer a) -------------------------------------
   ctx NULL or a CPU context: host pointers.  CUDA context: device pointers,
   16-byte aligned.
   x, y: [count][D];  records: [count][record_bytes].                       */
MUSTAFAR_API mustafar_status mustafar_prune(mustafar_context *ctx, int head_dim, float sparsity,
                                            mustafar_dtype dtype, const void *x, void *y,
                                            size_t count);
MUSTAFAR_API mustafar_status mustafar_compress(mustafar_context *ctx, int head_dim, float sparsity,
                                               mustafar_dtype dtype, const void *x, void *records,
                                               size_t count);
MUSTAFAR_API mustafar_status mustafar_decompress(mustafar_context *ctx, int head_dim, float sparsity,
                                                 mustafar_dtype dtype, const void *records, void *x,
                                                 size_t count);
/* Compress ntokens[i] token vectors of every sequence i into its pages at
   positions first_position[i]..; k, v: [sum ntokens][Hkv][D] packed in
   sequence order.  rows, first_position, ntokens: host arrays. */
MUSTAFAR_API mustafar_status mustafar_paged_write(mustafar_context *ctx, const mustafar_paged_kv *kv,
                                                  int nseq, const int32_t *rows,
                                                  const int32_t *first_position,
                                                  const int32_t *ntokens, const void *k,
                                                  const void *v);
/* out[i][h] = softmax(q[i][h] . K^T * scale) . V over the sequence's records
   and window.  q, out: [nseq][Hq][D]; seqs: nseq entries in backend memory.
   scale 0: 1/sqrt(D).  A sequence with no tokens gets zeros. */
MUSTAFAR_API mustafar_status mustafar_paged_attention(mustafar_context *ctx,
                                                      const mustafar_paged_kv *kv, int nseq,
                                                      const mustafar_paged_seq *seqs,
                                                      const void *q, void *out, float scale);

/* ---- cache object (layer b) --------------------------------------------- */
MUSTAFAR_API mustafar_status mustafar_cache_create(mustafar_context *ctx,
                                                   const mustafar_cache_desc *desc,
                                                   mustafar_cache **out);
MUSTAFAR_API void mustafar_cache_destroy(mustafar_cache *cache);
MUSTAFAR_API mustafar_status mustafar_cache_add_sequence(mustafar_cache *cache, int *seq_id);
MUSTAFAR_API mustafar_status mustafar_cache_remove_sequence(mustafar_cache *cache, int seq_id);
/* Append ntokens[i] tokens to sequence seq_ids[i] in one layer.  k, v:
   [sum ntokens][Hkv][D] packed in the order of seq_ids (backend memory);
   seq_ids, ntokens: host arrays.  Every layer must be appended the same tokens. */
MUSTAFAR_API mustafar_status mustafar_cache_append(mustafar_cache *cache, int layer, int nseq,
                                                   const int *seq_ids, const int *ntokens,
                                                   const void *k, const void *v);
/* Decode attention of one query token per sequence.  q, out: [nseq][Hq][D]
   (backend memory); scale 0: 1/sqrt(D). */
MUSTAFAR_API mustafar_status mustafar_cache_attention(mustafar_cache *cache, int layer, int nseq,
                                                      const int *seq_ids, const void *q, void *out,
                                                      float scale);
/* One decode step of one layer: mustafar_cache_append of k, v, then
   mustafar_cache_attention of q, in one call.  On sm_90+ GPUs the attention
   then starts while the append compresses the tokens leaving the window,
   on the positions that append does not touch, instead of after it.  Bad
   input fails before anything is appended; should the attention fail after
   the append (a CUDA error, or no memory for its scratch or sequence list),
   the tokens stay appended and the error is returned. */
MUSTAFAR_API mustafar_status mustafar_cache_decode_step(mustafar_cache *cache, int layer, int nseq,
                                                        const int *seq_ids, const int *ntokens,
                                                        const void *k, const void *v, const void *q,
                                                        void *out, float scale);
/* Tokens of a sequence in one layer; -1 if the id or layer is not valid. */
MUSTAFAR_API int mustafar_cache_sequence_length(const mustafar_cache *cache, int seq_id, int layer);
MUSTAFAR_API mustafar_status mustafar_cache_stats_get(const mustafar_cache *cache,
                                                      mustafar_cache_stats *out);
/* ---- save and restore ----------------------------------------------------
   A versioned, little-endian stream with a checksum per section (layout in
   the implementation, >>public), for one sequence (seq_id) or every live
   one (seq_id -1), that a program can embed in its own save file.  Loading
   adds the stream's sequences as new sequences (their ids in seq_ids, at
   most max_ids; *count of them) into a cache of the same layers, heads,
   head_dim, dtype, kept counts and dense window (page size and capacity may
   differ).  It checks the whole stream first: a truncated, corrupt or
   mismatched stream, or too little room, fails with a clear status and
   leaves the cache as it was (the stream is held in host memory while it
   is checked, except by _load_memory, which reads the caller's buffer).  Streams load across backends bit for bit.
   The callbacks return the bytes they wrote or read (a read returns 0 at
   the end). */
typedef size_t (*mustafar_write_fn)(void *user, const void *data, size_t bytes);
typedef size_t (*mustafar_read_fn)(void *user, void *data, size_t bytes);
MUSTAFAR_API mustafar_status mustafar_cache_save(mustafar_cache *cache, int seq_id,
                                                 mustafar_write_fn write, void *user);
MUSTAFAR_API mustafar_status mustafar_cache_load(mustafar_cache *cache, mustafar_read_fn read,
                                                 void *user, int *seq_ids, int max_ids, int *count);
/* Bytes mustafar_cache_save writes for seq_id. */
MUSTAFAR_API mustafar_status mustafar_cache_save_size(const mustafar_cache *cache, int seq_id,
                                                      size_t *bytes);
MUSTAFAR_API mustafar_status mustafar_cache_save_memory(mustafar_cache *cache, int seq_id,
                                                        void *buffer, size_t capacity,
                                                        size_t *written);
MUSTAFAR_API mustafar_status mustafar_cache_load_memory(mustafar_cache *cache, const void *buffer,
                                                        size_t bytes, int *seq_ids, int max_ids,
                                                        int *count);
/* Through a temporary file renamed over `path` once complete.  Paths here,
   in jit_cache_dir and in MUSTAFAR_CACHE_DIR are UTF-8; on Windows one that
   is not valid UTF-8 is taken in the ANSI code page. */
MUSTAFAR_API mustafar_status mustafar_cache_save_file(mustafar_cache *cache, int seq_id,
                                                      const char *path);
MUSTAFAR_API mustafar_status mustafar_cache_load_file(mustafar_cache *cache, const char *path,
                                                      int *seq_ids, int max_ids, int *count);

/* The cache's layout as a stateless view of one layer (for inspection,
   tests, or to mix the two layers). */
MUSTAFAR_API mustafar_status mustafar_cache_layer_view(const mustafar_cache *cache, int layer,
                                                       mustafar_paged_kv *out);
/* The stateless entry describing a sequence (host memory). */
MUSTAFAR_API mustafar_status mustafar_cache_sequence_view(const mustafar_cache *cache, int seq_id,
                                                          int layer, mustafar_paged_seq *out);

#ifdef __cplusplus
}
#endif
#endif /* MUSTAFAR_H */

/* ========================================================================= */
/*                              IMPLEMENTATION                               */
/* ========================================================================= */
#ifdef MUSTAFAR_IMPLEMENTATION
#ifndef MUSTAFAR_IMPLEMENTATION_DONE
#define MUSTAFAR_IMPLEMENTATION_DONE

/* ==== >>common: helpers, conversions, status, format, pruning, records, layout ==== */

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _WIN32
#  ifndef WIN32_LEAN_AND_MEAN
#    define WIN32_LEAN_AND_MEAN
#  endif
#  include <windows.h>
#  include <direct.h>   /* _wmkdir */
#endif

#if defined(MUSTAFAR_MALLOC) && defined(MUSTAFAR_FREE)
#elif !defined(MUSTAFAR_MALLOC) && !defined(MUSTAFAR_FREE)
#  define MUSTAFAR_MALLOC(sz) malloc(sz)
#  define MUSTAFAR_FREE(p) free(p)
#else
#  error "mustafar.h: define both MUSTAFAR_MALLOC and MUSTAFAR_FREE, or neither"
#endif
#if defined(_MSC_VER)
#  include <intrin.h>   /* _BitScanForward */
#endif
#ifndef MUSTAFAR_ASSERT
#  include <assert.h>
#  define MUSTAFAR_ASSERT(x) assert(x)
#endif

#define MUSTAFAR__MSG_CAP 8192
#define MUSTAFAR__UNUSED(x) ((void)(x))

/* ---- small helpers -------------------------------------------------------- */

static void *mustafar__calloc(size_t bytes)
{
    void *p = MUSTAFAR_MALLOC(bytes ? bytes : 1);
    if (p) memset(p, 0, bytes ? bytes : 1);
    return p;
}

static uint32_t mustafar__f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float mustafar__bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static size_t mustafar__round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }
/* FNV-1a, 64 bit: the checksum of disk-cache entries and saved streams. */
static uint64_t mustafar__fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* Pages that hold `positions` token positions (positions >= 0, page_size >= 1;
   no overflow up to INT64_MAX). */
static int64_t mustafar__pages_for(int64_t positions, int page_size)
{
    return positions / page_size + (positions % page_size != 0);
}

static int mustafar__ctz32(uint32_t x) /* x != 0 */
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctz(x);
#elif defined(_MSC_VER)
    unsigned long n;
    _BitScanForward(&n, x);
    return (int)n;
#else
    int n = 0;
    while (!(x & 1u)) { x >>= 1; n++; }
    return n;
#endif
}

/* ---- status strings, version --------------------------------------------- */

MUSTAFAR_API const char *mustafar_status_string(mustafar_status status)
{
    switch (status) {
    case MUSTAFAR_OK: return "MUSTAFAR_OK";
    case MUSTAFAR_ERROR_NULL_POINTER: return "MUSTAFAR_ERROR_NULL_POINTER";
    case MUSTAFAR_ERROR_INVALID_ARGUMENT: return "MUSTAFAR_ERROR_INVALID_ARGUMENT";
    case MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM: return "MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM";
    case MUSTAFAR_ERROR_UNSUPPORTED_DTYPE: return "MUSTAFAR_ERROR_UNSUPPORTED_DTYPE";
    case MUSTAFAR_ERROR_INVALID_SPARSITY: return "MUSTAFAR_ERROR_INVALID_SPARSITY";
    case MUSTAFAR_ERROR_UNKNOWN_SEQUENCE: return "MUSTAFAR_ERROR_UNKNOWN_SEQUENCE";
    case MUSTAFAR_ERROR_DUPLICATE_SEQUENCE: return "MUSTAFAR_ERROR_DUPLICATE_SEQUENCE";
    case MUSTAFAR_ERROR_TOO_MANY_SEQUENCES: return "MUSTAFAR_ERROR_TOO_MANY_SEQUENCES";
    case MUSTAFAR_ERROR_SEQUENCE_TOO_LONG: return "MUSTAFAR_ERROR_SEQUENCE_TOO_LONG";
    case MUSTAFAR_ERROR_POOL_FULL: return "MUSTAFAR_ERROR_POOL_FULL";
    case MUSTAFAR_ERROR_OUT_OF_MEMORY: return "MUSTAFAR_ERROR_OUT_OF_MEMORY";
    case MUSTAFAR_ERROR_BACKEND_UNAVAILABLE: return "MUSTAFAR_ERROR_BACKEND_UNAVAILABLE";
    case MUSTAFAR_ERROR_WRONG_BACKEND: return "MUSTAFAR_ERROR_WRONG_BACKEND";
    case MUSTAFAR_ERROR_CUDA: return "MUSTAFAR_ERROR_CUDA";
    case MUSTAFAR_ERROR_JIT: return "MUSTAFAR_ERROR_JIT";
    case MUSTAFAR_ERROR_INVALID_FILE: return "MUSTAFAR_ERROR_INVALID_FILE";
    case MUSTAFAR_ERROR_IO: return "MUSTAFAR_ERROR_IO";
    case MUSTAFAR_STATUS_COUNT: break;
    }
    return "MUSTAFAR_ERROR_UNKNOWN_STATUS";
}

MUSTAFAR_API const char *mustafar_version_string(void) { return MUSTAFAR_VERSION_STRING; }

/* ---- fp16 / bf16 conversions (bit arithmetic, round to nearest even) ------ */

MUSTAFAR_API float mustafar_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24 is exact in float */
        float v = (float)mant * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) return mustafar__bits_f32(sign | 0x7F800000u | (mant << 13));
    return mustafar__bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

MUSTAFAR_API uint16_t mustafar_f32_to_f16(float f)
{
    uint32_t x = mustafar__f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t e, m, r, rem, half;
    int shift;
    x &= 0x7FFFFFFFu;
    if (x > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((x >> 13) & 0x3FFu)); /* NaN */
    if (x >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* >= 65520 rounds to Inf */
    e = x >> 23;
    if (e < 113) {                                            /* result subnormal or 0 */
        if (e < 102) return sign;                             /* < 2^-25 */
        m = (x & 0x7FFFFFu) | 0x800000u;
        shift = 126 - (int)e;                                 /* 14..24 */
        r = m >> shift;
        rem = m & ((1u << shift) - 1u);
        half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    r = ((e - 112u) << 10) | ((x >> 13) & 0x3FFu);
    rem = x & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;   /* may carry into Inf */
    return (uint16_t)(sign | r);
}

MUSTAFAR_API float mustafar_bf16_to_f32(uint16_t h) { return mustafar__bits_f32((uint32_t)h << 16); }

MUSTAFAR_API uint16_t mustafar_f32_to_bf16(float f)
{
    uint32_t x = mustafar__f32_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x0040u); /* quiet NaN */
    x += 0x7FFFu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

static float mustafar__load(mustafar_dtype dt, uint16_t h)
{
    return dt == MUSTAFAR_DTYPE_BF16 ? mustafar_bf16_to_f32(h) : mustafar_f16_to_f32(h);
}
static uint16_t mustafar__store(mustafar_dtype dt, float f)
{
    return dt == MUSTAFAR_DTYPE_BF16 ? mustafar_f32_to_bf16(f) : mustafar_f32_to_f16(f);
}

/* ---- context and errors --------------------------------------------------- */

struct mustafar__cuda;                     /* the CUDA backend's state (>>cuda) */
struct mustafar__cpu;                      /* the CPU backend's state (>>cpu) */

struct mustafar_context {
    mustafar_backend backend;
    char message[MUSTAFAR__MSG_CAP];
    struct mustafar__cuda *cuda;           /* NULL on the CPU backend */
    struct mustafar__cpu *cpu;             /* NULL on the CUDA backend */
    mustafar_cache *caches;                /* live caches, released with the context */
};

/* MinGW-w64 programs call msvcrt.dll's printf family unless the program
   enables __USE_MINGW_ANSI_STDIO, and msvcrt lacks %zu; MinGW's own C99
   implementation formats the messages the same on every build. (MSVC 2015
   and newer, UCRT, is C99 already.) */
#if defined(__MINGW32__)
#  define MUSTAFAR__VSNPRINTF __mingw_vsnprintf
#  define MUSTAFAR__PRINTF_LIKE(a, b) __attribute__((format(gnu_printf, a, b)))
#elif defined(__GNUC__) || defined(__clang__)
#  define MUSTAFAR__VSNPRINTF vsnprintf
#  define MUSTAFAR__PRINTF_LIKE(a, b) __attribute__((format(printf, a, b)))
#else
#  define MUSTAFAR__VSNPRINTF vsnprintf
#  define MUSTAFAR__PRINTF_LIKE(a, b)
#endif

static mustafar_status mustafar__fail(mustafar_context *ctx, mustafar_status status,
                                      const char *fmt, ...) MUSTAFAR__PRINTF_LIKE(3, 4);

/* snprintf through the same C99 formatter (%zu, %lld on every platform). */
static int mustafar__snprintf(char *buf, size_t cap, const char *fmt, ...) MUSTAFAR__PRINTF_LIKE(3, 4);
static int mustafar__snprintf(char *buf, size_t cap, const char *fmt, ...)
{
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = MUSTAFAR__VSNPRINTF(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

/* ---- file paths: UTF-8 (on Windows, a path that is not valid UTF-8 is
   taken in the ANSI code page, as the -A calls take it) ---- */
#ifdef _WIN32
#  define MUSTAFAR__WPATH 2048
/* `path` as UTF-16 into w; 0 if it is not valid UTF-8 or too long. */
static int mustafar__wpath(const char *path, wchar_t *w)
{
    return MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, path, -1, w, MUSTAFAR__WPATH) > 0;
}
#endif

static FILE *mustafar__fopen(const char *path, const char *mode)
{
#ifdef _WIN32
    wchar_t w[MUSTAFAR__WPATH], wm[8];
    if (mustafar__wpath(path, w) && MultiByteToWideChar(CP_UTF8, 0, mode, -1, wm, 8) > 0)
        return _wfopen(w, wm);
#endif
    return fopen(path, mode);
}

static void mustafar__remove(const char *path)
{
#ifdef _WIN32
    wchar_t w[MUSTAFAR__WPATH];
    if (mustafar__wpath(path, w)) { _wremove(w); return; }
#endif
    remove(path);
}

/* Moves file `from` over `to` in one step; nonzero on success.  (On Windows
   rename fails on an existing file, and removing that first could lose it.) */
static int mustafar__replace_file(const char *from, const char *to)
{
#ifdef _WIN32
    wchar_t wf[MUSTAFAR__WPATH], wt[MUSTAFAR__WPATH];
    const DWORD flags = MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH;
    if (mustafar__wpath(from, wf) && mustafar__wpath(to, wt)) return MoveFileExW(wf, wt, flags) != 0;
    return MoveFileExA(from, to, flags) != 0;
#else
    return rename(from, to) == 0;
#endif
}

/* Frees a cache's backend memory and detaches it from its context (>>public). */
static void mustafar__cache_release_backend(mustafar_cache *c);

/* The message of the last failed call with ctx NULL, per thread where the
   compiler has thread-local storage. */
#if defined(__cplusplus) && __cplusplus >= 201103L
#  define MUSTAFAR__THREAD_LOCAL thread_local
#elif defined(_MSC_VER)
#  define MUSTAFAR__THREAD_LOCAL __declspec(thread)
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#  define MUSTAFAR__THREAD_LOCAL _Thread_local
#elif defined(__GNUC__)
#  define MUSTAFAR__THREAD_LOCAL __thread
#endif
#ifdef MUSTAFAR__THREAD_LOCAL
static MUSTAFAR__THREAD_LOCAL char mustafar__stateless_message[512];
#endif

static mustafar_status mustafar__fail(mustafar_context *ctx, mustafar_status status,
                                      const char *fmt, ...)
{
    char *message = ctx ? ctx->message : NULL;
    size_t cap = MUSTAFAR__MSG_CAP;
#ifdef MUSTAFAR__THREAD_LOCAL
    if (!ctx) {
        message = mustafar__stateless_message;
        cap = sizeof mustafar__stateless_message;
    }
#endif
    if (message) {
        va_list ap;
        va_start(ap, fmt);
        MUSTAFAR__VSNPRINTF(message, cap, fmt, ap);
        va_end(ap);
    }
    return status;
}

static int mustafar__is_cuda(const mustafar_context *ctx)
{
    return ctx && ctx->backend == MUSTAFAR_BACKEND_CUDA;
}

/* ---- format ---------------------------------------------------------------- */

static int mustafar__valid_head_dim(int d) { return d == 64 || d == 128 || d == 256; }
static int mustafar__valid_sparsity(float s) { return s >= 0.0f && s < 1.0f; } /* NaN fails */
static mustafar_dtype mustafar__resolve_dtype(mustafar_dtype dt)
{
    return dt == MUSTAFAR_DTYPE_DEFAULT ? MUSTAFAR_DTYPE_F16 : dt;
}
static int mustafar__valid_dtype(mustafar_dtype dt)
{
    return dt == MUSTAFAR_DTYPE_DEFAULT || dt == MUSTAFAR_DTYPE_F16 || dt == MUSTAFAR_DTYPE_BF16;
}

MUSTAFAR_API int mustafar_kept_count(int head_dim, float sparsity)
{
    int pruned;
    if (!mustafar__valid_head_dim(head_dim) || !mustafar__valid_sparsity(sparsity)) return 0;
    /* guard: s*D that should be an integer must not land just below it */
    pruned = (int)floor((double)sparsity * head_dim + 1e-6);
    if (pruned >= head_dim) pruned = head_dim - 1;
    return head_dim - pruned;
}

/* The record format (CONCEPTS): bitmap, kept values, padding to 16 bytes. */
static size_t mustafar__record_size(int head_dim, int kept)
{
    return mustafar__round_up((size_t)head_dim / 8 + 2 * (size_t)kept, 16);
}

MUSTAFAR_API size_t mustafar_record_bytes(int head_dim, float sparsity, mustafar_dtype dtype)
{
    int kept = mustafar_kept_count(head_dim, sparsity);
    if (!kept || !mustafar__valid_dtype(dtype)) return 0;
    return mustafar__record_size(head_dim, kept);
}

static mustafar_status mustafar__check_format(mustafar_context *ctx, int head_dim, float sparsity,
                                              mustafar_dtype dtype)
{
    if (!mustafar__valid_head_dim(head_dim))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM,
                              "head_dim %d is not supported (64, 128 or 256)", head_dim);
    if (!mustafar__valid_dtype(dtype))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_UNSUPPORTED_DTYPE,
                              "dtype %d is not supported (fp16 or bf16)", (int)dtype);
    if (!mustafar__valid_sparsity(sparsity))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_SPARSITY,
                              "sparsity %g is outside [0, 1)", (double)sparsity);
    return MUSTAFAR_OK;
}

/* ---- pruning and records (host) --------------------------------------------
   A magnitude key is the encoding without its sign bit: for fp16 and bf16 the
   integer order of (bits & 0x7FFF) is the order of |x|, with Inf above every
   finite value and NaN above Inf.  The kept set is the n largest keys, ties to
   the lower channel: find the largest threshold t with count(key >= t) >= n
   by bisection, keep every key > t, then the lowest channels with key == t. */

static void mustafar__select_kept(const uint16_t *x, int d, int kept, uint32_t *bitmap)
{
    int lo = 0, hi = 0x7FFF, c, greater = 0, ties;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2, count = 0;
        for (c = 0; c < d; c++) count += (x[c] & 0x7FFF) >= mid;
        if (count >= kept) lo = mid; else hi = mid - 1;
    }
    memset(bitmap, 0, (size_t)d / 8);
    for (c = 0; c < d; c++)
        if ((x[c] & 0x7FFF) > lo) { bitmap[c >> 5] |= 1u << (c & 31); greater++; }
    ties = kept - greater;
    for (c = 0; c < d && ties > 0; c++)
        if ((x[c] & 0x7FFF) == lo) { bitmap[c >> 5] |= 1u << (c & 31); ties--; }
}

static void mustafar__encode_record(const uint16_t *x, int d, int kept, size_t rec_bytes,
                                    unsigned char *rec)
{
    uint32_t bitmap[8];
    uint16_t *vals = (uint16_t *)(void *)(rec + d / 8);
    int c, j = 0;
    mustafar__select_kept(x, d, kept, bitmap);
    memset(rec, 0, rec_bytes);
    memcpy(rec, bitmap, (size_t)d / 8);
    for (c = 0; c < d; c++)
        if (bitmap[c >> 5] >> (c & 31) & 1u) vals[j++] = x[c];
}

/* Reads at most `kept` values, so a corrupt bitmap cannot read past the record. */
static void mustafar__decode_record(const unsigned char *rec, int d, int kept, uint16_t *x)
{
    const uint16_t *vals = (const uint16_t *)(const void *)(rec + d / 8);
    uint32_t word = 0;
    int c, j = 0;
    for (c = 0; c < d; c++) {
        if ((c & 31) == 0) memcpy(&word, rec + c / 8, 4);
        x[c] = (word >> (c & 31) & 1u) && j < kept ? vals[j++] : 0;
    }
}

/* Dot product of a float query with a record, and record * weight added to acc. */
static float mustafar__record_dot(const unsigned char *rec, int d, int kept, mustafar_dtype dt,
                                  const float *q)
{
    const uint16_t *vals = (const uint16_t *)(const void *)(rec + d / 8);
    float sum = 0.0f;
    int w, j = 0;
    for (w = 0; w < d / 32; w++) {
        uint32_t word;
        memcpy(&word, rec + 4 * w, 4);
        while (word && j < kept) {
            int b = mustafar__ctz32(word);
            sum += q[32 * w + b] * mustafar__load(dt, vals[j++]);
            word &= word - 1u;
        }
    }
    return sum;
}

static void mustafar__record_axpy(const unsigned char *rec, int d, int kept, mustafar_dtype dt,
                                  float weight, float *acc)
{
    const uint16_t *vals = (const uint16_t *)(const void *)(rec + d / 8);
    int w, j = 0;
    for (w = 0; w < d / 32; w++) {
        uint32_t word;
        memcpy(&word, rec + 4 * w, 4);
        while (word && j < kept) {
            int b = mustafar__ctz32(word);
            acc[32 * w + b] += weight * mustafar__load(dt, vals[j++]);
            word &= word - 1u;
        }
    }
}

/* ---- host/kernel contract ---------------------------------------------------
   What the host hands the kernels beside the -D options: amalgamate.py copies
   this block, with mustafar_paged_seq, into mustafar_kernels.cuh, so both
   sides compile the same definitions. */
/* BEGIN CONTRACT */
/* One sequence of an append: positions [old_compressed, new_compressed) are
   compressed into pages (from the window ring while < old_length, else from
   the input), then positions [max(old_length, new_compressed), old_length +
   new_tokens) are copied from the input into the window ring. */
typedef struct mustafar__append_job {
    int32_t row, old_length, new_tokens, input_offset;
    int32_t old_compressed, new_compressed;
    int32_t compress_offset;       /* exclusive prefix of compressed counts */
    int32_t window_offset;         /* exclusive prefix of window writes */
    int32_t pages_before;          /* table entries of the row valid before the call */
    int32_t first_patch;           /* this row's first new entry in the patch list */
} mustafar__append_job;

/* Job, patch and sequence lists that fit travel in the kernel parameters
   instead of being uploaded (an upload puts a copy between two kernels and
   makes the host wait for the previous upload).  Decode steps use the small
   append block (cheap to launch), larger appends such as prefill chunks the
   wide one (30 KB, under the 32 KB limit of kernel parameters).  A count of
   0 means: the lists are in global memory. */
#define MUSTAFAR__INLINE_JOBS 48
#define MUSTAFAR__INLINE_PATCHES 96
#define MUSTAFAR__WIDE_JOBS 128
#define MUSTAFAR__WIDE_PATCHES 3072
#define MUSTAFAR__INLINE_SEQS 192
typedef struct mustafar__append_inline {
    int32_t njobs, npatches;
    mustafar__append_job jobs[MUSTAFAR__INLINE_JOBS];
    int32_t patches[2 * MUSTAFAR__INLINE_PATCHES];   /* (table index, page id) pairs */
} mustafar__append_inline;
typedef struct mustafar__append_wide {
    int32_t njobs, npatches;
    mustafar__append_job jobs[MUSTAFAR__WIDE_JOBS];
    int32_t patches[2 * MUSTAFAR__WIDE_PATCHES];
} mustafar__append_wide;
typedef struct mustafar__seqs_inline {
    int32_t count;
    mustafar_paged_seq seqs[MUSTAFAR__INLINE_SEQS];
} mustafar__seqs_inline;
/* END CONTRACT */

/* ---- resolved layout, offsets and checks ------------------------------------ */

typedef struct mustafar__layout {
    int head_dim, num_kv_heads, num_q_heads, group, page_size, window;
    mustafar_dtype dtype;
    float k_sparsity, v_sparsity;
    int k_kept, v_kept;
    size_t k_record, v_record;
} mustafar__layout;

static int32_t mustafar__job_window_first(const mustafar__append_job *j)
{
    return j->old_length > j->new_compressed ? j->old_length : j->new_compressed;
}

/* The layout of validated arguments (num_q_heads resolved). */
static void mustafar__layout_fill(mustafar__layout *L, int head_dim, mustafar_dtype dtype,
                                  float k_sparsity, float v_sparsity, int num_kv_heads,
                                  int num_q_heads, int page_size, int window)
{
    L->head_dim = head_dim;
    L->num_kv_heads = num_kv_heads;
    L->num_q_heads = num_q_heads;
    L->group = num_q_heads / num_kv_heads;
    L->page_size = page_size;
    L->window = window;
    L->dtype = mustafar__resolve_dtype(dtype);
    L->k_sparsity = k_sparsity;
    L->v_sparsity = v_sparsity;
    L->k_kept = mustafar_kept_count(head_dim, k_sparsity);
    L->v_kept = mustafar_kept_count(head_dim, v_sparsity);
    L->k_record = mustafar_record_bytes(head_dim, k_sparsity, L->dtype);
    L->v_record = mustafar_record_bytes(head_dim, v_sparsity, L->dtype);
}

/* The CUDA kernels move token vectors and records in 16-byte units. */
static mustafar_status mustafar__check_aligned(mustafar_context *ctx, const void *a, const void *b,
                                               const char *names)
{
    if (mustafar__is_cuda(ctx) && (((uintptr_t)a | (uintptr_t)b) & 15u))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                              "%s must be 16-byte aligned on the CUDA backend", names);
    return MUSTAFAR_OK;
}

static mustafar_status mustafar__layout_from_kv(mustafar_context *ctx, const mustafar_paged_kv *kv,
                                                mustafar__layout *L)
{
    mustafar_status st;
    if (!kv) return mustafar__fail(ctx, MUSTAFAR_ERROR_NULL_POINTER, "paged_kv is NULL");
    st = mustafar__check_format(ctx, kv->head_dim, kv->k_sparsity, kv->dtype);
    if (st) return st;
    st = mustafar__check_format(ctx, kv->head_dim, kv->v_sparsity, kv->dtype);
    if (st) return st;
    if (kv->num_kv_heads < 1 || kv->num_q_heads < 0 ||
        (kv->num_q_heads && kv->num_q_heads % kv->num_kv_heads))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                              "num_q_heads %d must be a positive multiple of num_kv_heads %d",
                              kv->num_q_heads, kv->num_kv_heads);
    if (kv->page_size < 1 || kv->page_table_stride < 1 || kv->num_rows < 1 ||
        kv->num_pages < 1 || kv->window_size < 0)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                              "paged_kv sizes must be positive (page_size %d, stride %d, "
                              "rows %d, pages %d, window %d)", kv->page_size,
                              kv->page_table_stride, kv->num_rows, kv->num_pages,
                              kv->window_size);
    if (!kv->k_pages || !kv->v_pages || !kv->page_table ||
        (kv->window_size > 0 && (!kv->k_window || !kv->v_window)))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_NULL_POINTER,
                              "paged_kv has a NULL pages, page_table or window pointer");
    st = mustafar__check_aligned(ctx, kv->k_pages, kv->v_pages, "paged_kv pages");
    if (!st && kv->window_size > 0)
        st = mustafar__check_aligned(ctx, kv->k_window, kv->v_window, "paged_kv windows");
    if (st) return st;
    mustafar__layout_fill(L, kv->head_dim, kv->dtype, kv->k_sparsity, kv->v_sparsity,
                          kv->num_kv_heads, kv->num_q_heads ? kv->num_q_heads : kv->num_kv_heads,
                          kv->page_size, kv->window_size);
    return MUSTAFAR_OK;
}

/* Byte address of the record of (position, KV head) of a page-table row. */
static size_t mustafar__record_offset(const mustafar__layout *L, int32_t page, int32_t position,
                                      int head, size_t record)
{
    return (((size_t)page * L->num_kv_heads + head) * L->page_size +
            (size_t)(position % L->page_size)) * record;
}

/* Element offset of (row, position, KV head) in a window ring. */
static size_t mustafar__window_offset(const mustafar__layout *L, int32_t row, int32_t position,
                                      int head)
{
    return (((size_t)row * L->window + (size_t)(position % L->window)) * L->num_kv_heads + head) *
           L->head_dim;
}

/* Checks a host-side sequence list against the layout: rows, counts and every
   page id it will touch. */
static mustafar_status mustafar__check_seqs_host(mustafar_context *ctx, const mustafar__layout *L,
                                                 const mustafar_paged_kv *kv, int nseq,
                                                 const mustafar_paged_seq *seqs, int32_t *max_len)
{
    int i;
    *max_len = 0;
    for (i = 0; i < nseq; i++) {
        const mustafar_paged_seq *s = &seqs[i];
        int32_t pages, p;
        if (s->row < 0 || s->row >= kv->num_rows || s->num_compressed < 0 || s->num_window < 0 ||
            s->num_window > L->window ||
            s->num_compressed > (int64_t)kv->page_table_stride * L->page_size)
            return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                                  "sequence %d: row %d, %d compressed, %d window tokens do not fit "
                                  "the layout", i, s->row, s->num_compressed, s->num_window);
        pages = (int32_t)mustafar__pages_for(s->num_compressed, L->page_size);
        for (p = 0; p < pages; p++) {
            int32_t id = kv->page_table[(size_t)s->row * kv->page_table_stride + p];
            if (id < 0 || id >= kv->num_pages)
                return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                                      "sequence %d: page table entry %d is %d, outside [0, %d)",
                                      i, p, id, kv->num_pages);
        }
        if ((int64_t)s->num_compressed + s->num_window > INT32_MAX)
            return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                                  "sequence %d: %d + %d tokens exceed 2^31 - 1", i,
                                  s->num_compressed, s->num_window);
        if (s->num_compressed + s->num_window > *max_len)
            *max_len = s->num_compressed + s->num_window;
    }
    return MUSTAFAR_OK;
}

/* The stateless record operations. */
enum { MUSTAFAR__OP_PRUNE, MUSTAFAR__OP_COMPRESS, MUSTAFAR__OP_DECOMPRESS };

/* ==== >>cpu: the CPU backend ====================================================
   Host memory.  Decode attention reads each K and V record once per KV head
   and serves every query head of its GQA group from it; a task is a token
   split of a sequence for all its KV heads in lockstep (a page holds the
   heads' records one after the other), with a split-K combine, run on the
   user's parallel-for callback or a small built-in pool started on first
   use.  The SIMD path (AVX-512 with VBMI2 or AVX2+F16C on x86-64, chosen at
   run time; NEON on ARM64; scalar) is picked at context creation;
   MUSTAFAR_CPU_SIMD=scalar|avx2|avx512|neon forces
   one (a path the machine lacks falls back to scalar).  A record whose bitmap
   does not hold exactly its kept count of bits (corrupt) goes through the
   scalar helpers of >>common, which stop at the kept count, so no path reads
   past a record. */

#if defined(__x86_64__) || defined(_M_X64)
#  define MUSTAFAR__CPU_X86 1
#  include <immintrin.h>
#  if defined(_MSC_VER) && !defined(__clang__)
#    include <intrin.h>
#  endif
#endif
#if defined(__aarch64__) || defined(_M_ARM64)
#  define MUSTAFAR__CPU_NEON 1
#  include <arm_neon.h>
#endif
#ifndef _WIN32
#  include <pthread.h>
#  include <unistd.h>
#endif

/* Per-function target attributes let a generic x86-64 build carry the AVX2
   path; MSVC compiles intrinsics without them. */
#if defined(MUSTAFAR__CPU_X86) && (defined(__GNUC__) || defined(__clang__))
#  define MUSTAFAR__AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))
#  define MUSTAFAR__AVX2_INLINE static inline __attribute__((target("avx2,fma,f16c,popcnt"), always_inline))
#elif defined(_MSC_VER)
#  define MUSTAFAR__AVX2
#  define MUSTAFAR__AVX2_INLINE static __forceinline
#else
#  define MUSTAFAR__AVX2
#  define MUSTAFAR__AVX2_INLINE static
#endif

/* The AVX-512 path (F, BW, VL, VBMI2's vpexpandw/vpcompressw): compilers
   from gcc 8, clang 6 and MSVC 2019 know its intrinsics; MUSTAFAR_NO_AVX512
   leaves it out. */
#if defined(MUSTAFAR__CPU_X86) && !defined(MUSTAFAR_NO_AVX512) &&                          \
    (defined(__clang__) ? __clang_major__ >= 6                                            \
                        : (defined(__GNUC__) ? __GNUC__ >= 8 : (defined(_MSC_VER) && _MSC_VER >= 1920)))
#  define MUSTAFAR__CPU_AVX512 1
#  if defined(__GNUC__) || defined(__clang__)
#    define MUSTAFAR__AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt"
#    define MUSTAFAR__AVX512 __attribute__((target(MUSTAFAR__AVX512_TARGET)))
#    define MUSTAFAR__AVX512_INLINE static inline __attribute__((target(MUSTAFAR__AVX512_TARGET), always_inline))
#  else
#    define MUSTAFAR__AVX512
#    define MUSTAFAR__AVX512_INLINE static __forceinline
#  endif
/* g++ (as C++ only) reports the `__Y = __Y` undefined vectors of its own
   AVX-512 headers as maybe-uninitialized where they are inlined here. */
#  if defined(__GNUC__) && !defined(__clang__) && defined(__cplusplus)
#    define MUSTAFAR__AVX512_BEGIN                                                          \
        _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#    define MUSTAFAR__AVX512_END _Pragma("GCC diagnostic pop")
#  else
#    define MUSTAFAR__AVX512_BEGIN
#    define MUSTAFAR__AVX512_END
#  endif
#endif

/* Full unrolling of a short loop over an array of vectors (gcc -O2 keeps
   the loop, and the array in memory). */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 8)
#  define MUSTAFAR__UNROLL _Pragma("GCC unroll 16")
#else
#  define MUSTAFAR__UNROLL
#endif

enum { MUSTAFAR__SIMD_SCALAR, MUSTAFAR__SIMD_AVX2, MUSTAFAR__SIMD_NEON, MUSTAFAR__SIMD_AVX512 };
#define MUSTAFAR__CPU_BLOCK 32          /* tokens per online-softmax step */
#define MUSTAFAR__CPU_MIN_SPLIT 256     /* fewest (token, KV head) pairs of one attention task */
#define MUSTAFAR__CPU_RECORDS_PER_TASK 256

static int mustafar__cpu_best_simd(void)
{
#if defined(MUSTAFAR__CPU_X86)
    unsigned int r1[4] = {0, 0, 0, 0}, r7[4] = {0, 0, 0, 0};
    unsigned long long xcr0 = 0;
#  if defined(_MSC_VER) && !defined(__clang__)
    int a[4];
    __cpuid(a, 0);
    if (a[0] < 7) return MUSTAFAR__SIMD_SCALAR;
    __cpuid(a, 1);
    memcpy(r1, a, sizeof r1);
    __cpuidex(a, 7, 0);
    memcpy(r7, a, sizeof r7);
    if (r1[2] & (1u << 27)) xcr0 = _xgetbv(0);
#  else
    unsigned int lo, hi;
    __asm__("cpuid" : "=a"(r1[0]), "=b"(r1[1]), "=c"(r1[2]), "=d"(r1[3]) : "a"(0), "c"(0));
    if (r1[0] < 7) return MUSTAFAR__SIMD_SCALAR;
    __asm__("cpuid" : "=a"(r1[0]), "=b"(r1[1]), "=c"(r1[2]), "=d"(r1[3]) : "a"(1), "c"(0));
    __asm__("cpuid" : "=a"(r7[0]), "=b"(r7[1]), "=c"(r7[2]), "=d"(r7[3]) : "a"(7), "c"(0));
    if (r1[2] & (1u << 27)) {
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        xcr0 = ((unsigned long long)hi << 32) | lo;
    }
#  endif
    /* FMA, POPCNT, AVX, F16C; AVX2; the OS saves the YMM state */
    if ((r1[2] & 0x38801000u) == 0x38801000u && (r7[1] & (1u << 5)) && (xcr0 & 6u) == 6u) {
#  if defined(MUSTAFAR__CPU_AVX512)
        /* AVX512F, BW, VL; VBMI2; the OS saves the opmask and ZMM state */
        if ((r7[1] & 0xC0010000u) == 0xC0010000u && (r7[2] & (1u << 6)) && (xcr0 & 0xE6u) == 0xE6u)
            return MUSTAFAR__SIMD_AVX512;
#  endif
        return MUSTAFAR__SIMD_AVX2;
    }
    return MUSTAFAR__SIMD_SCALAR;
#elif defined(MUSTAFAR__CPU_NEON)
    return MUSTAFAR__SIMD_NEON;
#else
    return MUSTAFAR__SIMD_SCALAR;
#endif
}

/* cpuid traps to the hypervisor in a VM (tens of microseconds): detect once. */
static int mustafar__cpu_detected;
#ifdef _WIN32
static INIT_ONCE mustafar__cpu_once = INIT_ONCE_STATIC_INIT;
static BOOL CALLBACK mustafar__cpu_detect(PINIT_ONCE once, PVOID param, PVOID *context)
{
    MUSTAFAR__UNUSED(once);
    MUSTAFAR__UNUSED(param);
    MUSTAFAR__UNUSED(context);
    mustafar__cpu_detected = mustafar__cpu_best_simd();
    return TRUE;
}
#else
static pthread_once_t mustafar__cpu_once = PTHREAD_ONCE_INIT;
static void mustafar__cpu_detect(void) { mustafar__cpu_detected = mustafar__cpu_best_simd(); }
#endif

/* The best path, or the one MUSTAFAR_CPU_SIMD names when the machine has it. */
static int mustafar__cpu_choose_simd(void)
{
    const char *force = getenv("MUSTAFAR_CPU_SIMD");
    int best;
#ifdef _WIN32
    InitOnceExecuteOnce(&mustafar__cpu_once, mustafar__cpu_detect, NULL, NULL);
#else
    pthread_once(&mustafar__cpu_once, mustafar__cpu_detect);
#endif
    best = mustafar__cpu_detected;
    if (!force || !force[0]) return best;
    if (!strcmp(force, "avx512") && best == MUSTAFAR__SIMD_AVX512) return best;
    if (!strcmp(force, "avx2") && (best == MUSTAFAR__SIMD_AVX2 || best == MUSTAFAR__SIMD_AVX512))
        return MUSTAFAR__SIMD_AVX2;
    if (!strcmp(force, "neon") && best == MUSTAFAR__SIMD_NEON) return best;
    return MUSTAFAR__SIMD_SCALAR;
}

static int mustafar__cpu_core_count(void)
{
#ifdef _WIN32
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return si.dwNumberOfProcessors > 0 ? (int)si.dwNumberOfProcessors : 1;
#else
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)(n < 256 ? n : 256) : 1;
#endif
}

/* ---- threads: the user's parallel-for, or the built-in pool -------------------
   The pool's workers take task indices under one lock: tasks are coarse (a few
   hundred tokens or records), so the lock is not contended.  The calling
   thread works too, so a pool of N threads starts N - 1 workers. */

typedef void (*mustafar__cpu_task)(void *task_data, int index);

#ifdef _WIN32
typedef SRWLOCK mustafar__mutex;
typedef CONDITION_VARIABLE mustafar__cond;
typedef HANDLE mustafar__thread;
#define mustafar__mutex_init(m) InitializeSRWLock(m)
#define mustafar__mutex_destroy(m) ((void)(m))
#define mustafar__lock(m) AcquireSRWLockExclusive(m)
#define mustafar__unlock(m) ReleaseSRWLockExclusive(m)
#define mustafar__cond_init(c) InitializeConditionVariable(c)
#define mustafar__cond_destroy(c) ((void)(c))
#define mustafar__cond_wait(c, m) SleepConditionVariableSRW(c, m, INFINITE, 0)
#define mustafar__cond_broadcast(c) WakeAllConditionVariable(c)
#else
typedef pthread_mutex_t mustafar__mutex;
typedef pthread_cond_t mustafar__cond;
typedef pthread_t mustafar__thread;
#define mustafar__mutex_init(m) pthread_mutex_init(m, NULL)
#define mustafar__mutex_destroy(m) pthread_mutex_destroy(m)
#define mustafar__lock(m) pthread_mutex_lock(m)
#define mustafar__unlock(m) pthread_mutex_unlock(m)
#define mustafar__cond_init(c) pthread_cond_init(c, NULL)
#define mustafar__cond_destroy(c) pthread_cond_destroy(c)
#define mustafar__cond_wait(c, m) pthread_cond_wait(c, m)
#define mustafar__cond_broadcast(c) pthread_cond_broadcast(c)
#endif

struct mustafar__cpu {
    int simd;                      /* MUSTAFAR__SIMD_* */
    int num_threads;               /* threads of a parallel-for, the caller's included */
    void (*parallel_for)(void (*task)(void *task_data, int index), void *task_data, int count,
                         void *user_data);
    void *parallel_for_user_data;
    /* the built-in pool, started on first use */
    int workers;                   /* started worker threads */
    mustafar__thread *threads;
    mustafar__mutex lock;
    mustafar__cond wake, done;
    mustafar__cpu_task task;       /* NULL: no parallel-for running */
    void *task_data;
    int count, next, finished, stop;
    /* the attention's work space, kept between calls and grown to the largest */
    void *work;
    size_t work_bytes;
};

/* Runs tasks under the lock until none is left to take; returns with the lock held. */
static void mustafar__cpu_pool_drain(struct mustafar__cpu *cpu)
{
    while (cpu->task && cpu->next < cpu->count) {
        mustafar__cpu_task task = cpu->task;
        void *data = cpu->task_data;
        int index = cpu->next++;
        mustafar__unlock(&cpu->lock);
        task(data, index);
        mustafar__lock(&cpu->lock);
        if (++cpu->finished == cpu->count) mustafar__cond_broadcast(&cpu->done);
    }
}

#ifdef _WIN32
static DWORD WINAPI mustafar__cpu_worker(LPVOID arg)
#else
static void *mustafar__cpu_worker(void *arg)
#endif
{
    struct mustafar__cpu *cpu = (struct mustafar__cpu *)arg;
    mustafar__lock(&cpu->lock);
    while (!cpu->stop) {
        mustafar__cpu_pool_drain(cpu);
        if (!cpu->stop) mustafar__cond_wait(&cpu->wake, &cpu->lock);
    }
    mustafar__unlock(&cpu->lock);
    return 0;
}

/* Starts the workers; should some fail to start, the pool runs on those that
   did (the calling thread always works). */
static void mustafar__cpu_pool_start(struct mustafar__cpu *cpu)
{
    int want = cpu->num_threads - 1;
    cpu->threads = (mustafar__thread *)mustafar__calloc(sizeof(mustafar__thread) * (size_t)want);
    if (!cpu->threads) return;
    for (cpu->workers = 0; cpu->workers < want; cpu->workers++) {
#ifdef _WIN32
        HANDLE h = CreateThread(NULL, 0, mustafar__cpu_worker, cpu, 0, NULL);
        if (!h) break;
        cpu->threads[cpu->workers] = h;
#else
        if (pthread_create(&cpu->threads[cpu->workers], NULL, mustafar__cpu_worker, cpu)) break;
#endif
    }
}

static void mustafar__cpu_parallel_for(struct mustafar__cpu *cpu, mustafar__cpu_task task,
                                       void *data, int count)
{
    int i;
    if (count <= 0) return;
    if (!cpu || count == 1 || cpu->num_threads <= 1) {
        for (i = 0; i < count; i++) task(data, i);
        return;
    }
    if (cpu->parallel_for) {
        cpu->parallel_for(task, data, count, cpu->parallel_for_user_data);
        return;
    }
    if (!cpu->threads) mustafar__cpu_pool_start(cpu);
    mustafar__lock(&cpu->lock);
    cpu->task = task;
    cpu->task_data = data;
    cpu->count = count;
    cpu->next = cpu->finished = 0;
    mustafar__cond_broadcast(&cpu->wake);
    mustafar__cpu_pool_drain(cpu);
    while (cpu->finished < cpu->count) mustafar__cond_wait(&cpu->done, &cpu->lock);
    cpu->task = NULL;
    mustafar__unlock(&cpu->lock);
}

static struct mustafar__cpu *mustafar__cpu_create(const mustafar_context_desc *desc)
{
    struct mustafar__cpu *cpu = (struct mustafar__cpu *)mustafar__calloc(sizeof *cpu);
    if (!cpu) return NULL;
    cpu->simd = mustafar__cpu_choose_simd();
    cpu->num_threads = desc->num_threads > 0 ? desc->num_threads : mustafar__cpu_core_count();
    cpu->parallel_for = desc->parallel_for;
    cpu->parallel_for_user_data = desc->parallel_for_user_data;
    mustafar__mutex_init(&cpu->lock);
    mustafar__cond_init(&cpu->wake);
    mustafar__cond_init(&cpu->done);
    return cpu;
}

static void mustafar__cpu_destroy(struct mustafar__cpu *cpu)
{
    int i;
    if (!cpu) return;
    mustafar__lock(&cpu->lock);
    cpu->stop = 1;
    mustafar__cond_broadcast(&cpu->wake);
    mustafar__unlock(&cpu->lock);
    for (i = 0; i < cpu->workers; i++) {
#ifdef _WIN32
        WaitForSingleObject(cpu->threads[i], INFINITE);
        CloseHandle(cpu->threads[i]);
#else
        pthread_join(cpu->threads[i], NULL);
#endif
    }
    MUSTAFAR_FREE(cpu->threads);
    MUSTAFAR_FREE(cpu->work);
    mustafar__cond_destroy(&cpu->done);
    mustafar__cond_destroy(&cpu->wake);
    mustafar__mutex_destroy(&cpu->lock);
    MUSTAFAR_FREE(cpu);
}

static size_t mustafar__align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

/* `bytes` of work space: the context's, grown when short (the old one is
   kept if that fails); with no CPU context a new block, freed by the caller. */
static void *mustafar__cpu_work(struct mustafar__cpu *cpu, size_t bytes)
{
    void *p;
    if (cpu && bytes <= cpu->work_bytes) return cpu->work;
    p = MUSTAFAR_MALLOC(bytes);
    if (p && cpu) {
        MUSTAFAR_FREE(cpu->work);
        cpu->work = p;
        cpu->work_bytes = bytes;
    }
    return p;
}

static struct mustafar__cpu *mustafar__cpu_of(mustafar_context *ctx)
{
    return ctx ? ctx->cpu : NULL;
}

static int mustafar__cpu_simd_of(mustafar_context *ctx)
{
    return ctx && ctx->cpu ? ctx->cpu->simd : mustafar__cpu_choose_simd();
}

static int mustafar__cpu_threads_of(mustafar_context *ctx)
{
    return ctx && ctx->cpu ? ctx->cpu->num_threads : 1;
}

/* ---- pruning and compression ------------------------------------------------ */

#if defined(MUSTAFAR__CPU_X86)
/* 32 lanes of 16-bit compare masks to 32 bits, lane order kept. */
MUSTAFAR__AVX2 static uint32_t mustafar__avx2_bits32(__m256i m0, __m256i m1)
{
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi16(m0, m1), 0xD8);
    return (uint32_t)_mm256_movemask_epi8(packed);
}

/* mustafar__select_kept with 16 keys per compare; the same bisection, so the
   same bitmap. */
MUSTAFAR__AVX2 static void mustafar__avx2_select_kept(const uint16_t *x, int d, int kept,
                                                      uint32_t *bitmap)
{
    __m256i key[16];
    const __m256i magnitude = _mm256_set1_epi16(0x7FFF);
    const int nv = d / 16;
    int lo = 0, hi = 0x7FFF, i, greater = 0, ties;
    for (i = 0; i < nv; i++)
        key[i] = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(const void *)(x + 16 * i)),
                                  magnitude);
    while (lo < hi) {
        /* count by byte masks and popcount: a short dependency chain per step */
        int mid = (lo + hi + 1) / 2, count = 0;
        const __m256i below = _mm256_set1_epi16((short)(mid - 1));
        for (i = 0; i < nv; i += 2)
            count += _mm_popcnt_u32((unsigned int)_mm256_movemask_epi8(_mm256_packs_epi16(
                _mm256_cmpgt_epi16(key[i], below), _mm256_cmpgt_epi16(key[i + 1], below))));
        if (count >= kept) lo = mid; else hi = mid - 1;
    }
    {
        const __m256i t = _mm256_set1_epi16((short)lo);
        for (i = 0; i < nv; i += 2) {
            bitmap[i / 2] = mustafar__avx2_bits32(_mm256_cmpgt_epi16(key[i], t),
                                                  _mm256_cmpgt_epi16(key[i + 1], t));
            greater += _mm_popcnt_u32(bitmap[i / 2]);
        }
        ties = kept - greater;
        for (i = 0; i < nv && ties > 0; i += 2) {
            uint32_t eq = mustafar__avx2_bits32(_mm256_cmpeq_epi16(key[i], t),
                                                _mm256_cmpeq_epi16(key[i + 1], t));
            while (eq && ties > 0) {
                bitmap[i / 2] |= eq & (0u - eq);
                eq &= eq - 1u;
                ties--;
            }
        }
    }
}
#endif

#if defined(MUSTAFAR__CPU_AVX512)
MUSTAFAR__AVX512_BEGIN
/* mustafar__select_kept on 32 keys per compare, searching two bits of the
   threshold per step (three counts at once): the same largest threshold t
   with count(key >= t) >= kept, so the same bitmap.  Inlined for each head
   dimension: the keys stay in registers. */
MUSTAFAR__AVX512_INLINE void mustafar__avx512_select_nv(const uint16_t *x, int nv, int kept,
                                                        uint32_t *bitmap)
{
    __m512i key[8];
    const __m512i magnitude = _mm512_set1_epi16(0x7FFF);
    int lo = 0, hi = 0x7FFF, i, greater = 0, ties;
    MUSTAFAR__UNROLL
    for (i = 0; i < nv; i++)
        key[i] = _mm512_and_si512(_mm512_loadu_si512((const void *)(x + 32 * i)), magnitude);
    while (lo < hi) {
        const int span = hi - lo;
        const int m1 = lo + (span + 3) / 4, m2 = lo + (2 * span + 3) / 4, m3 = lo + (3 * span + 3) / 4;
        const __m512i t1 = _mm512_set1_epi16((short)m1), t2 = _mm512_set1_epi16((short)m2),
                      t3 = _mm512_set1_epi16((short)m3);
        int c1 = 0, c2 = 0, c3 = 0;
        MUSTAFAR__UNROLL
        for (i = 0; i < nv; i++) {
            c1 += _mm_popcnt_u32((unsigned int)_mm512_cmpge_epu16_mask(key[i], t1));
            c2 += _mm_popcnt_u32((unsigned int)_mm512_cmpge_epu16_mask(key[i], t2));
            c3 += _mm_popcnt_u32((unsigned int)_mm512_cmpge_epu16_mask(key[i], t3));
        }
        if (c3 >= kept) lo = m3;
        else if (c2 >= kept) { lo = m2; hi = m3 - 1; }
        else if (c1 >= kept) { lo = m1; hi = m2 - 1; }
        else hi = m1 - 1;
    }
    {
        const __m512i t = _mm512_set1_epi16((short)lo);
        MUSTAFAR__UNROLL
        for (i = 0; i < nv; i++) {
            bitmap[i] = (uint32_t)_mm512_cmpgt_epu16_mask(key[i], t);
            greater += _mm_popcnt_u32(bitmap[i]);
        }
        ties = kept - greater;
        for (i = 0; i < nv && ties > 0; i++) {
            uint32_t eq = (uint32_t)_mm512_cmpeq_epi16_mask(key[i], t);
            while (eq && ties > 0) {
                bitmap[i] |= eq & (0u - eq);
                eq &= eq - 1u;
                ties--;
            }
        }
    }
}

MUSTAFAR__AVX512 static void mustafar__avx512_select_kept(const uint16_t *x, int d, int kept,
                                                          uint32_t *bitmap)
{
    if (d == 64) mustafar__avx512_select_nv(x, 2, kept, bitmap);
    else if (d == 128) mustafar__avx512_select_nv(x, 4, kept, bitmap);
    else mustafar__avx512_select_nv(x, 8, kept, bitmap);
}

/* The first n of 32 lanes. */
static uint32_t mustafar__lanes32(int n) { return n >= 32 ? 0xFFFFFFFFu : (1u << n) - 1u; }

/* A record: the kept values of each bitmap word packed by vpcompressw into a
   register, then a masked store of just those (nothing past the record). */
MUSTAFAR__AVX512 static void mustafar__avx512_encode(const uint16_t *x, int d, int kept,
                                                     size_t rec_bytes, unsigned char *rec)
{
    uint32_t bitmap[8];
    uint16_t *vals = (uint16_t *)(void *)(rec + d / 8);
    int w, j = 0;
    mustafar__avx512_select_kept(x, d, kept, bitmap);
    memcpy(rec, bitmap, (size_t)d / 8);
    for (w = 0; w < d / 32; w++) {
        const int n = _mm_popcnt_u32(bitmap[w]);
        _mm512_mask_storeu_epi16(vals + j, (__mmask32)mustafar__lanes32(n),
                                 _mm512_maskz_compress_epi16((__mmask32)bitmap[w],
                                                             _mm512_loadu_si512((const void *)(x + 32 * w))));
        j += n;
    }
    memset(vals + j, 0, rec_bytes - (size_t)d / 8 - 2 * (size_t)j);
}

/* A pruned vector: the kept lanes, zero elsewhere. */
MUSTAFAR__AVX512 static void mustafar__avx512_prune(const uint16_t *x, int d, int kept, uint16_t *y)
{
    uint32_t bitmap[8];
    int w;
    mustafar__avx512_select_kept(x, d, kept, bitmap);
    for (w = 0; w < d / 32; w++)
        _mm512_storeu_si512((void *)(y + 32 * w),
                            _mm512_maskz_mov_epi16((__mmask32)bitmap[w],
                                                   _mm512_loadu_si512((const void *)(x + 32 * w))));
}
MUSTAFAR__AVX512_END
#endif

/* mustafar__encode_record with the path's selection (the same bisection, so
   the same bitmap); values gathered by walking the set bits. */
static void mustafar__cpu_encode(int simd, const uint16_t *x, int d, int kept, size_t rec_bytes,
                                 unsigned char *rec)
{
#if defined(MUSTAFAR__CPU_AVX512)
    if (simd == MUSTAFAR__SIMD_AVX512) {
        mustafar__avx512_encode(x, d, kept, rec_bytes, rec);
        return;
    }
#endif
#if defined(MUSTAFAR__CPU_X86)
    if (simd == MUSTAFAR__SIMD_AVX2) {
        uint32_t bitmap[8];
        uint16_t *vals = (uint16_t *)(void *)(rec + d / 8);
        int w, j = 0;
        mustafar__avx2_select_kept(x, d, kept, bitmap);
        memcpy(rec, bitmap, (size_t)d / 8);
        for (w = 0; w < d / 32; w++) {
            uint32_t word = bitmap[w];
            while (word) {
                vals[j++] = x[32 * w + mustafar__ctz32(word)];
                word &= word - 1u;
            }
        }
        memset(vals + j, 0, rec_bytes - (size_t)d / 8 - 2 * (size_t)j);
        return;
    }
#endif
    MUSTAFAR__UNUSED(simd);
    mustafar__encode_record(x, d, kept, rec_bytes, rec);
}

static void mustafar__cpu_select_kept(int simd, const uint16_t *x, int d, int kept,
                                      uint32_t *bitmap)
{
#if defined(MUSTAFAR__CPU_AVX512)
    if (simd == MUSTAFAR__SIMD_AVX512) {
        mustafar__avx512_select_kept(x, d, kept, bitmap);
        return;
    }
#endif
#if defined(MUSTAFAR__CPU_X86)
    if (simd == MUSTAFAR__SIMD_AVX2) {
        mustafar__avx2_select_kept(x, d, kept, bitmap);
        return;
    }
#endif
    MUSTAFAR__UNUSED(simd);
    mustafar__select_kept(x, d, kept, bitmap);
}

typedef struct mustafar__cpu_records_work {
    int op, head_dim, kept, simd;
    size_t rec, count;
    const void *in;
    void *out;
} mustafar__cpu_records_work;

static void mustafar__cpu_records_task(void *data, int index)
{
    const mustafar__cpu_records_work *W = (const mustafar__cpu_records_work *)data;
    const int d = W->head_dim;
    size_t i = (size_t)index * MUSTAFAR__CPU_RECORDS_PER_TASK;
    size_t end = i + MUSTAFAR__CPU_RECORDS_PER_TASK < W->count ? i + MUSTAFAR__CPU_RECORDS_PER_TASK
                                                               : W->count;
    for (; i < end; i++) {
        const uint16_t *x = (const uint16_t *)W->in + i * d;
        uint16_t *y = (uint16_t *)W->out + i * d;
        if (W->op == MUSTAFAR__OP_PRUNE) {
            uint32_t bitmap[8];
            int c;
#if defined(MUSTAFAR__CPU_AVX512)
            if (W->simd == MUSTAFAR__SIMD_AVX512) {
                mustafar__avx512_prune(x, d, W->kept, y);
                continue;
            }
#endif
            mustafar__cpu_select_kept(W->simd, x, d, W->kept, bitmap);
            for (c = 0; c < d; c++) y[c] = (bitmap[c >> 5] >> (c & 31) & 1u) ? x[c] : 0;
        } else if (W->op == MUSTAFAR__OP_COMPRESS) {
            mustafar__cpu_encode(W->simd, x, d, W->kept, W->rec, (unsigned char *)W->out + i * W->rec);
        } else {
            mustafar__decode_record((const unsigned char *)W->in + i * W->rec, d, W->kept, y);
        }
    }
}

static void mustafar__cpu_records(mustafar_context *ctx, int op, int head_dim, float sparsity,
                                  mustafar_dtype dtype, const void *in, void *out, size_t count)
{
    mustafar__cpu_records_work W;
    W.op = op;
    W.head_dim = head_dim;
    W.kept = mustafar_kept_count(head_dim, sparsity);
    W.simd = mustafar__cpu_simd_of(ctx);
    W.rec = mustafar_record_bytes(head_dim, sparsity, dtype);
    W.count = count;
    W.in = in;
    W.out = out;
    mustafar__cpu_parallel_for(mustafar__cpu_of(ctx), mustafar__cpu_records_task, &W,
                               (int)((count + MUSTAFAR__CPU_RECORDS_PER_TASK - 1) /
                                     MUSTAFAR__CPU_RECORDS_PER_TASK));
}

/* An append compresses in tasks of up to 64 positions of one job (all KV
   heads), then copies the window inputs; jobs touch different rows. */
#define MUSTAFAR__CPU_APPEND_POSITIONS 64

typedef struct mustafar__cpu_append_work {
    const mustafar__layout *L;
    const mustafar_paged_kv *kv;
    const mustafar__append_job *jobs;
    int njobs, simd;
    const uint16_t *k, *v;
} mustafar__cpu_append_work;

static int mustafar__cpu_append_tasks(const mustafar__append_job *j)
{
    return (j->new_compressed - j->old_compressed + MUSTAFAR__CPU_APPEND_POSITIONS - 1) /
           MUSTAFAR__CPU_APPEND_POSITIONS;
}

static void mustafar__cpu_append_task(void *data, int index)
{
    const mustafar__cpu_append_work *W = (const mustafar__cpu_append_work *)data;
    const mustafar__layout *L = W->L;
    const mustafar_paged_kv *kv = W->kv;
    const int d = L->head_dim, hkv = L->num_kv_heads;
    const mustafar__append_job *j = W->jobs;
    const int32_t *table;
    int32_t p, end;
    int h;
    while (index >= mustafar__cpu_append_tasks(j)) index -= mustafar__cpu_append_tasks(j++);
    table = kv->page_table + (size_t)j->row * kv->page_table_stride;
    p = j->old_compressed + index * MUSTAFAR__CPU_APPEND_POSITIONS;
    end = p + MUSTAFAR__CPU_APPEND_POSITIONS < j->new_compressed ? p + MUSTAFAR__CPU_APPEND_POSITIONS
                                                                 : j->new_compressed;
    for (; p < end; p++) {
        int32_t page = table[p / L->page_size];
        for (h = 0; h < hkv; h++) {
            const uint16_t *ks, *vs;
            if (p < j->old_length) {
                size_t w = mustafar__window_offset(L, j->row, p, h);
                ks = (const uint16_t *)kv->k_window + w;
                vs = (const uint16_t *)kv->v_window + w;
            } else {
                size_t in = ((size_t)(j->input_offset + p - j->old_length) * hkv + h) * d;
                ks = W->k + in;
                vs = W->v + in;
            }
            mustafar__cpu_encode(W->simd, ks, d, L->k_kept, L->k_record,
                                 (unsigned char *)kv->k_pages +
                                     mustafar__record_offset(L, page, p, h, L->k_record));
            mustafar__cpu_encode(W->simd, vs, d, L->v_kept, L->v_record,
                                 (unsigned char *)kv->v_pages +
                                     mustafar__record_offset(L, page, p, h, L->v_record));
        }
    }
}

static void mustafar__cpu_append(mustafar_context *ctx, const mustafar__layout *L,
                                 const mustafar_paged_kv *kv, const mustafar__append_job *jobs,
                                 int njobs, const uint16_t *k, const uint16_t *v)
{
    const int d = L->head_dim, hkv = L->num_kv_heads;
    mustafar__cpu_append_work W;
    int i, tasks = 0;
    int32_t p;
    W.L = L;
    W.kv = kv;
    W.jobs = jobs;
    W.njobs = njobs;
    W.simd = mustafar__cpu_simd_of(ctx);
    W.k = k;
    W.v = v;
    for (i = 0; i < njobs; i++) tasks += mustafar__cpu_append_tasks(&jobs[i]);
    mustafar__cpu_parallel_for(mustafar__cpu_of(ctx), mustafar__cpu_append_task, &W, tasks);
    for (i = 0; i < njobs; i++) {
        const mustafar__append_job *j = &jobs[i];
        for (p = mustafar__job_window_first(j); p < j->old_length + j->new_tokens; p++) {
            size_t in = (size_t)(j->input_offset + p - j->old_length) * hkv * d;
            size_t w = mustafar__window_offset(L, j->row, p, 0);
            memcpy((uint16_t *)kv->k_window + w, k + in, (size_t)hkv * d * 2);
            memcpy((uint16_t *)kv->v_window + w, v + in, (size_t)hkv * d * 2);
        }
    }
}

/* ---- decode attention ----------------------------------------------------------
   A work item is (sequence, KV head, split of `chunk` tokens).  It loads the
   group's G query heads (scaled) and walks its tokens in blocks: the scores of
   a block for all G heads from each K record read once, an online-softmax
   update, then each V record read once and added to the G accumulators.  The
   item leaves its accumulators, running max and sum for the combine.  A task
   runs the Hkv items of one (sequence, split) in lockstep, a block of each
   head in turn: the records of a page are ordered by head, so the reads walk
   the pages in address order (each head's pages alone skip Hkv - 1 runs
   between reads: more TLB misses, and no stream for the prefetchers). */

/* A token of the attention: a record with `kept` values, or (kept < 0) a
   dense window vector.  limit: the 16-bit value slots that may be loaded past
   the bitmap (a record not last in its page may over-read into the next one). */
typedef struct mustafar__cpu_token {
    const unsigned char *p;
    int kept, limit;
} mustafar__cpu_token;

/* The n tokens of a block, and the nahead tokens of the next one: the paths
   prefetch ahead[t] as they reach token t, spread over the block (a burst of
   a block's lines filled the core's miss buffers and stalled it). */
typedef struct mustafar__cpu_block {
    const mustafar__cpu_token *toks, *ahead;
    int n, nahead;
} mustafar__cpu_block;

typedef struct mustafar__cpu_item {
    int32_t seq, kv_head, first, end;  /* token range [first, end) */
} mustafar__cpu_item;

typedef struct mustafar__cpu_attn mustafar__cpu_attn;
struct mustafar__cpu_attn {
    const mustafar__layout *L;
    const mustafar_paged_kv *kv;
    const mustafar_paged_seq *seqs;
    const uint16_t *q;
    float scale;
    int d, group, bf16;
    const mustafar__cpu_item *items;
    float *scratch;                /* per item: item_floats floats */
    size_t item_floats;
    /* scores[g * BLOCK + t] = q_g . token t, for the tokens of a block */
    void (*dot)(const mustafar__cpu_attn *A, const mustafar__cpu_block *B, const float *qf,
                float *scores);
    /* acc[g][:] += weights[g * BLOCK + t] * token t; dummy: D floats for unused lanes */
    void (*axpy)(const mustafar__cpu_attn *A, const mustafar__cpu_block *B, const float *weights,
                 float *acc, float *dummy);
    float (*max_block)(const float *x, int n);       /* max of x[0, n) (NaN ignored) */
    float (*exp_block)(float *x, int n, float m);    /* x = exp(x - m) on [0, n), 0 on
                                                        [n, BLOCK); returns the sum */
    unsigned char expand[256][16]; /* pshufb/tbl control: bitmap byte -> 8 lanes */
};


/* The lines of a token's own bytes. */
static void mustafar__cpu_prefetch(const mustafar__cpu_attn *A, mustafar__cpu_token tok)
{
    const size_t bytes = tok.kept < 0 ? 2 * (size_t)A->d : (size_t)A->d / 8 + 2 * (size_t)tok.kept;
    const uintptr_t last = ((uintptr_t)tok.p + bytes - 1) & ~(uintptr_t)63;
    uintptr_t line;
    for (line = (uintptr_t)tok.p & ~(uintptr_t)63; line <= last; line += 64) {
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch((const void *)line);
#elif defined(MUSTAFAR__CPU_X86)
        _mm_prefetch((const char *)line, _MM_HINT_T0);
#endif
    }
}

/* The next block's tokens [t, t + n) (those it has). */
static void mustafar__cpu_prefetch_ahead(const mustafar__cpu_attn *A, const mustafar__cpu_block *B,
                                         int t, int n)
{
    for (; n > 0 && t < B->nahead; t++, n--) mustafar__cpu_prefetch(A, B->ahead[t]);
}

/* Scalar path: decode a token to floats (walking the set bits, at most kept). */
static void mustafar__scalar_token(const mustafar__cpu_attn *A, mustafar__cpu_token tok, float *x)
{
    const mustafar_dtype dt = A->bf16 ? MUSTAFAR_DTYPE_BF16 : MUSTAFAR_DTYPE_F16;
    int c;
    if (tok.kept < 0) {
        const uint16_t *v = (const uint16_t *)(const void *)tok.p;
        for (c = 0; c < A->d; c++) x[c] = mustafar__load(dt, v[c]);
        return;
    }
    for (c = 0; c < A->d; c++) x[c] = 0.0f;
    mustafar__record_axpy(tok.p, A->d, tok.kept, dt, 1.0f, x);
}

/* Records by their set bits (cost in the kept count), dense tokens by channel. */
static void mustafar__scalar_dot(const mustafar__cpu_attn *A, mustafar__cpu_token tok,
                                 const float *qf, float *scores)
{
    float x[256];
    int g, c;
    if (tok.kept >= 0) {
        const mustafar_dtype dt = A->bf16 ? MUSTAFAR_DTYPE_BF16 : MUSTAFAR_DTYPE_F16;
        for (g = 0; g < A->group; g++)
            scores[g * MUSTAFAR__CPU_BLOCK] =
                mustafar__record_dot(tok.p, A->d, tok.kept, dt, qf + (size_t)g * A->d);
        return;
    }
    mustafar__scalar_token(A, tok, x);
    for (g = 0; g < A->group; g++) {
        const float *qg = qf + (size_t)g * A->d;
        float s = 0.0f;
        for (c = 0; c < A->d; c++) s += qg[c] * x[c];
        scores[g * MUSTAFAR__CPU_BLOCK] = s;
    }
}

static void mustafar__scalar_axpy(const mustafar__cpu_attn *A, mustafar__cpu_token tok,
                                  const float *weights, float *acc, float *dummy)
{
    float x[256];
    int g, c;
    MUSTAFAR__UNUSED(dummy);
    mustafar__scalar_token(A, tok, x);
    for (g = 0; g < A->group; g++) {
        float *ag = acc + (size_t)g * A->d, w = weights[g * MUSTAFAR__CPU_BLOCK];
        for (c = 0; c < A->d; c++) ag[c] += w * x[c];
    }
}

static void mustafar__scalar_dot_block(const mustafar__cpu_attn *A, const mustafar__cpu_block *B,
                                       const float *qf, float *scores)
{
    int t;
    for (t = 0; t < B->n; t++) {
        mustafar__cpu_prefetch_ahead(A, B, t, 1);
        mustafar__scalar_dot(A, B->toks[t], qf, scores + t);
    }
}

static void mustafar__scalar_axpy_block(const mustafar__cpu_attn *A, const mustafar__cpu_block *B,
                                        const float *weights, float *acc, float *dummy)
{
    int t;
    for (t = 0; t < B->n; t++) {
        mustafar__cpu_prefetch_ahead(A, B, t, 1);
        mustafar__scalar_axpy(A, B->toks[t], weights + t, acc, dummy);
    }
}

static float mustafar__scalar_max_block(const float *x, int n)
{
    float m = -INFINITY;
    int t;
    for (t = 0; t < n; t++) if (x[t] > m) m = x[t];
    return m;
}

static float mustafar__scalar_exp_block(float *x, int n, float m)
{
    float sum = 0.0f;
    int t;
    for (t = 0; t < n; t++) sum += x[t] = expf(x[t] - m);
    for (; t < MUSTAFAR__CPU_BLOCK; t++) x[t] = 0.0f;
    return sum;
}

#if defined(MUSTAFAR__CPU_X86) || defined(MUSTAFAR__CPU_NEON)
/* The accumulators and weight rows of query heads [g0, g0 + 4) of the group,
   for the four-head V passes (AVX2, AVX-512, NEON): past the group's end,
   weight 0 into `dummy`. */
static void mustafar__cpu_head_quad(const mustafar__cpu_attn *A, float *acc, float *dummy,
                                    const float *weights, int g0, float **c, const float **wt)
{
    static const float zero[MUSTAFAR__CPU_BLOCK] = {0};
    int h;
    for (h = 0; h < 4; h++) {
        const int live = g0 + h < A->group;
        c[h] = live ? acc + (size_t)(g0 + h) * A->d : dummy;
        wt[h] = live ? weights + (g0 + h) * MUSTAFAR__CPU_BLOCK : zero;
    }
}
#endif

#if defined(MUSTAFAR__CPU_X86)
/* Eight fp16/bf16 values to floats. */
MUSTAFAR__AVX2_INLINE __m256 mustafar__avx2_widen(__m128i h, int bf16)
{
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* off[j]: the values of a record before channel 8j (exclusive prefix sum of
   the bitmap bytes' popcounts); returns the bitmap's popcount. */
MUSTAFAR__AVX2_INLINE int mustafar__avx2_offsets(const unsigned char *bitmap, int d,
                                                 unsigned char *off)
{
    const __m128i nibble_bits = _mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m128i low = _mm_set1_epi8(0x0F);
    int half, total = 0;
    for (half = 0; half < d / 128 || half == 0; half++) {
        __m128i b = d == 64 ? _mm_loadl_epi64((const __m128i *)(const void *)bitmap)
                            : _mm_loadu_si128((const __m128i *)(const void *)(bitmap + 16 * half));
        __m128i n = _mm_add_epi8(_mm_shuffle_epi8(nibble_bits, _mm_and_si128(b, low)),
                                 _mm_shuffle_epi8(nibble_bits,
                                                  _mm_and_si128(_mm_srli_epi16(b, 4), low)));
        n = _mm_add_epi8(n, _mm_slli_si128(n, 1));
        n = _mm_add_epi8(n, _mm_slli_si128(n, 2));
        n = _mm_add_epi8(n, _mm_slli_si128(n, 4));
        n = _mm_add_epi8(n, _mm_slli_si128(n, 8));
        /* exclusive prefix, plus the values of the first half */
        _mm_storeu_si128((__m128i *)(void *)(off + 16 * half),
                         _mm_add_epi8(_mm_slli_si128(n, 1), _mm_set1_epi8((char)total)));
        total += _mm_extract_epi8(n, 15);
    }
    return total;
}

/* Channels [8j, 8j+8) of a token, its values starting at slot o.  bf16 and
   dense are constants where it is inlined. */
MUSTAFAR__AVX2_INLINE __m256 mustafar__avx2_chunk(const mustafar__cpu_attn *A,
                                                  mustafar__cpu_token tok, int j, int o,
                                                  int bf16, int dense)
{
    const unsigned char *vals = tok.p + ((unsigned)A->d >> 3);
    __m128i raw;
    if (dense)
        return mustafar__avx2_widen(_mm_loadu_si128((const __m128i *)(const void *)(tok.p + 16 * j)),
                                    bf16);
    if (o + 8 <= tok.limit) {
        raw = _mm_loadu_si128((const __m128i *)(const void *)(vals + 2 * o));
    } else {
        uint16_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        memcpy(tail, vals + 2 * o, 2 * (size_t)(tok.limit - o));
        raw = _mm_loadu_si128((const __m128i *)(const void *)tail);
    }
    raw = _mm_shuffle_epi8(raw, _mm_loadu_si128((const __m128i *)(const void *)A->expand[tok.p[j]]));
    return mustafar__avx2_widen(raw, bf16);
}

/* The dot products of two tokens x, y (or one twice) with four query heads:
   each query load serves both. */
MUSTAFAR__AVX2_INLINE void mustafar__avx2_dot4(const mustafar__cpu_attn *A, mustafar__cpu_token x,
                                               const unsigned char *xoff, mustafar__cpu_token y,
                                               const unsigned char *yoff, const float *const *q,
                                               int bf16, int dense_x, int dense_y, float *out)
{
    const int chunks = A->d / 8;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int j;
    for (j = 0; j < chunks; j++) {
        __m256 vx = mustafar__avx2_chunk(A, x, j, xoff[j], bf16, dense_x);
        __m256 vy = mustafar__avx2_chunk(A, y, j, yoff[j], bf16, dense_y);
        __m256 qj = _mm256_loadu_ps(q[0] + 8 * j);
        a0 = _mm256_fmadd_ps(vx, qj, a0);
        b0 = _mm256_fmadd_ps(vy, qj, b0);
        qj = _mm256_loadu_ps(q[1] + 8 * j);
        a1 = _mm256_fmadd_ps(vx, qj, a1);
        b1 = _mm256_fmadd_ps(vy, qj, b1);
        qj = _mm256_loadu_ps(q[2] + 8 * j);
        a2 = _mm256_fmadd_ps(vx, qj, a2);
        b2 = _mm256_fmadd_ps(vy, qj, b2);
        qj = _mm256_loadu_ps(q[3] + 8 * j);
        a3 = _mm256_fmadd_ps(vx, qj, a3);
        b3 = _mm256_fmadd_ps(vy, qj, b3);
    }
    a0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    b0 = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1)));
    _mm_storeu_ps(out + 4, _mm_add_ps(_mm256_castps256_ps128(b0), _mm256_extractf128_ps(b0, 1)));
}

MUSTAFAR__AVX2 static void mustafar__avx2_dot(const mustafar__cpu_attn *A,
                                              const mustafar__cpu_block *B, const float *qf,
                                              float *scores)
{
    const mustafar__cpu_token *toks = B->toks;
    const int n = B->n;
    const int d = A->d, G = A->group;
    unsigned char xoff[32], yoff[32];
    int t = 0, g0, h;
    while (t < n) {
        /* a pair of valid tokens, or one token; a corrupt record goes alone
           through the scalar path */
        mustafar__cpu_token x = toks[t], y;
        const int dense_x = x.kept < 0;
        int dense_y, pair;
        mustafar__cpu_prefetch_ahead(A, B, t, 2);
        if (!dense_x && mustafar__avx2_offsets(x.p, d, xoff) != x.kept) {
            mustafar__scalar_dot(A, x, qf, scores + t);
            t++;
            continue;
        }
        pair = t + 1 < n;
        y = pair ? toks[t + 1] : x;
        dense_y = y.kept < 0;
        if (pair && !dense_y && mustafar__avx2_offsets(y.p, d, yoff) != y.kept) pair = 0;
        if (!pair) {
            y = x;
            dense_y = dense_x;
            memcpy(yoff, xoff, sizeof yoff);
        }
        for (g0 = 0; g0 < G; g0 += 4) {
            /* four heads at a time; past the group's end, repeat its last head */
            const float *q[4];
            float out[8];
            for (h = 0; h < 4; h++) q[h] = qf + (size_t)(g0 + h < G ? g0 + h : G - 1) * d;
            if (A->bf16) {
                if (dense_x && dense_y) mustafar__avx2_dot4(A, x, xoff, y, yoff, q, 1, 1, 1, out);
                else if (!dense_x && !dense_y) mustafar__avx2_dot4(A, x, xoff, y, yoff, q, 1, 0, 0, out);
                else if (dense_x) mustafar__avx2_dot4(A, x, xoff, y, yoff, q, 1, 1, 0, out);
                else mustafar__avx2_dot4(A, x, xoff, y, yoff, q, 1, 0, 1, out);
            } else {
                if (dense_x && dense_y) mustafar__avx2_dot4(A, x, xoff, y, yoff, q, 0, 1, 1, out);
                else if (!dense_x && !dense_y) mustafar__avx2_dot4(A, x, xoff, y, yoff, q, 0, 0, 0, out);
                else if (dense_x) mustafar__avx2_dot4(A, x, xoff, y, yoff, q, 0, 1, 0, out);
                else mustafar__avx2_dot4(A, x, xoff, y, yoff, q, 0, 0, 1, out);
            }
            for (h = 0; h < 4 && g0 + h < G; h++) {
                scores[(g0 + h) * MUSTAFAR__CPU_BLOCK + t] = out[h];
                if (pair) scores[(g0 + h) * MUSTAFAR__CPU_BLOCK + t + 1] = out[4 + h];
            }
        }
        t += pair ? 2 : 1;
    }
}

/* c_h[16s, 16s + 16) += sum over the block's valid tokens of w_h[t] * token t,
   for four heads: the eight accumulators stay in registers over the block. */
MUSTAFAR__AVX2_INLINE void mustafar__avx2_axpy4(const mustafar__cpu_attn *A,
                                                const mustafar__cpu_block *pf,
                                                const mustafar__cpu_token *toks, int n,
                                                unsigned char (*off)[32], const signed char *valid,
                                                float **c, const float *const *wt, int bf16)
{
    const int slices = A->d / 16;
    int s, t;
    for (s = 0; s < slices; s++) {
        __m256 c00 = _mm256_loadu_ps(c[0] + 16 * s), c01 = _mm256_loadu_ps(c[0] + 16 * s + 8);
        __m256 c10 = _mm256_loadu_ps(c[1] + 16 * s), c11 = _mm256_loadu_ps(c[1] + 16 * s + 8);
        __m256 c20 = _mm256_loadu_ps(c[2] + 16 * s), c21 = _mm256_loadu_ps(c[2] + 16 * s + 8);
        __m256 c30 = _mm256_loadu_ps(c[3] + 16 * s), c31 = _mm256_loadu_ps(c[3] + 16 * s + 8);
        for (t = 0; t < n; t++) {
            __m256 x0, x1, w;
            if (pf && s == 0) mustafar__cpu_prefetch_ahead(A, pf, t, 1);
            if (!valid[t]) continue; /* corrupt: done by the scalar path */
            if (toks[t].kept < 0) {
                x0 = mustafar__avx2_chunk(A, toks[t], 2 * s, 0, bf16, 1);
                x1 = mustafar__avx2_chunk(A, toks[t], 2 * s + 1, 0, bf16, 1);
            } else {
                x0 = mustafar__avx2_chunk(A, toks[t], 2 * s, off[t][2 * s], bf16, 0);
                x1 = mustafar__avx2_chunk(A, toks[t], 2 * s + 1, off[t][2 * s + 1], bf16, 0);
            }
            w = _mm256_broadcast_ss(wt[0] + t);
            c00 = _mm256_fmadd_ps(w, x0, c00);
            c01 = _mm256_fmadd_ps(w, x1, c01);
            w = _mm256_broadcast_ss(wt[1] + t);
            c10 = _mm256_fmadd_ps(w, x0, c10);
            c11 = _mm256_fmadd_ps(w, x1, c11);
            w = _mm256_broadcast_ss(wt[2] + t);
            c20 = _mm256_fmadd_ps(w, x0, c20);
            c21 = _mm256_fmadd_ps(w, x1, c21);
            w = _mm256_broadcast_ss(wt[3] + t);
            c30 = _mm256_fmadd_ps(w, x0, c30);
            c31 = _mm256_fmadd_ps(w, x1, c31);
        }
        /* heads past the group's end share `dummy`: the last store wins */
        _mm256_storeu_ps(c[0] + 16 * s, c00);
        _mm256_storeu_ps(c[0] + 16 * s + 8, c01);
        _mm256_storeu_ps(c[1] + 16 * s, c10);
        _mm256_storeu_ps(c[1] + 16 * s + 8, c11);
        _mm256_storeu_ps(c[2] + 16 * s, c20);
        _mm256_storeu_ps(c[2] + 16 * s + 8, c21);
        _mm256_storeu_ps(c[3] + 16 * s, c30);
        _mm256_storeu_ps(c[3] + 16 * s + 8, c31);
    }
}

MUSTAFAR__AVX2 static void mustafar__avx2_axpy(const mustafar__cpu_attn *A,
                                               const mustafar__cpu_block *B, const float *weights,
                                               float *acc, float *dummy)
{
    const mustafar__cpu_token *toks = B->toks;
    const int n = B->n, d = A->d, G = A->group;
    unsigned char off[MUSTAFAR__CPU_BLOCK][32];
    signed char valid[MUSTAFAR__CPU_BLOCK];
    int t, g0;
    for (t = 0; t < n; t++) {
        valid[t] = 1;
        if (toks[t].kept >= 0 && mustafar__avx2_offsets(toks[t].p, d, off[t]) != toks[t].kept) {
            /* a corrupt record: alone through the scalar path */
            mustafar__scalar_axpy(A, toks[t], weights + t, acc, dummy);
            valid[t] = 0;
        }
    }
    for (g0 = 0; g0 < G; g0 += 4) {
        float *c[4];
        const float *wt[4];
        mustafar__cpu_head_quad(A, acc, dummy, weights, g0, c, wt);
        /* the first pass prefetches the next block */
        if (A->bf16) mustafar__avx2_axpy4(A, g0 ? NULL : B, toks, n, off, valid, c, wt, 1);
        else mustafar__avx2_axpy4(A, g0 ? NULL : B, toks, n, off, valid, c, wt, 0);
    }
}

/* The first n - t of 8 lanes (all for n - t >= 8, none for n - t <= 0). */
MUSTAFAR__AVX2_INLINE __m256i mustafar__avx2_lanes8(int n, int t)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n - t), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Eight lanes a step, so the softmax of a block is not a chain of scalar
   dependent operations. */
MUSTAFAR__AVX2 static float mustafar__avx2_max_block(const float *x, int n)
{
    const __m256 none = _mm256_set1_ps(-INFINITY);
    __m256 m = none;
    __m128 h;
    int t;
    for (t = 0; t < n; t += 8) {
        /* the max instruction returns its second operand where the first is NaN */
        __m256 v = _mm256_maskload_ps(x + t, mustafar__avx2_lanes8(n, t));
        m = _mm256_max_ps(_mm256_blendv_ps(none, v, _mm256_castsi256_ps(mustafar__avx2_lanes8(n, t))),
                          m);
    }
    h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

/* exp for x <= 0 (scores minus their running max): 2^n * p(r), relative error
   about 2e-7; below -87 it flushes to 2^-126 * p, which the sum cannot see. */
MUSTAFAR__AVX2 static float mustafar__avx2_exp_block(float *x, int count, float m)
{
    __m256 sum = _mm256_setzero_ps();
    __m128 h;
    int t;
    for (t = 0; t < MUSTAFAR__CPU_BLOCK; t += 8) {
        const __m256i live = mustafar__avx2_lanes8(count, t);
        __m256 v = _mm256_max_ps(_mm256_sub_ps(_mm256_maskload_ps(x + t, live), _mm256_set1_ps(m)),
                                 _mm256_set1_ps(-87.0f));
        __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
        __m256 p = _mm256_set1_ps(1.0f / 720.0f);
        __m256i e;
        r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
        e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        p = _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_castsi256_ps(live));
        _mm256_storeu_ps(x + t, p);
        sum = _mm256_add_ps(sum, p);
    }
    h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
#endif

#if defined(MUSTAFAR__CPU_AVX512)
MUSTAFAR__AVX512_BEGIN
/* AVX-512: a 32-bit bitmap word expands its values to 32 fp16/bf16 lanes in
   one vpexpandw (from a masked load of just its popcount of values: nothing
   past the record is read), then two conversions to 16 fp32 lanes each. */
MUSTAFAR__AVX512_INLINE void mustafar__avx512_widen(__m512i h, int bf16, __m512 *lo, __m512 *hi)
{
    const __m256i a = _mm512_castsi512_si256(h), b = _mm512_extracti64x4_epi64(h, 1);
    if (bf16) {
        *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
        *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
    } else {
        *lo = _mm512_cvtph_ps(a);
        *hi = _mm512_cvtph_ps(b);
    }
}

/* off[w]: the values of a record before channel 32w; returns the popcount. */
MUSTAFAR__AVX512_INLINE int mustafar__avx512_offsets(const unsigned char *bitmap, int d, int *off)
{
    int w, total = 0;
    for (w = 0; w < d / 32; w++) {
        uint32_t m;
        memcpy(&m, bitmap + 4 * w, 4);
        off[w] = total;
        total += _mm_popcnt_u32(m);
    }
    return total;
}

/* Channels [32w, 32w + 32) of a token whose word-w values start at slot o. */
MUSTAFAR__AVX512_INLINE void mustafar__avx512_word(mustafar__cpu_token tok, int d, int w, int o,
                                                   int bf16, int dense, __m512 *lo, __m512 *hi)
{
    uint32_t m;
    if (dense) {
        mustafar__avx512_widen(_mm512_loadu_si512((const void *)(tok.p + 64 * w)), bf16, lo, hi);
        return;
    }
    memcpy(&m, tok.p + 4 * w, 4);
    mustafar__avx512_widen(
        _mm512_maskz_expand_epi16((__mmask32)m,
                                  _mm512_maskz_loadu_epi16((__mmask32)mustafar__lanes32(_mm_popcnt_u32(m)),
                                                           (const void *)(tok.p + d / 8 + 2 * o))),
        bf16, lo, hi);
}

/* The 16 sums of a[k] as one vector, sum of a[4e + l] in element 4l + e:
   a shuffle-and-add tree, 45 operations for 16 sums. */
MUSTAFAR__AVX512_INLINE __m512 mustafar__avx512_sum16(const __m512 *a)
{
    __m512 r[8], s[4], t[2];
    int j;
    MUSTAFAR__UNROLL
    for (j = 0; j < 8; j++) /* 128-bit lanes 0, 1: a[2j]'s halves added; 2, 3: a[2j + 1]'s */
        r[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE));
    MUSTAFAR__UNROLL
    for (j = 0; j < 4; j++) /* lane l: 4 partial sums of a[4j + l] */
        s[j] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * j], r[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(r[2 * j], r[2 * j + 1], 0xDD));
    MUSTAFAR__UNROLL
    for (j = 0; j < 2; j++) /* lane l: 2 partials each of a[8j + l] and a[8j + 4 + l] */
        t[j] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * j], s[2 * j + 1]),
                             _mm512_unpackhi_ps(s[2 * j], s[2 * j + 1]));
    return _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], 0x44), _mm512_shuffle_ps(t[0], t[1], 0xEE));
}

/* The dot products of four tokens x[i] (some may repeat) with four query
   heads, 32 channels a step: each query load serves the four tokens.
   out[4h + i] = q_h . x[i]. */
MUSTAFAR__AVX512_INLINE void mustafar__avx512_dot16(int d, const mustafar__cpu_token *x,
                                                    int (*off)[8], const float *const *q, int bf16,
                                                    float *out)
{
    __m512 a[16];
    int w, i, h;
    MUSTAFAR__UNROLL
    for (i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
    for (w = 0; w < d / 32; w++) {
        __m512 lo[4], hi[4];
        MUSTAFAR__UNROLL
        for (i = 0; i < 4; i++)
            mustafar__avx512_word(x[i], d, w, off[i][w], bf16, x[i].kept < 0, &lo[i], &hi[i]);
        MUSTAFAR__UNROLL
        for (h = 0; h < 4; h++) {
            const __m512 q0 = _mm512_loadu_ps(q[h] + 32 * w), q1 = _mm512_loadu_ps(q[h] + 32 * w + 16);
            MUSTAFAR__UNROLL
            for (i = 0; i < 4; i++)
                a[4 * i + h] = _mm512_fmadd_ps(hi[i], q1, _mm512_fmadd_ps(lo[i], q0, a[4 * i + h]));
        }
    }
    _mm512_storeu_ps(out, mustafar__avx512_sum16(a));
}

MUSTAFAR__AVX512 static void mustafar__avx512_dot(const mustafar__cpu_attn *A,
                                                  const mustafar__cpu_block *B, const float *qf,
                                                  float *scores)
{
    const mustafar__cpu_token *toks = B->toks;
    const int n = B->n, d = A->d, G = A->group;
    mustafar__cpu_token x[4];
    int off[4][8] = {{0}}, at[4];
    int t = 0, k, i, g0, h;
    while (t < n) {
        /* up to four valid tokens; a corrupt record goes alone through the
           scalar path */
        for (k = 0; k < 4 && t < n; t++) {
            mustafar__cpu_prefetch_ahead(A, B, t, 1);
            if (toks[t].kept >= 0 && mustafar__avx512_offsets(toks[t].p, d, off[k]) != toks[t].kept) {
                mustafar__scalar_dot(A, toks[t], qf, scores + t);
                continue;
            }
            x[k] = toks[t];
            at[k++] = t;
        }
        if (!k) break;
        for (i = k; i < 4; i++) {
            x[i] = x[0];
            memcpy(off[i], off[0], sizeof off[0]);
        }
        for (g0 = 0; g0 < G; g0 += 4) {
            /* four heads at a time; past the group's end, repeat its last head */
            const float *q[4];
            float out[16];
            for (h = 0; h < 4; h++) q[h] = qf + (size_t)(g0 + h < G ? g0 + h : G - 1) * d;
            if (A->bf16) mustafar__avx512_dot16(d, x, off, q, 1, out);
            else mustafar__avx512_dot16(d, x, off, q, 0, out);
            for (h = 0; h < 4 && g0 + h < G; h++)
                for (i = 0; i < k; i++) scores[(g0 + h) * MUSTAFAR__CPU_BLOCK + at[i]] = out[4 * h + i];
        }
    }
}

/* c_h[32w, 32w + 32) += sum over the block's valid tokens of w_h[t] * token t,
   for four heads: the accumulators stay in registers over the whole block. */
MUSTAFAR__AVX512_INLINE void mustafar__avx512_axpy4(const mustafar__cpu_attn *A,
                                                    const mustafar__cpu_block *pf,
                                                    const mustafar__cpu_token *toks, int n,
                                                    int (*off)[8], float **c,
                                                    const float *const *wt, int bf16)
{
    const int d = A->d;
    int w, t;
    for (w = 0; w < d / 32; w++) {
        __m512 c00 = _mm512_loadu_ps(c[0] + 32 * w), c01 = _mm512_loadu_ps(c[0] + 32 * w + 16);
        __m512 c10 = _mm512_loadu_ps(c[1] + 32 * w), c11 = _mm512_loadu_ps(c[1] + 32 * w + 16);
        __m512 c20 = _mm512_loadu_ps(c[2] + 32 * w), c21 = _mm512_loadu_ps(c[2] + 32 * w + 16);
        __m512 c30 = _mm512_loadu_ps(c[3] + 32 * w), c31 = _mm512_loadu_ps(c[3] + 32 * w + 16);
        for (t = 0; t < n; t++) {
            __m512 x0, x1, s;
            if (pf && w == 0) mustafar__cpu_prefetch_ahead(A, pf, t, 1);
            if (off[t][0] < 0) continue; /* corrupt: done by the scalar path */
            if (toks[t].kept < 0) mustafar__avx512_word(toks[t], d, w, 0, bf16, 1, &x0, &x1);
            else mustafar__avx512_word(toks[t], d, w, off[t][w], bf16, 0, &x0, &x1);
            s = _mm512_set1_ps(wt[0][t]);
            c00 = _mm512_fmadd_ps(s, x0, c00);
            c01 = _mm512_fmadd_ps(s, x1, c01);
            s = _mm512_set1_ps(wt[1][t]);
            c10 = _mm512_fmadd_ps(s, x0, c10);
            c11 = _mm512_fmadd_ps(s, x1, c11);
            s = _mm512_set1_ps(wt[2][t]);
            c20 = _mm512_fmadd_ps(s, x0, c20);
            c21 = _mm512_fmadd_ps(s, x1, c21);
            s = _mm512_set1_ps(wt[3][t]);
            c30 = _mm512_fmadd_ps(s, x0, c30);
            c31 = _mm512_fmadd_ps(s, x1, c31);
        }
        /* heads past the group's end share `dummy`: the last store wins */
        _mm512_storeu_ps(c[0] + 32 * w, c00);
        _mm512_storeu_ps(c[0] + 32 * w + 16, c01);
        _mm512_storeu_ps(c[1] + 32 * w, c10);
        _mm512_storeu_ps(c[1] + 32 * w + 16, c11);
        _mm512_storeu_ps(c[2] + 32 * w, c20);
        _mm512_storeu_ps(c[2] + 32 * w + 16, c21);
        _mm512_storeu_ps(c[3] + 32 * w, c30);
        _mm512_storeu_ps(c[3] + 32 * w + 16, c31);
    }
}

MUSTAFAR__AVX512 static void mustafar__avx512_axpy(const mustafar__cpu_attn *A,
                                                   const mustafar__cpu_block *B, const float *weights,
                                                   float *acc, float *dummy)
{
    const mustafar__cpu_token *toks = B->toks;
    const int n = B->n, d = A->d, G = A->group;
    int off[MUSTAFAR__CPU_BLOCK][8];
    int t, g0;
    for (t = 0; t < n; t++) {
        if (toks[t].kept < 0) {
            off[t][0] = 0;
        } else if (mustafar__avx512_offsets(toks[t].p, d, off[t]) != toks[t].kept) {
            /* a corrupt record: alone through the scalar path */
            mustafar__scalar_axpy(A, toks[t], weights + t, acc, dummy);
            off[t][0] = -1;
        }
    }
    for (g0 = 0; g0 < G; g0 += 4) {
        float *c[4];
        const float *wt[4];
        mustafar__cpu_head_quad(A, acc, dummy, weights, g0, c, wt);
        /* the first pass prefetches the next block */
        if (A->bf16) mustafar__avx512_axpy4(A, g0 ? NULL : B, toks, n, off, c, wt, 1);
        else mustafar__avx512_axpy4(A, g0 ? NULL : B, toks, n, off, c, wt, 0);
    }
}
MUSTAFAR__AVX512_END
#endif

#if defined(MUSTAFAR__CPU_NEON)
/* NEON: the same decode as AVX2 with tbl for the expansion, four heads per
   pass. */
static int mustafar__neon_offsets(const unsigned char *bitmap, int d, unsigned char *off)
{
    unsigned char counts[32];
    int j, total = 0;
    vst1q_u8(counts, vcntq_u8(vld1q_u8(bitmap)));
    if (d == 256) vst1q_u8(counts + 16, vcntq_u8(vld1q_u8(bitmap + 16)));
    for (j = 0; j < d / 8; j++) {
        off[j] = (unsigned char)total;
        total += counts[j];
    }
    return total;
}

/* Channels [8j, 8j+8) of a token as two float vectors. */
static void mustafar__neon_chunk(const mustafar__cpu_attn *A, mustafar__cpu_token tok, int j, int o,
                                 float32x4_t *lo, float32x4_t *hi)
{
    uint16x8_t h;
    if (tok.kept < 0) {
        h = vld1q_u16((const uint16_t *)(const void *)(tok.p + 16 * j));
    } else {
        const unsigned char *vals = tok.p + A->d / 8;
        uint8x16_t raw;
        if (o + 8 <= tok.limit) {
            raw = vld1q_u8(vals + 2 * o);
        } else {
            unsigned char tail[16] = {0};
            memcpy(tail, vals + 2 * o, 2 * (size_t)(tok.limit - o));
            raw = vld1q_u8(tail);
        }
        h = vreinterpretq_u16_u8(vqtbl1q_u8(raw, vld1q_u8(A->expand[tok.p[j]])));
    }
    if (A->bf16) {
        *lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
        *hi = vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16));
    } else {
        *lo = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
        *hi = vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)));
    }
}

static void mustafar__neon_dot(const mustafar__cpu_attn *A, const mustafar__cpu_block *B,
                               const float *qf, float *scores)
{
    const mustafar__cpu_token *toks = B->toks;
    const int n = B->n;
    const int d = A->d, G = A->group;
    unsigned char off[32];
    int t, g0, h, j;
    for (t = 0; t < n; t++) {
        const mustafar__cpu_token tok = toks[t];
        mustafar__cpu_prefetch_ahead(A, B, t, 1);
        if (tok.kept >= 0 && mustafar__neon_offsets(tok.p, d, off) != tok.kept) {
            mustafar__scalar_dot(A, tok, qf, scores + t);
            continue;
        }
        for (g0 = 0; g0 < G; g0 += 4) {
            float32x4_t acc[4];
            const float *q[4];
            for (h = 0; h < 4; h++) {
                q[h] = qf + (size_t)(g0 + h < G ? g0 + h : G - 1) * d;
                acc[h] = vdupq_n_f32(0.0f);
            }
            for (j = 0; j < d / 8; j++) {
                float32x4_t lo, hi;
                mustafar__neon_chunk(A, tok, j, tok.kept < 0 ? 0 : off[j], &lo, &hi);
                for (h = 0; h < 4; h++) {
                    acc[h] = vfmaq_f32(acc[h], lo, vld1q_f32(q[h] + 8 * j));
                    acc[h] = vfmaq_f32(acc[h], hi, vld1q_f32(q[h] + 8 * j + 4));
                }
            }
            for (h = 0; h < 4 && g0 + h < G; h++)
                scores[(g0 + h) * MUSTAFAR__CPU_BLOCK + t] = vaddvq_f32(acc[h]);
        }
    }
}

/* c_h[16s, 16s + 16) += sum over the block's valid tokens of w_h[t] * token t,
   for four heads: the sixteen accumulators stay in registers over the block
   (of AArch64's 32 vector registers). */
static void mustafar__neon_axpy4(const mustafar__cpu_attn *A, const mustafar__cpu_block *pf,
                                 const mustafar__cpu_token *toks, int n, unsigned char (*off)[32],
                                 const signed char *valid, float **c, const float *const *wt)
{
    const int slices = A->d / 16;
    int s, t, h, k;
    for (s = 0; s < slices; s++) {
        float32x4_t acc[4][4];
        for (h = 0; h < 4; h++)
            for (k = 0; k < 4; k++) acc[h][k] = vld1q_f32(c[h] + 16 * s + 4 * k);
        for (t = 0; t < n; t++) {
            float32x4_t x[4];
            if (pf && s == 0) mustafar__cpu_prefetch_ahead(A, pf, t, 1);
            if (!valid[t]) continue; /* corrupt: done by the scalar path */
            mustafar__neon_chunk(A, toks[t], 2 * s, toks[t].kept < 0 ? 0 : off[t][2 * s], &x[0], &x[1]);
            mustafar__neon_chunk(A, toks[t], 2 * s + 1, toks[t].kept < 0 ? 0 : off[t][2 * s + 1],
                                 &x[2], &x[3]);
            for (h = 0; h < 4; h++) {
                const float w = wt[h][t];
                for (k = 0; k < 4; k++) acc[h][k] = vfmaq_n_f32(acc[h][k], x[k], w);
            }
        }
        /* heads past the group's end share `dummy`: the last store wins */
        for (h = 0; h < 4; h++)
            for (k = 0; k < 4; k++) vst1q_f32(c[h] + 16 * s + 4 * k, acc[h][k]);
    }
}

static void mustafar__neon_axpy(const mustafar__cpu_attn *A, const mustafar__cpu_block *B,
                                const float *weights, float *acc, float *dummy)
{
    const mustafar__cpu_token *toks = B->toks;
    const int n = B->n, d = A->d, G = A->group;
    unsigned char off[MUSTAFAR__CPU_BLOCK][32];
    signed char valid[MUSTAFAR__CPU_BLOCK];
    int t, g0;
    for (t = 0; t < n; t++) {
        valid[t] = 1;
        if (toks[t].kept >= 0 && mustafar__neon_offsets(toks[t].p, d, off[t]) != toks[t].kept) {
            /* a corrupt record: alone through the scalar path */
            mustafar__scalar_axpy(A, toks[t], weights + t, acc, dummy);
            valid[t] = 0;
        }
    }
    for (g0 = 0; g0 < G; g0 += 4) {
        float *c[4];
        const float *wt[4];
        mustafar__cpu_head_quad(A, acc, dummy, weights, g0, c, wt);
        /* the first pass prefetches the next block */
        mustafar__neon_axpy4(A, g0 ? NULL : B, toks, n, off, valid, c, wt);
    }
}
#endif

/* The tokens [first, first + n) of a sequence for one KV head, K (value 0)
   or V: one page-table look-up per page, then the page's records one after
   the other. */
static void mustafar__cpu_tokens(const mustafar__cpu_attn *A, const mustafar_paged_seq *s,
                                 const int32_t *table, int32_t first, int n, int kv_head,
                                 int value, mustafar__cpu_token *toks)
{
    const mustafar__layout *L = A->L;
    const size_t rec = value ? L->v_record : L->k_record;
    const unsigned char *pages = (const unsigned char *)(value ? A->kv->v_pages : A->kv->k_pages);
    const uint16_t *window = (const uint16_t *)(value ? A->kv->v_window : A->kv->k_window);
    const int kept = value ? L->v_kept : L->k_kept, slots = (int)((rec - (size_t)A->d / 8) / 2);
    int32_t p = first, page = first / L->page_size, slot = first % L->page_size;
    int t = 0;
    while (t < n && p < s->num_compressed) {
        const unsigned char *r = pages + (((size_t)table[page] * L->num_kv_heads + kv_head) *
                                          L->page_size + (size_t)slot) * rec;
        int run = L->page_size - slot, i;
        if (run > n - t) run = n - t;
        if (run > s->num_compressed - p) run = (int)(s->num_compressed - p);
        for (i = 0; i < run; i++, t++, r += rec) {
            toks[t].p = r;
            toks[t].kept = kept;
            /* a record is followed by the next one of its page, at least 16 bytes */
            toks[t].limit = slots + 8;
        }
        p += run;
        slot += run;
        if (slot == L->page_size) {
            toks[t - 1].limit = slots;
            slot = 0;
            page++;
        }
    }
    for (; t < n; t++, p++) {
        toks[t].p = (const unsigned char *)(const void *)(window +
                                                          mustafar__window_offset(L, s->row, p, kv_head));
        toks[t].kept = -1;
        toks[t].limit = A->d;
    }
}

/* The scratch of a work item: acc[G][D], max[G], sum[G], then the work
   space: q[G][D], scores[G][BLOCK], dummy[D]. */
static size_t mustafar__cpu_item_floats(int group, int d)
{
    return (size_t)group * (2 * (size_t)d + 2 + MUSTAFAR__CPU_BLOCK) + (size_t)d;
}

/* Work item `index`'s state (see mustafar__cpu_item_floats) before its
   first block. */
static void mustafar__cpu_item_begin(const mustafar__cpu_attn *A, int index)
{
    const mustafar__cpu_item *it = &A->items[index];
    const int d = A->d, G = A->group, hq = A->L->num_q_heads;
    const mustafar_dtype dt = A->bf16 ? MUSTAFAR_DTYPE_BF16 : MUSTAFAR_DTYPE_F16;
    float *acc = A->scratch + (size_t)index * A->item_floats;
    float *mx = acc + (size_t)G * d, *sum = mx + G, *qf = sum + G;
    int g, c;
    for (g = 0; g < G; g++) {
        const uint16_t *qh = A->q + ((size_t)it->seq * hq + (size_t)it->kv_head * G + g) * d;
        for (c = 0; c < d; c++) qf[(size_t)g * d + c] = mustafar__load(dt, qh[c]) * A->scale;
        mx[g] = -INFINITY;
        sum[g] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)G * d);
}

/* One block of work item `index`: scores, online-softmax update, values. */
static void mustafar__cpu_item_block(const mustafar__cpu_attn *A, int index,
                                     const mustafar__cpu_block *kb, const mustafar__cpu_block *vb)
{
    const int d = A->d, G = A->group;
    float *acc = A->scratch + (size_t)index * A->item_floats;
    float *mx = acc + (size_t)G * d, *sum = mx + G, *qf = sum + G;
    float *scores = qf + (size_t)G * d, *dummy = scores + (size_t)G * MUSTAFAR__CPU_BLOCK;
    int g, c;
    A->dot(A, kb, qf, scores);
    for (g = 0; g < G; g++) {
        float *row = scores + (size_t)g * MUSTAFAR__CPU_BLOCK, block_max = A->max_block(row, kb->n), m;
        m = block_max > mx[g] ? block_max : mx[g];
        if (m != mx[g]) {
            float correction = expf(mx[g] - m);
            float *ag = acc + (size_t)g * d;
            for (c = 0; c < d; c++) ag[c] *= correction;
            sum[g] *= correction;
            mx[g] = m;
        }
        sum[g] += A->exp_block(row, kb->n, m);
    }
    A->axpy(A, vb, scores, acc, dummy);
}

/* Task `task`: the work items [task * Hkv, task * Hkv + Hkv), one token
   range of a sequence for each KV head, a block of each head in turn. */
static void mustafar__cpu_attention_task(void *data, int task)
{
    const mustafar__cpu_attn *A = (const mustafar__cpu_attn *)data;
    const int hkv = A->L->num_kv_heads, first_item = task * hkv;
    const mustafar__cpu_item *it = &A->items[first_item];
    const mustafar_paged_seq *s = &A->seqs[it->seq];
    const int32_t *table = A->kv->page_table + (size_t)s->row * A->kv->page_table_stride;
    /* K [0] and V [1] tokens of this step [cur] and of the next [!cur] */
    mustafar__cpu_token toks[2][2][MUSTAFAR__CPU_BLOCK];
    mustafar__cpu_block kb, vb;
    int32_t b = it->first, next_b;
    int h, next_h, cur = 0, nb, nn;
    for (h = 0; h < hkv; h++) mustafar__cpu_item_begin(A, first_item + h);
    nb = it->end - b < MUSTAFAR__CPU_BLOCK ? (int)(it->end - b) : MUSTAFAR__CPU_BLOCK;
    mustafar__cpu_tokens(A, s, table, b, nb, 0, 0, toks[0][0]);
    mustafar__cpu_tokens(A, s, table, b, nb, 0, 1, toks[0][1]);
    for (h = 0; b < it->end; h = next_h, cur = !cur) {
        /* the next step: this block of the next head, or the next block of head 0 */
        next_h = h + 1 < hkv ? h + 1 : 0;
        next_b = next_h ? b : b + nb;
        nn = it->end - next_b < MUSTAFAR__CPU_BLOCK ? (int)(it->end - next_b) : MUSTAFAR__CPU_BLOCK;
        mustafar__cpu_tokens(A, s, table, next_b, nn, next_h, 0, toks[!cur][0]);
        mustafar__cpu_tokens(A, s, table, next_b, nn, next_h, 1, toks[!cur][1]);
        kb.toks = toks[cur][0];
        kb.ahead = toks[!cur][0];
        vb.toks = toks[cur][1];
        vb.ahead = toks[!cur][1];
        kb.n = vb.n = nb;
        kb.nahead = vb.nahead = nn;
        mustafar__cpu_item_block(A, first_item + h, &kb, &vb);
        if (!next_h) {
            b = next_b;
            nb = nn;
        }
    }
}

/* softmax(q K^T scale) V per (sequence, query head); max_len unused here. */
static mustafar_status mustafar__cpu_attention(mustafar_context *ctx, const mustafar__layout *L,
                                               const mustafar_paged_kv *kv, int nseq,
                                               const mustafar_paged_seq *seqs, int32_t max_len,
                                               const uint16_t *q, uint16_t *out, float scale)
{
    const int d = L->head_dim, G = L->group, hkv = L->num_kv_heads, threads =
        mustafar__cpu_threads_of(ctx);
    const int simd = mustafar__cpu_simd_of(ctx);
    const size_t item_floats = mustafar__cpu_item_floats(G, d);
    mustafar__cpu_attn *A;
    mustafar__cpu_item *items;
    int32_t *first_item;
    unsigned char *work, *base;
    size_t at_attn, at_first, at_items, bytes;
    int64_t total = 0, chunk;
    int i, h, g, c, n = 0, bits;
    MUSTAFAR__UNUSED(max_len);
    /* splits: about four tasks per thread, at least MIN_SPLIT (token, KV head)
       pairs each; items ordered [sequence][split][KV head], a task's together */
    for (i = 0; i < nseq; i++) total += (int64_t)(seqs[i].num_compressed + seqs[i].num_window);
    chunk = threads > 1 ? (total + 4 * threads - 1) / (4 * threads) : INT32_MAX;
    if (chunk * hkv < MUSTAFAR__CPU_MIN_SPLIT) chunk = (MUSTAFAR__CPU_MIN_SPLIT + hkv - 1) / hkv;
    chunk = (chunk + MUSTAFAR__CPU_BLOCK - 1) / MUSTAFAR__CPU_BLOCK * MUSTAFAR__CPU_BLOCK;
    for (i = 0; i < nseq; i++)
        n += (int)((seqs[i].num_compressed + seqs[i].num_window + chunk - 1) / chunk) * hkv;
    /* one work space from a 64-byte boundary: scratch[n][item_floats] (its
       vectors then split no cache line: 16 bytes off a 32-byte boundary the
       calls took 5 % longer on Zen 4, 1.88 against 1.79 ms at B=1, T=4k,
       one thread), then A, first_item[nseq + 1], items[n] */
    at_attn = mustafar__align_up(sizeof(float) * item_floats * (size_t)n, 64);
    at_first = mustafar__align_up(at_attn + sizeof *A, 64);
    at_items = mustafar__align_up(at_first + sizeof(int32_t) * ((size_t)nseq + 1), 64);
    bytes = 64 + at_items + sizeof *items * (size_t)n;
    work = (unsigned char *)mustafar__cpu_work(mustafar__cpu_of(ctx), bytes);
    if (!work)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY,
                              "host allocation of %zu bytes of attention work space failed", bytes);
    base = work + (64 - (size_t)((uintptr_t)work % 64)) % 64;
    A = (mustafar__cpu_attn *)(void *)(base + at_attn);
    memset(A, 0, sizeof *A);
    first_item = (int32_t *)(void *)(base + at_first);
    items = (mustafar__cpu_item *)(void *)(base + at_items);
    A->scratch = (float *)(void *)base;
    A->item_floats = item_floats;
    n = 0;
    for (i = 0; i < nseq; i++) {
        first_item[i] = n;
        n += (int)((seqs[i].num_compressed + seqs[i].num_window + chunk - 1) / chunk) * hkv;
    }
    first_item[nseq] = n;
    for (i = 0; i < nseq; i++) {
        const int32_t len = seqs[i].num_compressed + seqs[i].num_window;
        const int splits = (first_item[i + 1] - first_item[i]) / hkv;
        for (h = 0; h < hkv; h++) {
            int sp;
            for (sp = 0; sp < splits; sp++) {
                mustafar__cpu_item *it = &items[first_item[i] + sp * hkv + h];
                it->seq = i;
                it->kv_head = h;
                it->first = (int32_t)(sp * chunk);
                it->end = (int32_t)((sp + 1) * chunk < len ? (sp + 1) * chunk : len);
            }
        }
    }
    A->L = L;
    A->kv = kv;
    A->seqs = seqs;
    A->q = q;
    A->scale = scale;
    A->d = d;
    A->group = G;
    A->bf16 = L->dtype == MUSTAFAR_DTYPE_BF16;
    A->items = items;
    A->dot = mustafar__scalar_dot_block;
    A->axpy = mustafar__scalar_axpy_block;
    A->max_block = mustafar__scalar_max_block;
    A->exp_block = mustafar__scalar_exp_block;
#if defined(MUSTAFAR__CPU_X86)
    if (simd == MUSTAFAR__SIMD_AVX2) {
        A->dot = mustafar__avx2_dot;
        A->axpy = mustafar__avx2_axpy;
        A->max_block = mustafar__avx2_max_block;
        A->exp_block = mustafar__avx2_exp_block;
    }
#endif
#if defined(MUSTAFAR__CPU_AVX512)
    if (simd == MUSTAFAR__SIMD_AVX512) {
        A->dot = mustafar__avx512_dot;
        A->axpy = mustafar__avx512_axpy;
        A->max_block = mustafar__avx2_max_block;
        A->exp_block = mustafar__avx2_exp_block;
    }
#endif
#if defined(MUSTAFAR__CPU_NEON)
    if (simd == MUSTAFAR__SIMD_NEON) {
        A->dot = mustafar__neon_dot;
        A->axpy = mustafar__neon_axpy;
    }
#endif
    MUSTAFAR__UNUSED(simd);
    for (bits = 0; bits < 256; bits++) {
        int lane, k = 0;
        for (lane = 0; lane < 8; lane++) {
            int set = bits >> lane & 1;
            A->expand[bits][2 * lane] = (unsigned char)(set ? 2 * k : 0x80);
            A->expand[bits][2 * lane + 1] = (unsigned char)(set ? 2 * k + 1 : 0x80);
            k += set;
        }
    }
    mustafar__cpu_parallel_for(mustafar__cpu_of(ctx), mustafar__cpu_attention_task, A, n / hkv);
    /* combine the splits of each (sequence, KV head) */
    for (i = 0; i < nseq; i++) {
        const int splits = (first_item[i + 1] - first_item[i]) / hkv;
        for (h = 0; h < hkv; h++) {
            const float *part = A->scratch + (size_t)(first_item[i] + h) * A->item_floats;
            const size_t split_stride = (size_t)hkv * A->item_floats;
            for (g = 0; g < G; g++) {
                uint16_t *o = out + ((size_t)i * L->num_q_heads + (size_t)h * G + g) * d;
                float m = -INFINITY, total_sum = 0.0f, result[256];
                int sp;
                for (sp = 0; sp < splits; sp++) {
                    float ms = part[sp * split_stride + (size_t)G * d + g];
                    if (ms > m) m = ms;
                }
                for (c = 0; c < d; c++) result[c] = 0.0f;
                for (sp = 0; sp < splits; sp++) {
                    const float *ps = part + sp * split_stride;
                    float w = ps[(size_t)G * d + g] == m ? 1.0f : expf(ps[(size_t)G * d + g] - m);
                    total_sum += ps[(size_t)G * d + G + g] * w;
                    for (c = 0; c < d; c++) result[c] += ps[(size_t)g * d + c] * w;
                }
                for (c = 0; c < d; c++)
                    o[c] = mustafar__store(L->dtype, splits ? result[c] / total_sum : 0.0f);
            }
        }
    }
    if (!mustafar__cpu_of(ctx)) MUSTAFAR_FREE(work);
    return MUSTAFAR_OK;
}


/* ==== >>cuda: the CUDA backend (loading, state, JIT and disk cache, memory, operations) ====
   Runtime API and NVRTC only.  Every function here runs with the context's
   device current: the dispatch functions (>>dispatch) switch to it and back.

   The CUDA runtime and NVRTC are loaded at run time (dlopen / LoadLibrary),
   so a program built with no CUDA header or library starts on any machine
   and uses the GPU where one is usable.  With MUSTAFAR_CUDA_LINKED the
   header includes CUDA's own headers and the program links -lcudart
   -lnvrtc instead; the same table of functions is then filled from the
   linked symbols, and the compiler checks the declarations below against
   CUDA's. */
#ifndef MUSTAFAR_NO_CUDA

#include <sys/stat.h>
#include <time.h>
#ifdef _WIN32
#  ifndef WIN32_LEAN_AND_MEAN
#    define WIN32_LEAN_AND_MEAN
#  endif
#  include <windows.h>
#  include <direct.h>
#  define MUSTAFAR__CUDAAPI __stdcall
#else
#  include <dlfcn.h>
#  define MUSTAFAR__CUDAAPI
#endif

/* ---- the runtime API and NVRTC: types, constants, function table ------------ */

#ifdef MUSTAFAR_CUDA_LINKED
/* CUDA's headers use anonymous unions, which -Wpedantic rejects in C99. */
#  if defined(__GNUC__)
#    pragma GCC diagnostic push
#    pragma GCC diagnostic ignored "-Wpedantic"
#  endif
#  include <cuda_runtime.h>
#  include <nvrtc.h>
#  if defined(__GNUC__)
#    pragma GCC diagnostic pop
#  endif
typedef cudaError_t mustafar__cudaError;
typedef enum cudaDeviceAttr mustafar__cudaDeviceAttr;
typedef enum cudaMemcpyKind mustafar__cudaMemcpyKind;
typedef enum cudaFuncAttribute mustafar__cudaFuncAttribute;
typedef enum cudaJitOption mustafar__cudaJitOption;
typedef enum cudaLibraryOption mustafar__cudaLibraryOption;
typedef enum cudaLaunchAttributeID mustafar__cudaLaunchAttributeID;
typedef cudaStream_t mustafar__cudaStream;
typedef cudaEvent_t mustafar__cudaEvent;
typedef cudaLibrary_t mustafar__cudaLibrary;
typedef cudaKernel_t mustafar__cudaKernel;
typedef cudaLaunchConfig_t mustafar__cudaLaunchConfig;
typedef cudaLaunchAttribute mustafar__cudaLaunchAttribute;
typedef nvrtcResult mustafar__nvrtcResult;
typedef nvrtcProgram mustafar__nvrtcProgram;
#else
/* From the runtime API's and NVRTC's documented, stable C ABI (CUDA 12 and
   13): enums are int, handles are pointers to opaque structs. */
typedef int mustafar__cudaError;
typedef int mustafar__cudaDeviceAttr;
typedef int mustafar__cudaMemcpyKind;
typedef int mustafar__cudaFuncAttribute;
typedef int mustafar__cudaJitOption;
typedef int mustafar__cudaLibraryOption;
typedef int mustafar__cudaLaunchAttributeID;
typedef struct mustafar__CUstream_st *mustafar__cudaStream;
typedef struct mustafar__CUevent_st *mustafar__cudaEvent;
typedef struct mustafar__CUlib_st *mustafar__cudaLibrary;
typedef struct mustafar__CUkern_st *mustafar__cudaKernel;
typedef struct mustafar__dim3 { unsigned int x, y, z; } mustafar__dim3;
typedef struct mustafar__cudaLaunchAttribute {
    int id;
    char pad[8 - sizeof(int)];
    union { char pad[64]; int programmaticStreamSerializationAllowed; } val;
} mustafar__cudaLaunchAttribute;
typedef struct mustafar__cudaLaunchConfig {
    mustafar__dim3 gridDim, blockDim;
    size_t dynamicSmemBytes;
    mustafar__cudaStream stream;
    mustafar__cudaLaunchAttribute *attrs;
    unsigned int numAttrs;
} mustafar__cudaLaunchConfig;
typedef int mustafar__nvrtcResult;
typedef struct mustafar__nvrtcProgram_st *mustafar__nvrtcProgram;
#endif

/* Values of the runtime API's enums that the library uses. */
#define MUSTAFAR__cudaSuccess 0
#define MUSTAFAR__cudaMemcpyHostToDevice ((mustafar__cudaMemcpyKind)1)
#define MUSTAFAR__cudaMemcpyDeviceToHost ((mustafar__cudaMemcpyKind)2)
#define MUSTAFAR__cudaEventDisableTiming 2u
#define MUSTAFAR__cudaDevAttrMultiProcessorCount ((mustafar__cudaDeviceAttr)16)
#define MUSTAFAR__cudaDevAttrComputeCapabilityMajor ((mustafar__cudaDeviceAttr)75)
#define MUSTAFAR__cudaDevAttrComputeCapabilityMinor ((mustafar__cudaDeviceAttr)76)
#define MUSTAFAR__cudaDevAttrMaxSharedMemoryPerBlockOptin ((mustafar__cudaDeviceAttr)97)
#define MUSTAFAR__cudaFuncAttributeMaxDynamicSharedMemorySize ((mustafar__cudaFuncAttribute)8)
#define MUSTAFAR__cudaLaunchAttributeProgrammaticStreamSerialization ((mustafar__cudaLaunchAttributeID)6)
#define MUSTAFAR__NVRTC_SUCCESS 0
#define MUSTAFAR__NVRTC_ERROR_INVALID_OPTION 5

/* X-lists of the functions used: (name in the table, return type, parameters). */
#define MUSTAFAR__CUDART_FUNCTIONS(X)                                                              \
    X(GetErrorName, const char *, (mustafar__cudaError))                                           \
    X(GetErrorString, const char *, (mustafar__cudaError))                                         \
    X(GetLastError, mustafar__cudaError, (void))                                                   \
    X(GetDeviceCount, mustafar__cudaError, (int *))                                                \
    X(GetDevice, mustafar__cudaError, (int *))                                                     \
    X(SetDevice, mustafar__cudaError, (int))                                                       \
    X(DriverGetVersion, mustafar__cudaError, (int *))                                              \
    X(DeviceGetAttribute, mustafar__cudaError, (int *, mustafar__cudaDeviceAttr, int))             \
    X(MemGetInfo, mustafar__cudaError, (size_t *, size_t *))                                       \
    X(Malloc, mustafar__cudaError, (void **, size_t))                                              \
    X(Free, mustafar__cudaError, (void *))                                                         \
    X(MallocHost, mustafar__cudaError, (void **, size_t))                                          \
    X(FreeHost, mustafar__cudaError, (void *))                                                     \
    X(MemsetAsync, mustafar__cudaError, (void *, int, size_t, mustafar__cudaStream))               \
    X(MemcpyAsync, mustafar__cudaError,                                                            \
      (void *, const void *, size_t, mustafar__cudaMemcpyKind, mustafar__cudaStream))              \
    X(StreamSynchronize, mustafar__cudaError, (mustafar__cudaStream))                              \
    X(EventCreateWithFlags, mustafar__cudaError, (mustafar__cudaEvent *, unsigned int))            \
    X(EventRecord, mustafar__cudaError, (mustafar__cudaEvent, mustafar__cudaStream))               \
    X(EventSynchronize, mustafar__cudaError, (mustafar__cudaEvent))                                \
    X(EventDestroy, mustafar__cudaError, (mustafar__cudaEvent))                                    \
    X(LibraryLoadData, mustafar__cudaError,                                                        \
      (mustafar__cudaLibrary *, const void *, mustafar__cudaJitOption *, void **, unsigned int,    \
       mustafar__cudaLibraryOption *, void **, unsigned int))                                      \
    X(LibraryUnload, mustafar__cudaError, (mustafar__cudaLibrary))                                 \
    X(LibraryGetKernel, mustafar__cudaError,                                                       \
      (mustafar__cudaKernel *, mustafar__cudaLibrary, const char *))                               \
    X(FuncSetAttribute, mustafar__cudaError, (const void *, mustafar__cudaFuncAttribute, int))     \
    X(OccupancyMaxActiveBlocksPerMultiprocessor, mustafar__cudaError,                              \
      (int *, const void *, int, size_t))                                                          \
    X(LaunchKernelExC, mustafar__cudaError,                                                        \
      (const mustafar__cudaLaunchConfig *, const void *, void **))
#define MUSTAFAR__NVRTC_FUNCTIONS(X)                                                               \
    X(GetErrorString, const char *, (mustafar__nvrtcResult))                                       \
    X(Version, mustafar__nvrtcResult, (int *, int *))                                              \
    X(GetNumSupportedArchs, mustafar__nvrtcResult, (int *))                                        \
    X(GetSupportedArchs, mustafar__nvrtcResult, (int *))                                           \
    X(CreateProgram, mustafar__nvrtcResult,                                                        \
      (mustafar__nvrtcProgram *, const char *, const char *, int, const char *const *,             \
       const char *const *))                                                                       \
    X(CompileProgram, mustafar__nvrtcResult, (mustafar__nvrtcProgram, int, const char *const *))   \
    X(DestroyProgram, mustafar__nvrtcResult, (mustafar__nvrtcProgram *))                           \
    X(GetProgramLogSize, mustafar__nvrtcResult, (mustafar__nvrtcProgram, size_t *))                \
    X(GetProgramLog, mustafar__nvrtcResult, (mustafar__nvrtcProgram, char *))                      \
    X(GetCUBINSize, mustafar__nvrtcResult, (mustafar__nvrtcProgram, size_t *))                     \
    X(GetCUBIN, mustafar__nvrtcResult, (mustafar__nvrtcProgram, char *))

#define MUSTAFAR__FIELD(name, ret, params) ret(MUSTAFAR__CUDAAPI *name) params;
typedef struct mustafar__cudart_api { MUSTAFAR__CUDART_FUNCTIONS(MUSTAFAR__FIELD) } mustafar__cudart_api;
typedef struct mustafar__nvrtc_api { MUSTAFAR__NVRTC_FUNCTIONS(MUSTAFAR__FIELD) } mustafar__nvrtc_api;
#undef MUSTAFAR__FIELD

/* The loaded libraries of one context (dlopen counts references, so each
   context holds its own). */
typedef struct mustafar__cuda_api {
    void *cudart_library, *nvrtc_library;  /* NULL when linked */
    mustafar__cudart_api rt;
    mustafar__nvrtc_api nvrtc;
} mustafar__cuda_api;

/* Appends to the text in buf (truncating at cap). */
static void mustafar__append_text(char *buf, size_t cap, const char *fmt, ...)
{
    size_t n = strlen(buf);
    va_list ap;
    if (n + 1 >= cap) return;
    va_start(ap, fmt);
    MUSTAFAR__VSNPRINTF(buf + n, cap - n, fmt, ap);
    va_end(ap);
}

#ifdef MUSTAFAR_CUDA_LINKED
static int mustafar__cuda_api_load(mustafar__cuda_api *api, const char *search_path, char *why,
                                   size_t why_cap)
{
#  define MUSTAFAR__LINK_RT(name, ret, params) api->rt.name = cuda##name;
#  define MUSTAFAR__LINK_NVRTC(name, ret, params) api->nvrtc.name = nvrtc##name;
    MUSTAFAR__UNUSED(search_path);
    MUSTAFAR__UNUSED(why_cap);
    why[0] = 0;
    api->cudart_library = api->nvrtc_library = NULL;
    MUSTAFAR__CUDART_FUNCTIONS(MUSTAFAR__LINK_RT)
    MUSTAFAR__NVRTC_FUNCTIONS(MUSTAFAR__LINK_NVRTC)
#  undef MUSTAFAR__LINK_RT
#  undef MUSTAFAR__LINK_NVRTC
    return 1;
}
static void mustafar__cuda_api_unload(mustafar__cuda_api *api) { MUSTAFAR__UNUSED(api); }
#else

#ifdef _WIN32
#  define MUSTAFAR__PATH_SEPARATOR ';'
#  define MUSTAFAR__DIR_SEPARATOR "\\"   /* LoadLibrary's documentation asks for backslashes */
static void *mustafar__library_open(const char *path, char *error, size_t cap)
{
    wchar_t w[MUSTAFAR__WPATH];
    HMODULE library = mustafar__wpath(path, w) ? LoadLibraryW(w) : LoadLibraryA(path);
    if (!library)
        mustafar__snprintf(error, cap, "%s: LoadLibrary error %lu", path, (unsigned long)GetLastError());
    return (void *)library;
}
static void *mustafar__library_symbol(void *library, const char *name)
{
    FARPROC f = GetProcAddress((HMODULE)library, name);
    void *p;
    memcpy(&p, &f, sizeof p);              /* as POSIX dlsym returns it */
    return p;
}
static void mustafar__library_close(void *library) { FreeLibrary((HMODULE)library); }
#else
#  define MUSTAFAR__PATH_SEPARATOR ':'
#  define MUSTAFAR__DIR_SEPARATOR "/"
static void *mustafar__library_open(const char *path, char *error, size_t cap)
{
    void *library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    const char *e;
    if (!library) mustafar__snprintf(error, cap, "%s", (e = dlerror()) != NULL ? e : "dlopen failed");
    return library;
}
static void *mustafar__library_symbol(void *library, const char *name) { return dlsym(library, name); }
static void mustafar__library_close(void *library) { dlclose(library); }
#endif

/* Library names tried for each part, newest CUDA first; each is tried in the
   directories of the search path, then by name alone (the system's search:
   LD_LIBRARY_PATH, the executable's RPATH, ldconfig; on Windows the
   application's folder, the system folders and PATH). */
#ifdef _WIN32
static const char *const mustafar__cudart_names[] = {"cudart64_13.dll", "cudart64_12.dll", 0};
static const char *const mustafar__nvrtc_names[] = {"nvrtc64_130_0.dll", "nvrtc64_120_0.dll", 0};
#elif defined(__APPLE__)
static const char *const mustafar__cudart_names[] = {0};
static const char *const mustafar__nvrtc_names[] = {0};
#else
static const char *const mustafar__cudart_names[] = {"libcudart.so.13", "libcudart.so.12", 0};
static const char *const mustafar__nvrtc_names[] = {"libnvrtc.so.13", "libnvrtc.so.12", 0};
#endif

/* Opens the first candidate that has every symbol of `names` and fills
   `table`; else appends what was tried, and why each failed, to `why`. */
static void *mustafar__library_load(const char *const *candidates, const char *search_path,
                                    const char *const *symbols, void **table, int nsymbols,
                                    char *why, size_t why_cap)
{
    int c, pass;
    for (pass = 0; pass < 2; pass++) {
        for (c = 0; candidates[c]; c++) {
            const char *dir = pass == 0 ? search_path : "";
            if (pass == 0 && (!search_path || !search_path[0])) break;
            while (dir) {           /* pass 0: each directory of the path; pass 1: the bare name */
                char path[1100];
                const char *end = pass == 0 ? strchr(dir, MUSTAFAR__PATH_SEPARATOR) : NULL;
                size_t len = end ? (size_t)(end - dir) : strlen(dir);
                char error[300];
                void *library;
                int s;
                if (len >= 1000) len = 0;
                if (len)
                    mustafar__snprintf(path, sizeof path, "%.*s" MUSTAFAR__DIR_SEPARATOR "%s", (int)len, dir,
                                       candidates[c]);
                else mustafar__snprintf(path, sizeof path, "%s", candidates[c]);
                dir = end ? end + 1 : NULL;
                if (pass == 0 && !len) continue;
                library = mustafar__library_open(path, error, sizeof error);
                if (!library) {
                    mustafar__append_text(why, why_cap, "[%s] ", error);
                    continue;
                }
                for (s = 0; s < nsymbols; s++)
                    if (!(table[s] = mustafar__library_symbol(library, symbols[s]))) break;
                if (s == nsymbols) return library;
                mustafar__append_text(why, why_cap, "[%s: has no %s] ", path, symbols[s]);
                mustafar__library_close(library);
            }
        }
    }
    return NULL;
}

/* Loads both libraries; 0 (and the attempts in `why`) if either is missing. */
static int mustafar__cuda_api_load(mustafar__cuda_api *api, const char *search_path, char *why,
                                   size_t why_cap)
{
#  define MUSTAFAR__NAME_RT(name, ret, params) "cuda" #name,
#  define MUSTAFAR__NAME_NVRTC(name, ret, params) "nvrtc" #name,
    static const char *const rt_symbols[] = {MUSTAFAR__CUDART_FUNCTIONS(MUSTAFAR__NAME_RT) 0};
    static const char *const nvrtc_symbols[] = {MUSTAFAR__NVRTC_FUNCTIONS(MUSTAFAR__NAME_NVRTC) 0};
#  undef MUSTAFAR__NAME_RT
#  undef MUSTAFAR__NAME_NVRTC
    /* the tables are arrays of function pointers, filled through void * as
       POSIX dlsym and GetProcAddress return them */
    void *rt[sizeof api->rt / sizeof(void (*)(void))];
    void *nvrtc[sizeof api->nvrtc / sizeof(void (*)(void))];
    memset(api, 0, sizeof *api);
    why[0] = 0;
    api->cudart_library = mustafar__library_load(mustafar__cudart_names, search_path, rt_symbols, rt,
                                                 (int)(sizeof rt / sizeof rt[0]), why, why_cap);
    if (!api->cudart_library) {
        mustafar__append_text(why, why_cap, "(no usable CUDA runtime)");
        return 0;
    }
    api->nvrtc_library = mustafar__library_load(mustafar__nvrtc_names, search_path, nvrtc_symbols,
                                                nvrtc, (int)(sizeof nvrtc / sizeof nvrtc[0]), why,
                                                why_cap);
    if (!api->nvrtc_library) {
        mustafar__append_text(why, why_cap, "(no usable NVRTC)");
        mustafar__library_close(api->cudart_library);
        api->cudart_library = NULL;
        return 0;
    }
    memcpy(&api->rt, rt, sizeof api->rt);
    memcpy(&api->nvrtc, nvrtc, sizeof api->nvrtc);
    return 1;
}

static void mustafar__cuda_api_unload(mustafar__cuda_api *api)
{
    if (api->nvrtc_library) mustafar__library_close(api->nvrtc_library);
    if (api->cudart_library) mustafar__library_close(api->cudart_library);
    api->nvrtc_library = api->cudart_library = NULL;
}
#endif /* MUSTAFAR_CUDA_LINKED */

/* The source of mustafar_kernels.cuh, embedded at the end of this file
   (>>kernel_source): NULL-terminated pieces. */
static const char *const *mustafar__kernel_source(void);

/* One library per kernel configuration (head_dim, dtype, kept counts, GQA
   group, page size, warps, arch), compiled by NVRTC to a real cubin, cached on
   disk under a key that hashes the source, the options, the arch and the NVRTC
   version, and loaded with cudaLibraryLoadData. */
typedef struct mustafar__module {
    struct mustafar__module *next;
    int config[6];                 /* d, dtype, k_kept, v_kept, group, page_size */
    char options[512];             /* the -D list (mustafar__kernel_options) */
    mustafar__cudaLibrary library;
    mustafar__cudaKernel records, append, attention, combine;
    mustafar__cudaLibrary wide_library;    /* the wide append kernel alone, built on first use */
    mustafar__cudaKernel append_wide;
    int warps, stages;             /* of the attention kernel */
    int blocks_per_sm;             /* attention blocks that fit an SM */
    size_t attention_smem;
} mustafar__module;

typedef struct mustafar__cuda {
    mustafar__cuda_api api;        /* the runtime and NVRTC functions */
    int device, sm, num_sms;
    int wide_params;               /* driver and NVRTC take kernel parameters over 4 KB (12.1+) */
    mustafar__cudaStream stream;
    char cache_dir[1024];          /* empty: disk cache disabled */
    mustafar__module *modules;     /* compiled kernel libraries, one per config */
    void *scratch;                 /* device scratch (jobs, partial results) */
    size_t scratch_bytes;
    void *staging;                 /* pinned host staging for uploads */
    size_t staging_bytes;
    mustafar__cudaEvent staging_free;      /* recorded after the last upload from staging */
    mustafar__append_inline append_params;
    mustafar__append_wide append_wide_params;
    mustafar__seqs_inline seq_params;
} mustafar__cuda;

#define MUSTAFAR__CUDA_CHECK(ctx, call)                                                     \
    do {                                                                                    \
        mustafar__cudaError mustafar__e = (call);                                                   \
        if (mustafar__e != MUSTAFAR__cudaSuccess)                                                     \
            return mustafar__fail((ctx), MUSTAFAR_ERROR_CUDA, "%s failed: %s (%s)", #call,  \
                                  mustafar__rt(ctx)->GetErrorName(mustafar__e),                            \
                                  mustafar__rt(ctx)->GetErrorString(mustafar__e));                         \
    } while (0)

static const mustafar__cudart_api *mustafar__rt(const mustafar_context *ctx)
{
    return &ctx->cuda->api.rt;
}
static const mustafar__nvrtc_api *mustafar__nvrtc(const mustafar_context *ctx)
{
    return &ctx->cuda->api.nvrtc;
}

/* The caller's current device is theirs: the dispatch functions run every
   CUDA call of the library between these two, which switch to the
   context's device and back. */
static int mustafar__device_enter(mustafar_context *ctx, int device)
{
    int previous = -1;
    if (mustafar__rt(ctx)->GetDevice(&previous) != MUSTAFAR__cudaSuccess) previous = -1;
    if (previous != device) mustafar__rt(ctx)->SetDevice(device);
    return previous;
}
static void mustafar__device_leave(mustafar_context *ctx, int previous, int device)
{
    if (previous >= 0 && previous != device) mustafar__rt(ctx)->SetDevice(previous);
}

/* ---- JIT compilation, disk cache, module table ------------------------------ */

/* Token vectors per 256-thread block of the record and append kernels:
   head_dim / 32 lanes each. */
#define MUSTAFAR__BLOCK_VECTORS(head_dim) (8192 / (size_t)(head_dim))

/* Staged records are spaced so that the 16 rows of a tile start in 8
   different bank groups (stride / 16 odd): decode loads conflict at most
   2-way instead of 4-way for a 96-byte record. */
static size_t mustafar__staged_bytes(size_t record) { return record / 16 % 2 ? record : record + 16; }

/* Shared memory of the attention kernel, and where its 16 zero bytes (which
   pruned V channels read) start: per warp `stages` stages of 16 K and 16 V
   staged records, reused for the merge (32 floats and rows x d floats per
   warp), then 2*d bytes of slack that a corrupt record's decode may read. */
static size_t mustafar__attention_smem(int d, int group, size_t k_rec, size_t v_rec, int warps,
                                       int stages, size_t *zero_offset)
{
    size_t rows = group < 16 ? (size_t)group : 16;
    size_t loop = (size_t)warps * stages * 16 *
                  (mustafar__staged_bytes(k_rec) + mustafar__staged_bytes(v_rec));
    size_t merge = (size_t)warps * 32 * 4 + (size_t)warps * rows * d * 4;
    size_t zero = (loop > merge ? loop : merge) + 2 * (size_t)d;
    if (zero_offset) *zero_offset = zero;
    return zero + 16;
}

/* The -D options of a kernel library: every size the kernels share with the
   host comes from here (the structures from the CONTRACT block). */
static void mustafar__kernel_options(char *buf, size_t cap, int sm, int d, mustafar_dtype dtype,
                                     int k_kept, int v_kept, int group, int page_size, int warps,
                                     int stages, int append_wide)
{
    size_t k_rec = mustafar__record_size(d, k_kept), v_rec = mustafar__record_size(d, v_kept);
    size_t zero;
    mustafar__attention_smem(d, group, k_rec, v_rec, warps, stages, &zero);
    mustafar__snprintf(buf, cap,
             "-DMUSTAFAR_SM=%d -DMUSTAFAR_D=%d -DMUSTAFAR_BF16=%d -DMUSTAFAR_K_KEPT=%d "
             "-DMUSTAFAR_V_KEPT=%d -DMUSTAFAR_K_RECORD=%zu -DMUSTAFAR_V_RECORD=%zu "
             "-DMUSTAFAR_DENSE_RECORD=%zu -DMUSTAFAR_K_STAGED=%zu -DMUSTAFAR_V_STAGED=%zu "
             "-DMUSTAFAR_SMEM_ZERO=%zu -DMUSTAFAR_BLOCK_VECTORS=%zu -DMUSTAFAR_GROUP=%d "
             "-DMUSTAFAR_PAGE_SIZE=%d -DMUSTAFAR_WARPS=%d -DMUSTAFAR_STAGES=%d%s",
             sm, d, dtype == MUSTAFAR_DTYPE_BF16, k_kept, v_kept, k_rec, v_rec,
             mustafar__record_size(d, d), mustafar__staged_bytes(k_rec),
             mustafar__staged_bytes(v_rec), zero, MUSTAFAR__BLOCK_VECTORS(d), group, page_size,
             warps, stages, append_wide ? " -DMUSTAFAR_APPEND_WIDE=1" : "");
}

static char *mustafar__kernel_text(void)
{
    size_t n = 0, i;
    char *text;
    const char *const *source = mustafar__kernel_source();
    for (i = 0; source[i]; i++) n += strlen(source[i]);
    text = (char *)MUSTAFAR_MALLOC(n + 1);
    if (!text) return NULL;
    n = 0;
    for (i = 0; source[i]; i++) {
        size_t m = strlen(source[i]);
        memcpy(text + n, source[i], m);
        n += m;
    }
    text[n] = 0;
    return text;
}

/* The environment variable `name` as a UTF-8 path into buf; 0 if unset or empty. */
static int mustafar__getenv_path(const char *name, char *buf, size_t cap)
{
#ifdef _WIN32
    wchar_t wname[64], *w;
    if (MultiByteToWideChar(CP_UTF8, 0, name, -1, wname, 64) > 0 && (w = _wgetenv(wname)) && w[0])
        return WideCharToMultiByte(CP_UTF8, 0, w, -1, buf, (int)cap, NULL, NULL) > 0;
    buf[0] = 0;
    return 0;
#else
    const char *v = getenv(name);
    if (!v || !v[0] || strlen(v) >= cap) { buf[0] = 0; return 0; }
    memcpy(buf, v, strlen(v) + 1);
    return 1;
#endif
}

static void mustafar__resolve_cache_dir(mustafar__cuda *cu, const mustafar_context_desc *desc)
{
    char base[sizeof cu->cache_dir];
    cu->cache_dir[0] = 0;
    if (desc->disable_jit_cache) return;
    if (desc->jit_cache_dir) {
        mustafar__snprintf(cu->cache_dir, sizeof cu->cache_dir, "%s", desc->jit_cache_dir);
        return;
    }
    if (getenv("MUSTAFAR_CACHE_DIR")) {
        if (mustafar__getenv_path("MUSTAFAR_CACHE_DIR", base, sizeof base) && strcmp(base, "off"))
            mustafar__snprintf(cu->cache_dir, sizeof cu->cache_dir, "%s", base);
        return;
    }
#if defined(_WIN32)
    if (mustafar__getenv_path("LOCALAPPDATA", base, sizeof base))
        mustafar__snprintf(cu->cache_dir, sizeof cu->cache_dir, "%s\\mustafar", base);
#elif defined(__APPLE__)
    if (mustafar__getenv_path("HOME", base, sizeof base))
        mustafar__snprintf(cu->cache_dir, sizeof cu->cache_dir, "%s/Library/Caches/mustafar", base);
#else
    if (mustafar__getenv_path("XDG_CACHE_HOME", base, sizeof base))
        mustafar__snprintf(cu->cache_dir, sizeof cu->cache_dir, "%s/mustafar", base);
    else if (mustafar__getenv_path("HOME", base, sizeof base))
        mustafar__snprintf(cu->cache_dir, sizeof cu->cache_dir, "%s/.cache/mustafar", base);
#endif
}

static void mustafar__mkdirs(const char *path)
{
    char buf[1024];
    size_t i, n = strlen(path);
    if (n >= sizeof buf) return;
    memcpy(buf, path, n + 1);
    for (i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == '\\' || buf[i] == 0) {
            char c = buf[i];
            buf[i] = 0;
#ifdef _WIN32
            wchar_t w[MUSTAFAR__WPATH];
            if (mustafar__wpath(buf, w)) _wmkdir(w);
            else _mkdir(buf);
#else
            mkdir(buf, 0755);
#endif
            buf[i] = c;
        }
    }
}

/* Disk cache entry: "MUSTAFAR" | u64 payload bytes | u64 FNV-1a of payload | cubin.
   Returns the cubin (caller frees) or NULL if absent, truncated or corrupt. */
static void *mustafar__disk_read(const char *path, size_t *size)
{
    unsigned char head[24];
    uint64_t n, h;
    void *data;
    FILE *f = mustafar__fopen(path, "rb");
    if (!f) return NULL;
    if (fread(head, 1, 24, f) != 24 || memcmp(head, "MUSTAFAR", 8)) { fclose(f); return NULL; }
    memcpy(&n, head + 8, 8);
    memcpy(&h, head + 16, 8);
    if (n == 0 || n > ((uint64_t)1 << 30) || !(data = MUSTAFAR_MALLOC((size_t)n))) {
        fclose(f);
        return NULL;
    }
    if (fread(data, 1, (size_t)n, f) != n || fgetc(f) != EOF ||
        mustafar__fnv1a(1469598103934665603ull, data, (size_t)n) != h) {
        fclose(f);
        MUSTAFAR_FREE(data);
        return NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return data;
}

/* Written to a temporary name and renamed, so readers never see half a file. */
static void mustafar__disk_write(const char *dir, const char *path, const void *data, size_t n)
{
    char tmp[1232];
    unsigned char head[24];
    uint64_t size = n, h = mustafar__fnv1a(1469598103934665603ull, data, n);
    FILE *f;
    int ok;
    mustafar__mkdirs(dir);
    mustafar__snprintf(tmp, sizeof tmp, "%s.%08lx.tmp",
             path, (unsigned long)((uintptr_t)&f ^ (uintptr_t)time(NULL) ^ (uintptr_t)clock()));
    if (!(f = mustafar__fopen(tmp, "wb"))) return;
    memcpy(head, "MUSTAFAR", 8);
    memcpy(head + 8, &size, 8);
    memcpy(head + 16, &h, 8);
    ok = fwrite(head, 1, 24, f) == 24 && fwrite(data, 1, n, f) == n;
    ok = (fclose(f) == 0) && ok;
    if (!ok || !mustafar__replace_file(tmp, path)) mustafar__remove(tmp);
}

/* NVRTC optimises the library's four kernels on up to four threads: the
   cold compile on the H100 host (16 cores) fell from 1.80-2.03 s to
   1.37-1.65 s.  The code differs from a one-thread compile only in a few
   register and predicate choices (partial-tile and window checks, the
   combine kernel), not in the full-tile decode. */
#define MUSTAFAR__SPLIT_COMPILE "-split-compile=4"

static mustafar_status mustafar__nvrtc_compile(mustafar_context *ctx, const char *source,
                                               const char *const *options, int noptions,
                                               void **cubin, size_t *size)
{
    mustafar__nvrtcProgram prog;
    mustafar__nvrtcResult r;
    for (;;) {
        if ((r = mustafar__nvrtc(ctx)->CreateProgram(&prog, source, "mustafar_kernels.cu", 0, NULL, NULL)) != MUSTAFAR__NVRTC_SUCCESS)
            return mustafar__fail(ctx, MUSTAFAR_ERROR_JIT, "nvrtcCreateProgram failed: %s",
                                  mustafar__nvrtc(ctx)->GetErrorString(r));
        r = mustafar__nvrtc(ctx)->CompileProgram(prog, noptions, options);
        /* an NVRTC without parallel optimisation (option first): the same compile on one thread */
        if (r != MUSTAFAR__NVRTC_ERROR_INVALID_OPTION || noptions == 0 || strncmp(options[0], "-split-compile", 14))
            break;
        mustafar__nvrtc(ctx)->DestroyProgram(&prog);
        options++;
        noptions--;
    }
    if (r != MUSTAFAR__NVRTC_SUCCESS) {
        size_t log_size = 0;
        char *log = NULL;
        mustafar__nvrtc(ctx)->GetProgramLogSize(prog, &log_size);
        if (log_size && (log = (char *)MUSTAFAR_MALLOC(log_size + 1)) != NULL) {
            mustafar__nvrtc(ctx)->GetProgramLog(prog, log);
            log[log_size] = 0;
        }
        mustafar__fail(ctx, MUSTAFAR_ERROR_JIT, "NVRTC compile failed (%s): %s",
                       mustafar__nvrtc(ctx)->GetErrorString(r), log ? log : "(no log)");
        MUSTAFAR_FREE(log);
        mustafar__nvrtc(ctx)->DestroyProgram(&prog);
        return MUSTAFAR_ERROR_JIT;
    }
    if ((r = mustafar__nvrtc(ctx)->GetCUBINSize(prog, size)) != MUSTAFAR__NVRTC_SUCCESS || !*size ||
        !(*cubin = MUSTAFAR_MALLOC(*size)) || (r = mustafar__nvrtc(ctx)->GetCUBIN(prog, (char *)*cubin)) != MUSTAFAR__NVRTC_SUCCESS) {
        mustafar__nvrtc(ctx)->DestroyProgram(&prog);
        MUSTAFAR_FREE(*cubin);
        *cubin = NULL;
        return mustafar__fail(ctx, MUSTAFAR_ERROR_JIT, "NVRTC produced no cubin: %s",
                              mustafar__nvrtc(ctx)->GetErrorString(r));
    }
    mustafar__nvrtc(ctx)->DestroyProgram(&prog);
    return MUSTAFAR_OK;
}

/* Compiles the kernel source `text` for sm_`sm` with the -D list `options`
   (space-separated) to a cubin, as the library always compiles it. */
static mustafar_status mustafar__compile_cubin(mustafar_context *ctx, const char *text, int sm,
                                               const char *options, void **cubin, size_t *size)
{
    char opts[512], arch[32], *tok;
    const char *argv[32];
    int argc = 0;
    mustafar__snprintf(arch, sizeof arch, "--gpu-architecture=sm_%d", sm);
    mustafar__snprintf(opts, sizeof opts, "%s", options);
    argv[argc++] = MUSTAFAR__SPLIT_COMPILE;
    argv[argc++] = arch;
    argv[argc++] = "-lineinfo";
    for (tok = opts; *tok && argc < 32;) {   /* split at spaces, in place */
        argv[argc++] = tok;
        while (*tok && *tok != ' ') tok++;
        if (*tok) *tok++ = 0;
    }
    return mustafar__nvrtc_compile(ctx, text, argv, argc, cubin, size);
}

/* A kernel library for the -D list `options`: from the disk cache when the
   entry there loads, else compiled by NVRTC (and written to the cache). */
static mustafar_status mustafar__build_library(mustafar_context *ctx, const char *options,
                                               mustafar__cudaLibrary *library)
{
    mustafar__cuda *cu = ctx->cuda;
    char path[1200];
    int nvrtc_major = 0, nvrtc_minor = 0;
    size_t size = 0;
    void *cubin = NULL;
    char *text = mustafar__kernel_text();
    uint64_t key;
    mustafar_status st;
    mustafar__cudaError e;
    if (!text) return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    mustafar__nvrtc(ctx)->Version(&nvrtc_major, &nvrtc_minor);
    key = mustafar__fnv1a(1469598103934665603ull, text, strlen(text));
    key = mustafar__fnv1a(key, options, strlen(options));
    key = mustafar__fnv1a(key, &cu->sm, sizeof cu->sm);
    key = mustafar__fnv1a(key, &nvrtc_major, sizeof nvrtc_major);
    key = mustafar__fnv1a(key, &nvrtc_minor, sizeof nvrtc_minor);
    path[0] = 0;
    if (cu->cache_dir[0]) {
        mustafar__snprintf(path, sizeof path, "%s/mustafar-%016llx.cubin", cu->cache_dir,
                 (unsigned long long)key);
        cubin = mustafar__disk_read(path, &size);
        if (cubin && mustafar__rt(ctx)->LibraryLoadData(library, cubin, NULL, NULL, 0, NULL, NULL, 0) == MUSTAFAR__cudaSuccess) {
            MUSTAFAR_FREE(cubin);
            MUSTAFAR_FREE(text);
            return MUSTAFAR_OK;
        }
        MUSTAFAR_FREE(cubin);              /* none, or unloadable: compile again */
        cubin = NULL;
    }
    st = mustafar__compile_cubin(ctx, text, cu->sm, options, &cubin, &size);
    MUSTAFAR_FREE(text);
    if (st) return st;
    e = mustafar__rt(ctx)->LibraryLoadData(library, cubin, NULL, NULL, 0, NULL, NULL, 0);
    if (e != MUSTAFAR__cudaSuccess) {
        MUSTAFAR_FREE(cubin);
        return mustafar__fail(ctx, MUSTAFAR_ERROR_JIT, "cudaLibraryLoadData failed: %s (%s)",
                              mustafar__rt(ctx)->GetErrorName(e), mustafar__rt(ctx)->GetErrorString(e));
    }
    if (path[0]) mustafar__disk_write(cu->cache_dir, path, cubin, size);
    MUSTAFAR_FREE(cubin);
    return MUSTAFAR_OK;
}

static mustafar_status mustafar__missing_kernel(mustafar_context *ctx, mustafar__cudaLibrary *library,
                                                mustafar__cudaError e)
{
    mustafar__rt(ctx)->LibraryUnload(*library);
    *library = NULL;
    return mustafar__fail(ctx, MUSTAFAR_ERROR_JIT, "a kernel is missing from the library: %s",
                          mustafar__rt(ctx)->GetErrorName(e));
}

/* The wide append kernel (job and patch lists of large appends in a 30 KB
   parameter block) has its own library, built on the first append that
   needs it: decode-only use never compiles it, and context creation does
   not wait for it. */
static mustafar_status mustafar__append_wide_kernel(mustafar_context *ctx, mustafar__module *m)
{
    char options[sizeof m->options];
    mustafar_status st;
    mustafar__cudaError e;
    if (m->append_wide) return MUSTAFAR_OK;
    mustafar__kernel_options(options, sizeof options, ctx->cuda->sm, m->config[0],
                             (mustafar_dtype)m->config[1], m->config[2], m->config[3], m->config[4],
                             m->config[5], m->warps, m->stages, 1);
    st = mustafar__build_library(ctx, options, &m->wide_library);
    if (st) return st;
    e = mustafar__rt(ctx)->LibraryGetKernel(&m->append_wide, m->wide_library, "mustafar_append_wide");
    if (e != MUSTAFAR__cudaSuccess) {
        m->append_wide = NULL;
        return mustafar__missing_kernel(ctx, &m->wide_library, e);
    }
    return MUSTAFAR_OK;
}

/* The compiled library for a configuration, compiled or read from disk once. */
static mustafar_status mustafar__get_module(mustafar_context *ctx, int d, mustafar_dtype dtype,
                                            int k_kept, int v_kept, int group, int page_size,
                                            mustafar__module **out)
{
    mustafar__cuda *cu = ctx->cuda;
    mustafar__module *m;
    int optin = 0, warps = 4, stages = 3;
    size_t k_rec = mustafar__record_size(d, k_kept), v_rec = mustafar__record_size(d, v_kept);
    size_t smem;
    mustafar_status st;
    mustafar__cudaError e;
    const int config[6] = {d, (int)dtype, k_kept, v_kept, group, page_size};
    for (m = cu->modules; m; m = m->next)
        if (!memcmp(m->config, config, sizeof config)) { *out = m; return MUSTAFAR_OK; }
    mustafar__rt(ctx)->DeviceGetAttribute(&optin, MUSTAFAR__cudaDevAttrMaxSharedMemoryPerBlockOptin, cu->device);
    /* three stages (two tiles in flight) where three blocks still fit an SM */
    if (mustafar__attention_smem(d, group, k_rec, v_rec, warps, 3, NULL) > 76 * 1024) stages = 2;
    while (warps > 1 &&
           mustafar__attention_smem(d, group, k_rec, v_rec, warps, stages, NULL) > (size_t)optin)
        warps /= 2;
    smem = mustafar__attention_smem(d, group, k_rec, v_rec, warps, stages, NULL);
    m = (mustafar__module *)mustafar__calloc(sizeof *m);
    if (!m) return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    mustafar__kernel_options(m->options, sizeof m->options, cu->sm, d, dtype, k_kept, v_kept, group,
                             page_size, warps, stages, 0);
    memcpy(m->config, config, sizeof config);
    m->warps = warps;
    m->stages = stages;
    m->attention_smem = smem;
    st = mustafar__build_library(ctx, m->options, &m->library);
    if (st) {
        MUSTAFAR_FREE(m);
        return st;
    }
    if ((e = mustafar__rt(ctx)->LibraryGetKernel(&m->records, m->library, "mustafar_records")) != MUSTAFAR__cudaSuccess ||
        (e = mustafar__rt(ctx)->LibraryGetKernel(&m->append, m->library, "mustafar_append")) != MUSTAFAR__cudaSuccess ||
        (e = mustafar__rt(ctx)->LibraryGetKernel(&m->attention, m->library, "mustafar_attention")) != MUSTAFAR__cudaSuccess ||
        (e = mustafar__rt(ctx)->LibraryGetKernel(&m->combine, m->library, "mustafar_combine")) != MUSTAFAR__cudaSuccess) {
        st = mustafar__missing_kernel(ctx, &m->library, e);
        MUSTAFAR_FREE(m);
        return st;
    }
    if (smem > 48 * 1024) {
        mustafar__cudaError e = mustafar__rt(ctx)->FuncSetAttribute((const void *)m->attention,
                                             MUSTAFAR__cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != MUSTAFAR__cudaSuccess) {
            mustafar__rt(ctx)->LibraryUnload(m->library);
            MUSTAFAR_FREE(m);
            return mustafar__fail(ctx, MUSTAFAR_ERROR_CUDA,
                                  "cudaFuncSetAttribute(%zu bytes of shared memory) failed: %s",
                                  smem, mustafar__rt(ctx)->GetErrorName(e));
        }
    }
    if (mustafar__rt(ctx)->OccupancyMaxActiveBlocksPerMultiprocessor(&m->blocks_per_sm, (const void *)m->attention,
                                                      32 * warps, smem) != MUSTAFAR__cudaSuccess ||
        m->blocks_per_sm < 1)
        m->blocks_per_sm = 1;
    m->next = cu->modules;
    cu->modules = m;
    *out = m;
    return MUSTAFAR_OK;
}
/* ---- device state, memory, uploads, launches ------------------------------------ */

static mustafar_status mustafar__cuda_init(mustafar_context *ctx, const mustafar_context_desc *desc)
{
    mustafar__cuda *cu = ctx->cuda;
    int count = 0, driver = 0, major = 0, minor = 0, narch = 0, i, best = 0;
    int archs[64];
    mustafar__cudaError e = mustafar__rt(ctx)->GetDeviceCount(&count);
    if (e != MUSTAFAR__cudaSuccess || count == 0) {
        /* the runtime reports a missing driver as one too old: say which */
        mustafar__rt(ctx)->DriverGetVersion(&driver);
        return mustafar__fail(ctx, MUSTAFAR_ERROR_BACKEND_UNAVAILABLE, "no CUDA device: %s%s",
                              e != MUSTAFAR__cudaSuccess ? mustafar__rt(ctx)->GetErrorString(e) : "none found",
                              e != MUSTAFAR__cudaSuccess && driver == 0 ? " (no NVIDIA driver is installed)" : "");
    }
    if (desc->cuda_device < 0 || desc->cuda_device >= count)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_BACKEND_UNAVAILABLE,
                              "CUDA device %d does not exist (%d found)", desc->cuda_device, count);
    mustafar__rt(ctx)->DriverGetVersion(&driver);
    if (driver < 12000)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_BACKEND_UNAVAILABLE,
                              "the CUDA driver supports CUDA %d.%d; 12.0 or newer is needed",
                              driver / 1000, driver % 1000 / 10);
    cu->device = desc->cuda_device;
    mustafar__rt(ctx)->DeviceGetAttribute(&major, MUSTAFAR__cudaDevAttrComputeCapabilityMajor, cu->device);
    mustafar__rt(ctx)->DeviceGetAttribute(&minor, MUSTAFAR__cudaDevAttrComputeCapabilityMinor, cu->device);
    mustafar__rt(ctx)->DeviceGetAttribute(&cu->num_sms, MUSTAFAR__cudaDevAttrMultiProcessorCount, cu->device);
    if (major * 10 + minor < 75)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_BACKEND_UNAVAILABLE,
                              "GPU sm_%d%d is older than sm_75", major, minor);
    /* a cubin runs on its own major version at an equal or higher minor */
    if (mustafar__nvrtc(ctx)->GetNumSupportedArchs(&narch) == MUSTAFAR__NVRTC_SUCCESS && narch > 0 && narch <= 64 &&
        mustafar__nvrtc(ctx)->GetSupportedArchs(archs) == MUSTAFAR__NVRTC_SUCCESS)
        for (i = 0; i < narch; i++)
            if (archs[i] / 10 == major && archs[i] <= major * 10 + minor && archs[i] > best)
                best = archs[i];
    if (!best)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_BACKEND_UNAVAILABLE,
                              "this NVRTC cannot compile for sm_%d%d", major, minor);
    cu->sm = best;
    {
        int nvrtc_major = 0, nvrtc_minor = 0;
        mustafar__nvrtc(ctx)->Version(&nvrtc_major, &nvrtc_minor);
        cu->wide_params = driver >= 12010 && nvrtc_major * 100 + nvrtc_minor >= 1201;
    }
    cu->stream = (mustafar__cudaStream)desc->cuda_stream;
    mustafar__resolve_cache_dir(cu, desc);
    MUSTAFAR__CUDA_CHECK(ctx, mustafar__rt(ctx)->EventCreateWithFlags(&cu->staging_free, MUSTAFAR__cudaEventDisableTiming));
    e = mustafar__rt(ctx)->EventRecord(cu->staging_free, cu->stream);
    if (e != MUSTAFAR__cudaSuccess) {
        mustafar__rt(ctx)->EventDestroy(cu->staging_free);
        return mustafar__fail(ctx, MUSTAFAR_ERROR_BACKEND_UNAVAILABLE,
                              "the CUDA stream is not usable: %s", mustafar__rt(ctx)->GetErrorName(e));
    }
    mustafar__snprintf(ctx->message, sizeof ctx->message, "CUDA backend on device %d (sm_%d%d, kernels for sm_%d)",
             cu->device, major, minor, best);
    return MUSTAFAR_OK;
}

static void mustafar__cuda_shutdown(mustafar_context *ctx)
{
    mustafar__cuda *cu = ctx->cuda;
    mustafar__module *m = cu->modules;
    mustafar__rt(ctx)->StreamSynchronize(cu->stream);
    while (m) {
        mustafar__module *next = m->next;
        mustafar__rt(ctx)->LibraryUnload(m->library);
        if (m->wide_library) mustafar__rt(ctx)->LibraryUnload(m->wide_library);
        MUSTAFAR_FREE(m);
        m = next;
    }
    if (cu->scratch) mustafar__rt(ctx)->Free(cu->scratch);
    if (cu->staging) mustafar__rt(ctx)->FreeHost(cu->staging);
    mustafar__rt(ctx)->EventDestroy(cu->staging_free);
}

static mustafar_status mustafar__cuda_alloc(mustafar_context *ctx, void **p, size_t bytes)
{
    mustafar__cudaError e;
    *p = NULL;
    e = mustafar__rt(ctx)->Malloc(p, bytes ? bytes : 16);
    if (e != MUSTAFAR__cudaSuccess) {
        size_t free_bytes = 0, total_bytes = 0;
        *p = NULL;
        mustafar__rt(ctx)->GetLastError(); /* clear the error so later calls do not report it */
        if (mustafar__rt(ctx)->MemGetInfo(&free_bytes, &total_bytes) != MUSTAFAR__cudaSuccess)
            free_bytes = total_bytes = 0;
        return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY,
                              "cudaMalloc of %zu bytes failed: %s (%zu of %zu bytes of the device free)",
                              bytes, mustafar__rt(ctx)->GetErrorName(e), free_bytes, total_bytes);
    }
    MUSTAFAR__CUDA_CHECK(ctx, mustafar__rt(ctx)->MemsetAsync(*p, 0, bytes ? bytes : 16, ctx->cuda->stream));
    return MUSTAFAR_OK;
}

static void mustafar__cuda_free(mustafar_context *ctx, void *p)
{
    MUSTAFAR__UNUSED(ctx);
    mustafar__rt(ctx)->Free(p);
}

/* Device scratch of at least `bytes`; grows (after the stream drains) when needed. */
static mustafar_status mustafar__cuda_scratch(mustafar_context *ctx, size_t bytes, void **out)
{
    mustafar__cuda *cu = ctx->cuda;
    if (bytes > cu->scratch_bytes) {
        size_t grow = bytes > 2 * cu->scratch_bytes ? bytes : 2 * cu->scratch_bytes;
        MUSTAFAR__CUDA_CHECK(ctx, mustafar__rt(ctx)->StreamSynchronize(cu->stream));
        if (cu->scratch) mustafar__rt(ctx)->Free(cu->scratch);
        cu->scratch = NULL;
        cu->scratch_bytes = 0;
        if (mustafar__rt(ctx)->Malloc(&cu->scratch, grow) != MUSTAFAR__cudaSuccess) {
            cu->scratch = NULL;
            mustafar__rt(ctx)->GetLastError();
            return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY,
                                  "cudaMalloc of %zu bytes of scratch failed", grow);
        }
        cu->scratch_bytes = grow;
    }
    *out = cu->scratch;
    return MUSTAFAR_OK;
}

/* Host -> device copy on the stream through pinned staging, so the caller's
   buffer is free on return and the host does not wait for the stream. */
static mustafar_status mustafar__cuda_upload(mustafar_context *ctx, void *dst, const void *src,
                                             size_t bytes)
{
    mustafar__cuda *cu = ctx->cuda;
    MUSTAFAR__CUDA_CHECK(ctx, mustafar__rt(ctx)->EventSynchronize(cu->staging_free));
    if (bytes > cu->staging_bytes) {
        size_t grow = bytes > 2 * cu->staging_bytes ? bytes : 2 * cu->staging_bytes;
        if (cu->staging) mustafar__rt(ctx)->FreeHost(cu->staging);
        cu->staging = NULL;
        cu->staging_bytes = 0;
        if (mustafar__rt(ctx)->MallocHost(&cu->staging, grow) != MUSTAFAR__cudaSuccess) {
            cu->staging = NULL;
            mustafar__rt(ctx)->GetLastError();
            return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY,
                                  "cudaMallocHost of %zu bytes failed", grow);
        }
        cu->staging_bytes = grow;
    }
    memcpy(cu->staging, src, bytes);
    MUSTAFAR__CUDA_CHECK(ctx, mustafar__rt(ctx)->MemcpyAsync(dst, cu->staging, bytes, MUSTAFAR__cudaMemcpyHostToDevice,
                                              cu->stream));
    MUSTAFAR__CUDA_CHECK(ctx, mustafar__rt(ctx)->EventRecord(cu->staging_free, cu->stream));
    return MUSTAFAR_OK;
}

/* Device -> host copy after all work queued on the stream; returns when done. */
static mustafar_status mustafar__cuda_download(mustafar_context *ctx, void *dst, const void *src,
                                               size_t bytes)
{
    MUSTAFAR__CUDA_CHECK(ctx, mustafar__rt(ctx)->MemcpyAsync(dst, src, bytes,
                                                             MUSTAFAR__cudaMemcpyDeviceToHost,
                                                             ctx->cuda->stream));
    MUSTAFAR__CUDA_CHECK(ctx, mustafar__rt(ctx)->StreamSynchronize(ctx->cuda->stream));
    return MUSTAFAR_OK;
}

static mustafar_status mustafar__cuda_synchronize(mustafar_context *ctx)
{
    MUSTAFAR__CUDA_CHECK(ctx, mustafar__rt(ctx)->StreamSynchronize(ctx->cuda->stream));
    return MUSTAFAR_OK;
}

/* `dependent`: the kernel may start before the previous kernel on the stream
   has finished and waits for it itself (programmatic dependent launch,
   sm_90 and newer; elsewhere an ordinary launch). */
static mustafar_status mustafar__launch(mustafar_context *ctx, mustafar__cudaKernel kernel, const char *name,
                                        unsigned gx, unsigned gy, unsigned gz, unsigned block,
                                        size_t smem, void **args, int dependent)
{
    mustafar__cudaLaunchConfig config;
    mustafar__cudaLaunchAttribute attr;
    mustafar__cudaError e;
    config.gridDim.x = gx; config.gridDim.y = gy; config.gridDim.z = gz;
    config.blockDim.x = block; config.blockDim.y = 1; config.blockDim.z = 1;
    config.dynamicSmemBytes = smem;
    config.stream = ctx->cuda->stream;
    config.attrs = NULL;
    config.numAttrs = 0;
    if (dependent && ctx->cuda->sm >= 90) {
        attr.id = MUSTAFAR__cudaLaunchAttributeProgrammaticStreamSerialization;
        attr.val.programmaticStreamSerializationAllowed = 1;
        config.attrs = &attr;
        config.numAttrs = 1;
    }
    e = mustafar__rt(ctx)->LaunchKernelExC(&config, (const void *)kernel, args);
    if (e == MUSTAFAR__cudaSuccess) e = mustafar__rt(ctx)->GetLastError();
    if (e != MUSTAFAR__cudaSuccess)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_CUDA, "launch of %s (grid %u x %u x %u) failed: %s (%s)",
                              name, gx, gy, gz, mustafar__rt(ctx)->GetErrorName(e), mustafar__rt(ctx)->GetErrorString(e));
    return MUSTAFAR_OK;
}
/* ---- operations --------------------------------------------------------------------- */

/* Appends of at least this many (position, KV head) items give each lane
   group both vectors of an item: the item's job, page and ring slot are
   found once (fewer instructions), at the price of a longer group (slower
   for small, latency-bound appends).  Above it the grid still has 512
   (head_dim 64) to 2048 (head_dim 256) blocks of 256 threads. */
#define MUSTAFAR__PAIR_KV_ITEMS 65536

static mustafar_status mustafar__cuda_records(mustafar_context *ctx, int op, int head_dim,
                                              float sparsity, mustafar_dtype dtype, const void *in,
                                              void *out, size_t count)
{
    mustafar__module *m;
    int kept = mustafar_kept_count(head_dim, sparsity), opi = op;
    long long n = (long long)count;
    void *args[4];
    mustafar_status st;
    st = mustafar__get_module(ctx, head_dim, dtype, kept, kept, 1, 16, &m);
    if (st) return st;
    if (count / MUSTAFAR__BLOCK_VECTORS(head_dim) + 1 > 0x7fffffffu)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT, "count %zu too large", count);
    args[0] = &opi; args[1] = &in; args[2] = &out; args[3] = &n;
    return mustafar__launch(ctx, m->records, "mustafar_records",
                            (unsigned)((count + MUSTAFAR__BLOCK_VECTORS(head_dim) - 1) /
                                       MUSTAFAR__BLOCK_VECTORS(head_dim)),
                            1, 1, 256, 0, args, 0);
}

/* Copies an append's job and patch lists into a parameter block (the small
   or the wide one: the same fields, different capacities). */
static void mustafar__inline_lists(int32_t *njobs_out, int32_t *npatches_out,
                                   mustafar__append_job *jobs_out, int32_t *patches_out,
                                   const mustafar__append_job *jobs, int njobs,
                                   const int32_t *patches, int npatches)
{
    *njobs_out = njobs;
    *npatches_out = npatches;
    memcpy(jobs_out, jobs, sizeof *jobs * (size_t)njobs);
    if (npatches) memcpy(patches_out, patches, 8 * (size_t)npatches);
}

static mustafar_status mustafar__cuda_append(mustafar_context *ctx, const mustafar__layout *L,
                                             const mustafar_paged_kv *kv,
                                             const mustafar__append_job *jobs, int njobs,
                                             const int32_t *patches, int npatches,
                                             const void *k, const void *v)
{
    const mustafar__append_job *last = &jobs[njobs - 1];
    int compress_total = last->compress_offset + last->new_compressed - last->old_compressed;
    int window_total = last->window_offset + last->old_length + last->new_tokens -
                       mustafar__job_window_first(last);
    mustafar__append_inline *inl = &ctx->cuda->append_params;
    mustafar__append_wide *wide = &ctx->cuda->append_wide_params;
    mustafar__cudaKernel kernel;
    const char *kernel_name = "mustafar_append";
    int hkv = L->num_kv_heads, stride = kv->page_table_stride, window = L->window;
    /* one lane group per (position, KV head) for large appends (the K and V
       vectors in turn), else per (position, KV head, K or V) */
    long long items = ((long long)compress_total + window_total) * hkv;
    long long per_block = (long long)MUSTAFAR__BLOCK_VECTORS(L->head_dim);
    int pair_kv = items >= MUSTAFAR__PAIR_KV_ITEMS;
    long long blocks = ((items << !pair_kv) + per_block - 1) / per_block;
    const void *dev_jobs = NULL, *dev_patches = NULL;
    mustafar__module *m;
    mustafar_status st;
    void *args[18];
    st = mustafar__get_module(ctx, L->head_dim, L->dtype, L->k_kept, L->v_kept, L->group,
                              L->page_size, &m);
    if (st) return st;
    /* the kernel counts positions in int */
    if (blocks > 0x7fffffff || (long long)compress_total + window_total > 0x7fffffff)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT, "append too large");
    kernel = m->append;
    args[0] = inl;
    inl->njobs = inl->npatches = 0;
    if (njobs <= MUSTAFAR__INLINE_JOBS && npatches <= MUSTAFAR__INLINE_PATCHES) {
        mustafar__inline_lists(&inl->njobs, &inl->npatches, inl->jobs, inl->patches, jobs, njobs,
                               patches, npatches);
    } else if (ctx->cuda->wide_params && njobs <= MUSTAFAR__WIDE_JOBS &&
               npatches <= MUSTAFAR__WIDE_PATCHES) {
        st = mustafar__append_wide_kernel(ctx, m);
        if (st) return st;
        kernel = m->append_wide;
        kernel_name = "mustafar_append_wide";
        args[0] = wide;
        mustafar__inline_lists(&wide->njobs, &wide->npatches, wide->jobs, wide->patches, jobs, njobs,
                               patches, npatches);
    } else {
        size_t job_bytes = sizeof *jobs * (size_t)njobs, bytes = job_bytes + 8 * (size_t)npatches;
        unsigned char *blob, *dev;
        st = mustafar__cuda_scratch(ctx, bytes, (void **)&dev);
        if (st) return st;
        blob = (unsigned char *)MUSTAFAR_MALLOC(bytes);
        if (!blob) return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
        memcpy(blob, jobs, job_bytes);
        if (npatches) memcpy(blob + job_bytes, patches, 8 * (size_t)npatches);
        st = mustafar__cuda_upload(ctx, dev, blob, bytes);
        MUSTAFAR_FREE(blob);
        if (st) return st;
        dev_jobs = dev;
        dev_patches = dev + job_bytes;
    }
    args[1] = &dev_jobs; args[2] = &njobs; args[3] = &dev_patches;
    args[4] = &npatches; args[5] = &compress_total; args[6] = &window_total; args[7] = &hkv;
    args[8] = &pair_kv; args[9] = (void *)&k; args[10] = (void *)&v; args[11] = (void *)&kv->k_pages;
    args[12] = (void *)&kv->v_pages; args[13] = (void *)&kv->page_table; args[14] = &stride;
    args[15] = (void *)&kv->k_window; args[16] = (void *)&kv->v_window; args[17] = &window;
    return mustafar__launch(ctx, kernel, kernel_name, (unsigned)blocks, 1, 1, 256, 0, args, 1);
}

/* Positions per split.  Time is modelled as waves x tiles per block: the
   grid of (sequences x KV-head blocks x splits) blocks runs in waves of
   (SMs x resident blocks); more splits shorten each block but can add a
   partly empty wave, and each split costs a little in the combine step. */
static int mustafar__choose_chunk(const mustafar_context *ctx, const mustafar__module *m, int nseq,
                                  int blocks_per_seq, int32_t max_len)
{
    const int64_t sweep = 16 * (int64_t)m->warps;
    const int64_t slots = (int64_t)ctx->cuda->num_sms * m->blocks_per_sm;
    const int64_t base = (int64_t)nseq * blocks_per_seq;
    int64_t splits, best_chunk = sweep, tiles_total = (max_len + sweep - 1) / sweep;
    double best = -1.0;
    if (max_len <= 0) return (int)sweep;
    /* the cost depends on the split count only through chunk_tiles: visit
       each distinct chunk_tiles once (O(sqrt(tiles)) steps, not O(tiles)) */
    for (splits = 1; splits <= 1024 && splits <= tiles_total;) {
        int64_t chunk_tiles = (tiles_total + splits - 1) / splits;
        int64_t real_splits = (tiles_total + chunk_tiles - 1) / chunk_tiles;
        int64_t waves = (base * real_splits + slots - 1) / slots;
        double cost = (double)waves * (chunk_tiles + 2) + 0.02 * (double)real_splits;
        if (best < 0 || cost < best) { best = cost; best_chunk = chunk_tiles * sweep; }
        if (chunk_tiles == 1) break;
        splits = (tiles_total + chunk_tiles - 2) / (chunk_tiles - 1);  /* next smaller chunk */
    }
    return (int)best_chunk;
}

static mustafar_status mustafar__cuda_attention(mustafar_context *ctx, const mustafar__layout *L,
                                                const mustafar_paged_kv *kv, int nseq,
                                                const mustafar_paged_seq *seqs, int seqs_on_host,
                                                int32_t max_len, const void *q, void *out,
                                                float scale, int unsettled)
{
    mustafar__module *m;
    mustafar_status st;
    int head_blocks = (L->group + 15) / 16, chunk, splits, stride = kv->page_table_stride;
    int window = L->window, hkv = L->num_kv_heads;
    mustafar__seqs_inline *inl = &ctx->cuda->seq_params;
    int inline_seqs = seqs_on_host && nseq <= MUSTAFAR__INLINE_SEQS;
    size_t seq_bytes = seqs_on_host && !inline_seqs ? mustafar__round_up(sizeof *seqs * (size_t)nseq, 256) : 0;
    size_t partial_o, partial_ml;
    unsigned char *dev;
    const void *dev_seqs = seqs;
    float *po, *pml, scale_log2 = scale * 1.4426950408889634f;
    void *args[18];
    if (nseq > 0x7fffffff / 2)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT, "nseq %d too large", nseq);
    st = mustafar__get_module(ctx, L->head_dim, L->dtype, L->k_kept, L->v_kept, L->group,
                              L->page_size, &m);
    if (st) return st;
    /* at most 1024 splits (grid z allows 65535), each a whole number of
       sweeps: the kernel's tiles start at multiples of 16 */
    chunk = mustafar__choose_chunk(ctx, m, nseq, hkv * head_blocks, max_len);
    splits = max_len > 0 ? (int)((max_len + (int64_t)chunk - 1) / chunk) : 1;
    partial_o = splits > 1 ? (size_t)nseq * L->num_q_heads * splits * L->head_dim * 4 : 0;
    partial_ml = splits > 1 ? (size_t)nseq * L->num_q_heads * splits * 2 * 4 : 0;
    st = mustafar__cuda_scratch(ctx, seq_bytes + partial_o + partial_ml, (void **)&dev);
    if (st) return st;
    inl->count = 0;
    if (inline_seqs) {
        inl->count = nseq;
        memcpy(inl->seqs, seqs, sizeof *seqs * (size_t)nseq);
        dev_seqs = NULL;
    } else if (seqs_on_host) {
        st = mustafar__cuda_upload(ctx, dev, seqs, sizeof *seqs * (size_t)nseq);
        if (st) return st;
        dev_seqs = dev;
        unsettled = -1;       /* a copy now separates the append from the attention */
    }
    po = (float *)(dev + seq_bytes);
    pml = (float *)(dev + seq_bytes + partial_o);
    args[0] = inl; args[1] = (void *)&kv->k_pages; args[2] = (void *)&kv->v_pages;
    args[3] = (void *)&kv->page_table; args[4] = &stride; args[5] = (void *)&kv->k_window;
    args[6] = (void *)&kv->v_window; args[7] = &window; args[8] = &dev_seqs; args[9] = (void *)&q;
    args[10] = &out; args[11] = &po; args[12] = &pml; args[13] = &hkv; args[14] = &chunk;
    args[15] = &splits; args[16] = &scale_log2; args[17] = &unsettled;
    st = mustafar__launch(ctx, m->attention, "mustafar_attention", (unsigned)nseq,
                          (unsigned)(hkv * head_blocks), (unsigned)splits,
                          (unsigned)(32 * m->warps), m->attention_smem, args, 1);
    if (st || splits == 1) return st;
    args[0] = &po; args[1] = &pml; args[2] = &out; args[3] = &splits;
    return mustafar__launch(ctx, m->combine, "mustafar_combine",
                            (unsigned)((size_t)nseq * L->num_q_heads), 1, 1, 256, 0, args, 1);
}

#endif /* MUSTAFAR_NO_CUDA */

/* ==== >>dispatch: one function per operation; the backend is chosen here =========
   The CUDA branch of each runs between mustafar__device_enter and _leave. */

#ifdef MUSTAFAR_NO_CUDA
#define MUSTAFAR__CUDA_DISPATCH(ctx, call) MUSTAFAR__UNUSED(ctx)
#else
/* Runs `call` (a mustafar_status expression) with the context's device
   current and returns its status, when ctx is a CUDA context. */
#define MUSTAFAR__CUDA_DISPATCH(ctx, call)                                          \
    do {                                                                            \
        if (mustafar__is_cuda(ctx)) {                                               \
            int mustafar__previous = mustafar__device_enter((ctx), (ctx)->cuda->device); \
            mustafar_status mustafar__st = (call);                                  \
            mustafar__device_leave((ctx), mustafar__previous, (ctx)->cuda->device); \
            return mustafar__st;                                                    \
        }                                                                           \
    } while (0)
#endif

/* Makes ctx a CUDA context, or leaves it a CPU one and says why. */
static mustafar_status mustafar__backend_init_cuda(mustafar_context *ctx,
                                                   const mustafar_context_desc *desc)
{
#ifdef MUSTAFAR_NO_CUDA
    MUSTAFAR__UNUSED(desc);
    return mustafar__fail(ctx, MUSTAFAR_ERROR_BACKEND_UNAVAILABLE,
                          "CUDA backend unavailable: built with MUSTAFAR_NO_CUDA");
#else
    mustafar_status st;
    int previous;
    const char *path = desc->cuda_path ? desc->cuda_path : getenv("MUSTAFAR_CUDA_PATH");
    char why[MUSTAFAR__MSG_CAP / 2];
    ctx->cuda = (mustafar__cuda *)mustafar__calloc(sizeof *ctx->cuda);
    if (!ctx->cuda)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    if (!mustafar__cuda_api_load(&ctx->cuda->api, path, why, sizeof why)) {
        MUSTAFAR_FREE(ctx->cuda);
        ctx->cuda = NULL;
        return mustafar__fail(ctx, MUSTAFAR_ERROR_BACKEND_UNAVAILABLE,
                              "CUDA runtime or NVRTC not loaded; tried %s", why);
    }
    previous = mustafar__device_enter(ctx, desc->cuda_device);
    st = mustafar__cuda_init(ctx, desc);
    mustafar__device_leave(ctx, previous, desc->cuda_device);
    if (why[0])                            /* candidates passed over before the one loaded */
        mustafar__append_text(ctx->message, sizeof ctx->message, " (passed over: %s)", why);
    if (st) {
        mustafar__cuda_api_unload(&ctx->cuda->api);
        MUSTAFAR_FREE(ctx->cuda);
        ctx->cuda = NULL;
        return st;
    }
    ctx->backend = MUSTAFAR_BACKEND_CUDA;
    return MUSTAFAR_OK;
#endif
}

static void mustafar__backend_shutdown(mustafar_context *ctx)
{
#ifndef MUSTAFAR_NO_CUDA
    if (mustafar__is_cuda(ctx)) {
        int previous = mustafar__device_enter(ctx, ctx->cuda->device);
        mustafar__cuda_shutdown(ctx);
        mustafar__device_leave(ctx, previous, ctx->cuda->device);
        mustafar__cuda_api_unload(&ctx->cuda->api);
        MUSTAFAR_FREE(ctx->cuda);
        ctx->cuda = NULL;
    }
#endif
    MUSTAFAR__UNUSED(ctx);
}

/* Zeroed backend memory. */
static mustafar_status mustafar__backend_alloc(mustafar_context *ctx, void **p, size_t bytes)
{
    MUSTAFAR__CUDA_DISPATCH(ctx, mustafar__cuda_alloc(ctx, p, bytes));
    *p = mustafar__calloc(bytes);
    if (!*p)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY,
                              "host allocation of %zu bytes failed", bytes);
    return MUSTAFAR_OK;
}

static void mustafar__backend_free(mustafar_context *ctx, void *p)
{
    if (!p) return;
#ifndef MUSTAFAR_NO_CUDA
    if (mustafar__is_cuda(ctx)) {
        int previous = mustafar__device_enter(ctx, ctx->cuda->device);
        mustafar__cuda_free(ctx, p);
        mustafar__device_leave(ctx, previous, ctx->cuda->device);
        return;
    }
#endif
    MUSTAFAR__UNUSED(ctx);
    MUSTAFAR_FREE(p);
}

static mustafar_status mustafar__backend_upload(mustafar_context *ctx, void *dst, const void *src,
                                                size_t bytes)
{
    MUSTAFAR__CUDA_DISPATCH(ctx, mustafar__cuda_upload(ctx, dst, src, bytes));
    memcpy(dst, src, bytes);
    return MUSTAFAR_OK;
}

static mustafar_status mustafar__backend_download(mustafar_context *ctx, void *dst,
                                                  const void *src, size_t bytes)
{
    MUSTAFAR__CUDA_DISPATCH(ctx, mustafar__cuda_download(ctx, dst, src, bytes));
    memcpy(dst, src, bytes);
    return MUSTAFAR_OK;
}

static mustafar_status mustafar__backend_synchronize(mustafar_context *ctx)
{
    MUSTAFAR__CUDA_DISPATCH(ctx, mustafar__cuda_synchronize(ctx));
    return MUSTAFAR_OK;
}

/* Prune, compress or decompress `count` token vectors (arguments checked). */
static mustafar_status mustafar__backend_records(mustafar_context *ctx, int op, int head_dim,
                                                 float sparsity, mustafar_dtype dtype,
                                                 const void *in, void *out, size_t count)
{
    MUSTAFAR__CUDA_DISPATCH(ctx, mustafar__cuda_records(ctx, op, head_dim, sparsity, dtype, in,
                                                        out, count));
    mustafar__cpu_records(ctx, op, head_dim, sparsity, dtype, in, out, count);
    return MUSTAFAR_OK;
}

/* Runs an append (jobs in host memory); `patches` are (index, page) pairs to
   store into the page table first (already applied to the host table). */
static mustafar_status mustafar__backend_append(mustafar_context *ctx, const mustafar__layout *L,
                                                const mustafar_paged_kv *kv,
                                                const mustafar__append_job *jobs, int njobs,
                                                const int32_t *patches, int npatches,
                                                const void *k, const void *v)
{
    MUSTAFAR__CUDA_DISPATCH(ctx, mustafar__cuda_append(ctx, L, kv, jobs, njobs, patches, npatches,
                                                       k, v));
    MUSTAFAR__UNUSED(patches);
    MUSTAFAR__UNUSED(npatches);
    mustafar__cpu_append(ctx, L, kv, jobs, njobs, (const uint16_t *)k, (const uint16_t *)v);
    return MUSTAFAR_OK;
}

/* unsettled >= 0: the call directly follows an append of this layer (a
   decode step) that compressed at most that many positions per sequence;
   -1 otherwise.  See the attention kernel. */
static mustafar_status mustafar__backend_attention(mustafar_context *ctx, const mustafar__layout *L,
                                                   const mustafar_paged_kv *kv, int nseq,
                                                   const mustafar_paged_seq *seqs,
                                                   int seqs_on_host, int32_t max_len,
                                                   const void *q, void *out, float scale,
                                                   int unsettled)
{
    MUSTAFAR__CUDA_DISPATCH(ctx, mustafar__cuda_attention(ctx, L, kv, nseq, seqs, seqs_on_host,
                                                          max_len, q, out, scale, unsettled));
    MUSTAFAR__UNUSED(seqs_on_host);
    MUSTAFAR__UNUSED(unsettled);
    return mustafar__cpu_attention(ctx, L, kv, nseq, seqs, max_len, (const uint16_t *)q,
                                   (uint16_t *)out, scale);
}

/* ==== >>public: the public functions not defined above =========================== */

/* ---- context ------------------------------------------------------------------ */

MUSTAFAR_API mustafar_backend mustafar_context_backend(const mustafar_context *ctx)
{
    return ctx ? ctx->backend : MUSTAFAR_BACKEND_CPU;
}

MUSTAFAR_API const char *mustafar_last_error(const mustafar_context *ctx)
{
    if (ctx) return ctx->message;
#ifdef MUSTAFAR__THREAD_LOCAL
    return mustafar__stateless_message;
#else
    return "no context (this compiler has no thread-local storage for its message)";
#endif
}

static void mustafar__copy_error(const mustafar_context_desc *desc, const char *msg)
{
    if (desc && desc->error_buffer && desc->error_buffer_size) {
        size_t n = strlen(msg);
        if (n >= desc->error_buffer_size) n = desc->error_buffer_size - 1;
        memcpy(desc->error_buffer, msg, n);
        desc->error_buffer[n] = 0;
    }
}

MUSTAFAR_API mustafar_status mustafar_context_create(const mustafar_context_desc *desc,
                                                     mustafar_context **out)
{
    mustafar_context_desc defaults;
    mustafar_context *ctx;
    mustafar_status st = MUSTAFAR_OK;
    if (!out) return MUSTAFAR_ERROR_NULL_POINTER;
    *out = NULL;
    if (!desc) {
        memset(&defaults, 0, sizeof defaults);
        desc = &defaults;
    }
    if (desc->backend != MUSTAFAR_BACKEND_AUTO && desc->backend != MUSTAFAR_BACKEND_CPU &&
        desc->backend != MUSTAFAR_BACKEND_CUDA) {
        mustafar__copy_error(desc, "unknown backend");
        return MUSTAFAR_ERROR_INVALID_ARGUMENT;
    }
    ctx = (mustafar_context *)mustafar__calloc(sizeof *ctx);
    if (!ctx) {
        mustafar__copy_error(desc, "host allocation of the context failed");
        return MUSTAFAR_ERROR_OUT_OF_MEMORY;
    }
    ctx->backend = MUSTAFAR_BACKEND_CPU;
    if (desc->backend != MUSTAFAR_BACKEND_CPU) {
        st = mustafar__backend_init_cuda(ctx, desc);
        if (st && desc->backend == MUSTAFAR_BACKEND_AUTO) {
            char why[MUSTAFAR__MSG_CAP / 2];
            memcpy(why, ctx->message, sizeof why - 1);
            why[sizeof why - 1] = 0;
            mustafar__snprintf(ctx->message, sizeof ctx->message, "using the CPU backend: %s", why);
            st = MUSTAFAR_OK;
        }
    }
    if (!st && ctx->backend == MUSTAFAR_BACKEND_CPU && !(ctx->cpu = mustafar__cpu_create(desc)))
        st = mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    if (st) {
        mustafar__copy_error(desc, ctx->message);
        MUSTAFAR_FREE(ctx);
        return st;
    }
    *out = ctx;
    return MUSTAFAR_OK;
}

MUSTAFAR_API void mustafar_context_destroy(mustafar_context *ctx)
{
    if (!ctx) return;
    while (ctx->caches) mustafar__cache_release_backend(ctx->caches);
    mustafar__backend_shutdown(ctx);
    mustafar__cpu_destroy(ctx->cpu);
    MUSTAFAR_FREE(ctx);
}

/* ---- backend memory ------------------------------------------------------------ */

MUSTAFAR_API mustafar_status mustafar_memory_alloc(mustafar_context *ctx, size_t bytes, void **out)
{
    if (!ctx || !out) return mustafar__fail(ctx, MUSTAFAR_ERROR_NULL_POINTER, "ctx or out is NULL");
    *out = NULL;
    return mustafar__backend_alloc(ctx, out, bytes);
}

MUSTAFAR_API void mustafar_memory_free(mustafar_context *ctx, void *p)
{
    if (ctx) mustafar__backend_free(ctx, p);
}

MUSTAFAR_API mustafar_status mustafar_memory_upload(mustafar_context *ctx, void *dst,
                                                    const void *src, size_t bytes)
{
    if (!ctx || (bytes && (!dst || !src)))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_NULL_POINTER, "ctx, dst or src is NULL");
    return bytes ? mustafar__backend_upload(ctx, dst, src, bytes) : MUSTAFAR_OK;
}

MUSTAFAR_API mustafar_status mustafar_memory_download(mustafar_context *ctx, void *dst,
                                                      const void *src, size_t bytes)
{
    if (!ctx || (bytes && (!dst || !src)))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_NULL_POINTER, "ctx, dst or src is NULL");
    return bytes ? mustafar__backend_download(ctx, dst, src, bytes) : mustafar__backend_synchronize(ctx);
}

MUSTAFAR_API mustafar_status mustafar_context_synchronize(mustafar_context *ctx)
{
    if (!ctx) return MUSTAFAR_ERROR_NULL_POINTER;
    return mustafar__backend_synchronize(ctx);
}

/* ---- stateless operations ------------------------------------------------------ */

static mustafar_status mustafar__records_op(mustafar_context *ctx, int op, int head_dim,
                                            float sparsity, mustafar_dtype dtype, const void *in,
                                            void *out, size_t count)
{
    mustafar_status st = mustafar__check_format(ctx, head_dim, sparsity, dtype);
    if (st) return st;
    if (count && (!in || !out))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_NULL_POINTER, "input or output is NULL");
    if (!count) return MUSTAFAR_OK;
    st = mustafar__check_aligned(ctx, in, out, "input and output");
    if (st) return st;
    return mustafar__backend_records(ctx, op, head_dim, sparsity, mustafar__resolve_dtype(dtype),
                                     in, out, count);
}

MUSTAFAR_API mustafar_status mustafar_prune(mustafar_context *ctx, int head_dim, float sparsity,
                                            mustafar_dtype dtype, const void *x, void *y,
                                            size_t count)
{
    return mustafar__records_op(ctx, MUSTAFAR__OP_PRUNE, head_dim, sparsity, dtype, x, y, count);
}

MUSTAFAR_API mustafar_status mustafar_compress(mustafar_context *ctx, int head_dim, float sparsity,
                                               mustafar_dtype dtype, const void *x, void *records,
                                               size_t count)
{
    return mustafar__records_op(ctx, MUSTAFAR__OP_COMPRESS, head_dim, sparsity, dtype, x, records,
                                count);
}

MUSTAFAR_API mustafar_status mustafar_decompress(mustafar_context *ctx, int head_dim, float sparsity,
                                                 mustafar_dtype dtype, const void *records, void *x,
                                                 size_t count)
{
    return mustafar__records_op(ctx, MUSTAFAR__OP_DECOMPRESS, head_dim, sparsity, dtype, records, x,
                                count);
}

MUSTAFAR_API mustafar_status mustafar_paged_write(mustafar_context *ctx, const mustafar_paged_kv *kv,
                                                  int nseq, const int32_t *rows,
                                                  const int32_t *first_position,
                                                  const int32_t *ntokens, const void *k,
                                                  const void *v)
{
    mustafar__layout L;
    mustafar__append_job *jobs;
    mustafar_status st = mustafar__layout_from_kv(ctx, kv, &L);
    int64_t total = 0;
    int i;
    if (st) return st;
    if (nseq < 0)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT, "nseq %d is negative", nseq);
    if (nseq && (!rows || !first_position || !ntokens))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_NULL_POINTER,
                              "rows, first_position or ntokens is NULL");
    for (i = 0; i < nseq; i++) {
        const int64_t capacity = (int64_t)kv->page_table_stride * L.page_size;
        const int64_t end = (int64_t)first_position[i] + ntokens[i];
        if (rows[i] < 0 || rows[i] >= kv->num_rows || first_position[i] < 0 || ntokens[i] < 0 ||
            end > capacity || end > INT32_MAX)
            return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                                  "sequence %d: row %d, positions [%d, %lld) do not fit %d rows of "
                                  "%lld positions", i, rows[i], first_position[i], (long long)end,
                                  kv->num_rows, (long long)capacity);
        total += ntokens[i];
    }
    if (total > INT32_MAX)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT, "too many tokens in one call");
    if (total && (!k || !v))
        return mustafar__fail(ctx, MUSTAFAR_ERROR_NULL_POINTER, "k or v is NULL");
    if (!total) return MUSTAFAR_OK;
    st = mustafar__check_aligned(ctx, k, v, "k and v");
    if (st) return st;
    if (!mustafar__is_cuda(ctx)) {
        for (i = 0; i < nseq; i++) {
            mustafar_paged_seq s;
            int32_t unused;
            s.row = rows[i];
            s.num_compressed = first_position[i] + ntokens[i];
            s.num_window = 0;
            s.reserved = 0;
            st = mustafar__check_seqs_host(ctx, &L, kv, 1, &s, &unused);
            if (st) return st;
        }
    }
    jobs = (mustafar__append_job *)mustafar__calloc(sizeof *jobs * (size_t)nseq);
    if (!jobs) return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    total = 0;
    for (i = 0; i < nseq; i++) {
        jobs[i].row = rows[i];
        jobs[i].old_length = first_position[i];
        jobs[i].new_tokens = ntokens[i];
        jobs[i].input_offset = (int32_t)total;
        jobs[i].old_compressed = first_position[i];
        jobs[i].new_compressed = first_position[i] + ntokens[i];
        jobs[i].compress_offset = (int32_t)total;
        jobs[i].window_offset = 0;
        jobs[i].pages_before = INT32_MAX;
        jobs[i].first_patch = 0;
        total += ntokens[i];
    }
    st = mustafar__backend_append(ctx, &L, kv, jobs, nseq, NULL, 0, k, v);
    MUSTAFAR_FREE(jobs);
    return st;
}

static float mustafar__resolve_scale(float scale, int head_dim)
{
    return scale != 0.0f ? scale : (float)(1.0 / sqrt((double)head_dim));
}

MUSTAFAR_API mustafar_status mustafar_paged_attention(mustafar_context *ctx,
                                                      const mustafar_paged_kv *kv, int nseq,
                                                      const mustafar_paged_seq *seqs,
                                                      const void *q, void *out, float scale)
{
    mustafar__layout L;
    mustafar_status st = mustafar__layout_from_kv(ctx, kv, &L);
    int32_t max_len;
    if (st) return st;
    if (nseq < 0)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT, "nseq %d is negative", nseq);
    if (!nseq) return MUSTAFAR_OK;
    if (!seqs || !q || !out)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_NULL_POINTER, "seqs, q or out is NULL");
    st = mustafar__check_aligned(ctx, q, out, "q and out");
    if (st) return st;
    if (mustafar__is_cuda(ctx)) {
        /* lengths live on the device: bound them by what the layout can hold */
        const int64_t bound = (int64_t)kv->page_table_stride * L.page_size + L.window;
        if (bound > INT32_MAX)
            return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                                  "page_table_stride * page_size + window_size exceeds 2^31 positions");
        max_len = (int32_t)bound;
    } else {
        st = mustafar__check_seqs_host(ctx, &L, kv, nseq, seqs, &max_len);
        if (st) return st;
    }
    return mustafar__backend_attention(ctx, &L, kv, nseq, seqs, 0, max_len, q, out,
                                       mustafar__resolve_scale(scale, L.head_dim), -1);
}

/* ---- cache object ----------------------------------------------------------------
   Host-side bookkeeping (page tables, lengths, free pages) drives the backend;
   sequence ids are page-table rows.  Every call validates all of its input
   and checks capacity before it changes anything. */

struct mustafar_cache {
    mustafar_context *ctx;         /* NULL once the context was destroyed first */
    mustafar_cache *next;          /* the context's list of caches */
    mustafar_cache_desc desc;      /* with defaults resolved */
    mustafar__layout layout;
    int num_pages, pages_per_sequence;
    size_t k_layer_bytes, v_layer_bytes, window_layer_elems;
    unsigned char *k_pool, *v_pool;          /* backend memory */
    uint16_t *k_window, *v_window;           /* backend memory */
    int32_t *table_device;                   /* backend memory (== table on CPU) */
    int32_t *table;                          /* host [max_sequences][pages_per_sequence] */
    int32_t *length;                         /* host [max_sequences][num_layers] */
    int32_t *pages_held;                     /* host [max_sequences] */
    unsigned char *live;                     /* host [max_sequences] */
    int32_t *free_pages;                     /* host stack of free page ids */
    int free_count, live_count;
};

static void mustafar__cache_release_backend(mustafar_cache *c)
{
    mustafar_cache **link;
    if (!c->ctx) return;
    for (link = &c->ctx->caches; *link; link = &(*link)->next)
        if (*link == c) { *link = c->next; break; }
    mustafar__backend_free(c->ctx, c->k_pool);
    mustafar__backend_free(c->ctx, c->v_pool);
    mustafar__backend_free(c->ctx, c->k_window);
    mustafar__backend_free(c->ctx, c->v_window);
    if (c->table_device != c->table) mustafar__backend_free(c->ctx, c->table_device);
    c->k_pool = c->v_pool = NULL;
    c->k_window = c->v_window = NULL;
    c->table_device = NULL;
    c->ctx = NULL;
}

static void mustafar__cache_free_all(mustafar_cache *c)
{
    mustafar__cache_release_backend(c);
    MUSTAFAR_FREE(c->table);
    MUSTAFAR_FREE(c->length);
    MUSTAFAR_FREE(c->pages_held);
    MUSTAFAR_FREE(c->live);
    MUSTAFAR_FREE(c->free_pages);
    MUSTAFAR_FREE(c);
}

/* The checks every cache call starts with: a cache, still attached to a
   context (destroying the context first releases the cache's memory), and
   the output pointer. */
static mustafar_status mustafar__cache_usable(const mustafar_cache *cache, const void *out)
{
    if (!cache) return MUSTAFAR_ERROR_NULL_POINTER;
    if (!cache->ctx) return MUSTAFAR_ERROR_WRONG_BACKEND;
    if (!out) return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_NULL_POINTER, "out is NULL");
    return MUSTAFAR_OK;
}

MUSTAFAR_API mustafar_status mustafar_cache_create(mustafar_context *ctx,
                                                   const mustafar_cache_desc *desc,
                                                   mustafar_cache **out)
{
    mustafar_cache_desc d;
    mustafar_cache *c;
    mustafar__layout *L;
    mustafar_status st;
    int64_t pages;
    int i;
    if (!ctx || !desc || !out)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_NULL_POINTER, "ctx, desc or out is NULL");
    *out = NULL;
    d = *desc;
    if (!d.head_dim) d.head_dim = 128;
    if (!d.num_q_heads) d.num_q_heads = d.num_kv_heads;
    if (!d.max_sequences) d.max_sequences = 64;
    if (!d.max_sequence_length && d.capacity_tokens > 0)
        d.max_sequence_length = d.capacity_tokens > INT32_MAX / 2 ? INT32_MAX / 2
                                                                  : (int)d.capacity_tokens;
    if (!d.page_size) d.page_size = 16;
    /* a page or a window longer than any sequence would only waste memory */
    if (d.max_sequence_length > 0 && d.page_size > d.max_sequence_length) d.page_size = d.max_sequence_length;
    if (d.max_sequence_length > 0 && d.dense_window > d.max_sequence_length)
        d.dense_window = d.max_sequence_length;
    d.dtype = mustafar__resolve_dtype(d.dtype);
    st = mustafar__check_format(ctx, d.head_dim, d.k_sparsity, d.dtype);
    if (!st) st = mustafar__check_format(ctx, d.head_dim, d.v_sparsity, d.dtype);
    if (st) return st;
    if (d.num_layers < 1 || d.num_kv_heads < 1 || d.num_q_heads < 1 ||
        d.num_q_heads % d.num_kv_heads || d.dense_window < 0 || d.page_size < 1 ||
        d.capacity_tokens < 1 || d.max_sequences < 1 || d.max_sequence_length < 1 ||
        d.max_sequence_length > INT32_MAX / 2)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                              "invalid cache descriptor: layers %d, kv heads %d, q heads %d "
                              "(a multiple of kv heads), window %d, page size %d, capacity %lld, "
                              "max sequences %d, max length %d", d.num_layers, d.num_kv_heads,
                              d.num_q_heads, d.dense_window, d.page_size,
                              (long long)d.capacity_tokens, d.max_sequences,
                              d.max_sequence_length);
    pages = mustafar__pages_for(d.capacity_tokens, d.page_size);
    if (pages > INT32_MAX / 2)
        return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT, "capacity_tokens too large");
    {   /* every buffer size must fit in 2^62 bytes and in half the address space
           (32-bit builds), the page table in int32 indices */
        const double limit = (double)SIZE_MAX / 2 < 4.6e18 ? (double)SIZE_MAX / 2 : 4.6e18;
        const size_t k_rec = mustafar_record_bytes(d.head_dim, d.k_sparsity, d.dtype);
        const size_t v_rec = mustafar_record_bytes(d.head_dim, d.v_sparsity, d.dtype);
        const double pool = (double)pages * d.num_kv_heads * d.page_size *
                            (double)(k_rec > v_rec ? k_rec : v_rec) * d.num_layers;
        const double win = (double)d.max_sequences * d.dense_window * d.num_kv_heads * d.head_dim *
                           2.0 * d.num_layers;
        const double table = (double)d.max_sequences *
                             (double)mustafar__pages_for(d.max_sequence_length, d.page_size);
        const double lengths = 4.0 * d.max_sequences * d.num_layers;
        if (pool > limit || win > limit || table > INT32_MAX || 4.0 * table > limit || lengths > limit)
            return mustafar__fail(ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                                  "cache too large: pool %.3g bytes, windows %.3g bytes, page table "
                                  "%.3g entries (the limit: %.3g bytes, %d entries)",
                                  pool, win, table, limit, INT32_MAX);
    }
    c = (mustafar_cache *)mustafar__calloc(sizeof *c);
    if (!c) return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    c->ctx = ctx;
    c->desc = d;
    L = &c->layout;
    mustafar__layout_fill(L, d.head_dim, d.dtype, d.k_sparsity, d.v_sparsity, d.num_kv_heads,
                          d.num_q_heads, d.page_size, d.dense_window);
    c->num_pages = (int)pages;
    c->pages_per_sequence = (int)mustafar__pages_for(d.max_sequence_length, d.page_size);
    c->k_layer_bytes = (size_t)pages * d.num_kv_heads * d.page_size * L->k_record;
    c->v_layer_bytes = (size_t)pages * d.num_kv_heads * d.page_size * L->v_record;
    c->window_layer_elems = (size_t)d.max_sequences * d.dense_window * d.num_kv_heads * d.head_dim;
    c->table = (int32_t *)mustafar__calloc(sizeof(int32_t) * (size_t)d.max_sequences *
                                           c->pages_per_sequence);
    c->length = (int32_t *)mustafar__calloc(sizeof(int32_t) * (size_t)d.max_sequences *
                                            d.num_layers);
    c->pages_held = (int32_t *)mustafar__calloc(sizeof(int32_t) * (size_t)d.max_sequences);
    c->live = (unsigned char *)mustafar__calloc((size_t)d.max_sequences);
    c->free_pages = (int32_t *)mustafar__calloc(sizeof(int32_t) * (size_t)pages);
    if (!c->table || !c->length || !c->pages_held || !c->live || !c->free_pages) {
        mustafar__cache_free_all(c);
        return mustafar__fail(ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    }
    /* pages are handed out lowest id first */
    for (i = 0; i < (int)pages; i++) c->free_pages[i] = (int32_t)(pages - 1 - i);
    c->free_count = (int)pages;
    st = mustafar__backend_alloc(ctx, (void **)&c->k_pool, c->k_layer_bytes * d.num_layers);
    if (!st) st = mustafar__backend_alloc(ctx, (void **)&c->v_pool, c->v_layer_bytes * d.num_layers);
    if (!st && c->window_layer_elems) {
        st = mustafar__backend_alloc(ctx, (void **)&c->k_window,
                                     2 * c->window_layer_elems * d.num_layers);
        if (!st)
            st = mustafar__backend_alloc(ctx, (void **)&c->v_window,
                                         2 * c->window_layer_elems * d.num_layers);
    }
    if (!st) {
        if (mustafar__is_cuda(ctx))
            st = mustafar__backend_alloc(ctx, (void **)&c->table_device,
                                         sizeof(int32_t) * (size_t)d.max_sequences *
                                             c->pages_per_sequence);
        else
            c->table_device = c->table;
    }
    if (st) {
        mustafar__cache_free_all(c);
        return st;
    }
    c->next = ctx->caches;
    ctx->caches = c;
    *out = c;
    return MUSTAFAR_OK;
}

/* The bytes cache_create allocated (see MEMORY): backend pools, windows and
   page table, and the host's bookkeeping. */
static size_t mustafar__cache_allocated_bytes(const mustafar_cache *c)
{
    const mustafar_cache_desc *d = &c->desc;
    const size_t table = sizeof(int32_t) * (size_t)d->max_sequences * c->pages_per_sequence;
    return (c->k_layer_bytes + c->v_layer_bytes + 2 * 2 * c->window_layer_elems) * d->num_layers +
           table * (c->table_device != c->table ? 2 : 1) + sizeof *c +
           sizeof(int32_t) * (size_t)d->max_sequences * d->num_layers +
           (sizeof(int32_t) + 1) * (size_t)d->max_sequences + sizeof(int32_t) * (size_t)c->num_pages;
}

MUSTAFAR_API void mustafar_cache_destroy(mustafar_cache *cache)
{
    if (cache) mustafar__cache_free_all(cache);
}

MUSTAFAR_API mustafar_status mustafar_cache_add_sequence(mustafar_cache *cache, int *seq_id)
{
    int i;
    mustafar_status st = mustafar__cache_usable(cache, seq_id);
    if (st) return st;
    for (i = 0; i < cache->desc.max_sequences; i++) {
        if (!cache->live[i]) {
            cache->live[i] = 1;
            cache->pages_held[i] = 0;
            memset(cache->length + (size_t)i * cache->desc.num_layers, 0,
                   sizeof(int32_t) * (size_t)cache->desc.num_layers);
            cache->live_count++;
            *seq_id = i;
            return MUSTAFAR_OK;
        }
    }
    return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_TOO_MANY_SEQUENCES,
                          "all %d sequences are in use", cache->desc.max_sequences);
}

static int mustafar__cache_live(const mustafar_cache *c, int id)
{
    return id >= 0 && id < c->desc.max_sequences && c->live[id];
}

MUSTAFAR_API mustafar_status mustafar_cache_remove_sequence(mustafar_cache *cache, int seq_id)
{
    int32_t p;
    mustafar_status st = mustafar__cache_usable(cache, cache);
    if (st) return st;
    if (!mustafar__cache_live(cache, seq_id))
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_UNKNOWN_SEQUENCE,
                              "sequence %d is not in the cache", seq_id);
    for (p = cache->pages_held[seq_id] - 1; p >= 0; p--)
        cache->free_pages[cache->free_count++] =
            cache->table[(size_t)seq_id * cache->pages_per_sequence + p];
    cache->pages_held[seq_id] = 0;
    cache->live[seq_id] = 0;
    cache->live_count--;
    return MUSTAFAR_OK;
}

MUSTAFAR_API mustafar_status mustafar_cache_layer_view(const mustafar_cache *cache, int layer,
                                                       mustafar_paged_kv *out)
{
    const mustafar_cache_desc *d;
    mustafar_status st = mustafar__cache_usable(cache, out);
    if (st) return st;
    d = &cache->desc;
    if (layer < 0 || layer >= d->num_layers)
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                              "layer %d outside [0, %d)", layer, d->num_layers);
    memset(out, 0, sizeof *out);
    out->head_dim = d->head_dim;
    out->dtype = d->dtype;
    out->k_sparsity = d->k_sparsity;
    out->v_sparsity = d->v_sparsity;
    out->num_kv_heads = d->num_kv_heads;
    out->num_q_heads = d->num_q_heads;
    out->page_size = d->page_size;
    out->k_pages = cache->k_pool + cache->k_layer_bytes * layer;
    out->v_pages = cache->v_pool + cache->v_layer_bytes * layer;
    out->page_table = cache->table_device;
    out->page_table_stride = cache->pages_per_sequence;
    out->num_rows = d->max_sequences;
    out->num_pages = cache->num_pages;
    out->window_size = d->dense_window;
    if (d->dense_window) {
        out->k_window = cache->k_window + cache->window_layer_elems * layer;
        out->v_window = cache->v_window + cache->window_layer_elems * layer;
    }
    return MUSTAFAR_OK;
}

static int32_t mustafar__cache_compressed(const mustafar_cache *c, int32_t length)
{
    return length > c->desc.dense_window ? length - c->desc.dense_window : 0;
}

MUSTAFAR_API mustafar_status mustafar_cache_sequence_view(const mustafar_cache *cache, int seq_id,
                                                          int layer, mustafar_paged_seq *out)
{
    int32_t len;
    mustafar_status st = mustafar__cache_usable(cache, out);
    if (st) return st;
    if (layer < 0 || layer >= cache->desc.num_layers)
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                              "layer %d outside [0, %d)", layer, cache->desc.num_layers);
    if (!mustafar__cache_live(cache, seq_id))
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_UNKNOWN_SEQUENCE,
                              "sequence %d is not in the cache", seq_id);
    len = cache->length[(size_t)seq_id * cache->desc.num_layers + layer];
    out->row = seq_id;
    out->num_compressed = mustafar__cache_compressed(cache, len);
    out->num_window = len - out->num_compressed;
    out->reserved = 0;
    return MUSTAFAR_OK;
}

MUSTAFAR_API int mustafar_cache_sequence_length(const mustafar_cache *cache, int seq_id, int layer)
{
    if (!cache || !cache->ctx || layer < 0 || layer >= cache->desc.num_layers ||
        !mustafar__cache_live(cache, seq_id))
        return -1;
    return cache->length[(size_t)seq_id * cache->desc.num_layers + layer];
}

/* Common checks of append and attention: layer, count, ids live and distinct. */
static mustafar_status mustafar__cache_check_ids(mustafar_cache *c, int layer, int nseq,
                                                 const int *seq_ids)
{
    int i, j;
    if (layer < 0 || layer >= c->desc.num_layers)
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT, "layer %d outside [0, %d)",
                              layer, c->desc.num_layers);
    if (nseq < 0 || nseq > c->desc.max_sequences)
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                              "nseq %d outside [0, %d]", nseq, c->desc.max_sequences);
    if (nseq && !seq_ids)
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_NULL_POINTER, "seq_ids is NULL");
    for (i = 0; i < nseq; i++) {
        if (!mustafar__cache_live(c, seq_ids[i]))
            return mustafar__fail(c->ctx, MUSTAFAR_ERROR_UNKNOWN_SEQUENCE,
                                  "seq_ids[%d] = %d is not in the cache", i, seq_ids[i]);
        for (j = 0; j < i; j++)
            if (seq_ids[j] == seq_ids[i])
                return mustafar__fail(c->ctx, MUSTAFAR_ERROR_DUPLICATE_SEQUENCE,
                                      "sequence %d appears twice (seq_ids[%d] and [%d])",
                                      seq_ids[i], j, i);
    }
    return MUSTAFAR_OK;
}

/* mustafar_cache_append; *unsettled (if not NULL) receives the most
   positions compressed in one sequence, or -1 when nothing was appended
   (no kernel launched). */
static mustafar_status mustafar__cache_append(mustafar_cache *cache, int layer, int nseq,
                                              const int *seq_ids, const int *ntokens,
                                              const void *k, const void *v, int32_t *unsettled)
{
    mustafar_paged_kv kv;
    mustafar__append_job *jobs;
    int32_t *patches;
    int64_t total = 0, pages_needed = 0;
    int32_t compress_total = 0, window_total = 0;
    int i, npatches = 0, old_free;
    mustafar_status st = mustafar__cache_usable(cache, cache);
    if (st) return st;
    st = mustafar__cache_check_ids(cache, layer, nseq, seq_ids);
    if (st) return st;
    if (nseq && !ntokens)
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_NULL_POINTER, "ntokens is NULL");
    for (i = 0; i < nseq; i++) {
        int id = seq_ids[i];
        int32_t len = cache->length[(size_t)id * cache->desc.num_layers + layer];
        int32_t need;
        if (ntokens[i] < 0)
            return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                                  "ntokens[%d] = %d is negative", i, ntokens[i]);
        if ((int64_t)len + ntokens[i] > cache->desc.max_sequence_length)
            return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_SEQUENCE_TOO_LONG,
                                  "sequence %d: %d + %d tokens exceed max_sequence_length %d", id,
                                  len, ntokens[i], cache->desc.max_sequence_length);
        total += ntokens[i];
        need = (int32_t)mustafar__pages_for(mustafar__cache_compressed(cache, len + ntokens[i]),
                                            cache->desc.page_size);
        if (need > cache->pages_held[id]) pages_needed += need - cache->pages_held[id];
    }
    if (total > INT32_MAX)
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                              "too many tokens in one call");
    if (unsettled) *unsettled = -1;
    if (!total) return MUSTAFAR_OK;
    if (!k || !v) return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_NULL_POINTER, "k or v is NULL");
    st = mustafar__check_aligned(cache->ctx, k, v, "k and v");
    if (st) return st;
    if (pages_needed > cache->free_count)
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_POOL_FULL,
                              "the append needs %lld new pages, %d are free",
                              (long long)pages_needed, cache->free_count);
    jobs = (mustafar__append_job *)mustafar__calloc(sizeof *jobs * (size_t)nseq);
    patches = (int32_t *)mustafar__calloc(sizeof(int32_t) * 2 * (size_t)(pages_needed + 1));
    if (!jobs || !patches) {
        MUSTAFAR_FREE(jobs);
        MUSTAFAR_FREE(patches);
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    }
    /* From here on nothing can fail but the backend itself. */
    old_free = cache->free_count;
    total = 0;
    for (i = 0; i < nseq; i++) {
        int id = seq_ids[i];
        mustafar__append_job *j = &jobs[i];
        int32_t len = cache->length[(size_t)id * cache->desc.num_layers + layer];
        int32_t need;
        j->row = id;
        j->old_length = len;
        j->new_tokens = ntokens[i];
        j->input_offset = (int32_t)total;
        j->old_compressed = mustafar__cache_compressed(cache, len);
        j->new_compressed = mustafar__cache_compressed(cache, len + ntokens[i]);
        j->compress_offset = compress_total;
        j->window_offset = window_total;
        j->pages_before = cache->pages_held[id];
        j->first_patch = npatches;
        compress_total += j->new_compressed - j->old_compressed;
        window_total += len + ntokens[i] - mustafar__job_window_first(j);
        total += ntokens[i];
        need = (int32_t)mustafar__pages_for(j->new_compressed, cache->desc.page_size);
        while (cache->pages_held[id] < need) {
            int32_t index = (int32_t)((int64_t)id * cache->pages_per_sequence + cache->pages_held[id]++);
            int32_t page = cache->free_pages[--cache->free_count];
            cache->table[index] = page;
            patches[2 * npatches] = index;
            patches[2 * npatches + 1] = page;
            npatches++;
        }
    }
    mustafar_cache_layer_view(cache, layer, &kv);
    st = mustafar__backend_append(cache->ctx, &cache->layout, &kv, jobs, nseq, patches, npatches,
                                  k, v);
    if (st) {
        /* give the new pages back; lengths were not touched */
        for (i = nseq - 1; i >= 0; i--) {
            int id = seq_ids[i];
            int32_t need, lmax = 0, l;
            for (l = 0; l < cache->desc.num_layers; l++) {
                int32_t cl = mustafar__cache_compressed(
                    cache, cache->length[(size_t)id * cache->desc.num_layers + l]);
                if (cl > lmax) lmax = cl;
            }
            need = (int32_t)mustafar__pages_for(lmax, cache->desc.page_size);
            while (cache->pages_held[id] > need) {
                cache->pages_held[id]--;
                cache->free_pages[cache->free_count++] =
                    cache->table[id * cache->pages_per_sequence + cache->pages_held[id]];
            }
        }
        MUSTAFAR_ASSERT(cache->free_count == old_free);
    } else {
        for (i = 0; i < nseq; i++) {
            cache->length[(size_t)seq_ids[i] * cache->desc.num_layers + layer] += ntokens[i];
            if (unsettled && jobs[i].new_compressed - jobs[i].old_compressed > *unsettled)
                *unsettled = jobs[i].new_compressed - jobs[i].old_compressed;
        }
    }
    MUSTAFAR_FREE(jobs);
    MUSTAFAR_FREE(patches);
    return st;
}

MUSTAFAR_API mustafar_status mustafar_cache_append(mustafar_cache *cache, int layer, int nseq,
                                                   const int *seq_ids, const int *ntokens,
                                                   const void *k, const void *v)
{
    return mustafar__cache_append(cache, layer, nseq, seq_ids, ntokens, k, v, NULL);
}

/* The arguments of an attention call (q and out only when nseq > 0). */
static mustafar_status mustafar__check_attention(mustafar_cache *cache, int layer, int nseq,
                                                 const int *seq_ids, const void *q, const void *out)
{
    mustafar_status st = mustafar__cache_usable(cache, cache);
    if (st) return st;
    st = mustafar__cache_check_ids(cache, layer, nseq, seq_ids);
    if (st || !nseq) return st;
    if (!q || !out) return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_NULL_POINTER, "q or out is NULL");
    return mustafar__check_aligned(cache->ctx, q, out, "q and out");
}

/* mustafar_cache_attention after its checks; unsettled as in
   mustafar__backend_attention. */
static mustafar_status mustafar__cache_attend(mustafar_cache *cache, int layer, int nseq,
                                              const int *seq_ids, const void *q, void *out,
                                              float scale, int unsettled)
{
    mustafar_paged_kv kv;
    mustafar_paged_seq *seqs;
    int32_t max_len = 0;
    int i;
    mustafar_status st;
    seqs = (mustafar_paged_seq *)mustafar__calloc(sizeof *seqs * (size_t)nseq);
    if (!seqs) return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    for (i = 0; i < nseq; i++) {
        mustafar_cache_sequence_view(cache, seq_ids[i], layer, &seqs[i]);
        if (seqs[i].num_compressed + seqs[i].num_window > max_len)
            max_len = seqs[i].num_compressed + seqs[i].num_window;
    }
    mustafar_cache_layer_view(cache, layer, &kv);
    st = mustafar__backend_attention(cache->ctx, &cache->layout, &kv, nseq, seqs, 1, max_len, q,
                                     out, mustafar__resolve_scale(scale, cache->desc.head_dim),
                                     unsettled);
    MUSTAFAR_FREE(seqs);
    return st;
}

MUSTAFAR_API mustafar_status mustafar_cache_attention(mustafar_cache *cache, int layer, int nseq,
                                                      const int *seq_ids, const void *q, void *out,
                                                      float scale)
{
    mustafar_status st = mustafar__check_attention(cache, layer, nseq, seq_ids, q, out);
    if (st || !nseq) return st;
    return mustafar__cache_attend(cache, layer, nseq, seq_ids, q, out, scale, -1);
}

MUSTAFAR_API mustafar_status mustafar_cache_decode_step(mustafar_cache *cache, int layer, int nseq,
                                                        const int *seq_ids, const int *ntokens,
                                                        const void *k, const void *v, const void *q,
                                                        void *out, float scale)
{
    int32_t unsettled;
    mustafar_status st = mustafar__check_attention(cache, layer, nseq, seq_ids, q, out);
    if (st || !nseq) return st;
    st = mustafar__cache_append(cache, layer, nseq, seq_ids, ntokens, k, v, &unsettled);
    if (st) return st;
    /* unsettled -1 (nothing appended, no kernel launched: the kernel before
       the attention is not this step's append) makes it a plain attention */
    return mustafar__cache_attend(cache, layer, nseq, seq_ids, q, out, scale, (int)unsettled);
}

MUSTAFAR_API mustafar_status mustafar_cache_stats_get(const mustafar_cache *cache,
                                                      mustafar_cache_stats *out)
{
    const mustafar_cache_desc *d;
    const mustafar__layout *L;
    int64_t dense_vector_bytes, windowed = 0;
    int i, l;
    mustafar_status st = mustafar__cache_usable(cache, out);
    if (st) return st;
    d = &cache->desc;
    L = &cache->layout;
    memset(out, 0, sizeof *out);
    out->sequences = cache->live_count;
    out->pages_total = cache->num_pages;
    out->pages_used = cache->num_pages - cache->free_count;
    for (i = 0; i < d->max_sequences; i++) {
        if (!cache->live[i]) continue;
        for (l = 0; l < d->num_layers; l++) {
            int32_t len = cache->length[(size_t)i * d->num_layers + l];
            int32_t comp = mustafar__cache_compressed(cache, len);
            out->token_vectors += (int64_t)len * d->num_kv_heads;
            out->compressed_vectors += (int64_t)comp * d->num_kv_heads;
            windowed += (int64_t)(len - comp) * d->num_kv_heads;
        }
    }
    dense_vector_bytes = (int64_t)d->head_dim * 2;
    out->record_bytes = out->compressed_vectors * (int64_t)(L->k_record + L->v_record) +
                        windowed * 2 * dense_vector_bytes;
    out->dense_bytes = out->token_vectors * 2 * dense_vector_bytes;
    out->reserved_bytes = out->pages_used * (int64_t)(cache->k_layer_bytes + cache->v_layer_bytes) /
                              cache->num_pages * d->num_layers +
                          (int64_t)cache->live_count * d->num_layers * d->dense_window *
                              d->num_kv_heads * 2 * dense_vector_bytes;
    out->allocated_bytes = (int64_t)mustafar__cache_allocated_bytes(cache);
    out->compression_ratio = out->dense_bytes ? (double)out->record_bytes / out->dense_bytes : 0.0;
    return MUSTAFAR_OK;
}

/* ---- save and restore ------------------------------------------------------------
   Stream (little-endian; every field written byte by byte):
     header   "MUSTAFKV" | u32 stream version | u32 record format version |
              u32 library version (major << 16 | minor << 8 | patch) |
              u32 layers, kv heads, q heads, head_dim, dtype, K kept, V kept,
              dense window | u32 sequences | u64 reserved (0) |
              u64 FNV-1a of the header's first 64 bytes (72 bytes in all)
     per sequence
              "SEQ1" | u32 length of each layer | u64 payload bytes | payload |
              u64 FNV-1a of the section so far
     payload  per layer: K records [compressed][Hkv][K record bytes], V records,
              K window tokens [length - compressed][Hkv][D] fp16/bf16, V window
   Records are the format of CONCEPTS, so a stream saved on one backend loads
   on the other bit for bit.  A load reads and checks the whole stream
   (versions, description, lengths, checksums, free sequences and pages)
   before it changes the cache. */

#define MUSTAFAR__STREAM_VERSION 1u
#define MUSTAFAR__STREAM_HEADER_BYTES 72
#define MUSTAFAR__FNV_OFFSET 1469598103934665603ull

static void mustafar__put_u32(unsigned char *p, uint32_t x)
{
    p[0] = (unsigned char)x; p[1] = (unsigned char)(x >> 8);
    p[2] = (unsigned char)(x >> 16); p[3] = (unsigned char)(x >> 24);
}
static void mustafar__put_u64(unsigned char *p, uint64_t x)
{
    mustafar__put_u32(p, (uint32_t)x);
    mustafar__put_u32(p + 4, (uint32_t)(x >> 32));
}
static uint32_t mustafar__get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t mustafar__get_u64(const unsigned char *p)
{
    return (uint64_t)mustafar__get_u32(p) | (uint64_t)mustafar__get_u32(p + 4) << 32;
}

/* The cache description as the stream's header stores it. */
static void mustafar__stream_header(const mustafar_cache *c, uint32_t sequences, unsigned char *h)
{
    const mustafar_cache_desc *d = &c->desc;
    const uint32_t fields[12] = {
        MUSTAFAR__STREAM_VERSION, MUSTAFAR_FORMAT_VERSION,
        MUSTAFAR_VERSION_MAJOR << 16 | MUSTAFAR_VERSION_MINOR << 8 | MUSTAFAR_VERSION_PATCH,
        (uint32_t)d->num_layers, (uint32_t)d->num_kv_heads, (uint32_t)d->num_q_heads,
        (uint32_t)d->head_dim, (uint32_t)d->dtype, (uint32_t)c->layout.k_kept,
        (uint32_t)c->layout.v_kept, (uint32_t)d->dense_window, sequences};
    int i;
    memcpy(h, "MUSTAFKV", 8);
    for (i = 0; i < 12; i++) mustafar__put_u32(h + 8 + 4 * i, fields[i]);
    mustafar__put_u64(h + 56, 0);   /* reserved */
    mustafar__put_u64(h + 64, mustafar__fnv1a(MUSTAFAR__FNV_OFFSET, h, 64));
}

/* Payload bytes of one sequence with the given layer lengths. */
static uint64_t mustafar__stream_payload(const mustafar_cache *c, const int32_t *lengths)
{
    const mustafar__layout *L = &c->layout;
    uint64_t bytes = 0;
    int l;
    for (l = 0; l < c->desc.num_layers; l++) {
        const int32_t comp = lengths[l] > L->window ? lengths[l] - L->window : 0;
        bytes += (uint64_t)comp * L->num_kv_heads * (L->k_record + L->v_record) +
                 (uint64_t)(lengths[l] - comp) * L->num_kv_heads * L->head_dim * 4;
    }
    return bytes;
}

static uint64_t mustafar__stream_section_bytes(const mustafar_cache *c, const int32_t *lengths)
{
    return 4 + 4 * (uint64_t)c->desc.num_layers + 8 + mustafar__stream_payload(c, lengths) + 8;
}

typedef struct mustafar__writer {
    mustafar_write_fn write;
    void *user;
    uint64_t hash;
    int failed;
} mustafar__writer;

static void mustafar__emit(mustafar__writer *w, const void *data, size_t bytes)
{
    if (w->failed || !bytes) return;
    w->hash = mustafar__fnv1a(w->hash, data, bytes);
    if (w->write(w->user, data, bytes) != bytes) w->failed = 1;
}

/* Writes one sequence's section: records and window tokens copied out of
   backend memory one page (or one window row) at a time. */
static mustafar_status mustafar__save_sequence(mustafar_cache *c, int id, mustafar__writer *w)
{
    const mustafar__layout *L = &c->layout;
    const int layers = c->desc.num_layers, hkv = L->num_kv_heads, ps = L->page_size;
    const int32_t *lengths = c->length + (size_t)id * layers;
    const size_t row_elems = (size_t)hkv * L->head_dim;
    const size_t k_page = (size_t)hkv * ps * L->k_record, v_page = (size_t)hkv * ps * L->v_record;
    const size_t ring = (size_t)L->window * row_elems * 2;
    size_t scratch_bytes = k_page > v_page ? k_page : v_page;
    unsigned char head[8], *scratch;
    mustafar_status st = MUSTAFAR_OK;
    int l, kv;
    if (ring > scratch_bytes) scratch_bytes = ring;
    scratch = (unsigned char *)mustafar__calloc(scratch_bytes);
    if (!scratch) return mustafar__fail(c->ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    w->hash = MUSTAFAR__FNV_OFFSET;
    mustafar__emit(w, "SEQ1", 4);
    for (l = 0; l < layers; l++) {
        mustafar__put_u32(head, (uint32_t)lengths[l]);
        mustafar__emit(w, head, 4);
    }
    mustafar__put_u64(head, mustafar__stream_payload(c, lengths));
    mustafar__emit(w, head, 8);
    for (l = 0; l < layers && !st; l++) {
        const int32_t len = lengths[l], comp = len > L->window ? len - L->window : 0;
        for (kv = 0; kv < 2 && !st; kv++) {           /* records: K, then V */
            const size_t rec = kv ? L->v_record : L->k_record, page_bytes = kv ? v_page : k_page;
            const unsigned char *pool = (kv ? c->v_pool : c->k_pool) +
                                        (kv ? c->v_layer_bytes : c->k_layer_bytes) * l;
            int32_t page, p, h;
            for (page = 0; page < (int32_t)mustafar__pages_for(comp, ps) && !st; page++) {
                const int32_t id_in_pool = c->table[(size_t)id * c->pages_per_sequence + page];
                st = mustafar__backend_download(c->ctx, scratch, pool + page_bytes * id_in_pool,
                                                page_bytes);
                for (p = page * ps; p < comp && p < (page + 1) * ps && !st; p++)
                    for (h = 0; h < hkv; h++)
                        mustafar__emit(w, scratch + ((size_t)h * ps + p % ps) * rec, rec);
            }
        }
        for (kv = 0; kv < 2 && !st && len > comp; kv++) {   /* window tokens: K, then V */
            const uint16_t *win = (kv ? c->v_window : c->k_window) +
                                  c->window_layer_elems * l + (size_t)id * L->window * row_elems;
            int32_t p;
            st = mustafar__backend_download(c->ctx, scratch, win, ring);
            for (p = comp; p < len && !st; p++)
                mustafar__emit(w, scratch + (size_t)(p % L->window) * row_elems * 2, row_elems * 2);
        }
    }
    MUSTAFAR_FREE(scratch);
    if (st) return st;
    mustafar__put_u64(head, w->hash);
    mustafar__emit(w, head, 8);
    return MUSTAFAR_OK;
}

MUSTAFAR_API mustafar_status mustafar_cache_save(mustafar_cache *cache, int seq_id,
                                                 mustafar_write_fn write, void *user)
{
    unsigned char header[MUSTAFAR__STREAM_HEADER_BYTES];
    mustafar__writer w;
    mustafar_status st = mustafar__cache_usable(cache, cache);
    int i, count = 0;
    if (st) return st;
    if (!write) return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_NULL_POINTER, "write is NULL");
    if (seq_id != -1 && !mustafar__cache_live(cache, seq_id))
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_UNKNOWN_SEQUENCE,
                              "sequence %d is not in the cache", seq_id);
    for (i = 0; i < cache->desc.max_sequences; i++)
        count += seq_id == -1 ? cache->live[i] : i == seq_id;
    mustafar__stream_header(cache, (uint32_t)count, header);
    w.write = write;
    w.user = user;
    w.hash = MUSTAFAR__FNV_OFFSET;
    w.failed = 0;
    mustafar__emit(&w, header, sizeof header);
    for (i = 0; i < cache->desc.max_sequences && !st; i++)
        if (seq_id == -1 ? cache->live[i] : i == seq_id) st = mustafar__save_sequence(cache, i, &w);
    if (!st && w.failed)
        st = mustafar__fail(cache->ctx, MUSTAFAR_ERROR_IO, "the write callback wrote less than asked");
    return st;
}

MUSTAFAR_API mustafar_status mustafar_cache_save_size(const mustafar_cache *cache, int seq_id,
                                                      size_t *bytes)
{
    mustafar_status st = mustafar__cache_usable(cache, bytes);
    uint64_t total = MUSTAFAR__STREAM_HEADER_BYTES;
    int i;
    if (st) return st;
    if (seq_id != -1 && !mustafar__cache_live(cache, seq_id))
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_UNKNOWN_SEQUENCE,
                              "sequence %d is not in the cache", seq_id);
    for (i = 0; i < cache->desc.max_sequences; i++)
        if (seq_id == -1 ? cache->live[i] : i == seq_id)
            total += mustafar__stream_section_bytes(cache, cache->length +
                                                               (size_t)i * cache->desc.num_layers);
    *bytes = (size_t)total;
    return MUSTAFAR_OK;
}

/* One sequence of a stream being loaded, checked and held in host memory. */
typedef struct mustafar__loaded {
    int32_t *lengths;
    const unsigned char *payload;  /* `owned`, or in place in a memory stream */
    unsigned char *owned;
} mustafar__loaded;

/* In-memory and file streams on top of the callbacks. */
typedef struct mustafar__memory_stream {
    unsigned char *data;
    size_t size, at;
} mustafar__memory_stream;

static size_t mustafar__memory_write(void *user, const void *data, size_t bytes)
{
    mustafar__memory_stream *m = (mustafar__memory_stream *)user;
    if (bytes > m->size - m->at) return 0;
    memcpy(m->data + m->at, data, bytes);
    m->at += bytes;
    return bytes;
}
static size_t mustafar__memory_read(void *user, void *data, size_t bytes)
{
    mustafar__memory_stream *m = (mustafar__memory_stream *)user;
    if (bytes > m->size - m->at) bytes = m->size - m->at;
    memcpy(data, m->data + m->at, bytes);
    m->at += bytes;
    return bytes;
}

static size_t mustafar__read_all(mustafar_read_fn read, void *user, void *data, size_t bytes)
{
    size_t got = 0, n;
    while (got < bytes && (n = read(user, (unsigned char *)data + got, bytes - got)) > 0) got += n;
    return got;
}

/* Checks a stream's header against the cache; returns the sequence count. */
static mustafar_status mustafar__load_header(mustafar_cache *c, const unsigned char *h,
                                             uint32_t *sequences)
{
    unsigned char expect[MUSTAFAR__STREAM_HEADER_BYTES];
    static const char *const names[] = {"layers", "kv heads", "q heads", "head_dim", "dtype",
                                        "K kept count", "V kept count", "dense window"};
    int i;
    if (memcmp(h, "MUSTAFKV", 8))
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE, "not a mustafar cache stream");
    if (mustafar__get_u64(h + 64) != mustafar__fnv1a(MUSTAFAR__FNV_OFFSET, h, 64))
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE, "header checksum mismatch");
    if (mustafar__get_u32(h + 8) != MUSTAFAR__STREAM_VERSION ||
        mustafar__get_u32(h + 12) != MUSTAFAR_FORMAT_VERSION)
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE,
                              "stream version %u, record format %u; this library reads %u, %u",
                              mustafar__get_u32(h + 8), mustafar__get_u32(h + 12),
                              MUSTAFAR__STREAM_VERSION, MUSTAFAR_FORMAT_VERSION);
    mustafar__stream_header(c, 0, expect);
    for (i = 0; i < 8; i++)
        if (mustafar__get_u32(h + 20 + 4 * i) != mustafar__get_u32(expect + 20 + 4 * i))
            return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE,
                                  "the stream's %s is %u, the cache's %u", names[i],
                                  mustafar__get_u32(h + 20 + 4 * i),
                                  mustafar__get_u32(expect + 20 + 4 * i));
    *sequences = mustafar__get_u32(h + 52);
    return MUSTAFAR_OK;
}

/* Reads and checks one section into host memory. */
static mustafar_status mustafar__load_section(mustafar_cache *c, mustafar_read_fn read, void *user,
                                              uint32_t index, mustafar__loaded *out)
{
    const int layers = c->desc.num_layers;
    unsigned char head[8];
    uint64_t hash = MUSTAFAR__FNV_OFFSET, payload;
    unsigned char *raw;
    int l;
    if (mustafar__read_all(read, user, head, 4) != 4 || memcmp(head, "SEQ1", 4))
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE,
                              "sequence %u: section missing or truncated", index);
    hash = mustafar__fnv1a(hash, head, 4);
    raw = (unsigned char *)mustafar__calloc(4 * (size_t)layers);
    out->lengths = (int32_t *)mustafar__calloc(sizeof(int32_t) * (size_t)layers);
    if (!raw || !out->lengths) {
        MUSTAFAR_FREE(raw);
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    }
    if (mustafar__read_all(read, user, raw, 4 * (size_t)layers) != 4 * (size_t)layers) {
        MUSTAFAR_FREE(raw);
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE,
                              "sequence %u: truncated", index);
    }
    hash = mustafar__fnv1a(hash, raw, 4 * (size_t)layers);
    for (l = 0; l < layers; l++) {
        uint32_t len = mustafar__get_u32(raw + 4 * l);
        if (len > (uint32_t)c->desc.max_sequence_length) {
            MUSTAFAR_FREE(raw);
            return mustafar__fail(c->ctx, MUSTAFAR_ERROR_SEQUENCE_TOO_LONG,
                                  "sequence %u: layer %d holds %u tokens; max_sequence_length is %d",
                                  index, l, len, c->desc.max_sequence_length);
        }
        out->lengths[l] = (int32_t)len;
    }
    MUSTAFAR_FREE(raw);
    if (mustafar__read_all(read, user, head, 8) != 8)
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE, "sequence %u: truncated", index);
    hash = mustafar__fnv1a(hash, head, 8);
    payload = mustafar__get_u64(head);
    if (payload != mustafar__stream_payload(c, out->lengths) || payload > (uint64_t)SIZE_MAX / 2)
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE,
                              "sequence %u: payload size does not match its lengths", index);
    if (read == mustafar__memory_read) {
        /* load_memory: the payload is checked and read where it is, not copied */
        mustafar__memory_stream *m = (mustafar__memory_stream *)user;
        if (payload > m->size - m->at)
            return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE, "sequence %u: truncated", index);
        out->payload = m->data + m->at;
        m->at += (size_t)payload;
    } else {
        out->owned = (unsigned char *)MUSTAFAR_MALLOC(payload ? (size_t)payload : 1);
        if (!out->owned)
            return mustafar__fail(c->ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY,
                                  "host allocation of %llu bytes failed", (unsigned long long)payload);
        out->payload = out->owned;
        if (mustafar__read_all(read, user, out->owned, (size_t)payload) != (size_t)payload)
            return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE, "sequence %u: truncated", index);
    }
    if (mustafar__read_all(read, user, head, 8) != 8)
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE, "sequence %u: truncated", index);
    hash = mustafar__fnv1a(hash, out->payload, (size_t)payload);
    if (mustafar__get_u64(head) != hash)
        return mustafar__fail(c->ctx, MUSTAFAR_ERROR_INVALID_FILE,
                              "sequence %u: checksum mismatch", index);
    return MUSTAFAR_OK;
}

/* Writes a checked sequence into a new row of the cache: whole pages and
   window rings are assembled on the host and uploaded at once. */
static mustafar_status mustafar__load_commit(mustafar_cache *c, int id, const mustafar__loaded *s)
{
    const mustafar__layout *L = &c->layout;
    const int layers = c->desc.num_layers, hkv = L->num_kv_heads, ps = L->page_size;
    const size_t row_elems = (size_t)hkv * L->head_dim, ring = (size_t)L->window * row_elems * 2;
    const size_t k_page = (size_t)hkv * ps * L->k_record, v_page = (size_t)hkv * ps * L->v_record;
    size_t scratch_bytes = k_page > v_page ? k_page : v_page;
    const unsigned char *in = s->payload;
    int32_t need = 0, page, *row = c->table + (size_t)id * c->pages_per_sequence;
    unsigned char *scratch;
    mustafar_status st = MUSTAFAR_OK;
    int l, kv;
    if (ring > scratch_bytes) scratch_bytes = ring;
    for (l = 0; l < layers; l++) {
        int32_t comp = s->lengths[l] > L->window ? s->lengths[l] - L->window : 0;
        if ((int32_t)mustafar__pages_for(comp, ps) > need) need = (int32_t)mustafar__pages_for(comp, ps);
    }
    scratch = (unsigned char *)mustafar__calloc(scratch_bytes);
    if (!scratch) return mustafar__fail(c->ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    for (page = 0; page < need; page++) row[page] = c->free_pages[--c->free_count];
    c->pages_held[id] = need;
    for (l = 0; l < layers && !st; l++) {
        const int32_t len = s->lengths[l], comp = len > L->window ? len - L->window : 0;
        for (kv = 0; kv < 2 && !st; kv++) {
            const size_t rec = kv ? L->v_record : L->k_record, page_bytes = kv ? v_page : k_page;
            unsigned char *pool = (kv ? c->v_pool : c->k_pool) +
                                  (kv ? c->v_layer_bytes : c->k_layer_bytes) * l;
            int32_t p, h;
            for (page = 0; page < (int32_t)mustafar__pages_for(comp, ps) && !st; page++) {
                memset(scratch, 0, page_bytes);
                for (p = page * ps; p < comp && p < (page + 1) * ps; p++)
                    for (h = 0; h < hkv; h++, in += rec)
                        memcpy(scratch + ((size_t)h * ps + p % ps) * rec, in, rec);
                st = mustafar__backend_upload(c->ctx, pool + page_bytes * row[page], scratch,
                                              page_bytes);
            }
        }
        for (kv = 0; kv < 2 && !st && len > comp; kv++) {
            uint16_t *win = (kv ? c->v_window : c->k_window) + c->window_layer_elems * l +
                            (size_t)id * L->window * row_elems;
            int32_t p;
            memset(scratch, 0, ring);
            for (p = comp; p < len; p++, in += row_elems * 2)
                memcpy(scratch + (size_t)(p % L->window) * row_elems * 2, in, row_elems * 2);
            st = mustafar__backend_upload(c->ctx, win, scratch, ring);
        }
    }
    if (!st && c->table_device != c->table && need)
        st = mustafar__backend_upload(c->ctx, c->table_device + (size_t)id * c->pages_per_sequence,
                                      row, sizeof(int32_t) * (size_t)need);
    MUSTAFAR_FREE(scratch);
    if (!st) memcpy(c->length + (size_t)id * layers, s->lengths, sizeof(int32_t) * (size_t)layers);
    return st;
}

MUSTAFAR_API mustafar_status mustafar_cache_load(mustafar_cache *cache, mustafar_read_fn read,
                                                 void *user, int *seq_ids, int max_ids, int *count)
{
    unsigned char header[MUSTAFAR__STREAM_HEADER_BYTES];
    mustafar__loaded *seqs = NULL;
    uint32_t n = 0, i, loaded = 0;
    int64_t pages = 0;
    mustafar_status st = mustafar__cache_usable(cache, cache);
    if (st) return st;
    if (!read) return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_NULL_POINTER, "read is NULL");
    if (count) *count = 0;
    if (mustafar__read_all(read, user, header, sizeof header) != sizeof header)
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_INVALID_FILE,
                              "stream shorter than its header");
    st = mustafar__load_header(cache, header, &n);
    if (st) return st;
    if (n > (uint32_t)(cache->desc.max_sequences - cache->live_count))
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_TOO_MANY_SEQUENCES,
                              "the stream holds %u sequences; %d are free", n,
                              cache->desc.max_sequences - cache->live_count);
    if (max_ids < 0 || n > (uint32_t)max_ids || (n && !seq_ids))
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                              "the stream holds %u sequences; seq_ids has room for %d", n,
                              seq_ids ? max_ids : 0);
    seqs = (mustafar__loaded *)mustafar__calloc(sizeof *seqs * (n ? n : 1));
    if (!seqs) return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_OUT_OF_MEMORY, "host allocation failed");
    for (i = 0; i < n && !st; i++) {
        int l;
        int32_t most = 0;
        st = mustafar__load_section(cache, read, user, i, &seqs[i]);
        for (l = 0; !st && l < cache->desc.num_layers; l++)
            if (seqs[i].lengths[l] > most) most = seqs[i].lengths[l];
        if (!st) pages += mustafar__pages_for(most > cache->desc.dense_window
                                                  ? most - cache->desc.dense_window : 0,
                                              cache->desc.page_size);
    }
    if (!st && pages > cache->free_count)
        st = mustafar__fail(cache->ctx, MUSTAFAR_ERROR_POOL_FULL,
                            "the stream needs %lld pages; %d are free", (long long)pages,
                            cache->free_count);
    /* checked: from here on only the backend can fail, and a failure removes
       what was added */
    for (i = 0; i < n && !st; i++) {
        int id;
        mustafar_cache_add_sequence(cache, &id);
        seq_ids[i] = id;
        loaded = i + 1;
        st = mustafar__load_commit(cache, id, &seqs[i]);
    }
    if (st)
        for (i = 0; i < loaded; i++) mustafar_cache_remove_sequence(cache, seq_ids[i]);
    else if (count)
        *count = (int)n;
    for (i = 0; i < n; i++) {
        MUSTAFAR_FREE(seqs[i].lengths);
        MUSTAFAR_FREE(seqs[i].owned);
    }
    MUSTAFAR_FREE(seqs);
    return st;
}

static size_t mustafar__file_write(void *user, const void *data, size_t bytes)
{
    return fwrite(data, 1, bytes, (FILE *)user);
}
static size_t mustafar__file_read(void *user, void *data, size_t bytes)
{
    return fread(data, 1, bytes, (FILE *)user);
}

MUSTAFAR_API mustafar_status mustafar_cache_save_memory(mustafar_cache *cache, int seq_id,
                                                        void *buffer, size_t capacity,
                                                        size_t *written)
{
    mustafar__memory_stream m;
    size_t need = 0;
    mustafar_status st = mustafar_cache_save_size(cache, seq_id, &need);
    if (st) return st;
    if (!buffer || capacity < need)
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT,
                              "the buffer holds %zu bytes; the stream needs %zu", capacity, need);
    m.data = (unsigned char *)buffer;
    m.size = capacity;
    m.at = 0;
    st = mustafar_cache_save(cache, seq_id, mustafar__memory_write, &m);
    if (!st && written) *written = m.at;
    return st;
}

MUSTAFAR_API mustafar_status mustafar_cache_load_memory(mustafar_cache *cache, const void *buffer,
                                                        size_t bytes, int *seq_ids, int max_ids,
                                                        int *count)
{
    mustafar__memory_stream m;
    mustafar_status st = mustafar__cache_usable(cache, buffer);
    if (st) return st;
    int got = 0, i;
    m.data = (unsigned char *)(uintptr_t)buffer;
    m.size = bytes;
    m.at = 0;
    if (count) *count = 0;
    st = mustafar_cache_load(cache, mustafar__memory_read, &m, seq_ids, max_ids, &got);
    if (!st && m.at != bytes) {
        for (i = 0; i < got; i++) mustafar_cache_remove_sequence(cache, seq_ids[i]);
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_INVALID_FILE,
                              "%zu bytes after the end of the stream", bytes - m.at);
    }
    if (!st && count) *count = got;
    return st;
}

/* Written to a temporary name, then renamed over `path`: a crash mid-write
   never leaves a partial file under the real name. */
MUSTAFAR_API mustafar_status mustafar_cache_save_file(mustafar_cache *cache, int seq_id,
                                                      const char *path)
{
    char tmp[1100];
    FILE *f;
    mustafar_status st = mustafar__cache_usable(cache, path);
    if (st) return st;
    if (strlen(path) > 1000)
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_INVALID_ARGUMENT, "path too long");
    mustafar__snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (!(f = mustafar__fopen(tmp, "wb")))
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_IO, "cannot create %s", tmp);
    st = mustafar_cache_save(cache, seq_id, mustafar__file_write, f);
    if (fclose(f) != 0 && !st) st = mustafar__fail(cache->ctx, MUSTAFAR_ERROR_IO, "writing %s failed", tmp);
    if (!st && !mustafar__replace_file(tmp, path))
        st = mustafar__fail(cache->ctx, MUSTAFAR_ERROR_IO, "cannot rename %s to %s", tmp, path);
    if (st) mustafar__remove(tmp);
    return st;
}

MUSTAFAR_API mustafar_status mustafar_cache_load_file(mustafar_cache *cache, const char *path,
                                                      int *seq_ids, int max_ids, int *count)
{
    FILE *f;
    int got = 0, i;
    mustafar_status st = mustafar__cache_usable(cache, path);
    if (st) return st;
    if (count) *count = 0;
    if (!(f = mustafar__fopen(path, "rb")))
        return mustafar__fail(cache->ctx, MUSTAFAR_ERROR_IO, "cannot open %s", path);
    st = mustafar_cache_load(cache, mustafar__file_read, f, seq_ids, max_ids, &got);
    if (!st && fgetc(f) != EOF) {
        for (i = 0; i < got; i++) mustafar_cache_remove_sequence(cache, seq_ids[i]);
        st = mustafar__fail(cache->ctx, MUSTAFAR_ERROR_INVALID_FILE,
                            "%s: bytes after the end of the stream", path);
    }
    fclose(f);
    if (!st && count) *count = got;
    return st;
}

/* ==== >>kernel_source: mustafar_kernels.cuh, embedded ============================ */
#ifndef MUSTAFAR_NO_CUDA

/* BEGIN EMBEDDED mustafar_kernels.cuh (generated by amalgamate.py; edit that file instead) */
static const char *const mustafar__kernel_source_pieces[] = {
"/* mustafar_kernels.cuh - CUDA kernels of mustafar.h, compiled at run time by\n"
"   NVRTC (amalgamate.py embeds this file into mustafar.h).  It includes no\n"
"   header: NVRTC has no include path on a user's machine.\n"
"\n"
"   KERNEL MAP\n"
"   Kernels (one NVRTC library per cache shape; mustafar_append_wide in its own,\n"
"   MUSTAFAR_APPEND_WIDE=1, built on the first large append):\n"
"     mustafar_records     stateless prune / compress / decompress (op): reads\n"
"                          in ([count][D] vectors or [count][record]), writes out.\n"
"                          A lane group of D/32 lanes per vector, one bitmap word each;\n"
"                          the kept set's threshold by binary search on magnitude bits.\n"
"     mustafar_append      compresses the positions leaving the window (or arriving\n"
"                          past it) into k_pages/v_pages, writes new pages into\n"
"                          page_table, new tokens into the k_window/v_window ring.\n"
"                          Reads k_in/v_in and the ring; job and page-patch lists in\n"
"                          its parameters (48 jobs, 96 patches) or in global memory.\n"
"     mustafar_append_wide the same body, 30 KB parameter block (128 jobs, 3072\n"
"                          patches) for large appends such as prefill chunks.\n"
"     mustafar_attention   decode attention; block = (sequence, KV head x head block,\n"
"                          split), each warp walking 16-position tiles with its own\n"
"                          online softmax.  Reads q, page_table, k_pages/v_pages\n"
"                          (records staged to shared memory by cp.async, STAGES-1\n"
"                          tiles ahead, decoded into mma fragments), k_window/v_window\n"
"                          and the sequence list (parameters, up to 192, or global).\n"
"                          Writes out (one split) or partial_o/partial_ml per split.\n"
"     mustafar_combine     merges the splits of each (sequence, query head): reads\n"
"                          partial_o/partial_ml, writes out.\n"
"   On sm_90+ append, attention and combine are programmatic dependent launches\n"
"   (griddepcontrol); in a decode step the attention reads the records the append\n"
"   does not write before waiting for it.\n"
"\n"
"   Compile-time constants: -D options written by mustafar__kernel_options()\n"
"   in mustafar.h, one compiled library per cache shape:\n"
"     MUSTAFAR_D             head_dim: 64, 128 or 256\n"
"     MUSTAFAR_BF16          1: bf16 elements, 0: fp16\n"
"     MUSTAFAR_K_KEPT        elements kept per K record (V: MUSTAFAR_V_KEPT)\n"
"     MUSTAFAR_K_RECORD      bytes of a K record (V: MUSTAFAR_V_RECORD), and of\n"
"     MUSTAFAR_DENSE_RECORD  a record that keeps every element\n"
"     MUSTAFAR_K_STAGED      spacing of K records staged in shared memory\n"
"                            (V: MUSTAFAR_V_STAGED)\n"
"     MUSTAFAR_SMEM_ZERO     offset of the attention kernel's 16 zero bytes\n"
"                            in its dynamic shared memory (which ends there)\n"
"     MUSTAFAR_BLOCK_VECTORS token vectors per 256-thread block of the record\n"
"                            and append kernels\n"
"     MUSTAFAR_GROUP         query heads per KV head\n"
"     MUSTAFAR_PAGE_SIZE     token positions per page\n"
"     MUSTAFAR_WARPS         warps per attention block\n"
"     MUSTAFAR_STAGES        tiles of records in flight per warp, plus one (2 or 3)\n"
"     MUSTAFAR_SM            target SM (75, 80, 86, 89, 90, ...)\n"
"     MUSTAFAR_APPEND_WIDE   1: only the wide append kernel (a library of its\n"
"                            own, built when a large append first needs it)\n"
"   The structures the host passes are the CONTRACT block below, generated\n"
"   from mustafar.h.  The record, page, page-table and window layouts are\n"
"   specified once, in the documentation at the top of mustafar.h (CONCEPTS).\n"
"   Scratch of the split attention (element = float, shapes outermost first):\n",
"     partial_o   [nseq][Hq][splits][D] unnormalised\n"
"     partial_ml  [nseq][Hq][splits][2] running max (log2 units), sum */\n"
"\n"
"typedef int int32_t;\n"
"\n"
"/* BEGIN CONTRACT (generated by amalgamate.py from mustafar.h; edit it there) */\n"
"typedef struct mustafar_paged_seq {\n"
"    int32_t row;                   /* page-table row and window row */\n"
"    int32_t num_compressed;        /* positions [0, num_compressed) in pages */\n"
"    int32_t num_window;            /* then this many in the window ring */\n"
"    int32_t reserved;              /* set to 0 */\n"
"} mustafar_paged_seq;\n"
"/* One sequence of an append: positions [old_compressed, new_compressed) are\n"
"   compressed into pages (from the window ring while < old_length, else from\n"
"   the input), then positions [max(old_length, new_compressed), old_length +\n"
"   new_tokens) are copied from the input into the window ring. */\n"
"typedef struct mustafar__append_job {\n"
"    int32_t row, old_length, new_tokens, input_offset;\n"
"    int32_t old_compressed, new_compressed;\n"
"    int32_t compress_offset;       /* exclusive prefix of compressed counts */\n"
"    int32_t window_offset;         /* exclusive prefix of window writes */\n"
"    int32_t pages_before;          /* table entries of the row valid before the call */\n"
"    int32_t first_patch;           /* this row's first new entry in the patch list */\n"
"} mustafar__append_job;\n"
"\n"
"/* Job, patch and sequence lists that fit travel in the kernel parameters\n"
"   instead of being uploaded (an upload puts a copy between two kernels and\n"
"   makes the host wait for the previous upload).  Decode steps use the small\n"
"   append block (cheap to launch), larger appends such as prefill chunks the\n"
"   wide one (30 KB, under the 32 KB limit of kernel parameters).  A count of\n"
"   0 means: the lists are in global memory. */\n"
"#define MUSTAFAR__INLINE_JOBS 48\n"
"#define MUSTAFAR__INLINE_PATCHES 96\n"
"#define MUSTAFAR__WIDE_JOBS 128\n"
"#define MUSTAFAR__WIDE_PATCHES 3072\n"
"#define MUSTAFAR__INLINE_SEQS 192\n"
"typedef struct mustafar__append_inline {\n"
"    int32_t njobs, npatches;\n"
"    mustafar__append_job jobs[MUSTAFAR__INLINE_JOBS];\n"
"    int32_t patches[2 * MUSTAFAR__INLINE_PATCHES];   /* (table index, page id) pairs */\n"
"} mustafar__append_inline;\n"
"typedef struct mustafar__append_wide {\n"
"    int32_t njobs, npatches;\n"
"    mustafar__append_job jobs[MUSTAFAR__WIDE_JOBS];\n"
"    int32_t patches[2 * MUSTAFAR__WIDE_PATCHES];\n"
"} mustafar__append_wide;\n"
"typedef struct mustafar__seqs_inline {\n"
"    int32_t count;\n"
"    mustafar_paged_seq seqs[MUSTAFAR__INLINE_SEQS];\n"
"} mustafar__seqs_inline;\n"
"/* END CONTRACT */\n"
"\n"
"#ifndef MUSTAFAR_APPEND_WIDE\n"
"#define MUSTAFAR_APPEND_WIDE 0\n"
"#endif\n"
"#define D MUSTAFAR_D\n"
"#define BITMAP_BYTES (D / 8)\n"
"#define K_RECORD MUSTAFAR_K_RECORD\n"
"#define V_RECORD MUSTAFAR_V_RECORD\n"
"#define TILE 16                            /* positions per warp tile = mma M/K */\n"
"#define HEAD_ROWS (MUSTAFAR_GROUP < 16 ? MUSTAFAR_GROUP : 16)\n"
"#define NEG_INF (-__int_as_float(0x7f800000))\n"
"/* attention blocks per SM the register budget is sized for: at D = 128 the\n"
"   V popcount decode and a group over 8 heads need 168 registers (3 blocks) */\n"
"#define MIN_BLOCKS                                                                         \\\n"
"    (D == 256 ? 1                                                                          \\\n"
"     : D == 128 && (MUSTAFAR_GROUP > 8 || MUSTAFAR_V_KEPT < D) ? 12 / MUSTAFAR_WARPS : 16 / MUSTAFAR_WARPS)\n"
"\n"
"typedef unsigned short u16;\n"
"typedef unsigned int u32;\n"
"typedef unsigned long long u64;\n"
"\n"
"typedef mustafar__append_job append_job;\n"
"typedef mustafar_paged_seq paged_seq;\n"
"\n"
"/* ---- element conversions ------------------------------------------------- */\n"
"\n"
"__device__ __forceinline__ float to_float(u16 h)\n"
"{\n"
"#if MUSTAFAR_BF16\n"
"    return __int_as_float((u32)h << 16);\n"
"#else\n"
"    float f;\n",
"    asm(\"{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }\" : \"=f\"(f) : \"h\"(h));\n"
"    return f;\n"
"#endif\n"
"}\n"
"\n"
"__device__ __forceinline__ u16 from_float(float f)\n"
"{\n"
"#if MUSTAFAR_BF16\n"
"    u32 x = __float_as_uint(f);\n"
"    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);\n"
"    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);\n"
"#else\n"
"    u16 h;\n"
"    asm(\"{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }\" : \"=h\"(h) : \"f\"(f));\n"
"    return h;\n"
"#endif\n"
"}\n"
"\n"
"/* 2^x by the hardware approximation alone (one MUFU.EX2): exp2f adds a\n"
"   range fix-up (compare, two conditional multiplies) for results below\n"
"   2^-126.  The softmax weights do not need it: they are taken relative to\n"
"   the running maximum, whose own weight is 1, so a weight that flushes to\n"
"   zero was below 2^-126 of the sum. */\n"
"__device__ __forceinline__ float fast_exp2(float x)\n"
"{\n"
"    float y;\n"
"    asm(\"ex2.approx.ftz.f32 %0, %1;\" : \"=f\"(y) : \"f\"(x));\n"
"    return y;\n"
"}\n"
"\n"
"__device__ __forceinline__ u32 pack2(float lo, float hi)\n"
"{\n"
"    return (u32)from_float(lo) | ((u32)from_float(hi) << 16);\n"
"}\n"
"\n"
"/* ---- warp and shared-memory helpers --------------------------------------- */\n"
"\n"
"__device__ __forceinline__ u32 smem_addr(const void *p)\n"
"{\n"
"    return (u32)__cvta_generic_to_shared(p);\n"
"}\n"
"\n"
"/* 16-byte global -> shared copy to shared address `dst`; asynchronous from\n"
"   sm_80 on. */\n"
"__device__ __forceinline__ void copy16(u32 dst, const void *src)\n"
"{\n"
"#if MUSTAFAR_SM >= 80\n"
"    asm volatile(\"cp.async.cg.shared.global [%0], [%1], 16;\" ::\"r\"(dst), \"l\"(src));\n"
"#else\n"
"    const uint4 x = *(const uint4 *)src;\n"
"    asm volatile(\"st.shared.v4.u32 [%0], {%1, %2, %3, %4};\" ::\"r\"(dst), \"r\"(x.x), \"r\"(x.y), \"r\"(x.z),\n"
"                 \"r\"(x.w) : \"memory\");\n"
"#endif\n"
"}\n"
"__device__ __forceinline__ void copy_commit()\n"
"{\n"
"#if MUSTAFAR_SM >= 80\n"
"    asm volatile(\"cp.async.commit_group;\");\n"
"#endif\n"
"}\n"
"/* Waits until at most `pending` committed groups are still in flight. */\n"
"template <int pending> __device__ __forceinline__ void copy_wait()\n"
"{\n"
"#if MUSTAFAR_SM >= 80\n"
"    asm volatile(\"cp.async.wait_group %0;\" ::\"n\"(pending));\n"
"#endif\n"
"}\n"
"\n"
"/* c += a * b for one m16n8k16 tile (a: 16x16 row-major fragment, b: 16x8\n"
"   column fragment, c: 16x8 float), fp32 accumulation.  Before sm_80 (no\n"
"   bf16/k16 mma) the same fragment contract is computed with shuffles. */\n"
"__device__ __forceinline__ void mma_16816(float c[4], const u32 a[4], const u32 b[2])\n"
"{\n"
"#if MUSTAFAR_SM >= 80\n"
"#if MUSTAFAR_BF16\n"
"    asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 \"\n"
"                 \"{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\"\n"
"                 : \"+f\"(c[0]), \"+f\"(c[1]), \"+f\"(c[2]), \"+f\"(c[3])\n"
"                 : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"r\"(b[0]), \"r\"(b[1]));\n"
"#else\n"
"    asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 \"\n"
"                 \"{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\"\n"
"                 : \"+f\"(c[0]), \"+f\"(c[1]), \"+f\"(c[2]), \"+f\"(c[3])\n"
"                 : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"r\"(b[0]), \"r\"(b[1]));\n"
"#endif\n"
"#else\n"
"    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;\n"
"    for (int k = 0; k < 16; k += 2) {\n"
"        /* a[row][k], a[row][k+1] live in lane 4*row + (k%8)/2, register\n"
"           (k >= 8 ? 2 : 0) + (row >= 8); b[k][n] in lane 4*n + (k%8)/2,\n"
"           register k >= 8. */\n"
"        const int src = (k & 7) >> 1, hi = k >= 8;\n"
"        u32 a_lo = __shfl_sync(0xffffffffu, hi ? a[2] : a[0], 4 * g + src);\n"
"        u32 a_hi = __shfl_sync(0xffffffffu, hi ? a[3] : a[1], 4 * g + src);\n"
"        u32 b0 = __shfl_sync(0xffffffffu, hi ? b[1] : b[0], 4 * (2 * t) + src);\n",
"        u32 b1 = __shfl_sync(0xffffffffu, hi ? b[1] : b[0], 4 * (2 * t + 1) + src);\n"
"        float al0 = to_float((u16)a_lo), al1 = to_float((u16)(a_lo >> 16));\n"
"        float ah0 = to_float((u16)a_hi), ah1 = to_float((u16)(a_hi >> 16));\n"
"        float b00 = to_float((u16)b0), b01 = to_float((u16)(b0 >> 16));\n"
"        float b10 = to_float((u16)b1), b11 = to_float((u16)(b1 >> 16));\n"
"        c[0] += al0 * b00 + al1 * b01;\n"
"        c[1] += al0 * b10 + al1 * b11;\n"
"        c[2] += ah0 * b00 + ah1 * b01;\n"
"        c[3] += ah0 * b10 + ah1 * b11;\n"
"    }\n"
"#endif\n"
"}\n"
"\n"
"/* ---- pruning: a group of D/32 lanes per token vector ------------------------\n"
"   Lane j of a group holds channels [32j, 32j+32) as 16 packed pairs, so its\n"
"   keep bits are bitmap word j.  The kept set is the KEPT largest magnitude\n"
"   keys (bits & 0x7fff), ties to the lower channel: a binary search finds\n"
"   the largest threshold t with count(key >= t) >= KEPT, every key above t is\n"
"   kept, then the first ties in channel order.  Counting is SIMD within a\n"
"   register: for a field of n+1 bits holding k < 2^n, k + (2^n - t) sets the\n"
"   field's top bit exactly when k >= t and cannot carry out of the field.\n"
"   The search takes t's bits in three passes, cheapest fields first:\n"
"     bits 14..8  7 steps on 4 byte fields per word (key >> 8)\n"
"     bits  7..1  7 steps on 4 byte fields per word: (key >> 1) & 0x7f for the\n"
"                 keys whose bits 14..8 equal the first pass's result, 0x7f\n"
"                 for keys above it, 0 for keys below\n"
"     bit   0     1 step on the 2 halves of each packed pair. */\n"
"\n"
"#define VEC_LANES (D / 32)                  /* lanes per vector: 2, 4 or 8 */\n"
"#define BLOCK_VECTORS MUSTAFAR_BLOCK_VECTORS /* vectors per 256-thread block */\n"
"static_assert(BLOCK_VECTORS * VEC_LANES == 256, \"MUSTAFAR_BLOCK_VECTORS is 256 / (D / 32)\");\n"
"#define PAIRS 16                            /* packed element pairs per lane */\n"
"\n"
"__device__ __forceinline__ int group_lane()\n"
"{\n"
"    return (threadIdx.x & 31) % VEC_LANES;\n"
"}\n"
"__device__ __forceinline__ int group_sum(int v)\n"
"{\n"
"#pragma unroll\n"
"    for (int o = 1; o < VEC_LANES; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);\n"
"    return v;\n"
"}\n"
"__device__ __forceinline__ int group_exclusive_scan(int v)\n"
"{\n"
"    const int j = group_lane();\n"
"    int s = v;\n"
"#pragma unroll\n"
"    for (int o = 1; o < VEC_LANES; o <<= 1) {\n"
"        const int n = __shfl_up_sync(0xffffffffu, s, o);\n"
"        if (j >= o) s += n;\n"
"    }\n"
"    return s - v;\n"
"}\n"
"\n"
"/* The lane's 32 channels of a vector (16-byte aligned, global memory). */\n"
"__device__ __forceinline__ void load_part(u32 x[PAIRS], const u16 *vec)\n"
"{\n"
"    const uint4 *src = (const uint4 *)(vec + 32 * group_lane());\n"
"#pragma unroll\n"
"    for (int i = 0; i < 4; i++) {\n"
"        const uint4 w = src[i];\n"
"        x[4 * i] = w.x; x[4 * i + 1] = w.y; x[4 * i + 2] = w.z; x[4 * i + 3] = w.w;\n"
"    }\n"
"}\n"
"__device__ __forceinline__ void store_part(u16 *vec, const u32 x[PAIRS])\n"
"{\n"
"    uint4 *dst = (uint4 *)(vec + 32 * group_lane());\n"
"#pragma unroll\n"
"    for (int i = 0; i < 4; i++) dst[i] = make_uint4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);\n"
"}\n"
"\n"
"__device__ __forceinline__ u32 pair_bias(int t)   /* t in [0, 0x8000] */\n"
"{\n"
"    return 0x80008000u - (u32)t * 0x10001u;\n"
"}\n"
"__device__ __forceinline__ u32 byte_bias(int t)   /* t in [0, 0x80] */\n"
"{\n"
"    return 0x80808080u - (u32)t * 0x01010101u;\n"
"}\n"
"/* Number of keys >= t in the vector. */\n"
"__device__ __forceinline__ int count_at_least(const u32 key[PAIRS], int t)\n"
"{\n"
"    const u32 bias = pair_bias(t);\n"
"    u32 acc = 0;                              /* two 16-bit counts */\n"
"#pragma unroll\n"
"    for (int r = 0; r < PAIRS; r++) acc += ((key[r] + bias) & 0x80008000u) >> 15;\n"
"    return group_sum((int)((acc & 0xffffu) + (acc >> 16)));\n"
"}\n",
"/* Number of 7-bit byte fields >= t (t in [1, 127]) in the vector. */\n"
"__device__ __forceinline__ int count_bytes_at_least(const u32 field[PAIRS / 2], int t)\n"
"{\n"
"    const u32 bias = byte_bias(t);\n"
"    u32 acc = 0;                              /* four 8-bit counts */\n"
"#pragma unroll\n"
"    for (int i = 0; i < PAIRS / 2; i++) acc += ((field[i] + bias) & 0x80808080u) >> 7;\n"
"    return group_sum((int)((acc * 0x01010101u) >> 24));\n"
"}\n"
"/* The largest t in [0, 127] with at least `kept` fields >= t. */\n"
"__device__ __forceinline__ int search_bytes(const u32 field[PAIRS / 2], int kept)\n"
"{\n"
"    int t = 0;\n"
"#pragma unroll\n"
"    for (int step = 64; step > 0; step >>= 1)\n"
"        if (count_bytes_at_least(field, t + step) >= kept) t += step;\n"
"    return t;\n"
"}\n"
"/* The lane's keep bits of the keys >= t.  The flags of pair r (bits 15 and\n"
"   31 of key + bias) gather at bits r and 16 + r, one shift-add per pair;\n"
"   then the two halves interleave into channel order. */\n"
"__device__ __forceinline__ u32 bits_at_least(const u32 key[PAIRS], int t)\n"
"{\n"
"    const u32 bias = pair_bias(t);\n"
"    u32 x = 0;\n"
"#pragma unroll\n"
"    for (int r = 0; r < PAIRS; r++) x = (x >> 1) + ((key[r] + bias) & 0x80008000u);\n"
"    x = __byte_perm(x, 0, 0x3120);\n"
"    x = (x & 0xf00ff00fu) | ((x & 0x00f000f0u) << 4) | ((x >> 4) & 0x00f000f0u);\n"
"    x = (x & 0xc3c3c3c3u) | ((x & 0x0c0c0c0cu) << 2) | ((x >> 2) & 0x0c0c0c0cu);\n"
"    return (x & 0x99999999u) | ((x & 0x22222222u) << 1) | ((x >> 1) & 0x22222222u);\n"
"}\n"
"\n"
"/* The lane's keep bits.  Every lane of the warp must call it (shuffles). */\n"
"__device__ __forceinline__ u32 select_kept(const u32 x[PAIRS], int kept)\n"
"{\n"
"    u32 key[PAIRS];\n"
"#pragma unroll\n"
"    for (int r = 0; r < PAIRS; r++) key[r] = x[r] & 0x7fff7fffu;\n"
"    u32 field[PAIRS / 2];\n"
"#pragma unroll\n"
"    for (int i = 0; i < PAIRS / 2; i++) field[i] = __byte_perm(key[2 * i], key[2 * i + 1], 0x7531);\n"
"    const int high = search_bytes(field, kept);\n"
"    const u32 ge = byte_bias(high), gt = byte_bias(high + 1);\n"
"#pragma unroll\n"
"    for (int i = 0; i < PAIRS / 2; i++) {\n"
"        const u32 low = __byte_perm(key[2 * i] >> 1, key[2 * i + 1] >> 1, 0x6420) & 0x7f7f7f7fu;\n"
"        const u32 at = (field[i] + ge) & 0x80808080u, above = (field[i] + gt) & 0x80808080u;\n"
"        field[i] = (low & (at - (at >> 7))) | (above - (above >> 7));\n"
"    }\n"
"    int t = (high << 8) + (search_bytes(field, kept) << 1);\n"
"    if (count_at_least(key, t + 1) >= kept) t += 1;\n"
"    const u32 at_least = bits_at_least(key, t);\n"
"    if (!__any_sync(0xffffffffu, group_sum(__popc(at_least)) > kept)) return at_least;\n"
"    /* some vector has more ties at t than places left: first ties win */\n"
"    const u32 above = bits_at_least(key, t + 1);\n"
"    u32 ties = at_least & ~above, keep = above;\n"
"    int allowed = kept - group_sum(__popc(above)) - group_exclusive_scan(__popc(ties));\n"
"    for (; allowed > 0 && ties; allowed--) {\n"
"        keep |= ties & (0u - ties);\n"
"        ties &= ties - 1u;\n"
"    }\n"
"    return keep;\n"
"}\n"
"\n"
"/* Writes the vector's record (keep bits from select_kept) into the group's\n"
"   shared staging `rec`, then copies it to `dst` (global) in 16-byte stores\n"
"   if `store`.  Every lane of the warp must call it. */\n"
"__device__ __forceinline__ void compress_part(const u32 x[PAIRS], u32 keep, unsigned char *rec,\n"
"                                              int record_bytes, unsigned char *dst, bool store)\n"
"{\n"
"    const int j = group_lane();\n"
"    if (j == 0) *(uint4 *)(rec + record_bytes - 16) = make_uint4(0, 0, 0, 0);  /* padding */\n"
"    __syncwarp();\n"
"    ((u32 *)rec)[j] = keep;\n"
"    u16 *vals = (u16 *)(rec + BITMAP_BYTES) + group_exclusive_scan(__popc(keep));\n"
"#pragma unroll\n"
"    for (int r = 0; r < PAIRS; r++) {\n"
"        if (keep >> (2 * r) & 1u) *vals++ = (u16)x[r];\n"
"        if (keep >> (2 * r + 1) & 1u) *vals++ = (u16)(x[r] >> 16);\n"
"    }\n",
"    __syncwarp();\n"
"    if (store)\n"
"        for (int i = j; i < record_bytes / 16; i += VEC_LANES)\n"
"            ((uint4 *)dst)[i] = ((const uint4 *)rec)[i];\n"
"    __syncwarp();\n"
"}\n"
"\n"
"/* The lane's 32 channels of a record, zeros where pruned.  Reads at most\n"
"   `kept` values, so a corrupt bitmap cannot read past the record. */\n"
"__device__ __forceinline__ void expand_part(u32 x[PAIRS], const unsigned char *rec, int kept)\n"
"{\n"
"    const u32 *words = (const u32 *)rec;\n"
"    const int j = group_lane();\n"
"    int idx = 0;\n"
"    for (int w = 0; w < j; w++) idx += __popc(words[w]);\n"
"    const u32 word = words[j];\n"
"    const u16 *vals = (const u16 *)(rec + BITMAP_BYTES);\n"
"#pragma unroll\n"
"    for (int r = 0; r < PAIRS; r++) {\n"
"        u32 lo = 0, hi = 0;\n"
"        if ((word >> (2 * r) & 1u) && idx < kept) lo = vals[idx++];\n"
"        if ((word >> (2 * r + 1) & 1u) && idx < kept) hi = vals[idx++];\n"
"        x[r] = lo | (hi << 16);\n"
"    }\n"
"}\n"
"\n"
"/* ---- stateless record operations ------------------------------------------ */\n"
"\n"
"#define OP_PRUNE 0\n"
"#define OP_COMPRESS 1\n"
"#define OP_DECOMPRESS 2\n"
"\n"
"#if !MUSTAFAR_APPEND_WIDE\n"
"extern \"C\" __global__ void __launch_bounds__(256) mustafar_records(int op, const void *in, void *out,\n"
"                                                                    long long count)\n"
"{\n"
"    __shared__ __align__(16) unsigned char stage[BLOCK_VECTORS][MUSTAFAR_DENSE_RECORD];\n"
"    const int group = threadIdx.x / VEC_LANES;\n"
"    const long long first = (long long)blockIdx.x * BLOCK_VECTORS + (threadIdx.x & ~31) / VEC_LANES;\n"
"    const long long vec = (long long)blockIdx.x * BLOCK_VECTORS + group;\n"
"    const bool valid = vec < count;\n"
"    if (first >= count) return;               /* whole warp past the end */\n"
"    u32 x[PAIRS];\n"
"    if (op == OP_DECOMPRESS) {\n"
"        if (!valid) return;\n"
"        expand_part(x, (const unsigned char *)in + vec * K_RECORD, MUSTAFAR_K_KEPT);\n"
"        store_part((u16 *)out + vec * D, x);\n"
"        return;\n"
"    }\n"
"#pragma unroll\n"
"    for (int r = 0; r < PAIRS; r++) x[r] = 0;\n"
"    if (valid) load_part(x, (const u16 *)in + vec * D);\n"
"    const u32 keep = select_kept(x, MUSTAFAR_K_KEPT);\n"
"    if (op == OP_COMPRESS) {\n"
"        compress_part(x, keep, stage[group], K_RECORD, (unsigned char *)out + vec * K_RECORD, valid);\n"
"    } else if (valid) {\n"
"#pragma unroll\n"
"        for (int r = 0; r < PAIRS; r++)\n"
"            x[r] &= (keep >> (2 * r) & 1u ? 0xffffu : 0u) | (keep >> (2 * r + 1) & 1u ? 0xffff0000u : 0u);\n"
"        store_part((u16 *)out + vec * D, x);\n"
"    }\n"
"}\n"
"#endif\n"
"\n"
"/* ---- append: compress tokens into pages, fill the dense window -------------\n"
"   Items [0, compress_total) are positions compressed into pages (from the\n"
"   window ring or the input); the rest are positions entering the window.\n"
"   Each (item, KV head) is a unit of work for one lane group: its K and V\n"
"   vectors one after the other (pair_kv, large appends: the item's job,\n"
"   page and ring slot are found once for both), or one of the two (small\n"
"   appends: twice the groups, half the latency).  A new position p goes to\n"
"   ring slot p % window, whose current occupant (the old window position q\n"
"   with the same slot) may be compressed by this same call: then the group\n"
"   that compresses q writes p after it has read the slot (each lane rewrites\n"
"   only the channels it read itself), and the window item of p does nothing.\n"
"   Window entries span at most `window` positions, so each slot receives at\n"
"   most one. */\n"
"\n"
"__device__ __forceinline__ int find_job(const append_job *jobs, int njobs, int g, bool window)\n"
"{\n"
"    int lo = 0, hi = njobs - 1;               /* last job with offset <= g */\n"
"    while (lo < hi) {\n"
"        const int mid = (lo + hi + 1) >> 1;\n"
"        const int off = window ? jobs[mid].window_offset : jobs[mid].compress_offset;\n",
"        if (off <= g) lo = mid; else hi = mid - 1;\n"
"    }\n"
"    return lo;\n"
"}\n"
"\n"
"template <typename Inline>\n"
"__device__ __forceinline__ void append_body(\n"
"    const Inline &inl, const append_job *global_jobs, int njobs, const int *global_patches,\n"
"    int npatches, int compress_total, int window_total, int num_kv_heads, int pair_kv,\n"
"    const u16 *k_in, const u16 *v_in, unsigned char *k_pages, unsigned char *v_pages,\n"
"    int *page_table, int table_stride, u16 *k_window, u16 *v_window, int window)\n"
"{\n"
"    __shared__ __align__(16) unsigned char stage[BLOCK_VECTORS][MUSTAFAR_DENSE_RECORD];\n"
"#if MUSTAFAR_SM >= 90\n"
"    /* A programmatic dependent like the attention: ready early, then waits\n"
"       for the kernel before it (whose reads of the ring this overwrites).\n"
"       The next kernel may start once every block is past the wait: all\n"
"       work queued before this one is then complete, which a decode step's\n"
"       attention relies on to read q and the older records at once. */\n"
"    asm volatile(\"griddepcontrol.wait;\" ::: \"memory\");\n"
"    asm volatile(\"griddepcontrol.launch_dependents;\");\n"
"#endif\n"
"    const append_job *jobs = inl.njobs ? inl.jobs : global_jobs;\n"
"    const int *patches = inl.njobs ? inl.patches : global_patches;\n"
"    const int group = threadIdx.x / VEC_LANES;\n"
"    if (blockIdx.x == 0)\n"
"        for (int i = threadIdx.x; i < npatches; i += blockDim.x)\n"
"            page_table[patches[2 * i]] = patches[2 * i + 1];\n"
"    const long long units = ((long long)compress_total + window_total) * num_kv_heads << (pair_kv ? 0 : 1);\n"
"    const long long first = (long long)blockIdx.x * BLOCK_VECTORS + (threadIdx.x & ~31) / VEC_LANES;\n"
"    const long long unit = (long long)blockIdx.x * BLOCK_VECTORS + group;\n"
"    if (first >= units) return;               /* whole warp past the end */\n"
"    const bool valid = unit < units;\n"
"    const long long item = pair_kv ? unit : unit >> 1;\n"
"    const int kv_first = pair_kv ? 0 : (int)(unit & 1), kv_end = pair_kv ? 2 : kv_first + 1;\n"
"    const int g = (int)(item / num_kv_heads), head = (int)(item % num_kv_heads);\n"
"    const bool compress = valid && g < compress_total;\n"
"\n"
"    /* The record slot and element offsets (-1: none) of this item, the same\n"
"       for K and V: the vector to compress (in the ring or the input), the\n"
"       ring slot written, the input vector written there. */\n"
"    long long slot = 0, source = -1, ring = -1, successor = -1;\n"
"    bool from_ring = false;\n"
"    if (compress) {\n"
"        const append_job j = jobs[find_job(jobs, njobs, g, false)];\n"
"        const int p = j.old_compressed + (g - j.compress_offset);\n"
"        const int page_index = p / MUSTAFAR_PAGE_SIZE;\n"
"        const int page = page_index >= j.pages_before\n"
"                             ? patches[2 * (j.first_patch + page_index - j.pages_before) + 1]\n"
"                             : page_table[(long long)j.row * table_stride + page_index];\n"
"        slot = ((long long)page * num_kv_heads + head) * MUSTAFAR_PAGE_SIZE + p % MUSTAFAR_PAGE_SIZE;\n"
"        if (p < j.old_length) {              /* compressed from the ring */\n"
"            ring = (((long long)j.row * window + p % window) * num_kv_heads + head) * D;\n"
"            source = ring;\n"
"            from_ring = true;\n"
"            const int first_new = j.old_length > j.new_compressed ? j.old_length : j.new_compressed;\n"
"            const int next = first_new + ((p - first_new) % window + window) % window;\n"
"            if (next < j.old_length + j.new_tokens)\n"
"                successor = ((long long)(j.input_offset + next - j.old_length) * num_kv_heads + head) * D;\n"
"        } else {\n"
"            source = ((long long)(j.input_offset + p - j.old_length) * num_kv_heads + head) * D;\n"
"        }\n"
"    } else if (valid) {                       /* enters the window */\n"
"        const int w = g - compress_total;\n",
"        const append_job j = jobs[find_job(jobs, njobs, w, true)];\n"
"        const int first_new = j.old_length > j.new_compressed ? j.old_length : j.new_compressed;\n"
"        const int p = first_new + (w - j.window_offset);\n"
"        const int occupant = j.old_compressed + ((p - j.old_compressed) % window + window) % window;\n"
"        if (!(occupant < j.old_length && occupant < j.new_compressed)) {   /* else written above */\n"
"            successor = ((long long)(j.input_offset + p - j.old_length) * num_kv_heads + head) * D;\n"
"            ring = (((long long)j.row * window + p % window) * num_kv_heads + head) * D;\n"
"        }\n"
"    }\n"
"\n"
"#pragma unroll 1\n"
"    for (int kv = kv_first; kv < kv_end; kv++) {\n"
"        const u16 *in = kv ? v_in : k_in;\n"
"        u16 *ring_base = kv ? v_window : k_window;\n"
"        u32 x[PAIRS];\n"
"#pragma unroll\n"
"        for (int r = 0; r < PAIRS; r++) x[r] = 0;\n"
"        if (compress) load_part(x, (from_ring ? ring_base : in) + source);\n"
"        if (successor >= 0) {                 /* the ring slot's new entry, once the lane has read */\n"
"            u32 y[PAIRS];                     /* its channels of the old one: both loads in flight */\n"
"            load_part(y, in + successor);     /* together (a small append is latency-bound) */\n"
"            store_part(ring_base + ring, y);\n"
"        }\n"
"        if (__any_sync(0xffffffffu, compress)) {\n"
"            const int record = kv ? V_RECORD : K_RECORD;\n"
"            const u32 keep = select_kept(x, kv ? MUSTAFAR_V_KEPT : MUSTAFAR_K_KEPT);\n"
"            compress_part(x, keep, stage[group], record, (kv ? v_pages : k_pages) + slot * record, compress);\n"
"        }\n"
"    }\n"
"}\n"
"\n"
"#define APPEND_KERNEL(name, Params)                                                                 \\\n"
"    extern \"C\" __global__ void __launch_bounds__(256, 4) name(                                      \\\n"
"        const __grid_constant__ Params inl, const append_job *global_jobs, int njobs,              \\\n"
"        const int *global_patches, int npatches, int compress_total, int window_total,             \\\n"
"        int num_kv_heads, int pair_kv, const u16 *k_in, const u16 *v_in, unsigned char *k_pages,   \\\n"
"        unsigned char *v_pages, int *page_table, int table_stride, u16 *k_window,                 \\\n"
"        u16 *v_window, int window)                                                                  \\\n"
"    {                                                                                               \\\n"
"        append_body(inl, global_jobs, njobs, global_patches, npatches, compress_total,             \\\n"
"                    window_total, num_kv_heads, pair_kv, k_in, v_in, k_pages, v_pages, page_table, \\\n"
"                    table_stride, k_window, v_window, window);                                     \\\n"
"    }\n"
"/* 4 blocks (64 registers) per SM: left alone, ptxas gives the K/V loop 77\n"
"   registers and the SM 3 blocks */\n"
"#if MUSTAFAR_APPEND_WIDE\n"
"APPEND_KERNEL(mustafar_append_wide, mustafar__append_wide)\n"
"#else\n"
"APPEND_KERNEL(mustafar_append, mustafar__append_inline)\n"
"#endif\n"
"\n"
"/* ---- decode attention -------------------------------------------------------\n"
"   Block (sequence, KV head x head block, split), MUSTAFAR_WARPS warps.  Each\n"
"   warp walks 16-position tiles of the block's range with its own online\n"
"   softmax: records are staged into shared memory with 16-byte async copies\n"
"   STAGES - 1 tiles ahead and decoded straight into tensor-core fragments in\n"
"   registers; the warps are merged at the end.\n"
"\n"
"   Both products run transposed, so that the query heads (often only 4 or 8\n"
"   per KV head) are the mma's 8-wide N dimension instead of padding its\n"
"   16-high M dimension:\n"
"     S^T = K Q^T    M = 16 positions, N = 8 heads, K = channels\n"
"     O^T = V^T P^T  M = 16 channels,  N = 8 heads, K = 16 positions\n",
"   and P^T comes from S^T by an in-register 8x8 transpose (movmatrix).\n"
"\n"
"   K: channel runs.  A dot product does not depend on the order of its\n"
"   terms, so each thread takes whole runs of channels instead of the mma\n"
"   fragment's interleave, and decodes a run with one popcount: k index\n"
"   {2t, 2t+1, 2t+8, 2t+9} of k-step kk is channel KC*t + 4*kk + {0, 1, 2, 3},\n"
"   thread t owns a run of KC = D/4.\n"
"\n"
"   V: popcount mmas.  Pruned V records (V_KEPT < D) are decoded by\n"
"   single-bit m16n8k128 mmas with AND, rows = channels and columns =\n"
"   records: for channel c of record r one mma gives the shared address of\n"
"   c's value, (start of r's values) + 2 * popc(bitmap_r & bits below c),\n"
"   and another c's bit; a channel pruned away reads a shared zero instead.\n"
"   The output is V^T's A fragment as it is, in the fragment's own channel\n"
"   order (row g of m-tile mm is channel 16*mm + g, row g+8 is 16*mm + g + 8),\n"
"   at one multiply-add, one 16-bit load and half a pack per slot.  Dense V\n"
"   records (V_KEPT == D) are read in runs instead: row g of m-tile mm is\n"
"   channel VC*g + mm, row g+8 is VC*g + D/16 + mm, thread g owns a run of\n"
"   VC = D/8 channels.\n"
"   Lane = 4*g + t as in the mma fragments. */\n"
"\n"
"#define KC (D / 4)\n"
"#define VC (D / 8)\n"
"#define MT (D / 16)                          /* m-tiles of O^T */\n"
"#define NT (MUSTAFAR_GROUP > 8 ? 2 : 1)      /* n-tiles of 8 heads per block */\n"
"#define HEADS_PER_BLOCK (8 * NT)\n"
"#define V_POPC (MUSTAFAR_V_KEPT < D)         /* V decoded by popcount mmas, fragment channel order */\n"
"#if KC > 32\n"
"typedef u64 k_run;                          /* D = 256: a K run is 64 channels */\n"
"#else\n"
"typedef u32 k_run;\n"
"#endif\n"
"\n"
"struct warp_state {\n"
"    float o[NT][MT][4];    /* O^T fragment: rows g, g+8 of m-tile mm (channels above); heads 2t, 2t+1 */\n"
"    float m[NT][2], l[NT][2];  /* running max (log2 units) and partial sums of heads 2t, 2t+1 */\n"
"};\n"
"\n"
"/* Channel of O^T row g (+8 with `high`) of m-tile mm for this thread. */\n"
"__device__ __forceinline__ int o_channel(int mm, bool high)\n"
"{\n"
"    const int g = (threadIdx.x & 31) >> 2;\n"
"#if V_POPC\n"
"    return 16 * mm + g + (high ? 8 : 0);\n"
"#else\n"
"    return VC * g + mm + (high ? MT : 0);\n"
"#endif\n"
"}\n"
"\n"
"#define K_STAGED MUSTAFAR_K_STAGED\n"
"#define V_STAGED MUSTAFAR_V_STAGED\n"
"#define STAGE_BYTES (TILE * (K_STAGED + V_STAGED))\n"
"/* Shared memory, laid out by mustafar__attention_smem on the host: the\n"
"   stages, reused by the merge, 2*D bytes that a corrupt record's decode may\n"
"   read past them, then 16 zero bytes that pruned V channels read. */\n"
"#define LOOP_BYTES (MUSTAFAR_WARPS * MUSTAFAR_STAGES * STAGE_BYTES)\n"
"#define MERGE_BYTES (MUSTAFAR_WARPS * 32 * 4 + MUSTAFAR_WARPS * HEAD_ROWS * D * 4)\n"
"#define ZERO_OFFSET MUSTAFAR_SMEM_ZERO\n"
"static_assert(ZERO_OFFSET >= LOOP_BYTES + 2 * D && ZERO_OFFSET >= MERGE_BYTES + 2 * D,\n"
"              \"MUSTAFAR_SMEM_ZERO leaves room for the stages, the merge and the slack\");\n"
"\n"
"/* Page id for the prefetch of the tile at p0 (0 past `end`), loaded one\n"
"   tile before the copies that need it, so that the page-table latency hides\n"
"   behind a tile of work.  Tiles start at multiples of TILE (the host keeps\n"
"   split chunks multiples of the warp sweep): when TILE divides the page size\n"
"   a tile lies in one page; otherwise lane l holds the page of position\n"
"   p0 + l % 16. */\n"
"__device__ __forceinline__ int lane_page(const int *table, int p0, int end)\n"
"{\n"
"#if MUSTAFAR_PAGE_SIZE % TILE == 0\n"
"    return p0 < end ? table[p0 / MUSTAFAR_PAGE_SIZE] : 0;\n"
"#else\n"
"    const int p = p0 + (threadIdx.x & 15);\n"
"    return p < end ? table[p / MUSTAFAR_PAGE_SIZE] : 0;\n"
"#endif\n"
"}\n"
"\n"
"/* Queues the first `count` records of a tile (all 16 when FULL), each\n"
"   RECORD bytes in global memory and staged STAGED_BYTES apart from shared\n",
"   address `dst` on, as 16-byte chunks: lane l copies chunks l, l + 32, ...,\n"
"   so that one copy instruction of the warp reads 512 contiguous bytes of a\n"
"   page when TILE divides the page size (whole sectors, not one 16-byte\n"
"   piece of 32 records), else runs of consecutive records per page. */\n"
"template <int RECORD, int STAGED_BYTES, bool FULL>\n"
"__device__ __forceinline__ void copy_records(u32 dst, const unsigned char *pages, int page, int p0,\n"
"                                             int count, int head, int num_kv_heads)\n"
"{\n"
"    const int lane = threadIdx.x & 31;\n"
"    const int chunks = RECORD / 16;\n"
"#if MUSTAFAR_PAGE_SIZE % TILE == 0\n"
"    const unsigned char *src = pages + (((long long)page * num_kv_heads + head) * MUSTAFAR_PAGE_SIZE +\n"
"                                        p0 % MUSTAFAR_PAGE_SIZE) * RECORD + 16 * lane;\n"
"#endif\n"
"#pragma unroll\n"
"    for (int i = 0; i < (TILE * chunks + 31) / 32; i++) {\n"
"        const int j = lane + 32 * i, tok = j / chunks;\n"
"#if MUSTAFAR_PAGE_SIZE % TILE != 0\n"
"        const int tok_page = __shfl_sync(0xffffffffu, page, tok & 15);\n"
"        const long long slot = ((long long)tok_page * num_kv_heads + head) * MUSTAFAR_PAGE_SIZE +\n"
"                               (p0 + tok) % MUSTAFAR_PAGE_SIZE;\n"
"        const unsigned char *src = pages + ((slot - tok) * RECORD + 16 * lane);   /* chunk j at src + 512 i */\n"
"#endif\n"
"        if (j < TILE * chunks && (FULL || tok < count))\n"
"            copy16(dst + 16 * j + (STAGED_BYTES - RECORD) * tok, src + 512 * i);\n"
"    }\n"
"}\n"
"\n"
"/* Queues the K and V records of the tile's compressed positions\n"
"   [p0, p0+16) below `end` into the stage at shared address `stage`. */\n"
"__device__ __forceinline__ void prefetch_records(u32 stage, int p0, int end, int page,\n"
"                                                 const unsigned char *k_pages,\n"
"                                                 const unsigned char *v_pages, int head,\n"
"                                                 int num_kv_heads)\n"
"{\n"
"    if (p0 + TILE <= end) {\n"
"        copy_records<K_RECORD, K_STAGED, true>(stage, k_pages, page, p0, TILE, head, num_kv_heads);\n"
"        copy_records<V_RECORD, V_STAGED, true>(stage + TILE * K_STAGED, v_pages, page, p0, TILE, head,\n"
"                                               num_kv_heads);\n"
"    } else {\n"
"        copy_records<K_RECORD, K_STAGED, false>(stage, k_pages, page, p0, end - p0, head, num_kv_heads);\n"
"        copy_records<V_RECORD, V_STAGED, false>(stage + TILE * K_STAGED, v_pages, page, p0, end - p0,\n"
"                                                head, num_kv_heads);\n"
"    }\n"
"}\n"
"\n"
"/* Where a thread's channel run [first, first + N) lies in every record, as\n"
"   lane constants made once per kernel: below[i] is 1 if bitmap word i lies\n"
"   wholly below `first`, else 0; `low` masks the bits of the run's own word\n"
"   below it (runs shorter than 32 channels).  With them a run start takes\n"
"   multiply-adds (FMA pipe) instead of selects (ALU pipe, which the decode\n"
"   slots fill). */\n"
"template <int N>\n"
"struct run_place {\n"
"    int first;\n"
"    int below[D / 32 - 1];\n"
"    u32 low;\n"
"};\n"
"template <int N>\n"
"__device__ __forceinline__ run_place<N> make_run_place(int first)\n"
"{\n"
"    run_place<N> pl;\n"
"    pl.first = first;\n"
"#pragma unroll\n"
"    for (int i = 0; i < D / 32 - 1; i++)   /* through a shuffle: ptxas would turn a known 0/1 factor into a select */\n"
"        pl.below[i] = __shfl_sync(0xffffffffu, (int)(32 * (i + 1) <= first), threadIdx.x & 31);\n"
"    pl.low = (1u << (first % 32)) - 1u;\n"
"    return pl;\n"
"}\n"
"\n"
"/* The run of a staged record (N = 8..64 channels, first a multiple of N):\n"
"   its bits (zero for a position outside the range, `valid` false) and the\n"
"   index of its first kept value.  The bitmap comes in whole 8-byte loads\n"
"   (its last word is not needed); the run's bits and, for runs shorter than\n",
"   a word, its own word are loaded again at their lane-dependent offsets\n"
"   rather than picked from w[], which a runtime index would put in local\n"
"   memory.  Records are trusted to keep exactly KEPT elements; a corrupt one\n"
"   can only make the decode read other bytes of the shared-memory staging\n"
"   (padded for that), never outside it. */\n"
"template <int N, typename R>\n"
"__device__ __forceinline__ int run_start(const unsigned char *rec, const run_place<N> &pl, bool valid, R &bits)\n"
"{\n"
"    static_assert(N == 8 || N == 16 || N == 32 || N == 64, \"runs are 8, 16, 32 or 64 channels\");\n"
"    u32 w[D / 32];\n"
"#pragma unroll\n"
"    for (int i = 0; i < D / 32; i += 2) {\n"
"        const uint2 x = *(const uint2 *)(rec + 4 * i);\n"
"        w[i] = x.x;\n"
"        w[i + 1] = x.y;\n"
"    }\n"
"    int before = 0;\n"
"#pragma unroll\n"
"    for (int i = 0; i < D / 32 - 1; i++) before += __popc(w[i]) * pl.below[i];\n"
"    const unsigned char *own = rec + pl.first / 8;      /* aligned: first is a multiple of N */\n"
"    R b;\n"
"    if (N == 64) b = (R)*(const u64 *)own;\n"
"    else if (N == 32) b = (R)*(const u32 *)own;\n"
"    else if (N == 16) b = (R)*(const u16 *)own;\n"
"    else b = (R)*own;\n"
"    if (N < 32) before += __popc(*(const u32 *)(rec + pl.first / 32 * 4) & pl.low);\n"
"    bits = valid ? b : (R)0;\n"
"    return before;\n"
"}\n"
"\n"
"/* One channel of a staged record: the kept value at shared address `addr`\n"
"   if bit k of the run word is set, else zero; `addr` then moves past a\n"
"   value taken.  Three instructions and the load: the masked bit is both the\n"
"   load's predicate and, shifted, the address step. */\n"
"__device__ __forceinline__ u32 take_value(u32 &addr, u32 word, int k)\n"
"{\n"
"    const u32 bit = word & (1u << k);\n"
"    u32 x;\n"
"    asm(\"{ .reg .pred p; setp.ne.u32 p, %2, 0; mov.u32 %0, 0; @p ld.shared.u16 %0, [%1]; }\"\n"
"        : \"=r\"(x) : \"r\"(addr), \"r\"(bit));\n"
"    addr += (bit >> k) << 1;\n"
"    return x;\n"
"}\n"
"\n"
"/* Two zero-extended 16-bit values as a packed pair, by a multiply-add: the\n"
"   FMA pipe has room, the ALU pipe (where a byte permute runs) does not. */\n"
"__device__ __forceinline__ u32 pack_halves(u32 lo, u32 hi)\n"
"{\n"
"    return hi * 0x10000u + lo;\n"
"}\n"
"\n"
"/* Channels c, c+1 of a run (c even) as a packed pair. */\n"
"__device__ __forceinline__ u32 take_pair(u32 &addr, u32 word, int c)\n"
"{\n"
"    const u32 lo = take_value(addr, word, c % 32);\n"
"    return pack_halves(lo, take_value(addr, word, c % 32 + 1));\n"
"}\n"
"\n"
"/* D = C + popc(A AND B) for single-bit matrices A (16 x 128) and B (128 x\n"
"   8): a[0] holds bits 32t..32t+31 of row g of A, a[1] of row g+8; b bits\n"
"   32t..32t+31 of column g of B; c and d rows g, g+8 and columns 2t, 2t+1\n"
"   as in the fp16 mma.  Before sm_80 (no single-bit mma with AND) the same\n"
"   contract is computed with shuffles. */\n"
"__device__ __forceinline__ void popc_mma(int d[4], const u32 a[2], u32 b, const int c[4])\n"
"{\n"
"#if MUSTAFAR_SM >= 80\n"
"    asm(\"mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc \"\n"
"        \"{%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\"\n"
"        : \"=r\"(d[0]), \"=r\"(d[1]), \"=r\"(d[2]), \"=r\"(d[3])\n"
"        : \"r\"(a[0]), \"r\"(a[1]), \"r\"(b), \"r\"(c[0]), \"r\"(c[1]), \"r\"(c[2]), \"r\"(c[3]));\n"
"#else\n"
"    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;\n"
"#pragma unroll\n"
"    for (int i = 0; i < 4; i++) d[i] = c[i];\n"
"#pragma unroll\n"
"    for (int s = 0; s < 4; s++) {   /* bits 32s..32s+31 of k live in lanes 4 * row + s */\n"
"        const u32 a0 = __shfl_sync(0xffffffffu, a[0], 4 * g + s);\n"
"        const u32 a1 = __shfl_sync(0xffffffffu, a[1], 4 * g + s);\n"
"        const u32 b0 = __shfl_sync(0xffffffffu, b, 8 * t + s);\n"
"        const u32 b1 = __shfl_sync(0xffffffffu, b, 8 * t + 4 + s);\n"
"        d[0] += __popc(a0 & b0);\n"
"        d[1] += __popc(a0 & b1);\n"
"        d[2] += __popc(a1 & b0);\n"
"        d[3] += __popc(a1 & b1);\n",
"    }\n"
"#endif\n"
"}\n"
"\n"
"/* The A operands of the popcount mmas (rows = channels), lane constants\n"
"   made once per kernel: rows g and g+8 of an m-tile with mm % 2 == h are\n"
"   channels 16h + g and 16h + g + 8 of bitmap word mm / 2.  Every lane\n"
"   passes the same bitmap word as its 32 bits of B, so a mask set in lanes\n"
"   t < 2 counts twice (a byte offset) and one set in lane t == 0 once (the\n"
"   channel's own bit):\n"
"     all       every bit                      (lanes t < 2)\n"
"     below[h]  the bits below the row's channel (lanes t < 2)\n"
"     bit[h]    the row's channel               (lane t == 0) */\n"
"struct popc_masks {\n"
"    u32 all[2], below[2][2], bit[2][2];\n"
"};\n"
"__device__ __forceinline__ popc_masks make_popc_masks()\n"
"{\n"
"    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;\n"
"    popc_masks mk;\n"
"    mk.all[0] = mk.all[1] = t < 2 ? ~0u : 0u;\n"
"#pragma unroll\n"
"    for (int h = 0; h < 2; h++)\n"
"#pragma unroll\n"
"        for (int r = 0; r < 2; r++) {\n"
"            const u32 bit = 1u << (16 * h + 8 * r + g);\n"
"            mk.below[h][r] = t < 2 ? bit - 1u : 0u;\n"
"            mk.bit[h][r] = t == 0 ? bit : 0u;\n"
"        }\n"
"    return mk;\n"
"}\n"
"\n"
"/* A tile's 16 staged V records, for the popcount decode (columns =\n"
"   records: n-tile nv holds records 8nv..8nv+7).  w[i][nv]: bitmap word i\n"
"   of record g + 8nv, the mmas' B operand (all zero for a position outside\n"
"   the range, whose channels then all read the shared zero).  start[nv]:\n"
"   the shared address of the current word's first value minus `zero` for\n"
"   records 8nv + 2t and 8nv + 2t + 1 (columns 2t, 2t+1: the rank mma's\n"
"   accumulator input). */\n"
"struct popc_rows {\n"
"    u32 w[D / 32][2];\n"
"    int start[2][4];\n"
"};\n"
"template <int STAGED_BYTES>\n"
"__device__ __forceinline__ void load_popc_rows(popc_rows &pr, const unsigned char *records, bool valid0,\n"
"                                               bool valid1, u32 zero)\n"
"{\n"
"    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;\n"
"#pragma unroll\n"
"    for (int nv = 0; nv < 2; nv++) {\n"
"        const unsigned char *rec = records + (g + 8 * nv) * STAGED_BYTES;\n"
"        const bool valid = nv ? valid1 : valid0;\n"
"#pragma unroll\n"
"        for (int i = 0; i < D / 32; i++) pr.w[i][nv] = valid ? *(const u32 *)(rec + 4 * i) : 0u;\n"
"        const int first = (int)(smem_addr(records + (8 * nv + 2 * t) * STAGED_BYTES + BITMAP_BYTES) - zero);\n"
"        pr.start[nv][0] = pr.start[nv][2] = first;\n"
"        pr.start[nv][1] = pr.start[nv][3] = first + STAGED_BYTES;\n"
"    }\n"
"}\n"
"\n"
"/* Channels 16mm + g (y[nv][0]) and 16mm + g + 8 (y[nv][1]) of records\n"
"   8nv + 2t and 8nv + 2t + 1, as packed pairs; a pruned channel reads the\n"
"   shared zero.  Called for mm = 0, 1, 2, ... in order: the first m-tile of\n"
"   each word moves `start` past the word before, by a popcount mma too.\n"
"   Records are trusted to keep exactly KEPT elements; a corrupt one can\n"
"   only make the decode read other bytes of the shared-memory staging\n"
"   (padded for that), never outside it. */\n"
"__device__ __forceinline__ void decode_mtile(u32 y[2][2], popc_rows &pr, int mm, const popc_masks &mk, u32 zero)\n"
"{\n"
"    const int word = mm / 2, h = mm % 2, none[4] = {0, 0, 0, 0};\n"
"#pragma unroll\n"
"    for (int nv = 0; nv < 2; nv++) {\n"
"        if (h == 0 && word > 0) popc_mma(pr.start[nv], mk.all, pr.w[word - 1][nv], pr.start[nv]);\n"
"        int rank[4], bit[4];\n"
"        popc_mma(rank, mk.below[h], pr.w[word][nv], pr.start[nv]);\n"
"        popc_mma(bit, mk.bit[h], pr.w[word][nv], none);\n"
"        u32 v[4];\n"
"#pragma unroll\n"
"        for (int i = 0; i < 4; i++) {\n"
"            const u32 addr = (u32)(bit[i] * rank[i]) + zero;\n"
"            asm(\"ld.shared.u16 %0, [%1];\" : \"=r\"(v[i]) : \"r\"(addr));\n"
"        }\n"
"        y[nv][0] = pack_halves(v[0], v[1]);\n"
"        y[nv][1] = pack_halves(v[2], v[3]);\n"
"    }\n"
"}\n"
"\n",
"/* The decode's lane constants, made once per kernel. */\n"
"struct decode_consts {\n"
"    run_place<KC> k_place;     /* this thread's K run */\n"
"    popc_masks mk;             /* the popcount mmas' A operands (V) */\n"
"    u32 zero;                  /* shared address of the 16 zero bytes */\n"
"};\n"
"\n"
"__device__ __forceinline__ u32 transpose8x8(u32 x)\n"
"{\n"
"    u32 y;\n"
"    asm volatile(\"movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\" : \"=r\"(y) : \"r\"(x));\n"
"    return y;\n"
"}\n"
"\n"
"/* Q^T fragments (B operand) of the KC-channel run of this thread: head\n"
"   8*nt + g of the block, zero past `rows`. */\n"
"__device__ __forceinline__ void load_q(u32 qb[NT][MT][2], const u16 *q, int rows)\n"
"{\n"
"    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;\n"
"#pragma unroll\n"
"    for (int nt = 0; nt < NT; nt++)\n"
"#pragma unroll\n"
"        for (int kk = 0; kk < MT; kk++) {\n"
"            uint2 x = make_uint2(0, 0);\n"
"            if (8 * nt + g < rows) x = *(const uint2 *)(q + (8 * nt + g) * D + KC * t + 4 * kk);\n"
"            qb[nt][kk][0] = x.x;\n"
"            qb[nt][kk][1] = x.y;\n"
"        }\n"
"}\n"
"\n"
"/* S^T tile: rows g, g+8 are positions p0 + g, p0 + g + 8; scaled to log2\n"
"   units; with EDGE, positions outside [lo, hi) get -inf. */\n"
"template <bool EDGE>\n"
"__device__ __forceinline__ void scale_and_mask(float s[NT][4], float scale_log2, int p0, int lo, int hi)\n"
"{\n"
"    const int g = (threadIdx.x & 31) >> 2;\n"
"#pragma unroll\n"
"    for (int nt = 0; nt < NT; nt++)\n"
"#pragma unroll\n"
"        for (int i = 0; i < 4; i++) {\n"
"            const int p = p0 + g + (i >= 2 ? 8 : 0);\n"
"            s[nt][i] = !EDGE || (p >= lo && p < hi) ? s[nt][i] * scale_log2 : NEG_INF;\n"
"        }\n"
"}\n"
"\n"
"/* S^T accumulates in two chains (even and odd k-steps): half the HMMA\n"
"   latency on the critical path. */\n"
"struct score_chains {\n"
"    float c[2][NT][4];\n"
"};\n"
"__device__ __forceinline__ void chains_clear(score_chains &acc)\n"
"{\n"
"#pragma unroll\n"
"    for (int k = 0; k < 2; k++)\n"
"#pragma unroll\n"
"        for (int nt = 0; nt < NT; nt++)\n"
"#pragma unroll\n"
"            for (int i = 0; i < 4; i++) acc.c[k][nt][i] = 0.0f;\n"
"}\n"
"__device__ __forceinline__ void chains_mma(score_chains &acc, int kk, const u32 a[4],\n"
"                                           const u32 qb[NT][MT][2])\n"
"{\n"
"#pragma unroll\n"
"    for (int nt = 0; nt < NT; nt++) mma_16816(acc.c[kk & 1][nt], a, qb[nt][kk]);\n"
"}\n"
"__device__ __forceinline__ void chains_sum(float s[NT][4], const score_chains &acc)\n"
"{\n"
"#pragma unroll\n"
"    for (int nt = 0; nt < NT; nt++)\n"
"#pragma unroll\n"
"        for (int i = 0; i < 4; i++) s[nt][i] = acc.c[0][nt][i] + acc.c[1][nt][i];\n"
"}\n"
"\n"
"/* S^T for a tile whose K rows g and g+8 are dense: `row[r]` points at the\n"
"   K vector of row r, or is null for a position outside the range. */\n"
"__device__ __forceinline__ void scores_dense(float s[NT][4], const u32 qb[NT][MT][2],\n"
"                                             const u16 *const row[2])\n"
"{\n"
"    const int t = threadIdx.x & 3;\n"
"    score_chains acc;\n"
"    chains_clear(acc);\n"
"#pragma unroll\n"
"    for (int kk = 0; kk < MT; kk++) {\n"
"        u32 a[4];\n"
"#pragma unroll\n"
"        for (int r = 0; r < 2; r++) {\n"
"            const uint2 x = row[r] ? *(const uint2 *)(row[r] + KC * t + 4 * kk) : make_uint2(0, 0);\n"
"            a[r] = x.x;\n"
"            a[r + 2] = x.y;\n"
"        }\n"
"        chains_mma(acc, kk, a, qb);\n"
"    }\n"
"    chains_sum(s, acc);\n"
"}\n"
"\n"
"/* S^T for the 16 staged K records of a tile. */\n"
"template <bool EDGE>\n"
"__device__ __forceinline__ void scores_staged(float s[NT][4], const u32 qb[NT][MT][2],\n"
"                                              const unsigned char *records, int p0, int lo, int hi,\n"
"                                              const run_place<KC> &pl)\n"
"{\n"
"    const int g = (threadIdx.x & 31) >> 2;\n"
"#if MUSTAFAR_K_KEPT == D\n"
"    (void)pl;\n"
"    const u16 *row[2];\n",
"#pragma unroll\n"
"    for (int r = 0; r < 2; r++) {\n"
"        const int p = p0 + g + 8 * r;\n"
"        row[r] = !EDGE || (p >= lo && p < hi) ? (const u16 *)(records + (g + 8 * r) * K_STAGED + BITMAP_BYTES)\n"
"                                              : 0;\n"
"    }\n"
"    scores_dense(s, qb, row);\n"
"#else\n"
"    k_run run[2];\n"
"    u32 addr[2][2];        /* [row][half of the run]: from 32 channels on, two address chains per row */\n"
"#pragma unroll\n"
"    for (int r = 0; r < 2; r++) {\n"
"        const int p = p0 + g + 8 * r;\n"
"        const unsigned char *rec = records + (g + 8 * r) * K_STAGED;\n"
"        addr[r][0] = smem_addr(rec + BITMAP_BYTES) + 2 * run_start(rec, pl, !EDGE || (p >= lo && p < hi), run[r]);\n"
"        addr[r][1] = addr[r][0] + 2 * __popcll((u64)run[r] & ((1ull << (KC / 2)) - 1));\n"
"    }\n"
"    score_chains acc;\n"
"    chains_clear(acc);\n"
"#pragma unroll\n"
"    for (int kk = 0; kk < MT; kk++) {\n"
"        const int c = 4 * kk, half = KC >= 32 && c >= KC / 2;   /* channel of the run */\n"
"        const u32 w0 = (u32)(run[0] >> (c / 32 * 32)), w1 = (u32)(run[1] >> (c / 32 * 32));\n"
"        u32 a[4];\n"
"        a[0] = take_pair(addr[0][half], w0, c);\n"
"        a[1] = take_pair(addr[1][half], w1, c);\n"
"        a[2] = take_pair(addr[0][half], w0, c + 2);\n"
"        a[3] = take_pair(addr[1][half], w1, c + 2);\n"
"        chains_mma(acc, kk, a, qb);\n"
"    }\n"
"    chains_sum(s, acc);\n"
"#endif\n"
"}\n"
"\n"
"/* Online softmax step over the 16 positions of each head column: rescales\n"
"   the state to the new maxima and turns s into the P^T fragments (the B\n"
"   operand of O^T = V^T P^T).  Once the running maxima have settled most\n"
"   tiles raise none of them: one vote then skips the cross-lane maximum. */\n"
"__device__ __forceinline__ void tile_softmax(warp_state &st, float s[NT][4], u32 pb[NT][2])\n"
"{\n"
"#pragma unroll\n"
"    for (int nt = 0; nt < NT; nt++) {\n"
"        const bool grow = __any_sync(0xffffffffu, fmaxf(s[nt][0], s[nt][2]) > st.m[nt][0] ||\n"
"                                                      fmaxf(s[nt][1], s[nt][3]) > st.m[nt][1]);\n"
"#pragma unroll\n"
"        for (int h = 0; h < 2; h++) {          /* head 2t + h: s[nt][h], s[nt][2 + h] */\n"
"            if (grow) {\n"
"                float mx = fmaxf(s[nt][h], s[nt][2 + h]);\n"
"                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));\n"
"                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));\n"
"                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));\n"
"                const float m_new = fmaxf(st.m[nt][h], mx);\n"
"                const float corr = fast_exp2(st.m[nt][h] - (m_new == NEG_INF ? 0.0f : m_new));\n"
"                st.m[nt][h] = m_new;\n"
"                st.l[nt][h] *= corr;\n"
"                if (__any_sync(0xffffffffu, corr != 1.0f)) {\n"
"#pragma unroll\n"
"                    for (int mm = 0; mm < MT; mm++) { st.o[nt][mm][h] *= corr; st.o[nt][mm][2 + h] *= corr; }\n"
"                }\n"
"            }\n"
"            const float ref = st.m[nt][h] == NEG_INF ? 0.0f : st.m[nt][h];\n"
"            s[nt][h] = fast_exp2(s[nt][h] - ref);\n"
"            s[nt][2 + h] = fast_exp2(s[nt][2 + h] - ref);\n"
"            st.l[nt][h] += s[nt][h] + s[nt][2 + h];\n"
"        }\n"
"        pb[nt][0] = transpose8x8(pack2(s[nt][0], s[nt][1]));   /* positions 0..7 */\n"
"        pb[nt][1] = transpose8x8(pack2(s[nt][2], s[nt][3]));   /* positions 8..15 */\n"
"    }\n"
"}\n"
"\n"
"/* O^T += V^T P^T given the channel-run values of this thread: x[i] is\n"
"   channel k of position 2t + (i & 1) + 8 * (i >> 1).  Channels k < D/16 wait\n"
"   in `low` for their partner k + D/16 (rows g and g+8 of m-tile k). */\n"
"__device__ __forceinline__ void pv_channel(warp_state &st, const u32 pb[NT][2], int k,\n"
"                                           const u32 x[4], u32 (&low)[MT][2])\n"
"{\n"
"    const u32 p01 = pack_halves(x[0], x[1]), p23 = pack_halves(x[2], x[3]);\n"
"    if (k < MT) {\n"
"        low[k][0] = p01;\n",
"        low[k][1] = p23;\n"
"    } else {\n"
"        const u32 a[4] = {low[k - MT][0], p01, low[k - MT][1], p23};\n"
"#pragma unroll\n"
"        for (int nt = 0; nt < NT; nt++) mma_16816(st.o[nt][k - MT], a, pb[nt]);\n"
"    }\n"
"}\n"
"\n"
"/* O^T += V^T P^T for a tile whose V rows are dense: `row[i]` points at the\n"
"   V vector of position 2t + (i & 1) + 8 * (i >> 1), or is null. */\n"
"__device__ __forceinline__ void pv_dense(warp_state &st, const u32 pb[NT][2], const u16 *const row[4])\n"
"{\n"
"#if V_POPC\n"
"#pragma unroll\n"
"    for (int mm = 0; mm < MT; mm++) {\n"
"        u32 x[2][4];       /* [row g, g+8][position i] */\n"
"#pragma unroll\n"
"        for (int i = 0; i < 4; i++) {\n"
"            x[0][i] = row[i] ? row[i][o_channel(mm, false)] : 0u;\n"
"            x[1][i] = row[i] ? row[i][o_channel(mm, true)] : 0u;\n"
"        }\n"
"        const u32 a[4] = {pack_halves(x[0][0], x[0][1]), pack_halves(x[1][0], x[1][1]),\n"
"                          pack_halves(x[0][2], x[0][3]), pack_halves(x[1][2], x[1][3])};\n"
"#pragma unroll\n"
"        for (int nt = 0; nt < NT; nt++) mma_16816(st.o[nt][mm], a, pb[nt]);\n"
"    }\n"
"#else\n"
"    const int g = (threadIdx.x & 31) >> 2;\n"
"    u32 low[MT][2];\n"
"#pragma unroll\n"
"    for (int k = 0; k < VC; k += 2) {\n"
"        u32 w[4], lo[4], hi[4];\n"
"#pragma unroll\n"
"        for (int i = 0; i < 4; i++) {\n"
"            w[i] = row[i] ? *(const u32 *)(row[i] + VC * g + k) : 0u;\n"
"            lo[i] = w[i] & 0xffffu;\n"
"            hi[i] = w[i] >> 16;\n"
"        }\n"
"        pv_channel(st, pb, k, lo, low);\n"
"        pv_channel(st, pb, k + 1, hi, low);\n"
"    }\n"
"#endif\n"
"}\n"
"\n"
"/* Where the V records of a staged tile are: found before the softmax, so\n"
"   that the bitmap loads overlap it. */\n"
"struct v_records {\n"
"#if V_POPC\n"
"    popc_rows pr;          /* positions g and g+8 */\n"
"#else\n"
"    const u16 *row[4];     /* dense rows of positions 2t + (i & 1) + 8 * (i >> 1), or null */\n"
"#endif\n"
"};\n"
"template <bool EDGE>\n"
"__device__ __forceinline__ void find_v_records(v_records &vr, const unsigned char *records, int p0, int lo,\n"
"                                               int hi, u32 zero)\n"
"{\n"
"    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;\n"
"#if V_POPC\n"
"    (void)t;\n"
"    load_popc_rows<V_STAGED>(vr.pr, records, !EDGE || (p0 + g >= lo && p0 + g < hi),\n"
"                             !EDGE || (p0 + g + 8 >= lo && p0 + g + 8 < hi), zero);\n"
"#else\n"
"    (void)g;\n"
"    (void)zero;\n"
"#pragma unroll\n"
"    for (int i = 0; i < 4; i++) {\n"
"        const int tok = 2 * t + (i & 1) + 8 * (i >> 1), p = p0 + tok;\n"
"        vr.row[i] = !EDGE || (p >= lo && p < hi) ? (const u16 *)(records + tok * V_STAGED + BITMAP_BYTES) : 0;\n"
"    }\n"
"#endif\n"
"}\n"
"\n"
"/* O^T += V^T P^T for the 16 staged V records of a tile: m-tile mm of V^T\n"
"   is decoded straight into its A fragment. */\n"
"__device__ __forceinline__ void pv_staged(warp_state &st, const u32 pb[NT][2], v_records &vr,\n"
"                                          const popc_masks &mk, u32 zero)\n"
"{\n"
"#if !V_POPC\n"
"    (void)mk;\n"
"    (void)zero;\n"
"    pv_dense(st, pb, vr.row);\n"
"#else\n"
"#pragma unroll\n"
"    for (int mm = 0; mm < MT; mm++) {\n"
"        u32 y[2][2];       /* [positions 0..7, 8..15][channel row g, g+8] */\n"
"        decode_mtile(y, vr.pr, mm, mk, zero);\n"
"        const u32 a[4] = {y[0][0], y[0][1], y[1][0], y[1][1]};\n"
"#pragma unroll\n"
"        for (int nt = 0; nt < NT; nt++) mma_16816(st.o[nt][mm], a, pb[nt]);\n"
"    }\n"
"#endif\n"
"}\n"
"\n"
"/* One tile of 16 staged positions: scores, online softmax, O update.  Only\n"
"   a tile at the end of the compressed range (EDGE) checks each position\n"
"   against [lo, hi): tiles start inside the range, so every other tile lies\n"
"   wholly in it. */\n"
"template <bool EDGE>\n"
"__device__ __forceinline__ void staged_tile(warp_state &st, const u32 qb[NT][MT][2],\n",
"                                            const unsigned char *stage, int p0, int lo, int hi,\n"
"                                            float scale_log2, const decode_consts &dc)\n"
"{\n"
"    float s[NT][4];\n"
"    u32 pb[NT][2];\n"
"    scores_staged<EDGE>(s, qb, stage, p0, lo, hi, dc.k_place);\n"
"    scale_and_mask<EDGE>(s, scale_log2, p0, lo, hi);\n"
"    v_records vr;\n"
"    find_v_records<EDGE>(vr, stage + TILE * K_STAGED, p0, lo, hi, dc.zero);\n"
"    tile_softmax(st, s, pb);\n"
"    pv_staged(st, pb, vr, dc.mk, dc.zero);\n"
"}\n"
"\n"
"/* Waits for the kernel this one was launched as a programmatic dependent\n"
"   of (sm_90+; before that, launches are in stream order anyway). */\n"
"__device__ __forceinline__ void wait_for_previous_kernel()\n"
"{\n"
"#if MUSTAFAR_SM >= 90\n"
"    asm volatile(\"griddepcontrol.wait;\" ::: \"memory\");\n"
"#endif\n"
"}\n"
"\n"
"/* Row of the window ring holding position p, or null outside [lo, hi). */\n"
"__device__ __forceinline__ const u16 *ring_row(const u16 *ring, int row, int window, int head,\n"
"                                               int num_kv_heads, int p, int lo, int hi)\n"
"{\n"
"    return p >= lo && p < hi ? ring + (((long long)row * window + p % window) * num_kv_heads + head) * D : 0;\n"
"}\n"
"\n"
"\n"
"#if !MUSTAFAR_APPEND_WIDE\n"
"extern \"C\" __global__ void __launch_bounds__(MUSTAFAR_WARPS * 32, MIN_BLOCKS) mustafar_attention(\n"
"    const __grid_constant__ mustafar__seqs_inline inl, const unsigned char *k_pages,\n"
"    const unsigned char *v_pages, const int *page_table, int table_stride, const u16 *k_window,\n"
"    const u16 *v_window, int window, const paged_seq *global_seqs, const u16 *q, u16 *out,\n"
"    float *partial_o, float *partial_ml, int num_kv_heads, int chunk, int splits,\n"
"    float scale_log2, int unsettled)\n"
"{\n"
"    extern __shared__ __align__(16) unsigned char smem[];\n"
"    /* Launched as a programmatic dependent of the kernel before it (an\n"
"       append, the last call's combine, or the caller's): its blocks get\n"
"       ready during that kernel, then wait for all of its writes (and for\n"
"       its reads of the scratch written below) before touching memory.\n"
"       In a decode step (unsettled >= 0) the kernel before is the step's\n"
"       append, which lets this one start only once all work queued before\n"
"       it is complete: q and the older records are read here before any\n"
"       wait of this kernel, on the strength of that completion.  That\n"
"       append may write the last `unsettled` compressed positions of a\n"
"       sequence (from stable_end on) and its window: each warp waits just\n"
"       before it loads the page of its first tile at or past stable_end,\n"
"       and before the global writes at the end. */\n"
"#if MUSTAFAR_SM >= 90\n"
"    asm volatile(\"griddepcontrol.launch_dependents;\");   /* the combine may be scheduled */\n"
"#endif\n"
"    if (unsettled < 0) wait_for_previous_kernel();\n"
"    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;\n"
"    const int head_blocks = (MUSTAFAR_GROUP + HEADS_PER_BLOCK - 1) / HEADS_PER_BLOCK;\n"
"    const int kv_head = blockIdx.y / head_blocks, head_block = blockIdx.y % head_blocks;\n"
"    const int split = blockIdx.z, seq_index = blockIdx.x;\n"
"    const int q_head0 = kv_head * MUSTAFAR_GROUP + head_block * HEADS_PER_BLOCK;\n"
"    const int rows = MUSTAFAR_GROUP - head_block * HEADS_PER_BLOCK < HEADS_PER_BLOCK\n"
"                         ? MUSTAFAR_GROUP - head_block * HEADS_PER_BLOCK : HEADS_PER_BLOCK;\n"
"    const int num_q_heads = num_kv_heads * MUSTAFAR_GROUP;\n"
"    const paged_seq sq = inl.count ? inl.seqs[seq_index] : global_seqs[seq_index];\n"
"    const int length = sq.num_compressed + sq.num_window;\n"
"    const int begin = split * chunk;\n"
"    const int end = begin + chunk < length ? begin + chunk : length;\n"
"    const int *table = page_table + (long long)sq.row * table_stride;\n",
"    unsigned char *warp_smem = smem + warp * MUSTAFAR_STAGES * STAGE_BYTES;\n"
"    const u32 warp_stage = smem_addr(warp_smem);\n"
"\n"
"    decode_consts dc;\n"
"    dc.k_place = make_run_place<KC>(KC * t);\n"
"    dc.mk = make_popc_masks();\n"
"    dc.zero = smem_addr(smem + ZERO_OFFSET);\n"
"#if V_POPC\n"
"    if (threadIdx.x == 0) *(uint4 *)(smem + ZERO_OFFSET) = make_uint4(0, 0, 0, 0);\n"
"    __syncthreads();\n"
"#endif\n"
"    u32 qb[NT][MT][2];\n"
"    load_q(qb, q + ((long long)seq_index * num_q_heads + q_head0) * D, rows);\n"
"\n"
"    warp_state st;\n"
"#pragma unroll\n"
"    for (int nt = 0; nt < NT; nt++) {\n"
"#pragma unroll\n"
"        for (int mm = 0; mm < MT; mm++)\n"
"#pragma unroll\n"
"            for (int i = 0; i < 4; i++) st.o[nt][mm][i] = 0.0f;\n"
"        st.m[nt][0] = st.m[nt][1] = NEG_INF;\n"
"        st.l[nt][0] = st.l[nt][1] = 0.0f;\n"
"    }\n"
"\n"
"    const int compressed_end = end < sq.num_compressed ? end : sq.num_compressed;\n"
"    const int sweep = MUSTAFAR_WARPS * TILE;\n"
"    /* this warp's tiles start at begin + warp*TILE + j*sweep; the page of\n"
"       tile j is loaded in the prologue (j < STAGES) or in the sweep j - STAGES */\n"
"    int wait_p0 = -1;                      /* the sweep that waits first, if any */\n"
"    if (unsettled >= 0) {\n"
"        const int stable_end = sq.num_compressed - unsettled;\n"
"        const int x = stable_end - TILE - (begin + warp * TILE);\n"
"        const int first_unstable = x < 0 ? 0 : x / sweep + 1;\n"
"        if (first_unstable < MUSTAFAR_STAGES) wait_for_previous_kernel();\n"
"        else wait_p0 = begin + warp * TILE + (first_unstable - MUSTAFAR_STAGES) * sweep;\n"
"    }\n"
"    /* stage i % STAGES holds tile i of this warp; STAGES - 1 tiles ahead */\n"
"#pragma unroll\n"
"    for (int i = 0; i < MUSTAFAR_STAGES - 1; i++) {\n"
"        const int pi = begin + warp * TILE + i * sweep;\n"
"        if (pi < compressed_end)\n"
"            prefetch_records(warp_stage + i * STAGE_BYTES, pi, compressed_end,\n"
"                             lane_page(table, pi, compressed_end), k_pages, v_pages, kv_head,\n"
"                             num_kv_heads);\n"
"        copy_commit();\n"
"    }\n"
"    int stage_index = 0;\n"
"    int next_page = lane_page(table, begin + warp * TILE + (MUSTAFAR_STAGES - 1) * sweep, compressed_end);\n"
"    /* the sweeps before wait_p0, the wait, the rest: the loop body itself\n"
"       has no check (one there cost the loop ~3 %) */\n"
"    int p0 = begin + warp * TILE;\n"
"    int stop = wait_p0 >= p0 && wait_p0 < end ? wait_p0 : end;\n"
"#pragma unroll 1\n"
"    for (;;) {\n"
"        for (; p0 < stop; p0 += sweep) {\n"
"            const int ahead = p0 + (MUSTAFAR_STAGES - 1) * sweep;\n"
"            const int ahead_stage = stage_index == 0 ? MUSTAFAR_STAGES - 1 : stage_index - 1;\n"
"            const unsigned char *stage = warp_smem + stage_index * STAGE_BYTES;\n"
"            const int page = next_page;\n"
"            next_page = lane_page(table, ahead + sweep, compressed_end);\n"
"            if (ahead < compressed_end)\n"
"                prefetch_records(warp_stage + ahead_stage * STAGE_BYTES, ahead, compressed_end, page,\n"
"                                 k_pages, v_pages, kv_head, num_kv_heads);\n"
"            copy_commit();\n"
"            copy_wait<MUSTAFAR_STAGES - 1>();\n"
"            __syncwarp();\n"
"            if (p0 + TILE <= compressed_end)\n"
"                staged_tile<false>(st, qb, stage, p0, begin, compressed_end, scale_log2, dc);\n"
"            else if (p0 < compressed_end)\n"
"                staged_tile<true>(st, qb, stage, p0, begin, compressed_end, scale_log2, dc);\n"
"            if (p0 + TILE > sq.num_compressed && sq.num_window > 0) {\n"
"                const int lo = begin > sq.num_compressed ? begin : sq.num_compressed;\n"
"                float s[NT][4];\n"
"                u32 pb[NT][2];\n"
"                const u16 *ks[2], *vs[4];\n"
"#pragma unroll\n"
"                for (int r = 0; r < 2; r++)\n",
"                    ks[r] = ring_row(k_window, sq.row, window, kv_head, num_kv_heads, p0 + g + 8 * r, lo,\n"
"                                     end);\n"
"#pragma unroll\n"
"                for (int i = 0; i < 4; i++)\n"
"                    vs[i] = ring_row(v_window, sq.row, window, kv_head, num_kv_heads,\n"
"                                     p0 + 2 * t + (i & 1) + 8 * (i >> 1), lo, end);\n"
"                scores_dense(s, qb, ks);\n"
"                scale_and_mask<true>(s, scale_log2, p0, lo, end);\n"
"                tile_softmax(st, s, pb);\n"
"                pv_dense(st, pb, vs);\n"
"            }\n"
"            __syncwarp();                      /* the stage is refilled next iteration */\n"
"            stage_index = stage_index == MUSTAFAR_STAGES - 1 ? 0 : stage_index + 1;\n"
"        }\n"
"        if (stop == end) break;\n"
"        wait_for_previous_kernel();\n"
"        stop = end;\n"
"    }\n"
"\n"
"    /* merge the warps: [warps][16] (max, sum) pairs, then [warps][HEAD_ROWS][D] O */\n"
"#pragma unroll\n"
"    for (int nt = 0; nt < NT; nt++)\n"
"#pragma unroll\n"
"        for (int h = 0; h < 2; h++) {\n"
"            st.l[nt][h] += __shfl_xor_sync(0xffffffffu, st.l[nt][h], 4);\n"
"            st.l[nt][h] += __shfl_xor_sync(0xffffffffu, st.l[nt][h], 8);\n"
"            st.l[nt][h] += __shfl_xor_sync(0xffffffffu, st.l[nt][h], 16);\n"
"        }\n"
"    __syncthreads();\n"
"    float *ml = (float *)smem;\n"
"    float *o = ml + MUSTAFAR_WARPS * 32;\n"
"#pragma unroll\n"
"    for (int nt = 0; nt < NT; nt++)\n"
"#pragma unroll\n"
"        for (int h = 0; h < 2; h++) {\n"
"            const int r = 8 * nt + 2 * t + h;\n"
"            if (r < rows) {\n"
"                if (g == 0) {\n"
"                    ml[(warp * 16 + r) * 2] = st.m[nt][h];\n"
"                    ml[(warp * 16 + r) * 2 + 1] = st.l[nt][h];\n"
"                }\n"
"#pragma unroll\n"
"                for (int mm = 0; mm < MT; mm++) {\n"
"                    o[(warp * HEAD_ROWS + r) * D + o_channel(mm, false)] = st.o[nt][mm][h];\n"
"                    o[(warp * HEAD_ROWS + r) * D + o_channel(mm, true)] = st.o[nt][mm][2 + h];\n"
"                }\n"
"            }\n"
"        }\n"
"    __syncthreads();\n"
"    if (unsettled >= 0) wait_for_previous_kernel();\n"
"    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {\n"
"        const int r = i / D, c = i % D;\n"
"        float m = NEG_INF, l = 0.0f, acc = 0.0f;\n"
"        for (int w = 0; w < MUSTAFAR_WARPS; w++) m = fmaxf(m, ml[(w * 16 + r) * 2]);\n"
"        const float ref = m == NEG_INF ? 0.0f : m;\n"
"        for (int w = 0; w < MUSTAFAR_WARPS; w++) {\n"
"            const float f = exp2f(ml[(w * 16 + r) * 2] - ref);\n"
"            l += f * ml[(w * 16 + r) * 2 + 1];\n"
"            acc += f * o[(w * HEAD_ROWS + r) * D + c];\n"
"        }\n"
"        const long long head = (long long)seq_index * num_q_heads + q_head0 + r;\n"
"        if (splits == 1) {\n"
"            out[head * D + c] = from_float(l > 0.0f ? acc / l : 0.0f);\n"
"        } else {\n"
"            partial_o[(head * splits + split) * D + c] = acc;\n"
"            if (c == 0) {\n"
"                partial_ml[(head * splits + split) * 2] = m;\n"
"                partial_ml[(head * splits + split) * 2 + 1] = l;\n"
"            }\n"
"        }\n"
"    }\n"
"}\n"
"#endif\n"
"\n"
"/* Merges the splits of every (sequence, query head): one block of\n"
"   COMBINE_THREADS each.  Thread (part, c) sums channels 4c..4c+3 over the\n"
"   splits s = part (mod COMBINE_PARTS) with 16-byte loads, independent of\n"
"   each other so that they issue back to back; the parts meet in shared\n"
"   memory.  From sm_90 on it is launched as a programmatic dependent of the\n"
"   attention kernel: its blocks may start while that grid drains, and wait\n"
"   here for its results. */\n"
"#define COMBINE_THREADS 256\n"
"#define COMBINE_QUADS (D / 4)\n"
"#define COMBINE_PARTS (COMBINE_THREADS / COMBINE_QUADS)\n"
"#if !MUSTAFAR_APPEND_WIDE\n",
"extern \"C\" __global__ void __launch_bounds__(COMBINE_THREADS) mustafar_combine(const float *partial_o,\n"
"                                                                               const float *partial_ml,\n"
"                                                                               u16 *out, int splits)\n"
"{\n"
"    __shared__ float max_part[COMBINE_THREADS / 32], sum_part[COMBINE_PARTS];\n"
"    __shared__ float4 acc_part[COMBINE_PARTS][COMBINE_QUADS];\n"
"#if MUSTAFAR_SM >= 90\n"
"    asm volatile(\"griddepcontrol.launch_dependents;\");   /* the next call's kernel may get ready */\n"
"    asm volatile(\"griddepcontrol.wait;\" ::: \"memory\");\n"
"#endif\n"
"    const long long head = blockIdx.x;\n"
"    const int c = threadIdx.x % COMBINE_QUADS, part = threadIdx.x / COMBINE_QUADS;\n"
"    const float *ml = partial_ml + head * splits * 2;\n"
"    const float4 *po = (const float4 *)(partial_o + head * splits * D) + c;\n"
"    float m = NEG_INF, l = 0.0f;\n"
"    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);\n"
"    for (int s = threadIdx.x; s < splits; s += COMBINE_THREADS) m = fmaxf(m, ml[2 * s]);\n"
"    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));\n"
"    if ((threadIdx.x & 31) == 0) max_part[threadIdx.x >> 5] = m;\n"
"    __syncthreads();\n"
"    for (int w = 0; w < COMBINE_THREADS / 32; w++) m = fmaxf(m, max_part[w]);\n"
"    const float ref = m == NEG_INF ? 0.0f : m;\n"
"#pragma unroll 4\n"
"    for (int s = part; s < splits; s += COMBINE_PARTS) {\n"
"        const float w = exp2f(ml[2 * s] - ref);\n"
"        const float4 x = po[(long long)s * COMBINE_QUADS];\n"
"        l += w * ml[2 * s + 1];\n"
"        acc.x += w * x.x; acc.y += w * x.y; acc.z += w * x.z; acc.w += w * x.w;\n"
"    }\n"
"    acc_part[part][c] = acc;\n"
"    if (c == 0) sum_part[part] = l;\n"
"    __syncthreads();\n"
"    if (part == 0) {\n"
"        for (int p = 1; p < COMBINE_PARTS; p++) {\n"
"            const float4 y = acc_part[p][c];\n"
"            acc.x += y.x; acc.y += y.y; acc.z += y.z; acc.w += y.w;\n"
"            l += sum_part[p];\n"
"        }\n"
"        if (!(l > 0.0f)) {                  /* no position in range: zeros */\n"
"            acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);\n"
"            l = 1.0f;\n"
"        }\n"
"        *(uint2 *)(out + head * D + 4 * c) = make_uint2(pack2(acc.x / l, acc.y / l), pack2(acc.z / l, acc.w / l));\n"
"    }\n"
"}\n"
"#endif\n",
0};
/* END EMBEDDED mustafar_kernels.cuh */

static const char *const *mustafar__kernel_source(void)
{
    return mustafar__kernel_source_pieces;
}

#endif /* MUSTAFAR_NO_CUDA */

#endif /* MUSTAFAR_IMPLEMENTATION_DONE */
#endif /* MUSTAFAR_IMPLEMENTATION */

/* ==== >>history: REVISION HISTORY ================================================

   0.3.2  (2026-12-05)  CPU decode attention walks the pages in address order:
                        a task takes one token split of a sequence for all
                        its KV heads in lockstep (B=8, T=32k: one thread
                        -14 %, two threads -11 % at s=0.7 and -28 % at
                        s=0.5); the AVX2 path keeps V's accumulators in
                        registers over a block (-6 to -8 % at s=0.7), and
                        the NEON path likewise (not timed).  Memory:
                        the MEMORY section and stats.allocated_bytes;
                        a CPU context keeps the attention's work space
                        (a decode step allocated 7 blocks, now 3 small
                        ones), on a 64-byte boundary (two threads, 4k:
                        -6 %);
                        load_memory checks the records in place (it
                        copied the whole stream).
                        File paths are UTF-8 on Windows too;
                        mustafar_last_error(NULL) gives the reason of a
                        failed stateless call made with ctx NULL.
                        Fixes: cache_create refuses a cache whose sizes do
                        not fit a 32-bit size_t (it wrapped and crashed
                        later), costing records at their real size; cache_load refuses a negative max_ids (it
                        wrote past seq_ids); a dense_window or page_size
                        past max_sequence_length is taken as
                        max_sequence_length (short sequences were
                        refused); save_file on Windows replaces the old
                        file in one step; the save stream's documented
                        header gains its reserved u64; with no NVIDIA
                        driver the fallback says so; g++ -O2 builds (C++)
                        are warning-free.
   0.3.1  (2026-12-04)  CPU decode and compression faster (token pointers per
                        page run, vector softmax, AVX-512 dot of four tokens,
                        threshold search in registers); a failed cudaMalloc
                        or cudaMallocHost no longer leaves CUDA's last error
                        set for the next launch to report; out-of-memory
                        messages give the device's free and total bytes.
   0.3.0  (2026-12-04)  save and restore (mustafar_cache_save/_load and their
                        memory and file forms; MUSTAFAR_ERROR_INVALID_FILE,
                        MUSTAFAR_ERROR_IO); a context destroyed before its
                        caches releases them; CPU backend with AVX-512,
                        AVX2+F16C and NEON paths chosen at run time and
                        threads (context_desc.num_threads, parallel_for).
   0.2.0  (2026-12-04)  the CUDA runtime and NVRTC loaded at run time
                        (MUSTAFAR_CUDA_LINKED to link them); backend memory
                        helpers mustafar_memory_alloc/free/upload/download and
                        mustafar_context_synchronize; context_desc.cuda_path.
   0.1.0  (2026-12-04)  first numbered release: fp16/bf16 records for head_dim
                        64, 128 and 256, any GQA group; paged cache with dense
                        window; CPU backend; CUDA backend with NVRTC JIT and
                        a disk cache of compiled kernels.
*/

/* ==== >>license ====================================================================
This software is available under 2 licenses -- choose whichever you prefer.
------------------------------------------------------------------------------
ALTERNATIVE A - MIT License

Copyright (c) 2026 the mustafar.h authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
ALTERNATIVE B - Public Domain (www.unlicense.org)

This is free and unencumbered software released into the public domain.

Anyone is free to copy, modify, publish, use, compile, sell, or distribute this
software, either in source code form or as a compiled binary, for any purpose,
commercial or non-commercial, and by any means.

In jurisdictions that recognize copyright laws, the author or authors of this
software dedicate any and all copyright interest in the software to the public
domain. We make this dedication for the benefit of the public at large and to
the detriment of our heirs and successors. We intend this dedication to be an
overt act of relinquishment in perpetuity of all present and future rights to
this software under copyright law.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN
ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION
WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.

For more information, please refer to <http://unlicense.org/>
------------------------------------------------------------------------------
*/
