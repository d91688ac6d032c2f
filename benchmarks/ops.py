"""Images/s of jcv.ops next to OpenCV and scikit-image doing the same work, in the same run.

For each operation and image size (default 256x256 and 1024x1024 RGB, batch 16):

* ``jcv``: the jcv.ops function ``jax.jit``-compiled over the whole float32 batch
  [16, S, S, 3] (compilation excluded: warm-up first);
* ``opencv``: the matching cv2 call in a Python loop over the 16 images (float32 where OpenCV
  supports it, uint8 where it requires it: equalizeHist, CLAHE, Canny);
* ``skimage``: the scikit-image equivalent, where there is one (looped the same way; slow ones
  are timed on fewer images and scaled, see ``--skimage-images``).

Timings are medians of interleaved rounds (jcv, opencv, skimage, jcv, ...) so load from other
processes hits all of them alike. Writes ``<out>.json`` (numbers + machine + load) and
``<out>.md`` (the table), and prints the jcv/OpenCV ratio per operation (> 1: jcv faster).

  python benchmarks/ops.py                 # full run (a few minutes on 2 CPU cores)
  python benchmarks/ops.py --quick         # 64 and 128 px, batch 4: a smoke run in seconds
  python benchmarks/ops.py --ops gaussian_blur,canny --sizes 512
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import interleaved_times, machine_info, median, write_json  # noqa: E402
from jcv import ops  # noqa: E402

__all__ = ["CASES", "Case", "main"]


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked operation: the jcv function and its peers on the same input."""
  name: str
  jcv: Callable  # float32 batch [B, S, S, C] -> array(s)
  opencv: Callable | None  # one image (float32 HWC, or uint8 per `peer_input`) -> array
  skimage: Callable | None = None
  peer_input: str = "float"  # "float", "uint8" or "gray_uint8"
  jcv_input: str = "rgb"  # "rgb" or "gray"


def _sk():
  from skimage import color, exposure, feature, filters, transform  # noqa: F401
  import skimage
  return skimage


def _per_channel(fn):
  return lambda img: np.stack([fn(np.ascontiguousarray(img[..., c])) for c in range(img.shape[-1])], -1)


_CLAHE = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
_EMBOSS = np.array([[-2, -1, 0, 0, 0], [-1, -1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1],
                    [0, 0, 0, 1, 2]], np.float32)


def _sk_unsharp(img):
  sk = _sk()
  return np.stack([sk.filters.unsharp_mask(img[..., c], radius=2.0, amount=1.0) for c in range(3)], -1)


