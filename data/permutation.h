// IndexPermutation: a keyed pseudo-random bijection of [0, n) computed one index at a time
// (a 6-round Feistel network on the next even power of two, cycle-walking back into range),
// so shuffling 10^9 windows needs no memory. The same (n, key) gives the same order on every
// machine and rank count: it is pure integer arithmetic, no std::distribution.
#pragma once

#include <cstdint>

namespace andy::data {

// splitmix64 finaliser: the mixing step used for keys and Feistel rounds.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

class IndexPermutation {
 public:
  IndexPermutation(uint64_t n, uint64_t key) : n_(n) {
    int bits = 2;
    while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
    if (bits % 2) ++bits;
    half_ = bits / 2;
    mask_ = (uint64_t{1} << half_) - 1;
    uint64_t k = mix64(key);
    for (auto& rk : keys_) {
      k = mix64(k + 0x632BE59BD9B4E019ULL);
      rk = k;
    }
  }
  uint64_t size() const { return n_; }
  // The index at position i of the permuted order (i < size()).
  uint64_t operator()(uint64_t i) const {
    uint64_t x = i;
    do {
      x = encrypt(x);
    } while (x >= n_);
    return x;
  }

 private:
  uint64_t encrypt(uint64_t x) const {
    uint64_t l = x >> half_, r = x & mask_;
    for (uint64_t k : keys_) {
      uint64_t t = l ^ (mix64(r ^ k) & mask_);
      l = r;
      r = t;
    }
    return (l << half_) | r;
  }
  uint64_t n_;
  int half_;
  uint64_t mask_;
  uint64_t keys_[6];
};

}  // namespace andy::data
