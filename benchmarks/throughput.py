"""Training-step and inference throughput of jcv models, side by side with PyTorch and Keras.

For each model (any name ``jcv.models.create`` knows), image size, batch size and dtype, times

* ``jcv``: ``jcv.train.step.train_step`` (uint8 batch -> float, forward, cross-entropy,
  backward, SGD-momentum update, BatchNorm statistics; state donated) and ``model.apply`` in
  inference mode in its folded form (``jcv.kernels.fused_inference``: what ``jcv evaluate`` and
  ``jcv predict`` run), both jitted; compile time, FLOPs per image (XLA cost analysis), XLA's
  memory estimate, the backend's peak memory when it reports one, achieved FLOP/s and MFU on a
  known accelerator. On a CPU the step runs as ``jcv.train`` runs it there: data-parallel over
  one XLA CPU device per core (``--host-devices``; XLA:CPU gives each convolution one core);
* ``jcv_cpu`` / ``jcv_xla_dev`` (``--compare jcv_cpu``): the same jcv step with the "cpu"
  conv lowering (exact jnp rewrites + XLA's conv, jcv's CPU default before the oneDNN
  backend) on the same devices;
* ``jcv_unfolded`` (``--compare jcv_unfolded``): jcv with inference run as the layers are
  written, BatchNorm after each convolution (``jcv`` folds it: ``jcv.kernels.fused_inference``);
* ``jcv_xla_onednn`` (``--compare jcv_xla_onednn``): jcv with XLA's own oneDNN switched on
  (``XLA_FLAGS`` += :data:`XLA_ONEDNN_FLAGS`; in jaxlib 0.10.2 it takes matmul, elementwise and
  reduce fusions, not convolutions);
* ``jcv_1dev`` (``--compare jcv_1dev``): jcv on one XLA CPU device, each oneDNN call using
  every core (``jcv.kernels.native.default_threads``), where ``jcv`` splits the batch over
  ``--host-devices``;
* ``flax_xla`` (``--baseline``): the same jcv model with XLA's own convolution everywhere
  (``jcv.kernels.conv2d`` lowering "xla"), i.e. what stock Flax ``nn.Conv`` gives;
* ``torch`` / ``torch_compile`` (``--compare torch,torch_compile``): the same architecture
  (``benchmarks/peers/torch_models.py``, parameter counts checked), channels_last, eager or
  ``torch.compile``; bfloat16 via ``torch.autocast``;
* ``keras`` (``--compare keras``): ``keras.applications`` models where one exists (backend from
  ``$KERAS_BACKEND``, default "jax"), ``train_on_batch`` / ``predict_on_batch``,

interleaved round by round so machine drift hits all of them alike. The median of the timed
iterations is reported, with ratios jcv / peer. An out-of-memory error retries at half the
batch and says so; a missing peer is reported, not fatal.

Each framework runs in its own worker process (the rounds stay interleaved; each worker times
itself, wall and CPU), so jcv runs on ``--host-devices`` XLA devices as ``jcv.train`` runs it
and PyTorch has its process to itself: sharing one process with jax slowed PyTorch's training
step by up to 1.4x on a 2-core machine (resnet18 at 32 px, batch 32: 354 img/s in one process,
486-494 in its own), which would flatter jcv. ``--no-isolate`` runs everything in this process.

Outputs ``<out>.json``, ``<out>.csv``, ``<out>.md`` and ``<out>.png`` (bar chart), with the
machine description. Example (this repository's CPU goal)::

  python benchmarks/throughput.py --models cifar_cnn:32,resnet18:32,mobilenet_v2:160 \\
      --batch-sizes 32 --compare torch --baseline
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import (Timing, interleaved_times, machine_info, median, write_csv,  # noqa: E402
                               write_json)

__all__ = ["DEFAULT_MODELS", "PEAK_TFLOPS", "main", "peak_tflops"]

# name:image size. The representative set of issue 7.
DEFAULT_MODELS = ("cifar_cnn:32,resnet18:32,mobilenet_v2:160,resnet50:224,vgg16:224,"
                  "inception_v3:299")

# Dense peak TFLOP/s per chip by device-kind substring: (bfloat16, float32 as XLA runs it by
# default: TF32 tensor cores on NVIDIA, bf16 passes on TPU). Vendor datasheets (SXM parts).
PEAK_TFLOPS = {
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L4": (121.0, 60.0),
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5e": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v6": (918.0, 918.0),
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Peak dense TFLOP/s of a known accelerator for ``dtype``, else None (e.g. CPUs)."""
  for key, (bf16, f32) in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else f32
  return None


