// Branch-free float32 log and sincos for the Box-Muller ranges, written so that the
// compiler vectorizes loops over them (glibc's logf/sinf/cosf are scalar calls).
//
// Accuracy, measured against float64 over every 3rd-7th float of the Box-Muller ranges
// (u in [2^-32, 1], theta in [0, 2 pi]): log within 1.7 ulp; sin within 1.5 ulp; cos within
// 1.6 ulp where |cos| > 1e-5 and within 1e-7 absolute everywhere (near its zeros the
// Cody-Waite remainder's ~1e-14 error is many ulp of a tiny result, harmless for normals
// r*cos). tests/test_philox.py::test_compiled_normals_are_accurate checks the normals against
// float64. The polynomials are Taylor series, whose truncation error is far below float32
// rounding on the reduced ranges.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/philox.h"  // DIGFAST_HD

namespace digfast {
namespace fast {

DIGFAST_HD uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

DIGFAST_HD float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// log(u) for a normal float u > 0: u = 2^e m with m in [sqrt(1/2), sqrt(2)), then
// log(m) = 2 atanh(s) = 2 (s + s^3/3 + ... + s^11/11), s = (m - 1) / (m + 1), |s| <= 0.1716.
DIGFAST_HD float log_positive(float u) {
  // Integer selects only (no conditional float operations), so loops vectorize.
  const uint32_t bits = bits_of(u);
  const uint32_t mantissa = bits & 0x007FFFFFu;
  const uint32_t high = mantissa > 0x3504F3u ? 1u : 0u;  // 1.m > sqrt(2) (0x3FB504F3)
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + static_cast<int32_t>(high);
  const float m = float_of((mantissa | 0x3F800000u) - (high << 23));  // [sqrt(1/2), sqrt(2))
  const float s = (m - 1.0f) / (m + 1.0f);  // m - 1 is exact (Sterbenz)
  const float s2 = s * s;
  const float p =
      s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9 + s2 * (1.0f / 11)))));
  const float log_m = 2.0f * s + 2.0f * s * p;
  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi with 15 significant bits so that e * kLn2Hi is exact.
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  const float ef = static_cast<float>(e);
  return ef * kLn2Hi + (log_m + ef * kLn2Lo);
}

// sin and cos of theta in [0, 2 pi + 1]: theta = k pi/2 + r, |r| <= pi/4 (Cody-Waite with a
// three-part pi/2 whose first two parts have 12 significant bits, so k * part is exact).
DIGFAST_HD void sincos_small(float theta, float& sin_out, float& cos_out) {
  constexpr float kTwoOverPi = 0.63661975f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  constexpr float kPio2a = 1.5703125f;
  constexpr float kPio2b = 4.837512969970703e-04f;
  constexpr float kPio2c = 7.549790126404332e-08f;
  const float kf = (theta * kTwoOverPi + kRound) - kRound;
  const int32_t k = static_cast<int32_t>(kf);
  float r = theta - kf * kPio2a;
  r = r - kf * kPio2b;
  r = r - kf * kPio2c;
  const float r2 = r * r;
  const float sin_r =
      r + r * r2 * (-1.0f / 6 + r2 * (1.0f / 120 + r2 * (-1.0f / 5040 + r2 * (1.0f / 362880))));
  const float cos_r =
      1.0f - 0.5f * r2 +
      r2 * r2 * (1.0f / 24 + r2 * (-1.0f / 720 + r2 * (1.0f / 40320 + r2 * (-1.0f / 3628800))));
  // quadrant k: sin = (sin r, cos r, -sin r, -cos r), cos = (cos r, -sin r, -cos r, sin r)
  const uint32_t odd = static_cast<uint32_t>(k & 1);
  const uint32_t sb = bits_of(sin_r), cb = bits_of(cos_r);
  const uint32_t pick = 0u - odd;  // all ones when odd
  const uint32_t s = (sb & ~pick) | (cb & pick);
  const uint32_t c = (cb & ~pick) | (sb & pick);
  sin_out = float_of(s ^ (static_cast<uint32_t>(k & 2) << 30));        // sign flip
  cos_out = float_of(c ^ (static_cast<uint32_t>((k + 1) & 2) << 30));
}

}  // namespace fast
}  // namespace digfast
