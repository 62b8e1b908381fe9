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
#define ROW (D + 8)                        /* smem row stride in elements: 16 B pad */
#define HEAD_ROWS (MUSTAFAR_GROUP < 16 ? MUSTAFAR_GROUP : 16)
#define NEG_INF (-__int_as_float(0x7f800000))
/* attention blocks per SM the register budget is sized for */
#define MIN_BLOCKS (D == 256 ? 1 : 16 / MUSTAFAR_WARPS)

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
/* Waits until at most one committed group is still in flight. */
__device__ __forceinline__ void copy_wait_all_but_one()
{
#if MUSTAFAR_SM >= 80
    asm volatile("cp.async.wait_group 1;");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
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
    int lo = 0, hi = 0x7fff;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        int count = 0;
#pragma unroll
        for (int e = 0; e < E; e++) count += __popc(__ballot_sync(0xffffffffu, (x[e] & 0x7fff) >= mid));
        if (count >= kept) lo = mid; else hi = mid - 1;
    }
    u32 greater = 0, ties = 0;
#pragma unroll
    for (int e = 0; e < E; e++) {
        greater |= (u32)((x[e] & 0x7fff) > lo) << e;
        ties |= (u32)((x[e] & 0x7fff) == lo) << e;
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

/* ---- append: compress tokens into pages, fill the dense window ------------- */

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

/* One warp per (compressed position, KV head); block 0 also stores the new
   page-table entries (`patches`: index, page pairs). */
extern "C" __global__ void __launch_bounds__(256) mustafar_append_compress(
    const append_job *jobs, int njobs, const int *patches, int npatches, int total,
    int num_kv_heads, const u16 *k_in, const u16 *v_in, unsigned char *k_pages,
    unsigned char *v_pages, int *page_table, int table_stride, const u16 *k_window,
    const u16 *v_window, int window)
{
    __shared__ __align__(16) unsigned char stage[8][RECORD_BYTES(D)];
    const int warp = threadIdx.x >> 5;
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < npatches; i += blockDim.x)
            page_table[patches[2 * i]] = patches[2 * i + 1];
    const long long item = (long long)blockIdx.x * 8 + warp;
    if (item >= (long long)total * num_kv_heads) return;
    const int g = (int)(item / num_kv_heads), head = (int)(item % num_kv_heads);
    const append_job j = jobs[find_job(jobs, njobs, g, false)];
    const int p = j.old_compressed + (g - j.compress_offset);
    const int page_index = p / MUSTAFAR_PAGE_SIZE;
    const int page = page_index >= j.pages_before
                         ? patches[2 * (j.first_patch + page_index - j.pages_before) + 1]
                         : page_table[(long long)j.row * table_stride + page_index];
    const u16 *ks, *vs;
    if (p < j.old_length) {
        const long long w = (((long long)j.row * window + p % window) * num_kv_heads + head) * D;
        ks = k_window + w;
        vs = v_window + w;
    } else {
        const long long in = ((long long)(j.input_offset + p - j.old_length) * num_kv_heads + head) * D;
        ks = k_in + in;
        vs = v_in + in;
    }
    const long long slot = ((long long)page * num_kv_heads + head) * MUSTAFAR_PAGE_SIZE +
                           p % MUSTAFAR_PAGE_SIZE;
    compress_token(ks, k_pages + slot * K_RECORD, MUSTAFAR_K_KEPT, K_RECORD, stage[warp]);
    compress_token(vs, v_pages + slot * V_RECORD, MUSTAFAR_V_KEPT, V_RECORD, stage[warp]);
}

