/* mustafar_kernels.cuh - CUDA kernels of mustafar.h, compiled at run time by
   NVRTC (amalgamate.py embeds this file into mustafar.h).  It includes no
   header: NVRTC has no include path on a user's machine.

   Compile-time constants (-D options, one compiled library per cache shape):
     MUSTAFAR_D           head_dim: 64, 128 or 256
     MUSTAFAR_BF16        1: bf16 elements, 0: fp16
     MUSTAFAR_K_KEPT      elements kept per K record (V: MUSTAFAR_V_KEPT)
     MUSTAFAR_GROUP       query heads per KV head
     MUSTAFAR_PAGE_SIZE   token positions per page
     MUSTAFAR_WARPS       warps per attention block
     MUSTAFAR_STAGES      tiles of records in flight per warp, plus one (2 or 3)
     MUSTAFAR_SM          target SM (75, 80, 86, 89, 90, ...)

   Buffers (element = 16-bit fp16/bf16 bits; shapes outermost first):
     record      [D/8 bytes bitmap][KEPT elements][zero pad to 16 bytes]
     pages       [num_pages][Hkv][PAGE_SIZE][record]
     page_table  [rows][table_stride] int32 page ids
     window      [rows][window][Hkv][D] ring, position p at slot p % window
     q, out      [nseq][Hq][D]
     partial_o   [nseq][Hq][splits][D] float, unnormalised
     partial_ml  [nseq][Hq][splits][2] float: running max (log2 units), sum */

#define D MUSTAFAR_D
#define E (D / 32)                         /* channels per lane in a warp */
#define BITMAP_BYTES (D / 8)
#define RECORD_BYTES(kept) (((BITMAP_BYTES + 2 * (kept) + 15) / 16) * 16)
#define K_RECORD RECORD_BYTES(MUSTAFAR_K_KEPT)
#define V_RECORD RECORD_BYTES(MUSTAFAR_V_KEPT)
#define TILE 16                            /* positions per warp tile = mma M/K */
#define HEAD_ROWS (MUSTAFAR_GROUP < 16 ? MUSTAFAR_GROUP : 16)
#define NEG_INF (-__int_as_float(0x7f800000))
/* attention blocks per SM the register budget is sized for */
#define MIN_BLOCKS (D == 256 ? 1 : D == 128 ? 12 / MUSTAFAR_WARPS : 16 / MUSTAFAR_WARPS)

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* Same bytes as mustafar__append_job and mustafar_paged_seq on the host. */
struct append_job {
    int row, old_length, new_tokens, input_offset;
    int old_compressed, new_compressed, compress_offset, window_offset;
    int pages_before, first_patch;
};
struct paged_seq { int row, num_compressed, num_window, reserved; };

/* ---- element conversions ------------------------------------------------- */

__device__ __forceinline__ float to_float(u16 h)
{
#if MUSTAFAR_BF16
    return __int_as_float((u32)h << 16);
#else
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ u16 from_float(float f)
{
#if MUSTAFAR_BF16
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
#else
    u16 h;
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
#endif
}

__device__ __forceinline__ u32 pack2(float lo, float hi)
{
    return (u32)from_float(lo) | ((u32)from_float(hi) << 16);
}

/* ---- warp and shared-memory helpers --------------------------------------- */

__device__ __forceinline__ u32 smem_addr(const void *p)
{
    return (u32)__cvta_generic_to_shared(p);
}

/* 16-byte global -> shared copy; asynchronous from sm_80 on. */
__device__ __forceinline__ void copy16(void *dst, const void *src)
{
#if MUSTAFAR_SM >= 80
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src));
#else
    *(uint4 *)dst = *(const uint4 *)src;
#endif
}
__device__ __forceinline__ void copy_commit()
{
#if MUSTAFAR_SM >= 80
    asm volatile("cp.async.commit_group;");
#endif
}
/* Waits until at most `pending` committed groups are still in flight. */
template <int pending> __device__ __forceinline__ void copy_wait()
{
#if MUSTAFAR_SM >= 80
    asm volatile("cp.async.wait_group %0;" ::"n"(pending));
#endif
}

/* c += a * b for one m16n8k16 tile (a: 16x16 row-major fragment, b: 16x8
   column fragment, c: 16x8 float), fp32 accumulation.  Before sm_80 (no
   bf16/k16 mma) the same fragment contract is computed with shuffles. */
