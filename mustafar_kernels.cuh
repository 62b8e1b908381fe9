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
     MUSTAFAR_APPEND_WIDE 1: only the wide append kernel (a library of its
                          own, built when a large append first needs it)

   Buffers (element = 16-bit fp16/bf16 bits; shapes outermost first):
     record      [D/8 bytes bitmap][KEPT elements][zero pad to 16 bytes]
     pages       [num_pages][Hkv][PAGE_SIZE][record]
     page_table  [rows][table_stride] int32 page ids
     window      [rows][window][Hkv][D] ring, position p at slot p % window
     q, out      [nseq][Hq][D]
     partial_o   [nseq][Hq][splits][D] float, unnormalised
     partial_ml  [nseq][Hq][splits][2] float: running max (log2 units), sum */

#ifndef MUSTAFAR_APPEND_WIDE
#define MUSTAFAR_APPEND_WIDE 0
#endif
#define D MUSTAFAR_D
#define BITMAP_BYTES (D / 8)
#define RECORD_BYTES(kept) (((BITMAP_BYTES + 2 * (kept) + 15) / 16) * 16)
#define K_RECORD RECORD_BYTES(MUSTAFAR_K_KEPT)
#define V_RECORD RECORD_BYTES(MUSTAFAR_V_KEPT)
#define TILE 16                            /* positions per warp tile = mma M/K */
#define HEAD_ROWS (MUSTAFAR_GROUP < 16 ? MUSTAFAR_GROUP : 16)
#define NEG_INF (-__int_as_float(0x7f800000))
/* attention blocks per SM the register budget is sized for: at D = 128 the
   V popcount decode and a group over 8 heads need 168 registers (3 blocks) */
#define MIN_BLOCKS                                                                         \
    (D == 256 ? 1                                                                          \
     : D == 128 && (MUSTAFAR_GROUP > 8 || MUSTAFAR_V_KEPT < D) ? 12 / MUSTAFAR_WARPS : 16 / MUSTAFAR_WARPS)

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

/* 2^x by the hardware approximation alone (one MUFU.EX2): exp2f adds a
   range fix-up (compare, two conditional multiplies) for results below
   2^-126.  The softmax weights do not need it: they are taken relative to
   the running maximum, whose own weight is 1, so a weight that flushes to
   zero was below 2^-126 of the sum. */
__device__ __forceinline__ float fast_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
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

/* 16-byte global -> shared copy to shared address `dst`; asynchronous from
   sm_80 on. */
__device__ __forceinline__ void copy16(u32 dst, const void *src)
{
#if MUSTAFAR_SM >= 80
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
#else
    const uint4 x = *(const uint4 *)src;
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(dst), "r"(x.x), "r"(x.y), "r"(x.z),
                 "r"(x.w) : "memory");
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

/* ---- pruning: a group of D/32 lanes per token vector ------------------------
   Lane j of a group holds channels [32j, 32j+32) as 16 packed pairs, so its
   keep bits are bitmap word j.  The kept set is the KEPT largest magnitude
   keys (bits & 0x7fff), ties to the lower channel: a binary search finds
   the largest threshold t with count(key >= t) >= KEPT, every key above t is
   kept, then the first ties in channel order.  Counting is SIMD within a
   register: for a field of n+1 bits holding k < 2^n, k + (2^n - t) sets the
   field's top bit exactly when k >= t and cannot carry out of the field.
   The search takes t's bits in three passes, cheapest fields first:
     bits 14..8  7 steps on 4 byte fields per word (key >> 8)
     bits  7..1  7 steps on 4 byte fields per word: (key >> 1) & 0x7f for the
                 keys whose bits 14..8 equal the first pass's result, 0x7f
                 for keys above it, 0 for keys below
     bit   0     1 step on the 2 halves of each packed pair. */

#define VEC_LANES (D / 32)                  /* lanes per vector: 2, 4 or 8 */
#define BLOCK_VECTORS (256 / VEC_LANES)     /* vectors per 256-thread block */
#define PAIRS 16                            /* packed element pairs per lane */

__device__ __forceinline__ int group_lane()
{
    return (threadIdx.x & 31) % VEC_LANES;
}
__device__ __forceinline__ int group_sum(int v)
{
#pragma unroll
    for (int o = 1; o < VEC_LANES; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ int group_exclusive_scan(int v)
{
    const int j = group_lane();
    int s = v;
#pragma unroll
    for (int o = 1; o < VEC_LANES; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, s, o);
        if (j >= o) s += n;
    }
    return s - v;
}

/* The lane's 32 channels of a vector (16-byte aligned, global memory). */
__device__ __forceinline__ void load_part(u32 x[PAIRS], const u16 *vec)
{
    const uint4 *src = (const uint4 *)(vec + 32 * group_lane());
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint4 w = src[i];
        x[4 * i] = w.x; x[4 * i + 1] = w.y; x[4 * i + 2] = w.z; x[4 * i + 3] = w.w;
    }
}
__device__ __forceinline__ void store_part(u16 *vec, const u32 x[PAIRS])
{
    uint4 *dst = (uint4 *)(vec + 32 * group_lane());
#pragma unroll
    for (int i = 0; i < 4; i++) dst[i] = make_uint4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
}

__device__ __forceinline__ u32 pair_bias(int t)   /* t in [0, 0x8000] */
{
    return 0x80008000u - (u32)t * 0x10001u;
}
__device__ __forceinline__ u32 byte_bias(int t)   /* t in [0, 0x80] */
{
    return 0x80808080u - (u32)t * 0x01010101u;
}
/* Number of keys >= t in the vector. */
__device__ __forceinline__ int count_at_least(const u32 key[PAIRS], int t)
{
    const u32 bias = pair_bias(t);
    u32 acc = 0;                              /* two 16-bit counts */
#pragma unroll
    for (int r = 0; r < PAIRS; r++) acc += ((key[r] + bias) & 0x80008000u) >> 15;
    return group_sum((int)((acc & 0xffffu) + (acc >> 16)));
}
/* Number of 7-bit byte fields >= t (t in [1, 127]) in the vector. */
__device__ __forceinline__ int count_bytes_at_least(const u32 field[PAIRS / 2], int t)
{
    const u32 bias = byte_bias(t);
    u32 acc = 0;                              /* four 8-bit counts */
#pragma unroll
    for (int i = 0; i < PAIRS / 2; i++) acc += ((field[i] + bias) & 0x80808080u) >> 7;
    return group_sum((int)((acc * 0x01010101u) >> 24));
}
/* The largest t in [0, 127] with at least `kept` fields >= t. */
__device__ __forceinline__ int search_bytes(const u32 field[PAIRS / 2], int kept)
{
    int t = 0;
#pragma unroll
    for (int step = 64; step > 0; step >>= 1)
        if (count_bytes_at_least(field, t + step) >= kept) t += step;
    return t;
}
/* The lane's keep bits of the keys >= t.  The flags of pair r (bits 15 and
   31 of key + bias) gather at bits r and 16 + r, one shift-add per pair;
   then the two halves interleave into channel order. */
__device__ __forceinline__ u32 bits_at_least(const u32 key[PAIRS], int t)
{
    const u32 bias = pair_bias(t);
    u32 x = 0;
#pragma unroll
    for (int r = 0; r < PAIRS; r++) x = (x >> 1) + ((key[r] + bias) & 0x80008000u);
    x = __byte_perm(x, 0, 0x3120);
    x = (x & 0xf00ff00fu) | ((x & 0x00f000f0u) << 4) | ((x >> 4) & 0x00f000f0u);
    x = (x & 0xc3c3c3c3u) | ((x & 0x0c0c0c0cu) << 2) | ((x >> 2) & 0x0c0c0c0cu);
    return (x & 0x99999999u) | ((x & 0x22222222u) << 1) | ((x >> 1) & 0x22222222u);
}

