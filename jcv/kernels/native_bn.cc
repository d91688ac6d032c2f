// BatchNorm's two reductions (training mode) as XLA FFI handlers (CPU), multi-threaded with
// OpenMP: the per-channel sums of jcv.models.batchnorm's forward and backward passes (XLA:CPU
// runs a reduction over the rows of an NHWC array on one thread, at a third of this speed;
// the elementwise passes stay with XLA, which fuses them with their neighbours).
//
// Arrays are [..., C] with C contiguous (NHWC), float32 or bfloat16 (summed in float32);
// every leading dimension is a row. act: 0 none, 1 ReLU, 2 ReLU6; the activation's derivative
// is read from its output y (0 < y < 6 for ReLU6).
//
//   jcv_bn_stats(x)                      -> [2, C]: sum(x), sum(x * x)
//   jcv_bn_bwd_stats(dy, y, x, mean[C])  -> [2, C]: sum(dz), sum(dz * (x - mean)), dz = dy * act'
//
// Sums are accumulated in float32 over blocks of rows and in double across blocks.
// Built together with onednn_conv.cc by jcv/models/onednn.py.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

int g_bn_threads = 0;  // 0: OpenMP's default; set from Python with jcv_native_bn_set_threads
constexpr int64_t kBlock = 256;  // rows per float32 partial sum

inline float Ld(const float* p, int64_t i) { return p[i]; }
inline float Ld(const uint16_t* p, int64_t i) {
  uint32_t u = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float Grad(float dy, float y, int act) {
  if (act == 0) return dy;
  const bool on = act == 2 ? (y > 0.0f && y < 6.0f) : y > 0.0f;
  return on ? dy : 0.0f;
}

int Threads() {
  if (g_bn_threads > 0) omp_set_num_threads(g_bn_threads);
  return omp_get_max_threads();
}

// Two per-channel sums over all rows; fn(row, ch, &v1, &v2) adds one element's terms.
template <typename F>
void Reduce2(int64_t rows, int64_t c, float* out, F fn) {
  const int nt = Threads();
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  std::vector<double> acc(size_t(2 * c * nt), 0.0);
#pragma omp parallel num_threads(nt)
  {
    double* s = acc.data() + 2 * c * omp_get_thread_num();
    std::vector<float> f(size_t(2 * c));
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      std::fill(f.begin(), f.end(), 0.0f);
      float* f1 = f.data();
      float* f2 = f.data() + c;
      const int64_t end = std::min(rows, (blk + 1) * kBlock);
      for (int64_t r = blk * kBlock; r < end; ++r) {
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) fn(r, ch, f1 + ch, f2 + ch);
      }
      for (int64_t ch = 0; ch < 2 * c; ++ch) s[ch] += f[ch];
    }
  }
  for (int64_t ch = 0; ch < 2 * c; ++ch) {
    double v = 0.0;
    for (int t = 0; t < nt; ++t) v += acc[size_t(2 * c * t + ch)];
    out[ch] = float(v);
  }
}

template <typename T>
void Stats(const T* x, int64_t rows, int64_t c, float* out) {
  Reduce2(rows, c, out, [=](int64_t r, int64_t ch, float* s1, float* s2) {
    const float v = Ld(x, r * c + ch);
    *s1 += v;
    *s2 += v * v;
  });
}

template <typename T>
void BwdStats(const T* dy, const T* y, const T* x, const float* mean, int64_t rows, int64_t c, int act,
              float* out) {
  Reduce2(rows, c, out, [=](int64_t r, int64_t ch, float* s1, float* s2) {
    const int64_t i = r * c + ch;
    const float dz = Grad(Ld(dy, i), Ld(y, i), act);
    *s1 += dz;
    *s2 += dz * (Ld(x, i) - mean[ch]);
  });
}

ffi::Error Shape(ffi::AnyBuffer x, int64_t* rows, int64_t* c) {
  auto d = x.dimensions();
  if (d.size() < 1) return ffi::Error::InvalidArgument("jcv batch norm: needs at least one dimension");
  if (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("jcv batch norm: only float32 and bfloat16");
  *c = d.back();
  *rows = *c ? int64_t(x.element_count()) / *c : 0;
  return ffi::Error::Success();
}

#define JCV_DISPATCH(buf, CALL)                                          \
  if ((buf).element_type() == ffi::F32) {                                \
    using T = float;                                                     \
    CALL;                                                                \
  } else {                                                               \
    using T = uint16_t;                                                  \
    CALL;                                                                \
  }
#define JCV_P(buf) static_cast<T*>((buf).untyped_data())

ffi::Error StatsH(ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  int64_t rows, c;
  if (auto e = Shape(x, &rows, &c); e.failure()) return e;
  JCV_DISPATCH(x, Stats(JCV_P(x), rows, c, out->typed_data()));
  return ffi::Error::Success();
}

ffi::Error BwdStatsH(ffi::AnyBuffer dy, ffi::AnyBuffer y, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean,
                     ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t act) {
  int64_t rows, c;
  if (auto e = Shape(x, &rows, &c); e.failure()) return e;
  JCV_DISPATCH(x, BwdStats(JCV_P(dy), JCV_P(y), JCV_P(x), mean.typed_data(), rows, c, int(act), out->typed_data()));
  return ffi::Error::Success();
}

}  // namespace

#define JCV_EXPORT extern "C" __attribute__((visibility("default")))
JCV_EXPORT XLA_FFI_Error* jcv_bn_stats(XLA_FFI_CallFrame*);
JCV_EXPORT XLA_FFI_Error* jcv_bn_bwd_stats(XLA_FFI_CallFrame*);
JCV_EXPORT void jcv_native_bn_set_threads(int threads);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jcv_bn_stats, StatsH,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(jcv_bn_bwd_stats, BwdStatsH,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("act"));

extern "C" {
void jcv_native_bn_set_threads(int threads) { g_bn_threads = threads; }
}
