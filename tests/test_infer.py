"""Sharded inference and evaluation (launch/infer.py, gafh_fast.inference) on CPU with a tiny generator.

Two-rank runs go through `torchrun --nproc_per_node 2` (gloo). Each run is a module-scoped fixture
reused by several tests; references are computed here with plain PIL + the reference generator.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gafh_fast import metrics
from gafh_fast.config import load_config
from gafh_fast.export import load_generator, save_generator
from gafh_fast.inference import (EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, InferenceOptions, InferenceUsageError,
                                 run_inference)
from gafh_fast.inference.inputs import list_inputs, output_complete
from gafh_fast.models import build_generator

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "infer.py"
TINY_G = ["model.generator.nf=8", "model.generator.gc=8", "model.generator.num_dnb=1",
          "model.generator.ridb_per_dnb=1", "model.generator.idb_per_ridb=1", "kernels=torch"]
MAX_PIXELS = 10_000  # bomb.png (120x120 = 14 400 pixels) exceeds it
BAD = {"empty.png": "empty file", "notes.txt": "not an image", "trunc.png": "corrupt image",
       "bomb.png": "decompression bomb"}
# Every run whose pixels are compared bit for bit uses this --batch-size: G always runs on a batch of exactly
# this shape (zero-padded), and the promise is bitwise equality for one batch size (see forward_padded in runner.py).
BATCH = "3"


def _launch_main():
    spec = importlib.util.spec_from_file_location("launch_infer", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _torchrun(args: list[str], decode_workers: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(LAUNCH), *args, "--no-progress", "--decode-workers", str(decode_workers), "--write-workers", "2"]
    # own process group, so a hung run is killed with its workers instead of leaving them behind
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _assert_torchrun_exit_3(proc: subprocess.CompletedProcess) -> None:
    """torchrun exits 1 when a worker fails. Its report names the first worker to exit non-zero (the "Root
    Cause"): ours with 3. Any other worker still running then is stopped by torchrun itself (SIGTERM, -15),
    so a report may list a -15 too, and nothing else."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"torchrun exit {proc.returncode}\n{text[-3000:]}"
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", text, re.S)
    assert root and root.group(1) == "3", text[-3000:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", text)) <= {"3", "-15"}, text[-3000:]


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _assert_matches_reference(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """The run keeps G in channels_last, the reference is contiguous: oneDNN sums in another order, so a
    value sitting on a .5 rounding boundary may land one 8-bit level apart. Allowed: <= 1 level on
    <= 0.1% of the values; everything else must be identical."""
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    where = np.argwhere(diff > 1)
    if len(where):
        first = tuple(where[0])
        raise AssertionError(f"{what}: {len(where)} values off by > 1, first at {first}: "
                             f"{got[first]} vs {expected[first]}")
    assert (diff > 0).mean() <= 1e-3, f"{what}: {(diff > 0).sum()} values differ by one level"


def _g_reference(weights: Path, lr_u8_hwc: np.ndarray) -> np.ndarray:
    """Plain fp32 reference: G on one 8-bit LR face -> the 8-bit (H, W, 3) result."""
    g, _ = load_generator(weights)
    x = torch.from_numpy(lr_u8_hwc.copy()).permute(2, 0, 1)[None].float().sub(127.5).div(127.5)
    with torch.no_grad():
        hf = g(x)
    return metrics.to_uint8_levels((hf + 1) / 2)[0].permute(1, 2, 0).to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------------
# Fixtures: one workspace, one run of each kind
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    cfg = load_config(None, TINY_G)
    weights = save_generator(build_generator(cfg), cfg, root / "g.safetensors")
    rng = np.random.default_rng(0)
    faces = root / "faces"
    (faces / "sub" / "deeper").mkdir(parents=True)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(faces / f"f{i}.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(faces / "sub" / "deeper" / "d.png")
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(faces / "sub" / "wide.png")
    Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)).save(faces / "sub" / "tall.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(faces / "sub" / "grey.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(faces / "sub" / "rgba.png")
    (faces / "empty.png").write_bytes(b"")
    (faces / "notes.txt").write_text("not a face\n")
    whole = (faces / "f0.png").read_bytes()
    (faces / "trunc.png").write_bytes(whole[: len(whole) // 2])
    Image.fromarray(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(faces / "bomb.png")
    hr = root / "hr"
    hr.mkdir()
    for i, (h, w) in enumerate([(256, 256), (300, 280), (218, 178)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(hr / f"h{i}.png")
    return {"root": root, "weights": weights, "faces": faces, "hr": hr, "good": 12}


@pytest.fixture(scope="module")
def single(ws):
    """One plain process (no torchrun), in-process through launch/infer.py's main()."""
    out = ws["root"] / "out_single"
    rc = _launch_main()(["--weights", str(ws["weights"]), "--input", str(ws["faces"]), "--output", str(out),
                         "--batch-size", BATCH, "--max-pixels", str(MAX_PIXELS), "--no-progress"])
    return rc, out


@pytest.fixture(scope="module")
def dist2(ws):
    out = ws["root"] / "out_dist"
    proc = _torchrun(["--weights", str(ws["weights"]), "--input", str(ws["faces"]), "--output", str(out),
                      "--batch-size", BATCH, "--max-pixels", str(MAX_PIXELS)])
    return proc, out


@pytest.fixture(scope="module")
def resumed(ws, dist2):
    """A copy of the two-rank output with two results deleted and one truncated, then run again."""
    out = ws["root"] / "out_resume"
    shutil.copytree(dist2[1], out)  # copy2 keeps mtimes
    (out / "f1.png").unlink()
    (out / "sub" / "wide.png").unlink()
    data = (out / "f2.png").read_bytes()
    (out / "f2.png").write_bytes(data[:-20])  # what a killed writer without the rename would leave
    before = {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*.png")}
    proc = _torchrun(["--weights", str(ws["weights"]), "--input", str(ws["faces"]), "--output", str(out),
                      "--batch-size", BATCH, "--max-pixels", str(MAX_PIXELS)])
    return proc, out, before


@pytest.fixture(scope="module")
def evaluated(ws):
    out = ws["root"] / "out_eval"
    # one decode worker per rank: evaluation's workers import torch (the data package's reference loader)
    proc = _torchrun(["--weights", str(ws["weights"]), "--input-hr", str(ws["hr"]), "--layout", "folder",
                      "--output", str(out), "--batch-size", "1"], decode_workers=1)
    return proc, out


# ------------------------------------------------------------------------------------------------
# Sharding, equality with one process, bad inputs
# ------------------------------------------------------------------------------------------------
def test_every_input_written_exactly_once_across_ranks(ws, dist2):
    proc, out = dist2
    _assert_torchrun_exit_3(proc)  # the bad inputs failed; every good one was written
    records = _manifest(out)
    paths = [r["path"] for r in records]
    on_disk = sorted(p for p in ws["faces"].rglob("*") if p.is_file())
    assert sorted(paths) == sorted(str(p) for p in on_disk) and len(set(paths)) == len(paths)
    assert {r["rank"] for r in records} == {0, 1}
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == ws["good"]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([r["output"] for r in ok] + ["manifest.jsonl"])  # no temp or part files left
    assert "sub/deeper/d.png" in written and "sub/tall.png" in written


def test_outputs_identical_to_single_process(single, dist2):
    """Bit for bit: one process with 2 threads vs 2 ranks with 1 thread each, where the failed inputs make
    different images share a batch (and some batches hold 1 or 2 images). Promised because G always runs on
    the fixed padded shape: within one shape oneDNN's sums for an image do not depend on its batch-mates or
    the thread count. (Unpadded, a batch of 1 picked another algorithm: 1 level apart on ~80 values.)"""
    rc, out1 = single
    _, out2 = dist2
    m1, m2 = _manifest(out1), _manifest(out2)
    strip = lambda ms: [{k: v for k, v in r.items() if k != "rank"} for r in ms]  # noqa: E731
    assert strip(m1) == strip(m2)
    for r in m1:
        if r["status"] == "ok":
            a, b = _pixels(out1 / r["output"]), _pixels(out2 / r["output"])
            assert a.shape == (256, 256, 3)
            assert np.array_equal(a, b), f"{r['output']}: max diff {np.abs(a.astype(int) - b).max()}"


def test_bad_inputs_in_manifest_and_exit_code(single, dist2):
    rc, out1 = single
    assert rc == EXIT_SOME_FAILED
    failed = {Path(r["path"]).name: r["reason"] for r in _manifest(out1) if r["status"] == "failed"}
    assert set(failed) == set(BAD)
    for name, reason in BAD.items():
        assert reason in failed[name], (name, failed[name])
    _assert_torchrun_exit_3(dist2[0])


def test_outputs_equal_plain_reference(ws, single):
    """Each kind of input (32x32 as is, 48x40 / 50x70 cropped + BICUBIC, grey, RGBA) against PIL + G in fp32."""
    _, out = single
    faces = ws["faces"]

    def pil_lr(name):
        with Image.open(faces / name) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            return np.asarray(im if (w, h) == (32, 32) else im.crop(box).resize((32, 32), Image.BICUBIC))

    for name, result in [("f3.png", "f3.png"), ("sub/wide.png", "sub/wide.png"), ("sub/tall.jpg", "sub/tall.png"),
                         ("sub/grey.png", "sub/grey.png"), ("sub/rgba.png", "sub/rgba.png")]:
        expected = _g_reference(ws["weights"], pil_lr(name))
        _assert_matches_reference(_pixels(out / result), expected, name)


def test_resume_skips_complete_outputs_and_redoes_the_rest(resumed, dist2):
    proc, out, before = resumed
    _assert_torchrun_exit_3(proc)
    status = {r["output"] or Path(r["path"]).name: r["status"] for r in _manifest(out)}
    redone = {"f1.png", "sub/wide.png", "f2.png"}
    assert {k for k, v in status.items() if v == "ok"} == redone
    assert {k for k, v in status.items() if v == "failed"} == set(BAD)
    skipped = {k for k, v in status.items() if v == "skipped-existing"}
    assert len(skipped) == 12 - len(redone)
    for rel in skipped:
        assert (out / rel).stat().st_mtime_ns == before[rel], f"{rel} was rewritten"
    for rel in redone:
        assert np.array_equal(_pixels(out / rel), _pixels(dist2[1] / rel))


# ------------------------------------------------------------------------------------------------
# Weights, usage errors, formats, listing
# ------------------------------------------------------------------------------------------------
def test_mismatched_weights_name_tensor_and_shapes(ws, caplog):
    cfg8 = load_config(None, TINY_G)
    g16 = build_generator(load_config(None, TINY_G + ["model.generator.nf=16"]))
    bad = save_generator(g16, cfg8, ws["root"] / "mismatch.safetensors")  # file says nf=8, tensors are nf=16
    opts = InferenceOptions(weights=bad, output=ws["root"] / "out_bad", input=ws["faces"], progress=False)
    shapes = r"'sfm\.weight' has shape \(16, 3, 9, 9\) in the file but \(8, 3, 9, 9\) in the model"
    with pytest.raises(InferenceUsageError, match=shapes):
        run_inference(opts)
    rc = _launch_main()(["--weights", str(bad), "--input", str(ws["faces"]), "--output", str(ws["root"] / "o")])
    assert rc == EXIT_USAGE and "sfm.weight" in caplog.text
    not_weights = ws["root"] / "not.safetensors"
    not_weights.write_bytes(b"garbage")
    with pytest.raises(InferenceUsageError, match="--weights"):
        run_inference(InferenceOptions(weights=not_weights, output=ws["root"] / "o", input=ws["faces"]))


def test_usage_errors(ws):
    with pytest.raises(InferenceUsageError, match="--format none"):
        run_inference(InferenceOptions(weights=ws["weights"], output=ws["root"] / "o", input=ws["faces"],
                                       format="none"))
    with pytest.raises(InferenceUsageError, match="no such folder"):
        run_inference(InferenceOptions(weights=ws["weights"], output=ws["root"] / "o", input=ws["root"] / "nope"))
    # through the launcher: exit 2 and nothing written
    for bad in (["--format", "none"], ["--write-workers", "0"], ["--decode-workers", "-1"]):
        out = ws["root"] / "o_usage"
        args = ["--weights", str(ws["weights"]), "--input", str(ws["faces"]), "--output", str(out), *bad]
        assert _launch_main()(args) == EXIT_USAGE, bad
        assert not out.exists(), bad


def test_pngs_are_lossless_npy_format_and_list_input(ws, single):
    """Every PNG decodes (PIL) to exactly the uint8 (256, 256, 3) array that --format npy writes for the same
    input. The npy run reads a text file of paths (comments, blank lines, a duplicate) naming every good face."""
    _, png_out = single
    good = [r for r in _manifest(png_out) if r["status"] == "ok"]
    listing = ws["root"] / "all_good.txt"
    lines = ["# every good face", ""] + [os.path.relpath(r["path"], ws["root"]) for r in good] + \
        [os.path.relpath(good[0]["path"], ws["root"])]
    listing.write_text("\n".join(lines) + "\n")
    out = ws["root"] / "out_npy"
    summary = run_inference(InferenceOptions(weights=ws["weights"], output=out, input=listing, format="npy",
                                             batch_size=int(BATCH), progress=False))
    assert summary.exit_code == EXIT_OK and summary.ok == len(good) == ws["good"]
    for r in good:
        stem = r["output"][: -len(".png")]
        a = np.load(out / f"{stem}.npy")
        assert a.dtype == np.uint8 and a.shape == (256, 256, 3), stem
        png = _pixels(png_out / r["output"])
        assert np.array_equal(png, a), f"{stem}: PNG differs from npy on {(png != a).sum()} values"
    assert output_complete(out / "f0.npy", 256, "npy")
    (out / "f0.npy").write_bytes((out / "f0.npy").read_bytes()[:-1])
    assert not output_complete(out / "f0.npy", 256, "npy")


def test_compile_on_cpu_runs_the_padded_compiled_path(ws, single, caplog):
    """CPU twin of the CUDA default (--compile auto = on there): the same torch.compile(mode="reduce-overhead")
    call, the three warm-up calls on the fixed padded shape, and the slice of the padded output. Inductor
    leaves CUDA graphs out on CPU by itself, so only the device differs. Its fused kernels are not promised
    to round like eager's: the results are held to the reference bound against the eager run."""
    listing = ws["root"] / "four.txt"
    names = ["f0.png", "f3.png", "sub/wide.png", "sub/deeper/d.png"]  # batches of 3 and 1 (padded to 3)
    listing.write_text("\n".join(f"faces/{n}" for n in names) + "\n")
    out = ws["root"] / "out_compiled"
    with caplog.at_level(logging.INFO, logger="gafh_fast"):
        summary = run_inference(InferenceOptions(weights=ws["weights"], output=out, input=listing, compile="on",
                                                 batch_size=int(BATCH), device="cpu", progress=False))
    assert summary.exit_code == EXIT_OK and summary.ok == len(names)
    assert "torch.compile reduce-overhead" in summary.model_path and f"fixed batch {BATCH}" in summary.model_path
    assert summary.warmup_seconds > 0
    assert re.search(r"G: kernels=auto -> torch, float32, channels_last, torch\.compile reduce-overhead.*"
                     r"first batch \(compilation, graph capture; not in the rate\) \d+\.\d s", caplog.text)
    for n in names:
        _assert_matches_reference(_pixels(out / n), _pixels(single[1] / n), f"compiled {n}")


def test_png_encoder_lossless_at_every_level_and_atomic(tmp_path):
    """encode_png at levels 0 (stored), 1 (RLE + SUB, the default) and 9 decodes (PIL) to the exact array;
    write_atomic leaves only the final file."""
    import io

    from gafh_fast.inference.outputs import encode_png, write_atomic

    rng = np.random.default_rng(3)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64)))
    for name, a in (("noise", rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)), ("smooth", smooth)):
        for level in (0, 1, 9):
            with Image.open(io.BytesIO(encode_png(a, level))) as im:
                assert im.mode == "RGB" and np.array_equal(np.asarray(im), a), (name, level)
    write_atomic(smooth, tmp_path / "x.png", "png", 1)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"] and np.array_equal(_pixels(tmp_path / "x.png"), smooth)


def test_bounding_stage_by_hand():
    """The done line's verdict: the stage rank 0 waited on for over a tenth of the run after the first batch."""
    from gafh_fast.inference.runner import bounding_stage

    # 15 s run, 5 s of it for the first batch: 10 s steady, so the threshold is 1 s
    assert bounding_stage({"decode": 2.0, "write": 0.1, "first_batch": 5.0}, 15.0) == "decode"
    assert bounding_stage({"decode": 0.5, "write": 0.9, "first_batch": 5.0}, 15.0) == "model"
    assert bounding_stage({"decode": 0.5, "write": 1.1, "first_batch": 5.0}, 15.0) == "write"
    assert bounding_stage({"decode": 1.2, "write": 0.0, "first_batch": 0.0}, 15.0) == "model"  # 1.2 < 1.5


def test_listing_names_and_completeness_check(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.png").write_bytes(b"x")
    items = list_inputs(tmp_path, exclude=tmp_path / "out")
    # hidden files and the output folder are left out; a.jpg keeps its suffix so no two share an output
    assert sorted((Path(i.source).name, i.rel_stem) for i in items) == [("a.jpg", "a.jpg"), ("a.png", "a")]
    good = tmp_path / "g.png"
    Image.new("RGB", (256, 256)).save(good)
    assert output_complete(good, 256, "png") and not output_complete(good, 128, "png")
    (tmp_path / "t.png").write_bytes(good.read_bytes()[:-5])
    assert not output_complete(tmp_path / "t.png", 256, "png")
    assert not output_complete(tmp_path / "missing.png", 256, "png")


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def test_evaluation_equals_direct_metrics(ws, evaluated):
    proc, out = evaluated
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {Path(r["path"]).name: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [f"h{i}.png" for i in range(3)]
    names = sorted(rows)
    hrs, lrs, written = [], [], []
    for name in names:
        with Image.open(ws["hr"] / name) as im:  # the spec: centre square, BICUBIC 256, BICUBIC 32 (8-bit)
            w, h = im.size
            s = min(w, h)
            hr_im = im.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            hr_im = hr_im.resize((256, 256), Image.BICUBIC)
            lr_im = hr_im.resize((32, 32), Image.BICUBIC)
        hrs.append(np.asarray(hr_im))
        lrs.append(np.asarray(lr_im))
        written.append(_pixels(out / name))  # G's result as saved: the run scores exactly this image
        _assert_matches_reference(written[-1], _g_reference(ws["weights"], lrs[-1]), name)
    to_t = lambda arrays: torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # noqa: E731  (N, 3, H, W)
    hr01 = to_t(hrs).double() / 255
    lr = to_t(lrs).float().sub(127.5).div(127.5)
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["images"] == 3
    table = {"gafh_ridn": "GAFH-RIDN (this run)", "bicubic": "Bicubic (this run)"}
    for method, x in (("gafh_ridn", to_t(written).double() / 255), ("bicubic", (metrics.bicubic_upsample(lr) + 1) / 2)):
        direct = {"psnr_rgb": metrics.psnr(x, hr01), "ssim_rgb": metrics.ssim(x, hr01),
                  "psnr_y": metrics.psnr(x, hr01, channel="y", crop_border=8),
                  "ssim_y": metrics.ssim(x, hr01, channel="y", crop_border=8)}
        for k, values in direct.items():
            got = [rows[name][method][k] for name in names]
            assert got == pytest.approx(values.tolist(), rel=1e-9, abs=1e-9), (method, k)
            assert summary["means"][method][k] == pytest.approx(float(values.mean()), rel=1e-9), (method, k)
        # the printed table's row for this method carries this run's means (PSNR to 2 places, SSIM to 4)
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(table[method]))
        printed = [float(v) for v in line[len(table[method]):].split()]
        means = [float(direct[k].mean()) for k in ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")]
        assert printed == pytest.approx(means, abs=0.5e-2 + 1e-9) and \
            [printed[1], printed[3]] == pytest.approx([means[1], means[3]], abs=0.5e-4 + 1e-9), (method, line)
    assert {r["rank"] for r in _manifest(out)} == {0, 1}


# ------------------------------------------------------------------------------------------------
# The DALI decoder's graph, on DALI's CPU operators (the GPU run uses the same graph with "mixed")
# ------------------------------------------------------------------------------------------------
def test_dali_graph_matches_pil_and_reports_bad_files(ws):
    pytest.importorskip("nvidia.dali")
    from gafh_fast.inference.dali_decode import DaliBatches
    from gafh_fast.inference.decode import PooledBatches
    from gafh_fast.inference.inputs import LrDecoder, load_lr_uint8

    items = list_inputs(ws["faces"])
    pil = PooledBatches(items, 4, LrDecoder(32, MAX_PIXELS), 2)
    dali = DaliBatches(items, 4, 32, torch.device("cpu"), 2, MAX_PIXELS, pil)
    decoded, failed = {}, {}
    for batch in dali:
        failed.update((Path(it.source).name, reason) for it, reason in batch.failures)
        for i, it in enumerate(batch.items):
            decoded[it.rel_stem] = (it.source, batch.tensors[0][i].numpy())
    assert sorted(failed) == sorted(BAD)  # trunc.png passes the header check: DALI fails, PIL names it
    assert len(decoded) == ws["good"]
    for stem, (source, got) in decoded.items():
        expected = load_lr_uint8(source, 32, MAX_PIXELS)
        diff = np.abs(got.astype(int) - expected).max()
        # PNG inputs: identical (crop + antialiased cubic reproduce PIL here, 48x40 included); a JPEG
        # may decode a level or two apart between DALI's decoder and PIL's libjpeg
        assert diff <= (0 if source.endswith(".png") else 2), (stem, diff)


# ------------------------------------------------------------------------------------------------
# GPU (runs only where CUDA is present; never ran on the CPU-only machine this was written on)
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoders_agree_and_compile_runs(ws, single, caplog):
    """bf16 + channels_last on the GPU, DALI vs PIL decoding (both eager), and the default: --compile auto is
    torch.compile reduce-overhead (CUDA graphs) on the padded batch."""
    common = ["--weights", str(ws["weights"]), "--input", str(ws["faces"]), "--batch-size", BATCH,
              "--max-pixels", str(MAX_PIXELS), "--no-progress", "--device", "cuda"]
    outs = {}
    for name, extra in {"pil": ["--decoder", "pil", "--compile", "off"], "dali": ["--decoder", "dali", "--compile",
                        "off"], "compiled": ["--decoder", "pil"]}.items():
        outs[name] = ws["root"] / f"out_cuda_{name}"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gafh_fast"):
            assert _launch_main()(common + ["--output", str(outs[name])] + extra) == EXIT_SOME_FAILED
        assert ("torch.compile reduce-overhead" in caplog.text) == (name == "compiled"), caplog.text
        assert [(r["path"], r["status"]) for r in _manifest(outs[name])] == \
            [(r["path"], r["status"]) for r in _manifest(single[1])]
    as_is = {"f0.png", "f1.png", "f2.png", "f3.png", "f4.png", "f5.png", "f6.png", "sub/deeper/d.png",
             "sub/grey.png", "sub/rgba.png"}  # 32x32 PNG inputs: no resize, so both decoders give the file's pixels
    for r in _manifest(single[1]):
        if r["status"] == "ok":
            pil, cpu = _pixels(outs["pil"] / r["output"]).astype(int), _pixels(single[1] / r["output"])
            # bf16 on the GPU vs fp32 on the CPU (and compiled vs eager bf16): a mean gap of < 2 of 255 levels
            # (thresholds not yet calibrated on a GPU)
            assert np.abs(pil - cpu).mean() < 2.0, r["output"]
            assert np.abs(pil - _pixels(outs["compiled"] / r["output"])).mean() < 2.0, r["output"]
            if r["output"] in as_is:
                assert np.array_equal(pil, _pixels(outs["dali"] / r["output"])), r["output"]


@pytest.mark.parametrize("kernels, compile_mode, precompiles", [
    ("triton", "on", True), ("triton", "off", True), ("auto", "off", True), ("auto", "on", False), ("torch", "off", False)])
def test_cuda_precompile_call_on_cpu(ws, monkeypatch, kernels, compile_mode, precompiles):
    """On CUDA, load_model compiles every fused Triton variant of G's fixed-batch forward up front
    unless no Triton kernel will run (torch; auto under torch.compile, which takes torch for every shape).
    Here the device checks say CUDA and the compile is a spy; the model is the one the run will use."""
    import gafh_fast.models.generator as generator_module
    import gafh_fast.ops as ops
    from gafh_fast.inference.runner import load_model

    calls = []

    class Report:
        def line(self):
            return "precompile spy report"

    def spy(passes, lr_size, *, workers):
        calls.append((passes, lr_size, workers))
        return Report()

    monkeypatch.setattr(ops, "triton_unavailable_reason", lambda device: None)  # CPU tensors count as CUDA
    monkeypatch.setattr(ops, "wants_precompile", lambda backend, device: backend != "torch")
    monkeypatch.setattr(generator_module, "precompile_kernels", spy)
    monkeypatch.setenv("LOCAL_RANK", "0")
    opts = InferenceOptions(weights=ws["weights"], output=ws["root"] / "unused", kernels=kernels, compile=compile_mode,
                            batch_size=5, device="cpu", progress=False)
    model = load_model(opts, torch.device("cpu"))
    assert bool(calls) == precompiles
    if precompiles:
        ((g, batch, train),), lr_size, workers = calls[0]
        assert (batch, train, lr_size) == (5, False, model.cfg.lr_size)
        assert next(g.parameters()).dtype == model.dtype and not g.training
        assert workers is None  # local rank 0 compiles first, on every core (precompile_node_first)
