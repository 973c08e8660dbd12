// Helpers shared by the CPU kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <vector>

namespace diffcr {
namespace cpu {

template <typename T>
inline const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

// Load n elements of a row into an acc buffer (vectorised conversion for reduced types).
template <typename T, typename A>
inline void load_row(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename T, typename A>
inline void store_row(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename A>
inline A row_sum(const A* p, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  return at::vec::reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, p, n);
}

template <typename A>
inline A row_dot(const A* p, const A* q, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  return at::vec::map2_reduce_all<A>([](Vec a, Vec b) { return a * b; },
                                     [](Vec a, Vec b) { return a + b; }, p, q, n);
}

template <typename A>
inline A row_centered_sq(const A* p, A mu, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  const Vec m(mu);
  return at::vec::map_reduce_all<A>([m](Vec a) { return (a - m) * (a - m); },
                                    [](Vec a, Vec b) { return a + b; }, p, n);
}

// Index range check done before any output is written.
inline void check_indices(const at::Tensor& idx, int64_t num_rows, const char* op) {
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  int64_t bad = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] < 0 || p[i] >= num_rows) {
      bad = i;
      break;
    }
  }
  TORCH_CHECK_VALUE(bad < 0, op, ": idx[", bad, "] = ", (bad < 0 ? 0 : p[bad]),
              " is out of range for x with ", num_rows, " rows (B*N)");
}

}  // namespace cpu
}  // namespace diffcr