def _is_oom(err: BaseException) -> bool:
  text = f"{type(err).__name__} {err}".lower()
  return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemory",
                                 "cannot allocate", "memoryerror"))


# --- jcv ------------------------------------------------------------------------------------

def _jcv_runner(name, size, batch, dtype, lowering, data, devices=1, parallel_mode="jit", folded=True,
                train_devices="all"):
  """Compiles jcv's train step and inference; returns callables and compile/cost facts.

  ``devices > 1``: the step as ``jcv.train`` runs it on that many devices (``jcv.train.parallel``:
  batch sharded over a ``data`` mesh axis, state replicated), inference sharded likewise;
  ``train_devices``: ``run.devices`` of the train step ("auto": all or one, whichever
  ``jcv.train.parallel.train_devices`` times faster).
  """
  import jax
  import jax.numpy as jnp
  import optax
  import jcv.models
  from jcv import kernels
  from jcv.train import parallel
  from jcv.train.state import create_train_state
  from jcv.train.step import train_step

  card = jcv.models.get_card(name)
  num_classes = card.default_num_classes
  model_dtype = jnp.bfloat16 if dtype == "bfloat16" else None
  facts = {"xla_devices": devices}  # _placed_step adds train_xla_devices where the train step differs
  with kernels.lowering(lowering):
    model = jcv.models.create(name, num_classes=num_classes, dtype=model_dtype)
    state = create_train_state(jax.random.key(0), model, optax.sgd(0.01, momentum=0.9),
                               (1, size, size, 3))
    step_fn = functools.partial(train_step, num_classes=num_classes)
    if devices > 1:
      if batch % devices:
        raise ValueError(f"batch {batch} does not split over {devices} devices")
      mesh = parallel.make_mesh(jax.devices()[:devices])
      state, batch_arrays, step = _placed_step(step_fn, state, data, train_devices, parallel_mode, facts)
    else:
      batch_arrays = {"image": jnp.asarray(data["uint8"]), "label": jnp.asarray(data["labels"])}
      step = jax.jit(step_fn, donate_argnums=0)
    t0 = time.perf_counter()
    compiled_step = step.lower(state, batch_arrays).compile()
    facts["train_compile_s"] = time.perf_counter() - t0
    if devices > 1 and train_devices == "auto":
      facts["train_compile_s"] = None  # compiled while timing the candidates: not measured apart
    facts.update(_cost(compiled_step, batch, "train"))

    variables = jax.tree.map(jnp.copy, state.variables)  # the train step donates state
    if devices > 1:  # inference on every device, whatever the train step runs on
      variables = parallel.replicate(variables, mesh)

    def apply(v, x):  # the inference form (BatchNorm folded, post-ops) unless folded=False
      with kernels.fused_inference(folded):
        return model.apply(v, x, train=False)
    infer = jax.jit(apply)
    x = jnp.asarray(data["float"])
    if devices > 1:
      x = parallel.shard_batch(data["float"], mesh)
    t0 = time.perf_counter()
    compiled_infer = infer.lower(variables, x).compile()
    facts["infer_compile_s"] = time.perf_counter() - t0
    facts.update(_cost(compiled_infer, batch, "infer"))

  box = {"state": state}

  def train():
    box["state"], metrics = compiled_step(box["state"], batch_arrays)
    jax.block_until_ready(metrics["loss"])

  def inference():
    compiled_infer(variables, x).block_until_ready()

  facts.update(_architecture_flops(model, num_classes, batch, state, variables, batch_arrays, x))
  return {"train": train, "infer": inference}, facts


