// CPU implementation of the fused sampler step, one sample at a time, threads over the batch.
#include <algorithm>

#include "common/parallel.h"
#include "common/philox.h"
#include "sampler_step/sampler_step.h"

namespace digfast {
namespace {

// Work units per element (Philox + Box-Muller dominate when noise is drawn) and the
// least work that pays for starting a thread (~20 us of compute).
constexpr int64_t kCostWithNoise = 8;
constexpr int64_t kCostNoNoise = 1;
constexpr int64_t kMinWorkPerThread = 1 << 17;

template <bool kNoise>
void update_row(const SamplerStepParams& p, int64_t row, uint32_t sample, const float* x,
                const float* d, float* out) {
  const float a = p.a, b = p.b, c = p.c;
  if (!kNoise) {
    for (int64_t e = 0; e < row; ++e) out[e] = a * x[e] + b * d[e];
    return;
  }
  const int64_t full = row / 4;
  for (int64_t q = 0; q < full; ++q) {
    float z[4];
    philox_normal4(p.seed, sample, p.step, p.stream, static_cast<uint32_t>(q), z);
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * q + j;
      out[e] = (a * x[e] + b * d[e]) + c * z[j];
    }
  }
  if (full * 4 < row) {
    float z[4];
    philox_normal4(p.seed, sample, p.step, p.stream, static_cast<uint32_t>(full), z);
    for (int64_t e = full * 4; e < row; ++e) out[e] = (a * x[e] + b * d[e]) + c * z[e - full * 4];
  }
}

// Subtract the centre of mass of the real atoms, zero the padded ones.
void remove_com_row(const SamplerStepParams& p, const uint8_t* mask, float* out) {
  const int64_t n_atoms = p.atoms, dim = p.dim;
  double sum[kMaxDim] = {0.0, 0.0, 0.0};
  int64_t count = 0;
  for (int64_t n = 0; n < n_atoms; ++n) {
    if (mask && !mask[n]) continue;
    for (int64_t k = 0; k < dim; ++k) sum[k] += out[n * dim + k];
    ++count;
  }
  const double denom = static_cast<double>(std::max<int64_t>(count, 1));
  float com[kMaxDim];
  for (int64_t k = 0; k < dim; ++k) com[k] = static_cast<float>(sum[k] / denom);
  for (int64_t n = 0; n < n_atoms; ++n) {
    float* o = out + n * dim;
    if (mask && !mask[n]) {
      for (int64_t k = 0; k < dim; ++k) o[k] = 0.0f;
    } else {
      for (int64_t k = 0; k < dim; ++k) o[k] -= com[k];
    }
  }
}

}  // namespace

void sampler_step_cpu(const SamplerStepParams& p, int max_threads) {
  const int64_t row = p.atoms * p.dim;
  const bool noise = p.c != 0.0f;
  const int threads =
      threads_for(p.batch, row * (noise ? kCostWithNoise : kCostNoNoise), max_threads,
                  kMinWorkPerThread);
  parallel_for(p.batch, threads, [&p, row, noise](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const float* x = p.x + s * row;
      const float* d = p.direction + s * row;
      float* out = p.out + s * row;
      const uint32_t sample = static_cast<uint32_t>(p.sample_ids[s]);
      if (noise)
        update_row<true>(p, row, sample, x, d, out);
      else
        update_row<false>(p, row, sample, x, d, out);
      remove_com_row(p, p.mask ? p.mask + s * p.atoms : nullptr, out);
    }
  });
}

}  // namespace digfast
