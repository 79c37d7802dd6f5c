"""Sharded large-batch inference and evaluation: one process per device under torchrun, or one plain process.

Per rank: list (rank 0, broadcast) -> own shard -> skip complete outputs -> decode ahead (PIL process
pool or DALI) -> G in bf16 / channels_last on a fixed padded batch (torch.compile with CUDA graphs by
default on CUDA) -> 8-bit result -> background writer -> manifest part. Rank 0 then merges the
manifest, and in evaluation mode gathers the per-image scores and prints the table.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from gafh_fast import metrics
from gafh_fast.inference import evaluate
from gafh_fast.inference.decode import PooledBatches
from gafh_fast.inference.inputs import (PIL_DEFAULT_MAX_PIXELS, InferenceUsageError, InputItem, LrDecoder,
                                        PairDecoder, ResizeNotice, assign_output_names, list_inputs,
                                        output_complete, shard)
from gafh_fast.inference.outputs import FAILED, FORMAT_SUFFIX, OK, SKIPPED, ManifestPart, OutputWriter, merge_manifest

log = logging.getLogger("gafh_fast")

EXIT_OK = 0             # every input was hallucinated (or already done)
EXIT_USAGE = 2          # bad flags, unusable weights or input list: nothing was processed
EXIT_SOME_FAILED = 3    # the run finished, but some inputs failed (see manifest.jsonl)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class InferenceOptions:
    weights: Path
    output: Path
    input: Optional[Path] = None          # folder or text file of paths (inference mode)
    input_hr: Optional[Path] = None       # dataset root of HR faces (evaluation mode)
    split: str = "test"                   # evaluation: train | val | test
    layout: Optional[str] = None          # evaluation: data.layout; None = the weights file's
    split_scheme: Optional[str] = None    # evaluation: data.split (official | paper | all); None = the file's
    batch_size: int = 256                 # per rank
    dtype: str = "auto"                   # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    kernels: str = "auto"                 # auto | triton | torch (config key `kernels`)
    compile: str = "auto"                 # auto (on for CUDA) | on | off: torch.compile reduce-overhead
    decoder: str = "auto"                 # auto (DALI when usable) | dali | pil
    decode_workers: Optional[int] = None  # PIL processes (DALI: its threads); None: split_cores()
    write_workers: Optional[int] = None   # PNG / npy writer threads; None: split_cores()
    format: str = "png"                   # png | npy (uint8 (256, 256, 3) per image) | none (evaluation only)
    png_compress_level: int = 1           # zlib level: 1 is ~4x faster to encode than PIL's 6, still lossless
    max_pixels: int = PIL_DEFAULT_MAX_PIXELS
    resume: bool = True                   # inference mode: skip outputs already present and complete
    device: Optional[str] = None          # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    progress: bool = True


@dataclass
class InferenceSummary:
    inputs: int
    ok: int
    skipped: int
    failed: int
    seconds: float
    world_size: int
    decoder: str
    exit_code: int
    waits: dict = field(default_factory=dict)   # rank 0's seconds waiting on decode / writes; first_batch:
                                                # waiting for the first decoded batch (worker start-up)
    evaluation: Optional[dict] = None
    model_path: str = ""                        # what ran G (backend, dtype, compiled or eager, batch shape)
    warmup_seconds: float = 0.0                 # first batch: compile + CUDA graph capture (not in `seconds`)


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool


def init_distributed(device: Optional[str]) -> DistContext:
    """torchrun's env:// rendezvous when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); else one process."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank, world, dev, owns)


def _from_rank0(ctx: DistContext, make):
    """Run make() on rank 0 and hand its result (or its usage error) to every rank."""
    payload = None
    if ctx.rank == 0:
        try:
            payload = ("ok", make())
        except (InferenceUsageError, FileNotFoundError) as e:
            payload = ("error", str(e))
    if ctx.world_size > 1:
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        payload = box[0]
    if payload[0] == "error":
        raise InferenceUsageError(payload[1])
    return payload[1]


def _sum_over_ranks(ctx: DistContext, values: list[int]) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    if ctx.world_size > 1:
        dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: torch.nn.Module      # the generator, or its torch.compile wrapper
    cfg: object                 # the config stored in the weights file
    dtype: torch.dtype
    compiled: bool
    path: str                   # in words: backend, dtype, compiled or eager, the batch shape
    warmup_seconds: float = 0.0