def _placed_step(step_fn, state, data, train_devices, parallel_mode, facts):
  """(state, batch, jitted step) on the devices ``run.devices=train_devices`` picks."""
  from jcv.train import parallel
  host_batch = {"image": data["uint8"], "label": data["labels"]}
  mesh = parallel.make_mesh(parallel.train_devices(train_devices, step_fn, state, host_batch, mode=parallel_mode))
  facts["train_xla_devices"] = mesh.devices.size
  return (parallel.replicate(state, mesh), parallel.shard_batch(host_batch, mesh),
          parallel.compile_train_step(step_fn, mesh, mode=parallel_mode))


def _architecture_flops(model, num_classes, batch, state, variables, batch_arrays, x) -> dict:
  """GFLOP per image of train and infer: XLA's count for the program with XLA's own
  convolutions (the CPU lowering's im2col on tiny maps also multiplies padding zeros, which
  would inflate it). Empty where the count fails: the compiled program's count stands."""
  import jax
  import jax.numpy as jnp
  from jcv import kernels
  from jcv.train.step import train_step

  facts = {}
  try:
    with kernels.lowering("xla"):
      ref_step = jax.jit(functools.partial(train_step, num_classes=num_classes))
      ref_infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
      host = lambda tree: jax.tree.map(lambda a: jnp.asarray(np.asarray(jax.device_get(a))), tree)
      ref_state, ref_vars = host(jax.tree.map(jnp.copy, state)), host(variables)
      ref_batch, ref_x = host(batch_arrays), host(x)
      for mode, lowered in (("train", ref_step.lower(ref_state, ref_batch)),
                            ("infer", ref_infer.lower(ref_vars, ref_x))):
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and cost.get("flops", 0) > 0:
          facts[f"{mode}_gflop_per_img"] = float(cost["flops"]) / batch / 1e9
  except Exception:  # keep the compiled program's count
    pass
  return facts


def _cost(compiled, batch, mode):
  out = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    flops = float(cost.get("flops", 0.0))
    if flops > 0:
      out[f"{mode}_gflop_per_img"] = flops / batch / 1e9
  except Exception:  # cost analysis is best effort on some backends
    pass
  try:
    mem = compiled.memory_analysis()
    out[f"{mode}_xla_temp_mb"] = mem.temp_size_in_bytes / 2 ** 20
  except Exception:
    pass
  return out


def _device_peak_mb():
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
      return stats["peak_bytes_in_use"] / 2 ** 20
  except Exception:
    pass
  return None


# --- PyTorch ----------------------------------------------------------------------------------

