// Gather fused with LayerNorm and adaLN modulate, forward and per-row backward.
// One warp per packed row; the row is read from global memory (L1/L2 after the first pass).
#include "kernels/common.cuh"

namespace diffcr {
namespace cuda {

template <typename T, typename A>
__global__ void gnm_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ idx, int64_t T_,
                               int64_t D, int64_t N, int64_t num_rows, const T* __restrict__ shift,
                               const T* __restrict__ scale, const T* __restrict__ weight,
                               const T* __restrict__ bias, A eps, T* __restrict__ y,
                               A* __restrict__ mean_out, A* __restrict__ rstd_out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= T_) return;
  const int64_t src = idx[r];
  DIFFCR_DEVICE_CHECK(src >= 0 && src < num_rows);
  const int64_t b = src / N;
  const T* xr = x + src * D;
  A s = 0;
  for (int64_t d = lane; d < D; d += 32) s += load_acc(xr + d);
  const A mu = warp_sum(s) / static_cast<A>(D);
  A v = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const A t = load_acc(xr + d) - mu;
    v += t * t;
  }
  const A rs = acc_rsqrt(warp_sum(v) / static_cast<A>(D) + eps);
  T* yr = y + r * D;
  for (int64_t d = lane; d < D; d += 32) {
    A h = (load_acc(xr + d) - mu) * rs;
    if (weight) h *= load_acc(weight + d);
    if (bias) h += load_acc(bias + d);
    if (scale) h *= A(1) + load_acc(scale + b * D + d);
    if (shift) h += load_acc(shift + b * D + d);
    store_acc(yr + d, h);
  }
  if (lane == 0) {
    mean_out[r] = mu;
    rstd_out[r] = rs;
  }
}

template <typename T, typename A>
__global__ void gnm_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                               const int64_t* __restrict__ idx, int64_t T_, int64_t D, int64_t N,
                               const A* __restrict__ mean, const A* __restrict__ rstd,
                               const T* __restrict__ scale, const T* __restrict__ weight,
                               T* __restrict__ grad_rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= T_) return;
  const int64_t src = idx[r];
  const int64_t b = src / N;
  const T* xr = x + src * D;
  const T* gr = gy + r * D;
  const A mu = mean[r], rs = rstd[r];
  // g = dL/dxhat = gy * (1 + scale) * weight
  A s1 = 0, s2 = 0;
  for (int64_t d = lane; d < D; d += 32) {
    A g = load_acc(gr + d);
    if (scale) g *= A(1) + load_acc(scale + b * D + d);
    if (weight) g *= load_acc(weight + d);
    const A xh = (load_acc(xr + d) - mu) * rs;
    s1 += g;
    s2 += g * xh;
  }
  const A m1 = warp_sum(s1) / static_cast<A>(D);
  const A m2 = warp_sum(s2) / static_cast<A>(D);
  T* out = grad_rows + r * D;
  for (int64_t d = lane; d < D; d += 32) {
    A g = load_acc(gr + d);
    if (scale) g *= A(1) + load_acc(scale + b * D + d);
    if (weight) g *= load_acc(weight + d);
    const A xh = (load_acc(xr + d) - mu) * rs;
    store_acc(out + d, rs * (g - m1 - xh * m2));
  }
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int gather_norm_modulate_fwd(DType dt, const void* x, const int64_t* idx, int64_t T, int64_t D,
                             int64_t N, int64_t num_rows, const void* shift, const void* scale,
                             const void* weight, const void* bias, double eps, void* y, void* mean,
                             void* rstd, void* stream) {
  if (T == 0) return 0;
  const dim3 grid(static_cast<unsigned>((T + kWarps - 1) / kWarps));
  return DIFFCR_DISPATCH(dt, {
    using A = typename AccOf<scalar_t>::type;
    gnm_fwd_kernel<scalar_t, A><<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const scalar_t*>(x), idx, T, D, N, num_rows,
        static_cast<const scalar_t*>(shift), static_cast<const scalar_t*>(scale),
        static_cast<const scalar_t*>(weight), static_cast<const scalar_t*>(bias),
        static_cast<A>(eps), static_cast<scalar_t*>(y), static_cast<A*>(mean),
        static_cast<A*>(rstd));
    return static_cast<int>(cudaGetLastError());
  });
}

int gather_norm_modulate_bwd(DType dt, const void* grad_y, const void* x, const int64_t* idx,
                             int64_t T, int64_t D, int64_t N, const void* mean, const void* rstd,
                             const void* scale, const void* weight, void* grad_rows, void* stream) {
  if (T == 0) return 0;
  const dim3 grid(static_cast<unsigned>((T + kWarps - 1) / kWarps));
  return DIFFCR_DISPATCH(dt, {
    using A = typename AccOf<scalar_t>::type;
    gnm_bwd_kernel<scalar_t, A><<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const scalar_t*>(grad_y), static_cast<const scalar_t*>(x), idx, T, D, N,
        static_cast<const A*>(mean), static_cast<const A*>(rstd),
        static_cast<const scalar_t*>(scale), static_cast<const scalar_t*>(weight),
        static_cast<scalar_t*>(grad_rows));
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace diffcr
