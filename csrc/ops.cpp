// CPU implementations of the diffcr:: operators. Their schemas are defined once, from Python
// (diffcr_kernels/_schemas.py), before this library is loaded; the CUDA implementations are in
// cuda_ops.cpp (CUDA builds only); fake kernels and autograd in diffcr_kernels/ops.py.
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_kernels.h"

namespace diffcr {
namespace {

const char* kGnm = "diffcr::gather_norm_modulate";
const char* kGnmB = "diffcr::gather_norm_modulate_backward";
const char* kSb = "diffcr::scatter_back";
const char* kSbB = "diffcr::scatter_back_backward";
const char* kSbI = "diffcr::scatter_back_";

at::Tensor opt_contig(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}
c10::optional<at::Tensor> as_opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gnm_cpu(const at::Tensor& x, const at::Tensor& idx,
                                                       const c10::optional<at::Tensor>& shift,
                                                       const c10::optional<at::Tensor>& scale,
                                                       const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias,
                                                       double eps) {
  check_x(x, kGnm);
  check_idx(idx, x, kGnm);
  const int64_t B = x.size(0), D = x.size(2);
  check_opt(shift, kGnm, "shift", x, {B, D});
  check_opt(scale, kGnm, "scale", x, {B, D});
  check_opt(weight, kGnm, "weight", x, {D});
  check_opt(bias, kGnm, "bias", x, {D});
  TORCH_CHECK_VALUE(eps >= 0, kGnm, ": eps must be >= 0, got ", eps);
  return cpu::gather_norm_modulate(x.contiguous(), idx.contiguous(), as_opt(opt_contig(shift)),
                                   as_opt(opt_contig(scale)), as_opt(opt_contig(weight)),
                                   as_opt(opt_contig(bias)), eps);
}

at::Tensor gnm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& idx,
                       const at::Tensor& mean, const at::Tensor& rstd,
                       const c10::optional<at::Tensor>& scale,
                       const c10::optional<at::Tensor>& weight) {
  check_x(x, kGnmB);
  check_idx(idx, x, kGnmB);
  const int64_t B = x.size(0), D = x.size(2), T = idx.numel();
  check_data(grad_y, kGnmB, "grad_y", x);
  check_shape(grad_y, kGnmB, "grad_y", {T, D});
  check_acc(mean, x, kGnmB, "mean", T);
  check_acc(rstd, x, kGnmB, "rstd", T);
  check_opt(scale, kGnmB, "scale", x, {B, D});
  check_opt(weight, kGnmB, "weight", x, {D});
  return cpu::gather_norm_modulate_backward(grad_y.contiguous(), x.contiguous(), idx.contiguous(),
                                            mean.contiguous(), rstd.contiguous(),
                                            as_opt(opt_contig(scale)), as_opt(opt_contig(weight)));
}

}  // namespace

// Shared by the CPU and CUDA registrations.
void check_scatter_args(const char* op, const at::Tensor& x, const at::Tensor& idx,
                        const at::Tensor& cu_seqlens, int64_t max_seqlen, int64_t segs_per_sample,
                        const at::Tensor& seg_weight, const at::Tensor& attn_update,
                        const c10::optional<at::Tensor>& mlp_out,
                        const c10::optional<at::Tensor>& scores,
                        const c10::optional<at::Tensor>& gate) {
  check_x(x, op);
  check_idx(idx, x, op);
  check_cu_seqlens(cu_seqlens, x, op);
  const int64_t B = x.size(0), D = x.size(2), T = idx.numel();
  const int64_t S = cu_seqlens.numel() - 1;
  TORCH_CHECK_VALUE(max_seqlen >= 0, op, ": max_seqlen must be >= 0, got ", max_seqlen);
  TORCH_CHECK_VALUE(segs_per_sample >= 1, op, ": segs_per_sample must be >= 1, got ",
                    segs_per_sample);
  TORCH_CHECK_VALUE(S % segs_per_sample == 0, op, ": the number of segments (", S,
              ") is not a multiple of segs_per_sample (", segs_per_sample, ")");
  check_acc(seg_weight, x, op, "seg_weight", S);
  check_data(attn_update, op, "attn_update", x);
  check_shape(attn_update, op, "attn_update", {T, D});
  check_opt(mlp_out, op, "mlp_out", x, {T, D});
  check_opt(gate, op, "gate", x, {B, D});
  if (scores.has_value() && scores->defined()) check_acc(*scores, x, op, "scores", T);
}

