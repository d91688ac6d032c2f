// oneDNN convolutions as XLA FFI handlers (CPU): forward, input gradient, kernel gradient, and the
// inference form y = act(conv(x, k) + bias [+ residual]) in one call (bias and post-ops).
//
// Layouts are jcv's: NHWC activations, HWIO kernels (kh, kw, cin / groups, cout). Activations
// are handed to oneDNN as they are (nhwc); kernels are reordered from/to the layout oneDNN's
// chosen implementation wants. Primitives and reorders are cached per shape and parameters.
// Leading dimensions in front of NHWC / HWIO (from jax.vmap, vmap_method="expand_dims") are
// broadcast like numpy: an unbatched kernel folds the vmapped images into N, otherwise one
// convolution per batch index. float32 and bfloat16 (accumulated in float32 by oneDNN).
//
// Built by jcv/kernels/build.py (g++ -O2 -shared, against oneDNN 3.2 and jaxlib's FFI headers).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace jcv {  // depthwise_grad.cc
void DepthwiseKernelGrad(int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw, int64_t oh,
                         int64_t ow, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw,
                         bool bf16, const void* x, const void* dy, void* dk, int threads);
}  // namespace jcv

namespace {

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2, kFused = 3 };
// oneDNN's first implementation; its first one that does not use AMX tiles; its float32 kernel
// on float32 copies of the bfloat16 operands (gradients only), the result rounded once; jcv's
// direct loop for depthwise kernel gradients (depthwise_grad.cc).
enum Variant { kFirst = 0, kNoAmx = 1, kUpcast = 2, kDirect = 3 };

struct Geometry {
  int64_t n, h, w, c, kh, kw, ci, co, oh, ow;  // ci: input channels per group
  int64_t sh, sw, pt, pb, pl, pr, dh, dw, groups;
  bool bf16;
  int variant = kFirst;  // how a bfloat16 call is computed (Variant; chosen by measuring, see Choose)
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

int g_threads = 0;  // 0: OpenMP's default (all cores); set from Python with jcv_onednn_set_threads

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Streams are not thread-safe: one per calling thread (XLA may run two convs at once).
dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

memory::data_type Dt(bool bf16) { return bf16 ? memory::data_type::bf16 : memory::data_type::f32; }

memory::desc ActDesc(int64_t n, int64_t c, int64_t h, int64_t w, bool bf16) {
  return memory::desc({n, c, h, w}, Dt(bf16), memory::format_tag::nhwc);
}

// The HWIO kernel as oneDNN's (g,) o, i, kh, kw dims with explicit strides.
memory::desc KernelDesc(const Geometry& g, memory::data_type dt) {
  const int64_t sw = g.ci * g.co, sh = g.kw * sw, si = g.co;
  if (g.groups == 1) return memory::desc({g.co, g.ci, g.kh, g.kw}, dt, {1, si, sh, sw});
  const int64_t og = g.co / g.groups;
  return memory::desc({g.groups, og, g.ci, g.kh, g.kw}, dt, {og, 1, si, sh, sw});
}

memory::desc AnyKernelDesc(const Geometry& g, memory::data_type dt) {
  if (g.groups == 1) return memory::desc({g.co, g.ci, g.kh, g.kw}, dt, memory::format_tag::any);
  return memory::desc({g.groups, g.co / g.groups, g.ci, g.kh, g.kw}, dt, memory::format_tag::any);
}

struct Entry {
  dnnl::primitive conv;
  memory::desc src, wei, dst;     // the primitive's descs (src/dst: nhwc)
  memory::desc user_src, user_dst;  // the operands' (bf16 where the primitive is upcast to f32)
  dnnl::reorder src_up, dst_up, src_down;  // upcast: bf16 -> f32 copies, f32 result -> bf16
  memory::desc user_wei;          // HWIO
  std::string impl;               // oneDNN's implementation name, e.g. "brgconv:avx512_core_amx"
  bool reorder_wei = false;
  dnnl::reorder wei_reorder;      // user -> primitive (fwd, bwd data) or primitive -> user
  size_t scratch_bytes = 0;
};

dnnl::convolution_forward::primitive_desc FwdDesc(const Geometry& g, dnnl::prop_kind prop,
                                                  const dnnl::primitive_attr& attr) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), prop, dnnl::algorithm::convolution_direct, ActDesc(g.n, g.c, g.h, g.w, g.bf16),
      AnyKernelDesc(g, Dt(g.bf16)), ActDesc(g.n, g.co, g.oh, g.ow, g.bf16), {g.sh, g.sw},
      {g.dh - 1, g.dw - 1}, {g.pt, g.pl}, {g.pb, g.pr}, attr);
}

