// Shared by onednn_conv.cc (oneDNN primitives, the measured choice) and onednn_ffi.cc (the XLA FFI
// handlers); depthwise_grad.cc holds the direct depthwise kernel-gradient loop.
#pragma once

#include <cstdint>
#include <string>

namespace jcv {

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2, kFused = 3 };
// oneDNN's first implementation; its first one that does not use AMX tiles; its float32 kernel
// on float32 copies of the bfloat16 operands (gradients only), the result rounded once; jcv's
// direct loop for depthwise kernel gradients (depthwise_grad.cc).
enum Variant { kFirst = 0, kNoAmx = 1, kUpcast = 2, kDirect = 3 };

struct Geometry {
  int64_t n, h, w, c, kh, kw, ci, co, oh, ow;  // ci: input channels per group
  int64_t sh, sw, pt, pb, pl, pr, dh, dw, groups;
  bool bf16;
  int variant = kFirst;  // how the call is computed (a Variant; measured, see Choose in onednn_conv.cc)
  int threads;
  int64_t act = 0, res = 0;  // kFused: 0 none / 1 relu / 2 relu6; whether a residual is added
  std::string key(Kind kind) const {
    std::string k;
    for (int64_t v : {int64_t(kind), n, h, w, c, kh, kw, ci, co, oh, ow, sh, sw, pt, pb, pl, pr,
                      dh, dw, groups, int64_t(bf16), int64_t(variant), int64_t(threads), act, res})
      k += std::to_string(v) + ",";
    return k;
  }
};

extern int g_threads;  // OpenMP threads per call (0: OpenMP's default); jcv_onednn_set_threads

// One convolution on plain pointers: a = src (x or dx), k = HWIO kernel (or dk), b = dst (y or dy),
// computed the way g.variant says.
void Run(const Geometry& g, Kind kind, void* a, void* k, void* b);
// Run with the Variant measured fastest for this shape (Choose in onednn_conv.cc).
void RunChosen(Geometry g, Kind kind, void* a, void* k, void* b);
// The inference form: y = act(conv(x, k) + bias [+ res]); bias float32 [co], res like y.
void RunFused(const Geometry& g, void* x, void* k, void* bias, void* res, void* y);
// dk: HWIO [kh, kw, 1, c], float32 or bfloat16 like x and dy. dh, dw: dilation factors (1: none).
void DepthwiseKernelGrad(int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw, int64_t oh,
                         int64_t ow, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw,
                         bool bf16, const void* x, const void* dy, void* dk, int threads);

}  // namespace jcv
