// The depthwise convolution's kernel gradient as a direct loop (multiplier 1, NHWC, float32 or
// bfloat16 operands, float32 accumulation, the result rounded once):
//
//   dk[i, j, c] = sum over n, oy, ox of x[n, oy*sh - pt + i*dh, ox*sw - pl + j*dw, c] * dy[n, oy, ox, c]
//
// oneDNN 3.2's depthwise kernel gradient is slow on small maps with large kernels (EfficientNet's
// 5x5 on [16, 6, 6, 1248], 18M multiply-adds: 5.1 ms in float32 and 20.3 in bfloat16 on a 2-core
// Xeon, 0.7 ms here), so
// onednn_conv.cc measures this loop against it per shape and keeps the faster (Choose).
// Threads split the batch; each sums into its own float32 [kh, kw, c] block, added at the end.
#include "onednn_conv.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace jcv {

namespace {

inline uint16_t F32ToBf16(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// acc[k] += x[k] * dy[k] over one row of channels; compiled for AVX-512 / AVX2 where present.
__attribute__((target_clones("avx512f", "avx2", "default"))) void MulAdd(float* acc, const float* x, const float* dy,
                                                                          int64_t c) {
#pragma omp simd
  for (int64_t k = 0; k < c; ++k) acc[k] += x[k] * dy[k];
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void MulAdd(float* acc, const uint16_t* x,
                                                                          const uint16_t* dy, int64_t c) {
#pragma omp simd
  for (int64_t k = 0; k < c; ++k) {
    const uint32_t ux = uint32_t(x[k]) << 16, ud = uint32_t(dy[k]) << 16;
    float fx, fd;
    std::memcpy(&fx, &ux, 4);
    std::memcpy(&fd, &ud, 4);
    acc[k] += fx * fd;
  }
}

template <typename T>
void Grad(int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw, int64_t oh, int64_t ow,
          int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw, const T* x, const T* dy,
          float* total, int threads) {
  const int64_t taps = kh * kw * c;
  std::vector<float> acc(size_t(taps * threads), 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* mine = acc.data() + taps * omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t oy = 0; oy < oh; ++oy) {
        for (int64_t ox = 0; ox < ow; ++ox) {
          const T* g = dy + ((b * oh + oy) * ow + ox) * c;
          for (int64_t i = 0; i < kh; ++i) {
            const int64_t iy = oy * sh - pt + i * dh;
            if (iy < 0 || iy >= h) continue;
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t ix = ox * sw - pl + j * dw;
              if (ix < 0 || ix >= w) continue;
              MulAdd(mine + (i * kw + j) * c, x + ((b * h + iy) * w + ix) * c, g, c);
            }
          }
        }
      }
    }
  }
  for (int64_t k = 0; k < taps; ++k) {
    float s = 0.0f;
    for (int t = 0; t < threads; ++t) s += acc[size_t(t * taps + k)];
    total[k] = s;
  }
}

}  // namespace

void DepthwiseKernelGrad(int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw, int64_t oh,
                         int64_t ow, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw,
                         bool bf16, const void* x, const void* dy, void* dk, int threads) {
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  const int64_t taps = kh * kw * c;
  if (!bf16) {
    Grad(n, h, w, c, kh, kw, oh, ow, sh, sw, pt, pl, dh, dw, static_cast<const float*>(x),
         static_cast<const float*>(dy), static_cast<float*>(dk), threads);
    return;
  }
  std::vector<float> total(static_cast<size_t>(taps), 0.0f);
  Grad(n, h, w, c, kh, kw, oh, ow, sh, sw, pt, pl, dh, dw, static_cast<const uint16_t*>(x),
       static_cast<const uint16_t*>(dy), total.data(), threads);
  uint16_t* out = static_cast<uint16_t*>(dk);
  for (int64_t k = 0; k < taps; ++k) out[k] = F32ToBf16(total[size_t(k)]);
}

}  // namespace jcv