__device__ __forceinline__ void mma_16816(float c[4], const u32 a[4], const u32 b[2])
{
#if MUSTAFAR_SM >= 80
#if MUSTAFAR_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
#else
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int k = 0; k < 16; k += 2) {
        /* a[row][k], a[row][k+1] live in lane 4*row + (k%8)/2, register
           (k >= 8 ? 2 : 0) + (row >= 8); b[k][n] in lane 4*n + (k%8)/2,
           register k >= 8. */
        const int src = (k & 7) >> 1, hi = k >= 8;
        u32 a_lo = __shfl_sync(0xffffffffu, hi ? a[2] : a[0], 4 * g + src);
        u32 a_hi = __shfl_sync(0xffffffffu, hi ? a[3] : a[1], 4 * g + src);
        u32 b0 = __shfl_sync(0xffffffffu, hi ? b[1] : b[0], 4 * (2 * t) + src);
        u32 b1 = __shfl_sync(0xffffffffu, hi ? b[1] : b[0], 4 * (2 * t + 1) + src);
        float al0 = to_float((u16)a_lo), al1 = to_float((u16)(a_lo >> 16));
        float ah0 = to_float((u16)a_hi), ah1 = to_float((u16)(a_hi >> 16));
        float b00 = to_float((u16)b0), b01 = to_float((u16)(b0 >> 16));
        float b10 = to_float((u16)b1), b11 = to_float((u16)(b1 >> 16));
        c[0] += al0 * b00 + al1 * b01;
        c[1] += al0 * b10 + al1 * b11;
        c[2] += ah0 * b00 + ah1 * b01;
        c[3] += ah0 * b10 + ah1 * b11;
    }
#endif
}

__device__ __forceinline__ int warp_sum(int v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ int warp_exclusive_scan(int v)
{
    const int lane = threadIdx.x & 31;
    int s = v;
    for (int o = 1; o < 32; o <<= 1) {
        int n = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += n;
    }
    return s - v;
}

/* ---- pruning: one warp per token vector ------------------------------------
   Lane l holds channels [l*E, l*E+E).  The kept set is the KEPT largest
   magnitude keys (bits & 0x7fff), ties to the lower channel: bisection finds
   the largest threshold with count(key >= t) >= KEPT, every key above it is
   kept, then the first ties in channel order.  Returns the lane's E keep bits. */
__device__ __forceinline__ u32 select_kept(const u16 x[E], int kept)
{
    const int lane = threadIdx.x & 31;
    int key[E];
#pragma unroll
    for (int e = 0; e < E; e++) key[e] = x[e] & 0x7fff;
    int lo = 0, hi = 0x7fff;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        int count = 0;
#if MUSTAFAR_SM >= 80
#pragma unroll
        for (int e = 0; e < E; e++) count += key[e] >= mid;
        asm("redux.sync.add.s32 %0, %0, 0xffffffff;" : "+r"(count));
#else
#pragma unroll
        for (int e = 0; e < E; e++) count += __popc(__ballot_sync(0xffffffffu, key[e] >= mid));
#endif
        if (count >= kept) lo = mid; else hi = mid - 1;
    }
    u32 greater = 0, ties = 0;
#pragma unroll
    for (int e = 0; e < E; e++) {
        greater |= (u32)(key[e] > lo) << e;
        ties |= (u32)(key[e] == lo) << e;
    }
    const int need = kept - warp_sum(__popc(greater));
    int rank = warp_exclusive_scan(__popc(ties));
    u32 keep = greater;
    (void)lane;
#pragma unroll
    for (int e = 0; e < E; e++)
        if (ties >> e & 1u) { if (rank < need) keep |= 1u << e; rank++; }
    return keep;
}

__device__ __forceinline__ void load_lane_elements(u16 x[E], const u16 *src)
{
    const int lane = threadIdx.x & 31;
#if E == 2
    u32 w = *(const u32 *)(src + lane * E);
    x[0] = (u16)w; x[1] = (u16)(w >> 16);
#elif E == 4
    uint2 w = *(const uint2 *)(src + lane * E);
    x[0] = (u16)w.x; x[1] = (u16)(w.x >> 16); x[2] = (u16)w.y; x[3] = (u16)(w.y >> 16);
#else
    uint4 w = *(const uint4 *)(src + lane * E);
    u32 v[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; i++) { x[2 * i] = (u16)v[i]; x[2 * i + 1] = (u16)(v[i] >> 16); }
#endif
}

__device__ __forceinline__ void store_lane_elements(u16 *dst, const u16 x[E])
{
    const int lane = threadIdx.x & 31;
#if E == 2
    *(u32 *)(dst + lane * E) = (u32)x[0] | ((u32)x[1] << 16);
#elif E == 4
    *(uint2 *)(dst + lane * E) = make_uint2((u32)x[0] | ((u32)x[1] << 16),
                                            (u32)x[2] | ((u32)x[3] << 16));
#else
    *(uint4 *)(dst + lane * E) =
        make_uint4((u32)x[0] | ((u32)x[1] << 16), (u32)x[2] | ((u32)x[3] << 16),
                   (u32)x[4] | ((u32)x[5] << 16), (u32)x[6] | ((u32)x[7] << 16));
#endif
}

/* Prunes the token vector at src and writes its record to dst (global), via
   the warp's shared staging buffer so that the record goes out in 16-byte
   stores. */
