#include <algorithm>

#include "common/parallel.h"
#include "common/philox_cpu.h"
#include "philox_normal/philox_normal.h"

namespace digfast {
namespace {

DIGFAST_CPU_CLONES void fill_rows(const PhiloxNormalParams& p, int64_t begin, int64_t end) {
  constexpr int64_t kChunkElements = 4 * kPhiloxChunk;
  float z[kChunkElements];
  for (int64_t s = begin; s < end; ++s) {
    float* row = p.out + s * p.numel;
    const uint32_t sample = static_cast<uint32_t>(p.sample_ids[s]);
    for (int64_t e0 = 0; e0 < p.numel; e0 += kChunkElements) {
      const int64_t n = std::min(kChunkElements, p.numel - e0);
      philox_normal_chunk(p.seed, sample, p.step, p.stream, static_cast<uint32_t>(e0 / 4),
                          static_cast<int>((n + 3) / 4), z);
      for (int64_t j = 0; j < n; ++j) row[e0 + j] = z[j];
    }
  }
}

}  // namespace

void philox_normal_cpu(const PhiloxNormalParams& p, int max_threads) {
  // ~4 work units (ns) per normal; threads only for >= ~250 us of work each (see sampler_step)
  const int threads = threads_for(p.batch, 4 * p.numel, max_threads, int64_t{1} << 18);
  parallel_for(p.batch, threads, [&p](int64_t begin, int64_t end) { fill_rows(p, begin, end); });
}

}  // namespace digfast
