// CPU token-cache pass of a routed block (inference, in place): rows that missed the block
// receive their cached update, selected rows write their new update into the cache. One pass
// over the rows; every row is owned by one thread (no races, bitwise reproducible).
#include "cpu/common.h"
#include "cpu/cpu_kernels.h"

namespace diffcr {
namespace cpu {

void apply_token_cache(at::Tensor& out, at::Tensor& cache, const at::Tensor& slot,
                       const at::Tensor& x_rows, const c10::optional<at::Tensor>& miss) {
  const int64_t R = out.size(0) * out.size(1), D = out.size(2);
  const int64_t T = x_rows.size(0);
  const int32_t* sp = slot.data_ptr<int32_t>();
  int64_t bad = -1;
  for (int64_t r = 0; r < R; ++r) {
    if (sp[r] < -1 || sp[r] >= T) {
      bad = r;
      break;
    }
  }
  TORCH_CHECK_VALUE(bad < 0, "diffcr::apply_token_cache_: slot[", bad, "] = ",
                    (bad < 0 ? 0 : sp[bad]), " is out of range: -1 (skipped) or a row of x_rows, "
                    "which has ", T);
  if (R == 0 || D == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "token_cache", [&] {
    using T_out = scalar_t;
    using A = at::opmath_type<T_out>;
    T_out* op = out.data_ptr<T_out>();
    const T_out* xp = x_rows.data_ptr<T_out>();
    const A* mp = opt_ptr<A>(miss);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cache.scalar_type(), "token_cache_c",
                                    [&] {
      using T_c = scalar_t;
      T_c* cp = cache.data_ptr<T_c>();
      at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
        std::vector<A> o(D), c(D);
        std::vector<T_out> rounded(D);
        for (int64_t r = begin; r < end; ++r) {
          const int32_t t = sp[r];
          const A m = mp ? mp[r] : (t < 0 ? A(1) : A(0));
          T_out* orow = op + r * D;
          T_c* crow = cp + r * D;
          if (m != A(0)) {
            load_row(orow, o.data(), D);
            load_row(crow, c.data(), D);
            for (int64_t d = 0; d < D; ++d) o[d] += m * c[d];
            store_row(o.data(), orow, D);
          }
          if (t >= 0) {
            load_row(orow, o.data(), D);  // the rounded output
            load_row(xp + static_cast<int64_t>(t) * D, c.data(), D);
            for (int64_t d = 0; d < D; ++d) o[d] -= c[d];
            store_row(o.data(), crow, D);
          }
        }
      });
    });
  });
}

}  // namespace cpu
}  // namespace diffcr
