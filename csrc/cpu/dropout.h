// Dropout masks for the fused CPU kernels: counter-based, so a backward pass regenerates exactly
// the forward's mask from (seed, stream, element index) and nothing is stored between the two.
//
// Generator: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2,
// 3", SC'11): key = the 64-bit seed (two 32-bit words), counter = (element index / 4 as two 32-bit
// words, stream as two 32-bit words); each counter gives four 32-bit words, word (index % 4)
// decides element `index`. An element is kept when its word is >= threshold = floor(p * 2^32), so
// P(keep) = 1 - threshold / 2^32 (p to within 2^-32); kept elements are scaled by 1 / (1 - p), as
// torch.nn.functional.dropout does. The plain-PyTorch oracle (kernels/_dropout.py) computes the
// same words with exact integer arithmetic: the reference and the kernels use the same mask.
//
// Streams: the caller gives independent parts of one call different streams (attention: one per
// sequence and head, the index running over the L x L probabilities row-major; the residual
// dropout: stream 0, the index running over the (rows, H) activation row-major).
//
// Cost: 10 rounds of two 32 x 32 -> 64-bit products per four elements; the loops below are written
// over blocks of 16 counters so the compiler vectorizes them (vpmuludq on AVX2).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace bert_fast {

struct Dropout {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // keep iff word >= threshold
  float scale = 1.f;       // 1 / (1 - p)
  bool active = false;

  Dropout() = default;
  Dropout(double p, int64_t seed_in) {
    active = p > 0.0;
    if (!active) return;
    seed = static_cast<uint64_t>(seed_in);
    threshold = static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
    scale = static_cast<float>(1.0 / (1.0 - p));
  }
};

namespace philox_detail {
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr int kBlock = 16;  // counters per vectorized batch

// words[4 * i + w] for counters (first + i, stream), i < kBlock
inline void philox_block(uint64_t seed, uint64_t stream, uint64_t first, uint32_t* words) {
  uint32_t c0[kBlock], c1[kBlock], c2[kBlock], c3[kBlock];
  for (int i = 0; i < kBlock; ++i) {
    const uint64_t c = first + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(c);
    c1[i] = static_cast<uint32_t>(c >> 32);
    c2[i] = static_cast<uint32_t>(stream);
    c3[i] = static_cast<uint32_t>(stream >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < kBlock; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * c0[i];
      const uint64_t p1 = static_cast<uint64_t>(kM1) * c2[i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
      c1[i] = static_cast<uint32_t>(p1);
      c3[i] = static_cast<uint32_t>(p0);
      c0[i] = n0;
      c2[i] = n2;
    }
    k0 += kW0;
    k1 += kW1;
  }
  for (int i = 0; i < kBlock; ++i) {
    words[4 * i] = c0[i];
    words[4 * i + 1] = c1[i];
    words[4 * i + 2] = c2[i];
    words[4 * i + 3] = c3[i];
  }
}
}  // namespace philox_detail

// mult[j] = keep(stream, first + j) ? scale : 0 for j < n.
inline void dropout_multipliers(const Dropout& d, uint64_t stream, uint64_t first, int64_t n, float* mult) {
  using namespace philox_detail;
  uint32_t words[4 * kBlock];
  int64_t j = 0;
  while (j < n) {
    const uint64_t e = first + static_cast<uint64_t>(j);
    const uint64_t block0 = e >> 2;
    philox_block(d.seed, stream, block0, words);
    // elements covered by these counters: [block0 * 4, block0 * 4 + 4 * kBlock)
    const int64_t off = static_cast<int64_t>(e - block0 * 4);
    const int64_t take = std::min<int64_t>(4 * kBlock - off, n - j);
    for (int64_t t = 0; t < take; ++t) mult[j + t] = words[off + t] >= d.threshold ? d.scale : 0.f;
    j += take;
  }
}

}  // namespace bert_fast
