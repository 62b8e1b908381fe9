/* Compile-time check: the declarations that mustafar.h uses to load the CUDA
   runtime and NVRTC at run time match CUDA's own headers (sizes, field
   offsets, enum values).  Compiled in make test where the toolkit is present. */
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"
#if defined(__GNUC__)
#  pragma GCC diagnostic ignored "-Wpedantic"
#endif
#include <cuda_runtime.h>
#include <nvrtc.h>
#include <stddef.h>

#define MUSTAFAR_SAME(name, a, b) typedef char name[(a) == (b) ? 1 : -1]
MUSTAFAR_SAME(config_size, sizeof(mustafar__cudaLaunchConfig), sizeof(cudaLaunchConfig_t));
MUSTAFAR_SAME(config_grid, offsetof(mustafar__cudaLaunchConfig, gridDim), offsetof(cudaLaunchConfig_t, gridDim));
MUSTAFAR_SAME(config_block, offsetof(mustafar__cudaLaunchConfig, blockDim), offsetof(cudaLaunchConfig_t, blockDim));
MUSTAFAR_SAME(config_smem, offsetof(mustafar__cudaLaunchConfig, dynamicSmemBytes), offsetof(cudaLaunchConfig_t, dynamicSmemBytes));
MUSTAFAR_SAME(config_stream, offsetof(mustafar__cudaLaunchConfig, stream), offsetof(cudaLaunchConfig_t, stream));
MUSTAFAR_SAME(config_attrs, offsetof(mustafar__cudaLaunchConfig, attrs), offsetof(cudaLaunchConfig_t, attrs));
MUSTAFAR_SAME(config_nattrs, offsetof(mustafar__cudaLaunchConfig, numAttrs), offsetof(cudaLaunchConfig_t, numAttrs));
MUSTAFAR_SAME(attr_size, sizeof(mustafar__cudaLaunchAttribute), sizeof(cudaLaunchAttribute));
MUSTAFAR_SAME(attr_id, offsetof(mustafar__cudaLaunchAttribute, id), offsetof(cudaLaunchAttribute, id));
MUSTAFAR_SAME(attr_val, offsetof(mustafar__cudaLaunchAttribute, val), offsetof(cudaLaunchAttribute, val));
MUSTAFAR_SAME(enum_size, sizeof(int), sizeof(enum cudaDeviceAttr));
MUSTAFAR_SAME(success, MUSTAFAR__cudaSuccess, cudaSuccess);
MUSTAFAR_SAME(h2d, MUSTAFAR__cudaMemcpyHostToDevice, cudaMemcpyHostToDevice);
MUSTAFAR_SAME(d2h, MUSTAFAR__cudaMemcpyDeviceToHost, cudaMemcpyDeviceToHost);
MUSTAFAR_SAME(no_timing, MUSTAFAR__cudaEventDisableTiming, cudaEventDisableTiming);
MUSTAFAR_SAME(sms, MUSTAFAR__cudaDevAttrMultiProcessorCount, cudaDevAttrMultiProcessorCount);
MUSTAFAR_SAME(cc_major, MUSTAFAR__cudaDevAttrComputeCapabilityMajor, cudaDevAttrComputeCapabilityMajor);
MUSTAFAR_SAME(cc_minor, MUSTAFAR__cudaDevAttrComputeCapabilityMinor, cudaDevAttrComputeCapabilityMinor);
MUSTAFAR_SAME(optin, MUSTAFAR__cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMaxSharedMemoryPerBlockOptin);
MUSTAFAR_SAME(max_smem, MUSTAFAR__cudaFuncAttributeMaxDynamicSharedMemorySize, cudaFuncAttributeMaxDynamicSharedMemorySize);
MUSTAFAR_SAME(pdl, MUSTAFAR__cudaLaunchAttributeProgrammaticStreamSerialization, cudaLaunchAttributeProgrammaticStreamSerialization);
MUSTAFAR_SAME(nvrtc_ok, MUSTAFAR__NVRTC_SUCCESS, NVRTC_SUCCESS);
MUSTAFAR_SAME(nvrtc_option, MUSTAFAR__NVRTC_ERROR_INVALID_OPTION, NVRTC_ERROR_INVALID_OPTION);

int main(void) { return 0; }
