// Gather fused with LayerNorm and adaLN modulate, forward and per-row backward.
// One warp per packed row. Each lane moves V consecutive elements per access (16 bytes: 8 bf16
// / fp16, 4 fp32, 2 fp64) when the row length and every base pointer allow it (V = 1
// otherwise). The row is read from global memory once; the later passes over it hit L1/L2.
#include "kernels/common.cuh"

namespace diffcr {
namespace cuda {

template <typename T, typename A, int V>
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
  A v[V];
  A s = 0;
  for (int64_t d = lane * V; d < D; d += 32 * V) {
    load_vec<V>(xr + d, v);
#pragma unroll
    for (int i = 0; i < V; ++i) s += v[i];
  }
  const A mu = warp_sum(s) / static_cast<A>(D);
  A q = 0;
  for (int64_t d = lane * V; d < D; d += 32 * V) {
    load_vec<V>(xr + d, v);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const A t = v[i] - mu;
      q += t * t;
    }
  }
  const A rs = acc_rsqrt(warp_sum(q) / static_cast<A>(D) + eps);
  T* yr = y + r * D;
  A p[V];
  for (int64_t d = lane * V; d < D; d += 32 * V) {
    load_vec<V>(xr + d, v);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = (v[i] - mu) * rs;
    if (weight) {
      load_vec<V>(weight + d, p);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] *= p[i];
    }
    if (bias) {
      load_vec<V>(bias + d, p);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] += p[i];
    }
    if (scale) {
      load_vec<V>(scale + b * D + d, p);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] *= A(1) + p[i];
    }
    if (shift) {
      load_vec<V>(shift + b * D + d, p);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] += p[i];
    }
    store_vec<V>(yr + d, v);
  }
  if (lane == 0) {
    mean_out[r] = mu;
    rstd_out[r] = rs;
  }
}

// g = dL/dxhat = gy * (1 + scale) * weight for V elements at column d of row r.
template <typename T, typename A, int V>
__device__ __forceinline__ void gnm_bwd_g(const T* gr, const T* scale_b, const T* weight,
                                          int64_t d, A (&g)[V]) {
  A p[V];
  load_vec<V>(gr + d, g);
  if (scale_b) {
    load_vec<V>(scale_b + d, p);
#pragma unroll
    for (int i = 0; i < V; ++i) g[i] *= A(1) + p[i];
  }
  if (weight) {
    load_vec<V>(weight + d, p);
#pragma unroll
    for (int i = 0; i < V; ++i) g[i] *= p[i];
  }
}

template <typename T, typename A, int V>
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
  const T* scale_b = scale ? scale + b * D : nullptr;
  const A mu = mean[r], rs = rstd[r];
  A g[V], xv[V];
  A s1 = 0, s2 = 0;
  for (int64_t d = lane * V; d < D; d += 32 * V) {
    gnm_bwd_g<T, A, V>(gr, scale_b, weight, d, g);
    load_vec<V>(xr + d, xv);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      s1 += g[i];
      s2 += g[i] * ((xv[i] - mu) * rs);
    }
  }
  const A m1 = warp_sum(s1) / static_cast<A>(D);
  const A m2 = warp_sum(s2) / static_cast<A>(D);
  T* out = grad_rows + r * D;
  for (int64_t d = lane * V; d < D; d += 32 * V) {
    gnm_bwd_g<T, A, V>(gr, scale_b, weight, d, g);
    load_vec<V>(xr + d, xv);
#pragma unroll
    for (int i = 0; i < V; ++i) g[i] = rs * (g[i] - m1 - ((xv[i] - mu) * rs) * m2);
    store_vec<V>(out + d, g);
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
    const bool vec = D % vec_width<scalar_t>() == 0 && aligned16({x, shift, scale, weight, bias, y});
    with_vec<scalar_t>(vec, [&](auto w) {
      gnm_fwd_kernel<scalar_t, A, decltype(w)::value>
          <<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
              static_cast<const scalar_t*>(x), idx, T, D, N, num_rows,
              static_cast<const scalar_t*>(shift), static_cast<const scalar_t*>(scale),
              static_cast<const scalar_t*>(weight), static_cast<const scalar_t*>(bias),
              static_cast<A>(eps), static_cast<scalar_t*>(y), static_cast<A*>(mean),
              static_cast<A*>(rstd));
    });
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
    const bool vec =
        D % vec_width<scalar_t>() == 0 && aligned16({grad_y, x, scale, weight, grad_rows});
    with_vec<scalar_t>(vec, [&](auto w) {
      gnm_bwd_kernel<scalar_t, A, decltype(w)::value>
          <<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
              static_cast<const scalar_t*>(grad_y), static_cast<const scalar_t*>(x), idx, T, D, N,
              static_cast<const A*>(mean), static_cast<const A*>(rstd),
              static_cast<const scalar_t*>(scale), static_cast<const scalar_t*>(weight),
              static_cast<scalar_t*>(grad_rows));
    });
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace diffcr
