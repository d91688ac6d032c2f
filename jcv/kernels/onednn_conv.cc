// oneDNN convolutions on plain pointers (CPU): forward, input gradient, kernel gradient, and the
// inference form y = act(conv(x, k) + bias [+ residual]) in one call (bias and post-ops); the
// XLA FFI handlers that call them are in onednn_ffi.cc.
//
// Layouts are jcv's: NHWC activations, HWIO kernels (kh, kw, cin / groups, cout). Activations
// are handed to oneDNN as they are (nhwc); kernels are reordered from/to the layout oneDNN's
// chosen implementation wants. Primitives and reorders are cached per shape and parameters.
// float32 and bfloat16 (accumulated in float32 by oneDNN).
//
// Built by jcv/kernels/build.py (g++ -O2 -shared, against oneDNN 3.2 and jaxlib's FFI headers).
#include "onednn_conv.h"

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

using dnnl::memory;

namespace jcv {

int g_threads = 0;

namespace {

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

bool Depthwise(const Geometry& g) { return g.groups > 1 && g.ci == 1 && g.co == g.groups && g.c == g.groups; }

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
// gradients of 5x5 kernels on small maps ([16, 6, 6, 1248]: 5.1 ms float32, 20.3 ms bfloat16, 0.7 ms
// with depthwise_grad.cc's loop).
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

}  // namespace

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

// Run with the Variant Choose picks (oneDNN's first choice for float32 calls other than depthwise
// kernel gradients).
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

}  // namespace jcv