__device__ void compress_token(const u16 *src, unsigned char *dst, int kept, int record_bytes,
                               unsigned char *stage)
{
    const int lane = threadIdx.x & 31;
    u16 x[E];
    load_lane_elements(x, src);
    const u32 keep = select_kept(x, kept);
    u32 word = keep << ((lane * E) & 31);
    for (int o = 1; o < 32 / E; o <<= 1) word |= __shfl_xor_sync(0xffffffffu, word, o);
    __syncwarp();
    for (int i = lane; i < record_bytes / 4; i += 32) ((u32 *)stage)[i] = 0;
    __syncwarp();
    if (((lane * E) & 31) == 0) ((u32 *)stage)[(lane * E) >> 5] = word;
    u16 *vals = (u16 *)(stage + BITMAP_BYTES);
    int j = warp_exclusive_scan(__popc(keep));
#pragma unroll
    for (int e = 0; e < E; e++)
        if (keep >> e & 1u) vals[j++] = x[e];
    __syncwarp();
    for (int i = lane; i < record_bytes / 16; i += 32)
        ((uint4 *)dst)[i] = ((const uint4 *)stage)[i];
    __syncwarp();
}

/* Lane's E channels of a record (shared or global memory), zeros where pruned. */
__device__ __forceinline__ void expand_record(u16 x[E], const unsigned char *rec, int kept)
{
    const int lane = threadIdx.x & 31;
    const int word_index = (lane * E) >> 5, shift = (lane * E) & 31;
    int base = 0;
    u32 word = 0;
#pragma unroll
    for (int w = 0; w < D / 32; w++) {
        const u32 wv = ((const u32 *)rec)[w];
        if (w < word_index) base += __popc(wv);
        if (w == word_index) word = wv;
    }
    base += __popc(word & ((1u << shift) - 1u));
    const u32 bits = (word >> shift) & ((1u << E) - 1u);
    const u16 *vals = (const u16 *)(rec + BITMAP_BYTES);
#pragma unroll
    for (int e = 0; e < E; e++) {
        const int idx = base + __popc(bits & ((1u << e) - 1u));
        x[e] = ((bits >> e) & 1u) && idx < kept ? vals[idx] : (u16)0;
    }
}

/* ---- stateless record operations ------------------------------------------ */

#define OP_PRUNE 0
#define OP_COMPRESS 1
#define OP_DECOMPRESS 2

extern "C" __global__ void __launch_bounds__(256) mustafar_records(int op, const void *in, void *out,
                                                                    long long count)
{
    __shared__ __align__(16) unsigned char stage[8][RECORD_BYTES(D)];
    const int warp = threadIdx.x >> 5;
    const long long token = (long long)blockIdx.x * 8 + warp;
    if (token >= count) return;
    if (op == OP_COMPRESS) {
        compress_token((const u16 *)in + token * D, (unsigned char *)out + token * K_RECORD,
                       MUSTAFAR_K_KEPT, K_RECORD, stage[warp]);
    } else if (op == OP_PRUNE) {
        u16 x[E];
        load_lane_elements(x, (const u16 *)in + token * D);
        const u32 keep = select_kept(x, MUSTAFAR_K_KEPT);
#pragma unroll
        for (int e = 0; e < E; e++) if (!(keep >> e & 1u)) x[e] = 0;
        store_lane_elements((u16 *)out + token * D, x);
    } else {
        u16 x[E];
        expand_record(x, (const unsigned char *)in + token * K_RECORD, MUSTAFAR_K_KEPT);
        store_lane_elements((u16 *)out + token * D, x);
    }
}

/* ---- append: compress tokens into pages, fill the dense window -------------
   One warp per (item, KV head).  Items [0, compress_total) are positions
   compressed into pages (from the window ring or the input); the rest are
   positions entering the window.  A new position p goes to ring slot
   p % window, whose current occupant (the old window position q with the
   same slot) may be compressed by this same call: then the warp that
   compresses q writes p after it has read the slot, and the window item of
   p does nothing.  Window entries span at most `window` positions, so each
   slot receives at most one. */

#define INLINE_JOBS 48
#define INLINE_PATCHES 96
/* Small appends travel in the kernel parameters (no upload). */
struct append_inline {
    int njobs, npatches;                     /* 0: use the global arrays */
    append_job jobs[INLINE_JOBS];
    int patches[2 * INLINE_PATCHES];
};

