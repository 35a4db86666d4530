"""Decoding one image into a fixed-size uint8 array, and the worker loop that does it for the
streaming loader. Imports only numpy and Pillow, so a spawned worker starts in a fraction of a
second (no torch, no MPI): the training process has MPI running and must not fork."""

from __future__ import annotations

import math
import queue
import signal
import warnings

import numpy as np

SCALE = (0.08, 1.0)  # random-resized crop: the fraction of the image area kept
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))  # and the range of its aspect ratio


class DecodeError(Exception):
    """An image that cannot be read; carries the path so the main process can name it."""


def crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of a random-resized crop: the usual 10 tries at a
    random area and aspect ratio, then the centre crop clamped to the ratio range."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        ratio = math.exp(rng.uniform(*LOG_RATIO))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        w, h = int(round(height * (4 / 3))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_box(width: int, height: int, crop: int, resize: int) -> tuple[float, float, float, float]:
    """The centre `crop` of the image resized to shorter side `resize`, in original coordinates:
    one resize of this box gives exactly what resize-then-crop gives, without resizing the
    pixels the crop throws away."""
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    sx, sy = new_w / width, new_h / height
    left, top = int(round((new_w - crop) / 2)), int(round((new_h - crop) / 2))
    return left / sx, top / sy, (left + crop) / sx, (top + crop) / sy


def plan(width: int, height: int, crop: int, resize: int, key) -> tuple[tuple, bool]:
    """(box in original pixels, flip): a random-resized crop and flip drawn from `key`
    (training), or the centre crop after resizing the shorter side to `resize` (key None)."""
    if key is None:
        return eval_box(width, height, crop, resize), False
    rng = np.random.default_rng(key)
    left, top, w, h = crop_box(width, height, rng)
    return (left, top, left + w, top + h), bool(rng.random() < 0.5)


def decode(path: str, crop: int, resize: int, key: tuple[int, ...] | None) -> np.ndarray:
    """The image at `path` as a (crop, crop, 3) uint8 array, transformed as `plan` says."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            box, flip = plan(*img.size, crop, resize, key)
            scale = draft(img, box, crop)
            img = to_rgb(img)
            out = img.resize((crop, crop), Image.BILINEAR, box=tuple(v / scale for v in box))
    except Exception as e:  # Pillow raises many types for a damaged file
        raise DecodeError(path, " ".join(f"{type(e).__name__}: {e}".split())) from None
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def draft(img, box, crop: int) -> int:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (much faster for large photographs) when
    the crop box still keeps at least `crop` pixels each way; returns the scale used."""
    if img.format != "JPEG":
        return 1
    width, height = img.size
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    # Pillow picks the largest power of two <= min(width // want_w, height // want_h)
    want = (math.ceil(width * crop / box_w), math.ceil(height * crop / box_h))
    if img.draft("RGB", want) is None:
        return 1
    return img.decoderconfig[0] if img.decoderconfig else 1


def to_rgb(img):
    """Greyscale, CMYK, palette, RGBA and 16-bit images as 8-bit RGB."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit greyscale PNG
        grey = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    with warnings.catch_warnings():  # "palette images with transparency..." is not a problem here
        warnings.simplefilter("ignore")
        return img.convert("RGB")


def decode_chunk(paths, keys, crop: int, resize: int) -> np.ndarray:
    """Several images as one (n, crop, crop, 3) array (one message, one copy)."""
    out = np.empty((len(paths), crop, crop, 3), dtype=np.uint8)
    for i, (path, key) in enumerate(zip(paths, keys)):
        out[i] = decode(path, crop, resize, key)
    return out


def serve(tasks, results) -> None:
    """Worker loop: (ticket, chunk, paths, keys, crop, resize) in, (ticket, chunk, array or
    error) out. Ends on None, or when the parent process is gone (killed by MPI, say)."""
    import multiprocessing

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    warnings.filterwarnings("ignore", module="PIL")  # corrupt EXIF and the like: the pixels still decode
    results.cancel_join_thread()  # at exit, never wait for a parent that no longer reads
    parent = multiprocessing.parent_process()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        if task is None:
            return
        ticket, chunk, paths, keys, crop, resize = task
        try:
            results.put((ticket, chunk, decode_chunk(paths, keys, crop, resize)))
        except DecodeError as e:
            results.put((ticket, chunk, ("error", *e.args)))
