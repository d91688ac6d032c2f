"""Apply jcv.ops image-processing operations to a photo and plot every result with its histogram.

Runs with no arguments (scikit-image's bundled astronaut photo, every operation), in about
half a minute on a 2-core CPU (mostly XLA compilation, one per operation):

  python experiments/image_ops.py                       # -> runs/image_ops/
  python experiments/image_ops.py --image cat.jpg --ops gaussian_blur,canny,clahe --out /tmp/ops
  python experiments/image_ops.py --list                 # names and what each one does

Writes to --out: one PNG per operation (<name>.png), figure.png (the original and each result,
with their per-channel histograms underneath) and summary.json (parameters, value ranges,
colour-space round-trip errors).
"""
import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jcv import ops, plots


def _gray(x):
  return ops.rgb_to_grayscale(x)


def _luma_only(fn):
  """Applies a one-channel op to the Y of YCbCr and converts back, so colours keep their hue."""
  def apply(x):
    ycbcr = ops.rgb_to_ycbcr(x)
    y = fn(ycbcr[..., :1])
    return jnp.clip(ops.ycbcr_to_rgb(jnp.concatenate([y, ycbcr[..., 1:]], axis=-1)), 0, 1)
  return apply


def _magnitude(pair):
  dx, dy = pair
  return jnp.sqrt(dx * dx + dy * dy)