def _torch_runner(name, size, batch, dtype, data, compiled):
  import torch
  import torch.nn.functional as F
  from benchmarks.peers import torch_models
  import jcv.models

  num_classes = jcv.models.get_card(name).default_num_classes
  model = torch_models.build(name, num_classes=num_classes).to(memory_format=torch.channels_last)
  facts = {"torch_params": torch_models.trainable_params(model)}
  images_u8 = torch.from_numpy(data["uint8"]).permute(0, 3, 1, 2)  # NHWC memory = channels_last
  labels = torch.from_numpy(data["labels"].astype(np.int64))
  x_float = torch.from_numpy(data["float"]).permute(0, 3, 1, 2)
  opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
  use_autocast = dtype == "bfloat16"

  def ctx():
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast)

  forward = model
  if compiled:
    forward = torch.compile(model)

  def train():
    model.train()
    x = images_u8.float().div_(255.0)
    with ctx():
      logits = forward(x)
    loss = F.cross_entropy(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def inference():
    model.eval()
    with torch.inference_mode(), ctx():
      forward(x_float)

  t0 = time.perf_counter()
  train()
  facts["train_compile_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  inference()
  facts["infer_compile_s"] = time.perf_counter() - t0
  return {"train": train, "infer": inference}, facts


# --- Keras ------------------------------------------------------------------------------------

_KERAS_APPS = {"resnet50": "ResNet50", "mobilenet_v2": "MobileNetV2", "vgg16": "VGG16",
               "inception_v3": "InceptionV3", "resnet101": "ResNet101"}


def _keras_runner(name, size, batch, dtype, data):
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras
  if name not in _KERAS_APPS:
    raise LookupError(f"no keras.applications model for {name!r}")
  keras.mixed_precision.set_global_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
  import jcv.models
  num_classes = jcv.models.get_card(name).default_num_classes
  model = getattr(keras.applications, _KERAS_APPS[name])(
      weights=None, input_shape=(size, size, 3), classes=num_classes)
  model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False))
  images = data["uint8"].astype(np.float32) / 255.0
  labels = data["labels"]
  facts = {"keras_backend": keras.backend.backend(),
           "keras_params": int(sum(np.prod(w.shape) for w in model.trainable_weights))}

  def train():
    model.train_on_batch(images, labels)

  def inference():
    model.predict_on_batch(data["float"])

  t0 = time.perf_counter()
  train()
  facts["train_compile_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  inference()
  facts["infer_compile_s"] = time.perf_counter() - t0
  return {"train": train, "infer": inference}, facts


# --- one process per framework (--isolate) ------------------------------------------------------

_TAG = "@@throughput "  # marks the worker's protocol lines on its stdout


class _Worker:
  """One framework built for one config in its own process (``--worker``), timed on request."""

  def __init__(self, framework, name, size, batch, dtype, args):
    jax_devices = str(args.host_devices) if framework in JCV_VARIANTS and framework != "jcv_1dev" else "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework,
           "--models", f"{name}:{size}", "--batch-sizes", str(batch), "--dtypes", dtype,
           "--lowering", args.lowering, "--parallel", args.parallel, "--host-devices", jax_devices,
           "--train-devices", args.train_devices]
    cmd += ["--no-isolate"] + (["--no-tune-malloc"] if args.no_tune_malloc else [])
    self.framework = framework
    env = dict(os.environ)
    if framework == "jcv_xla_onednn":  # XLA's own oneDNN (jaxlib 0.10: matmul/elementwise/reduce fusions)
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {XLA_ONEDNN_FLAGS}".strip()
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 bufsize=1, env=env)
    msg = self._read()
    if "error" in msg:
      self.close()
      raise RuntimeError(msg["error"])
    self.facts = msg["facts"]

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith(_TAG):
        return json.loads(line[len(_TAG):])
      print(f"    [{self.framework}] {line.rstrip()}", flush=True)
    raise RuntimeError(f"the {self.framework} worker exited with code {self.proc.wait()}")

  def runner(self, mode):
    def run():
      self.proc.stdin.write(mode + "\n")
      self.proc.stdin.flush()
      msg = self._read()
      return Timing(msg["wall_s"], msg["cpu_s"])
    return run

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.kill()


def _spawn(framework, name, size, batch, dtype, data, args):
  """``_build`` in a worker process: the same (runners, facts), the runners remote."""
  worker = _Worker(framework, name, size, batch, dtype, args)
  args.workers.append(worker)
  return {m: worker.runner(m) for m in ("train", "infer")}, worker.facts


def _serve(args):
  """``--worker FRAMEWORK``: builds it for the one config given, then answers each mode read
  from stdin with one timed iteration (its wall and CPU seconds), until stdin closes."""
  import jax
  import jcv.models
  args.jcv_devices = len(jax.devices()) if jax.default_backend() == "cpu" else 1
  name, _, size = args.models.partition(":")
  batch = int(args.batch_sizes)
  data = _make_data(batch, int(size), jcv.models.get_card(name).default_num_classes)
  try:
    runners, facts = _build(args.worker, name, int(size), batch, args.dtypes, data, args)
  except Exception as err:
    print(_TAG + json.dumps({"error": f"{type(err).__name__}: {err}"}), flush=True)
    return
  print(_TAG + json.dumps({"facts": facts}), flush=True)
  for line in sys.stdin:
    cpu, start = time.process_time(), time.perf_counter()
    runners[line.strip()]()
    print(_TAG + json.dumps({"wall_s": time.perf_counter() - start,
                             "cpu_s": time.process_time() - cpu}), flush=True)


# --- driver -----------------------------------------------------------------------------------

JCV_VARIANTS = ("jcv", "jcv_unfolded", "jcv_xla_onednn", "jcv_cpu", "jcv_1dev")  # jcv_unfolded: BatchNorm not folded
XLA_ONEDNN_FLAGS = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce"