/* One thread per 16 bytes of a token's [Hkv][D] block entering the window. */
extern "C" __global__ void __launch_bounds__(256) mustafar_append_window(
    const append_job *jobs, int njobs, int total, int num_kv_heads, const u16 *k_in,
    const u16 *v_in, u16 *k_window, u16 *v_window, int window)
{
    const int chunks = num_kv_heads * D / 8;
    const long long item = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= (long long)total * chunks) return;
    const int g = (int)(item / chunks), c = (int)(item % chunks);
    const append_job j = jobs[find_job(jobs, njobs, g, true)];
    const int first = j.old_length > j.new_compressed ? j.old_length : j.new_compressed;
    const int p = first + (g - j.window_offset);
    const long long in = (long long)(j.input_offset + p - j.old_length) * num_kv_heads * D + c * 8;
    const long long w = ((long long)j.row * window + p % window) * num_kv_heads * D + c * 8;
    *(uint4 *)(k_window + w) = *(const uint4 *)(k_in + in);
    *(uint4 *)(v_window + w) = *(const uint4 *)(v_in + in);
}

/* ---- decode attention -------------------------------------------------------
   Block (sequence, kv head x head block, split), MUSTAFAR_WARPS warps.  Each
   warp walks 16-position tiles of the block's range with its own online
   softmax: records are staged into shared memory with 16-byte async copies
   one tile ahead, expanded to a dense [16][D] tile, multiplied on the tensor
   cores (S = Q K^T, then O += P V), and the warps are merged at the end. */

struct warp_state {
    float o[D / 8][4];     /* O fragment: rows g, g+8; channels 8n + 2t, +1 */
    float m[2], l[2];      /* running max (log2 units) and partial sums, rows g, g+8 */
};

/* Staged records are spaced so that the 16 rows of a tile start in 8
   different bank groups (stride / 16 odd): the decode's loads conflict at
   most 2-way instead of 4-way for a 96-byte record. */
#define STAGED(rec) ((rec) / 16 % 2 ? (rec) : (rec) + 16)
#define K_STAGED STAGED(K_RECORD)
#define V_STAGED STAGED(V_RECORD)
#define STAGE_BYTES (TILE * (K_STAGED + V_STAGED))
#define WARP_SMEM (2 * STAGE_BYTES + TILE * ROW * 2)

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

/* Dense tile rows from staged records; rows of positions outside [lo, hi)
   are zero.  Lane l decodes half l / 16 of the channels of row l % 16 by
   walking its set bits: the work is per kept element, not per channel. */
__device__ __forceinline__ void expand_tile(u16 *tile, const unsigned char *records, int record_bytes,
                                            int kept, int p0, int lo, int hi)
{
    const int lane = threadIdx.x & 31, tok = lane & 15, half = lane >> 4;
    const int p = p0 + tok;
    u16 *row = tile + tok * ROW + half * (D / 2);
#pragma unroll
    for (int c = 0; c < D / 16; c++) ((uint4 *)row)[c] = make_uint4(0, 0, 0, 0);
    if (p < lo || p >= hi) return;
    if (kept == D) {                       /* nothing pruned: the values are the row */
        const u32 *src = (const u32 *)(records + tok * record_bytes + BITMAP_BYTES) + half * (D / 4);
#pragma unroll
        for (int c = 0; c < D / 4; c++) ((u32 *)row)[c] = src[c];
        return;
    }
    const u32 *bitmap = (const u32 *)(records + tok * record_bytes);
    const u16 *vals = (const u16 *)(records + tok * record_bytes + BITMAP_BYTES);
    u32 words[D / 64];
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < D / 64; w++) {
        const u32 lo = bitmap[w], hi = bitmap[D / 64 + w];
        before += __popc(lo);
        total += __popc(lo) + __popc(hi);
        words[w] = half ? hi : lo;
    }
    if (total != kept) return;             /* corrupt record: its row stays zero */
    vals += half ? before : 0;
#pragma unroll
    for (int w = 0; w < D / 64; w++) {
        u32 word = words[w];
        u16 *out = row + 32 * w;
        while (word) {
            const int b = __ffs(word) - 1;
            word &= word - 1;
            out[b] = *vals++;
        }
    }
}