def load_model(opts: InferenceOptions, device: torch.device) -> LoadedModel:
    """G built from the config inside the weights file; any mismatch or unusable request -> usage error."""
    from gafh_fast.export import load_generator, read_generator_config
    from gafh_fast.ops import KernelUnavailableError, resolve_backend, wants_precompile

    try:
        cfg = read_generator_config(opts.weights)
    except Exception as e:  # missing file, not safetensors, no gafh_fast metadata
        raise InferenceUsageError(f"--weights {opts.weights}: {e}") from e
    cfg.kernels = opts.kernels
    try:
        generator, cfg = load_generator(opts.weights, cfg, device="cpu")  # safetensors: no pickle
        backend = resolve_backend(opts.kernels, device)
    except (ValueError, KernelUnavailableError) as e:
        raise InferenceUsageError(str(e)) from e
    dtype = DTYPES["bf16" if device.type == "cuda" else "fp32"] if opts.dtype == "auto" else DTYPES[opts.dtype]
    generator = generator.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    # the device decides only the default: `--compile on` runs the same torch.compile call on CPU, where
    # inductor leaves CUDA graphs out by itself
    compiled = opts.compile == "on" or (opts.compile == "auto" and device.type == "cuda")
    # kernels=auto under torch.compile takes torch for every shape (no timing inside a trace): then
    # no Triton kernel runs and none is compiled up front
    if wants_precompile(opts.kernels, device) and (backend == "triton" or not compiled):
        from gafh_fast.models.generator import precompile_node_first

        world = dist.get_world_size() if dist.is_initialized() else 1
        log.info(precompile_node_first([(generator, opts.batch_size, False)], cfg.lr_size,
                                       int(os.environ.get("LOCAL_RANK", "0")), world))
    model = torch.compile(generator, mode="reduce-overhead", dynamic=False) if compiled else generator
    path = (f"kernels={opts.kernels} -> {backend}, {str(dtype).replace('torch.', '')}, channels_last, "
            + ("torch.compile reduce-overhead (CUDA graphs on CUDA)" if compiled else "eager")
            + f" (--compile {opts.compile}), fixed batch {opts.batch_size} (short batches zero-padded)")
    return LoadedModel(model, cfg, dtype, compiled, path)


def warm_up(model, compiled: bool, batch_size: int, lr_size: int, dtype: torch.dtype,
            device: torch.device) -> float:
    """Seconds for the first batch on zeros: compilation and CUDA graph capture happen here, not in the run.

    reduce-overhead compiles on the first call, records the graph on the second and replays from the
    third; eager needs one call (cuDNN picks its algorithms). `.cpu()` waits for the device.
    """
    zeros = torch.zeros((batch_size, lr_size, lr_size, 3), dtype=torch.uint8, device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(3 if compiled else 1):
            forward_padded(model, zeros, dtype, batch_size).cpu()
    return time.perf_counter() - start


def split_cores(opts: InferenceOptions, decoder: str) -> tuple[int, int]:
    """(decode workers, write workers) as given, else this rank's share of the cores: a PNG encode costs
    about 10x a 32x32 decode, so decoding gets an eighth (at least 1) and the writer the rest."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    decode = opts.decode_workers or max(1, cores // 8)
    write = opts.write_workers or max(1, cores - (decode if decoder == "pil" else 0))
    return decode, write


def u8_nhwc_to_signed(u8_nhwc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, h, w, 3) uint8 -> (N, 3, h, w) in [-1, 1], channels_last (a permuted view of NHWC memory)."""
    return u8_nhwc.permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5).to(dtype)


def to_uint8_nchw(hf: torch.Tensor) -> torch.Tensor:
    """G's [-1, 1] output -> the 8-bit image that is saved, rounded exactly as gafh_fast.metrics rounds."""
    return metrics.to_uint8_levels((hf.float() + 1) / 2).to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# What to process
# ------------------------------------------------------------------------------------------------
def _list_for_inference(opts: InferenceOptions):
    items = list_inputs(opts.input, exclude=opts.output)
    if not items:
        raise InferenceUsageError(f"--input {opts.input}: no files found")
    return items, [], {}


