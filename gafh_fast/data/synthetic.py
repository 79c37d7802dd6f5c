"""Deterministic synthetic faces in the CelebA aligned layout (the demo's and the tests' data).

Each face is drawn with vectorised numpy on a 178x218 canvas: a background gradient, hair, a
skin-toned head, ears, eyes (white, iris, pupil), brows, a shaded nose, a mouth, then a directional
light and a little sensor noise. Pose (roll, yaw, scale, offset), colours and lighting vary per face.
Face i depends only on (seed, i), so a set of N faces is the prefix of any larger set.

Layout written (what `layouts.py` reads as `celeba_aligned`):

    OUT_DIR/img_align_celeba/000001.jpg ...
    OUT_DIR/list_eval_partition.txt       "000001.jpg 0" (0 train, 1 val, 2 test; 80/10/10 in order)

CLI: python -m gafh_fast.data.synthetic OUT_DIR --count N [--seed S]
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 178, 218          # CelebA aligned image size
JPEG_QUALITY = 95
_YY, _XX = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)


def _blend(canvas, cx, cy, rx, ry, angle, colour, alpha=1.0, soft=1.5):
    """canvas (H, W, 3) float <- colour inside a rotated, anti-aliased ellipse (angle in radians).

    Only the ellipse's bounding box is touched, which keeps a face at a few milliseconds.
    """
    reach = max(rx, ry) + 2
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, WIDTH)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, HEIGHT)
    if x0 >= x1 or y0 >= y1:
        return
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = _XX[y0:y1, x0:x1] - cx, _YY[y0:y1, x0:x1] - cy
    u = (c * dx + s * dy) / rx
    v = (-s * dx + c * dy) / ry
    # distance from the outline in pixels (approximately), turned into a soft edge
    mask = np.clip((1.0 - np.sqrt(u * u + v * v)) * min(rx, ry) / soft + 0.5, 0.0, 1.0) * alpha
    patch = canvas[y0:y1, x0:x1]
    patch += mask[..., None] * (np.asarray(colour, np.float32) - patch)


def draw_face(rng: np.random.Generator) -> np.ndarray:
    """One synthetic face as (218, 178, 3) uint8 RGB."""
    # background: vertical gradient between two random colours
    top, bottom = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    t = (_YY / (HEIGHT - 1))[..., None]
    img = (top * (1 - t) + bottom * t).astype(np.float32)

    roll = rng.normal(0.0, 0.12)                       # head tilt (radians)
    yaw = rng.uniform(-0.35, 0.35)                     # turn: shifts the features sideways
    scale = rng.uniform(0.85, 1.1)
    cx = WIDTH / 2 + rng.normal(0, 4)
    cy = HEIGHT * 0.53 + rng.normal(0, 4)
    rx, ry = 48 * scale, 62 * scale
    c, s = np.cos(roll), np.sin(roll)

    def at(u, v):  # face-frame offsets (u right, v down, in head radii) -> image coordinates
        x, y = u * rx, v * ry
        return cx + c * x - s * y, cy + s * x + c * y

    skin = np.array([rng.uniform(150, 245), 0, 0], np.float32)
    skin[1] = skin[0] * rng.uniform(0.68, 0.85)
    skin[2] = skin[1] * rng.uniform(0.7, 0.9)
    hair = rng.uniform(10, 120, 3) * rng.uniform(0.3, 1.6)
    hair = np.clip(hair, 0, 255)

    # hair behind the head, then ears, neck and head
    hx, hy = at(0.0, -0.18)
    _blend(img, hx, hy, rx * rng.uniform(1.08, 1.3), ry * rng.uniform(1.0, 1.2), roll, hair)
    nx, ny = at(0.0, 1.05)
    _blend(img, nx, ny, rx * 0.45, ry * 0.5, roll, skin * 0.85)
    for side in (-1, 1):
        ex, ey = at(side * (1.0 - 0.15 * side * yaw), 0.05)
        _blend(img, ex, ey, rx * 0.14, ry * 0.2, roll, skin * 0.92)
    _blend(img, cx, cy, rx, ry, roll, skin)
    # fringe over the forehead
    fx, fy = at(yaw * 0.3, -0.85)
    _blend(img, fx, fy, rx * 0.95, ry * 0.32, roll + rng.normal(0, 0.1), hair)

    shift = yaw * 0.35                                  # features move towards the turn
    eye_w, eye_h = rng.uniform(0.16, 0.22), rng.uniform(0.06, 0.09)
    iris = rng.uniform(30, 160, 3)
    for side in (-1, 1):
        ex, ey = at(side * 0.38 + shift, -0.1)
        _blend(img, ex, ey, rx * eye_w, ry * eye_h, roll, (240, 238, 232))
        gaze = rng.normal(0, 0.02) + shift * 0.2
        ix, iy = at(side * 0.38 + shift + gaze, -0.1)
        _blend(img, ix, iy, rx * 0.075, rx * 0.075, 0.0, iris)
        _blend(img, ix, iy, rx * 0.035, rx * 0.035, 0.0, (15, 12, 12))
        bx, by = at(side * 0.38 + shift, -0.28 + rng.normal(0, 0.02))
        _blend(img, bx, by, rx * 0.22, ry * 0.035, roll - side * rng.uniform(0.0, 0.25), hair * 0.8)

    # nose: a shaded ridge and two nostrils
    sx, sy = at(shift * 1.2 + 0.06, 0.18)
    _blend(img, sx, sy, rx * 0.07, ry * 0.2, roll, skin * 0.7, alpha=0.35)
    for side in (-1, 1):
        ox, oy = at(shift * 1.2 + side * 0.09, 0.34)
        _blend(img, ox, oy, rx * 0.05, ry * 0.025, roll, skin * 0.45, alpha=0.7)

    # mouth: lips and a dark line between them
    lips = np.array([rng.uniform(150, 220), rng.uniform(50, 100), rng.uniform(60, 110)], np.float32)
    mx, my = at(shift, 0.6)
    mouth_w = rng.uniform(0.25, 0.38)
    _blend(img, mx, my, rx * mouth_w, ry * rng.uniform(0.05, 0.09), roll, lips)
    _blend(img, mx, my, rx * mouth_w * 0.9, ry * 0.012, roll, (60, 20, 25), alpha=0.8)

    # directional light and noise
    light = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0.1, 0.35)
    ramp = ((_XX - WIDTH / 2) * np.cos(light) + (_YY - HEIGHT / 2) * np.sin(light)) / (WIDTH / 2)
    img *= (1.0 + strength * ramp)[..., None] * rng.uniform(0.8, 1.15)
    img += 2.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def face_jpeg(seed: int, index: int) -> bytes:
    """JPEG bytes of face `index` (0-based) of the set seeded by `seed`."""
    rng = np.random.default_rng([seed, index])
    buffer = io.BytesIO()
    Image.fromarray(draw_face(rng)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def partition_of(index: int, count: int) -> int:
    """0 train, 1 val, 2 test: the first 80% train, the next 10% val, the rest test (CelebA is in order too)."""
    if index < (count * 8) // 10:
        return 0
    if index < (count * 9) // 10:
        return 1
    return 2


def make_synthetic_celeba(out_dir, count: int, seed: int = 0) -> Path:
    """Write `count` faces and the partition file under `out_dir` (created); returns the path."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    out = Path(out_dir).expanduser()
    images = out / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        name = f"{i + 1:06d}.jpg"
        (images / name).write_bytes(face_jpeg(seed, i))
        lines.append(f"{name} {partition_of(i, count)}\n")
    (out / "list_eval_partition.txt").write_text("".join(lines))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic faces in the CelebA aligned layout.")
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_synthetic_celeba(args.out_dir, args.count, args.seed)
    print(f"wrote {args.count} faces (seed {args.seed}) to {out}")


if __name__ == "__main__":
    main()
