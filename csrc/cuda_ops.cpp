// CUDA registrations: validate, allocate, and call the launchers of csrc/kernels/*.cu.
// This is a host-compiled file; the .cu files never see a torch header.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "kernels/diffcr_cuda.h"

namespace diffcr {

void check_scatter_args(const char* op, const at::Tensor& x, const at::Tensor& idx,
                        const at::Tensor& cu_seqlens, int64_t max_seqlen, int64_t segs_per_sample,
                        const at::Tensor& seg_weight, const at::Tensor& attn_update,
                        const c10::optional<at::Tensor>& mlp_out,
                        const c10::optional<at::Tensor>& scores,
                        const c10::optional<at::Tensor>& gate);

namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, "diffcr: unsupported dtype ", t.scalar_type());
  }
}

const void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
at::Tensor opt_contig(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}
void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, op, ": CUDA launch failed: ", cuda::error_string(code));
}

void check_gnm(const char* op, const at::Tensor& x, const at::Tensor& idx,
               const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
               const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  check_x(x, op);
  check_idx(idx, x, op);
  const int64_t B = x.size(0), D = x.size(2);
  check_opt(shift, op, "shift", x, {B, D});
  check_opt(scale, op, "scale", x, {B, D});
  check_opt(weight, op, "weight", x, {D});
  check_opt(bias, op, "bias", x, {D});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gnm_cuda(
    const at::Tensor& x_, const at::Tensor& idx_, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  const char* op = "diffcr::gather_norm_modulate";
  check_gnm(op, x_, idx_, shift, scale, weight, bias);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), idx = idx_.contiguous();
  const at::Tensor sh = opt_contig(shift), sc = opt_contig(scale), wt = opt_contig(weight),
                   bs = opt_contig(bias);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), T = idx.numel();
  at::Tensor y = at::empty({T, D}, x.options());
  at::Tensor mean = at::empty({T}, x.options().dtype(acc_type_of(x.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  check_launch(cuda::gather_norm_modulate_fwd(dtype_of(x), x.data_ptr(), idx.data_ptr<int64_t>(),
                                              T, D, N, B * N, ptr(sh), ptr(sc), ptr(wt), ptr(bs),
                                              eps, y.data_ptr(), mean.data_ptr(),
                                              rstd.data_ptr(), stream()),
               op);
  return {y, mean, rstd};
}

at::Tensor gnm_bwd_cuda(const at::Tensor& grad_y_, const at::Tensor& x_, const at::Tensor& idx_,
                        const at::Tensor& mean_, const at::Tensor& rstd_,
                        const c10::optional<at::Tensor>& scale,
                        const c10::optional<at::Tensor>& weight) {
  const char* op = "diffcr::gather_norm_modulate_backward";
  check_gnm(op, x_, idx_, c10::nullopt, scale, weight, c10::nullopt);
  const int64_t N = x_.size(1), D = x_.size(2), T = idx_.numel();
  check_data(grad_y_, op, "grad_y", x_);
  check_shape(grad_y_, op, "grad_y", {T, D});
  check_acc(mean_, x_, op, "mean", T);
  check_acc(rstd_, x_, op, "rstd", T);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor gy = grad_y_.contiguous(), x = x_.contiguous(), idx = idx_.contiguous(),
                   mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor sc = opt_contig(scale), wt = opt_contig(weight);
  at::Tensor grad_rows = at::empty({T, D}, x.options());
  check_launch(cuda::gather_norm_modulate_bwd(dtype_of(x), gy.data_ptr(), x.data_ptr(),
                                              idx.data_ptr<int64_t>(), T, D, N, mean.data_ptr(),
                                              rstd.data_ptr(), ptr(sc), ptr(wt),
                                              grad_rows.data_ptr(), stream()),
               op);
  return grad_rows;
}

// out holds x (contiguous); the kernel adds the packed rows into it.
void launch_scatter(const char* op, at::Tensor& out, const at::Tensor& idx, const at::Tensor& cu,
                    int64_t max_seqlen, int64_t segs_per_sample, const at::Tensor& w,
                    const at::Tensor& attn_update, const at::Tensor& m, const at::Tensor& s,
                    const at::Tensor& g) {
  const int64_t B = out.size(0), N = out.size(1), D = out.size(2);
  check_launch(cuda::scatter_back_fwd(dtype_of(out), out.data_ptr(), idx.data_ptr<int64_t>(),
                                      cu.data_ptr<int32_t>(), cu.numel() - 1, max_seqlen,
                                      segs_per_sample, D, N, B * N, w.data_ptr(),
                                      attn_update.data_ptr(), ptr(m), ptr(s), ptr(g), stream()),
               op);
}

at::Tensor sb_cuda(const at::Tensor& x_, const at::Tensor& idx_, const at::Tensor& cu_,
                   int64_t max_seqlen, int64_t segs_per_sample, const at::Tensor& w_,
                   const at::Tensor& attn_update_, const c10::optional<at::Tensor>& mlp_out,
                   const c10::optional<at::Tensor>& scores,
                   const c10::optional<at::Tensor>& gate) {
  const char* op = "diffcr::scatter_back";
  check_scatter_args(op, x_, idx_, cu_, max_seqlen, segs_per_sample, w_, attn_update_, mlp_out,
                     scores, gate);
  check_segs_layout(op, x_.size(0), cu_.numel() - 1, segs_per_sample);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor idx = idx_.contiguous(), cu = cu_.contiguous(), w = w_.contiguous(),
                   attn_update = attn_update_.contiguous();
  const at::Tensor m = opt_contig(mlp_out), s = opt_contig(scores), g = opt_contig(gate);
  at::Tensor out = x_.contiguous().clone();
  launch_scatter(op, out, idx, cu, max_seqlen, segs_per_sample, w, attn_update, m, s, g);
  return out;
}

// In place: x itself receives the scatter (no copy of the B*N*D residual stream).
void sb_inplace_cuda(at::Tensor& x, const at::Tensor& idx_, const at::Tensor& cu_,
                     int64_t max_seqlen, int64_t segs_per_sample, const at::Tensor& w_,
                     const at::Tensor& attn_update_, const c10::optional<at::Tensor>& mlp_out,
                     const c10::optional<at::Tensor>& scores,
                     const c10::optional<at::Tensor>& gate) {
  const char* op = "diffcr::scatter_back_";
  check_scatter_args(op, x, idx_, cu_, max_seqlen, segs_per_sample, w_, attn_update_, mlp_out,
                     scores, gate);
  check_segs_layout(op, x.size(0), cu_.numel() - 1, segs_per_sample);
  check_inplace_target(x, op,
                       {{"attn_update", &attn_update_},
                        {"mlp_out", mlp_out ? &*mlp_out : nullptr},
                        {"gate", gate ? &*gate : nullptr},
                        {"idx", &idx_}});
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor idx = idx_.contiguous(), cu = cu_.contiguous(), w = w_.contiguous(),
                   attn_update = attn_update_.contiguous();
  launch_scatter(op, x, idx, cu, max_seqlen, segs_per_sample, w, attn_update, opt_contig(mlp_out),
                 opt_contig(scores), opt_contig(gate));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sb_bwd_cuda(
    const at::Tensor& gout_, const at::Tensor& idx_, const at::Tensor& cu_, int64_t max_seqlen,
    const at::Tensor& w_, const at::Tensor& attn_update_, const c10::optional<at::Tensor>& mlp_out,
    const c10::optional<at::Tensor>& scores, const c10::optional<at::Tensor>& gate) {
  const char* op = "diffcr::scatter_back_backward";
  check_scatter_args(op, gout_, idx_, cu_, max_seqlen, 1, w_, attn_update_, mlp_out, scores, gate);
  const c10::cuda::CUDAGuard guard(gout_.device());
  const at::Tensor G = gout_.contiguous(), idx = idx_.contiguous(), cu = cu_.contiguous(),
                   w = w_.contiguous(), attn_update = attn_update_.contiguous();
  const at::Tensor m = opt_contig(mlp_out), s = opt_contig(scores), g = opt_contig(gate);
  const int64_t B = G.size(0), N = G.size(1), D = G.size(2), T = idx.numel();
  at::Tensor grad_attn_update = at::empty({T, D}, attn_update.options());
  at::Tensor grad_mlp_out = at::empty({m.defined() ? T : 0, D}, attn_update.options());
  at::Tensor grad_s = at::empty({s.defined() ? T : 0}, w.options());
  at::Tensor dots = at::empty({T}, w.options());
  if (s.defined() && !m.defined()) grad_s.zero_();
  check_launch(cuda::scatter_back_bwd(dtype_of(G), G.data_ptr(), idx.data_ptr<int64_t>(),
                                      cu.data_ptr<int32_t>(), cu.numel() - 1, max_seqlen, D, N,
                                      B * N, w.data_ptr(), attn_update.data_ptr(), ptr(m), ptr(s),
                                      ptr(g), grad_attn_update.data_ptr(),
                                      m.defined() ? grad_mlp_out.data_ptr() : nullptr,
                                      (s.defined() && m.defined()) ? grad_s.data_ptr() : nullptr,
                                      dots.data_ptr(), stream()),
               op);
  return {grad_attn_update, grad_mlp_out, grad_s, dots};
}

void token_cache_cuda(at::Tensor& out, at::Tensor& cache, const at::Tensor& slot_,
                      const at::Tensor& x_rows_, const c10::optional<at::Tensor>& miss) {
  const char* op = "diffcr::apply_token_cache_";
  check_token_cache_args(op, out, cache, slot_, x_rows_, miss);
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor slot = slot_.contiguous(), x_rows = x_rows_.contiguous(),
                   m = opt_contig(miss);
  check_launch(cuda::apply_token_cache(dtype_of(out), dtype_of(cache), out.data_ptr(),
                                       cache.data_ptr(), slot.data_ptr<int32_t>(), ptr(x_rows),
                                       ptr(m), out.size(0) * out.size(1), out.size(2),
                                       x_rows.size(0), stream()),
               op);
}

}  // namespace
}  // namespace diffcr

TORCH_LIBRARY_IMPL(diffcr, CUDA, m) {
  m.impl("gather_norm_modulate", &diffcr::gnm_cuda);
  m.impl("gather_norm_modulate_backward", &diffcr::gnm_bwd_cuda);
  m.impl("scatter_back", &diffcr::sb_cuda);
  m.impl("scatter_back_", &diffcr::sb_inplace_cuda);
  m.impl("scatter_back_backward", &diffcr::sb_bwd_cuda);
  m.impl("apply_token_cache_", &diffcr::token_cache_cuda);
}