def _list_for_evaluation(opts: InferenceOptions, cfg):
    """The data package's split and crop windows; files its cheap check rejects are failed inputs."""
    from gafh_fast.data.layouts import LayoutError, index_split

    root = Path(opts.input_hr).expanduser()
    layout, scheme = opts.layout or cfg.data.layout, opts.split_scheme or cfg.data.split
    try:
        index = index_split(root, layout, scheme, opts.split, seed=cfg.data.seed,
                            num_threads=opts.decode_workers)
    except (LayoutError, ValueError) as e:
        raise InferenceUsageError(f"--input-hr {root}: {e}") from e
    rel = lambda p: Path(os.path.relpath(p, root)).as_posix()  # noqa: E731
    items = assign_output_names([(s.path, rel(s.path)) for s in index.samples])
    failed = assign_output_names([(p, rel(p)) for p, _ in index.skipped])
    reasons = [r for _, r in index.skipped]
    windows = {s.path: s.window for s in index.samples}
    return items, list(zip(failed, reasons)), windows


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def run_inference(opts: InferenceOptions) -> InferenceSummary:
    _check_options(opts)
    ctx = init_distributed(opts.device)
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # a decompression bomb is a failed input, never a warning: PIL warns past MAX_IMAGE_PIXELS
            warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = opts.max_pixels or None
            return _run(opts, ctx)
    finally:
        Image.MAX_IMAGE_PIXELS = max_pixels_before  # process-global PIL state: leave it as found
        if ctx.owns_group:
            dist.destroy_process_group()


def _check_options(opts: InferenceOptions) -> None:
    if (opts.input is None) == (opts.input_hr is None):
        raise InferenceUsageError("give exactly one of --input (faces to hallucinate) "
                                  "or --input-hr (HR faces to evaluate on)")
    if opts.format == "none" and opts.input_hr is None:
        raise InferenceUsageError("--format none writes nothing; it is only meaningful with --input-hr")
    if opts.batch_size < 1 or any(n is not None and n < 1 for n in (opts.decode_workers, opts.write_workers)):
        raise InferenceUsageError("--batch-size, --decode-workers and --write-workers must be >= 1")
    if opts.compile not in ("auto", "on", "off"):
        raise InferenceUsageError(f"--compile must be auto, on or off, got {opts.compile!r}")