/* The lane's keep bits.  Every lane of the warp must call it (shuffles). */
__device__ __forceinline__ u32 select_kept(const u32 x[PAIRS], int kept)
{
    u32 key[PAIRS];
#pragma unroll
    for (int r = 0; r < PAIRS; r++) key[r] = x[r] & 0x7fff7fffu;
    u32 field[PAIRS / 2];
#pragma unroll
    for (int i = 0; i < PAIRS / 2; i++) field[i] = __byte_perm(key[2 * i], key[2 * i + 1], 0x7531);
    const int high = search_bytes(field, kept);
    const u32 ge = byte_bias(high), gt = byte_bias(high + 1);
#pragma unroll
    for (int i = 0; i < PAIRS / 2; i++) {
        const u32 low = __byte_perm(key[2 * i] >> 1, key[2 * i + 1] >> 1, 0x6420) & 0x7f7f7f7fu;
        const u32 at = (field[i] + ge) & 0x80808080u, above = (field[i] + gt) & 0x80808080u;
        field[i] = (low & (at - (at >> 7))) | (above - (above >> 7));
    }
    int t = (high << 8) + (search_bytes(field, kept) << 1);
    if (count_at_least(key, t + 1) >= kept) t += 1;
    const u32 at_least = bits_at_least(key, t);
    if (!__any_sync(0xffffffffu, group_sum(__popc(at_least)) > kept)) return at_least;
    /* some vector has more ties at t than places left: first ties win */
    const u32 above = bits_at_least(key, t + 1);
    u32 ties = at_least & ~above, keep = above;
    int allowed = kept - group_sum(__popc(above)) - group_exclusive_scan(__popc(ties));
    for (; allowed > 0 && ties; allowed--) {
        keep |= ties & (0u - ties);
        ties &= ties - 1u;
    }
    return keep;
}

/* Writes the vector's record (keep bits from select_kept) into the group's
   shared staging `rec`, then copies it to `dst` (global) in 16-byte stores
   if `store`.  Every lane of the warp must call it. */
__device__ __forceinline__ void compress_part(const u32 x[PAIRS], u32 keep, unsigned char *rec,
                                              int record_bytes, unsigned char *dst, bool store)
{
    const int j = group_lane();
    if (j == 0) *(uint4 *)(rec + record_bytes - 16) = make_uint4(0, 0, 0, 0);  /* padding */
    __syncwarp();
    ((u32 *)rec)[j] = keep;
    u16 *vals = (u16 *)(rec + BITMAP_BYTES) + group_exclusive_scan(__popc(keep));
#pragma unroll
    for (int r = 0; r < PAIRS; r++) {
        if (keep >> (2 * r) & 1u) *vals++ = (u16)x[r];
        if (keep >> (2 * r + 1) & 1u) *vals++ = (u16)(x[r] >> 16);
    }
    __syncwarp();
    if (store)
        for (int i = j; i < record_bytes / 16; i += VEC_LANES)
            ((uint4 *)dst)[i] = ((const uint4 *)rec)[i];
    __syncwarp();
}

/* The lane's 32 channels of a record, zeros where pruned.  Reads at most
   `kept` values, so a corrupt bitmap cannot read past the record. */
__device__ __forceinline__ void expand_part(u32 x[PAIRS], const unsigned char *rec, int kept)
{
    const u32 *words = (const u32 *)rec;
    const int j = group_lane();
    int idx = 0;
    for (int w = 0; w < j; w++) idx += __popc(words[w]);
    const u32 word = words[j];
    const u16 *vals = (const u16 *)(rec + BITMAP_BYTES);
#pragma unroll
    for (int r = 0; r < PAIRS; r++) {
        u32 lo = 0, hi = 0;
        if ((word >> (2 * r) & 1u) && idx < kept) lo = vals[idx++];
        if ((word >> (2 * r + 1) & 1u) && idx < kept) hi = vals[idx++];
        x[r] = lo | (hi << 16);
    }
}

/* ---- stateless record operations ------------------------------------------ */

#define OP_PRUNE 0
#define OP_COMPRESS 1
#define OP_DECOMPRESS 2

#if !MUSTAFAR_APPEND_WIDE
extern "C" __global__ void __launch_bounds__(256) mustafar_records(int op, const void *in, void *out,
                                                                    long long count)
{
    __shared__ __align__(16) unsigned char stage[BLOCK_VECTORS][RECORD_BYTES(D)];
    const int group = threadIdx.x / VEC_LANES;
    const long long first = (long long)blockIdx.x * BLOCK_VECTORS + (threadIdx.x & ~31) / VEC_LANES;
    const long long vec = (long long)blockIdx.x * BLOCK_VECTORS + group;
    const bool valid = vec < count;
    if (first >= count) return;               /* whole warp past the end */
    u32 x[PAIRS];
    if (op == OP_DECOMPRESS) {
        if (!valid) return;
        expand_part(x, (const unsigned char *)in + vec * K_RECORD, MUSTAFAR_K_KEPT);
        store_part((u16 *)out + vec * D, x);
        return;
    }
#pragma unroll
    for (int r = 0; r < PAIRS; r++) x[r] = 0;
    if (valid) load_part(x, (const u16 *)in + vec * D);
    const u32 keep = select_kept(x, MUSTAFAR_K_KEPT);
    if (op == OP_COMPRESS) {
        compress_part(x, keep, stage[group], K_RECORD, (unsigned char *)out + vec * K_RECORD, valid);
    } else if (valid) {
#pragma unroll
        for (int r = 0; r < PAIRS; r++)
            x[r] &= (keep >> (2 * r) & 1u ? 0xffffu : 0u) | (keep >> (2 * r + 1) & 1u ? 0xffff0000u : 0u);
        store_part((u16 *)out + vec * D, x);
    }
}
#endif

/* ---- append: compress tokens into pages, fill the dense window -------------
   Items [0, compress_total) are positions compressed into pages (from the
   window ring or the input); the rest are positions entering the window.
   Each (item, KV head) is a unit of work for one lane group: its K and V
   vectors one after the other (pair_kv, large appends: the item's job,
   page and ring slot are found once for both), or one of the two (small
   appends: twice the groups, half the latency).  A new position p goes to
   ring slot p % window, whose current occupant (the old window position q
   with the same slot) may be compressed by this same call: then the group
   that compresses q writes p after it has read the slot (each lane rewrites
   only the channels it read itself), and the window item of p does nothing.
   Window entries span at most `window` positions, so each slot receives at
   most one. */

/* Job and patch lists travel in the kernel parameters when they fit: an
   upload puts a copy between two kernels on the stream and makes the host
   wait for the previous upload.  Decode steps use a small parameter block
   (cheap to launch), larger appends such as prefill chunks a wide one
   (30 KB, under the 32 KB limit of kernel parameters). */
#define INLINE_JOBS 48
#define INLINE_PATCHES 96
#define WIDE_JOBS 128
#define WIDE_PATCHES 3072
template <int JOBS, int PATCHES>
struct append_inline {
    int njobs, npatches;                     /* 0: use the global arrays */
    append_job jobs[JOBS];
    int patches[2 * PATCHES];
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

template <typename Inline>
__device__ __forceinline__ void append_body(
    const Inline &inl, const append_job *global_jobs, int njobs, const int *global_patches,
    int npatches, int compress_total, int window_total, int num_kv_heads, int pair_kv,
    const u16 *k_in, const u16 *v_in, unsigned char *k_pages, unsigned char *v_pages,
    int *page_table, int table_stride, u16 *k_window, u16 *v_window, int window)
{
    __shared__ __align__(16) unsigned char stage[BLOCK_VECTORS][RECORD_BYTES(D)];
#if MUSTAFAR_SM >= 90
    /* A programmatic dependent like the attention: ready early, then waits
       for the kernel before it (whose reads of the ring this overwrites).
       The next kernel may start once every block is past the wait: all
       work queued before this one is then complete, which a decode step's
       attention relies on to read q and the older records at once. */
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    const append_job *jobs = inl.njobs ? inl.jobs : global_jobs;
    const int *patches = inl.njobs ? inl.patches : global_patches;
    const int group = threadIdx.x / VEC_LANES;
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < npatches; i += blockDim.x)
            page_table[patches[2 * i]] = patches[2 * i + 1];
    const long long units = ((long long)compress_total + window_total) * num_kv_heads << (pair_kv ? 0 : 1);
    const long long first = (long long)blockIdx.x * BLOCK_VECTORS + (threadIdx.x & ~31) / VEC_LANES;
    const long long unit = (long long)blockIdx.x * BLOCK_VECTORS + group;
    if (first >= units) return;               /* whole warp past the end */
    const bool valid = unit < units;
    const long long item = pair_kv ? unit : unit >> 1;
    const int kv_first = pair_kv ? 0 : (int)(unit & 1), kv_end = pair_kv ? 2 : kv_first + 1;
    const int g = (int)(item / num_kv_heads), head = (int)(item % num_kv_heads);
    const bool compress = valid && g < compress_total;