__device__ __forceinline__ int find_job(const append_job *jobs, int njobs, int g, bool window)
{
    int lo = 0, hi = njobs - 1;               /* last job with offset <= g */
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        const int off = window ? jobs[mid].window_offset : jobs[mid].compress_offset;
        if (off <= g) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* Copies one head of one token vector, each lane its own E elements (so a
   lane overwrites only what it read itself). */
__device__ __forceinline__ void copy_vector(u16 *dst, const u16 *src)
{
    u16 x[E];
    load_lane_elements(x, src);
    store_lane_elements(dst, x);
}

extern "C" __global__ void __launch_bounds__(256) mustafar_append(
    const __grid_constant__ append_inline inl, const append_job *global_jobs, int njobs,
    const int *global_patches, int npatches, int compress_total, int window_total,
    int num_kv_heads, const u16 *k_in, const u16 *v_in, unsigned char *k_pages,
    unsigned char *v_pages, int *page_table, int table_stride, u16 *k_window, u16 *v_window,
    int window)
{
    __shared__ __align__(16) unsigned char stage[8][RECORD_BYTES(D)];
    const append_job *jobs = inl.njobs ? inl.jobs : global_jobs;
    const int *patches = inl.njobs ? inl.patches : global_patches;
    const int warp = threadIdx.x >> 5;
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < npatches; i += blockDim.x)
            page_table[patches[2 * i]] = patches[2 * i + 1];
    const long long item = (long long)blockIdx.x * 8 + warp;
    if (item >= (long long)(compress_total + window_total) * num_kv_heads) return;
    const int g = (int)(item / num_kv_heads), head = (int)(item % num_kv_heads);
    if (g < compress_total) {
        const append_job j = jobs[find_job(jobs, njobs, g, false)];
        const int p = j.old_compressed + (g - j.compress_offset);
        const int page_index = p / MUSTAFAR_PAGE_SIZE;
        const int page = page_index >= j.pages_before
                             ? patches[2 * (j.first_patch + page_index - j.pages_before) + 1]
                             : page_table[(long long)j.row * table_stride + page_index];
        const long long slot = ((long long)page * num_kv_heads + head) * MUSTAFAR_PAGE_SIZE +
                               p % MUSTAFAR_PAGE_SIZE;
        const u16 *ks, *vs;
        long long ring = 0;
        if (p < j.old_length) {
            ring = (((long long)j.row * window + p % window) * num_kv_heads + head) * D;
            ks = k_window + ring;
            vs = v_window + ring;
        } else {
            const long long in = ((long long)(j.input_offset + p - j.old_length) * num_kv_heads + head) * D;
            ks = k_in + in;
            vs = v_in + in;
        }
        compress_token(ks, k_pages + slot * K_RECORD, MUSTAFAR_K_KEPT, K_RECORD, stage[warp]);
        compress_token(vs, v_pages + slot * V_RECORD, MUSTAFAR_V_KEPT, V_RECORD, stage[warp]);
        if (p < j.old_length) {               /* p leaves the ring: write its slot's new entry */
            const int first = j.old_length > j.new_compressed ? j.old_length : j.new_compressed;
            const int successor = first + ((p - first) % window + window) % window;
            if (successor < j.old_length + j.new_tokens) {
                const long long in = ((long long)(j.input_offset + successor - j.old_length) * num_kv_heads + head) * D;
                copy_vector(k_window + ring, k_in + in);
                copy_vector(v_window + ring, v_in + in);
            }
        }
    } else {
        const int w = g - compress_total;
        const append_job j = jobs[find_job(jobs, njobs, w, true)];
        const int first = j.old_length > j.new_compressed ? j.old_length : j.new_compressed;
        const int p = first + (w - j.window_offset);
        const int occupant = j.old_compressed + ((p - j.old_compressed) % window + window) % window;
        if (occupant < j.old_length && occupant < j.new_compressed) return;  /* written above */
        const long long in = ((long long)(j.input_offset + p - j.old_length) * num_kv_heads + head) * D;
        const long long ring = (((long long)j.row * window + p % window) * num_kv_heads + head) * D;
        copy_vector(k_window + ring, k_in + in);
        copy_vector(v_window + ring, v_in + in);
    }
}

/* ---- decode attention -------------------------------------------------------
   Block (sequence, kv head x head block, split), MUSTAFAR_WARPS warps.  Each
   warp walks 16-position tiles of the block's range with its own online
   softmax: records are staged into shared memory with 16-byte async copies
   one tile ahead and decoded straight into tensor-core fragments in
   registers (S = Q K^T, then O += P V, fp32 accumulation); the warps are
   merged at the end.

   Channel permutation.  A dot product does not depend on the order of its
   terms, so each thread takes whole runs of channels instead of the mma
   fragment's interleave, and decodes a run with one popcount:
     S = Q K^T  k index {2t, 2t+1, 2t+8, 2t+9} of k-step kk is channel
                KC*t + 4*kk + {0, 1, 2, 3}: thread t owns a run of KC = D/4
     O += P V   column g of n-tile j is channel VC*g + j: thread g owns a run
                of VC = D/8 channels.
   Lane = 4*g + t as in the mma fragments. */

#define KC (D / 4)
#define VC (D / 8)
#if KC > 32
typedef u64 k_run;                          /* D = 256: a K run is 64 channels */
#else
typedef u32 k_run;
#endif