def _run(opts: InferenceOptions, ctx: DistContext) -> InferenceSummary:
    evaluating = opts.input_hr is not None
    decoder, _ = choose_decoder(opts, ctx.device)  # flag errors before anything is read or written
    decode_workers, write_workers = split_cores(opts, decoder)
    opts = replace(opts, decode_workers=decode_workers, write_workers=write_workers)
    g = load_model(opts, ctx.device)
    cfg = g.cfg
    lr_size, hr_size = cfg.lr_size, cfg.data.hr_size
    out_dir = Path(opts.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    items, listed_failures, windows = _from_rank0(
        ctx, (lambda: _list_for_evaluation(opts, cfg)) if evaluating else (lambda: _list_for_inference(opts)))
    mine = shard(items, ctx.rank, ctx.world_size)
    manifest = ManifestPart(out_dir, ctx.rank)
    if ctx.rank == 0:
        for item, reason in listed_failures:
            manifest.add(item, None, FAILED, reason)

    suffix = FORMAT_SUFFIX.get(opts.format, "")
    todo = mine
    if opts.resume and not evaluating:  # evaluation always scores (and rewrites) every image
        with ThreadPoolExecutor(opts.write_workers) as pool:  # header + trailer reads: I/O, GIL released
            done = list(pool.map(lambda it: output_complete(it.output(out_dir, suffix), hr_size, opts.format), mine))
        todo = [it for it, d in zip(mine, done) if not d]
        for it in (it for it, d in zip(mine, done) if d):
            manifest.add(it, it.rel_stem + suffix, SKIPPED)
    (global_todo,) = _sum_over_ranks(ctx, [len(todo)])

    batches, decoder = _make_batches(opts, ctx, todo, windows, lr_size, hr_size)
    with iter(batches) as iterator:  # decoding starts now, while G compiles
        g.warmup_seconds = warm_up(g.model, g.compiled, opts.batch_size, lr_size, g.dtype, ctx.device)
        if ctx.rank == 0:
            log.info("G: %s; first batch (compilation, graph capture; not in the rate) %.1f s",
                     g.path, g.warmup_seconds)
        return _loop(opts, ctx, g, iterator, manifest, global_todo, decoder)


def _loop(opts: InferenceOptions, ctx: DistContext, g: LoadedModel, iterator, manifest: ManifestPart,
          global_todo: int, decoder: str) -> InferenceSummary:
    """Decoded batches -> G -> writer / scores, then the manifest and the summary."""
    evaluating = opts.input_hr is not None
    out_dir, cfg = Path(opts.output), g.cfg

    writer = None if opts.format == "none" else OutputWriter(
        out_dir, opts.format, opts.write_workers, manifest, opts.png_compress_level,
        max_in_flight=max(4 * opts.batch_size, 64))
    if ctx.rank == 0 and writer is not None:
        log.info("writing %s in %d threads%s", opts.format, opts.write_workers,
                 " (libpng via imagecodecs, GIL released while encoding)" if opts.format == "png" else "")
    rows: list[dict] = []
    bar = tqdm(total=global_todo, disable=ctx.rank != 0 or not opts.progress, unit="img", dynamic_ncols=True,
               desc="evaluate" if evaluating else "hallucinate", smoothing=0.1)
    start, decode_wait, first_wait, pending = time.perf_counter(), 0.0, None, None
    while True:
        t0 = time.perf_counter()
        batch = next(iterator, None)
        if first_wait is None:  # start-up (worker processes, DALI's pipeline), not the decoder's pace
            first_wait = time.perf_counter() - t0
        else:
            decode_wait += time.perf_counter() - t0
        if batch is None:
            break
        for item, reason in batch.failures:
            manifest.add(item, None, FAILED, reason)
        if len(batch):
            lr_u8 = batch.tensors[0].to(ctx.device, non_blocking=True)
            with torch.inference_mode():
                hf_u8 = forward_padded(g.model, lr_u8, g.dtype, opts.batch_size)  # (n, 3, H, W)
                if evaluating:
                    hr_u8 = batch.tensors[1].to(ctx.device, non_blocking=True)
                    scores = evaluate.score_batch(hf_u8, u8_nhwc_to_signed(hr_u8, torch.float32),
                                                  u8_nhwc_to_signed(lr_u8, torch.float32), cfg.val.crop_border)
                    rows += evaluate.rows_for_batch([it.source for it in batch.items], scores)
            if writer is None:  # --format none: scored, nothing to write
                for it in batch.items:
                    manifest.add(it, None, OK)
            else:
                # async device-to-host copy; the writes are queued after the NEXT batch is launched
                previous = pending
                pending = _start_copy(batch.items, hf_u8.permute(0, 2, 3, 1), ctx.device.type == "cuda")
                if previous is not None:
                    _queue_writes(writer, *previous)
        bar.update(min((len(batch) + len(batch.failures)) * ctx.world_size, bar.total - bar.n))
    if pending is not None:
        _queue_writes(writer, *pending)
    if writer is not None:
        writer.close()
    bar.close()
    manifest.close()
    seconds = time.perf_counter() - start
    waits = {"decode": round(decode_wait, 3), "write": round(writer.wait_seconds if writer else 0.0, 3),
             "first_batch": round(first_wait or 0.0, 3)}
    ok, skipped, failed = _sum_over_ranks(ctx, [manifest.counts[OK], manifest.counts[SKIPPED], manifest.counts[FAILED]])
    if ctx.world_size > 1:
        dist.barrier()  # every part file is closed before rank 0 reads them
    evaluation = None
    if evaluating:
        rows = evaluate.gather_rows(rows, ctx.world_size)
        evaluation = evaluate.summarise(rows, cfg.val.crop_border)
    summary = InferenceSummary(ok + skipped + failed, ok, skipped, failed, seconds, ctx.world_size, decoder,
                               EXIT_SOME_FAILED if failed else EXIT_OK, waits, evaluation, g.path, g.warmup_seconds)
    if ctx.rank == 0:
        merge_manifest(out_dir, ctx.world_size)
        if evaluating:
            evaluate.write_results(out_dir, rows, evaluation)
            print(evaluate.format_table(evaluation), flush=True)
        print(summary_line(summary, out_dir), flush=True)
    if ctx.world_size > 1:
        dist.barrier()  # nobody exits (and tears the group down) before rank 0 has merged
    return summary


def choose_decoder(opts: InferenceOptions, device: torch.device) -> tuple[str, Optional[str]]:
    """("dali" | "pil", why not DALI); an explicit --decoder dali that cannot run is a usage error."""
    from gafh_fast.inference.dali_decode import dali_unavailable_reason

    evaluating = opts.input_hr is not None
    reason = dali_unavailable_reason(device)
    if opts.decoder == "dali" and evaluating:
        raise InferenceUsageError("--decoder dali: evaluation decodes with the data package's PIL reference loader")
    if opts.decoder == "dali" and reason:
        raise InferenceUsageError(f"--decoder dali: {reason}")
    if opts.decoder == "pil":
        reason = "--decoder pil"
    return ("dali" if opts.decoder != "pil" and not evaluating and reason is None else "pil"), reason


def _make_batches(opts: InferenceOptions, ctx: DistContext, todo: list[InputItem], windows: dict,
                  lr_size: int, hr_size: int):
    """Decoding: DALI on the GPU when it can run here, else the PIL process pool (into pinned memory on CUDA)."""
    from gafh_fast.inference.dali_decode import DaliBatches

    evaluating = opts.input_hr is not None
    pin = ctx.device.type == "cuda"  # page-locked host memory exists only with CUDA: async uploads
    if evaluating:
        decode = PairDecoder(hr_size, lr_size, {it.source: windows[it.source] for it in todo})  # (lr, hr)
    else:
        decode = LrDecoder(lr_size, opts.max_pixels)
    batches = PooledBatches(todo, opts.batch_size, decode, opts.decode_workers, pin,
                            on_resized=None if evaluating else ResizeNotice(lr_size))
    decoder, dali_reason = choose_decoder(opts, ctx.device)
    if decoder == "dali":
        batches = DaliBatches(todo, opts.batch_size, lr_size, ctx.device, opts.decode_workers,
                              opts.max_pixels, pil_fallback=batches)
    if ctx.rank == 0:
        log.info("decoding with %s", "DALI on the GPU (nvImageCodec), crop + antialiased cubic resize on the GPU"
                 if decoder == "dali" else f"PIL in {opts.decode_workers} worker processes into "
                 f"{'pinned' if pin else 'ordinary (CPU run)'} memory"
                 + ("" if decoder == "dali" or evaluating else f"; not DALI: {dali_reason or '--decoder pil'}"))

    return batches, decoder


def forward_padded(model, lr_u8: torch.Tensor, dtype: torch.dtype, pad_to: int) -> torch.Tensor:
    """G on n <= pad_to faces, always run as a batch of exactly pad_to (zero-padded).

    One shape serves CUDA graphs, and it makes each image's result independent of its batch-mates,
    of the rank count and of the thread count: convolution backends pick their algorithm by shape
    (oneDNN sums a 32x32 batch of 1 in another order than a batch of 3: 1-level differences in the
    8-bit result), but within one shape each image's sums do not depend on its position.
    """
    n = lr_u8.shape[0]
    x = u8_nhwc_to_signed(lr_u8, dtype)
    if n < pad_to:
        x = torch.cat([x, x.new_zeros((pad_to - n,) + tuple(x.shape[1:]))]).contiguous(
            memory_format=torch.channels_last)
    return to_uint8_nchw(model(x)[:n])


def _start_copy(items: list[InputItem], hf_nhwc: torch.Tensor, pin: bool):
    if not pin:
        return items, hf_nhwc.contiguous(), None
    host = torch.empty(hf_nhwc.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(hf_nhwc, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return items, host, done


def _queue_writes(writer: OutputWriter, items: list[InputItem], host: torch.Tensor, done) -> None:
    if done is not None:
        done.synchronize()  # waits for this batch's copy only; the next batch is already queued on the GPU
    arrays = host.numpy()
    for i, item in enumerate(items):
        writer.submit(item, arrays[i])


def bounding_stage(waits: dict, seconds: float) -> str:
    """"decode" or "write" when rank 0 spent over a tenth of the run (after the first batch) waiting on
    that stage, else "model"."""
    steady = {k: waits.get(k, 0.0) for k in ("decode", "write")}
    worst = max(steady, key=steady.get)
    return worst if steady[worst] > 0.1 * (seconds - waits.get("first_batch", 0.0)) else "model"


def summary_line(s: InferenceSummary, out_dir: Path) -> str:
    rate = s.ok / s.seconds if s.seconds > 0 else 0.0
    return (f"done: {s.inputs} inputs | {s.ok} ok, {s.skipped} skipped-existing, {s.failed} failed | "
            f"{s.ok} images in {s.seconds:.1f} s = {rate:.1f} img/s over {s.world_size} rank(s), "
            f"after a {s.warmup_seconds:.1f} s first batch | bound by {bounding_stage(s.waits, s.seconds)}: "
            f"rank 0 waited {s.waits.get('decode', 0):.1f} s on decode ({s.decoder}) after "
            f"{s.waits.get('first_batch', 0):.1f} s for the first batch, {s.waits.get('write', 0):.1f} s on writes "
            f"| manifest {out_dir / 'manifest.jsonl'}"
            + (f" | exit {s.exit_code}: some inputs failed" if s.exit_code else ""))
