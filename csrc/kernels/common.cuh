// Device helpers shared by the .cu files (no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <cstdio>

#include "kernels/diffcr_cuda.h"

namespace diffcr {
namespace cuda {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float load_acc(const float* p) { return *p; }
__device__ __forceinline__ double load_acc(const double* p) { return *p; }
__device__ __forceinline__ float load_acc(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_acc(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store_acc(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_acc(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_acc(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_acc(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float acc_rsqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double acc_rsqrt(double v) { return rsqrt(v); }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Bound check that is compiled in only with DIFFCR_DEBUG=1 (release kernels trust the host-side
// validation done before launch).
#if defined(DIFFCR_DEBUG) && DIFFCR_DEBUG
#define DIFFCR_DEVICE_CHECK(cond)                                                        \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      printf("diffcr device check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__);     \
      __trap();                                                                          \
    }                                                                                    \
  } while (0)
#else
#define DIFFCR_DEVICE_CHECK(cond) \
  do {                            \
  } while (0)
#endif

// Dispatch a DType to a C++ type named scalar_t inside the lambda body.
#define DIFFCR_DISPATCH(dt, ...)                                        \
  [&]() -> int {                                                        \
    switch (dt) {                                                       \
      case DType::kFloat32: { using scalar_t = float; __VA_ARGS__ }     \
      case DType::kFloat64: { using scalar_t = double; __VA_ARGS__ }    \
      case DType::kFloat16: { using scalar_t = __half; __VA_ARGS__ }    \
      case DType::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__ } \
    }                                                                   \
    return static_cast<int>(cudaErrorInvalidValue);                     \
  }()

constexpr int kWarps = 8;  // rows per 256-thread block: one warp per row

}  // namespace cuda
}  // namespace diffcr