struct warp_state {
    float o[VC][4];        /* O fragment: rows g, g+8; channels VC*(2t) + j, VC*(2t+1) + j */
    float m[2], l[2];      /* running max (log2 units) and partial sums, rows g, g+8 */
};

/* Staged records are spaced so that the 16 rows of a tile start in 8
   different bank groups (stride / 16 odd): decode loads conflict at most
   2-way instead of 4-way for a 96-byte record. */
#define STAGED(rec) ((rec) / 16 % 2 ? (rec) : (rec) + 16)
#define K_STAGED STAGED(K_RECORD)
#define V_STAGED STAGED(V_RECORD)
#define STAGE_BYTES (TILE * (K_STAGED + V_STAGED))

/* Queues the records of the tile's compressed positions [p0, p0+16) below
   `end`: lane l copies the K record (l < 16) or the V record (l >= 16) of
   position p0 + l % 16. */
__device__ __forceinline__ void prefetch_records(unsigned char *stage, int p0, int end,
                                                 const unsigned char *k_pages,
                                                 const unsigned char *v_pages, const int *table,
                                                 int head, int num_kv_heads)
{
    const int lane = threadIdx.x & 31, tok = lane & 15, p = p0 + tok;
    if (p >= end) return;
    const long long slot = ((long long)table[p / MUSTAFAR_PAGE_SIZE] * num_kv_heads + head) *
                               MUSTAFAR_PAGE_SIZE + p % MUSTAFAR_PAGE_SIZE;
    if (lane < 16) {
        const unsigned char *src = k_pages + slot * K_RECORD;
        unsigned char *dst = stage + tok * K_STAGED;
#pragma unroll
        for (int c = 0; c < K_RECORD / 16; c++) copy16(dst + 16 * c, src + 16 * c);
    } else {
        const unsigned char *src = v_pages + slot * V_RECORD;
        unsigned char *dst = stage + TILE * K_STAGED + tok * V_STAGED;
#pragma unroll
        for (int c = 0; c < V_RECORD / 16; c++) copy16(dst + 16 * c, src + 16 * c);
    }
}

/* The bits of channels [first, first + n) of a staged record (n = 8..64,
   first a multiple of n), zero for a position outside the range. */
__device__ __forceinline__ u64 run_bits(const unsigned char *rec, int first, int n, bool valid)
{
    const u32 *w = (const u32 *)rec;
    u64 bits;
    if (n == 64) bits = w[first / 32] | ((u64)w[first / 32 + 1] << 32);
    else if (n == 32) bits = w[first / 32];
    else bits = (w[first / 32] >> (first % 32)) & ((1u << n) - 1u);
    return valid ? bits : 0;
}

/* Exclusive prefix sum over the `count` lanes lane % stride + stride * i that
   hold consecutive runs of one record: the index of a run's first kept value.
   Records are trusted to keep exactly KEPT elements; a corrupt one can only
   make the decode read other bytes of the shared-memory staging (padded for
   that), never outside it. */
__device__ __forceinline__ int run_offset(int count_bits, int stride, int count)
{
    const int lane = threadIdx.x & 31, index = (lane / stride) % count;
    int sum = count_bits;
#pragma unroll
    for (int d = 1; d < count; d <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, sum, d * stride);
        if (index >= d) sum += n;
    }
    return sum - count_bits;
}

/* Two packed elements (channels c, c+1 of a run): value or zero, taking
   kept values from *v onwards. */
__device__ __forceinline__ u32 take_pair(u32 bits2, const u16 *&v)
{
    u32 lo = 0, hi = 0;
    if (bits2 & 1u) lo = *v++;
    if (bits2 & 2u) hi = *v++;
    return lo | (hi << 16);
}

/* Q fragments (A operand) for the KC-channel run of this thread, rows >= rows zero. */
__device__ __forceinline__ void load_q(u32 qa[D / 16][4], const u16 *q, int rows)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint2 lo = make_uint2(0, 0), hi = make_uint2(0, 0);
        if (g < rows) lo = *(const uint2 *)(q + g * D + KC * t + 4 * kk);
        if (g + 8 < rows) hi = *(const uint2 *)(q + (g + 8) * D + KC * t + 4 * kk);
        qa[kk][0] = lo.x; qa[kk][1] = hi.x; qa[kk][2] = lo.y; qa[kk][3] = hi.y;
    }
}

/* Scores to log2 units; positions outside [lo, hi) get -inf. */
__device__ __forceinline__ void scale_and_mask(float s[2][4], float scale_log2, int p0, int lo, int hi)
{
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int p = p0 + 8 * j + 2 * t + (i & 1);
            s[j][i] = (p >= lo && p < hi) ? s[j][i] * scale_log2 : NEG_INF;
        }
}

/* S = Q K^T for the 16 staged records of a tile, scaled to log2 units;
   positions outside [lo, hi) get -inf.  s[j][..]: n-tile j (positions 8j..8j+7). */