/* Dense tile rows from the window ring; rows outside [lo, hi) are zero. */
__device__ __forceinline__ void window_tile(u16 *tile, const u16 *ring, int row, int window,
                                            int head, int num_kv_heads, int p0, int lo, int hi)
{
    const int lane = threadIdx.x & 31;
    for (int i = lane; i < TILE * (D / 8); i += 32) {
        const int r = i / (D / 8), c = i % (D / 8), p = p0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (p >= lo && p < hi)
            v = *(const uint4 *)(ring + (((long long)row * window + p % window) * num_kv_heads + head) * D + c * 8);
        *(uint4 *)(tile + r * ROW + c * 8) = v;
    }
}

/* S = Q K^T for 16 positions, scaled to log2 units; positions outside
   [lo, hi) get -inf.  s[j][..]: n-tile j (positions 8j..8j+7). */
__device__ __forceinline__ void tile_scores(float s[2][4], const u16 *q_tile, const u16 *tile,
                                            float scale_log2, int p0, int lo, int hi)
{
    const int lane = threadIdx.x & 31, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) s[j][i] = 0.0f;
    const int mat = lane >> 3;
    const u16 *k_base = tile + ((mat >> 1) * 8 + (lane & 7)) * ROW + (mat & 1) * 8;
    const u16 *q_base = q_tile + ((mat & 1) * 8 + (lane & 7)) * ROW + (mat >> 1) * 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        u32 a[4], b[4];
        ldmatrix_x4(a, q_base + kk * 16);
        ldmatrix_x4(b, k_base + kk * 16);
        mma_16816(s[0], a, b);
        mma_16816(s[1], a, b + 2);
    }
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int p = p0 + 8 * j + 2 * t + (i & 1);
            s[j][i] = (p >= lo && p < hi) ? s[j][i] * scale_log2 : NEG_INF;
        }
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
            for (int n = 0; n < D / 8; n++) { st.o[n][2 * h] *= corr; st.o[n][2 * h + 1] *= corr; }
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

/* O += P V for the 16 positions of the dense V tile. */
__device__ __forceinline__ void tile_pv(warp_state &st, const u32 pa[4], const u16 *tile)
{
    const int lane = threadIdx.x & 31, mat = lane >> 3;
    const u16 *base = tile + ((mat & 1) * 8 + (lane & 7)) * ROW + (mat >> 1) * 8;
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
        u32 b[4];
        ldmatrix_x4_trans(b, base + n * 8);
        mma_16816(st.o[n], pa, b);
        mma_16816(st.o[n + 1], pa, b + 2);
    }
}

extern "C" __global__ void __launch_bounds__(MUSTAFAR_WARPS * 32, MIN_BLOCKS) mustafar_attention(
    const unsigned char *k_pages, const unsigned char *v_pages, const int *page_table,
    int table_stride, const u16 *k_window, const u16 *v_window, int window,
    const paged_seq *seqs, const u16 *q, u16 *out, float *partial_o, float *partial_ml,
    int num_kv_heads, int chunk, int splits, float scale_log2)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int head_blocks = (MUSTAFAR_GROUP + 15) / 16;
    const int kv_head = blockIdx.y / head_blocks, head_block = blockIdx.y % head_blocks;
    const int split = blockIdx.z, seq_index = blockIdx.x;
    const int q_head0 = kv_head * MUSTAFAR_GROUP + head_block * 16;
    const int rows = MUSTAFAR_GROUP - head_block * 16 < 16 ? MUSTAFAR_GROUP - head_block * 16 : 16;
    const int num_q_heads = num_kv_heads * MUSTAFAR_GROUP;
    const paged_seq sq = seqs[seq_index];
    const int length = sq.num_compressed + sq.num_window;
    const int begin = split * chunk;
    const int end = begin + chunk < length ? begin + chunk : length;
    const int *table = page_table + (long long)sq.row * table_stride;

    u16 *q_tile = (u16 *)smem;                                   /* [16][ROW] */
    unsigned char *warp_smem = smem + 16 * ROW * 2 + warp * WARP_SMEM;
    u16 *tile = (u16 *)(warp_smem + 2 * STAGE_BYTES);

    for (int i = threadIdx.x; i < 16 * (D / 8); i += blockDim.x) {
        const int r = i / (D / 8), c = i % (D / 8);
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows)
            v = *(const uint4 *)(q + ((long long)seq_index * num_q_heads + q_head0 + r) * D + c * 8);
        *(uint4 *)(q_tile + r * ROW + c * 8) = v;
    }
    __syncthreads();

    warp_state st;
