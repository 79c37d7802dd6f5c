"""What sharded inference reads: the input list, each rank's shard, output paths, and 8-bit LR faces.

Everything here is plain PIL / NumPy, without torch: the decode worker processes (decode.PooledBatches)
import this module only, so each starts in a fraction of a second. A bad input never raises out of
this module except as `BadInputError`, whose message is the reason written to the manifest.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("gafh_fast")

PIL_DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS: ~ a 9459 x 9459 image
LIST_SUFFIXES = (".txt", ".lst", ".list")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")


class InferenceUsageError(ValueError):
    """A usage or configuration problem (bad flag combination, unusable weights): exit code 2."""


class BadInputError(Exception):
    """One input that cannot be used; str(error) is the manifest's `reason`."""


@dataclass(frozen=True)
class InputItem:
    source: str     # the file to read, as listed (folder path joined with the relative path)
    rel_stem: str   # output path relative to OUTPUT, posix separators, without the format suffix

    def output(self, out_dir: Path, suffix: str) -> Path:
        return out_dir / (self.rel_stem + suffix)


# ------------------------------------------------------------------------------------------------
# Listing and sharding
# ------------------------------------------------------------------------------------------------
def list_inputs(input_path: Path, exclude: Optional[Path] = None) -> list[InputItem]:
    """A folder (searched recursively, hidden files and `exclude` left out) or a text file of paths.

    Sorted by relative path, so every rank derives the same list. Outputs mirror the relative path
    with the suffix replaced; when two inputs would share an output (a.jpg and a.png), the one whose
    suffix is not .png keeps its full name (a.jpg -> a.jpg.png).
    """
    input_path = Path(input_path)
    if input_path.is_dir():
        pairs = _walk_folder(input_path, exclude)
    elif input_path.is_file():
        pairs = _read_path_list(input_path)
    else:
        raise InferenceUsageError(f"--input {input_path}: no such folder or file")
    return assign_output_names(pairs)


def _walk_folder(root: Path, exclude: Optional[Path]) -> list[tuple[str, str]]:
    exclude_real = os.path.realpath(exclude) if exclude is not None else None
    pairs = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # the output folder may live inside the input folder: never read our own results back
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) != exclude_real)
        for name in filenames:
            if not name.startswith("."):
                full = os.path.join(dirpath, name)
                pairs.append((full, Path(os.path.relpath(full, root)).as_posix()))
    return pairs


def _read_path_list(list_file: Path) -> list[tuple[str, str]]:
    with open(list_file, "rb") as f:
        head = f.read(8)
    if head.startswith(_IMAGE_MAGIC) or list_file.suffix.lower() not in LIST_SUFFIXES + ("",):
        raise InferenceUsageError(
            f"--input {list_file}: expected a folder or a text file of paths ({', '.join(LIST_SUFFIXES)}); "
            "to run one image, put it in a folder or list it in a text file")
    base = list_file.parent
    entries = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(os.path.normpath(line if os.path.isabs(line) else os.path.join(base, line)))
    entries = sorted(set(entries))
    if not entries:
        return []
    # outputs mirror each path relative to the deepest folder that holds every listed file
    common = os.path.commonpath([os.path.dirname(os.path.abspath(e)) for e in entries])
    return [(e, Path(os.path.relpath(os.path.abspath(e), common)).as_posix()) for e in entries]


