"""Data pipeline: DALI (CPU) against the PIL reference, layouts, splits, sharding, resume, bad files."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from gafh_fast.config import load_config
from gafh_fast.data import build_loader, resolve_root
from gafh_fast.data import layouts
from gafh_fast.data.layouts import LayoutError, Sample, SplitIndex, box_to_square, centre_square, index_split
from gafh_fast.data.pil import PILLoader, load_pair
from gafh_fast.data.synthetic import face_jpeg, make_synthetic_celeba
from gafh_fast.data.synthetic import main as synthetic_main
from gafh_fast.metrics import psnr
from gafh_fast.resize import bicubic_resize


def _installed(name: str) -> bool:
    """Is the package there at all (find_spec, not an import: a broken install must fail, not skip)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package (nvidia) is missing
        return False


# Skip the DALI tests only when nvidia.dali itself is absent. When it is installed, our module must
# import: an ImportError from gafh_fast.data.dali then fails those tests (see dali_loader_class).
DALI_INSTALLED = _installed("nvidia.dali")
needs_dali = pytest.mark.skipif(not DALI_INSTALLED, reason="nvidia.dali is not installed")


def dali_loader_class():
    from gafh_fast.data.dali import DALILoader

    return DALILoader


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    """32 synthetic faces in the CelebA aligned layout: 25 train, 3 val, 4 test by the 80/10/10 rule."""
    return make_synthetic_celeba(tmp_path_factory.mktemp("celeba"), 32, seed=3)


def make_cfg(root, **data):
    overrides = [f"data.root={root}", "data.num_threads=2", "data.hr_size=64"]
    overrides += [f"data.{k}={v}" for k, v in data.items()]
    return load_config(None, overrides)


def build_pil(cfg, split, **kw):
    """build_loader with data.loader=pil, decoding in this process (fast to start in a test)."""
    cfg.data.loader = "pil"
    loader = build_loader(cfg, split, **kw)
    loader.num_workers = 0
    return loader


def unit(x):
    return (x.double() + 1) / 2   # [-1, 1] -> [0, 1] for psnr


def collect(loader):
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def assert_psnr(a, b, floor, what):
    db = psnr(unit(a), unit(b))
    assert db.min() >= floor, f"{what}: PSNR per image {db.tolist()} below {floor} dB"
    return db


# ----------------------------------------------------------------------------------------------
# synthetic faces
# ----------------------------------------------------------------------------------------------
def test_synthetic_deterministic_and_layout(tmp_path):
    assert face_jpeg(7, 3) == face_jpeg(7, 3)
    assert face_jpeg(7, 3) != face_jpeg(8, 3)
    assert face_jpeg(7, 3) != face_jpeg(7, 4)
    root = make_synthetic_celeba(tmp_path / "set", 20, seed=7)
    lines = (root / "list_eval_partition.txt").read_text().split("\n")
    assert lines[0] == "000001.jpg 0" and lines[15] == "000016.jpg 0"
    assert lines[16] == "000017.jpg 1" and lines[18] == "000019.jpg 2" and lines[19] == "000020.jpg 2"
    with Image.open(root / "img_align_celeba" / "000004.jpg") as im:
        assert im.size == (178, 218) and im.mode == "RGB"
        pixels = np.asarray(im).astype(np.float64)
    assert pixels.std() > 20   # a drawn picture, not a flat fill
    assert (root / "img_align_celeba" / "000004.jpg").read_bytes() == face_jpeg(7, 3)
    synthetic_main([str(tmp_path / "cli"), "--count", "3", "--seed", "7"])   # the CLI writes the same faces
    assert (tmp_path / "cli" / "img_align_celeba" / "000003.jpg").read_bytes() == face_jpeg(7, 2)
    assert (tmp_path / "cli" / "list_eval_partition.txt").read_text() == "000001.jpg 0\n000002.jpg 0\n000003.jpg 2\n"


