/* fuzz_records.c - the stateless calls on raw, untrusted input:
   mustafar_decompress of records taken from the input (bitmaps with more
   or fewer bits set than the kept count, NaN/Inf values), and
   mustafar_paged_attention with pages, page tables and sequence entries
   taken from the input.  Promises checked: decompress gives the first
   n set channels their values and zeros everywhere else, bit for bit;
   attention either refuses the layout or reads only inside it (ASan). */
#include "fuzz_common.h"

static const int k_dims[3] = {64, 128, 256};
static const float k_sparsity[4] = {0.0f, 0.5f, 0.7f, 0.9f};

static void check_decompress(fz_in *in, int d, float s, mustafar_dtype dt)
{
    const size_t rb = mustafar_record_bytes(d, s, dt);
    const int kept = mustafar_kept_count(d, s);
    unsigned char rec[4 * 1024];
    uint16_t x[4 * 256];
    size_t count = 1 + fz_u8(in) % 4, i;
    int r, c, j;
    for (i = 0; i < count * rb; i++) rec[i] = (unsigned char)fz_u8(in);
    FZ_ASSERT(mustafar_decompress(NULL, d, s, dt, rec, x, count) == MUSTAFAR_OK);
    for (r = 0; r < (int)count; r++) {
        const unsigned char *p = rec + r * rb;
        for (c = 0, j = 0; c < d; c++) {
            uint16_t want = 0;
            if (p[c / 8] >> (c % 8) & 1) {
                if (j < kept) want = (uint16_t)(p[d / 8 + 2 * j] | p[d / 8 + 2 * j + 1] << 8);
                j++;
            }
            FZ_ASSERT(x[r * d + c] == want);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in;
    mustafar_paged_kv kv;
    mustafar_paged_seq seqs[4];
    int32_t table[64];
    unsigned char *kp, *vp;
    uint16_t *kw, *vw, q[4 * 8 * 256], out[4 * 8 * 256];
    size_t kbytes, vbytes, wbytes, i;
    int d, nseq, group;
    float ks, vs;
    mustafar_dtype dt;
    in.p = data;
    in.n = size;
    d = k_dims[fz_u8(&in) % 3];
    dt = (fz_u8(&in) & 1) ? MUSTAFAR_DTYPE_BF16 : MUSTAFAR_DTYPE_F16;
    ks = k_sparsity[fz_u8(&in) % 4];
    vs = k_sparsity[fz_u8(&in) % 4];
    check_decompress(&in, d, ks, dt);

    memset(&kv, 0, sizeof kv);
    kv.head_dim = d;
    kv.dtype = dt;
    kv.k_sparsity = ks;
    kv.v_sparsity = vs;
    kv.num_kv_heads = 1 + fz_u8(&in) % 2;
    group = 1 + fz_u8(&in) % 4;
    kv.num_q_heads = kv.num_kv_heads * group;
    kv.page_size = 1 + fz_u8(&in) % 8;
    kv.num_pages = 1 + fz_u8(&in) % 6;
    kv.num_rows = 1 + fz_u8(&in) % 4;
    kv.page_table_stride = 1 + fz_u8(&in) % 16;
    kv.window_size = fz_u8(&in) % 4;
    /* the table as the input has it (ids out of range must be refused),
       bytes mostly small so that valid layouts are common */
    for (i = 0; i < (size_t)kv.num_rows * kv.page_table_stride; i++) {
        unsigned b = fz_u8(&in);
        table[i] = b < 200 ? (int32_t)(b % 8) - 1 : (int32_t)fz_u32(&in);
    }
    nseq = fz_u8(&in) % 5;
    for (i = 0; i < (size_t)nseq; i++) {
        unsigned b = fz_u8(&in);
        seqs[i].row = b < 200 ? (int32_t)(b % 5) : (int32_t)fz_u32(&in);
        b = fz_u8(&in);
        seqs[i].num_compressed = b < 200 ? (int32_t)(b % 40) : (int32_t)fz_u32(&in);
        b = fz_u8(&in);
        seqs[i].num_window = b < 200 ? (int32_t)(b % 5) : (int32_t)fz_u32(&in);
        seqs[i].reserved = fz_u8(&in) < 250 ? 0 : 1;
    }
    kbytes = (size_t)kv.num_pages * kv.num_kv_heads * kv.page_size * mustafar_record_bytes(d, ks, dt);
    vbytes = (size_t)kv.num_pages * kv.num_kv_heads * kv.page_size * mustafar_record_bytes(d, vs, dt);
    wbytes = (size_t)kv.num_rows * kv.window_size * kv.num_kv_heads * d * 2;
    /* exact sizes: ASan sees any read past them */
    kp = (unsigned char *)malloc(kbytes);
    vp = (unsigned char *)malloc(vbytes);
    kw = (uint16_t *)malloc(wbytes ? wbytes : 1);
    vw = (uint16_t *)malloc(wbytes ? wbytes : 1);
    for (i = 0; i < kbytes; i++) kp[i] = in.n ? (unsigned char)fz_u8(&in) : (unsigned char)i;
    for (i = 0; i < vbytes; i++) vp[i] = in.n ? (unsigned char)fz_u8(&in) : (unsigned char)(i * 7);
    fz_rng_state = (uint32_t)size;
    for (i = 0; i < wbytes / 2; i++) { kw[i] = fz_half(); vw[i] = fz_half(); }
    for (i = 0; i < (size_t)nseq * kv.num_q_heads * d; i++) q[i] = fz_half();
    kv.k_pages = kp;
    kv.v_pages = vp;
    kv.page_table = table;
    kv.k_window = wbytes ? kw : NULL;
    kv.v_window = wbytes ? vw : NULL;
    if (mustafar_paged_attention(NULL, &kv, nseq, seqs, q, out, 0.0f) == MUSTAFAR_OK) {
        /* a sequence with no tokens gets zeros */
        for (i = 0; i < (size_t)nseq; i++)
            if (seqs[i].num_compressed + seqs[i].num_window == 0) {
                size_t c;
                for (c = 0; c < (size_t)kv.num_q_heads * d; c++)
                    FZ_ASSERT(out[i * kv.num_q_heads * d + c] == 0);
            }
    }
    free(kp); free(vp); free(kw); free(vw);
    return 0;
}