def _make_data(batch, size, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  uint8 = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
  return {"uint8": uint8, "labels": rng.integers(0, num_classes, size=batch).astype(np.int32),
          "float": ((uint8.astype(np.float32) / 255.0) - 0.5) / 0.25}


def _build(framework, name, size, batch, dtype, data, args=None):
  if framework in JCV_VARIANTS:
    devices = getattr(args, "jcv_devices", 1)
    lowering = "cpu" if framework == "jcv_cpu" else getattr(args, "lowering", "auto")
    return _jcv_runner(name, size, batch, dtype, lowering, data,
                       devices=devices if batch % max(devices, 1) == 0 else 1,
                       parallel_mode=getattr(args, "parallel", "jit"), folded=framework != "jcv_unfolded",
                       train_devices=getattr(args, "train_devices", "all"))
  if framework == "flax_xla":
    return _jcv_runner(name, size, batch, dtype, "xla", data)
  if framework in ("torch", "torch_compile"):
    return _torch_runner(name, size, batch, dtype, data, compiled=framework == "torch_compile")
  if framework == "keras":
    return _keras_runner(name, size, batch, dtype, data)
  raise ValueError(f"unknown framework {framework!r}")


def _build_all(build, frameworks, name, size, batch, dtype, data, args, log):
  """(runners, facts, skipped) of every framework built at this batch; a missing or failing
  peer is skipped with the reason, jcv failing or any out-of-memory error raises."""
  runners, facts, skipped = {}, {}, {}
  for fw in frameworks:
    log(f"  building {fw}{' in its own process' if args.isolate else ''} ...")
    try:
      runners[fw], facts[fw] = build(fw, name, size, batch, dtype, data, args)
    except Exception as err:  # a missing or failing peer is reported, not fatal
      if _is_oom(err):
        raise
      if fw == "jcv":
        raise
      skipped[fw] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
      log(f"  {fw} skipped: {skipped[fw]}")
  return runners, facts, skipped


def _row(name, size, batch, dtype, mode, fw, ts, cpu_ts, facts, args, notes) -> dict:
  """One result row: speed, CPU time, compile time, FLOPs (jcv's count) and the framework's facts."""
  sec = median(ts)
  row = {"model": name, "image_size": size, "batch": batch, "dtype": dtype, "mode": mode,
         "framework": fw, "img_per_s": batch / sec, "ms_per_step": 1e3 * sec,
         "cpu_ms_per_step": 1e3 * median(cpu_ts),
         "n_timed": len(ts), "compile_s": facts[fw].get(f"{mode}_compile_s")}
  jf = facts.get("jcv", {})
  gflop = jf.get(f"{mode}_gflop_per_img")
  if gflop:
    row["gflop_per_img"] = gflop
    row["achieved_tflops"] = gflop * batch / sec / 1e3
    peak = peak_tflops(args.device_kind, dtype) if fw in ("jcv", "flax_xla") else None
    if peak:
      row["mfu"] = row["achieved_tflops"] / peak
  if fw in JCV_VARIANTS + ("flax_xla",):
    row["xla_temp_mb"] = facts[fw].get(f"{mode}_xla_temp_mb")
    row["xla_devices"] = facts[fw].get(f"{mode}_xla_devices", facts[fw].get("xla_devices"))
  for k in ("torch_params", "keras_params", "keras_backend"):
    if k in facts[fw]:
      row[k] = facts[fw][k]
  if notes:
    row["note"] = "; ".join(notes)
  return row


def _time_mode(mode, runners, facts, rows, name, size, batch, dtype, args, notes, log) -> None:
  """Times every framework's ``mode`` interleaved, appends a row each to ``rows`` with its
  ratios to jcv, and logs them."""
  fns = {fw: r[mode] for fw, r in runners.items()}
  log(f"  timing {mode}: {', '.join(fns)} interleaved ...")
  cpu = {}
  times = interleaved_times(fns, rounds=args.rounds, iters_per_round=args.iters,
                            warmup=args.warmup, budget_s=args.budget, cpu_times=cpu,
                            settle_s=args.settle)
  for fw, ts in times.items():
    rows.append(_row(name, size, batch, dtype, mode, fw, ts, cpu[fw], facts, args, notes))
  base = next((r for r in rows if r["mode"] == mode and r["framework"] == "jcv"), None)
  for r in rows:
    if r["mode"] == mode and base is not None:
      r["jcv_ratio"] = base["img_per_s"] / r["img_per_s"]
      r["jcv_cpu_ratio"] = r["cpu_ms_per_step"] / base["cpu_ms_per_step"]
  log("  " + "  ".join(f"{r['framework']} {r['img_per_s']:.1f} img/s, {r['cpu_ms_per_step']:.0f} cpu-ms"
                       + (f" (jcv x{r['jcv_ratio']:.2f}, cpu x{r['jcv_cpu_ratio']:.2f})"
                          if r['framework'] != 'jcv' else "")
                       for r in rows if r["mode"] == mode))


def _run_config(name, size, batch, dtype, frameworks, args, log):
  """Builds every framework at this batch (halving on OOM), then times them interleaved."""
  import jcv.models
  num_classes = jcv.models.get_card(name).default_num_classes
  notes = []
  build = _spawn if args.isolate else _build
  while True:
    data = _make_data(batch, size, num_classes)
    try:
      runners, facts, skipped = _build_all(build, frameworks, name, size, batch, dtype, data, args, log)
      rows = []
      for mode in args.modes:
        _time_mode(mode, runners, facts, rows, name, size, batch, dtype, args, notes, log)
      peak = None if args.isolate else _device_peak_mb()
      for r in rows:
        if peak is not None and r["framework"] in ("jcv", "flax_xla"):
          r["device_peak_mb"] = peak
      return rows, skipped
    except Exception as err:
      if _is_oom(err) and batch > 1:
        notes.append(f"OOM at batch {batch}, retried at {batch // 2}")
        log(f"  out of memory at batch {batch}: retrying at {batch // 2}")
        batch //= 2
        runners = facts = None
        gc.collect()
        continue
      raise
    finally:
      for worker in args.workers:
        worker.close()
      args.workers.clear()


def _markdown(rows, info):
  lines = [f"Machine: {info['cpu']} ({info['cpu_count']} cores), devices {info['devices']}, "
           f"jax {info['jax']}, torch {info.get('torch')}, load {info['load_avg_1_5_15']} -> "
           f"{info.get('load_avg_after')} (1/5/15 min), {info['time_utc']}.", "",
           "jcv ratio = jcv img/s / framework img/s (wall clock, interleaved); cpu ratio = the "
           "same from process CPU time per step (steadier when other jobs share the cores). "
           + ("Each framework ran in its own process; " if info.get("isolated") else "")
           + "(N dev) = XLA CPU devices of jcv's data-parallel step (train rows with --train-devices auto: "
           "all or one, whichever was faster, as run.devices=\"auto\").", "",
           "| model | px | batch | dtype | mode | framework | img/s | ms/step | CPU ms/step | "
           "jcv ratio | cpu ratio | GFLOP/img | TFLOP/s | MFU | compile s |",
           "|" + " --- |" * 15]
  for r in rows:
    def f(key, fmt):
      v = r.get(key)
      return format(v, fmt) if isinstance(v, (int, float)) else ""
    lines.append(f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['dtype']} | {r['mode']} | "
                 f"{r['framework']}{f' ({n} dev)' if (n := r.get('xla_devices')) else ''} | "
                 f"{f('img_per_s', '.1f')} | {f('ms_per_step', '.1f')} | "
                 f"{f('cpu_ms_per_step', '.0f')} | {f('jcv_ratio', '.2f')} | {f('jcv_cpu_ratio', '.2f')} | "
                 f"{f('gflop_per_img', '.2f')} | "
                 f"{f('achieved_tflops', '.3f')} | {f('mfu', '.1%')} | {f('compile_s', '.1f')} |")
  return "\n".join(lines) + "\n"


