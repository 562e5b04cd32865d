// One LayerNorm row on CPU, shared by bias_residual_layer_norm and embed_layer_norm: the summed row
// goes into an fp32 scratch row (which stays in L1), the statistics are computed from it in fp32
// (mean, then the biased variance as the mean of squared deviations: two passes over the cached
// row, no cancellation), and the normalized row is written once in the output dtype. Parameters
// are read as fp32. The statistics are shifted by the row's first element: for a constant row the
// deviations are then exactly zero (an unshifted fp32 sum rounds, and with eps = 1e-12 the ~1e6
// rstd would amplify that rounding to O(0.1)); the Triton kernel and PyTorch's LayerNorm do the same.
#pragma once

#include <cmath>

#include "vec.h"

namespace bert_fast {

// y = LN((a (+ lb)) (* m) (+ b) (+ c)) * w + bias, in that order (HF's order of operations; m: the
// dropout multipliers of the row). a, b, c: rows of T (b, c nullable); lb, m: fp32 (nullable); buf:
// H floats of scratch.
template <typename T>
inline void ln_row(const T* a, const float* lb, const T* b, const T* c, const float* w, const float* bias, float eps,
                   T* y, int64_t H, float* buf, const float* m = nullptr) {
  // the shift: the summed first element, added in the same order as the vector code below (bit-equal
  // to buf[0])
  float first = static_cast<float>(a[0]);
  if (lb) first += lb[0];
  if (m) first *= m[0];
  if (b) first += static_cast<float>(b[0]);
  if (c) first += static_cast<float>(c[0]);
  const Vec vshift(first);
  // pass 1: the summed row into buf (fp32), and the sum of its shifted values
  Vec acc(0.f), acc_b(0.f);
  int64_t j = 0;
  for (; j + 2 * kVec <= H; j += 2 * kVec) {
    Vec h0, h1, t0, t1;
    load2_f(a + j, h0, h1);
    if (lb) {
      h0 = h0 + Vec::loadu(lb + j);
      h1 = h1 + Vec::loadu(lb + j + kVec);
    }
    if (m) {
      h0 = h0 * Vec::loadu(m + j);
      h1 = h1 * Vec::loadu(m + j + kVec);
    }
    if (b) {
      load2_f(b + j, t0, t1);
      h0 = h0 + t0;
      h1 = h1 + t1;
    }
    if (c) {
      load2_f(c + j, t0, t1);
      h0 = h0 + t0;
      h1 = h1 + t1;
    }
    store2_f(buf + j, h0, h1);
    acc = acc + (h0 - vshift);
    acc_b = acc_b + (h1 - vshift);
  }
  for (; j < H; j += kVec) {
    const int64_t n = std::min(kVec, H - j);
    Vec h = load_f(a + j, n);
    if (lb) h = h + load_f(lb + j, n);
    if (m) h = h * load_f(m + j, n);
    if (b) h = h + load_f(b + j, n);
    if (c) h = h + load_f(c + j, n);
    store_f(buf + j, h, n);
    Vec hs = h - vshift;
    if (n < kVec) hs = Vec::set(Vec(0.f), hs, n);  // tail lanes would hold -shift
    acc = acc + hs;
  }
  // mean = shift + vmean_s; every deviation below is (h - shift) - mean_s
  const float mean_s = hsum(acc + acc_b) / static_cast<float>(H);
  const Vec vmean(mean_s);
  // pass 2 (over the cached row): biased variance as the mean of squared deviations
  Vec acc2(0.f);
  for (j = 0; j < H; j += kVec) {
    const int64_t n = std::min(kVec, H - j);
    Vec d = (load_f(buf + j, n) - vshift) - vmean;
    if (n < kVec) d = Vec::set(Vec(0.f), d, n);  // tail lanes would hold -mean
    acc2 = at::vec::fmadd(d, d, acc2);
  }
  const float var = hsum(acc2) / static_cast<float>(H);
  const Vec vrstd(1.f / std::sqrt(var + eps));  // eps exactly as given, never clamped
  // pass 3: normalize, scale, shift, one rounding to T
  j = 0;
  for (; j + 2 * kVec <= H; j += 2 * kVec) {
    const Vec h0 = ((Vec::loadu(buf + j) - vshift) - vmean) * vrstd;
    const Vec h1 = ((Vec::loadu(buf + j + kVec) - vshift) - vmean) * vrstd;
    store2_f(y + j, at::vec::fmadd(h0, Vec::loadu(w + j), Vec::loadu(bias + j)),
             at::vec::fmadd(h1, Vec::loadu(w + j + kVec), Vec::loadu(bias + j + kVec)));
  }
  for (; j < H; j += kVec) {
    const int64_t n = std::min(kVec, H - j);
    const Vec hn = ((load_f(buf + j, n) - vshift) - vmean) * vrstd;
    store_f(y + j, at::vec::fmadd(hn, load_f(w + j, n), load_f(bias + j, n)), n);
  }
}

// LayerNorm backward, the middle pass over one row (shared by bias_residual_layer_norm_bwd and
// embed_layer_norm_bwd): for each kVec chunk at column j (n of them valid), xhat_at(j, n) and
// dy_at(j, n) give the normalized row and the output gradient (fp32, tail lanes 0); xhat is stored
// into xbuf, dy xhat and dy are added to the column sums dw and db, and the row means of
// g = dy w and of g xhat are returned in mg and mgx (dh = rstd (g - mg - xhat mgx) is the caller's
// last pass).
template <typename XhatAt, typename DyAt>
inline void ln_bwd_row_sums(int64_t H, XhatAt xhat_at, DyAt dy_at, const float* w, float* xbuf, float* dw,
                            float* db, Vec& mg, Vec& mgx) {
  Vec sg(0.f), sgx(0.f);
  for (int64_t j = 0; j < H; j += kVec) {
    const int64_t n = std::min(kVec, H - j);
    const Vec xhat = xhat_at(j, n);
    const Vec dy = dy_at(j, n);
    Vec g = dy * load_f(w + j, n);
    if (n < kVec) g = Vec::set(Vec(0.f), g, n);
    sg = sg + g;
    sgx = at::vec::fmadd(g, xhat, sgx);
    store_f(xbuf + j, xhat, n);
    store_f(dw + j, at::vec::fmadd(dy, xhat, load_f(dw + j, n)), n);
    store_f(db + j, load_f(db + j, n) + dy, n);
  }
  mg = Vec(hsum(sg) / static_cast<float>(H));
  mgx = Vec(hsum(sgx) / static_cast<float>(H));
}

}  // namespace bert_fast