    /* The record slot and element offsets (-1: none) of this item, the same
       for K and V: the vector to compress (in the ring or the input), the
       ring slot written, the input vector written there. */
    long long slot = 0, source = -1, ring = -1, successor = -1;
    bool from_ring = false;
    if (compress) {
        const append_job j = jobs[find_job(jobs, njobs, g, false)];
        const int p = j.old_compressed + (g - j.compress_offset);
        const int page_index = p / MUSTAFAR_PAGE_SIZE;
        const int page = page_index >= j.pages_before
                             ? patches[2 * (j.first_patch + page_index - j.pages_before) + 1]
                             : page_table[(long long)j.row * table_stride + page_index];
        slot = ((long long)page * num_kv_heads + head) * MUSTAFAR_PAGE_SIZE + p % MUSTAFAR_PAGE_SIZE;
        if (p < j.old_length) {              /* compressed from the ring */
            ring = (((long long)j.row * window + p % window) * num_kv_heads + head) * D;
            source = ring;
            from_ring = true;
            const int first_new = j.old_length > j.new_compressed ? j.old_length : j.new_compressed;
            const int next = first_new + ((p - first_new) % window + window) % window;
            if (next < j.old_length + j.new_tokens)
                successor = ((long long)(j.input_offset + next - j.old_length) * num_kv_heads + head) * D;
        } else {
            source = ((long long)(j.input_offset + p - j.old_length) * num_kv_heads + head) * D;
        }
    } else if (valid) {                       /* enters the window */
        const int w = g - compress_total;
        const append_job j = jobs[find_job(jobs, njobs, w, true)];
        const int first_new = j.old_length > j.new_compressed ? j.old_length : j.new_compressed;
        const int p = first_new + (w - j.window_offset);
        const int occupant = j.old_compressed + ((p - j.old_compressed) % window + window) % window;
        if (!(occupant < j.old_length && occupant < j.new_compressed)) {   /* else written above */
            successor = ((long long)(j.input_offset + p - j.old_length) * num_kv_heads + head) * D;
            ring = (((long long)j.row * window + p % window) * num_kv_heads + head) * D;
        }
    }

#pragma unroll 1
    for (int kv = kv_first; kv < kv_end; kv++) {
        const u16 *in = kv ? v_in : k_in;
        u16 *ring_base = kv ? v_window : k_window;
        u32 x[PAIRS];
#pragma unroll
        for (int r = 0; r < PAIRS; r++) x[r] = 0;
        if (compress) load_part(x, (from_ring ? ring_base : in) + source);
        if (successor >= 0) {                 /* the ring slot's new entry, once the lane has read */
            u32 y[PAIRS];                     /* its channels of the old one: both loads in flight */
            load_part(y, in + successor);     /* together (a small append is latency-bound) */
            store_part(ring_base + ring, y);
        }
        if (__any_sync(0xffffffffu, compress)) {
            const int record = kv ? V_RECORD : K_RECORD;
            const u32 keep = select_kept(x, kv ? MUSTAFAR_V_KEPT : MUSTAFAR_K_KEPT);
            compress_part(x, keep, stage[group], record, (kv ? v_pages : k_pages) + slot * record, compress);
        }
    }
}

#define APPEND_KERNEL(name, JOBS, PATCHES)                                                          \
    extern "C" __global__ void __launch_bounds__(256, 4) name(                                      \
        const __grid_constant__ append_inline<JOBS, PATCHES> inl, const append_job *global_jobs,    \
        int njobs, const int *global_patches, int npatches, int compress_total, int window_total,  \
        int num_kv_heads, int pair_kv, const u16 *k_in, const u16 *v_in, unsigned char *k_pages,   \
        unsigned char *v_pages, int *page_table, int table_stride, u16 *k_window,                 \
        u16 *v_window, int window)                                                                  \
    {                                                                                               \
        append_body(inl, global_jobs, njobs, global_patches, npatches, compress_total,             \
                    window_total, num_kv_heads, pair_kv, k_in, v_in, k_pages, v_pages, page_table, \
                    table_stride, k_window, v_window, window);                                     \
    }
/* 4 blocks (64 registers) per SM: left alone, ptxas gives the K/V loop 77
   registers and the SM 3 blocks */
#if MUSTAFAR_APPEND_WIDE
APPEND_KERNEL(mustafar_append_wide, WIDE_JOBS, WIDE_PATCHES)
#else
APPEND_KERNEL(mustafar_append, INLINE_JOBS, INLINE_PATCHES)
#endif

/* ---- decode attention -------------------------------------------------------
   Block (sequence, KV head x head block, split), MUSTAFAR_WARPS warps.  Each
   warp walks 16-position tiles of the block's range with its own online
   softmax: records are staged into shared memory with 16-byte async copies
   STAGES - 1 tiles ahead and decoded straight into tensor-core fragments in
   registers; the warps are merged at the end.

   Both products run transposed, so that the query heads (often only 4 or 8
   per KV head) are the mma's 8-wide N dimension instead of padding its
   16-high M dimension:
     S^T = K Q^T    M = 16 positions, N = 8 heads, K = channels
     O^T = V^T P^T  M = 16 channels,  N = 8 heads, K = 16 positions
   and P^T comes from S^T by an in-register 8x8 transpose (movmatrix).

   K: channel runs.  A dot product does not depend on the order of its
   terms, so each thread takes whole runs of channels instead of the mma
   fragment's interleave, and decodes a run with one popcount: k index
   {2t, 2t+1, 2t+8, 2t+9} of k-step kk is channel KC*t + 4*kk + {0, 1, 2, 3},
   thread t owns a run of KC = D/4.

   V: popcount mmas.  Pruned V records (V_KEPT < D) are decoded by
   single-bit m16n8k128 mmas with AND, rows = channels and columns =
   records: for channel c of record r one mma gives the shared address of
   c's value, (start of r's values) + 2 * popc(bitmap_r & bits below c),
   and another c's bit; a channel pruned away reads a shared zero instead.
   The output is V^T's A fragment as it is, in the fragment's own channel
   order (row g of m-tile mm is channel 16*mm + g, row g+8 is 16*mm + g + 8),
   at one multiply-add, one 16-bit load and half a pack per slot.  Dense V
   records (V_KEPT == D) are read in runs instead: row g of m-tile mm is
   channel VC*g + mm, row g+8 is VC*g + D/16 + mm, thread g owns a run of
   VC = D/8 channels.
   Lane = 4*g + t as in the mma fragments. */

#define KC (D / 4)
#define VC (D / 8)
#define MT (D / 16)                          /* m-tiles of O^T */
#define NT (MUSTAFAR_GROUP > 8 ? 2 : 1)      /* n-tiles of 8 heads per block */
#define HEADS_PER_BLOCK (8 * NT)
#define V_POPC (MUSTAFAR_V_KEPT < D)         /* V decoded by popcount mmas, fragment channel order */
#if KC > 32
typedef u64 k_run;                          /* D = 256: a K run is 64 channels */
#else
typedef u32 k_run;
#endif

