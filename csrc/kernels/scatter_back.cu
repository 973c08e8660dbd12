// Gated, bin-weighted scatter-back into the residual stream, forward and per-row backward.
// Grid: (row blocks of max_seqlen, segments); one warp per packed row; V elements per lane and
// access (16-byte vectors when the row length and base pointers allow it, see common.cuh).
#include "kernels/common.cuh"

namespace diffcr {
namespace cuda {

template <typename T, typename A, int V>
__global__ void scatter_fwd_kernel(T* __restrict__ out, const int64_t* __restrict__ idx,
                                   const int32_t* __restrict__ cu, int64_t P, int64_t p, int64_t D,
                                   int64_t N, int64_t num_rows, const A* __restrict__ seg_weight,
                                   const T* __restrict__ attn_update, const T* __restrict__ mlp_out,
                                   const A* __restrict__ scores, const T* __restrict__ gate) {
  const int64_t seg = static_cast<int64_t>(blockIdx.y) * P + p;
  const int64_t start = cu[seg], end = cu[seg + 1];
  const int64_t r = start + static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= end) return;
  const int64_t dst = idx[r];
  DIFFCR_DEVICE_CHECK(dst >= 0 && dst < num_rows);
  const int64_t b = dst / N;
  const A w = seg_weight[seg];
  const A s = scores ? scores[r] : A(1);
  T* o = out + dst * D;
  const T* a = attn_update + r * D;
  const T* m2 = mlp_out ? mlp_out + r * D : nullptr;
  const T* gb = gate ? gate + b * D : nullptr;
  A c[V], m[V], t[V];
  for (int64_t d = lane * V; d < D; d += 32 * V) {
    load_vec<V>(a + d, c);
    if (m2) {
      load_vec<V>(m2 + d, m);
      if (gb) {
        load_vec<V>(gb + d, t);
#pragma unroll
        for (int i = 0; i < V; ++i) m[i] *= t[i];
      }
#pragma unroll
      for (int i = 0; i < V; ++i) c[i] += s * m[i];
    }
    load_vec<V>(o + d, t);
#pragma unroll
    for (int i = 0; i < V; ++i) t[i] += w * c[i];
    store_vec<V>(o + d, t);
  }
}

template <typename T, typename A, int V>
__global__ void scatter_bwd_kernel(const T* __restrict__ gout, const int64_t* __restrict__ idx,
                                   const int32_t* __restrict__ cu, int64_t D, int64_t N,
                                   const A* __restrict__ seg_weight,
                                   const T* __restrict__ attn_update, const T* __restrict__ mlp_out,
                                   const A* __restrict__ scores, const T* __restrict__ gate,
                                   T* __restrict__ grad_attn_update, T* __restrict__ grad_mlp_out,
                                   A* __restrict__ grad_scores, A* __restrict__ row_dot) {
  const int64_t seg = blockIdx.y;
  const int64_t start = cu[seg], end = cu[seg + 1];
  const int64_t r = start + static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= end) return;
  const int64_t src = idx[r];
  const int64_t b = src / N;
  const A w = seg_weight[seg];
  const A s = scores ? scores[r] : A(1);
  const T* G = gout + src * D;
  const T* gb = gate ? gate + b * D : nullptr;
  A g[V], c[V], m[V], gt[V], o[V];
  A dot_s = 0, dot_w = 0;
  for (int64_t d = lane * V; d < D; d += 32 * V) {
    load_vec<V>(G + d, g);
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = w * g[i];
    store_vec<V>(grad_attn_update + r * D + d, o);
    load_vec<V>(attn_update + r * D + d, c);
    if (mlp_out) {
      if (gb) {
        load_vec<V>(gb + d, gt);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) gt[i] = A(1);
      }
      load_vec<V>(mlp_out + r * D + d, m);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        m[i] *= gt[i];
        o[i] = w * s * gt[i] * g[i];
        dot_s += m[i] * g[i];
        c[i] += s * m[i];
      }
      store_vec<V>(grad_mlp_out + r * D + d, o);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) dot_w += c[i] * g[i];
  }
  dot_s = warp_sum(dot_s);
  dot_w = warp_sum(dot_w);
  if (lane == 0) {
    if (grad_scores) grad_scores[r] = w * dot_s;
    row_dot[r] = dot_w;
  }
}

int scatter_back_fwd(DType dt, void* out, const int64_t* idx, const int32_t* cu_seqlens, int64_t S,
                     int64_t max_seqlen, int64_t segs_per_sample, int64_t D, int64_t N,
                     int64_t num_rows, const void* seg_weight, const void* attn_update,
                     const void* mlp_out, const void* scores, const void* gate, void* stream) {
  if (S == 0 || max_seqlen == 0) return 0;
  const int64_t P = segs_per_sample;
  const dim3 grid(static_cast<unsigned>((max_seqlen + kWarps - 1) / kWarps),
                  static_cast<unsigned>(S / P));
  return DIFFCR_DISPATCH(dt, {
    using A = typename AccOf<scalar_t>::type;
    const bool vec = D % vec_width<scalar_t>() == 0 && aligned16({out, attn_update, mlp_out, gate});
    for (int64_t p = 0; p < P; ++p) {
      with_vec<scalar_t>(vec, [&](auto w) {
        scatter_fwd_kernel<scalar_t, A, decltype(w)::value>
            <<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
                static_cast<scalar_t*>(out), idx, cu_seqlens, P, p, D, N, num_rows,
                static_cast<const A*>(seg_weight), static_cast<const scalar_t*>(attn_update),
                static_cast<const scalar_t*>(mlp_out), static_cast<const A*>(scores),
                static_cast<const scalar_t*>(gate));
      });
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return static_cast<int>(err);
    }
    return 0;
  });
}

int scatter_back_bwd(DType dt, const void* grad_out, const int64_t* idx, const int32_t* cu_seqlens,
                     int64_t S, int64_t max_seqlen, int64_t D, int64_t N, int64_t num_rows,
                     const void* seg_weight, const void* attn_update, const void* mlp_out,
                     const void* scores, const void* gate, void* grad_attn_update,
                     void* grad_mlp_out, void* grad_scores, void* row_dot, void* stream) {
  (void)num_rows;
  if (S == 0 || max_seqlen == 0) return 0;
  const dim3 grid(static_cast<unsigned>((max_seqlen + kWarps - 1) / kWarps),
                  static_cast<unsigned>(S));
  return DIFFCR_DISPATCH(dt, {
    using A = typename AccOf<scalar_t>::type;
    const bool vec =
        D % vec_width<scalar_t>() == 0 &&
        aligned16({grad_out, attn_update, mlp_out, gate, grad_attn_update, grad_mlp_out});
    with_vec<scalar_t>(vec, [&](auto w) {
      scatter_bwd_kernel<scalar_t, A, decltype(w)::value>
          <<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
              static_cast<const scalar_t*>(grad_out), idx, cu_seqlens, D, N,
              static_cast<const A*>(seg_weight), static_cast<const scalar_t*>(attn_update),
              static_cast<const scalar_t*>(mlp_out), static_cast<const A*>(scores),
              static_cast<const scalar_t*>(gate), static_cast<scalar_t*>(grad_attn_update),
              static_cast<scalar_t*>(grad_mlp_out), static_cast<A*>(grad_scores),
              static_cast<A*>(row_dot));
    });
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace diffcr