__device__ __forceinline__ void scores_staged(float s[2][4], const u32 qa[D / 16][4],
                                              const unsigned char *records, float scale_log2,
                                              int p0, int lo, int hi)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int p = p0 + 8 * j + g;
        const unsigned char *rec = records + (8 * j + g) * K_STAGED;
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#if MUSTAFAR_K_KEPT == D
        /* nothing pruned: the values are the dense row */
        const u16 *v = (const u16 *)(rec + BITMAP_BYTES) + KC * t;
        const bool valid = p >= lo && p < hi;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const uint2 x = valid ? *(const uint2 *)(v + 4 * kk) : make_uint2(0, 0);
            const u32 b[2] = {x.x, x.y};
            mma_16816(acc[kk & 1], qa[kk], b);
        }
#else
        const k_run run = (k_run)run_bits(rec, KC * t, KC, p >= lo && p < hi);
        const u16 *v = (const u16 *)(rec + BITMAP_BYTES) + run_offset(KC > 32 ? __popcll(run) : __popc((u32)run), 1, 4);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const u32 nib = (u32)(run >> (4 * kk)) & 15u;
            u32 b[2];
            b[0] = take_pair(nib, v);
            b[1] = take_pair(nib >> 2, v);
            mma_16816(acc[kk & 1], qa[kk], b);   /* two chains: half the HMMA latency */
        }
#endif
#pragma unroll
        for (int i = 0; i < 4; i++) s[j][i] = acc[0][i] + acc[1][i];
    }
    scale_and_mask(s, scale_log2, p0, lo, hi);
}

/* The same from dense window rows (global memory). */
__device__ __forceinline__ void scores_window(float s[2][4], const u32 qa[D / 16][4],
                                              const u16 *ring, int row, int window, int head,
                                              int num_kv_heads, float scale_log2, int p0, int lo,
                                              int hi)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int p = p0 + 8 * j + g;
        const bool valid = p >= lo && p < hi;
        const u16 *src = ring + (((long long)row * window + (valid ? p : lo) % window) * num_kv_heads + head) * D + KC * t;
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const uint2 v = valid ? *(const uint2 *)(src + 4 * kk) : make_uint2(0, 0);
            const u32 b[2] = {v.x, v.y};
            mma_16816(s[j], qa[kk], b);
        }
    }
    scale_and_mask(s, scale_log2, p0, lo, hi);
}

/* Online softmax step: rescales the state to the new row maxima and turns s
   into the P fragment (as the A operand of the P V product). */
__device__ __forceinline__ void tile_softmax(warp_state &st, float s[2][4], u32 pa[4])
{
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float mx = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(st.m[h], mx);
        const float ref = m_new == NEG_INF ? 0.0f : m_new;
        const float corr = exp2f(st.m[h] - ref);
        st.m[h] = m_new;
        st.l[h] *= corr;
        if (__any_sync(0xffffffffu, corr != 1.0f)) {
#pragma unroll
            for (int n = 0; n < VC; n++) { st.o[n][2 * h] *= corr; st.o[n][2 * h + 1] *= corr; }
        }
#pragma unroll
        for (int j = 0; j < 2; j++) {
            s[j][2 * h] = exp2f(s[j][2 * h] - ref);
            s[j][2 * h + 1] = exp2f(s[j][2 * h + 1] - ref);
            st.l[h] += s[j][2 * h] + s[j][2 * h + 1];
        }
    }
    pa[0] = pack2(s[0][0], s[0][1]);
    pa[1] = pack2(s[0][2], s[0][3]);
    pa[2] = pack2(s[1][0], s[1][1]);
    pa[3] = pack2(s[1][2], s[1][3]);
}

/* O += P V for the 16 staged V records of a tile.  Thread (g, t) decodes
   positions 2t, 2t+1, 2t+8, 2t+9 over its channel run VC*g + [0, VC);
   positions outside [lo, hi) read as zero. */
__device__ __forceinline__ void pv_staged(warp_state &st, const u32 pa[4],
                                          const unsigned char *records, int p0, int lo, int hi)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#if MUSTAFAR_V_KEPT == D
    /* nothing pruned: the values are the dense rows */
    const u16 *src[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int tok = 2 * t + (i & 1) + 8 * (i >> 1), p = p0 + tok;
        src[i] = p >= lo && p < hi ? (const u16 *)(records + tok * V_STAGED + BITMAP_BYTES) + VC * g : 0;
    }
#pragma unroll
    for (int k = 0; k < VC; k += 2) {
        u32 w[4];
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = src[i] ? *(const u32 *)(src[i] + k) : 0u;
        const u32 b0[2] = {(w[0] & 0xffffu) | (w[1] << 16), (w[2] & 0xffffu) | (w[3] << 16)};
        const u32 b1[2] = {(w[0] >> 16) | (w[1] & 0xffff0000u), (w[2] >> 16) | (w[3] & 0xffff0000u)};
        mma_16816(st.o[k], pa, b0);
        mma_16816(st.o[k + 1], pa, b1);
    }
