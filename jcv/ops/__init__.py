"""jcv.ops: image processing as pure JAX functions.

Images are float arrays in [0, 1], channel-last ``[..., H, W, C]`` with any leading batch
dimensions. Every function is usable under ``jit`` and ``vmap``, and under ``grad`` where
the maths allows (colour spaces, adjustments, linear filters, bilateral and median filters;
not the quantised histogram equalisation nor the binary Canny mask). dm-pix is used where it
already has the operation. Options are keyword-only; bad input raises ``ValueError``.

Modules: `color` (colour spaces), `adjust` (colour processing), `histograms` (histograms,
equalisation, CLAHE), `filters` (convolution, blurs, derivatives, sharpening), `edges`
(Canny), `geometry` (resize, crop, flip, rotate, affine warps).
"""
from jcv.ops.adjust import adjust_brightness
from jcv.ops.adjust import adjust_contrast
from jcv.ops.adjust import adjust_gamma
from jcv.ops.adjust import adjust_hue
from jcv.ops.adjust import adjust_saturation
from jcv.ops.adjust import auto_contrast
from jcv.ops.adjust import gray_world_balance
from jcv.ops.color import grayscale_to_rgb
from jcv.ops.color import hls_to_rgb
from jcv.ops.color import hsv_to_rgb
from jcv.ops.color import lab_to_rgb
from jcv.ops.color import rgb_to_grayscale
from jcv.ops.color import rgb_to_hls
from jcv.ops.color import rgb_to_hsv
from jcv.ops.color import rgb_to_lab
from jcv.ops.color import rgb_to_xyz
from jcv.ops.color import rgb_to_ycbcr
from jcv.ops.color import xyz_to_rgb
from jcv.ops.color import ycbcr_to_rgb
from jcv.ops.edges import canny
from jcv.ops.filters import bilateral_filter
from jcv.ops.filters import box_blur
from jcv.ops.filters import convolve
from jcv.ops.filters import gaussian_blur
from jcv.ops.filters import gaussian_kernel
from jcv.ops.filters import laplacian
from jcv.ops.filters import median_blur
from jcv.ops.filters import sobel
from jcv.ops.filters import unsharp_mask
from jcv.ops.geometry import affine_transform
from jcv.ops.geometry import center_crop
from jcv.ops.geometry import crop
from jcv.ops.geometry import flip_left_right
from jcv.ops.geometry import flip_up_down
from jcv.ops.geometry import resize
from jcv.ops.geometry import rot90
from jcv.ops.geometry import rotate
from jcv.ops.histograms import clahe
from jcv.ops.histograms import equalize_histogram
from jcv.ops.histograms import histogram

__all__ = [
    # colour spaces
    "rgb_to_grayscale", "grayscale_to_rgb", "rgb_to_hsv", "hsv_to_rgb", "rgb_to_hls",
    "hls_to_rgb", "rgb_to_ycbcr", "ycbcr_to_rgb", "rgb_to_xyz", "xyz_to_rgb", "rgb_to_lab",
    "lab_to_rgb",
    # colour processing
    "adjust_brightness", "adjust_contrast", "adjust_gamma", "adjust_saturation", "adjust_hue",
    "auto_contrast", "gray_world_balance", "histogram", "equalize_histogram", "clahe",
    # filtering
    "convolve", "box_blur", "gaussian_blur", "gaussian_kernel", "median_blur",
    "bilateral_filter", "sobel", "laplacian", "unsharp_mask", "canny",
    # geometry
    "resize", "crop", "center_crop", "flip_left_right", "flip_up_down", "rot90", "rotate",
    "affine_transform",
]
