// The fused sampler step: out = P_mask(a * x + b * direction + c * z).
// Specification: digfast/ops/sampler_step.py (sampler_step_reference).
#pragma once

#include <cstdint>

namespace digfast {

struct SamplerStepParams {
  const float* x;            // (batch, atoms, dim), contiguous
  const float* direction;    // (batch, atoms, dim), contiguous
  float* out;                // (batch, atoms, dim), contiguous; may alias x or direction
  const int64_t* sample_ids; // (batch,), each in [0, 2^32)
  const uint8_t* mask;       // (batch, atoms) bool as bytes, or nullptr: every atom real
  int64_t batch;
  int64_t atoms;
  int64_t dim;               // 2 or 3
  float a, b, c;             // c == 0: no noise is drawn
  uint64_t seed;
  uint32_t step;
  uint32_t stream;
};

constexpr int kMaxDim = 3;

// CPU: multi-threaded over the batch, at most `max_threads` threads.
void sampler_step_cpu(const SamplerStepParams& p, int max_threads);

#ifdef DIGFAST_WITH_CUDA
// CUDA: launched on `stream` (a cudaStream_t passed as an integer) on `device`;
// throws std::runtime_error if the launch fails.
void sampler_step_cuda(const SamplerStepParams& p, int device, uintptr_t stream);
#endif

}  // namespace digfast