#else
    u32 run[4];
    const u16 *v[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int tok = 2 * t + (i & 1) + 8 * (i >> 1), p = p0 + tok;
        const unsigned char *rec = records + tok * V_STAGED;
        run[i] = (u32)run_bits(rec, VC * g, VC, p >= lo && p < hi);
        v[i] = (const u16 *)(rec + BITMAP_BYTES) + run_offset(__popc(run[i]), 4, 8);
    }
#pragma unroll
    for (int k = 0; k < VC; k++) {
        u32 x[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            x[i] = 0;
            if (run[i] >> k & 1u) x[i] = *v[i]++;
        }
        const u32 b[2] = {x[0] | (x[1] << 16), x[2] | (x[3] << 16)};
        mma_16816(st.o[k], pa, b);
    }
#endif
}

/* The same from dense window rows (global memory). */
__device__ __forceinline__ void pv_window(warp_state &st, const u32 pa[4], const u16 *ring, int row,
                                          int window, int head, int num_kv_heads, int p0, int lo,
                                          int hi)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u16 *src[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int p = p0 + 2 * t + (i & 1) + 8 * (i >> 1);
        src[i] = p >= lo && p < hi
                     ? ring + (((long long)row * window + p % window) * num_kv_heads + head) * D + VC * g
                     : 0;
    }
#pragma unroll
    for (int c = 0; c < VC; c += 8) {
        u32 w[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint4 v = src[i] ? *(const uint4 *)(src[i] + c) : make_uint4(0, 0, 0, 0);
            w[i][0] = v.x; w[i][1] = v.y; w[i][2] = v.z; w[i][3] = v.w;
        }
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const int sh = 16 * (e & 1);
            const u32 b[2] = {((w[0][e / 2] >> sh) & 0xffffu) | ((w[1][e / 2] >> sh) << 16),
                              ((w[2][e / 2] >> sh) & 0xffffu) | ((w[3][e / 2] >> sh) << 16)};
            mma_16816(st.o[c + e], pa, b);
        }
    }
}

#define INLINE_SEQS 192
/* Small batches travel in the kernel parameters (no upload). */
struct seqs_inline {
    int count;                               /* 0: use the global array */
    paged_seq seqs[INLINE_SEQS];
};

extern "C" __global__ void __launch_bounds__(MUSTAFAR_WARPS * 32, MIN_BLOCKS) mustafar_attention(
    const __grid_constant__ seqs_inline inl, const unsigned char *k_pages,
    const unsigned char *v_pages, const int *page_table, int table_stride, const u16 *k_window,
    const u16 *v_window, int window, const paged_seq *global_seqs, const u16 *q, u16 *out,
    float *partial_o, float *partial_ml, int num_kv_heads, int chunk, int splits,
    float scale_log2)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int head_blocks = (MUSTAFAR_GROUP + 15) / 16;
    const int kv_head = blockIdx.y / head_blocks, head_block = blockIdx.y % head_blocks;
    const int split = blockIdx.z, seq_index = blockIdx.x;
    const int q_head0 = kv_head * MUSTAFAR_GROUP + head_block * 16;
    const int rows = MUSTAFAR_GROUP - head_block * 16 < 16 ? MUSTAFAR_GROUP - head_block * 16 : 16;
    const int num_q_heads = num_kv_heads * MUSTAFAR_GROUP;
    const paged_seq sq = inl.count ? inl.seqs[seq_index] : global_seqs[seq_index];
    const int length = sq.num_compressed + sq.num_window;
    const int begin = split * chunk;
    const int end = begin + chunk < length ? begin + chunk : length;
    const int *table = page_table + (long long)sq.row * table_stride;
    unsigned char *warp_smem = smem + warp * MUSTAFAR_STAGES * STAGE_BYTES;

    u32 qa[D / 16][4];
    load_q(qa, q + ((long long)seq_index * num_q_heads + q_head0) * D, rows);

    warp_state st;
#pragma unroll
    for (int n = 0; n < VC; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) st.o[n][i] = 0.0f;
    st.m[0] = st.m[1] = NEG_INF;
    st.l[0] = st.l[1] = 0.0f;

    const int compressed_end = end < sq.num_compressed ? end : sq.num_compressed;
    const int sweep = MUSTAFAR_WARPS * TILE;
    /* stage i % STAGES holds tile i of this warp; STAGES - 1 tiles ahead */
