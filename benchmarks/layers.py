"""Per-layer-type convolution timing: XLA's conv vs jcv's CPU lowerings vs oneDNN vs PyTorch.

For representative layers of MobileNetV2, ResNet and a CIFAR CNN, times the forward pass and
the forward + backward pass (gradients for input and kernel) of:

* ``xla``: ``lax.conv_general_dilated`` (``jcv.kernels.conv2d`` lowering "xla", stock Flax);
* ``cpu``: ``jcv.kernels.conv2d`` with the "cpu" lowering (exact jnp rewrites);
* ``onednn``: oneDNN through XLA's FFI, forced for every layer (``jcv.kernels.onednn``), if
  the native library builds;
* ``best``: ``conv2d`` with the "onednn" lowering, i.e. its per-layer choice between the two;
* ``torch``: ``torch.nn.functional.conv2d`` on channels_last tensors (if torch is installed),

interleaved in the same run, and prints GFLOP/s and ratios. Usage::

  python benchmarks/layers.py [--batch 16] [--rounds 5] [--only dw] [--out benchmarks/results/layers]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import interleaved_times, machine_info, median, write_csv, write_json  # noqa: E402
from jcv import kernels  # noqa: E402
from jcv.kernels import geometry, onednn  # noqa: E402

__all__ = ["LAYERS", "main"]

# name: (H=W, cin, cout, kernel, stride, groups)  -- groups == cin means depthwise.
LAYERS = {
    "mbv2_expand_1x1_56": (56, 24, 144, 1, 1, 1),
    "mbv2_dw3x3_s1_56": (56, 144, 144, 3, 1, 144),
    "mbv2_dw3x3_s2_56": (56, 144, 144, 3, 2, 144),
    "mbv2_project_1x1_28": (28, 144, 32, 1, 1, 1),
    "mbv2_dw3x3_s1_14": (14, 576, 576, 3, 1, 576),
    "mbv2_stem_3x3_s2_224": (224, 3, 32, 3, 2, 1),
    "resnet_stem_7x7_s2_224": (224, 3, 64, 7, 2, 1),
    "resnet_3x3_64_56": (56, 64, 64, 3, 1, 1),
    "resnet_3x3_s2_128_28": (28, 128, 256, 3, 2, 1),
    "cifar_3x3_64_128_32": (32, 64, 128, 3, 1, 1),
    "cifar_3x3_3_64_32": (32, 3, 64, 3, 1, 1),
    "cifar_whiten_2x2_3_24_32": (32, 3, 24, 2, 1, 1),  # airbench's whitening layer (SAME here)
    "resnet18_3x3_256_4": (4, 256, 256, 3, 1, 1),  # resnet18 at 64 px, last stages
    "resnet18_3x3_512_2": (2, 512, 512, 3, 1, 1),
    "resnet18_3x3_256_2": (2, 256, 256, 3, 1, 1),  # resnet18 at 32 px, last stages
    "resnet18_3x3_512_1": (1, 512, 512, 3, 1, 1),
    "mbv2_project_1x1_5": (5, 960, 320, 1, 1, 1),  # mobilenet_v2 at 160 px, last block
    "mbv2_dw3x3_s1_5": (5, 960, 960, 3, 1, 960),
}


def _flops(batch, h, cin, cout, k, stride, groups):
  out = -(-h // stride)
  return 2 * batch * out * out * cout * k * k * cin // groups


def _conv_fn(lowering, stride, groups):
  if lowering != "onednn":  # "best": the "onednn" lowering's per-layer choice
    name = "onednn" if lowering == "best" else lowering
    return lambda x, w: kernels.conv2d(x, w, strides=stride, groups=groups, lowering=name)

  def conv(x, w):  # oneDNN for every layer, including the ones the lowering gives to a rewrite
    kh, kw = w.shape[:2]
    pads = geometry.explicit_pads(x.shape[1:3], (kh, kw), (stride, stride), (1, 1), "SAME")
    return onednn.conv(x, w, (stride, stride), pads, (1, 1), groups)
  return conv


def _jax_fns(x, w, stride, groups, lowering):
  conv = _conv_fn(lowering, stride, groups)
  fwd = jax.jit(conv)
  y = jax.eval_shape(fwd, x, w)
  ct = jnp.ones(y.shape, y.dtype) * 0.01

  def loss(x, w):
    return jnp.vdot(conv(x, w).astype(jnp.float32), ct.astype(jnp.float32))
  train = jax.jit(jax.grad(loss, (0, 1)))
  fwd(x, w).block_until_ready()
  jax.block_until_ready(train(x, w))
  return (lambda: fwd(x, w).block_until_ready(),
          lambda: jax.block_until_ready(train(x, w)))


def _torch_fns(x_np, w_np, stride, groups, pad, dtype="float32"):
  import torch
  import torch.nn.functional as F
  tdt = getattr(torch, dtype)
  x = torch.from_numpy(x_np).permute(0, 3, 1, 2).to(tdt).contiguous(memory_format=torch.channels_last)
  w = torch.from_numpy(np.ascontiguousarray(w_np.transpose(3, 2, 0, 1))).to(tdt)
  w = w.contiguous(memory_format=torch.channels_last)

  def fwd():
    with torch.no_grad():
      return F.conv2d(x, w, stride=stride, padding=pad, groups=groups)

  xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
  ct = None

  def train():
    nonlocal ct
    y = F.conv2d(xg, wg, stride=stride, padding=pad, groups=groups)
    if ct is None:
      ct = torch.full_like(y, 0.01)
    xg.grad = wg.grad = None
    y.backward(ct)
    return xg.grad, wg.grad
  return fwd, train


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--only", default="", help="substring filter on layer names")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--out", default="benchmarks/results/layers")
  return p.parse_args(argv)


def _torch_available(args) -> bool:
  try:
    if args.no_torch:
      raise ImportError
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


def _measure_layer(args, spec, rng, lowerings, have_torch) -> dict:
  """One table row: ms and GFLOP/s of every implementation on one layer, and their ratios."""
  h, cin, cout, k, stride, groups = spec
  x_np = rng.normal(size=(args.batch, h, h, cin)).astype(np.float32)
  w_np = (rng.normal(size=(k, k, cin // groups, cout)) / np.sqrt(k * k * cin / groups)).astype(np.float32)
  x, w = jnp.asarray(x_np, args.dtype), jnp.asarray(w_np, args.dtype)
  fns = {}
  for lowering in lowerings:
    f, t = _jax_fns(x, w, stride, groups, lowering)
    fns[f"{lowering}_fwd"], fns[f"{lowering}_train"] = f, t
  if have_torch:
    # PyTorch's symmetric padding equals TF SAME for odd kernels at stride 1; for stride 2 on
    # even sizes TF pads (0, 1) instead of (1, 1): same FLOPs, same output size.
    f, t = _torch_fns(x_np, w_np, stride, groups, k // 2, args.dtype)
    fns["torch_fwd"], fns["torch_train"] = f, t
  times = interleaved_times(fns, rounds=args.rounds, iters_per_round=2, warmup=1)
  flops = _flops(args.batch, h, cin, cout, k, stride, groups)
  row = {"batch": args.batch, "dtype": args.dtype, "mflop_fwd": round(flops / 1e6, 1)}
  for key, ts in times.items():
    row[f"{key}_ms"] = round(1e3 * median(ts), 3)
    row[f"{key}_gflops"] = round((flops if key.endswith("fwd") else 3 * flops) / median(ts) / 1e9, 2)
  for mode in ("fwd", "train"):
    row[f"speedup_{mode}_vs_xla"] = round(row[f"xla_{mode}_ms"] / row[f"cpu_{mode}_ms"], 2)
    if "onednn" in lowerings:
      row[f"onednn_vs_cpu_{mode}"] = round(row[f"cpu_{mode}_ms"] / row[f"onednn_{mode}_ms"], 2)
    if have_torch:  # jcv = its best CPU lowering available here
      best = "best" if "best" in lowerings else "cpu"
      row[f"jcv_vs_torch_{mode}"] = round(row[f"torch_{mode}_ms"] / row[f"{best}_{mode}_ms"], 2)
  return row


def _write_markdown(path: str, rows: list[dict]) -> None:
  """The ms (GFLOP/s) table, written to ``path`` and printed."""
  cols = ["xla_fwd", "cpu_fwd", "onednn_fwd", "best_fwd", "torch_fwd", "xla_train", "cpu_train",
          "onednn_train", "best_train", "torch_train"]
  cols = [c for c in cols if f"{c}_ms" in rows[0]] if rows else []
  lines = ["| layer | MFLOP fwd | " + " | ".join(f"{c} ms (GFLOP/s)" for c in cols) + " |",
           "|" + " --- |" * (2 + len(cols))]
  for r in rows:
    lines.append(f"| {r['layer']} | {r['mflop_fwd']} | " + " | ".join(
        f"{r[c + '_ms']} ({r[c + '_gflops']})" for c in cols) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv=None):
  """Runs the per-layer benchmark and writes JSON/CSV/markdown next to ``--out``."""
  args = _parse_args(argv)
  have_torch = _torch_available(args)
  lowerings = ("xla", "cpu") + (("onednn", "best") if kernels.native.available() else ())
  info = machine_info()
  info["onednn"] = kernels.native.status()
  print(f"# {info['cpu']} x{info['cpu_count']}, load {info['load_avg_1_5_15']}, jax {info['jax']}, "
        f"torch {info.get('torch')}", flush=True)
  rows = []
  rng = np.random.default_rng(0)
  for name, spec in LAYERS.items():
    if args.only and args.only not in name:
      continue
    row = {"layer": name, **_measure_layer(args, spec, rng, lowerings, have_torch)}
    rows.append(row)
    print(" ".join(f"{k}={v}" for k, v in row.items() if not k.endswith("gflops")), flush=True)
  info["load_avg_after"] = list(os.getloadavg())
  write_json(args.out + ".json", {"machine": info, "rows": rows})
  write_csv(args.out + ".csv", rows)
  _write_markdown(args.out + ".md", rows)


if __name__ == "__main__":
  main()