def _chart(rows, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  groups = []
  for r in rows:
    g = (r["model"], r["image_size"], r["batch"], r["dtype"], r["mode"])
    if g not in groups:
      groups.append(g)
  frameworks = list(dict.fromkeys(r["framework"] for r in rows))
  fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4))
  width = 0.8 / max(1, len(frameworks))
  for i, fw in enumerate(frameworks):
    vals = []
    for g in groups:
      match = [r for r in rows if (r["model"], r["image_size"], r["batch"], r["dtype"], r["mode"]) == g
               and r["framework"] == fw]
      vals.append(match[0]["img_per_s"] if match else 0)
    ax.bar(np.arange(len(groups)) + i * width, vals, width, label=fw)
  ax.set_xticks(np.arange(len(groups)) + width * (len(frameworks) - 1) / 2)
  short = {"float32": "f32", "bfloat16": "bf16"}
  ax.set_xticklabels([f"{m}\n{px}px b{b} {short.get(d, d)}\n{mode}" for m, px, b, d, mode in groups],
                     fontsize=7)
  ax.set_ylabel("images / s (median)")
  ax.set_yscale("log")
  ax.legend()
  ax.set_title("Throughput, interleaved in one run")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _setup_host_devices(args):
  """Sets XLA's CPU device count before JAX starts (no effect on GPU/TPU runs)."""
  import jcv.perf
  value = str(args.host_devices)
  if value != "1":
    jcv.perf.setup_cpu(host_devices="cores" if value == "cores" else int(value), malloc=False)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=DEFAULT_MODELS,
                 help="comma-separated name[:image_size] (default size: the model card's)")
  p.add_argument("--batch-sizes", default="32")
  p.add_argument("--dtypes", default="float32", help="float32,bfloat16")
  p.add_argument("--modes", default="train,infer")
  p.add_argument("--compare", default="", help="peers: torch,torch_compile,keras,jcv_unfolded,jcv_xla_onednn,jcv_cpu,jcv_1dev")
  p.add_argument("--lowering", default="auto", choices=("auto", "xla", "cpu", "onednn"),
                 help="jcv's conv lowering (jcv.kernels.conv2d; auto: oneDNN on a CPU if built)")
  p.add_argument("--baseline", action="store_true",
                 help="also time the jcv model with XLA's own convolutions (stock Flax)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--iters", type=int, default=2, help="timed iterations per round per framework")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--budget", type=float, default=120.0, help="seconds of timing per config (soft)")
  p.add_argument("--out", default="benchmarks/results/throughput")
  p.add_argument("--no-tune-malloc", action="store_true",
                 help="skip jcv.perf.tune_malloc (applies to every framework in the process)")
  p.add_argument("--host-devices", default="cores",
                 help="on a CPU: XLA CPU devices for jcv's data-parallel step, as jcv.train uses "
                      "them ('cores' = one per core, rounded down to a power of two; 1 = a "
                      "single device). The stock-Flax baseline always runs on one device.")
  p.add_argument("--train-devices", default="auto", choices=("auto", "all"),
                 help="jcv's train step on all --host-devices, or (auto, as run.devices=\"auto\") on all "
                      "or one, whichever a few timed steps find faster; inference always on all")
  p.add_argument("--parallel", default="jit", choices=("jit", "pmap"),
                 help="jcv.train.parallel mode for the multi-device jcv step")
  p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                 help="run each framework in its own worker process (rounds still interleaved): "
                      "jcv on --host-devices devices, the peers with the process to themselves; "
                      "--no-isolate: all in this process")
  p.add_argument("--settle", type=float, default=None,
                 help="seconds of idle before each framework's round, so the previous one's "
                      "spinning threads have stopped (default: 1 when isolated, else 0)")
  p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one framework, for --isolate
  return p


