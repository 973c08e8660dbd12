// CPU gated, bin-weighted scatter-back (forward) and its per-row backward.
// The forward splits the hidden dimension across threads and walks the packed rows in order, so
// duplicate rows (a token selected in both bins of a sample) accumulate in a fixed order without
// races or atomics: results are bitwise reproducible.
#include "cpu/common.h"
#include "cpu/cpu_kernels.h"

namespace diffcr {
namespace cpu {

namespace {
// Row -> segment map from cu_seqlens (int32 [S+1]).
std::vector<int64_t> row_segments(const at::Tensor& cu_seqlens, int64_t T) {
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int64_t S = cu_seqlens.numel() - 1;
  std::vector<int64_t> seg(T);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t r = cu[s]; r < cu[s + 1]; ++r) seg[r] = s;
  return seg;
}
}  // namespace

void scatter_back_into(at::Tensor& out, const at::Tensor& idx, const at::Tensor& cu_seqlens,
                       const at::Tensor& seg_weight, const at::Tensor& attn_update,
                       const c10::optional<at::Tensor>& mlp_out,
                       const c10::optional<at::Tensor>& scores,
                       const c10::optional<at::Tensor>& gate) {
  const int64_t B = out.size(0), N = out.size(1), D = out.size(2);
  const int64_t T = idx.numel();
  check_indices(idx, B * N, "diffcr::scatter_back");
  if (T == 0) return;
  const std::vector<int64_t> seg = row_segments(cu_seqlens, T);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter_back", [&] {
    using A = at::opmath_type<scalar_t>;
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const A* wp = seg_weight.data_ptr<A>();
    const scalar_t* ap = attn_update.data_ptr<scalar_t>();
    const scalar_t* mp = opt_ptr<scalar_t>(mlp_out);
    const A* sp = opt_ptr<A>(scores);
    const scalar_t* gp = opt_ptr<scalar_t>(gate);
    // Column blocks: each thread owns a slice of the hidden dimension for every row.
    constexpr int64_t kCols = 64;
    const int64_t nblk = (D + kCols - 1) / kCols;
    at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
      const int64_t c0 = begin * kCols, c1 = std::min(D, end * kCols), w = c1 - c0;
      std::vector<A> acc(w), aux(w), g(w);
      for (int64_t r = 0; r < T; ++r) {
        const int64_t dst = ip[r];
        const int64_t b = dst / N;
        const A wt = wp[seg[r]];
        load_row(ap + r * D + c0, acc.data(), w);
        if (mp) {
          const A s = sp ? sp[r] : A(1);
          load_row(mp + r * D + c0, aux.data(), w);
          if (gp) {
            load_row(gp + b * D + c0, g.data(), w);
            for (int64_t d = 0; d < w; ++d) acc[d] += s * aux[d] * g[d];
          } else {
            for (int64_t d = 0; d < w; ++d) acc[d] += s * aux[d];
          }
        }
        scalar_t* o = op + dst * D + c0;
        load_row(o, aux.data(), w);
        for (int64_t d = 0; d < w; ++d) aux[d] += wt * acc[d];
        store_row(aux.data(), o, w);
      }
    });
  });
}

at::Tensor scatter_back(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& cu_seqlens,
                        const at::Tensor& seg_weight, const at::Tensor& attn_update,
                        const c10::optional<at::Tensor>& mlp_out,
                        const c10::optional<at::Tensor>& scores,
                        const c10::optional<at::Tensor>& gate) {
  at::Tensor out = x.clone();
  scatter_back_into(out, idx, cu_seqlens, seg_weight, attn_update, mlp_out, scores, gate);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scatter_back_backward(
    const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& cu_seqlens,
    const at::Tensor& seg_weight, const at::Tensor& attn_update,
    const c10::optional<at::Tensor>& mlp_out,
    const c10::optional<at::Tensor>& scores, const c10::optional<at::Tensor>& gate) {
  const int64_t N = grad_out.size(1), D = grad_out.size(2);
  const int64_t num_rows = grad_out.size(0) * N;
  const int64_t T = idx.numel();
  check_indices(idx, num_rows, "diffcr::scatter_back_backward");
  const bool has_mlp_out = mlp_out.has_value() && mlp_out->defined();
  const bool has_s = scores.has_value() && scores->defined();
  const auto acc_dtype = seg_weight.scalar_type();
  at::Tensor grad_attn_update = at::empty({T, D}, attn_update.options());
  at::Tensor grad_mlp_out = at::empty({has_mlp_out ? T : 0, D}, attn_update.options());
  at::Tensor grad_s = at::empty({has_s ? T : 0}, attn_update.options().dtype(acc_dtype));
  at::Tensor dots = at::empty({T}, attn_update.options().dtype(acc_dtype));
  if (T == 0) return {grad_attn_update, grad_mlp_out, grad_s, dots};
  const std::vector<int64_t> seg = row_segments(cu_seqlens, T);
  const auto dtype = attn_update.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scatter_back_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* Gp = grad_out.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const A* wp = seg_weight.data_ptr<A>();
    const scalar_t* ap = attn_update.data_ptr<scalar_t>();
    const scalar_t* mp = has_mlp_out ? mlp_out->data_ptr<scalar_t>() : nullptr;
    const A* sp = has_s ? scores->data_ptr<A>() : nullptr;
    const scalar_t* gp = opt_ptr<scalar_t>(gate);
    scalar_t* g1 = grad_attn_update.data_ptr<scalar_t>();
    scalar_t* g2 = has_mlp_out ? grad_mlp_out.data_ptr<scalar_t>() : nullptr;
    A* gs = has_s ? grad_s.data_ptr<A>() : nullptr;
    A* rd = dots.data_ptr<A>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<A> G(D), c(D), m(D), gt(D), tmp(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t src = ip[r];
        const int64_t b = src / N;
        const A w = wp[seg[r]];
        const A s = sp ? sp[r] : A(1);
        load_row(Gp + src * D, G.data(), D);
        for (int64_t d = 0; d < D; ++d) tmp[d] = w * G[d];
        store_row(tmp.data(), g1 + r * D, D);
        load_row(ap + r * D, c.data(), D);
        if (mp) {
          load_row(mp + r * D, m.data(), D);
          if (gp) {
            load_row(gp + b * D, gt.data(), D);
          } else {
            std::fill(gt.begin(), gt.end(), A(1));
          }
          for (int64_t d = 0; d < D; ++d) {
            tmp[d] = w * s * gt[d] * G[d];
            m[d] *= gt[d];
            c[d] += s * m[d];
          }
          store_row(tmp.data(), g2 + r * D, D);
          if (gs) gs[r] = w * row_dot(m.data(), G.data(), D);
        } else if (gs) {
          gs[r] = A(0);
        }
        rd[r] = row_dot(c.data(), G.data(), D);
      }
    });
  });
  return {grad_attn_update, grad_mlp_out, grad_s, dots};
}

}  // namespace cpu
}  // namespace diffcr
