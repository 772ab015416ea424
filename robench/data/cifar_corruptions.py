"""The ``cifar-c`` protocol: the 19 corruptions with the constants of CIFAR-10-C.

D. Hendrycks and T. Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019, made CIFAR-10-C with ``make_cifar_c.py`` (github.com/hendrycks/
robustness, ``ImageNet-C/create_c/make_cifar_c.py``): the same 19 corruption functions as
ImageNet-C, with per-severity constants chosen for 32x32 images. ``imagecorruptions`` ships only
the ImageNet-C constants, written inside each function, so every corruption is written out here
with the table :data:`CIFAR_C`. What is shared with ImageNet-C is taken from the patched
``imagecorruptions`` module (``ic``, see :func:`robench.data.corruptions.load_module`): the
plasma fractal (fog), the clipped zoom (zoom_blur, snow), the disk kernel (defocus_blur), the
motion-blur kernel (motion_blur, snow), the frost photos, the seeded salt-and-pepper noise
(impulse_noise), scikit-image's Gaussian filter and the fast glass blur.

Where make_cifar_c.py differs from imagecorruptions beyond the constants, this module follows
make_cifar_c.py, and says so at the function: frost rescales the photo by 0.2 and crops 32x32,
pixelate upsamples with a box filter, elastic_transform has a random affine step and other
parameters, zoom_blur and snow trim the zoomed image around its centre, snow quantises its layer
to 8 bits before blurring it.

One thing cannot follow it: make_cifar_c.py blurred with ImageMagick's ``MotionBlurImage``
(through Wand), which robench does not depend on. motion_blur and snow use imagecorruptions'
numpy re-implementation of that kernel (width ``2 * radius + 1``, Gaussian weights of ``sigma``
along a line at the drawn angle) with the CIFAR-10-C radius and sigma.

Every function takes ``(ic, image: PIL RGB 32x32, severity)``, draws only from ``np.random``'s
global state (seeded per image by :func:`robench.data.corruptions.corrupt`), in the order
make_cifar_c.py draws, and returns floats in [0, 255] (or a PIL image), which ``corrupt``
truncates to uint8 as make_cifar_c.py's ``np.uint8(...)`` did.
"""

from __future__ import annotations

import functools
import io
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import map_coordinates

from robench.data.corruptions import frost_path, frost_photo, glass_blur_with

#: The image side make_cifar_c.py is written for (``IMSIZE``).
IMSIZE = 32

