// embed_layer_norm backward on CPU. Forward, per token t: h = (word[ids[t]] or inputs_embeds[t])
// + type[token_type_ids[t] or 0] + pos[position_ids[t]], y = (h - mean) rstd weight + bias. Given dy:
//   xhat = (h - mean) rstd, g = dy weight,
//   dh = rstd (g - mean(g) - xhat mean(g xhat))                      (per token)
//   dweight = sum_t dy xhat, dbias = sum_t dy                         (column sums, fp32)
//   dword[ids[t]] += dh, dtype[tt[t]] += dh, dpos[pos[t]] += dh      (scatter-add into the tables)
//   dinputs_embeds[t] = dh                                            (when inputs_embeds is given)
//
// Pass 1, tokens in parallel: recompute h from the ids (ids range-checked as read) and its
// statistics in fp32 exactly as the forward does (shifted two-pass, layer_norm_row.h), write dh to
// an fp32 (N, H) scratch, and accumulate dweight/dbias per fixed block of 32 tokens into fp32
// partial rows, summed afterwards (the blocks depend only on N, not on the thread count).
// Pass 2, the scatter-add, parallel over blocks of hidden columns: each thread owns whole columns
// of all three tables and adds the tokens' dh into them in token order. No atomics, no races, and
// every table element is summed in the same order whatever the number of threads: the result is
// deterministic (bitwise reproducible). Tables are accumulated in fp32 and rounded once to their
// dtype (a no-op for fp32).
// Bytes: read dy and the gathered rows (4 N H), write dh once (N H fp32), then read it once and
// update the touched table rows; the dense (V, H) word gradient is zeroed first (as autograd's
// embedding backward does). FLOPs ~ 15 N H.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <vector>

#include "../contracts.h"
#include "../ops.h"
#include "layer_norm_row.h"
#include "vec.h"