#pragma unroll
    for (int i = 0; i < MUSTAFAR_STAGES - 1; i++) {
        const int pi = begin + warp * TILE + i * sweep;
        if (pi < compressed_end)
            prefetch_records(warp_smem + i * STAGE_BYTES, pi, compressed_end, k_pages, v_pages,
                             table, kv_head, num_kv_heads);
        copy_commit();
    }
    int stage_index = 0;
    for (int p0 = begin + warp * TILE; p0 < end; p0 += sweep) {
        const int ahead = p0 + (MUSTAFAR_STAGES - 1) * sweep;
        const int ahead_stage = stage_index == 0 ? MUSTAFAR_STAGES - 1 : stage_index - 1;
        const unsigned char *stage = warp_smem + stage_index * STAGE_BYTES;
        if (ahead < compressed_end)
            prefetch_records(warp_smem + ahead_stage * STAGE_BYTES, ahead, compressed_end,
                             k_pages, v_pages, table, kv_head, num_kv_heads);
        copy_commit();
        copy_wait<MUSTAFAR_STAGES - 1>();
        __syncwarp();
        if (p0 < compressed_end) {
            float s[2][4];
            u32 pa[4];
            scores_staged(s, qa, stage, scale_log2, p0, begin, compressed_end);
            tile_softmax(st, s, pa);
            pv_staged(st, pa, stage + TILE * K_STAGED, p0, begin, compressed_end);
        }
        if (p0 + TILE > sq.num_compressed && sq.num_window > 0) {
            const int lo = begin > sq.num_compressed ? begin : sq.num_compressed;
            float s[2][4];
            u32 pa[4];
            scores_window(s, qa, k_window, sq.row, window, kv_head, num_kv_heads, scale_log2, p0, lo, end);
            tile_softmax(st, s, pa);
            pv_window(st, pa, v_window, sq.row, window, kv_head, num_kv_heads, p0, lo, end);
        }
        __syncwarp();                      /* the stage is refilled next iteration */
        stage_index = stage_index == MUSTAFAR_STAGES - 1 ? 0 : stage_index + 1;
    }

    /* merge the warps: [warps][16] (max, sum) pairs, then [warps][HEAD_ROWS][D] O */
#pragma unroll
    for (int h = 0; h < 2; h++) {
        st.l[h] += __shfl_xor_sync(0xffffffffu, st.l[h], 1);
        st.l[h] += __shfl_xor_sync(0xffffffffu, st.l[h], 2);
    }
    __syncthreads();
    float *ml = (float *)smem;
    float *o = ml + MUSTAFAR_WARPS * 32;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = g + 8 * h;
        if (r < rows) {
            if (t == 0) {
                ml[(warp * 16 + r) * 2] = st.m[h];
                ml[(warp * 16 + r) * 2 + 1] = st.l[h];
            }
#pragma unroll
            for (int n = 0; n < VC; n++) {
                o[(warp * HEAD_ROWS + r) * D + VC * (2 * t) + n] = st.o[n][2 * h];
                o[(warp * HEAD_ROWS + r) * D + VC * (2 * t + 1) + n] = st.o[n][2 * h + 1];
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
        const int r = i / D, c = i % D;
        float m = NEG_INF, l = 0.0f, acc = 0.0f;
        for (int w = 0; w < MUSTAFAR_WARPS; w++) m = fmaxf(m, ml[(w * 16 + r) * 2]);
        const float ref = m == NEG_INF ? 0.0f : m;
        for (int w = 0; w < MUSTAFAR_WARPS; w++) {
            const float f = exp2f(ml[(w * 16 + r) * 2] - ref);
            l += f * ml[(w * 16 + r) * 2 + 1];
            acc += f * o[(w * HEAD_ROWS + r) * D + c];
        }
        const long long head = (long long)seq_index * num_q_heads + q_head0 + r;
        if (splits == 1) {
            out[head * D + c] = from_float(l > 0.0f ? acc / l : 0.0f);
        } else {
            partial_o[(head * splits + split) * D + c] = acc;
            if (c == 0) {
                partial_ml[(head * splits + split) * 2] = m;
                partial_ml[(head * splits + split) * 2 + 1] = l;
            }
        }
    }
}

/* Merges the splits of every (sequence, query head): one block each, D threads. */
extern "C" __global__ void __launch_bounds__(256) mustafar_combine(const float *partial_o,
                                                                   const float *partial_ml,
                                                                   u16 *out, int splits)
{
    const long long head = blockIdx.x;
    const int c = threadIdx.x;
    float m = NEG_INF, l = 0.0f, acc = 0.0f;
    for (int s = 0; s < splits; s++) m = fmaxf(m, partial_ml[(head * splits + s) * 2]);
    const float ref = m == NEG_INF ? 0.0f : m;
    for (int s = 0; s < splits; s++) {
        const float f = exp2f(partial_ml[(head * splits + s) * 2] - ref);
        l += f * partial_ml[(head * splits + s) * 2 + 1];
        acc += f * partial_o[(head * splits + s) * D + c];
    }
    out[head * D + c] = from_float(l > 0.0f ? acc / l : 0.0f);
}
