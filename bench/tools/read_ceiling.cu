// Read-bandwidth ceiling of the GPU for the attention kernel's access pattern:
// 16-byte loads over 384 MiB (the s=0.7 records of B=8 T=32k),
// contiguous, and as 1536-byte chunks (one page of one head's records) in
// order and in random order; cudaMemcpy device to device for reference.
// Median of 32 timed runs after 8 warm-up runs, 4 buffers rotated (> L2).
//   nvcc -O2 -arch=sm_90 -std=c++17 bench/tools/read_ceiling.cu -o read_ceiling && ./read_ceiling
#include <cstdio>
#include <vector>
#include <algorithm>
#include <random>
__global__ void rd_contig(const uint4 *p, size_t n, unsigned *sink) {
  unsigned x = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint4 v; asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p + i));
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (x == 0x12345678u) *sink = x;
}
// Warp w reads chunks perm[w], perm[w + warps], ... of CH bytes each.
template <int CH>
__global__ void rd_chunks(const uint4 *p, const int *perm, int nchunks, unsigned *sink) {
  unsigned x = 0;
  const int lane = threadIdx.x & 31;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, nw = (gridDim.x * blockDim.x) >> 5;
  for (int c = warp; c < nchunks; c += nw) {
    const uint4 *q = p + (size_t)perm[c] * (CH / 16);
#pragma unroll
    for (int j = lane; j < CH / 16; j += 32) {
      uint4 v; asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(q + j));
      x ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  if (x == 0x12345678u) *sink = x;
}
int main() {
  const size_t bytes = 402653184; // 384 MiB ~ s=0.7 records at B=8 T=32k
  const int NB = 4;
  uint4 *buf[NB]; for (int i = 0; i < NB; i++) { cudaMalloc(&buf[i], bytes); cudaMemset(buf[i], i, bytes); }
  unsigned *sink; cudaMalloc(&sink, 4);
  const int nch = bytes / 1536;
  std::vector<int> perm(nch); for (int i = 0; i < nch; i++) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), std::mt19937(1));
  int *dperm; cudaMalloc(&dperm, nch * 4); cudaMemcpy(dperm, perm.data(), nch * 4, cudaMemcpyHostToDevice);
  std::vector<int> seq(nch); for (int i = 0; i < nch; i++) seq[i] = i;
  int *dseq; cudaMalloc(&dseq, nch * 4); cudaMemcpy(dseq, seq.data(), nch * 4, cudaMemcpyHostToDevice);
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  auto timeit = [&](const char *name, auto fn) {
    std::vector<float> t;
    for (int r = 0; r < 40; r++) { cudaEventRecord(a); fn(r % NB); cudaEventRecord(b); cudaEventSynchronize(b); float ms; cudaEventElapsedTime(&ms, a, b); if (r >= 8) t.push_back(ms); }
    std::sort(t.begin(), t.end()); float med = t[t.size() / 2];
    printf("%-40s %8.4f ms  %7.1f GB/s\n", name, med, bytes / med / 1e6);
  };
  timeit("cudaMemcpy D2D (read + write)", [&](int i) { cudaMemcpyAsync(buf[(i + 1) % NB], buf[i], bytes / 2, cudaMemcpyDeviceToDevice); });
  for (int bps : {4, 8, 16}) {
    char nm[64]; snprintf(nm, 64, "read contiguous, %d x 256 thr/SM", bps);
    timeit(nm, [&](int i) { rd_contig<<<sms * bps, 256>>>(buf[i], bytes / 16, sink); });
  }
  for (int bps : {4, 8, 16}) {
    char nm[64]; snprintf(nm, 64, "1536B chunks random, %d x 256", bps);
    timeit(nm, [&](int i) { rd_chunks<1536><<<sms * bps, 256>>>(buf[i], dperm, nch, sink); });
    snprintf(nm, 64, "1536B chunks in order, %d x 256", bps);
    timeit(nm, [&](int i) { rd_chunks<1536><<<sms * bps, 256>>>(buf[i], dseq, nch, sink); });
  }
  cudaError_t e = cudaDeviceSynchronize(); printf("%s\n", cudaGetErrorString(e));
}