// Moves pd past the implementations that use AMX tiles (if it runs out, it keeps the last one).
template <typename PrimitiveDesc>
void SkipAmx(PrimitiveDesc& pd) {
  while (std::string(pd.impl_info_str()).find("amx") != std::string::npos && pd.next_impl()) {
  }
}

std::shared_ptr<Entry> MakeEntry(const Geometry& user, Kind kind) {
  Geometry g = user;
  const bool upcast = user.variant == kUpcast;
  g.bf16 = user.bf16 && !upcast;  // the primitive's precision
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto e = std::make_shared<Entry>();
  if (kind == kFused) {
    dnnl::post_ops ops;  // applied in order after the bias: + residual, then the activation
    if (g.res) ops.append_binary(dnnl::algorithm::binary_add, ActDesc(g.n, g.co, g.oh, g.ow, g.bf16));
    if (g.act == 1) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    if (g.act == 2) ops.append_eltwise(dnnl::algorithm::eltwise_clip_v2, 0.f, 6.f);
    attr.set_post_ops(ops);
    auto pd = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
        ActDesc(g.n, g.c, g.h, g.w, g.bf16), AnyKernelDesc(g, Dt(g.bf16)),
        memory::desc({g.co}, memory::data_type::f32, memory::format_tag::a), ActDesc(g.n, g.co, g.oh, g.ow, g.bf16),
        {g.sh, g.sw}, {g.dh - 1, g.dw - 1}, {g.pt, g.pl}, {g.pb, g.pr}, attr);
    e->impl = pd.impl_info_str();
    e->conv = dnnl::convolution_forward(pd);
    e->src = pd.src_desc(); e->wei = pd.weights_desc(); e->dst = pd.dst_desc();
    e->scratch_bytes = pd.scratchpad_desc().get_size();
  } else if (kind == kFwd) {
    auto pd = FwdDesc(g, dnnl::prop_kind::forward_inference, attr);
    if (user.variant == kNoAmx) SkipAmx(pd);
    e->impl = pd.impl_info_str();
    e->conv = dnnl::convolution_forward(pd);
    e->src = pd.src_desc(); e->wei = pd.weights_desc(); e->dst = pd.dst_desc();
    e->scratch_bytes = pd.scratchpad_desc().get_size();
  } else if (kind == kBwdData) {
    auto hint = FwdDesc(g, dnnl::prop_kind::forward_training, dnnl::primitive_attr());
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, ActDesc(g.n, g.c, g.h, g.w, g.bf16),
        AnyKernelDesc(g, Dt(g.bf16)), ActDesc(g.n, g.co, g.oh, g.ow, g.bf16), {g.sh, g.sw},
        {g.dh - 1, g.dw - 1}, {g.pt, g.pl}, {g.pb, g.pr}, hint, attr);
    if (user.variant == kNoAmx) SkipAmx(pd);
    e->impl = pd.impl_info_str();
    e->conv = dnnl::convolution_backward_data(pd);
    e->src = pd.diff_src_desc(); e->wei = pd.weights_desc(); e->dst = pd.diff_dst_desc();
    e->scratch_bytes = pd.scratchpad_desc().get_size();
  } else {
    auto hint = FwdDesc(g, dnnl::prop_kind::forward_training, dnnl::primitive_attr());
    // bfloat16: kernel gradient accumulated and stored in float32, rounded once by the reorder.
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, ActDesc(g.n, g.c, g.h, g.w, g.bf16),
        AnyKernelDesc(g, memory::data_type::f32), ActDesc(g.n, g.co, g.oh, g.ow, g.bf16),
        {g.sh, g.sw}, {g.dh - 1, g.dw - 1}, {g.pt, g.pl}, {g.pb, g.pr}, hint, attr);
    if (user.variant == kNoAmx) SkipAmx(pd);
    e->impl = pd.impl_info_str();
    e->conv = dnnl::convolution_backward_weights(pd);
    e->src = pd.src_desc(); e->wei = pd.diff_weights_desc(); e->dst = pd.diff_dst_desc();
    e->scratch_bytes = pd.scratchpad_desc().get_size();
  }
  e->user_wei = KernelDesc(g, Dt(user.bf16));
  e->reorder_wei = e->wei != e->user_wei;
  e->user_src = upcast ? ActDesc(g.n, g.c, g.h, g.w, true) : e->src;
  e->user_dst = upcast ? ActDesc(g.n, g.co, g.oh, g.ow, true) : e->dst;
  if (upcast) {
    auto make = [](const memory::desc& from, const memory::desc& to) {
      return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
    };
    e->dst_up = make(e->user_dst, e->dst);
    if (kind == kBwdWeights) e->src_up = make(e->user_src, e->src);
    else e->src_down = make(e->src, e->user_src);
  }
  if (e->reorder_wei) {
    e->wei_reorder = kind == kBwdWeights ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), e->wei, Engine(), e->user_wei))
                                         : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), e->user_wei, Engine(), e->wei));
  }
  return e;
}