# ----------------------------------------------------------------------------------------------
# layouts and splits
# ----------------------------------------------------------------------------------------------
def test_layout_errors_name_what_is_missing(tmp_path):
    with pytest.raises(LayoutError, match=r"image folder .*img_align_celeba is missing.*Expected layout"):
        index_split(tmp_path, "celeba_aligned", "official", "train")
    (tmp_path / "img_align_celeba").mkdir()
    with pytest.raises(LayoutError, match=r"partition file .*list_eval_partition.txt is missing"):
        index_split(tmp_path, "celeba_aligned", "official", "train")
    (tmp_path / "img_celeba").mkdir()
    with pytest.raises(LayoutError, match=r"bounding-box file .*list_bbox_celeba.txt is missing"):
        index_split(tmp_path, "celeba_wild", "paper", "train")
    with pytest.raises(LayoutError, match=r"no images under"):
        index_split(tmp_path / "img_celeba", "folder", "all", "train")
    with pytest.raises(LayoutError, match="is not a directory"):
        index_split(tmp_path / "nowhere", "folder", "all", "train")
    with pytest.raises(LayoutError, match="data.root is not set"):
        resolve_root(load_config(None, []))


def test_official_partition_mapping(tmp_path, celeba):
    root = tmp_path / "set"
    shutil.copytree(celeba, root)
    codes = [2, 0, 1, 0, 0, 2, 1, 0] + [0] * 24
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {c}\n" for i, c in enumerate(codes)))
    names = {w: [os.path.basename(s.path) for s in index_split(root, "celeba_aligned", "official", w).samples]
             for w in ("train", "val", "test")}
    assert names["val"] == ["000003.jpg", "000007.jpg"]
    assert names["test"] == ["000001.jpg", "000006.jpg"]
    assert names["train"] == ["000002.jpg", "000004.jpg", "000005.jpg"] + [f"{i:06d}.jpg" for i in range(8, 33)]
    assert all(s.window == (0, 20, 178, 178) for s in index_split(root, "celeba_aligned", "official", "val").samples)


def test_paper_split_sizes():
    names = [f"{i:06d}.jpg" for i in range(1, 202_600)]
    split = layouts.paper_split(names, seed=0)
    assert (len(split["train"]), len(split["test"]), len(split["val"])) == (162_048, 40_511, 40)
    assert set(split["train"]) | set(split["test"]) | set(split["val"]) == set(names)
    assert not set(split["train"]) & set(split["test"])
    assert layouts.paper_split(names[:20], seed=0) == layouts.paper_split(names[:20], seed=0)
    small = layouts.paper_split(names[:20], seed=1)
    assert (len(small["train"]), len(small["test"]), len(small["val"])) == (15, 3, 2)   # 20*162048//202599 = 15
    assert layouts.paper_split(names[:20], seed=2)["train"] != small["train"]


def test_crop_windows_hand_computed():
    assert centre_square(178, 218) == (0, 20, 178, 178)          # the spec's CelebA crop
    assert centre_square(100, 60) == (20, 0, 60, 60)
    assert box_to_square((95, 71, 226, 313), 409, 687) == (52, 71, 313, 313)   # CelebA 000001's box
    assert box_to_square((0, 10, 40, 20), 100, 80) == (0, 0, 40, 40)           # moved inside the image
    assert box_to_square((10, 10, 200, 50), 100, 80) == (20, 0, 80, 80)        # shrunk to the short side


