/* A stand-in CUDA runtime and NVRTC for the loader tests: every function the
   library resolves, reporting one device and a CUDA 11.8 driver (too old).
   Built as build/fake_cuda/libcudart.so.13 and libnvrtc.so.13, with
   -DFAKE_MISSING_LAUNCH as a runtime that lacks cudaLaunchKernelExC, and
   with -DFAKE_NO_DRIVER as a runtime on a machine with no NVIDIA driver
   (what the real one then says: error 35, driver version 0). */
typedef unsigned long size_t;
#ifdef FAKE_NO_DRIVER
int cudaGetDeviceCount(int *n) { *n = 0; return 35; }
int cudaDriverGetVersion(int *v) { *v = 0; return 0; }
#else
int cudaGetDeviceCount(int *n) { *n = 1; return 0; }
int cudaDriverGetVersion(int *v) { *v = 11080; return 0; }
#endif
int cudaGetDevice(int *d) { *d = 0; return 0; }
int cudaSetDevice(int d) { (void)d; return 0; }
int cudaGetLastError(void) { return 0; }
const char *cudaGetErrorName(int e) { (void)e; return "cudaErrorFake"; }
const char *cudaGetErrorString(int e) { (void)e; return "fake CUDA runtime"; }
#define STUB(name) int name(void) { return 999; }
STUB(cudaDeviceGetAttribute) STUB(cudaMemGetInfo) STUB(cudaMalloc) STUB(cudaFree) STUB(cudaMallocHost)
STUB(cudaFreeHost) STUB(cudaMemsetAsync) STUB(cudaMemcpyAsync) STUB(cudaStreamSynchronize)
STUB(cudaEventCreateWithFlags) STUB(cudaEventRecord) STUB(cudaEventSynchronize)
STUB(cudaEventDestroy) STUB(cudaLibraryLoadData) STUB(cudaLibraryUnload) STUB(cudaLibraryGetKernel)
STUB(cudaFuncSetAttribute) STUB(cudaOccupancyMaxActiveBlocksPerMultiprocessor)
#ifndef FAKE_MISSING_LAUNCH
STUB(cudaLaunchKernelExC)
#endif
const char *nvrtcGetErrorString(int r) { (void)r; return "fake NVRTC"; }
int nvrtcVersion(int *major, int *minor) { *major = 12; *minor = 0; return 0; }
STUB(nvrtcGetNumSupportedArchs) STUB(nvrtcGetSupportedArchs) STUB(nvrtcCreateProgram)
STUB(nvrtcCompileProgram) STUB(nvrtcDestroyProgram) STUB(nvrtcGetProgramLogSize)
STUB(nvrtcGetProgramLog) STUB(nvrtcGetCUBINSize) STUB(nvrtcGetCUBIN)
