// C ABI of the CUDA kernels. This header and the .cu files include no torch header, so nvcc
// compiles them in seconds; csrc/cuda_ops.cpp binds them to the torch dispatcher.
//
// Conventions (all kernels):
//   * every pointer is a device pointer to contiguous memory;
//   * x is [B*N, D] rows (a [B, N, D] tensor viewed flat), idx is int64 [T] flat row indices
//     (row = b*N + n, so the sample of a packed row is idx / N);
//   * cu_seqlens is int32 [S+1], segment s owns packed rows [cu[s], cu[s+1]);
//   * "acc" tensors (mean, rstd, scores, seg_weight, row_dot, grad_scores) are float64 when the
//     data dtype is float64 and float32 otherwise; math is done in the acc type;
//   * optional inputs are nullptr when absent;
//   * every launcher returns 0 or a cudaError_t value (see error_string).
#pragma once
#include <cstdint>

namespace diffcr {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

const char* error_string(int code);

// y[r] = LN(x[idx[r]]) (* weight + bias) * (1 + scale[b]) + shift[b];  mean/rstd [T] (acc).
int gather_norm_modulate_fwd(DType dt, const void* x, const int64_t* idx, int64_t T, int64_t D,
                             int64_t N, int64_t num_rows, const void* shift, const void* scale,
                             const void* weight, const void* bias, double eps, void* y, void* mean,
                             void* rstd, void* stream);

// grad_rows[r] = d y[r] / d x[idx[r]] applied to grad_y[r] (LN + modulate backward, per row).
int gather_norm_modulate_bwd(DType dt, const void* grad_y, const void* x, const int64_t* idx,
                             int64_t T, int64_t D, int64_t N, const void* mean, const void* rstd,
                             const void* scale, const void* weight, void* grad_rows, void* stream);

// out must already hold x. For each segment s (in slot order, see below) and row r of s:
//   out[idx[r]] += seg_weight[s] * (attn_update[r] + scores[r] * gate[b] * mlp_out[r]).
// Segments are sample-major with `segs_per_sample` P segments per sample; slot p (segments
// s = j*P + p) is one launch, so rows never collide within a launch (deterministic, no atomics).
int scatter_back_fwd(DType dt, void* out, const int64_t* idx, const int32_t* cu_seqlens, int64_t S,
                     int64_t max_seqlen, int64_t segs_per_sample, int64_t D, int64_t N,
                     int64_t num_rows, const void* seg_weight, const void* attn_update,
                     const void* mlp_out, const void* scores, const void* gate, void* stream);

// Per packed row r of segment s, with G = grad_out[idx[r]], w = seg_weight[s], s_r = scores[r]:
//   grad_attn_update[r] = w*G;  grad_mlp_out[r] = w*s_r*gate*G;
//   grad_scores[r] = w*sum(gate*mlp_out*G);
//   row_dot[r] = sum((attn_update + s_r*gate*mlp_out) * G)   (segment sums of row_dot give
//   d out/d seg_weight).
int scatter_back_bwd(DType dt, const void* grad_out, const int64_t* idx, const int32_t* cu_seqlens,
                     int64_t S, int64_t max_seqlen, int64_t D, int64_t N, int64_t num_rows,
                     const void* seg_weight, const void* attn_update, const void* mlp_out,
                     const void* scores, const void* gate, void* grad_attn_update,
                     void* grad_mlp_out, void* grad_scores, void* row_dot, void* stream);

// The token-cache pass (in place), for every row r of out [R, D] (R = B*N), in the acc type of
// dt, with m = miss[r] (acc, or nullptr: 1 where slot[r] < 0, else 0):
//   if m != 0:        out[r] = round(out[r] + m * cache[r]);
//   if slot[r] >= 0:  cache[r] = round_cache(out[r] - x_rows[slot[r]])   (the rounded out[r]).
// cache has its own dtype cache_dt; slot is int32 [R] with values in [-1, T_rows).
int apply_token_cache(DType dt, DType cache_dt, void* out, void* cache, const int32_t* slot,
                      const void* x_rows, const void* miss, int64_t R, int64_t D, int64_t T_rows,
                      void* stream);

}  // namespace cuda
}  // namespace diffcr