namespace {

at::Tensor sb_cpu(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& cu_seqlens,
                  int64_t max_seqlen, int64_t segs_per_sample, const at::Tensor& seg_weight,
                  const at::Tensor& attn_update, const c10::optional<at::Tensor>& mlp_out,
                  const c10::optional<at::Tensor>& scores, const c10::optional<at::Tensor>& gate) {
  check_scatter_args(kSb, x, idx, cu_seqlens, max_seqlen, segs_per_sample, seg_weight, attn_update,
                     mlp_out, scores, gate);
  check_segs_layout(kSb, x.size(0), cu_seqlens.numel() - 1, segs_per_sample);
  check_cu_seqlens_values(cu_seqlens, idx.numel(), max_seqlen, kSb);
  return cpu::scatter_back(x.contiguous(), idx.contiguous(), cu_seqlens.contiguous(),
                           seg_weight.contiguous(), attn_update.contiguous(),
                           as_opt(opt_contig(mlp_out)), as_opt(opt_contig(scores)),
                           as_opt(opt_contig(gate)));
}

void sb_inplace_cpu(at::Tensor& x, const at::Tensor& idx, const at::Tensor& cu_seqlens,
                    int64_t max_seqlen, int64_t segs_per_sample, const at::Tensor& seg_weight,
                    const at::Tensor& attn_update, const c10::optional<at::Tensor>& mlp_out,
                    const c10::optional<at::Tensor>& scores,
                    const c10::optional<at::Tensor>& gate) {
  check_scatter_args(kSbI, x, idx, cu_seqlens, max_seqlen, segs_per_sample, seg_weight, attn_update,
                     mlp_out, scores, gate);
  check_segs_layout(kSbI, x.size(0), cu_seqlens.numel() - 1, segs_per_sample);
  check_inplace_target(x, kSbI,
                       {{"attn_update", &attn_update},
                        {"mlp_out", mlp_out ? &*mlp_out : nullptr},
                        {"gate", gate ? &*gate : nullptr},
                        {"idx", &idx}});
  check_cu_seqlens_values(cu_seqlens, idx.numel(), max_seqlen, kSbI);
  cpu::scatter_back_into(x, idx.contiguous(), cu_seqlens.contiguous(), seg_weight.contiguous(),
                         attn_update.contiguous(), as_opt(opt_contig(mlp_out)),
                         as_opt(opt_contig(scores)), as_opt(opt_contig(gate)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sb_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& cu_seqlens,
    int64_t max_seqlen, const at::Tensor& seg_weight, const at::Tensor& attn_update,
    const c10::optional<at::Tensor>& mlp_out, const c10::optional<at::Tensor>& scores,
    const c10::optional<at::Tensor>& gate) {
  check_scatter_args(kSbB, grad_out, idx, cu_seqlens, max_seqlen, 1, seg_weight, attn_update,
                     mlp_out, scores, gate);
  check_cu_seqlens_values(cu_seqlens, idx.numel(), max_seqlen, kSbB);
  return cpu::scatter_back_backward(grad_out.contiguous(), idx.contiguous(),
                                    cu_seqlens.contiguous(), seg_weight.contiguous(),
                                    attn_update.contiguous(), as_opt(opt_contig(mlp_out)),
                                    as_opt(opt_contig(scores)), as_opt(opt_contig(gate)));
}

void token_cache_cpu(at::Tensor& out, at::Tensor& cache, const at::Tensor& slot,
                     const at::Tensor& x_rows, const c10::optional<at::Tensor>& miss) {
  const char* op = "diffcr::apply_token_cache_";
  check_token_cache_args(op, out, cache, slot, x_rows, miss);
  cpu::apply_token_cache(out, cache, slot.contiguous(), x_rows.contiguous(),
                         as_opt(opt_contig(miss)));
}

}  // namespace
}  // namespace diffcr

// The ops are defined (schemas) once, in diffcr_kernels/_schemas.py, before this library is
// loaded; this file and cuda_ops.cpp only implement them.
TORCH_LIBRARY_IMPL(diffcr, CPU, m) {
  m.impl("gather_norm_modulate", &diffcr::gnm_cpu);
  m.impl("gather_norm_modulate_backward", &diffcr::gnm_bwd_cpu);
  m.impl("scatter_back", &diffcr::sb_cpu);
  m.impl("scatter_back_", &diffcr::sb_inplace_cpu);
  m.impl("scatter_back_backward", &diffcr::sb_bwd_cpu);
  m.impl("apply_token_cache_", &diffcr::token_cache_cpu);
}
