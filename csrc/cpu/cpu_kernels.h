// CPU kernels (at::parallel_for over rows or column blocks, vectorised inner loops).
// Inputs are validated and made contiguous by csrc/ops.cpp before these run.
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace diffcr {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_norm_modulate(
    const at::Tensor& x, const at::Tensor& idx, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps);

at::Tensor gather_norm_modulate_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& idx, const at::Tensor& mean,
                                         const at::Tensor& rstd,
                                         const c10::optional<at::Tensor>& scale,
                                         const c10::optional<at::Tensor>& weight);

// out (contiguous [B, N, D], holding x) += the scatter of the packed rows, in place.
void scatter_back_into(at::Tensor& out, const at::Tensor& idx, const at::Tensor& cu_seqlens,
                       const at::Tensor& seg_weight, const at::Tensor& attn_update,
                       const c10::optional<at::Tensor>& mlp_out,
                       const c10::optional<at::Tensor>& scores,
                       const c10::optional<at::Tensor>& gate);

at::Tensor scatter_back(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& cu_seqlens,
                        const at::Tensor& seg_weight, const at::Tensor& attn_update,
                        const c10::optional<at::Tensor>& mlp_out,
                        const c10::optional<at::Tensor>& scores,
                        const c10::optional<at::Tensor>& gate);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scatter_back_backward(
    const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& cu_seqlens,
    const at::Tensor& seg_weight, const at::Tensor& attn_update,
    const c10::optional<at::Tensor>& mlp_out, const c10::optional<at::Tensor>& scores,
    const c10::optional<at::Tensor>& gate);

// The token-cache pass (see diffcr_kernels.reference.apply_token_cache_), in place on out and
// cache; slot values are range-checked here before anything is written.
void apply_token_cache(at::Tensor& out, at::Tensor& cache, const at::Tensor& slot,
                       const at::Tensor& x_rows, const c10::optional<at::Tensor>& miss);

}  // namespace cpu
}  // namespace diffcr