def _parse_args(p: argparse.ArgumentParser, argv):
  """The parsed flags, with ``--settle``'s default resolved and no worker processes yet."""
  args = p.parse_args(argv)
  args.workers = []
  if args.settle is None:
    args.settle = 1.0 if args.isolate else 0.0
  return args


def _machine(args) -> dict:
  """:func:`machine_info` plus jcv's devices, conv lowering and oneDNN status; sets
  ``args.device_kind`` and ``args.jcv_devices``."""
  import jax
  from jcv import kernels
  info = machine_info()
  args.device_kind = jax.devices()[0].device_kind
  args.jcv_devices = len(jax.devices()) if jax.default_backend() == "cpu" else 1
  info["jcv_devices"] = args.jcv_devices
  info["isolated"] = args.isolate
  info["jcv_lowering"] = kernels.resolve(args.lowering)
  info["onednn"] = kernels.native.status()
  return info


def _peers(p: argparse.ArgumentParser, args) -> list[str]:
  """The ``--compare`` peers, checked (an unknown one is a usage error)."""
  peers = [c for c in args.compare.split(",") if c]
  for c in peers:
    if c not in ("torch", "torch_compile", "keras") + JCV_VARIANTS[1:]:
      p.error(f"--compare takes torch, torch_compile, keras, {', '.join(JCV_VARIANTS[1:])}; got {c!r}")
  for own in ("jcv_xla_onednn", "jcv_1dev"):
    if own in peers and not args.isolate:
      p.error(f"--compare {own} sets XLA_FLAGS in its own process: drop --no-isolate")
  return peers


