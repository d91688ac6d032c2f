// jcv's oneDNN convolutions as XLA FFI handlers (CPU): jcv_onednn_conv_{fwd,bwd_data,bwd_weights}
// and the fused inference form jcv_onednn_conv_fused{,_res} (onednn_conv.cc computes them).
//
// Leading dimensions in front of NHWC / HWIO (from jax.vmap, vmap_method="expand_dims") are
// broadcast like numpy: an unbatched kernel folds the vmapped images into N, otherwise one
// convolution per batch index.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "onednn_conv.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jcv::g_threads;
using jcv::Geometry;
using jcv::kBwdData;
using jcv::kBwdWeights;
using jcv::kFwd;
using jcv::Kind;
using jcv::RunChosen;
using jcv::RunFused;

struct Attrs {
  int64_t sh, sw, pt, pb, pl, pr, dh, dw, groups;
};

// Splits a buffer's dims into leading (vmap) dims and the trailing four.
std::vector<int64_t> Lead(ffi::Span<const int64_t> dims) {
  return std::vector<int64_t>(dims.begin(), dims.end() - 4);
}

int64_t Prod(const std::vector<int64_t>& v) {
  int64_t p = 1;
  for (int64_t d : v) p *= d;
  return p;
}

// Element offset (in units of one trailing block) of batch index `flat` of `out_lead` in a
// buffer whose leading dims `lead` broadcast against it (size-1 dims repeat).
int64_t BroadcastIndex(int64_t flat, const std::vector<int64_t>& out_lead, const std::vector<int64_t>& lead) {
  int64_t index = 0, stride = 1;
  for (int i = int(out_lead.size()) - 1; i >= 0; --i) {
    const int64_t coord = flat % out_lead[i];
    flat /= out_lead[i];
    const int64_t d = lead[i];
    index += (d == 1 ? 0 : coord) * stride;
    stride *= d;
  }
  return index;
}

// a: the NHWC input side (x or dx), b: the NHWC output side (y or dy), k: the HWIO kernel.
ffi::Error Conv(Kind kind, ffi::AnyBuffer a_buf, ffi::AnyBuffer k_buf, ffi::AnyBuffer b_buf, const Attrs& at) {
  auto ad = a_buf.dimensions(), kd = k_buf.dimensions(), bd = b_buf.dimensions();
  if (ad.size() < 4 || ad.size() != kd.size() || ad.size() != bd.size())
    return ffi::Error::InvalidArgument("jcv oneDNN conv: operands must be [batch...] NHWC / HWIO of equal rank");
  const auto dt = a_buf.element_type();
  if (dt != ffi::F32 && dt != ffi::BF16)
    return ffi::Error::InvalidArgument("jcv oneDNN conv: only float32 and bfloat16");
  const size_t r = ad.size();
  Geometry g;
  g.n = ad[r - 4]; g.h = ad[r - 3]; g.w = ad[r - 2]; g.c = ad[r - 1];
  g.kh = kd[r - 4]; g.kw = kd[r - 3]; g.ci = kd[r - 2]; g.co = kd[r - 1];
  g.oh = bd[r - 3]; g.ow = bd[r - 2];
  g.sh = at.sh; g.sw = at.sw; g.pt = at.pt; g.pb = at.pb; g.pl = at.pl; g.pr = at.pr;
  g.dh = at.dh; g.dw = at.dw; g.groups = at.groups;
  g.bf16 = dt == ffi::BF16;
  g.threads = g_threads > 0 ? g_threads : 0;
  if (g_threads > 0) omp_set_num_threads(g_threads);  // per calling thread
  g.threads = omp_get_max_threads();
  const std::vector<int64_t> la = Lead(ad), lk = Lead(kd), lb = Lead(bd);
  // The operand(s) computed here carry the full leading shape.
  std::vector<int64_t> out_lead(r - 4);
  for (size_t i = 0; i + 4 < r; ++i) out_lead[i] = std::max({la[i], lk[i], lb[i]});
  const int64_t batches = Prod(out_lead);
  const size_t es = g.bf16 ? 2 : 4;
  const size_t a_block = size_t(g.n * g.h * g.w * g.c) * es, b_block = size_t(g.n * g.oh * g.ow * g.co) * es;
  const size_t k_block = size_t(g.kh * g.kw * g.ci * g.co) * es;
  char* a = static_cast<char*>(a_buf.untyped_data());
  char* k = static_cast<char*>(k_buf.untyped_data());
  char* b = static_cast<char*>(b_buf.untyped_data());
  try {
    if (batches == 1) {
      RunChosen(g, kind, a, k, b);
    } else if (kind != kBwdWeights && Prod(lk) == 1 && Prod(la) == batches && Prod(lb) == batches) {
      Geometry folded = g;  // unbatched kernel: the vmapped images are just more images
      folded.n *= batches;
      RunChosen(folded, kind, a, k, b);
    } else {
      for (int64_t i = 0; i < batches; ++i)
        RunChosen(g, kind, a + BroadcastIndex(i, out_lead, la) * a_block, k + BroadcastIndex(i, out_lead, lk) * k_block,
            b + BroadcastIndex(i, out_lead, lb) * b_block);
    }
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("jcv oneDNN conv: ") + err.what());
  }
  return ffi::Error::Success();
}