#pragma unroll
    for (int n = 0; n < D / 8; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) st.o[n][i] = 0.0f;
    st.m[0] = st.m[1] = NEG_INF;
    st.l[0] = st.l[1] = 0.0f;

    const int compressed_end = end < sq.num_compressed ? end : sq.num_compressed;
    int p0 = begin + warp * TILE, stage_index = 0;
    if (p0 < compressed_end)
        prefetch_records(warp_smem, p0, compressed_end, k_pages, v_pages, table, kv_head, num_kv_heads);
    copy_commit();
    for (; p0 < end; p0 += MUSTAFAR_WARPS * TILE, stage_index ^= 1) {
        const int next = p0 + MUSTAFAR_WARPS * TILE;
        unsigned char *stage = warp_smem + stage_index * STAGE_BYTES;
        if (next < compressed_end)
            prefetch_records(warp_smem + (stage_index ^ 1) * STAGE_BYTES, next, compressed_end,
                             k_pages, v_pages, table, kv_head, num_kv_heads);
        copy_commit();
        copy_wait_all_but_one();
        __syncwarp();
        if (p0 < compressed_end) {
            float s[2][4];
            u32 pa[4];
            expand_tile(tile, stage, K_STAGED, MUSTAFAR_K_KEPT, p0, begin, compressed_end);
            __syncwarp();
            tile_scores(s, q_tile, tile, scale_log2, p0, begin, compressed_end);
            tile_softmax(st, s, pa);
            __syncwarp();
            expand_tile(tile, stage + TILE * K_STAGED, V_STAGED, MUSTAFAR_V_KEPT, p0, begin,
                        compressed_end);
            __syncwarp();
            tile_pv(st, pa, tile);
            __syncwarp();
        }
        if (p0 + TILE > sq.num_compressed && sq.num_window > 0) {
            const int lo = begin > sq.num_compressed ? begin : sq.num_compressed;
            float s[2][4];
            u32 pa[4];
            window_tile(tile, k_window, sq.row, window, kv_head, num_kv_heads, p0, lo, end);
            __syncwarp();
            tile_scores(s, q_tile, tile, scale_log2, p0, lo, end);
            tile_softmax(st, s, pa);
            __syncwarp();
            window_tile(tile, v_window, sq.row, window, kv_head, num_kv_heads, p0, lo, end);
            __syncwarp();
            tile_pv(st, pa, tile);
            __syncwarp();
        }
    }

    /* merge the warps: [warps][rows] max and sum, [warps][rows][D] O */
#pragma unroll
    for (int h = 0; h < 2; h++) {
        st.l[h] += __shfl_xor_sync(0xffffffffu, st.l[h], 1);
        st.l[h] += __shfl_xor_sync(0xffffffffu, st.l[h], 2);
    }
    __syncthreads();
    float *ml = (float *)smem;                                   /* [warps][16][2] */
    float *o = ml + MUSTAFAR_WARPS * 32;                         /* [warps][HEAD_ROWS][D] */
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = g + 8 * h;
        if (r < rows) {
            if (t == 0) {
                ml[(warp * 16 + r) * 2] = st.m[h];
                ml[(warp * 16 + r) * 2 + 1] = st.l[h];
            }
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                o[(warp * HEAD_ROWS + r) * D + 8 * n + 2 * t] = st.o[n][2 * h];
                o[(warp * HEAD_ROWS + r) * D + 8 * n + 2 * t + 1] = st.o[n][2 * h + 1];
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