def assign_output_names(pairs: list[tuple[str, str]]) -> list[InputItem]:
    stems: dict[str, list[str]] = {}
    for _, rel in pairs:
        stems.setdefault(os.path.splitext(rel)[0], []).append(rel)
    items = []
    for source, rel in pairs:
        stem = os.path.splitext(rel)[0]
        if len(stems[stem]) > 1 and not rel.lower().endswith(".png"):
            stem = rel
        items.append(InputItem(source, stem))
    items.sort(key=lambda it: (it.rel_stem, it.source))
    return items


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank-strided slice of the sorted list: every item belongs to exactly one rank."""
    return items[rank::world_size]


# ------------------------------------------------------------------------------------------------
# Reading one image
# ------------------------------------------------------------------------------------------------
def open_rgb(path: str, max_pixels: int) -> Image.Image:
    """Open and fully decode `path` as an 8-bit RGB PIL image, or raise BadInputError with a reason."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise BadInputError("file not found") from None
    except OSError as e:
        raise BadInputError(f"unreadable: {e.strerror or e}") from None
    if size == 0:
        raise BadInputError("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels and w * h > max_pixels:
                raise BadInputError(f"decompression bomb: {w}x{h} = {w * h} pixels > max pixels {max_pixels}")
            im.load()
            return _to_rgb(im)
    except BadInputError:
        raise
    except UnidentifiedImageError:
        raise BadInputError("not an image (PIL cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInputError(f"decompression bomb: {e}") from None
    except PermissionError as e:
        raise BadInputError(f"unreadable: {e.strerror or e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        # PIL reports truncated / corrupt data with any of these depending on the codec
        raise BadInputError(f"corrupt image: {type(e).__name__}: {e}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Grey, palette, RGBA (alpha dropped), CMYK and 16-bit images -> 8-bit RGB."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's convert clips 16-bit values at 255 (a white face); scale to 8 bits instead
        a = np.asarray(im, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def centre_square_box(w: int, h: int) -> tuple[int, int, int, int]:
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return left, top, left + s, top + s


class ResizeNotice:
    """Logs, once per process, that inputs which are not lr x lr get cropped and resized."""

    def __init__(self, lr_size: int):
        self.lr_size = lr_size
        self._lock = threading.Lock()
        self._said = False

    def __call__(self, path: str, w: int, h: int) -> None:
        if self._said:
            return
        with self._lock:
            if not self._said:
                self._said = True
                log.warning("inputs that are not %dx%d (first: %s, %dx%d) are centre-cropped to a square and "
                            "bicubic-resized (PIL BICUBIC, antialiased) to %dx%d; logged once",
                            self.lr_size, self.lr_size, path, w, h, self.lr_size, self.lr_size)


def load_lr_uint8(path: str, lr_size: int, max_pixels: int, notice: Optional[ResizeNotice] = None) -> np.ndarray:
    """One input face as (lr, lr, 3) uint8: as is when already lr x lr, else centre square + bicubic."""
    im = open_rgb(path, max_pixels)
    w, h = im.size
    if (w, h) != (lr_size, lr_size):
        if notice is not None:
            notice(path, w, h)
        im = im.crop(centre_square_box(w, h)).resize((lr_size, lr_size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# Decoders for the worker processes: picklable, installed once per worker, fed lists of paths
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LrDecoder:
    """Inference: one input face -> ((lr, lr, 3) uint8,), and its (w, h) when it had to be resized."""
    lr_size: int
    max_pixels: int

    def __call__(self, path: str) -> tuple[tuple[np.ndarray, ...], Optional[tuple[int, int]]]:
        resized: list[tuple[int, int]] = []
        lr = load_lr_uint8(path, self.lr_size, self.max_pixels, lambda _p, w, h: resized.append((w, h)))
        return (lr,), (resized[0] if resized else None)


@dataclass(frozen=True)
class PairDecoder:
    """Evaluation: an HR face -> ((lr, lr, 3), (hr, hr, 3)) uint8 by the data package's reference loader."""
    hr_size: int
    lr_size: int
    windows: dict  # path -> crop window (x, y, w, h) from the split index

    def __call__(self, path: str) -> tuple[tuple[np.ndarray, ...], None]:
        from gafh_fast.data.layouts import BadImage, Sample
        from gafh_fast.data.pil import load_pair

        try:
            hr, lr = load_pair(Sample(path, self.windows[path]), self.hr_size, self.lr_size, flip=False)
        except BadImage as e:
            raise BadInputError(str(e)) from None
        return (lr, hr), None


_worker_decoder = None


def install_decoder(decoder) -> None:
    """Pool initializer: the decoder (and its windows table) crosses to each worker once, not per task."""
    global _worker_decoder
    _worker_decoder = decoder


def decode_paths(paths: list[str]) -> list:
    """In a worker: per path, (arrays, resized_from) or the reason string of a bad input."""
    out = []
    for path in paths:
        try:
            out.append(_worker_decoder(path))
        except BadInputError as e:
            out.append(str(e))
    return out


# ------------------------------------------------------------------------------------------------
# Is an output already complete? (resume; cheap: a header and a trailer, never a full decode)
# ------------------------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def output_complete(path: Path, hr_size: int, fmt: str) -> bool:
    try:
        if fmt == "png":
            return _png_complete(path, hr_size)
        if fmt == "npy":
            return _npy_complete(path, hr_size)
    except OSError:
        return False
    return False


def _png_complete(path: Path, hr_size: int) -> bool:
    """PNG signature, IHDR of hr x hr, and the IEND chunk as the file's last 12 bytes."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
            return False
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        f.seek(-12, os.SEEK_END)
        return (width, height) == (hr_size, hr_size) and f.read(12) == _PNG_IEND


def _npy_complete(path: Path, hr_size: int) -> bool:
    """An (hr, hr, 3) uint8 .npy whose size is exactly header + data."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
        except ValueError:
            return False
        data_start = f.tell()
    expected = data_start + hr_size * hr_size * 3
    return shape == (hr_size, hr_size, 3) and dtype == np.uint8 and not fortran \
        and os.path.getsize(path) == expected