# name -> (what it shows, function of a float RGB image [H, W, 3] -> image [H, W, 1 or 3]).
OPERATIONS = {
    "grayscale": ("BT.601 luma", _gray),
    "hsv_hue": ("hue of HSV (turns)", lambda x: ops.rgb_to_hsv(x)[..., :1]),
    "hls_lightness": ("lightness of HLS", lambda x: ops.rgb_to_hls(x)[..., 1:2]),
    "ycbcr_cr": ("Cr of YCbCr (red-difference chroma)", lambda x: ops.rgb_to_ycbcr(x)[..., 2:]),
    "xyz_y": ("Y of CIE XYZ (relative luminance)", lambda x: ops.rgb_to_xyz(x)[..., 1:2]),
    "lab_l": ("L* of CIE Lab / 100", lambda x: ops.rgb_to_lab(x)[..., :1] / 100),
    "brightness": ("adjust_brightness +0.15 (clipped)",
                   lambda x: jnp.clip(ops.adjust_brightness(x, delta=0.15), 0, 1)),
    "contrast": ("adjust_contrast x1.6 (clipped)",
                 lambda x: jnp.clip(ops.adjust_contrast(x, factor=1.6), 0, 1)),
    "gamma": ("adjust_gamma 0.5", lambda x: ops.adjust_gamma(x, gamma=0.5)),
    "saturation": ("adjust_saturation x2", lambda x: ops.adjust_saturation(x, factor=2.0)),
    "hue": ("adjust_hue +1/3 turn", lambda x: ops.adjust_hue(x, delta=1 / 3)),
    "auto_contrast": ("auto_contrast per channel", ops.auto_contrast),
    "gray_world": ("gray_world_balance", ops.gray_world_balance),
    "equalize": ("equalize_histogram on luma", _luma_only(ops.equalize_histogram)),
    "clahe": ("clahe (clip 2, 8x8 tiles) on luma", _luma_only(ops.clahe)),
    "convolve": ("convolve with a 5x5 emboss kernel",
                 lambda x: jnp.clip(ops.convolve(x, np.array(
                     [[-2, -1, 0, 0, 0], [-1, -1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1],
                      [0, 0, 0, 1, 2]], np.float32)) * 0.5 + 0.25, 0, 1)),
    "box_blur": ("box_blur 7x7", lambda x: ops.box_blur(x, kernel_size=7)),
    "gaussian_blur": ("gaussian_blur sigma 2", lambda x: ops.gaussian_blur(x, sigma=2.0)),
    "median_blur": ("median_blur 5x5", lambda x: ops.median_blur(x, kernel_size=5)),
    "bilateral": ("bilateral_filter 9, sigma_color 0.1, sigma_space 4",
                  lambda x: ops.bilateral_filter(x, kernel_size=9, sigma_color=0.1, sigma_space=4.0)),
    "unsharp_mask": ("unsharp_mask sigma 2, amount 1.5",
                     lambda x: ops.unsharp_mask(x, sigma=2.0, amount=1.5)),
    "sobel": ("|sobel| gradient magnitude of luma / 4",
              lambda x: jnp.clip(_magnitude(ops.sobel(_gray(x))) / 4, 0, 1)),
    "laplacian": ("|laplacian| of blurred luma x4",
                  lambda x: jnp.clip(jnp.abs(ops.laplacian(ops.gaussian_blur(_gray(x), sigma=1.0))) * 4, 0, 1)),
    "canny": ("canny edges (sigma 1.5, thresholds 0.15 / 0.4)",
              lambda x: ops.canny(x, low_threshold=0.15, high_threshold=0.4, sigma=1.5)),
    "rotate": ("rotate 20 degrees", lambda x: ops.rotate(x, angle=np.deg2rad(20.0))),
    "flip": ("flip_left_right", ops.flip_left_right),
    "resize": ("resize to 1/4 and back (antialiased)",
               lambda x: ops.resize(ops.resize(x, height=x.shape[0] // 4, width=x.shape[1] // 4),
                                    height=x.shape[0], width=x.shape[1])),
}

ROUND_TRIPS = {
    "hsv": (ops.rgb_to_hsv, ops.hsv_to_rgb), "hls": (ops.rgb_to_hls, ops.hls_to_rgb),
    "ycbcr": (ops.rgb_to_ycbcr, ops.ycbcr_to_rgb), "xyz": (ops.rgb_to_xyz, ops.xyz_to_rgb),
    "lab": (ops.rgb_to_lab, ops.lab_to_rgb), "gray": (ops.rgb_to_grayscale, ops.grayscale_to_rgb),
}


def load_image(path, sample, size):
  """Float RGB [H, W, 3] in [0, 1] from a file or a scikit-image sample, long side resized to size."""
  if path:
    from PIL import Image
    try:
      rgb = np.asarray(Image.open(path).convert("RGB"))
    except (FileNotFoundError, OSError) as error:
      sys.exit(f"cannot read image {path!r}: {error}")
  else:
    from skimage import data
    rgb = getattr(data, sample)()
  image = jnp.asarray(rgb, jnp.float32) / 255.0
  if size and max(image.shape[:2]) != size:
    scale = size / max(image.shape[:2])
    image = ops.resize(image, height=max(1, round(image.shape[0] * scale)),
                       width=max(1, round(image.shape[1] * scale)))
  return jnp.clip(image, 0, 1)


def save_png(path, image):
  from PIL import Image
  array = np.asarray(np.round(np.clip(image, 0, 1) * 255), np.uint8)
  Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Apply jcv.ops operations to an image; write each result, a figure of all "
                  "results with their histograms, and summary.json.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="operations:\n" + "\n".join(f"  {n:14s} {d}" for n, (d, _) in OPERATIONS.items()))
  parser.add_argument("--image", help="image file to process (default: a scikit-image sample photo)")
  parser.add_argument("--sample", default="astronaut", choices=["astronaut", "coffee", "chelsea"],
                      help="scikit-image sample used when --image is not given (default: astronaut)")
  parser.add_argument("--ops", default="all",
                      help="comma-separated operation names, or 'all' (default); see --list")
  parser.add_argument("--size", type=int, default=256,
                      help="resize so the long side has this many pixels; 0 keeps the size (default 256)")
  parser.add_argument("--out", default="runs/image_ops", help="output folder (default runs/image_ops)")
  parser.add_argument("--columns", type=int, default=7, help="panels per figure row (default 7)")
  parser.add_argument("--list", action="store_true", help="list the operations and exit")
  args = parser.parse_args(argv)
  if args.list:
    for name, (description, _) in OPERATIONS.items():
      print(f"{name:14s} {description}")
    return 0
  names = list(OPERATIONS) if args.ops == "all" else [n.strip() for n in args.ops.split(",") if n.strip()]
  unknown = [n for n in names if n not in OPERATIONS]
  if unknown:
    parser.error(f"unknown operation(s) {unknown}; choose from {', '.join(OPERATIONS)}")

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  image = load_image(args.image, args.sample, args.size)
  histogram = jax.jit(ops.histogram)
  panels = [("original", image, np.asarray(histogram(image)))]
  summary = {"image": args.image or f"skimage.data.{args.sample}", "shape": list(image.shape),
             "device": jax.devices()[0].platform, "operations": {}}
  save_png(out / "original.png", image)
  for name in names:
    description, fn = OPERATIONS[name]
    result = jax.jit(fn)(image)
    result = jnp.asarray(result, jnp.float32)
    save_png(out / f"{name}.png", result)
    panels.append((name, result, np.asarray(histogram(jnp.clip(result, 0, 1)))))
    summary["operations"][name] = {
        "description": description, "shape": list(result.shape),
        "min": float(result.min()), "max": float(result.max()), "mean": float(result.mean())}
    print(f"{name:14s} {description:55s} -> {out / (name + '.png')}")
  summary["round_trip_max_abs_error"] = {
      space: float(jnp.abs(jax.jit(lambda x, f=f, g=g: g(f(x)))(image)
                           - (image if space != "gray" else ops.rgb_to_grayscale(image, keep_channels=True))).max())
      for space, (f, g) in ROUND_TRIPS.items()}
  plots.images_with_histograms(panels, out / "figure.png", columns=args.columns)
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  print("round trips (max |error|):", {k: f"{v:.1e}" for k, v in summary["round_trip_max_abs_error"].items()})
  print(f"figure: {out / 'figure.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