struct warp_state {
    float o[NT][MT][4];    /* O^T fragment: rows g, g+8 of m-tile mm (channels above); heads 2t, 2t+1 */
    float m[NT][2], l[NT][2];  /* running max (log2 units) and partial sums of heads 2t, 2t+1 */
};

/* Channel of O^T row g (+8 with `high`) of m-tile mm for this thread. */
__device__ __forceinline__ int o_channel(int mm, bool high)
{
    const int g = (threadIdx.x & 31) >> 2;
#if V_POPC
    return 16 * mm + g + (high ? 8 : 0);
#else
    return VC * g + mm + (high ? MT : 0);
#endif
}

/* Staged records are spaced so that the 16 rows of a tile start in 8
   different bank groups (stride / 16 odd): decode loads conflict at most
   2-way instead of 4-way for a 96-byte record. */
#define STAGED(rec) ((rec) / 16 % 2 ? (rec) : (rec) + 16)
#define K_STAGED STAGED(K_RECORD)
#define V_STAGED STAGED(V_RECORD)
#define STAGE_BYTES (TILE * (K_STAGED + V_STAGED))
/* Shared memory (mustafar__attention_smem on the host): the stages, reused
   by the merge, 2*D bytes that a corrupt record's decode may read past
   them, then 16 zero bytes that pruned V channels read. */
#define LOOP_BYTES (MUSTAFAR_WARPS * MUSTAFAR_STAGES * STAGE_BYTES)
#define MERGE_BYTES (MUSTAFAR_WARPS * 32 * 4 + MUSTAFAR_WARPS * HEAD_ROWS * D * 4)
#define ZERO_OFFSET ((LOOP_BYTES > MERGE_BYTES ? LOOP_BYTES : MERGE_BYTES) + 2 * D)

/* Page id for the prefetch of the tile at p0 (0 past `end`), loaded one
   tile before the copies that need it, so that the page-table latency hides
   behind a tile of work.  Tiles start at multiples of TILE (the host keeps
   split chunks multiples of the warp sweep): when TILE divides the page size
   a tile lies in one page; otherwise lane l holds the page of position
   p0 + l % 16. */
__device__ __forceinline__ int lane_page(const int *table, int p0, int end)
{
#if MUSTAFAR_PAGE_SIZE % TILE == 0
    return p0 < end ? table[p0 / MUSTAFAR_PAGE_SIZE] : 0;
#else
    const int p = p0 + (threadIdx.x & 15);
    return p < end ? table[p / MUSTAFAR_PAGE_SIZE] : 0;
#endif
}

/* Queues the first `count` records of a tile (all 16 when FULL), each
   RECORD bytes in global memory and staged STAGED_BYTES apart from shared
   address `dst` on, as 16-byte chunks: lane l copies chunks l, l + 32, ...,
   so that one copy instruction of the warp reads 512 contiguous bytes of a
   page when TILE divides the page size (whole sectors, not one 16-byte
   piece of 32 records), else runs of consecutive records per page. */
template <int RECORD, int STAGED_BYTES, bool FULL>
__device__ __forceinline__ void copy_records(u32 dst, const unsigned char *pages, int page, int p0,
                                             int count, int head, int num_kv_heads)
{
    const int lane = threadIdx.x & 31;
    const int chunks = RECORD / 16;
#if MUSTAFAR_PAGE_SIZE % TILE == 0
    const unsigned char *src = pages + (((long long)page * num_kv_heads + head) * MUSTAFAR_PAGE_SIZE +
                                        p0 % MUSTAFAR_PAGE_SIZE) * RECORD + 16 * lane;
#endif
#pragma unroll
    for (int i = 0; i < (TILE * chunks + 31) / 32; i++) {
        const int j = lane + 32 * i, tok = j / chunks;
#if MUSTAFAR_PAGE_SIZE % TILE != 0
        const int tok_page = __shfl_sync(0xffffffffu, page, tok & 15);
        const long long slot = ((long long)tok_page * num_kv_heads + head) * MUSTAFAR_PAGE_SIZE +
                               (p0 + tok) % MUSTAFAR_PAGE_SIZE;
        const unsigned char *src = pages + ((slot - tok) * RECORD + 16 * lane);   /* chunk j at src + 512 i */
#endif
        if (j < TILE * chunks && (FULL || tok < count))
            copy16(dst + 16 * j + (STAGED_BYTES - RECORD) * tok, src + 512 * i);
    }
}

/* Queues the K and V records of the tile's compressed positions
   [p0, p0+16) below `end` into the stage at shared address `stage`. */
__device__ __forceinline__ void prefetch_records(u32 stage, int p0, int end, int page,
                                                 const unsigned char *k_pages,
                                                 const unsigned char *v_pages, int head,
                                                 int num_kv_heads)
{
    if (p0 + TILE <= end) {
        copy_records<K_RECORD, K_STAGED, true>(stage, k_pages, page, p0, TILE, head, num_kv_heads);
        copy_records<V_RECORD, V_STAGED, true>(stage + TILE * K_STAGED, v_pages, page, p0, TILE, head,
                                               num_kv_heads);
    } else {
        copy_records<K_RECORD, K_STAGED, false>(stage, k_pages, page, p0, end - p0, head, num_kv_heads);
        copy_records<V_RECORD, V_STAGED, false>(stage + TILE * K_STAGED, v_pages, page, p0, end - p0,
                                                head, num_kv_heads);
    }
}

/* Where a thread's channel run [first, first + N) lies in every record, as
   lane constants made once per kernel: below[i] is 1 if bitmap word i lies
   wholly below `first`, else 0; `low` masks the bits of the run's own word
   below it (runs shorter than 32 channels).  With them a run start takes
   multiply-adds (FMA pipe) instead of selects (ALU pipe, which the decode
   slots fill). */
template <int N>
struct run_place {
    int first;
    int below[D / 32 - 1];
    u32 low;
};
template <int N>
__device__ __forceinline__ run_place<N> make_run_place(int first)
{
    run_place<N> pl;
    pl.first = first;
#pragma unroll
    for (int i = 0; i < D / 32 - 1; i++)   /* through a shuffle: ptxas would turn a known 0/1 factor into a select */
        pl.below[i] = __shfl_sync(0xffffffffu, (int)(32 * (i + 1) <= first), threadIdx.x & 31);
    pl.low = (1u << (first % 32)) - 1u;
    return pl;
}

/* The run of a staged record (N = 8..64 channels, first a multiple of N):
   its bits (zero for a position outside the range, `valid` false) and the
   index of its first kept value.  The bitmap comes in whole 8-byte loads
   (its last word is not needed); the run's bits and, for runs shorter than
   a word, its own word are loaded again at their lane-dependent offsets
   rather than picked from w[], which a runtime index would put in local
   memory.  Records are trusted to keep exactly KEPT elements; a corrupt one
   can only make the decode read other bytes of the shared-memory staging
   (padded for that), never outside it. */
template <int N, typename R>
__device__ __forceinline__ int run_start(const unsigned char *rec, const run_place<N> &pl, bool valid, R &bits)
{
    static_assert(N == 8 || N == 16 || N == 32 || N == 64, "runs are 8, 16, 32 or 64 channels");
    u32 w[D / 32];
#pragma unroll
    for (int i = 0; i < D / 32; i += 2) {
        const uint2 x = *(const uint2 *)(rec + 4 * i);
        w[i] = x.x;
        w[i + 1] = x.y;
    }
    int before = 0;
#pragma unroll
    for (int i = 0; i < D / 32 - 1; i++) before += __popc(w[i]) * pl.below[i];
    const unsigned char *own = rec + pl.first / 8;      /* aligned: first is a multiple of N */
    R b;
    if (N == 64) b = (R)*(const u64 *)own;
    else if (N == 32) b = (R)*(const u32 *)own;
    else if (N == 16) b = (R)*(const u16 *)own;
    else b = (R)*own;
    if (N < 32) before += __popc(*(const u32 *)(rec + pl.first / 32 * 4) & pl.low);
    bits = valid ? b : (R)0;
    return before;
}

