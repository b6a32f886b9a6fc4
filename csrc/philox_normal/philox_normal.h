// Standard normals keyed by (seed, sample id, step, stream, element): the C++ twin of
// digfast.ops.philox.philox_normal, for the CPU.
#pragma once

#include <cstdint>

namespace digfast {

struct PhiloxNormalParams {
  float* out;                 // (batch, numel), contiguous
  const int64_t* sample_ids;  // (batch,), each in [0, 2^32)
  int64_t batch;
  int64_t numel;
  uint64_t seed;
  uint32_t step;
  uint32_t stream;
};

void philox_normal_cpu(const PhiloxNormalParams& p, int max_threads);

}  // namespace digfast
