// Padding machinery on CPU: mask -> (indices, cu_seqlens, max_seqlen), and row gather/scatter
// between the padded (B*L, H) layout and the packed (N, H) one. Row copies are memcpy of whole
// rows (any dtype), parallel over rows; scatter writes every output row exactly once (a copy or
// zeros) instead of zero-filling first.
#include <ATen/Dispatch.h>

#include "../contracts.h"
#include "../ops.h"
#include "vec.h"

#include <algorithm>
#include <vector>

namespace bert_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> unpad_mask_cpu(const at::Tensor& mask_in) {
  constexpr const char* op = "unpad_mask";
  check_unpad_mask(mask_in);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t B = mask.size(0), L = mask.size(1);
  at::Tensor cu = at::empty({B + 1}, mask.options().dtype(at::kInt));
  at::Tensor max_len = at::empty({}, mask.options().dtype(at::kInt));
  std::vector<int64_t> lens(B, 0);
  // nonzero = token (NaN counts as nonzero, like `mask != 0`)
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(), "unpad_mask", [&] {
    const scalar_t* m = mask.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, L)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t n = 0;
        for (int64_t t = 0; t < L; ++t) n += (m[b * L + t] != scalar_t(0));
        lens[b] = n;
      }
    });
  });
  int32_t* cup = cu.data_ptr<int32_t>();
  int64_t total = 0, mx = 0;
  cup[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    total += lens[b];
    mx = std::max(mx, lens[b]);
    TORCH_CHECK(total <= INT32_MAX, op, ": ", total, " tokens exceed the int32 range of cu_seqlens");
    cup[b + 1] = static_cast<int32_t>(total);
  }
  max_len.fill_(mx);
  at::Tensor indices = at::empty({total}, mask.options().dtype(at::kLong));
  int64_t* ip = indices.data_ptr<int64_t>();
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(), "unpad_mask", [&] {
    const scalar_t* m = mask.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, L)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t o = cup[b];
        for (int64_t t = 0; t < L; ++t) {
          if (m[b * L + t] != scalar_t(0)) ip[o++] = b * L + t;
        }
      }
    });
  });
  return {indices, cu, max_len};
}

at::Tensor gather_rows_cpu(const at::Tensor& x_in, const at::Tensor& indices) {
  constexpr const char* op = "gather_rows";
  check_gather_rows(x_in, indices);
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const at::Tensor x = x_in.contiguous();  // (R, ...) rows copied as raw bytes
  const int64_t R = x.size(0), N = idx.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = N;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t row_bytes = R > 0 ? x.nbytes() / R : 0;
  if (N == 0 || row_bytes == 0) {
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      check_in_range(op, "index", ip[i], R);
    }
    return out;
  }
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / row_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = ip[i];
      check_in_range(op, "index", r, R);
      std::memcpy(dst + i * row_bytes, src + r * row_bytes, row_bytes);
    }
  });
  return out;
}

at::Tensor scatter_rows_cpu(const at::Tensor& x_in, const at::Tensor& indices, int64_t num_rows) {
  constexpr const char* op = "scatter_rows";
  check_scatter_rows(x_in, indices, num_rows);
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = num_rows;
  at::Tensor out = at::empty(shape, x.options());
  // source row of each output row, -1 = padding (zeros)
  std::vector<int64_t> src_of(num_rows, -1);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    check_in_range(op, "index", ip[i], num_rows);
    src_of[ip[i]] = i;
  }
  const int64_t row_bytes = num_rows > 0 ? out.nbytes() / num_rows : 0;
  if (num_rows == 0 || row_bytes == 0) return out;
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, num_rows, std::max<int64_t>(1, 65536 / row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = src_of[r];
      if (i >= 0) {
        std::memcpy(dst + r * row_bytes, src + i * row_bytes, row_bytes);
      } else {
        std::memset(dst + r * row_bytes, 0, row_bytes);
      }
    }
  });
  return out;
}

}  // namespace bert_fast