/* One channel of a staged record: the kept value at shared address `addr`
   if bit k of the run word is set, else zero; `addr` then moves past a
   value taken.  Three instructions and the load: the masked bit is both the
   load's predicate and, shifted, the address step. */
__device__ __forceinline__ u32 take_value(u32 &addr, u32 word, int k)
{
    const u32 bit = word & (1u << k);
    u32 x;
    asm("{ .reg .pred p; setp.ne.u32 p, %2, 0; mov.u32 %0, 0; @p ld.shared.u16 %0, [%1]; }"
        : "=r"(x) : "r"(addr), "r"(bit));
    addr += (bit >> k) << 1;
    return x;
}

/* Two zero-extended 16-bit values as a packed pair, by a multiply-add: the
   FMA pipe has room, the ALU pipe (where a byte permute runs) does not. */
__device__ __forceinline__ u32 pack_halves(u32 lo, u32 hi)
{
    return hi * 0x10000u + lo;
}

/* Channels c, c+1 of a run (c even) as a packed pair. */
__device__ __forceinline__ u32 take_pair(u32 &addr, u32 word, int c)
{
    const u32 lo = take_value(addr, word, c % 32);
    return pack_halves(lo, take_value(addr, word, c % 32 + 1));
}

/* D = C + popc(A AND B) for single-bit matrices A (16 x 128) and B (128 x
   8): a[0] holds bits 32t..32t+31 of row g of A, a[1] of row g+8; b bits
   32t..32t+31 of column g of B; c and d rows g, g+8 and columns 2t, 2t+1
   as in the fp16 mma.  Before sm_80 (no single-bit mma with AND) the same
   contract is computed with shuffles. */
__device__ __forceinline__ void popc_mma(int d[4], const u32 a[2], u32 b, const int c[4])
{
#if MUSTAFAR_SM >= 80
    asm("mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc "
        "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
#else
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; i++) d[i] = c[i];
#pragma unroll
    for (int s = 0; s < 4; s++) {   /* bits 32s..32s+31 of k live in lanes 4 * row + s */
        const u32 a0 = __shfl_sync(0xffffffffu, a[0], 4 * g + s);
        const u32 a1 = __shfl_sync(0xffffffffu, a[1], 4 * g + s);
        const u32 b0 = __shfl_sync(0xffffffffu, b, 8 * t + s);
        const u32 b1 = __shfl_sync(0xffffffffu, b, 8 * t + 4 + s);
        d[0] += __popc(a0 & b0);
        d[1] += __popc(a0 & b1);
        d[2] += __popc(a1 & b0);
        d[3] += __popc(a1 & b1);
    }
#endif
}

/* The A operands of the popcount mmas (rows = channels), lane constants
   made once per kernel: rows g and g+8 of an m-tile with mm % 2 == h are
   channels 16h + g and 16h + g + 8 of bitmap word mm / 2.  Every lane
   passes the same bitmap word as its 32 bits of B, so a mask set in lanes
   t < 2 counts twice (a byte offset) and one set in lane t == 0 once (the
   channel's own bit):
     all       every bit                      (lanes t < 2)
     below[h]  the bits below the row's channel (lanes t < 2)
     bit[h]    the row's channel               (lane t == 0) */
struct popc_masks {
    u32 all[2], below[2][2], bit[2][2];
};
__device__ __forceinline__ popc_masks make_popc_masks()
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    popc_masks mk;
    mk.all[0] = mk.all[1] = t < 2 ? ~0u : 0u;
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const u32 bit = 1u << (16 * h + 8 * r + g);
            mk.below[h][r] = t < 2 ? bit - 1u : 0u;
            mk.bit[h][r] = t == 0 ? bit : 0u;
        }
    return mk;
}

/* A tile's 16 staged V records, for the popcount decode (columns =
   records: n-tile nv holds records 8nv..8nv+7).  w[i][nv]: bitmap word i
   of record g + 8nv, the mmas' B operand (all zero for a position outside
   the range, whose channels then all read the shared zero).  start[nv]:
   the shared address of the current word's first value minus `zero` for
   records 8nv + 2t and 8nv + 2t + 1 (columns 2t, 2t+1: the rank mma's
   accumulator input). */
struct popc_rows {
    u32 w[D / 32][2];
    int start[2][4];
};
template <int STAGED_BYTES>
__device__ __forceinline__ void load_popc_rows(popc_rows &pr, const unsigned char *records, bool valid0,
                                               bool valid1, u32 zero)
{
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int nv = 0; nv < 2; nv++) {
        const unsigned char *rec = records + (g + 8 * nv) * STAGED_BYTES;
        const bool valid = nv ? valid1 : valid0;
#pragma unroll
        for (int i = 0; i < D / 32; i++) pr.w[i][nv] = valid ? *(const u32 *)(rec + 4 * i) : 0u;
        const int first = (int)(smem_addr(records + (8 * nv + 2 * t) * STAGED_BYTES + BITMAP_BYTES) - zero);
        pr.start[nv][0] = pr.start[nv][2] = first;
        pr.start[nv][1] = pr.start[nv][3] = first + STAGED_BYTES;
    }
}

/* Channels 16mm + g (y[nv][0]) and 16mm + g + 8 (y[nv][1]) of records
   8nv + 2t and 8nv + 2t + 1, as packed pairs; a pruned channel reads the
   shared zero.  Called for mm = 0, 1, 2, ... in order: the first m-tile of
   each word moves `start` past the word before, by a popcount mma too.
   Records are trusted to keep exactly KEPT elements; a corrupt one can
   only make the decode read other bytes of the shared-memory staging
   (padded for that), never outside it. */
__device__ __forceinline__ void decode_mtile(u32 y[2][2], popc_rows &pr, int mm, const popc_masks &mk, u32 zero)
{
    const int word = mm / 2, h = mm % 2, none[4] = {0, 0, 0, 0};
#pragma unroll
    for (int nv = 0; nv < 2; nv++) {
        if (h == 0 && word > 0) popc_mma(pr.start[nv], mk.all, pr.w[word - 1][nv], pr.start[nv]);
        int rank[4], bit[4];
        popc_mma(rank, mk.below[h], pr.w[word][nv], pr.start[nv]);
        popc_mma(bit, mk.bit[h], pr.w[word][nv], none);
        u32 v[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 addr = (u32)(bit[i] * rank[i]) + zero;
            asm("ld.shared.u16 %0, [%1];" : "=r"(v[i]) : "r"(addr));
        }
        y[nv][0] = pack_halves(v[0], v[1]);
        y[nv][1] = pack_halves(v[2], v[3]);
    }
}

/* The decode's lane constants, made once per kernel. */
struct decode_consts {
    run_place<KC> k_place;     /* this thread's K run */
    popc_masks mk;             /* the popcount mmas' A operands (V) */
    u32 zero;                  /* shared address of the 16 zero bytes */
};

__device__ __forceinline__ u32 transpose8x8(u32 x)
{
    u32 y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

/* Q^T fragments (B operand) of the KC-channel run of this thread: head
   8*nt + g of the block, zero past `rows`. */
__device__ __forceinline__ void load_q(u32 qb[NT][MT][2], const u16 *q, int rows)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int kk = 0; kk < MT; kk++) {
            uint2 x = make_uint2(0, 0);
            if (8 * nt + g < rows) x = *(const uint2 *)(q + (8 * nt + g) * D + KC * t + 4 * kk);
            qb[nt][kk][0] = x.x;
            qb[nt][kk][1] = x.y;
        }
}

/* S^T tile: rows g, g+8 are positions p0 + g, p0 + g + 8; scaled to log2
   units; with EDGE, positions outside [lo, hi) get -inf. */
