// Argument checks shared by the CPU and CUDA registrations. Every check names the argument and
// what was expected, and runs before any output memory is written.
#pragma once
#include <ATen/ATen.h>

namespace diffcr {

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_data(const at::Tensor& t, const char* op, const char* name,
                       const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", ref.device());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), ", expected ", ref.scalar_type(), " (the dtype of x)");
}

inline void check_shape(const at::Tensor& t, const char* op, const char* name,
                        at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " has shape ", t.sizes(), ", expected ",
              expected);
}

inline void check_opt(const c10::optional<at::Tensor>& t, const char* op, const char* name,
                      const at::Tensor& ref, at::IntArrayRef expected) {
  if (t.has_value() && t->defined()) {
    check_data(*t, op, name, ref);
    check_shape(*t, op, name, expected);
  }
}

inline void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be [B, N, D], got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", t);
}

inline void check_idx(const at::Tensor& idx, const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(idx.dim() == 1, op, ": idx must be 1-D [T], got shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong, op, ": idx must be int64, got ",
              idx.scalar_type());
  TORCH_CHECK_VALUE(idx.device() == x.device(), op, ": idx is on ", idx.device(), " but x is on ",
              x.device());
}

inline void check_acc(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name,
                      int64_t n) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.scalar_type() == acc_type_of(x.scalar_type()), op, ": ", name, " has dtype ",
              t.scalar_type(), ", expected ", acc_type_of(x.scalar_type()),
              " (float64 for float64 data, float32 otherwise)");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name, " has shape ", t.sizes(),
              ", expected [", n, "]");
}

inline void check_cu_seqlens(const at::Tensor& cu, const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, op,
              ": cu_seqlens must be 1-D [S+1] with S >= 0, got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ",
              cu.scalar_type());
  TORCH_CHECK_VALUE(cu.device() == x.device(), op, ": cu_seqlens is on ", cu.device(),
              " but x is on ", x.device());
}

// Host-side content check of cu_seqlens (only where it is free: CPU tensors). Reads a
// contiguous copy: a strided or stride-0 (expanded) cu_seqlens must be checked for the values
// the kernel will use, which are those of cu.contiguous(), never its raw memory.
inline void check_cu_seqlens_values(const at::Tensor& cu_in, int64_t T, int64_t max_seqlen,
                                    const char* op) {
  const at::Tensor cu = cu_in.contiguous();
  const int32_t* p = cu.data_ptr<int32_t>();
  const int64_t S = cu.numel() - 1;
  TORCH_CHECK_VALUE(p[0] == 0, op, ": cu_seqlens[0] must be 0, got ", p[0]);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = static_cast<int64_t>(p[s + 1]) - p[s];
    TORCH_CHECK_VALUE(len >= 0, op, ": cu_seqlens must be non-decreasing, but cu_seqlens[", s + 1,
                "] = ", p[s + 1], " < cu_seqlens[", s, "] = ", p[s]);
    TORCH_CHECK_VALUE(max_seqlen < 0 || len <= max_seqlen, op, ": segment ", s, " has ", len,
                " rows but max_seqlen = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(p[S] == T, op, ": cu_seqlens[-1] = ", p[S],
                    " must equal the number of rows T = ", T);
}

// Forward scatter-back only (its slots run concurrently): a sample-major layout (every
// Selection) has S = B * P, and a P that contradicts the shapes would make the kernels add two
// segments of one sample to the same rows at once.
inline void check_segs_layout(const char* op, int64_t B, int64_t S, int64_t P) {
  TORCH_CHECK_VALUE(B == 0 || S == 0 || S % B != 0 || S / B == P, op, ": segs_per_sample = ", P,
              " does not match the layout: ", S, " segments over B = ", B, " samples is ",
              (B ? S / B : 0), " per sample (sample-major)");
}

// The in-place scatter-back writes into x: it must be one dense block of memory that no input
// read by the kernel shares (the kernel reads attn_update/mlp_out/gate/idx while it updates x).
inline void check_inplace_target(
    const at::Tensor& x, const char* op,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> reads) {
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous to be updated in place "
              "(use scatter_back, which returns a new tensor)");
  for (const auto& r : reads) {
    if (r.second == nullptr || !r.second->defined()) continue;
    TORCH_CHECK_VALUE(!(r.second->is_alias_of(x)), op, ": ", r.first,
                " shares memory with x, which is updated in place");
  }
}

// The token-cache pass (apply_token_cache_) writes out and cache in place and reads slot,
// x_rows and miss: shapes, dtypes, devices, contiguity and aliasing are checked before either
// is written (the slot values are checked by the CPU kernel on the host, and on the GPU by the
// device checks of a DIFFCR_DEBUG build).
inline void check_token_cache_args(const char* op, const at::Tensor& out, const at::Tensor& cache,
                                   const at::Tensor& slot, const at::Tensor& x_rows,
                                   const c10::optional<at::Tensor>& miss) {
  check_x(out, op);
  const int64_t R = out.size(0) * out.size(1), D = out.size(2);
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous (it is updated in place)");
  const auto ct = cache.scalar_type();
  TORCH_CHECK_VALUE(ct == at::kFloat || ct == at::kDouble || ct == at::kHalf || ct == at::kBFloat16,
                    op, ": cache must be float32, float64, float16 or bfloat16, got ", ct);
  TORCH_CHECK_VALUE(cache.device() == out.device(), op, ": cache is on ", cache.device(),
                    " but out is on ", out.device());
  check_shape(cache, op, "cache", {R, D});
  TORCH_CHECK_VALUE(cache.is_contiguous(), op,
                    ": cache must be contiguous (it is updated in place)");
  TORCH_CHECK_VALUE(slot.scalar_type() == at::kInt, op, ": slot must be int32, got ",
                    slot.scalar_type());
  TORCH_CHECK_VALUE(slot.device() == out.device(), op, ": slot is on ", slot.device(),
                    " but out is on ", out.device());
  check_shape(slot, op, "slot", {R});
  TORCH_CHECK_VALUE(x_rows.dim() == 2, op, ": x_rows must be [T, D], got shape ", x_rows.sizes());
  check_data(x_rows, op, "x_rows", out);
  check_shape(x_rows, op, "x_rows", {x_rows.size(0), D});
  if (miss.has_value() && miss->defined()) check_acc(*miss, out, op, "miss", R);
  if (out.numel()) {
    TORCH_CHECK_VALUE(!cache.is_alias_of(out), op,
                      ": cache shares memory with out; both are updated in place");
  }
  for (const auto& r : {std::make_pair("x_rows", &x_rows), std::make_pair("slot", &slot)}) {
    TORCH_CHECK_VALUE(!r.second->numel() || !(r.second->is_alias_of(out) ||
                                              r.second->is_alias_of(cache)),
                      op, ": ", r.first, " shares memory with out or cache, which are updated in "
                      "place");
  }
  if (miss.has_value() && miss->defined() && miss->numel()) {
    TORCH_CHECK_VALUE(!(miss->is_alias_of(out) || miss->is_alias_of(cache)), op,
                      ": miss shares memory with out or cache, which are updated in place");
  }
}

}  // namespace diffcr