def test_bad_files_skipped_counted_split_unchanged(tmp_path, celeba, caplog):
    root = tmp_path / "set"
    shutil.copytree(celeba, root)
    images = root / "img_align_celeba"
    (images / "000002.jpg").write_bytes(b"")                                       # zero-byte
    (images / "000003.jpg").write_bytes((images / "000003.jpg").read_bytes()[:2000])  # truncated JPEG
    (images / "000005.jpg").write_text("not an image at all\n")                     # non-image
    buffer = (images / "000006.jpg")
    Image.open(buffer).save(images / "x.png")
    png = (images / "x.png").read_bytes()
    (images / "000006.jpg").write_bytes(png[:len(png) // 2])                        # truncated PNG
    caplog.set_level("WARNING", logger="gafh_fast.data")
    index = index_split(root, "celeba_aligned", "official", "train")
    reasons = {os.path.basename(p): r for p, r in index.skipped}
    assert set(reasons) == {"000002.jpg", "000003.jpg", "000005.jpg", "000006.jpg"}
    assert reasons["000002.jpg"] == "zero-byte file"
    assert reasons["000003.jpg"].startswith("truncated JPEG")
    assert reasons["000005.jpg"].startswith("not an image")
    assert reasons["000006.jpg"].startswith("truncated PNG")
    assert "000003.jpg" in caplog.text
    assert len(index.samples) == 25 - 4
    # the other splits are untouched
    assert [os.path.basename(s.path) for s in index_split(root, "celeba_aligned", "official", "val").samples] == \
        ["000026.jpg", "000027.jpg", "000028.jpg"]
    loader = build_pil(make_cfg(root, batch_size=4), "train")
    assert loader.skipped == 4 and loader.num_samples == 20 and len(loader) == 5


# ----------------------------------------------------------------------------------------------
# DALI against the PIL reference
# ----------------------------------------------------------------------------------------------
@needs_dali
def test_dali_module_imports_when_dali_is_installed():
    """nvidia.dali is there, so our pipeline module must import (a broken import is a failure here,
    never 'nvidia.dali is not installed')."""
    import nvidia.dali  # noqa: F401

    assert dali_loader_class().__module__ == "gafh_fast.data.dali"


@needs_dali
@pytest.mark.parametrize("split", ["val", "train"])
def test_dali_matches_pil_at_256(celeba, split):
    cfg = make_cfg(celeba, hr_size=256, batch_size=4, val_batch_size=4)
    dali_batches = collect(build_loader(cfg, split))
    pil_batches = collect(build_pil(cfg, split))
    assert len(dali_batches) == len(pil_batches) == (1 if split == "val" else 6)
    for d, p in zip(dali_batches, pil_batches):
        for key, size in (("hr", 256), ("lr", 32)):
            assert d[key].shape == p[key].shape and d[key].shape[1:] == (3, size, size)
            assert d[key].dtype == torch.float32 and d[key].device.type == "cpu"
            assert d[key].is_contiguous(memory_format=torch.channels_last)
            assert p[key].is_contiguous(memory_format=torch.channels_last)
            assert d[key].min() >= -1 and d[key].max() <= 1 and d[key].min() < -0.5 and d[key].max() > 0.5
            assert_psnr(d[key], p[key], 45.0, f"{split} {key} DALI vs PIL")
    if split == "val":   # no shuffle, no flip: the files in index order, as load_pair makes them unflipped
        loader = build_loader(cfg, "val")
        assert [s.path for s in loader.samples] == [str(celeba / "img_align_celeba" / f"0000{i}.jpg") for i in (26, 27, 28)]
        for key, pos in (("hr", 0), ("lr", 1)):
            ref = np.stack([load_pair(s, 256, 32, flip=False)[pos] for s in loader.samples])
            ref = torch.from_numpy(ref).permute(0, 3, 1, 2).double() / 127.5 - 1
            assert_psnr(dali_batches[0][key], ref, 45.0, f"val {key} vs unflipped reference")


@needs_dali
def test_dali_outputs_follow_the_plan_and_flip_hr_lr_together(celeba):
    cfg = make_cfg(celeba, batch_size=8)
    loader = build_loader(cfg, "train")
    loader.set_epoch(4)
    indices, flips = loader.plan.order(4)
    assert flips.any() and not flips.all()
    batches = collect(loader)
    hr = torch.cat([b["hr"] for b in batches])
    lr = torch.cat([b["lr"] for b in batches])
    for row, (i, f) in enumerate(zip(indices.tolist(), flips.tolist())):
        ref_hr, ref_lr = load_pair(loader.samples[i], 64, 8, flip=False)
        ref_hr = torch.from_numpy(ref_hr.copy()).permute(2, 0, 1)[None].double() / 127.5 - 1
        expect = ref_hr.flip(-1) if f else ref_hr
        assert_psnr(hr[row:row + 1], expect, 45.0, f"row {row} (sample {i}, flip {f})")
    # the same files unflipped (a val-mode loader over the train index): flipped rows are exact mirrors
    plain = dali_loader_class()(loader.index, split="val", batch_size=32, hr_size=64, num_threads=2)
    unflipped = next(iter(plain))
    for key, batch in (("hr", hr), ("lr", lr)):
        expect = unflipped[key][torch.from_numpy(indices)]
        expect = torch.where(torch.from_numpy(flips)[:, None, None, None], expect.flip(-1), expect)
        assert torch.equal(batch, expect), f"{key}: a flipped row is not the mirror of its unflipped self"
    # the LR is the (Keys, antialiased) downscale of the HR it comes with: flipped together
    assert_psnr(lr, bicubic_resize(hr.double(), (8, 8)).clamp(-1, 1), 40.0, "LR vs resize(HR)")


# ----------------------------------------------------------------------------------------------
# sharding, shuffling, resume
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader_kind", [pytest.param("dali", marks=needs_dali), "pil"])
def test_two_shards_disjoint_and_cover(celeba, loader_kind):
    cfg = make_cfg(celeba, loader=loader_kind, batch_size=4, val_batch_size=2)
    build = build_loader if loader_kind == "dali" else build_pil
    val = [build(cfg, "val", rank=r, world_size=2) for r in (0, 1)]
    val_files = [[val[r].samples[i].path for i in val[r].plan.order(0)[0]] for r in (0, 1)]
    assert not set(val_files[0]) & set(val_files[1])
    assert sorted(val_files[0] + val_files[1]) == sorted(s.path for s in val[0].samples)
    shards = [torch.cat([b["hr"] for b in val[r]]) for r in (0, 1)]
    assert [x.shape[0] for x in shards] == [1, 2]        # 3 val files: each exactly once, no padding duplicates
    single = torch.cat([b["hr"] for b in build(cfg, "val")])
    assert torch.equal(torch.cat(shards), single)         # the two shards are the one-rank set, in order
    train = [build(cfg, "train", rank=r, world_size=2) for r in (0, 1)]
    assert len(train[0]) == len(train[1]) == 3                     # 25 // 2 = 12 each, 3 full batches
    for epoch in (0, 1):
        picked = [set(train[r].plan.order(epoch)[0].tolist()) for r in (0, 1)]
        assert not picked[0] & picked[1] and len(picked[0]) == len(picked[1]) == 12
    shards = [torch.cat([b["hr"] for b in t]) for t in train]
    assert shards[0].shape == shards[1].shape == (12, 3, 64, 64)
    # one global permutation per epoch, cut into contiguous blocks: rank 0 then rank 1 is the one-rank epoch
    single = torch.cat([b["hr"] for b in build(cfg, "train")])
    assert single.shape[0] == 24 and torch.equal(torch.cat(shards), single)


@needs_dali
def test_epoch_reshuffle_deterministic_and_resume(celeba):
    cfg = make_cfg(celeba, batch_size=4)
    first, second = build_loader(cfg, "train"), build_loader(cfg, "train")
    first.set_epoch(1)
    second.set_epoch(1)
    a, b = collect(first), collect(second)
    assert len(a) == 6 and all(torch.equal(x["hr"], y["hr"]) and torch.equal(x["lr"], y["lr"]) for x, y in zip(a, b))
    order0, order1 = first.plan.order(0)[0], first.plan.order(1)[0]
    assert not np.array_equal(order0, order1)
    second.set_epoch(0)
    c = collect(second)
    assert not torch.equal(c[0]["hr"], a[0]["hr"])
    # resume inside epoch 1: exactly the tail of the uninterrupted epoch
    second.set_epoch(1, start_batch=4)
    tail = collect(second)
    assert len(tail) == 2 and all(torch.equal(x["hr"], y["hr"]) and torch.equal(x["lr"], y["lr"])
                                  for x, y in zip(tail, a[4:]))
    # iterating again without set_epoch moves on to the next epoch
    assert second.epoch == 2 and second.start_batch == 0


def test_pil_resume_is_the_tail(celeba):
    loader = build_pil(make_cfg(celeba, batch_size=8), "train")
    loader.set_epoch(3)
    full = collect(loader)
    loader.set_epoch(3, start_batch=2)
    tail = collect(loader)
    assert len(full) == 3 and len(tail) == 1 and torch.equal(tail[0]["hr"], full[2]["hr"])
    loader.num_workers = 2             # worker processes give the very same batches
    loader.set_epoch(3)
    workers = collect(loader)
    assert all(torch.equal(x["hr"], y["hr"]) and torch.equal(x["lr"], y["lr"]) for x, y in zip(workers, full))
    assert len(workers) == 3


# ----------------------------------------------------------------------------------------------
# files that break the decoder after passing the cheap check
# ----------------------------------------------------------------------------------------------
def _index_with_hidden_bad_file(celeba, tmp_path):
    samples = index_split(celeba, "celeba_aligned", "official", "train").samples[:11]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 this is no JPEG stream \xff\xd9")
    return SplitIndex(samples=samples[:5] + [Sample(str(bad), (0, 20, 178, 178))] + samples[5:])   # 12 samples


@pytest.mark.parametrize("loader_kind", [pytest.param("dali", marks=needs_dali), "pil"])
def test_decode_failure_is_skipped_not_fatal(celeba, tmp_path, loader_kind, caplog):
    index = _index_with_hidden_bad_file(celeba, tmp_path)
    cls, extra = (dali_loader_class(), {"num_threads": 2}) if loader_kind == "dali" else (PILLoader, {"num_workers": 0})
    caplog.set_level("WARNING", logger="gafh_fast.data")
    train = cls(index, split="train", batch_size=4, hr_size=64, flip=False, **extra)
    batches = collect(train)
    assert [b["hr"].shape[0] for b in batches] == [4, 4, 4] and train.skipped == 1
    assert "bad.jpg" in caplog.text
    val = cls(index, split="val", batch_size=4, hr_size=64, **extra)
    rows = torch.cat([b["hr"] for b in collect(val)])
    assert rows.shape[0] == 11 and val.skipped == 1            # every good file once, the bad one dropped
    ref = PILLoader(SplitIndex(samples=[s for s in index.samples if "bad" not in s.path]), split="val",
                    batch_size=11, hr_size=64, num_workers=0)
    assert_psnr(rows, next(iter(ref))["hr"], 45.0, "val rows around the bad file")


# ----------------------------------------------------------------------------------------------
# other layouts
# ----------------------------------------------------------------------------------------------
@needs_dali
def test_wild_and_folder_layouts_dali_vs_pil(tmp_path, celeba):
    wild = tmp_path / "wild"
    (wild / "img_celeba").mkdir(parents=True)
    rows = []
    for k in range(6):   # pictures of assorted sizes with face boxes
        name = f"{k + 1:06d}.jpg"
        with Image.open(celeba / "img_align_celeba" / name) as im:
            im.resize((178 + 30 * k, 218 + 10 * k)).save(wild / "img_celeba" / name, quality=95)
        rows.append(f"{name} {10 + k} {30 + 2 * k} {90 + 5 * k} {120 - 3 * k}")
    (wild / "list_bbox_celeba.txt").write_text(f"6\nimage_id x_1 y_1 width height\n" + "\n".join(rows) + "\n")
    index = index_split(wild, "celeba_wild", "all", "val")
    assert index.samples[0].window == box_to_square((10, 30, 90, 120), 178, 218) == (0, 30, 120, 120)
    folder = tmp_path / "folder"
    (folder / "a" / "b").mkdir(parents=True)
    for k in range(5):
        with Image.open(celeba / "img_align_celeba" / f"{k + 1:06d}.jpg") as im:
            im.crop((0, 0, 100 + 10 * k, 60 + 20 * k)).save(folder / "a" / "b" / f"{k}.png")
    assert index_split(folder, "folder", "official", "test").samples[0].window == (20, 0, 60, 60)
    for root, layout in ((wild, "celeba_wild"), (folder, "folder")):
        cfg = make_cfg(root, layout=layout, split="all", val_batch_size=8)
        d = collect(build_loader(cfg, "val"))
        p = collect(build_pil(cfg, "val"))
        assert len(d) == len(p) == 1
        assert_psnr(d[0]["hr"], p[0]["hr"], 45.0, f"{layout} HR")


# ----------------------------------------------------------------------------------------------
# build_loader / resolve_root plumbing
# ----------------------------------------------------------------------------------------------
def test_resolve_root_generates_once_and_survives_a_race(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["data.synthetic_count=10", "data.seed=5"])
    results, errors = [], []

    def resolve():
        try:
            results.append(resolve_root(cfg))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results[0] == results[1] == tmp_path / ".cache" / "gafh_fast" / "synthetic-10-5"
    assert sorted(p.name for p in results[0].parent.iterdir()) == ["synthetic-10-5"]   # no temp dirs left
    made = results[0] / "img_align_celeba" / "000010.jpg"
    assert made.read_bytes() == face_jpeg(5, 9)
    stamp = made.stat().st_mtime_ns
    assert resolve_root(cfg) == results[0] and made.stat().st_mtime_ns == stamp   # not regenerated
    assert resolve_root(load_config(None, ["data.root=~/x"])) == tmp_path / "x"


def test_dali_missing_is_a_clear_error(celeba, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "gafh_fast.data.dali", raising=False)
    with pytest.raises(ImportError, match="data.loader=pil") as caught:
        build_loader(make_cfg(celeba, loader="dali"), "val")
    assert type(caught.value).__name__ == "DALIUnavailableError"   # never a silent fallback to PIL