std::shared_ptr<Entry> GetEntry(const Geometry& g, Kind kind) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::shared_ptr<Entry>> cache;
  const std::string key = g.key(kind);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto e = MakeEntry(g, kind);
  std::lock_guard<std::mutex> lock(mu);
  return cache.emplace(key, e).first->second;
}

// Per-thread grow-only buffers (reordered kernel, scratchpad, float32 copies of src and dst):
// no allocation per call.
void* Buffer(int slot, size_t bytes) {
  thread_local std::vector<char> buffers[4];
  if (buffers[slot].size() < bytes) buffers[slot].resize(bytes);
  return buffers[slot].data();
}

// One convolution on plain pointers: a = src (x or dx), k = HWIO kernel (or dk), b = dst (y or dy).
bool Depthwise(const Geometry& g) { return g.groups > 1 && g.ci == 1 && g.co == g.groups && g.c == g.groups; }

void Run(const Geometry& g, Kind kind, void* a, void* k, void* b) {
  if (g.variant == kDirect) {  // kBwdWeights of a Depthwise geometry: a = x, b = dy, k = dk
    jcv::DepthwiseKernelGrad(g.n, g.h, g.w, g.c, g.kh, g.kw, g.oh, g.ow, g.sh, g.sw, g.pt, g.pl, g.dh, g.dw,
                             g.bf16, a, b, k, g.threads);
    return;
  }
  auto e = GetEntry(g, kind);
  auto& engine = Engine();
  auto& stream = Stream();
  memory src(e->src, engine, a), dst(e->dst, engine, b), user_wei(e->user_wei, engine, k);
  memory user_src = src;
  if (g.variant == kUpcast) {  // b (dy) is an input; a is x (kernel gradient) or the result dx (input gradient)
    user_src = memory(e->user_src, engine, a);
    memory user_dst(e->user_dst, engine, b);
    src = memory(e->src, engine, Buffer(2, e->src.get_size()));
    dst = memory(e->dst, engine, Buffer(3, e->dst.get_size()));
    e->dst_up.execute(stream, user_dst, dst);
    if (kind == kBwdWeights) e->src_up.execute(stream, user_src, src);
  }
  memory wei = user_wei;
  if (e->reorder_wei) wei = memory(e->wei, engine, Buffer(0, e->wei.get_size()));
  memory scratch(memory::desc({int64_t(e->scratch_bytes)}, memory::data_type::u8, memory::format_tag::a),
                 engine, Buffer(1, e->scratch_bytes ? e->scratch_bytes : 1));
  if (kind == kFwd) {
    if (e->reorder_wei) e->wei_reorder.execute(stream, user_wei, wei);
    e->conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (kind == kBwdData) {
    if (e->reorder_wei) e->wei_reorder.execute(stream, user_wei, wei);
    e->conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, wei},
                             {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    if (g.variant == kUpcast) e->src_down.execute(stream, src, user_src);
  } else {
    if (!e->reorder_wei) wei = memory(e->wei, engine, k);
    e->conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, wei},
                             {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    if (e->reorder_wei) e->wei_reorder.execute(stream, wei, user_wei);
  }
  stream.wait();
}

double Seconds(const Geometry& g, Kind kind, void* a, void* k, void* b) {
  const auto start = std::chrono::steady_clock::now();
  Run(g, kind, a, k, b);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Which Variant computes this call fastest (bfloat16 calls, and depthwise kernel gradients in
// either precision), measured once per shape on its own operands and remembered: each candidate
// runs three times, the faster of the last two counts (another thread can take a core for a
// while), ties within 5% go to oneDNN's first choice. oneDNN 3.2's own choice is 2-50x slower
// than another kernel in some cases: on a 2-core Xeon with AMX, AMX kernel gradients of strided
// 1x1 convolutions (8.4 vs 0.17 ms on [32, 4, 4, 128] -> 256); on AVX512-BF16 without AMX
// (EPYC), strided depthwise input gradients (80 vs 26 ms in float32); on both, depthwise kernel
// gradients of 5x5 kernels on small maps (8.8 ms per call on [16, 6, 6, 1248]).
// JCV_ONEDNN_IMPL=first|noamx|upcast|direct forces one Variant wherever it applies (oneDNN's
// first choice elsewhere); unset or "measure", the measured choice.
int Choose(const Geometry& g, Kind kind, void* a, void* k, void* b) {
  static const int forced = [] {
    const char* v = std::getenv("JCV_ONEDNN_IMPL");
    const std::string name = v ? v : "measure";
    const char* names[] = {"first", "noamx", "upcast", "direct"};
    for (int i = 0; i < 4; ++i)
      if (name == names[i]) return i;
    return -1;
  }();
  const bool direct = kind == kBwdWeights && Depthwise(g);
  if (forced == kDirect) return direct ? kDirect : kFirst;
  if (forced == kUpcast) return g.bf16 && (kind == kBwdData || kind == kBwdWeights) ? kUpcast : kFirst;
  if (forced >= 0) return g.bf16 ? forced : kFirst;
  if (!(g.bf16 || direct)) return kFirst;
  static std::mutex mu;  // one measurement at a time; the other threads wait for its result
  static std::unordered_map<std::string, int> chosen;
  std::lock_guard<std::mutex> lock(mu);
  const std::string key = g.key(kind);
  auto it = chosen.find(key);
  if (it != chosen.end()) return it->second;
  std::vector<int> candidates = {kFirst};
  if (g.bf16) candidates.push_back(kNoAmx);
  if (g.bf16 && (kind == kBwdData || kind == kBwdWeights)) candidates.push_back(kUpcast);
  if (direct) candidates.push_back(kDirect);
  int best = kFirst;
  double best_s = 0;
  std::vector<std::string> impls;
  for (int v : candidates) {
    Geometry c = g;
    c.variant = v;
    const std::string impl = v == kDirect ? "jcv:direct" : GetEntry(c, kind)->impl;
    if (v == kNoAmx && std::find(impls.begin(), impls.end(), impl) != impls.end()) continue;
    impls.push_back(impl);
    Run(c, kind, a, k, b);
    const double s = std::min(Seconds(c, kind, a, k, b), Seconds(c, kind, a, k, b));
    if (v == kFirst || s < 0.95 * best_s) {
      best = v;
      best_s = s;
    }
  }
  chosen.emplace(key, best);
  return best;
}

// Run with the Variant Choose picks (float32: oneDNN's first choice).
void RunChosen(Geometry g, Kind kind, void* a, void* k, void* b) {
  g.variant = Choose(g, kind, a, k, b);
  Run(g, kind, a, k, b);
}

// The inference form: y = act(conv(x, k) + bias [+ res]); bias float32 [co], res like y.
void RunFused(const Geometry& g, void* x, void* k, void* bias, void* res, void* y) {
  auto e = GetEntry(g, kFused);
  auto& engine = Engine();
  auto& stream = Stream();
  memory src(e->src, engine, x), dst(e->dst, engine, y), user_wei(e->user_wei, engine, k);
  memory b(memory::desc({g.co}, memory::data_type::f32, memory::format_tag::a), engine, bias);
  memory wei = user_wei;
  if (e->reorder_wei) {
    wei = memory(e->wei, engine, Buffer(0, e->wei.get_size()));
    e->wei_reorder.execute(stream, user_wei, wei);
  }
  memory scratch(memory::desc({int64_t(e->scratch_bytes)}, memory::data_type::u8, memory::format_tag::a),
                 engine, Buffer(1, e->scratch_bytes ? e->scratch_bytes : 1));
  std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_BIAS, b},
                                       {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}};
  if (g.res) args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, memory(e->dst, engine, res));
  e->conv.execute(stream, args);
  stream.wait();
}

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