CASES = [
    Case("rgb_to_grayscale", ops.rgb_to_grayscale, lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2GRAY),
         lambda x: _sk().color.rgb2gray(x)),
    Case("rgb_to_hsv", ops.rgb_to_hsv, lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2HSV),
         lambda x: _sk().color.rgb2hsv(x)),
    Case("rgb_to_lab", ops.rgb_to_lab, lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2Lab),
         lambda x: _sk().color.rgb2lab(x)),
    Case("rgb_to_ycbcr", ops.rgb_to_ycbcr, lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2YCrCb)),
    Case("adjust_gamma", functools.partial(ops.adjust_gamma, gamma=0.5), lambda x: cv2.pow(x, 0.5),
         lambda x: _sk().exposure.adjust_gamma(x, 0.5)),
    Case("equalize_histogram", ops.equalize_histogram, _per_channel(cv2.equalizeHist),
         _per_channel(lambda x: _sk().exposure.equalize_hist(x)), peer_input="uint8"),
    Case("clahe", ops.clahe, _per_channel(_CLAHE.apply), None, peer_input="uint8"),
    Case("convolve_5x5", lambda x: ops.convolve(x, _EMBOSS),
         lambda x: cv2.filter2D(x, -1, _EMBOSS[::-1, ::-1].copy())),
    Case("box_blur_5", functools.partial(ops.box_blur, kernel_size=5), lambda x: cv2.blur(x, (5, 5))),
    Case("gaussian_blur_s2", functools.partial(ops.gaussian_blur, sigma=2.0),
         lambda x: cv2.GaussianBlur(x, (0, 0), 2.0),
         lambda x: _sk().filters.gaussian(x, sigma=2.0, truncate=4.0, channel_axis=-1)),
    Case("median_blur_5", functools.partial(ops.median_blur, kernel_size=5), lambda x: cv2.medianBlur(x, 5)),
    Case("bilateral_5", functools.partial(ops.bilateral_filter, kernel_size=5, sigma_color=0.1, sigma_space=2.0),
         lambda x: cv2.bilateralFilter(x, 5, 0.1, 2.0)),
    Case("sobel", ops.sobel, lambda x: (cv2.Sobel(x, cv2.CV_32F, 1, 0), cv2.Sobel(x, cv2.CV_32F, 0, 1))),
    Case("laplacian", ops.laplacian, lambda x: cv2.Laplacian(x, cv2.CV_32F)),
    Case("unsharp_mask", functools.partial(ops.unsharp_mask, sigma=2.0, amount=1.0),
         lambda x: np.clip(cv2.addWeighted(x, 2.0, cv2.GaussianBlur(x, (0, 0), 2.0), -1.0, 0), 0, 1),
         _sk_unsharp),
    Case("canny", functools.partial(ops.canny, low_threshold=50 / 255, high_threshold=150 / 255, sigma=0),
         lambda x: cv2.Canny(x, 50, 150), lambda x: _sk().feature.canny(x, sigma=0.0),
         peer_input="gray_uint8", jcv_input="gray"),
    Case("resize_half", lambda x: ops.resize(x, height=x.shape[1] // 2, width=x.shape[2] // 2),
         lambda x: cv2.resize(x, (x.shape[1] // 2, x.shape[0] // 2), interpolation=cv2.INTER_AREA),
         lambda x: _sk().transform.resize(x, (x.shape[0] // 2, x.shape[1] // 2), order=1, anti_aliasing=True)),
    Case("rotate_20deg", functools.partial(ops.rotate, angle=np.deg2rad(20.0)),
         lambda x: cv2.warpAffine(x, cv2.getRotationMatrix2D(((x.shape[1] - 1) / 2, (x.shape[0] - 1) / 2), 20.0, 1.0),
                                  (x.shape[1], x.shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE),
         lambda x: _sk().transform.rotate(x, 20.0, order=1, mode="edge")),
]


def make_batch(size, batch):
  """[batch, size, size, 3] float32 photos: scikit-image's astronaut, resized, shifted per image."""
  from skimage import data
  base = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
  images = [np.clip(np.roll(base, 7 * i, axis=1) * (0.8 + 0.4 * i / max(batch - 1, 1)), 0, 1) for i in range(batch)]
  return np.stack(images).astype(np.float32)


def _block(out):
  return jax.block_until_ready(out)


def run(*, sizes, batch, rounds, names, use_skimage, skimage_images, budget_s):
  rows = []
  for size in sizes:
    rgb = make_batch(size, batch)
    inputs = {
        "float": list(rgb), "uint8": list(np.round(rgb * 255).astype(np.uint8)),
        "gray_uint8": [cv2.cvtColor(np.round(x * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY) for x in rgb],
    }
    gray = np.stack(inputs["gray_uint8"])[..., None].astype(np.float32) / 255
    device_rgb, device_gray = jax.device_put(rgb), jax.device_put(gray)
    for case in CASES:
      if names and case.name not in names:
        continue
      fn = jax.jit(case.jcv)
      x = device_gray if case.jcv_input == "gray" else device_rgb
      peer_in = inputs[case.peer_input]
      fns = {"jcv": lambda fn=fn, x=x: _block(fn(x))}
      counts = {"jcv": batch}
      if case.opencv is not None:
        fns["opencv"] = lambda f=case.opencv, xs=peer_in: [f(i) for i in xs]
        counts["opencv"] = batch
      if use_skimage and case.skimage is not None:
        sk_in = inputs["gray_uint8"] if case.peer_input == "gray_uint8" else inputs["float"]
        if case.peer_input == "uint8":
          sk_in = inputs["float"]
        n = min(batch, skimage_images)
        fns["skimage"] = lambda f=case.skimage, xs=sk_in[:n]: [f(i) for i in xs]
        counts["skimage"] = n
      times = interleaved_times(fns, rounds=rounds, iters_per_round=1, warmup=1, budget_s=budget_s)
      row = {"op": case.name, "size": size, "batch": batch}
      for lib, ts in times.items():
        row[f"{lib}_img_per_s"] = counts[lib] / median(ts)
        row[f"{lib}_ms_per_batch"] = 1e3 * median(ts) * batch / counts[lib]
      if "opencv_img_per_s" in row:
        row["jcv_over_opencv"] = row["jcv_img_per_s"] / row["opencv_img_per_s"]
      if "skimage_img_per_s" in row:
        row["jcv_over_skimage"] = row["jcv_img_per_s"] / row["skimage_img_per_s"]
      rows.append(row)
      print(_format_row(row), flush=True)
  return rows


def _fmt(value, digits=0):
  return "-" if value is None else f"{value:,.{digits}f}"


def _format_row(row):
  return (f"{row['op']:20s} {row['size']:5d}px  jcv {_fmt(row.get('jcv_img_per_s'), 1):>9s} img/s  "
          f"opencv {_fmt(row.get('opencv_img_per_s'), 1):>9s}  skimage {_fmt(row.get('skimage_img_per_s'), 1):>8s}  "
          f"jcv/opencv {_fmt(row.get('jcv_over_opencv'), 2):>6s}")


def markdown(rows, info):
  lines = [
      f"Machine: {info['cpu']}, {info['cpu_count']} cores, backend {info['backend']}; load average at start "
      f"{info['load_avg_1_5_15'][0]:.1f}; jax {info['jax']}, OpenCV {info['opencv']} ({info['opencv_threads']} threads), "
      f"scikit-image {info['skimage']}. Batch {rows[0]['batch'] if rows else '-'} RGB float32 images; "
      "images/s, higher is better; ratio > 1 means jcv is faster.",
      "",
      "| op | size | jcv img/s | OpenCV img/s | scikit-image img/s | jcv / OpenCV | jcv / scikit-image |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in rows:
    lines.append(
        f"| {r['op']} | {r['size']} | {_fmt(r.get('jcv_img_per_s'), 1)} | {_fmt(r.get('opencv_img_per_s'), 1)} | "
        f"{_fmt(r.get('skimage_img_per_s'), 1)} | {_fmt(r.get('jcv_over_opencv'), 2)} | "
        f"{_fmt(r.get('jcv_over_skimage'), 2)} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="operations: " + ", ".join(c.name for c in CASES))
  parser.add_argument("--sizes", default="256,1024", help="comma-separated square sizes (default 256,1024)")
  parser.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
  parser.add_argument("--budget-s", type=float, default=20.0,
                      help="stop timing an op after the round that passes this many seconds (default 20)")
  parser.add_argument("--ops", default="", help="comma-separated subset of operations (default: all)")
  parser.add_argument("--no-skimage", action="store_true", help="skip scikit-image")
  parser.add_argument("--skimage-images", type=int, default=4,
                      help="scikit-image runs on this many images of the batch, scaled to img/s (default 4)")
  parser.add_argument("--quick", action="store_true", help="smoke run: sizes 64,128, batch 4, 2 rounds")
  parser.add_argument("--out", default="benchmarks/results/ops", help="output path without extension")
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.batch, args.rounds = "64,128", 4, 2
  names = {n.strip() for n in args.ops.split(",") if n.strip()}
  unknown = names - {c.name for c in CASES}
  if unknown:
    parser.error(f"unknown operation(s) {sorted(unknown)}; choose from {[c.name for c in CASES]}")
  import skimage
  info = machine_info()
  info.update(opencv=cv2.__version__, opencv_threads=cv2.getNumThreads(), skimage=skimage.__version__)
  rows = run(sizes=[int(s) for s in args.sizes.split(",")], batch=args.batch, rounds=args.rounds,
             names=names, use_skimage=not args.no_skimage, skimage_images=args.skimage_images,
             budget_s=args.budget_s)
  info["load_avg_end"] = list(os.getloadavg())
  write_json(args.out + ".json", {"machine": info, "args": vars(args), "results": rows})
  table = markdown(rows, info)
  with open(args.out + ".md", "w") as f:
    f.write(table)
  print("\njcv / OpenCV images/s ratio (> 1: jcv faster):")
  for r in rows:
    if "jcv_over_opencv" in r:
      print(f"  {r['op']:20s} {r['size']:5d}px  {r['jcv_over_opencv']:6.2f}")
  print(f"\nwrote {args.out}.json and {args.out}.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
