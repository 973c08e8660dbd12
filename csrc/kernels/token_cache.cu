// Token-cache pass of a routed block (inference, in place): one warp per row of the block's
// output; a row that missed the block receives its cached update, a selected row writes its
// new update (out - its input) into the cache. Each row is owned by one warp: no races.
#include "kernels/common.cuh"

namespace diffcr {
namespace cuda {

template <typename T, typename C, typename A>
__global__ void token_cache_kernel(T* __restrict__ out, C* __restrict__ cache,
                                   const int32_t* __restrict__ slot, const T* __restrict__ x_rows,
                                   const A* __restrict__ miss, int64_t R, int64_t D, int64_t T_rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= R) return;
  const int32_t t = slot[r];
  DIFFCR_DEVICE_CHECK(t >= -1 && t < T_rows);
  const A m = miss ? miss[r] : (t < 0 ? A(1) : A(0));
  T* o = out + r * D;
  C* c = cache + r * D;
  const T* xr = t >= 0 ? x_rows + static_cast<int64_t>(t) * D : nullptr;
  for (int64_t d = lane; d < D; d += 32) {
    T ov = o[d];
    if (m != A(0)) {
      from_acc(ov, static_cast<A>(to_acc(ov)) + m * static_cast<A>(to_acc(c[d])));
      o[d] = ov;
    }
    if (xr) {
      C cv;
      from_acc(cv, static_cast<A>(to_acc(ov)) - static_cast<A>(to_acc(xr[d])));
      c[d] = cv;
    }
  }
}

namespace {
template <typename T>
int launch_token_cache(DType ct, void* out, void* cache, const int32_t* slot, const void* x_rows,
                       const void* miss, int64_t R, int64_t D, int64_t T_rows, void* stream) {
  using A = typename AccOf<T>::type;
  const dim3 grid(static_cast<unsigned>((R + kWarps - 1) / kWarps));
  return DIFFCR_DISPATCH(ct, {
    token_cache_kernel<T, scalar_t, A><<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(out), static_cast<scalar_t*>(cache), slot, static_cast<const T*>(x_rows),
        static_cast<const A*>(miss), R, D, T_rows);
    return static_cast<int>(cudaGetLastError());
  });
}
}  // namespace

int apply_token_cache(DType dt, DType cache_dt, void* out, void* cache, const int32_t* slot,
                      const void* x_rows, const void* miss, int64_t R, int64_t D, int64_t T_rows,
                      void* stream) {
  if (R == 0 || D == 0) return 0;
  return DIFFCR_DISPATCH(dt, {
    return launch_token_cache<scalar_t>(cache_dt, out, cache, slot, x_rows, miss, R, D, T_rows,
                                        stream);
  });
}

}  // namespace cuda
}  // namespace diffcr
