// CPU implementation of the fused sampler step, one sample at a time, threads over the batch.
#include <algorithm>

#include "common/parallel.h"
#include "common/philox_cpu.h"
#include "sampler_step/sampler_step.h"

namespace digfast {
namespace {

// Work units per element (~1 ns each on one core) and the least work that pays for
// starting and joining a thread: ~250 us, measured on a 2-vCPU VM where waking a thread
// costs tens of microseconds and 2 threads gave only ~1.4x on compute-bound loops.
constexpr int64_t kCostWithNoise = 4;
constexpr int64_t kCostNoNoise = 1;
constexpr int64_t kMinWorkPerThread = 1 << 18;

template <int kDim, bool kNoise, bool kMask>
DIGFAST_CPU_INLINE void step_sample(const SamplerStepParams& p, int64_t s) {
  const int64_t atoms = p.atoms, row = atoms * kDim;
  const float* x = p.x + s * row;
  const float* d = p.direction + s * row;
  float* out = p.out + s * row;
  const uint8_t* mask = kMask ? p.mask + s * atoms : nullptr;
  const float a = p.a, b = p.b, c = p.c;

  // y = a*x + b*d (+ c*z), in chunks of Philox blocks; the same float32 roundings as the
  // reference (built with -ffp-contract=off).
  constexpr int64_t kChunkElements = 4 * kPhiloxChunk;
  float z[kChunkElements];
  const uint32_t sample = static_cast<uint32_t>(p.sample_ids[s]);
  for (int64_t e0 = 0; e0 < row; e0 += kChunkElements) {
    const int64_t n = std::min(kChunkElements, row - e0);
    const float* xc = x + e0;
    const float* dc = d + e0;
    float* oc = out + e0;
    if (kNoise) {
      philox_normal_chunk(p.seed, sample, p.step, p.stream, static_cast<uint32_t>(e0 / 4),
                          static_cast<int>((n + 3) / 4), z);
      for (int64_t j = 0; j < n; ++j) oc[j] = (a * xc[j] + b * dc[j]) + c * z[j];
    } else {
      for (int64_t j = 0; j < n; ++j) oc[j] = a * xc[j] + b * dc[j];
    }
  }

  // Centre of mass of the real atoms (summed in double), subtracted; padded atoms zeroed.
  double sum[kDim] = {};
  int64_t count = kMask ? 0 : atoms;
  for (int64_t i = 0; i < atoms; ++i) {
    if (kMask && !mask[i]) continue;
    for (int k = 0; k < kDim; ++k) sum[k] += out[i * kDim + k];
    if (kMask) ++count;
  }
  const double denom = static_cast<double>(std::max<int64_t>(count, 1));
  float com[kDim];
  for (int k = 0; k < kDim; ++k) com[k] = static_cast<float>(sum[k] / denom);
  for (int64_t i = 0; i < atoms; ++i) {
    const float keep = (!kMask || mask[i]) ? 1.0f : 0.0f;
    for (int k = 0; k < kDim; ++k) {
      const float v = out[i * kDim + k] - com[k];
      out[i * kDim + k] = kMask ? (keep != 0.0f ? v : 0.0f) : v;
    }
  }
}

template <int kDim, bool kNoise, bool kMask>
DIGFAST_CPU_CLONES void step_range(const SamplerStepParams& p, int64_t begin, int64_t end) {
  for (int64_t s = begin; s < end; ++s) step_sample<kDim, kNoise, kMask>(p, s);
}

using RangeFn = void (*)(const SamplerStepParams&, int64_t, int64_t);

template <int kDim>
RangeFn pick(bool noise, bool masked) {
  if (noise) return masked ? step_range<kDim, true, true> : step_range<kDim, true, false>;
  return masked ? step_range<kDim, false, true> : step_range<kDim, false, false>;
}

}  // namespace

void sampler_step_cpu(const SamplerStepParams& p, int max_threads) {
  const bool noise = p.c != 0.0f, masked = p.mask != nullptr;
  const RangeFn fn = p.dim == 2 ? pick<2>(noise, masked) : pick<3>(noise, masked);
  const int64_t row = p.atoms * p.dim;
  const int threads = threads_for(p.batch, row * (noise ? kCostWithNoise : kCostNoNoise),
                                  max_threads, kMinWorkPerThread);
  parallel_for(p.batch, threads, [&p, fn](int64_t begin, int64_t end) { fn(p, begin, end); });
}

}  // namespace digfast
