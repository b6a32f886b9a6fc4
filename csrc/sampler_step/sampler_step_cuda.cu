// CUDA implementation of the fused sampler step: one thread block per sample, each thread
// owning whole Philox blocks (4 consecutive elements) in a strided loop over the sample, a
// block-level reduction for the centre of mass, then a second pass over the same elements.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/philox.h"
#include "sampler_step/sampler_step.h"

namespace digfast {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kWarp = 32;

// Launch heuristic (the one place it lives): enough threads for one Philox block each,
// a whole number of warps, at most kMaxThreads.
int threads_per_sample(int64_t philox_blocks) {
  int t = kWarp;
  while (t < kMaxThreads && t < philox_blocks) t *= 2;
  return t;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int kDim, bool kNoise, bool kMask>
__global__ void __launch_bounds__(kMaxThreads)
sampler_step_kernel(const SamplerStepParams p) {
  __shared__ float partial[kMaxThreads / kWarp][kMaxDim + 1];
  __shared__ float com[kMaxDim];

  const int64_t s = blockIdx.x;
  const int64_t row = p.atoms * kDim;
  const int64_t blocks = (row + 3) / 4;
  const float* x = p.x + s * row;
  const float* d = p.direction + s * row;
  float* out = p.out + s * row;
  const uint8_t* mask = kMask ? p.mask + s * p.atoms : nullptr;
  const uint32_t sample = static_cast<uint32_t>(p.sample_ids[s]);

  // Pass 1: update + noise, store, and sum the real atoms per coordinate.
  float sum0 = 0.0f, sum1 = 0.0f, sum2 = 0.0f, count = 0.0f;
  for (int64_t q = threadIdx.x; q < blocks; q += blockDim.x) {
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (kNoise) philox_normal4(p.seed, sample, p.step, p.stream, static_cast<uint32_t>(q), z);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * q + j;
      if (e >= row) break;
      float y = __fadd_rn(__fmul_rn(p.a, x[e]), __fmul_rn(p.b, d[e]));
      if (kNoise) y = __fadd_rn(y, __fmul_rn(p.c, z[j]));
      out[e] = y;
      const int64_t atom = e / kDim;  // division by a constant
      const int k = static_cast<int>(e - atom * kDim);
      if (!kMask || mask[atom]) {
        sum0 += k == 0 ? y : 0.0f;
        sum1 += k == 1 ? y : 0.0f;
        if (kDim > 2) sum2 += k == 2 ? y : 0.0f;
        count += k == 0 ? 1.0f : 0.0f;
      }
    }
  }

  // Block reduction: warps by shuffles, then the first warp over the warps' partials.
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  sum0 = warp_sum(sum0);
  sum1 = warp_sum(sum1);
  sum2 = warp_sum(sum2);
  count = warp_sum(count);
  if (lane == 0) {
    partial[warp][0] = sum0;
    partial[warp][1] = sum1;
    partial[warp][2] = sum2;
    partial[warp][3] = count;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k <= kMaxDim; ++k) {
      float v = lane < warps ? partial[lane][k] : 0.0f;
      v = warp_sum(v);
      if (lane == 0) partial[0][k] = v;
    }
    __syncwarp();
    if (lane < kMaxDim) com[lane] = partial[0][lane] / fmaxf(partial[0][kMaxDim], 1.0f);
  }
  __syncthreads();  // also makes pass 1's stores visible to the whole block

  // Pass 2: subtract the centre of mass, zero the padded atoms (same elements as pass 1).
  for (int64_t q = threadIdx.x; q < blocks; q += blockDim.x) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * q + j;
      if (e >= row) break;
      const int64_t atom = e / kDim;  // division by a constant
      const int k = static_cast<int>(e - atom * kDim);
      out[e] = (kMask && !mask[atom]) ? 0.0f : out[e] - com[k];
    }
  }
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("digfast sampler_step (CUDA): ") + what + ": " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

template <int kDim>
void launch(const SamplerStepParams& p, int threads, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.batch)), block(threads);
  const bool noise = p.c != 0.0f, masked = p.mask != nullptr;
  if (noise && masked)
    sampler_step_kernel<kDim, true, true><<<grid, block, 0, stream>>>(p);
  else if (noise)
    sampler_step_kernel<kDim, true, false><<<grid, block, 0, stream>>>(p);
  else if (masked)
    sampler_step_kernel<kDim, false, true><<<grid, block, 0, stream>>>(p);
  else
    sampler_step_kernel<kDim, false, false><<<grid, block, 0, stream>>>(p);
}

// Makes `device` current for the launch and restores the caller's device afterwards.
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous), "cudaGetDevice");
    if (previous != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
  }
};

}  // namespace

void sampler_step_cuda(const SamplerStepParams& p, int device, uintptr_t stream_handle) {
  if (p.batch == 0) return;
  if (p.batch > 0x7fffffff)
    throw std::invalid_argument("digfast sampler_step (CUDA): batch " +
                                std::to_string(p.batch) + " exceeds the grid limit 2^31-1");
  DeviceGuard guard(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int threads = threads_per_sample((p.atoms * p.dim + 3) / 4);
  if (p.dim == 2)
    launch<2>(p, threads, stream);
  else if (p.dim == 3)
    launch<3>(p, threads, stream);
  else
    throw std::invalid_argument("digfast sampler_step (CUDA): dim must be 2 or 3, got " +
                                std::to_string(p.dim));
  check_cuda(cudaGetLastError(), "kernel launch");
}

}  // namespace digfast
