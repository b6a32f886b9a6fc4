// Philox4x32-10 and the Box-Muller transform, written once for the host and the device.
//
// This is the C++/CUDA twin of digfast/ops/philox.py, which is the specification:
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (element / 4, step, sample id, stream)
// and the four output words (w0, w1, w2, w3) give the normals of elements 4q .. 4q+3 by
// Box-Muller on the pairs (w0, w1) and (w2, w3), in float32:
//   r = sqrt(-2 log((float(w0) + 1) * 2^-32)),  theta = 2 pi float(w1) * 2^-32
//   z0 = r cos(theta), z1 = r sin(theta)
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define DIGFAST_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define DIGFAST_HD inline __attribute__((always_inline))  // inlined into each CPU clone
#else
#define DIGFAST_HD inline
#endif

namespace digfast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// Streams keep independent uses of one seed apart (same values as philox.py).
constexpr uint32_t kStreamStep = 0;
constexpr uint32_t kStreamPrior = 1;
constexpr uint32_t kStreamProbe = 2;

struct Philox4 {
  uint32_t w[4];
};

DIGFAST_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11); the key is bumped between rounds.
DIGFAST_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                 uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// float32(2 pi) and 2^-32, as in philox.py.
constexpr float kTwoPiF32 = 6.2831855f;
constexpr float kTwoPowM32 = 2.3283064365386963e-10f;

// Box-Muller on one pair of words. Each operation is a separate float32 rounding, in the
// order of the reference (build with FMA contraction off so the compiler keeps it).
DIGFAST_HD void box_muller(uint32_t w_r, uint32_t w_t, float& z0, float& z1) {
  const float u = (static_cast<float>(w_r) + 1.0f) * kTwoPowM32;
  const float radius = sqrtf(-2.0f * logf(u));
  const float theta = (static_cast<float>(w_t) * kTwoPowM32) * kTwoPiF32;
#if defined(__CUDA_ARCH__)
  float s, c;
  sincosf(theta, &s, &c);
#else
  const float s = sinf(theta), c = cosf(theta);
#endif
  z0 = radius * c;
  z1 = radius * s;
}

// The four standard normals of elements 4*block .. 4*block+3 of one (seed, sample, step,
// stream) row.
DIGFAST_HD void philox_normal4(uint64_t seed, uint32_t sample, uint32_t step, uint32_t stream,
                               uint32_t block, float z[4]) {
  const Philox4 p = philox4x32_10(block, step, sample, stream, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  box_muller(p.w[0], p.w[1], z[0], z[1]);
  box_muller(p.w[2], p.w[3], z[2], z[3]);
}

}  // namespace digfast
