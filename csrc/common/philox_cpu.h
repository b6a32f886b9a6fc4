// Philox normals for the CPU, a chunk of Philox blocks at a time so that the compiler
// vectorizes both the Philox rounds and the Box-Muller transform across blocks.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/fast_math_cpu.h"
#include "common/parallel.h"
#include "common/philox.h"

namespace digfast {

constexpr int kPhiloxChunk = 16;  // Philox blocks per chunk (64 normals)

// z[0 .. 4 * blocks) = the normals of elements 4*q0 .. 4*(q0 + blocks) - 1 of the row
// (seed, sample, step, stream), with the layout of digfast/ops/philox.py; blocks <= kPhiloxChunk.
DIGFAST_CPU_INLINE void philox_normal_chunk(uint64_t seed, uint32_t sample, uint32_t step, uint32_t stream,
                                uint32_t q0, int blocks, float* z) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  constexpr int kMaxPairs = 2 * kPhiloxChunk;
  const int pairs = 2 * blocks;
  // Pair 2i is (w0, w1) of block i, pair 2i+1 is (w2, w3): the radius word, the angle word.
  uint32_t w_r[kMaxPairs], w_t[kMaxPairs];
  for (int i = 0; i < blocks; ++i) {
    const Philox4 p = philox4x32_10(q0 + static_cast<uint32_t>(i), step, sample, stream, k0, k1);
    w_r[2 * i] = p.w[0];
    w_t[2 * i] = p.w[1];
    w_r[2 * i + 1] = p.w[2];
    w_t[2 * i + 1] = p.w[3];
  }
  float zc[kMaxPairs], zs[kMaxPairs];
  for (int j = 0; j < pairs; ++j) {
    // the same float32 operations as box_muller() in philox.h, with vectorizable log/sincos
    const float u = (static_cast<float>(w_r[j]) + 1.0f) * kTwoPowM32;
    const float radius = std::sqrt(-2.0f * fast::log_positive(u));
    const float theta = (static_cast<float>(w_t[j]) * kTwoPowM32) * kTwoPiF32;
    float s, c;
    fast::sincos_small(theta, s, c);
    zc[j] = radius * c;
    zs[j] = radius * s;
  }
  for (int j = 0; j < pairs; ++j) {
    z[2 * j] = zc[j];
    z[2 * j + 1] = zs[j];
  }
}

}  // namespace digfast
