// CPU gather fused with LayerNorm + adaLN modulate (forward) and its per-row backward.
// Parallel over packed rows; each row is read once into an acc buffer, reduced with
// at::vec reductions, and written once.
#include "cpu/common.h"
#include "cpu/cpu_kernels.h"

namespace diffcr {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_norm_modulate(
    const at::Tensor& x, const at::Tensor& idx, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t T = idx.numel();
  check_indices(idx, B * N, "diffcr::gather_norm_modulate");
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty({T, D}, x.options());
  at::Tensor mean = at::empty({T}, x.options().dtype(acc_dtype));
  at::Tensor rstd = at::empty({T}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_norm_modulate", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* sh = opt_ptr<scalar_t>(shift);
    const scalar_t* sc = opt_ptr<scalar_t>(scale);
    const scalar_t* wt = opt_ptr<scalar_t>(weight);
    const scalar_t* bs = opt_ptr<scalar_t>(bias);
    scalar_t* yp = y.data_ptr<scalar_t>();
    A* mp = mean.data_ptr<A>();
    A* rp = rstd.data_ptr<A>();
    const A e = static_cast<A>(eps);
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<A> buf(D), aux(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t src = ip[r];
        const int64_t b = src / N;
        load_row(xp + src * D, buf.data(), D);
        const A mu = row_sum(buf.data(), D) / static_cast<A>(D);
        const A var = row_centered_sq(buf.data(), mu, D) / static_cast<A>(D);
        const A rs = A(1) / std::sqrt(var + e);
        A* h = buf.data();
        for (int64_t d = 0; d < D; ++d) h[d] = (h[d] - mu) * rs;
        if (wt) {
          load_row(wt, aux.data(), D);
          for (int64_t d = 0; d < D; ++d) h[d] *= aux[d];
        }
        if (bs) {
          load_row(bs, aux.data(), D);
          for (int64_t d = 0; d < D; ++d) h[d] += aux[d];
        }
        if (sc) {
          load_row(sc + b * D, aux.data(), D);
          for (int64_t d = 0; d < D; ++d) h[d] *= A(1) + aux[d];
        }
        if (sh) {
          load_row(sh + b * D, aux.data(), D);
          for (int64_t d = 0; d < D; ++d) h[d] += aux[d];
        }
        store_row(h, yp + r * D, D);
        mp[r] = mu;
        rp[r] = rs;
      }
    });
  });
  return {y, mean, rstd};
}

at::Tensor gather_norm_modulate_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& idx, const at::Tensor& mean,
                                         const at::Tensor& rstd,
                                         const c10::optional<at::Tensor>& scale,
                                         const c10::optional<at::Tensor>& weight) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t T = idx.numel();
  check_indices(idx, B * N, "diffcr::gather_norm_modulate_backward");
  at::Tensor grad_rows = at::empty({T, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_norm_modulate_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* sc = opt_ptr<scalar_t>(scale);
    const scalar_t* wt = opt_ptr<scalar_t>(weight);
    const A* mp = mean.data_ptr<A>();
    const A* rp = rstd.data_ptr<A>();
    scalar_t* op = grad_rows.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<A> xh(D), g(D), aux(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t src = ip[r];
        const int64_t b = src / N;
        const A mu = mp[r], rs = rp[r];
        load_row(xp + src * D, xh.data(), D);
        for (int64_t d = 0; d < D; ++d) xh[d] = (xh[d] - mu) * rs;
        load_row(gp + r * D, g.data(), D);
        if (sc) {
          load_row(sc + b * D, aux.data(), D);
          for (int64_t d = 0; d < D; ++d) g[d] *= A(1) + aux[d];
        }
        if (wt) {
          load_row(wt, aux.data(), D);
          for (int64_t d = 0; d < D; ++d) g[d] *= aux[d];
        }
        const A m1 = row_sum(g.data(), D) / static_cast<A>(D);
        const A m2 = row_dot(g.data(), xh.data(), D) / static_cast<A>(D);
        for (int64_t d = 0; d < D; ++d) g[d] = rs * (g[d] - m1 - xh[d] * m2);
        store_row(g.data(), op + r * D, D);
      }
    });
  });
  return grad_rows;
}

}  // namespace cpu
}  // namespace diffcr