template <bool EDGE>
__device__ __forceinline__ void scale_and_mask(float s[NT][4], float scale_log2, int p0, int lo, int hi)
{
    const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int p = p0 + g + (i >= 2 ? 8 : 0);
            s[nt][i] = !EDGE || (p >= lo && p < hi) ? s[nt][i] * scale_log2 : NEG_INF;
        }
}

/* S^T accumulates in two chains (even and odd k-steps): half the HMMA
   latency on the critical path. */
struct score_chains {
    float c[2][NT][4];
};
__device__ __forceinline__ void chains_clear(score_chains &acc)
{
#pragma unroll
    for (int k = 0; k < 2; k++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc.c[k][nt][i] = 0.0f;
}
__device__ __forceinline__ void chains_mma(score_chains &acc, int kk, const u32 a[4],
                                           const u32 qb[NT][MT][2])
{
#pragma unroll
    for (int nt = 0; nt < NT; nt++) mma_16816(acc.c[kk & 1][nt], a, qb[nt][kk]);
}
__device__ __forceinline__ void chains_sum(float s[NT][4], const score_chains &acc)
{
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) s[nt][i] = acc.c[0][nt][i] + acc.c[1][nt][i];
}

/* S^T for a tile whose K rows g and g+8 are dense: `row[r]` points at the
   K vector of row r, or is null for a position outside the range. */
__device__ __forceinline__ void scores_dense(float s[NT][4], const u32 qb[NT][MT][2],
                                             const u16 *const row[2])
{
    const int t = threadIdx.x & 3;
    score_chains acc;
    chains_clear(acc);
#pragma unroll
    for (int kk = 0; kk < MT; kk++) {
        u32 a[4];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const uint2 x = row[r] ? *(const uint2 *)(row[r] + KC * t + 4 * kk) : make_uint2(0, 0);
            a[r] = x.x;
            a[r + 2] = x.y;
        }
        chains_mma(acc, kk, a, qb);
    }
    chains_sum(s, acc);
}

/* S^T for the 16 staged K records of a tile. */
template <bool EDGE>
__device__ __forceinline__ void scores_staged(float s[NT][4], const u32 qb[NT][MT][2],
                                              const unsigned char *records, int p0, int lo, int hi,
                                              const run_place<KC> &pl)
{
    const int g = (threadIdx.x & 31) >> 2;
#if MUSTAFAR_K_KEPT == D
    (void)pl;
    const u16 *row[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int p = p0 + g + 8 * r;
        row[r] = !EDGE || (p >= lo && p < hi) ? (const u16 *)(records + (g + 8 * r) * K_STAGED + BITMAP_BYTES)
                                              : 0;
    }
    scores_dense(s, qb, row);
#else
    k_run run[2];
    u32 addr[2][2];        /* [row][half of the run]: from 32 channels on, two address chains per row */
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int p = p0 + g + 8 * r;
        const unsigned char *rec = records + (g + 8 * r) * K_STAGED;
        addr[r][0] = smem_addr(rec + BITMAP_BYTES) + 2 * run_start(rec, pl, !EDGE || (p >= lo && p < hi), run[r]);
        addr[r][1] = addr[r][0] + 2 * __popcll((u64)run[r] & ((1ull << (KC / 2)) - 1));
    }
    score_chains acc;
    chains_clear(acc);
#pragma unroll
    for (int kk = 0; kk < MT; kk++) {
        const int c = 4 * kk, half = KC >= 32 && c >= KC / 2;   /* channel of the run */
        const u32 w0 = (u32)(run[0] >> (c / 32 * 32)), w1 = (u32)(run[1] >> (c / 32 * 32));
        u32 a[4];
        a[0] = take_pair(addr[0][half], w0, c);
        a[1] = take_pair(addr[1][half], w1, c);
        a[2] = take_pair(addr[0][half], w0, c + 2);
        a[3] = take_pair(addr[1][half], w1, c + 2);
        chains_mma(acc, kk, a, qb);
    }
    chains_sum(s, acc);
#endif
}

/* Online softmax step over the 16 positions of each head column: rescales
   the state to the new maxima and turns s into the P^T fragments (the B
   operand of O^T = V^T P^T).  Once the running maxima have settled most
   tiles raise none of them: one vote then skips the cross-lane maximum. */
__device__ __forceinline__ void tile_softmax(warp_state &st, float s[NT][4], u32 pb[NT][2])
{
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const bool grow = __any_sync(0xffffffffu, fmaxf(s[nt][0], s[nt][2]) > st.m[nt][0] ||
                                                      fmaxf(s[nt][1], s[nt][3]) > st.m[nt][1]);
#pragma unroll
        for (int h = 0; h < 2; h++) {          /* head 2t + h: s[nt][h], s[nt][2 + h] */
            if (grow) {
                float mx = fmaxf(s[nt][h], s[nt][2 + h]);
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
                const float m_new = fmaxf(st.m[nt][h], mx);
                const float corr = fast_exp2(st.m[nt][h] - (m_new == NEG_INF ? 0.0f : m_new));
                st.m[nt][h] = m_new;
                st.l[nt][h] *= corr;
                if (__any_sync(0xffffffffu, corr != 1.0f)) {
#pragma unroll
                    for (int mm = 0; mm < MT; mm++) { st.o[nt][mm][h] *= corr; st.o[nt][mm][2 + h] *= corr; }
                }
            }
            const float ref = st.m[nt][h] == NEG_INF ? 0.0f : st.m[nt][h];
            s[nt][h] = fast_exp2(s[nt][h] - ref);
            s[nt][2 + h] = fast_exp2(s[nt][2 + h] - ref);
            st.l[nt][h] += s[nt][h] + s[nt][2 + h];
        }
        pb[nt][0] = transpose8x8(pack2(s[nt][0], s[nt][1]));   /* positions 0..7 */
        pb[nt][1] = transpose8x8(pack2(s[nt][2], s[nt][3]));   /* positions 8..15 */
    }
}

/* O^T += V^T P^T given the channel-run values of this thread: x[i] is
   channel k of position 2t + (i & 1) + 8 * (i >> 1).  Channels k < D/16 wait
   in `low` for their partner k + D/16 (rows g and g+8 of m-tile k). */
__device__ __forceinline__ void pv_channel(warp_state &st, const u32 pb[NT][2], int k,
                                           const u32 x[4], u32 (&low)[MT][2])
{
    const u32 p01 = pack_halves(x[0], x[1]), p23 = pack_halves(x[2], x[3]);
    if (k < MT) {
        low[k][0] = p01;
        low[k][1] = p23;
    } else {
        const u32 a[4] = {low[k - MT][0], p01, low[k - MT][1], p23};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) mma_16816(st.o[nt][k - MT], a, pb[nt]);
    }
}

/* O^T += V^T P^T for a tile whose V rows are dense: `row[i]` points at the
   V vector of position 2t + (i & 1) + 8 * (i >> 1), or is null. */
__device__ __forceinline__ void pv_dense(warp_state &st, const u32 pb[NT][2], const u16 *const row[4])
{
#if V_POPC
#pragma unroll
    for (int mm = 0; mm < MT; mm++) {
        u32 x[2][4];       /* [row g, g+8][position i] */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            x[0][i] = row[i] ? row[i][o_channel(mm, false)] : 0u;
            x[1][i] = row[i] ? row[i][o_channel(mm, true)] : 0u;
        }
        const u32 a[4] = {pack_halves(x[0][0], x[0][1]), pack_halves(x[1][0], x[1][1]),
                          pack_halves(x[0][2], x[0][3]), pack_halves(x[1][2], x[1][3])};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) mma_16816(st.o[nt][mm], a, pb[nt]);
    }
#else
    const int g = (threadIdx.x & 31) >> 2;
    u32 low[MT][2];