#: Per-severity constants (severity 1..5) of make_cifar_c.py, one entry per corruption.
#: Each value's meaning is given in the docstring of the function that uses it.
CIFAR_C: dict[str, tuple[Any, ...]] = {
    # std of additive Gaussian noise on [0, 1] pixels
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    # photons per unit intensity of the Poisson draw
    "shot_noise": (500, 250, 100, 75, 50),
    # fraction of values replaced by salt or pepper
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    # (disk radius, anti-alias sigma)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    # (Gaussian sigma, max pixel displacement, iterations)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    # (kernel radius, kernel sigma)
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    # zoom factors np.arange(1, stop, step): (stop, step)
    "zoom_blur": ((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),
    # (layer mean, layer std, zoom, threshold, blur radius, blur sigma, image weight)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95),
             (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    # (image weight, frost weight)
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    # (fog strength, plasma wibble decay)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    # added to the HSV value
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    # factor on the deviation from the per-channel mean
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # (alpha, sigma, affine shift) as fractions of IMSIZE (make_cifar_c.py writes IMSIZE * f)
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    # downscale factor before the box-filter round trip
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    # JPEG quality
    "jpeg_compression": (80, 65, 58, 50, 40),
    # std of the multiplicative Gaussian noise
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    # Gaussian sigma in pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    # (layer mean, layer std, layer sigma, threshold, intensity or mud sigma, mud?)
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0),
                (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    # (saturation factor, saturation offset)
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}


def backend(ic: types.ModuleType) -> dict[str, Callable[..., Any]]:
    """name -> ``f(image, severity)`` for all 19 corruptions, bound to the patched ``ic``."""
    return {name: functools.partial(fn, ic) for name, fn in _FUNCTIONS.items()}


def constants(name: str, severity: int) -> Any:
    """The constants of corruption ``name`` at ``severity`` (1..5)."""
    return CIFAR_C[name][severity - 1]


def _unit(x: Image.Image) -> np.ndarray:
    """Pixels as float64 in [0, 1]."""
    return np.asarray(x) / 255.0


def _to_255(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 1) * 255


# -- noise -------------------------------------------------------------------------------------


def gaussian_noise(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """``clip(x + N(0, c^2), 0, 1)`` per value, x in [0, 1]."""
    c = constants("gaussian_noise", severity)
    x = _unit(x)
    return _to_255(x + np.random.normal(size=x.shape, scale=c))


def shot_noise(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """``clip(Poisson(c * x) / c, 0, 1)``: photon noise with c photons at full intensity."""
    c = constants("shot_noise", severity)
    return _to_255(np.random.poisson(_unit(x) * c) / c)


def impulse_noise(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """Salt and pepper: a fraction c of the values set to 0 or 1 (scikit-image's
    ``random_noise(mode='s&p')``, seeded from np.random through the shim)."""
    c = constants("impulse_noise", severity)
    return _to_255(ic.sk.util.random_noise(_unit(x), mode="s&p", amount=c))


def speckle_noise(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """``clip(x + x * N(0, c^2), 0, 1)``: multiplicative noise."""
    c = constants("speckle_noise", severity)
    x = _unit(x)
    return _to_255(x + x * np.random.normal(size=x.shape, scale=c))


# -- blur --------------------------------------------------------------------------------------


def gaussian_blur(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """Gaussian filter of sigma c pixels per channel (scikit-image)."""
    c = constants("gaussian_blur", severity)
    return _to_255(ic.gaussian(_unit(x), sigma=c, multichannel=True))


def glass_blur(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """Blur, locally shuffle pixels by at most ``delta``, blur again (shared implementation)."""
    sigma, delta, iterations = constants("glass_blur", severity)
    return glass_blur_with(ic, x, sigma, delta, iterations)


def defocus_blur(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """Each channel convolved with an anti-aliased disk of the given radius (``ic.disk``)."""
    import cv2

    radius, alias_blur = constants("defocus_blur", severity)
    x = _unit(x)
    kernel = ic.disk(radius=radius, alias_blur=alias_blur)
    channels = [cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)]
    return _to_255(np.stack(channels, axis=-1))


def motion_blur(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """Motion blur at an angle drawn from U(-45, 45) degrees. make_cifar_c.py used ImageMagick;
    this is imagecorruptions' numpy kernel with the same radius and sigma (module docstring)."""
    radius, sigma = constants("motion_blur", severity)
    angle = np.random.uniform(-45, 45)
    return np.clip(ic._motion_blur(np.array(x), radius=radius, sigma=sigma, angle=angle), 0, 255)


def _centre_zoom(ic: types.ModuleType, img: np.ndarray, factor: float) -> np.ndarray:
    """``ic.clipped_zoom`` (crop the central ``ceil(side / factor)``, zoom by ``factor``), then
    trim the result to the input size around its centre, as make_cifar_c.py's clipped_zoom
    does (imagecorruptions trims from the top-left corner instead)."""
    h, w = img.shape[:2]
    out = ic.clipped_zoom(img, factor)
    top, left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[top:top + h, left:left + w]


def zoom_blur(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """Mean of the image and its centre zooms by each factor of ``np.arange(1, stop, step)``."""
    stop, step = constants("zoom_blur", severity)
    factors = np.arange(1, stop, step)
    x = _unit(x).astype(np.float32)
    out = np.zeros_like(x)
    for factor in factors:
        out += _centre_zoom(ic, x, factor)
    return _to_255((x + out) / (len(factors) + 1))


# -- weather -----------------------------------------------------------------------------------


def snow(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """A thresholded, zoomed Gaussian layer, motion-blurred at U(-135, -45) degrees, added to a
    brightened image twice (the layer and its 180-degree rotation).

    make_cifar_c.py stored the layer as an 8-bit PNG for ImageMagick (values truncated to
    uint8) and read the blurred result back as uint8; both quantisations are kept here around
    imagecorruptions' numpy motion-blur kernel.
    """
    import cv2

    mean, std, zoom, threshold, radius, sigma, weight = constants("snow", severity)
    x = np.asarray(x, dtype=np.float32) / 255.0
    layer = np.random.normal(size=x.shape[:2], loc=mean, scale=std)
    layer = _centre_zoom(ic, layer[..., np.newaxis], zoom)
    layer[layer < threshold] = 0
    layer8 = (np.clip(layer.squeeze(), 0, 1) * 255).astype(np.uint8)
    blurred = ic._motion_blur(layer8, radius=radius, sigma=sigma,
                              angle=np.random.uniform(-135, -45))
    layer = (np.clip(np.round(blurred), 0, 255) / 255.0)[..., np.newaxis]
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., np.newaxis]
    x = weight * x + (1 - weight) * np.maximum(x, grey * 1.5 + 0.5)
    return _to_255(x + layer + np.rot90(layer, k=2))


@functools.lru_cache(maxsize=8)
def _small_frost(path: str) -> np.ndarray:
    """A frost photo scaled by 0.2 (cv2's default bilinear), as make_cifar_c.py does before
    cropping 32x32 from it (imagecorruptions instead scales the photo to the image's size)."""
    import cv2

    out = cv2.resize(frost_photo(path), (0, 0), fx=0.2, fy=0.2)
    out.setflags(write=False)
    return out


def frost(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """``clip(a * x + b * frost crop, 0, 255)``: one of the first five frost photos (index drawn
    from randint(5)), scaled by 0.2, a random 32x32 crop (origin from randint)."""
    a, b = constants("frost", severity)
    photo = _small_frost(frost_path(ic, np.random.randint(5)))
    h, w = np.asarray(x).shape[:2]
    top = np.random.randint(0, photo.shape[0] - h)
    left = np.random.randint(0, photo.shape[1] - w)
    crop = photo[top:top + h, left:left + w][..., [2, 1, 0]]  # BGR -> RGB
    return np.clip(a * np.asarray(x) + b * crop, 0, 255)


def fog(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """``clip((x + s * plasma) * max(x) / (max(x) + s), 0, 1)`` with a 32x32 plasma fractal of
    the given wibble decay (``ic.plasma_fractal``)."""
    strength, decay = constants("fog", severity)
    x = _unit(x)
    peak = x.max()
    x = x + strength * ic.plasma_fractal(mapsize=IMSIZE, wibbledecay=decay)[:IMSIZE, :IMSIZE,
                                                                          np.newaxis]
    return _to_255(x * peak / (peak + strength))


def brightness(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """HSV value ``V -> min(V + c, 1)``; hue and saturation unchanged."""
    from skimage import color

    c = constants("brightness", severity)
    hsv = color.rgb2hsv(_unit(x))
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
    return _to_255(color.hsv2rgb(hsv))


def saturate(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """HSV saturation ``S -> clip(S * a + b, 0, 1)``."""
    from skimage import color

    a, b = constants("saturate", severity)
    hsv = color.rgb2hsv(_unit(x))
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * a + b, 0, 1)
    return _to_255(color.hsv2rgb(hsv))


def spatter(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """A thresholded, smoothed Gaussian liquid layer: water (severities 1-3, a pale turquoise
    sheen shaped by edge distances) or mud (4-5, brown blots)."""
    mean, std, sigma, threshold, intensity, mud = constants("spatter", severity)
    x = np.asarray(x, dtype=np.float32) / 255.0
    liquid = np.random.normal(size=x.shape[:2], loc=mean, scale=std)
    liquid = ic.gaussian(liquid, sigma=sigma)
    liquid[liquid < threshold] = 0
    if mud:
        return _mud(ic, x, liquid, threshold, intensity)
    return _water(x, liquid, intensity)


def _water(x: np.ndarray, liquid: np.ndarray, intensity: float) -> np.ndarray:
    import cv2

    layer = (liquid * 255).astype(np.uint8)
    dist = cv2.distanceTransform(255 - cv2.Canny(layer, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
    dist = cv2.blur(dist, (3, 3)).astype(np.float32)
    m = cv2.cvtColor(layer * dist, cv2.COLOR_GRAY2BGRA)
    # An empty layer makes this 0/0 (as in the imagenet-c protocol, see
    # corruptions._spatter_without_nan): the NaN becomes 0 explicitly, as np.uint8(NaN) does
    # on x86, instead of an undefined cast.
    with np.errstate(invalid="ignore", divide="ignore"):
        m = m / np.max(m, axis=(0, 1)) * intensity
    ones = np.ones_like(m[..., :1])
    sheen = cv2.cvtColor(np.concatenate([v / 255.0 * ones for v in (175, 238, 238)], axis=2),
                         cv2.COLOR_BGR2BGRA)
    out = cv2.cvtColor(np.clip(cv2.cvtColor(x, cv2.COLOR_BGR2BGRA) + m * sheen, 0, 1),
                       cv2.COLOR_BGRA2BGR) * 255
    return np.nan_to_num(out, nan=0.0)


def _mud(ic: types.ModuleType, x: np.ndarray, liquid: np.ndarray, threshold: float,
         sigma: float) -> np.ndarray:
    m = ic.gaussian(np.where(liquid > threshold, 1, 0).astype(np.float32), sigma=sigma)
    m[m < 0.8] = 0
    ones = np.ones_like(x[..., :1])
    brown = np.concatenate([v / 255.0 * ones for v in (63, 42, 20)], axis=2)
    brown *= m[..., np.newaxis]
    x *= 1 - m[..., np.newaxis]  # in place: x stays float32, as in make_cifar_c.py
    return _to_255(x + brown)


# -- digital -----------------------------------------------------------------------------------


def contrast(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """``clip((x - mean) * c + mean, 0, 1)`` with the per-channel mean over the image."""
    c = constants("contrast", severity)
    x = _unit(x)
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return _to_255((x - means) * c + means)


def elastic_transform(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """A random affine warp (the three points at the centre +- side // 3 moved by
    U(-affine, affine)), then a displacement field ``alpha * gaussian(U(-1, 1), sigma)`` per
    axis, resampled bilinearly with reflection. imagecorruptions has no affine step and other
    parameters (alpha, sigma, affine = IMSIZE * the table's fractions)."""
    import cv2

    alpha, sigma, affine = (IMSIZE * f for f in constants("elastic_transform", severity))
    image = np.asarray(x, dtype=np.float32) / 255.0
    shape = image.shape
    size = shape[:2]
    centre = np.float32(size) // 2
    third = min(size) // 3
    src = np.float32([centre + third, [centre[0] + third, centre[1] - third], centre - third])
    dst = src + np.random.uniform(-affine, affine, size=src.shape).astype(np.float32)
    image = cv2.warpAffine(image, cv2.getAffineTransform(src, dst), size[::-1],
                           borderMode=cv2.BORDER_REFLECT_101)
    dx, dy = ((ic.gaussian(np.random.uniform(-1, 1, size=size), sigma, mode="reflect",
                           truncate=3) * alpha).astype(np.float32)[..., np.newaxis]
              for _ in range(2))
    rows, cols, chans = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]),
                                    np.arange(shape[2]), indexing="ij")
    coords = np.array([(rows + dy).ravel(), (cols + dx).ravel(), chans.ravel()])
    warped = map_coordinates(image, coords, order=1, mode="reflect").reshape(shape)
    return _to_255(warped)


def pixelate(ic: types.ModuleType, x: Image.Image, severity: int) -> Image.Image:
    """Box-filter down to ``int(side * c)``, box-filter back up (imagecorruptions upsamples with
    nearest neighbour instead)."""
    c = constants("pixelate", severity)
    w, h = x.size
    box = Image.Resampling.BOX
    return x.resize((int(w * c), int(h * c)), box).resize((w, h), box)


def jpeg_compression(ic: types.ModuleType, x: Image.Image, severity: int) -> np.ndarray:
    """Encode as JPEG at quality c with PIL, decode."""
    buf = io.BytesIO()
    x.save(buf, "JPEG", quality=constants("jpeg_compression", severity))
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur,
    "zoom_blur": zoom_blur, "snow": snow, "frost": frost, "fog": fog, "brightness": brightness,
    "contrast": contrast, "elastic_transform": elastic_transform, "pixelate": pixelate,
    "jpeg_compression": jpeg_compression, "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur, "spatter": spatter, "saturate": saturate,
}