def _run_all(args, frameworks, log):
  """(rows, problems) over every model x batch size x dtype; a failing config is a problem."""
  import jcv.models
  available = set(jcv.models.list_models())
  rows, problems = [], {}
  specs = [s for s in args.models.split(",") if s]
  configs = [(s, int(b), d) for s in specs for b in args.batch_sizes.split(",")
             for d in args.dtypes.split(",")]
  for i, (spec, batch, dtype) in enumerate(configs):
    name, _, size = spec.partition(":")
    if name not in available:
      problems[spec] = f"model {name!r} is not registered in jcv.models"
      log(f"[{i + 1}/{len(configs)}] {spec}: skipped, not registered")
      continue
    size = int(size) if size else jcv.models.get_card(name).input_size
    log(f"[{i + 1}/{len(configs)}] {name} {size}px batch {batch} {dtype}")
    try:
      new_rows, skipped = _run_config(name, size, batch, dtype, frameworks, args, log)
      rows += new_rows
      for fw, why in skipped.items():
        problems[f"{spec} b{batch} {dtype} {fw}"] = why
    except Exception as err:
      problems[f"{spec} b{batch} {dtype}"] = f"{type(err).__name__}: {err}"
      log(f"  failed: {type(err).__name__}: {str(err)[:300]}")
      traceback.print_exc()
    gc.collect()
  return rows, problems


def main(argv=None):
  """Command-line entry point; returns the list of result rows."""
  p = _parser()
  args = _parse_args(p, argv)
  if not args.isolate:
    _setup_host_devices(args)
  if not (args.no_tune_malloc or args.isolate):
    import jcv.perf
    args.tune_malloc = jcv.perf.tune_malloc()
  if args.worker:
    return _serve(args)
  args.modes = [m for m in args.modes.split(",") if m]
  for m in args.modes:
    if m not in ("train", "infer"):
      p.error(f"--modes takes train and/or infer, got {m!r}")

  info = _machine(args)
  peers = _peers(p, args)
  frameworks = ["jcv"] + (["flax_xla"] if args.baseline else []) + peers
  log = functools.partial(print, flush=True)
  log(f"# {info['cpu']} x{info['cpu_count']} | devices {info['devices']} | load "
      f"{['%.2f' % v for v in info['load_avg_1_5_15']]} | jax {info['jax']} | torch {info.get('torch')}")
  if "torch" in "".join(peers):
    try:
      import torch  # noqa: F401
    except ImportError:
      log("torch is not installed: PyTorch peers will be reported missing (pip install jcv[bench])")
  rows, problems = _run_all(args, frameworks, log)
  info["load_avg_after"] = list(os.getloadavg())
  if args.isolate:  # the parent only orchestrates: report the workers' device count
    info["jcv_devices"] = next((r["xla_devices"] for r in rows if r["framework"] == "jcv"), None)
  _write_outputs(args, info, rows, problems, log)
  return rows


def _write_outputs(args, info, rows, problems, log):
  """<out>.json (machine, arguments, rows, problems), .csv, .md and the .png chart."""
  write_json(args.out + ".json", {"machine": info, "args": {k: v for k, v in vars(args).items()
                                                            if k != "workers"},
                                  "rows": rows, "problems": problems})
  write_csv(args.out + ".csv", rows)
  md = _markdown(rows, info)
  if problems:
    md += "\nNot measured:\n" + "".join(f"- {k}: {v}\n" for k, v in problems.items())
  with open(args.out + ".md", "w") as f:
    f.write(md)
  charted = _chart(rows, args.out + ".png") if rows else False
  log(md)
  log(f"wrote {args.out}.json/.csv/.md" + ("/.png" if charted else ""))


if __name__ == "__main__":
  main()
