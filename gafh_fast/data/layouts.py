"""Dataset layouts: which files make up a split, and where each one is cropped.

Three layouts (config `data.layout`), validated before anything is read:

    celeba_aligned   ROOT/img_align_celeba/*.jpg + ROOT/list_eval_partition.txt
                     crop: the centre square (178x178 at top offset 20 for CelebA's 178x218)
    celeba_wild      ROOT/img_celeba/*.jpg + ROOT/list_bbox_celeba.txt
                     (+ ROOT/list_eval_partition.txt for split `official`)
                     crop: the face box grown to a square about its centre, moved inside the image
    folder           ROOT/**/*.{jpg,jpeg,png,bmp,webp,tif,tiff}, searched recursively
                     crop: the centre square

Splits (config `data.split`):
    official  list_eval_partition.txt: 0 train, 1 val, 2 test (the folder layout has no partition
              file; for it `official` means `all`, which is said in the log)
    paper     a seeded permutation of every listed file (seed `data.seed`): the first
              n*162048//202599 train, the next n*40511//202599 test, the remainder val. On full
              CelebA (n = 202 599) that is the paper's 162 048 / 40 511, and 40 val images.
    all       every split reads every file (demo, inference on a folder).

A split is decided from the file list alone; only then are its files checked. The cheap check
(`check_image`) catches zero-byte files, non-images, JPEGs without an end-of-image marker and PNGs
without an IEND chunk; such files are skipped, counted and logged, and the split stays what it was.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("gafh_fast.data")

LAYOUTS = ("celeba_aligned", "celeba_wild", "folder")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DECODABLE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")   # what both DALI and PIL decode
PAPER_TRAIN, PAPER_TEST, CELEBA_TOTAL = 162_048, 40_511, 202_599
_EXPECTED = {
    "celeba_aligned": "ROOT/img_align_celeba/<name>.jpg and ROOT/list_eval_partition.txt",
    "celeba_wild": "ROOT/img_celeba/<name>.jpg and ROOT/list_bbox_celeba.txt "
                   "(plus ROOT/list_eval_partition.txt for split 'official')",
    "folder": "ROOT/**/<name>.(jpg|jpeg|png|bmp|webp|tif|tiff), searched recursively",
}


class LayoutError(FileNotFoundError):
    """The dataset root does not hold the layout the config names."""


class BadImage(ValueError):
    """A file that the cheap check (or a full decode) rejects; the message says why."""


@dataclass(frozen=True)
class Sample:
    path: str
    window: tuple[int, int, int, int]     # crop box in pixels: x, y, width, height


@dataclass
class SplitIndex:
    samples: list[Sample]                                    # good files, in a fixed order
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)


# ----------------------------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------------------------
def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of side min(w, h); for CelebA aligned 178x218 it is (0, 20, 178, 178)."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def box_to_square(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """Grow a face box (x, y, w, h) to a square about its centre, then move it inside the image.

    A square larger than the image's short side is shrunk to it (never padded), so every crop is
    real pixels and DALI and PIL see the same window.
    """
    x, y, w, h = box
    side = min(max(w, h, 1), width, height)
    cx, cy = x + w / 2.0, y + h / 2.0
    left = int(round(cx - side / 2.0))
    top = int(round(cy - side / 2.0))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return left, top, side, side


# ----------------------------------------------------------------------------------------------
# The cheap bad-file check
# ----------------------------------------------------------------------------------------------
def check_image(path: str) -> tuple[int, int]:
    """(width, height) of a decodable image, else BadImage saying why. Reads the header and the tail only."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror})") from e
    if size == 0:
        raise BadImage("zero-byte file")
    try:
        with Image.open(path) as im:
            width, height, fmt = im.size[0], im.size[1], im.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"not an image ({type(e).__name__}: {e})") from e
    if fmt not in DECODABLE_FORMATS:
        raise BadImage(f"unsupported image format {fmt}")
    with open(path, "rb") as f:
        f.seek(max(size - 1024, 0))
        tail = f.read()
    # 0xFF 0xD9 cannot occur inside entropy-coded data (0xFF is stuffed there), so it marks the end;
    # looking at the last KiB rather than the last two bytes accepts a little trailing padding or metadata
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise BadImage("truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in tail[-12:]:
        raise BadImage("truncated PNG (no IEND chunk)")
    if fmt not in ("JPEG", "PNG"):
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # PIL raises many types from verify()
            raise BadImage(f"corrupt {fmt} ({type(e).__name__}: {e})") from e
    if width < 8 or height < 8:
        raise BadImage(f"too small ({width}x{height})")
    return width, height


def full_decode_check(path: str) -> None:
    """Decode the whole file (slow); BadImage if that fails. Used to find the culprit of a DALI error."""
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
    except Exception as e:
        raise BadImage(f"decode failed ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Layout readers
# ----------------------------------------------------------------------------------------------
def _require(path: Path, what: str, layout: str, root: Path) -> None:
    if not path.exists():
        raise LayoutError(
            f"data.layout={layout}: {what} {path} is missing under data.root={root}. "
            f"Expected layout: {_EXPECTED[layout]}")


def _read_partition(path: Path) -> dict[str, int]:
    partition = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise LayoutError(f"{path}:{lineno}: expected '<file name> <0|1|2>', got {line!r}")
        partition[parts[0]] = int(parts[1])
    return partition


def _read_bboxes(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """list_bbox_celeba.txt: a count line, a header line, then 'name x_1 y_1 width height'."""
    boxes = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) != 5 or parts[0] == "image_id":
            continue   # the count and header lines
        try:
            boxes[parts[0]] = tuple(int(v) for v in parts[1:])
        except ValueError as e:
            raise LayoutError(f"{path}:{lineno}: expected 'name x_1 y_1 width height', got {line!r}") from e
    if not boxes:
        raise LayoutError(f"{path}: no boxes found (expected lines 'name x_1 y_1 width height')")
    return boxes


def validate_layout(root: Path, layout: str, split: str) -> None:
    """Raise LayoutError naming what is missing and what the layout expects."""
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown data.layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if split not in ("official", "paper", "all"):
        raise LayoutError(f"unknown data.split {split!r}; expected official, paper or all")
    if not root.is_dir():
        raise LayoutError(f"data.root={root} is not a directory. Expected layout {layout}: {_EXPECTED[layout]}")
    if layout == "celeba_aligned":
        _require(root / "img_align_celeba", "image folder", layout, root)
        _require(root / "list_eval_partition.txt", "partition file", layout, root)
    elif layout == "celeba_wild":
        _require(root / "img_celeba", "image folder", layout, root)
        _require(root / "list_bbox_celeba.txt", "bounding-box file", layout, root)
        if split == "official":
            _require(root / "list_eval_partition.txt", "partition file (needed by data.split=official)", layout, root)


def _list_folder(root: Path) -> list[str]:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not names:
        raise LayoutError(f"data.layout=folder: no images under data.root={root}. Expected layout: {_EXPECTED['folder']}")
    return names


def paper_split(names: list[str], seed: int) -> dict[str, list[str]]:
    """The seeded random split (see module docstring); `names` in a fixed (sorted) order."""
    n = len(names)
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_test = n * PAPER_TRAIN // CELEBA_TOTAL, n * PAPER_TEST // CELEBA_TOTAL
    pick = lambda idx: [names[i] for i in sorted(idx)]   # keep file order within a split
    return {"train": pick(order[:n_train]), "test": pick(order[n_train:n_train + n_test]),
            "val": pick(order[n_train + n_test:])}


def split_names(root: Path, layout: str, split: str, which: str, seed: int) -> tuple[Path, list[str]]:
    """(image folder, file names of split `which`) before any file is opened."""
    if which not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {which!r}")
    validate_layout(root, layout, split)
    if layout == "folder":
        folder, names = root, _list_folder(root)
        if split == "official":
            log.info("data.layout=folder has no partition file: data.split=official reads every file (as 'all')")
            split = "all"
    else:
        folder = root / ("img_align_celeba" if layout == "celeba_aligned" else "img_celeba")
        if layout == "celeba_aligned":
            partition = _read_partition(root / "list_eval_partition.txt")
        else:
            boxes = _read_bboxes(root / "list_bbox_celeba.txt")
            partition = (_read_partition(root / "list_eval_partition.txt") if split == "official"
                         else dict.fromkeys(boxes, 0))
        names = sorted(partition)
    if split == "all":
        return folder, names
    if split == "paper":
        return folder, paper_split(names, seed)[which]
    code = SPLITS.index(which)
    return folder, [n for n in names if partition[n] == code]


def index_split(root, layout: str, split: str, which: str, seed: int = 0, num_threads: int = 4) -> SplitIndex:
    """The good samples of one split, with crop windows, after the cheap check of every file."""
    root = Path(root).expanduser()
    folder, names = split_names(root, layout, split, which, seed)
    boxes = _read_bboxes(root / "list_bbox_celeba.txt") if layout == "celeba_wild" else None
    paths = [str(folder / n) for n in names]

    def check(path: str):
        try:
            return check_image(path), None
        except BadImage as e:
            return None, str(e)

    with ThreadPoolExecutor(max(1, num_threads)) as pool:  # I/O bound: threads overlap the opens
        results = list(pool.map(check, paths, chunksize=64))
    index = SplitIndex(samples=[])
    for name, path, (size, reason) in zip(names, paths, results):
        if size is None:
            index.skipped.append((path, reason))
            log.warning("skipping bad file %s: %s", path, reason)
            continue
        if boxes is not None:
            if name not in boxes:
                index.skipped.append((path, "no bounding box in list_bbox_celeba.txt"))
                log.warning("skipping %s: no bounding box in list_bbox_celeba.txt", path)
                continue
            window = box_to_square(boxes[name], *size)
        else:
            window = centre_square(*size)
        index.samples.append(Sample(path, window))
    if index.skipped:
        log.warning("%s split of %s: %d of %d files skipped by the bad-file check",
                    which, root, len(index.skipped), len(names))
    if not index.samples:
        raise LayoutError(f"the {which} split of data.root={root} (layout {layout}, split {split}) has no "
                          f"usable images ({len(names)} listed, {len(index.skipped)} skipped)")
    return index
