// Device helpers shared by the .cu files (no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <type_traits>

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

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void from_acc(float& o, float v) { o = v; }
__device__ __forceinline__ void from_acc(double& o, double v) { o = v; }
__device__ __forceinline__ void from_acc(__half& o, float v) { o = __float2half_rn(v); }
__device__ __forceinline__ void from_acc(__nv_bfloat16& o, float v) { o = __float2bfloat16_rn(v); }

// V consecutive elements moved as one aligned access (16 bytes when V = 16 / sizeof(T)); V = 1
// is the scalar fallback for rows whose length or base pointers are not 16-byte aligned.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[V]) {
  const Vec<T, V> r = *reinterpret_cast<const Vec<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<A>(to_acc(r.v[i]));
}

template <int V, typename T, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[V]) {
  Vec<T, V> r;
#pragma unroll
  for (int i = 0; i < V; ++i) from_acc(r.v[i], in[i]);
  *reinterpret_cast<Vec<T, V>*>(p) = r;
}

// Host side: the vector width for T (16-byte accesses) and whether a launch may use it: the
// row length is a multiple of it and every (non-null) base pointer is 16-byte aligned, so every
// row start r * D is too.
template <typename T> constexpr int vec_width() { return static_cast<int>(16 / sizeof(T)); }

inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && (reinterpret_cast<uintptr_t>(p) % 16) != 0) return false;
  return true;
}

// Calls f(std::integral_constant<int, W>) with W = vec_width<T>() when `vec`, else with 1.
template <typename T, typename F>
inline void with_vec(bool vec, F&& f) {
  if (vec) {
    f(std::integral_constant<int, vec_width<T>()>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

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