#pragma unroll
    for (int k = 0; k < VC; k += 2) {
        u32 w[4], lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[i] = row[i] ? *(const u32 *)(row[i] + VC * g + k) : 0u;
            lo[i] = w[i] & 0xffffu;
            hi[i] = w[i] >> 16;
        }
        pv_channel(st, pb, k, lo, low);
        pv_channel(st, pb, k + 1, hi, low);
    }
#endif
}

/* Where the V records of a staged tile are: found before the softmax, so
   that the bitmap loads overlap it. */
struct v_records {
#if V_POPC
    popc_rows pr;          /* positions g and g+8 */
#else
    const u16 *row[4];     /* dense rows of positions 2t + (i & 1) + 8 * (i >> 1), or null */
#endif
};
template <bool EDGE>
__device__ __forceinline__ void find_v_records(v_records &vr, const unsigned char *records, int p0, int lo,
                                               int hi, u32 zero)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#if V_POPC
    (void)t;
    load_popc_rows<V_STAGED>(vr.pr, records, !EDGE || (p0 + g >= lo && p0 + g < hi),
                             !EDGE || (p0 + g + 8 >= lo && p0 + g + 8 < hi), zero);
#else
    (void)g;
    (void)zero;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int tok = 2 * t + (i & 1) + 8 * (i >> 1), p = p0 + tok;
        vr.row[i] = !EDGE || (p >= lo && p < hi) ? (const u16 *)(records + tok * V_STAGED + BITMAP_BYTES) : 0;
    }
#endif
}

/* O^T += V^T P^T for the 16 staged V records of a tile: m-tile mm of V^T
   is decoded straight into its A fragment. */
__device__ __forceinline__ void pv_staged(warp_state &st, const u32 pb[NT][2], v_records &vr,
                                          const popc_masks &mk, u32 zero)
{
#if !V_POPC
    (void)mk;
    (void)zero;
    pv_dense(st, pb, vr.row);
#else
#pragma unroll
    for (int mm = 0; mm < MT; mm++) {
        u32 y[2][2];       /* [positions 0..7, 8..15][channel row g, g+8] */
        decode_mtile(y, vr.pr, mm, mk, zero);
        const u32 a[4] = {y[0][0], y[0][1], y[1][0], y[1][1]};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) mma_16816(st.o[nt][mm], a, pb[nt]);
    }
#endif
}

/* One tile of 16 staged positions: scores, online softmax, O update.  Only
   a tile at the end of the compressed range (EDGE) checks each position
   against [lo, hi): tiles start inside the range, so every other tile lies
   wholly in it. */
template <bool EDGE>
__device__ __forceinline__ void staged_tile(warp_state &st, const u32 qb[NT][MT][2],
                                            const unsigned char *stage, int p0, int lo, int hi,
                                            float scale_log2, const decode_consts &dc)
{
    float s[NT][4];
    u32 pb[NT][2];
    scores_staged<EDGE>(s, qb, stage, p0, lo, hi, dc.k_place);
    scale_and_mask<EDGE>(s, scale_log2, p0, lo, hi);
    v_records vr;
    find_v_records<EDGE>(vr, stage + TILE * K_STAGED, p0, lo, hi, dc.zero);
    tile_softmax(st, s, pb);
    pv_staged(st, pb, vr, dc.mk, dc.zero);
}

/* Waits for the kernel this one was launched as a programmatic dependent
   of (sm_90+; before that, launches are in stream order anyway). */
