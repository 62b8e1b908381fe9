// mma.sp layout probe (H200): which metadata nibbles and A registers go where, and whether
// index pairs out of order are taken.  nvcc -arch=sm_90a [-DORD] sparse-mma-probe.cu
#include <cstdio>
#include <cuda_fp16.h>
#ifdef ORD
#define SPV ".sp::ordered_metadata"
#else
#define SPV ".sp"
#endif
typedef unsigned u32;
__device__ u32 pk(float a, float b) { __half2 h = __floats2half2_rn(a, b); return *(u32 *)&h; }

template <int K>
__device__ void spmma(float d[4], const u32 *a, const u32 *b, u32 e);
template <> __device__ void spmma<16>(float d[4], const u32 *a, const u32 *b, u32 e) {
    asm volatile("mma" SPV ".sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6,%7}, {%0,%1,%2,%3}, %8, 0x0;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(b[0]), "r"(b[1]), "r"(e));
}
template <> __device__ void spmma<32>(float d[4], const u32 *a, const u32 *b, u32 e) {
    asm volatile("mma" SPV ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

// B[k][n] = (k / 4 == n % (K/4)) ? (k % 4 + 1) * (n < K/4 ? 1 : 16) : 0   (n < 8)
// B fragment (dense, col): thread (g, t) holds rows 2t,2t+1 (+8, +16, +24) of column g.
template <int K>
__device__ void load_b(u32 *b) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    auto B = [&](int k, int n) -> float { return (k / 4 == n % (K / 4)) ? (k % 4 + 1) * (n < K / 4 ? 1.f : 16.f) : 0.f; };
    for (int r = 0; r < K / 8; r++) b[r] = pk(B(8 * r + 2 * t, g), B(8 * r + 2 * t + 1, g));
}

// out[case][row*8+n]
template <int K>
__global__ void probe(float *out, int ncase) {
    int lane = threadIdx.x;
    u32 b[4]; load_b<K>(b);
    const int AR = K / 8;   // A regs per thread
    for (int c = 0; c < ncase; c++) {
        u32 a[4]; u32 e;
        // case 0: all A = 1, meta all 0x4 (0,1)
        // cases 1..32*32: thread c1/32 flips metadata nibble at bit (c1%32)/4*4 to 0xE
        // then cases: thread T, A element j set to 2.0
        for (int r = 0; r < 4; r++) a[r] = pk(1.f, 1.f);
        e = 0x44444444u;
        int cc = c - 1;
        if (c >= 1 && cc < 32 * 8) {
            int T = cc / 8, nib = cc % 8;
            if (lane == T) e = (e & ~(0xFu << 4 * nib)) | (0xEu << 4 * nib);
        }
        cc -= 32 * 8;
        if (cc >= 0 && cc < 32 * 2 * AR) {
            int T = cc / (2 * AR), j = cc % (2 * AR);
            if (lane == T) { __half2 h = *(__half2 *)&a[j / 2]; if (j & 1) h.y = __float2half(2.f); else h.x = __float2half(2.f); a[j / 2] = *(u32 *)&h; }
        }
        cc -= 32 * 2 * AR;
        if (cc == 0) { e = 0x11111111u; for (int r = 0; r < 4; r++) a[r] = pk(1.f, 2.f); }  // (1,0) order
        if (cc == 1) { e = 0x44444444u; for (int r = 0; r < 4; r++) a[r] = pk(1.f, 2.f); }  // (0,1)
        if (cc == 2) { e = 0xBBBBBBBBu; for (int r = 0; r < 4; r++) a[r] = pk(1.f, 2.f); }  // (3,2)
        if (cc == 3) { e = 0xEEEEEEEEu; for (int r = 0; r < 4; r++) a[r] = pk(1.f, 2.f); }  // (2,3)
        float d[4] = {0, 0, 0, 0};
        spmma<K>(d, a, b, e);
        int g = lane >> 2, t = lane & 3;
        out[c * 128 + g * 8 + 2 * t] = d[0]; out[c * 128 + g * 8 + 2 * t + 1] = d[1];
        out[c * 128 + (g + 8) * 8 + 2 * t] = d[2]; out[c * 128 + (g + 8) * 8 + 2 * t + 1] = d[3];
    }
}

template <int K> void run() {
    const int AR = K / 8, ncase = 1 + 32 * 8 + 32 * 2 * AR + 4;
    float *d; cudaMallocManaged(&d, ncase * 128 * 4);
    probe<K><<<1, 32>>>(d, ncase);
    cudaError_t err = cudaDeviceSynchronize();
    printf("== m16n8k%d (%s)\n", K, cudaGetErrorString(err));
    const float *base = d;
    printf("base row0:"); for (int n = 0; n < 8; n++) printf(" %g", base[n]); printf("\n");
    for (int c = 1; c < ncase; c++) {
        const float *o = d + c * 128;
        int cc = c - 1;
        char what[64];
        if (cc < 256) sprintf(what, "meta T%d nib%d", cc / 8, cc % 8);
        else if ((cc -= 256) < 32 * 2 * AR) sprintf(what, "A T%d elem%d", cc / (2 * AR), cc % (2 * AR));
        else { cc -= 32 * 2 * AR; sprintf(what, "order case %d", cc);
            printf("%s row0:", what); for (int n = 0; n < 8; n++) printf(" %g", o[n]); printf("\n"); continue; }
        printf("%s:", what);
        int any = 0;
        for (int i = 0; i < 128; i++) if (o[i] != base[i]) { printf(" (r%d n%d %g->%g)", i / 8, i % 8, base[i], o[i]); any = 1; }
        if (!any) printf(" none");
        printf("\n");
    }
    cudaFree(d);
}
int main() { run<16>(); run<32>(); return 0; }