namespace bert_fast {

namespace {
constexpr int64_t kBlockTokens = 32;
constexpr int64_t kBlockCols = 64;
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embed_layer_norm_bwd_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& input_ids, const at::Tensor& position_ids,
    const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb, const at::Tensor& pos_emb,
    const at::Tensor& type_emb, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const std::optional<at::Tensor>& inputs_embeds) {
  constexpr const char* op = "embed_layer_norm_bwd";
  const int64_t H = check_embed_layer_norm_bwd(grad, input_ids, position_ids, token_type_ids, word_emb, pos_emb,
                                               type_emb, weight, bias, inputs_embeds);
  auto i64 = [](const at::Tensor& t) { return t.to(at::kLong).contiguous(); };
  const at::Tensor pos = i64(position_ids);
  const at::Tensor ids = (!inputs_embeds && input_ids) ? i64(*input_ids) : at::Tensor();
  const at::Tensor tt = token_type_ids ? i64(*token_type_ids) : at::Tensor();
  const at::Tensor emb = inputs_embeds ? inputs_embeds->reshape({-1, H}) : at::Tensor();
  const at::Tensor g2 = grad.reshape({-1, H});
  const int64_t N = pos.numel();
  const auto f32 = word_emb.options().dtype(at::kFloat);
  // fp32 accumulators: the word table only when ids are used (else a (0, H) placeholder)
  at::Tensor dword = at::zeros({emb.defined() ? 0 : word_emb.size(0), H}, f32);
  at::Tensor dpos = at::zeros({pos_emb.size(0), H}, f32), dtype_ = at::zeros({type_emb.size(0), H}, f32);
  at::Tensor dh = at::empty({N, H}, f32);
  const int64_t blocks = std::max<int64_t>((N + kBlockTokens - 1) / kBlockTokens, 1);
  at::Tensor partial = at::zeros({blocks, 2, H}, f32);  // [dweight | dbias] per block of tokens
  const at::Tensor w = param_f32(weight);
  const float feps = static_cast<float>(eps);
  const int64_t* idp = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
  const int64_t* ttp = tt.defined() ? tt.const_data_ptr<int64_t>() : nullptr;
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const int64_t Vw = word_emb.size(0), Vp = pos_emb.size(0), Vt = type_emb.size(0);
  float* dhp = dh.data_ptr<float>();
  if (N > 0) {
    BF_DISPATCH_FLOAT_TYPES(word_emb.scalar_type(), op, [&] {
      const scalar_t* we = word_emb.const_data_ptr<scalar_t>();
      const scalar_t* pe = pos_emb.const_data_ptr<scalar_t>();
      const scalar_t* te = type_emb.const_data_ptr<scalar_t>();
      const int64_t ldw = word_emb.stride(0), ldp = pos_emb.stride(0), ldt = type_emb.stride(0);
      const scalar_t* ep = emb.defined() ? emb.const_data_ptr<scalar_t>() : nullptr;
      const int64_t lde = emb.defined() ? emb.stride(0) : 0;
      const scalar_t* gp = g2.const_data_ptr<scalar_t>();
      const int64_t ldg = g2.stride(0);
      const float* wp = w.const_data_ptr<float>();
      float* part = partial.data_ptr<float>();
      auto row = [&](const char* label, int64_t id, int64_t rows) {
        check_in_range(op, label, id, rows);
        return id;
      };
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> hbuf(H);
        for (int64_t blk = b0; blk < b1; ++blk) {
          float* dw = part + blk * 2 * H;
          float* db = dw + H;
          for (int64_t t = blk * kBlockTokens; t < std::min(N, (blk + 1) * kBlockTokens); ++t) {
            const scalar_t* a = ep ? ep + t * lde : we + row("input_ids value", idp[t], Vw) * ldw;
            const scalar_t* trow = te + (ttp ? row("token_type_ids value", ttp[t], Vt) : 0) * ldt;
            const scalar_t* prow = pe + row("position_ids value", pp[t], Vp) * ldp;
            // h = (word + type) + position in fp32, shifted by its first element as the forward
            const float shift = (static_cast<float>(a[0]) + static_cast<float>(trow[0])) + static_cast<float>(prow[0]);
            const Vec vshift(shift);
            Vec acc(0.f);
            for (int64_t j = 0; j < H; j += kVec) {
              const int64_t n = std::min(kVec, H - j);
              const Vec h = (load_f(a + j, n) + load_f(trow + j, n)) + load_f(prow + j, n);
              store_f(hbuf.data() + j, h, n);
              Vec hs = h - vshift;
              if (n < kVec) hs = Vec::set(Vec(0.f), hs, n);
              acc = acc + hs;
            }
            const Vec vmean(hsum(acc) / static_cast<float>(H));
            Vec acc2(0.f);
            for (int64_t j = 0; j < H; j += kVec) {
              const int64_t n = std::min(kVec, H - j);
              Vec dv = (load_f(hbuf.data() + j, n) - vshift) - vmean;
              if (n < kVec) dv = Vec::set(Vec(0.f), dv, n);
              acc2 = at::vec::fmadd(dv, dv, acc2);
            }
            const Vec vrstd(1.f / std::sqrt(hsum(acc2) / static_cast<float>(H) + feps));  // eps as given
            // xhat into hbuf; means of g = dy w and g xhat; column sums of dy xhat and dy
            Vec mg, mgx;
            ln_bwd_row_sums(
                H, [&](int64_t j, int64_t n) { return ((load_f(hbuf.data() + j, n) - vshift) - vmean) * vrstd; },
                [&](int64_t j, int64_t n) { return load_f(gp + t * ldg + j, n); },  // tail lanes load 0
                wp, hbuf.data(), dw, db, mg, mgx);
            float* out = dhp + t * H;
            for (int64_t j = 0; j < H; j += kVec) {
              const int64_t n = std::min(kVec, H - j);
              const Vec g = load_f(gp + t * ldg + j, n) * load_f(wp + j, n);
              store_f(out + j, vrstd * (g - mg - load_f(hbuf.data() + j, n) * mgx), n);
            }
          }
        }
      });
    });
    // Pass 2: scatter-add, each thread owning blocks of columns of every table, tokens in order.
    float* dwp = dword.data_ptr<float>();
    float* dpp = dpos.data_ptr<float>();
    float* dtp = dtype_.data_ptr<float>();
    const int64_t col_blocks = (H + kBlockCols - 1) / kBlockCols;
    at::parallel_for(0, col_blocks, 1, [&](int64_t c0, int64_t c1) {
      const int64_t j0 = c0 * kBlockCols, j1 = std::min(H, c1 * kBlockCols);
      for (int64_t t = 0; t < N; ++t) {
        const float* src = dhp + t * H;
        float* dst_w = idp ? dwp + idp[t] * H : nullptr;
        float* dst_t = dtp + (ttp ? ttp[t] : 0) * H;
        float* dst_p = dpp + pp[t] * H;
        for (int64_t j = j0; j < j1; j += kVec) {
          const int64_t n = std::min(kVec, j1 - j);
          const Vec d = load_f(src + j, n);
          if (dst_w) store_f(dst_w + j, load_f(dst_w + j, n) + d, n);
          store_f(dst_t + j, load_f(dst_t + j, n) + d, n);
          store_f(dst_p + j, load_f(dst_p + j, n) + d, n);
        }
      }
    });
  }
  const at::ScalarType dt = word_emb.scalar_type();
  const at::Tensor sums = partial.sum(0);  // (2, H): the column reduction over the blocks
  at::Tensor dembeds = emb.defined() ? dh.to(dt).view(inputs_embeds->sizes()) : at::empty({0, H}, word_emb.options());
  // separate tensors (the schema's outputs must not alias)
  return {dword.to(dt), dpos.to(dt), dtype_.to(dt), sums[0].clone(), sums[1].clone(), dembeds};
}

}  // namespace bert_fast