__device__ __forceinline__ void wait_for_previous_kernel()
{
#if MUSTAFAR_SM >= 90
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* Row of the window ring holding position p, or null outside [lo, hi). */
__device__ __forceinline__ const u16 *ring_row(const u16 *ring, int row, int window, int head,
                                               int num_kv_heads, int p, int lo, int hi)
{
    return p >= lo && p < hi ? ring + (((long long)row * window + p % window) * num_kv_heads + head) * D : 0;
}

#define INLINE_SEQS 192
/* Small batches travel in the kernel parameters (no upload). */
struct seqs_inline {
    int count;                               /* 0: use the global array */
    paged_seq seqs[INLINE_SEQS];
};

#if !MUSTAFAR_APPEND_WIDE
extern "C" __global__ void __launch_bounds__(MUSTAFAR_WARPS * 32, MIN_BLOCKS) mustafar_attention(
    const __grid_constant__ seqs_inline inl, const unsigned char *k_pages,
    const unsigned char *v_pages, const int *page_table, int table_stride, const u16 *k_window,
    const u16 *v_window, int window, const paged_seq *global_seqs, const u16 *q, u16 *out,
    float *partial_o, float *partial_ml, int num_kv_heads, int chunk, int splits,
    float scale_log2, int unsettled)
{
    extern __shared__ __align__(16) unsigned char smem[];
    /* Launched as a programmatic dependent of the kernel before it (an
       append, the last call's combine, or the caller's): its blocks get
       ready during that kernel, then wait for all of its writes (and for
       its reads of the scratch written below) before touching memory.
       In a decode step (unsettled >= 0) the kernel before is the step's
       append, which lets this one start only once all work queued before
       it is complete: q and the older records are read here before any
       wait of this kernel, on the strength of that completion.  That
       append may write the last `unsettled` compressed positions of a
       sequence (from stable_end on) and its window: each warp waits just
       before it loads the page of its first tile at or past stable_end,
       and before the global writes at the end. */
#if MUSTAFAR_SM >= 90
    asm volatile("griddepcontrol.launch_dependents;");   /* the combine may be scheduled */
#endif
    if (unsettled < 0) wait_for_previous_kernel();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int head_blocks = (MUSTAFAR_GROUP + HEADS_PER_BLOCK - 1) / HEADS_PER_BLOCK;
    const int kv_head = blockIdx.y / head_blocks, head_block = blockIdx.y % head_blocks;
    const int split = blockIdx.z, seq_index = blockIdx.x;
    const int q_head0 = kv_head * MUSTAFAR_GROUP + head_block * HEADS_PER_BLOCK;
    const int rows = MUSTAFAR_GROUP - head_block * HEADS_PER_BLOCK < HEADS_PER_BLOCK
                         ? MUSTAFAR_GROUP - head_block * HEADS_PER_BLOCK : HEADS_PER_BLOCK;
    const int num_q_heads = num_kv_heads * MUSTAFAR_GROUP;
    const paged_seq sq = inl.count ? inl.seqs[seq_index] : global_seqs[seq_index];
    const int length = sq.num_compressed + sq.num_window;
    const int begin = split * chunk;
    const int end = begin + chunk < length ? begin + chunk : length;
    const int *table = page_table + (long long)sq.row * table_stride;
    unsigned char *warp_smem = smem + warp * MUSTAFAR_STAGES * STAGE_BYTES;
    const u32 warp_stage = smem_addr(warp_smem);

    decode_consts dc;
    dc.k_place = make_run_place<KC>(KC * t);
    dc.mk = make_popc_masks();
    dc.zero = smem_addr(smem + ZERO_OFFSET);
#if V_POPC
    if (threadIdx.x == 0) *(uint4 *)(smem + ZERO_OFFSET) = make_uint4(0, 0, 0, 0);
    __syncthreads();
#endif
    u32 qb[NT][MT][2];
    load_q(qb, q + ((long long)seq_index * num_q_heads + q_head0) * D, rows);

    warp_state st;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
        for (int mm = 0; mm < MT; mm++)
#pragma unroll
            for (int i = 0; i < 4; i++) st.o[nt][mm][i] = 0.0f;
        st.m[nt][0] = st.m[nt][1] = NEG_INF;
        st.l[nt][0] = st.l[nt][1] = 0.0f;
    }

    const int compressed_end = end < sq.num_compressed ? end : sq.num_compressed;
    const int sweep = MUSTAFAR_WARPS * TILE;
    /* this warp's tiles start at begin + warp*TILE + j*sweep; the page of
       tile j is loaded in the prologue (j < STAGES) or in the sweep j - STAGES */
    int wait_p0 = -1;                      /* the sweep that waits first, if any */
    if (unsettled >= 0) {
        const int stable_end = sq.num_compressed - unsettled;
        const int x = stable_end - TILE - (begin + warp * TILE);
        const int first_unstable = x < 0 ? 0 : x / sweep + 1;
        if (first_unstable < MUSTAFAR_STAGES) wait_for_previous_kernel();
        else wait_p0 = begin + warp * TILE + (first_unstable - MUSTAFAR_STAGES) * sweep;
    }
    /* stage i % STAGES holds tile i of this warp; STAGES - 1 tiles ahead */
#pragma unroll
    for (int i = 0; i < MUSTAFAR_STAGES - 1; i++) {
        const int pi = begin + warp * TILE + i * sweep;
        if (pi < compressed_end)
            prefetch_records(warp_stage + i * STAGE_BYTES, pi, compressed_end,
                             lane_page(table, pi, compressed_end), k_pages, v_pages, kv_head,
                             num_kv_heads);
        copy_commit();
    }
    int stage_index = 0;
    int next_page = lane_page(table, begin + warp * TILE + (MUSTAFAR_STAGES - 1) * sweep, compressed_end);
    /* the sweeps before wait_p0, the wait, the rest: the loop body itself
       has no check (one there cost the loop ~3 %) */
    int p0 = begin + warp * TILE;
    int stop = wait_p0 >= p0 && wait_p0 < end ? wait_p0 : end;
#pragma unroll 1
    for (;;) {
        for (; p0 < stop; p0 += sweep) {
            const int ahead = p0 + (MUSTAFAR_STAGES - 1) * sweep;
            const int ahead_stage = stage_index == 0 ? MUSTAFAR_STAGES - 1 : stage_index - 1;
            const unsigned char *stage = warp_smem + stage_index * STAGE_BYTES;
            const int page = next_page;
            next_page = lane_page(table, ahead + sweep, compressed_end);
            if (ahead < compressed_end)
                prefetch_records(warp_stage + ahead_stage * STAGE_BYTES, ahead, compressed_end, page,
                                 k_pages, v_pages, kv_head, num_kv_heads);
            copy_commit();
            copy_wait<MUSTAFAR_STAGES - 1>();
            __syncwarp();
            if (p0 + TILE <= compressed_end)
                staged_tile<false>(st, qb, stage, p0, begin, compressed_end, scale_log2, dc);
            else if (p0 < compressed_end)
                staged_tile<true>(st, qb, stage, p0, begin, compressed_end, scale_log2, dc);
            if (p0 + TILE > sq.num_compressed && sq.num_window > 0) {
                const int lo = begin > sq.num_compressed ? begin : sq.num_compressed;
                float s[NT][4];
                u32 pb[NT][2];
                const u16 *ks[2], *vs[4];
#pragma unroll
                for (int r = 0; r < 2; r++)
                    ks[r] = ring_row(k_window, sq.row, window, kv_head, num_kv_heads, p0 + g + 8 * r, lo,
                                     end);
#pragma unroll
                for (int i = 0; i < 4; i++)
                    vs[i] = ring_row(v_window, sq.row, window, kv_head, num_kv_heads,
                                     p0 + 2 * t + (i & 1) + 8 * (i >> 1), lo, end);
                scores_dense(s, qb, ks);
                scale_and_mask<true>(s, scale_log2, p0, lo, end);
                tile_softmax(st, s, pb);
                pv_dense(st, pb, vs);
            }
            __syncwarp();                      /* the stage is refilled next iteration */
            stage_index = stage_index == MUSTAFAR_STAGES - 1 ? 0 : stage_index + 1;
        }
        if (stop == end) break;
        wait_for_previous_kernel();
        stop = end;
    }

    /* merge the warps: [warps][16] (max, sum) pairs, then [warps][HEAD_ROWS][D] O */
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            st.l[nt][h] += __shfl_xor_sync(0xffffffffu, st.l[nt][h], 4);
            st.l[nt][h] += __shfl_xor_sync(0xffffffffu, st.l[nt][h], 8);
            st.l[nt][h] += __shfl_xor_sync(0xffffffffu, st.l[nt][h], 16);
        }
    __syncthreads();
    float *ml = (float *)smem;
    float *o = ml + MUSTAFAR_WARPS * 32;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = 8 * nt + 2 * t + h;
            if (r < rows) {
                if (g == 0) {
                    ml[(warp * 16 + r) * 2] = st.m[nt][h];
                    ml[(warp * 16 + r) * 2 + 1] = st.l[nt][h];
                }
#pragma unroll
                for (int mm = 0; mm < MT; mm++) {
                    o[(warp * HEAD_ROWS + r) * D + o_channel(mm, false)] = st.o[nt][mm][h];
                    o[(warp * HEAD_ROWS + r) * D + o_channel(mm, true)] = st.o[nt][mm][2 + h];
                }
            }
        }
    __syncthreads();
    if (unsettled >= 0) wait_for_previous_kernel();
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
#endif

/* Merges the splits of every (sequence, query head): one block of
   COMBINE_THREADS each.  Thread (part, c) sums channels 4c..4c+3 over the
   splits s = part (mod COMBINE_PARTS) with 16-byte loads, independent of
   each other so that they issue back to back; the parts meet in shared
   memory.  From sm_90 on it is launched as a programmatic dependent of the
   attention kernel: its blocks may start while that grid drains, and wait
   here for its results. */
#define COMBINE_THREADS 256
#define COMBINE_QUADS (D / 4)
#define COMBINE_PARTS (COMBINE_THREADS / COMBINE_QUADS)
#if !MUSTAFAR_APPEND_WIDE
extern "C" __global__ void __launch_bounds__(COMBINE_THREADS) mustafar_combine(const float *partial_o,
                                                                               const float *partial_ml,
                                                                               u16 *out, int splits)
{
    __shared__ float max_part[COMBINE_THREADS / 32], sum_part[COMBINE_PARTS];
    __shared__ float4 acc_part[COMBINE_PARTS][COMBINE_QUADS];
#if MUSTAFAR_SM >= 90
    asm volatile("griddepcontrol.launch_dependents;");   /* the next call's kernel may get ready */
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    const long long head = blockIdx.x;
    const int c = threadIdx.x % COMBINE_QUADS, part = threadIdx.x / COMBINE_QUADS;
    const float *ml = partial_ml + head * splits * 2;
    const float4 *po = (const float4 *)(partial_o + head * splits * D) + c;
    float m = NEG_INF, l = 0.0f;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s = threadIdx.x; s < splits; s += COMBINE_THREADS) m = fmaxf(m, ml[2 * s]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) max_part[threadIdx.x >> 5] = m;
    __syncthreads();
    for (int w = 0; w < COMBINE_THREADS / 32; w++) m = fmaxf(m, max_part[w]);
    const float ref = m == NEG_INF ? 0.0f : m;
#pragma unroll 4
    for (int s = part; s < splits; s += COMBINE_PARTS) {
        const float w = exp2f(ml[2 * s] - ref);
        const float4 x = po[(long long)s * COMBINE_QUADS];
        l += w * ml[2 * s + 1];
        acc.x += w * x.x; acc.y += w * x.y; acc.z += w * x.z; acc.w += w * x.w;
    }
    acc_part[part][c] = acc;
    if (c == 0) sum_part[part] = l;
    __syncthreads();
    if (part == 0) {
        for (int p = 1; p < COMBINE_PARTS; p++) {
            const float4 y = acc_part[p][c];
            acc.x += y.x; acc.y += y.y; acc.z += y.z; acc.w += y.w;
            l += sum_part[p];
        }
        if (!(l > 0.0f)) {                  /* no position in range: zeros */
            acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            l = 1.0f;
        }
        *(uint2 *)(out + head * D + 4 * c) = make_uint2(pack2(acc.x / l, acc.y / l), pack2(acc.z / l, acc.w / l));
    }
}
#endif