#define JCV_ATTRS                                                                                 \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb")               \
      .Attr<int64_t>("pl").Attr<int64_t>("pr").Attr<int64_t>("dh").Attr<int64_t>("dw")            \
      .Attr<int64_t>("groups")

// The fused inference call on rank-4 operands (vmap loops over it: vmap_method="sequential").
ffi::Error Fused(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::AnyBuffer bias, void* res, ffi::AnyBuffer y,
                 const Attrs& at, int64_t act) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("jcv oneDNN fused conv: operands must be NHWC / HWIO");
  if (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("jcv oneDNN fused conv: only float32 and bfloat16");
  if (bias.element_type() != ffi::F32 || act < 0 || act > 2)
    return ffi::Error::InvalidArgument("jcv oneDNN fused conv: float32 bias, act 0-2");
  Geometry g;
  g.n = xd[0]; g.h = xd[1]; g.w = xd[2]; g.c = xd[3];
  g.kh = kd[0]; g.kw = kd[1]; g.ci = kd[2]; g.co = kd[3];
  g.oh = yd[1]; g.ow = yd[2];
  g.sh = at.sh; g.sw = at.sw; g.pt = at.pt; g.pb = at.pb; g.pl = at.pl; g.pr = at.pr;
  g.dh = at.dh; g.dw = at.dw; g.groups = at.groups;
  g.bf16 = x.element_type() == ffi::BF16;
  if (g_threads > 0) omp_set_num_threads(g_threads);
  g.threads = omp_get_max_threads();
  g.act = act;
  g.res = res != nullptr;
  try {
    RunFused(g, x.untyped_data(), k.untyped_data(), bias.untyped_data(), res, y.untyped_data());
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("jcv oneDNN fused conv: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error FusedFwd(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                    int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t dh,
                    int64_t dw, int64_t groups, int64_t act) {
  return Fused(x, k, bias, nullptr, *y, {sh, sw, pt, pb, pl, pr, dh, dw, groups}, act);
}

ffi::Error FusedFwdRes(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::AnyBuffer bias, ffi::AnyBuffer res,
                       ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                       int64_t pr, int64_t dh, int64_t dw, int64_t groups, int64_t act) {
  return Fused(x, k, bias, res.untyped_data(), *y, {sh, sw, pt, pb, pl, pr, dh, dw, groups}, act);
}

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw,
               int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw, int64_t groups) {
  return Conv(kFwd, x, k, *y, {sh, sw, pt, pb, pl, pr, dh, dw, groups});
}

ffi::Error BwdData(ffi::AnyBuffer dy, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> dx, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw, int64_t groups) {
  return Conv(kBwdData, *dx, k, dy, {sh, sw, pt, pb, pl, pr, dh, dw, groups});
}

ffi::Error BwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dk, int64_t sh,
                      int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw,
                      int64_t groups) {
  return Conv(kBwdWeights, x, *dk, dy, {sh, sw, pt, pb, pl, pr, dh, dw, groups});
}

}  // namespace

#define JCV_EXPORT extern "C" __attribute__((visibility("default")))
JCV_EXPORT XLA_FFI_Error* jcv_onednn_conv_fwd(XLA_FFI_CallFrame*);
JCV_EXPORT XLA_FFI_Error* jcv_onednn_conv_bwd_data(XLA_FFI_CallFrame*);
JCV_EXPORT XLA_FFI_Error* jcv_onednn_conv_bwd_weights(XLA_FFI_CallFrame*);
JCV_EXPORT XLA_FFI_Error* jcv_onednn_conv_fused(XLA_FFI_CallFrame*);
JCV_EXPORT XLA_FFI_Error* jcv_onednn_conv_fused_res(XLA_FFI_CallFrame*);
JCV_EXPORT void jcv_onednn_set_threads(int threads);
JCV_EXPORT int jcv_onednn_version();

XLA_FFI_DEFINE_HANDLER_SYMBOL(jcv_onednn_conv_fwd, Fwd,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>() JCV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jcv_onednn_conv_bwd_data, BwdData,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>() JCV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jcv_onednn_conv_bwd_weights, BwdWeights,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>() JCV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jcv_onednn_conv_fused, FusedFwd,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() JCV_ATTRS.Attr<int64_t>("act"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jcv_onednn_conv_fused_res, FusedFwdRes,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>() JCV_ATTRS.Attr<int64_t>("act"));

extern "C" {
// OpenMP threads per oneDNN call (0: OpenMP's default). Applied by each calling thread.
void jcv_onednn_set_threads(int threads) { g_threads = threads; }

// oneDNN's version as major * 10000 + minor * 100 + patch.
int jcv_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
}
