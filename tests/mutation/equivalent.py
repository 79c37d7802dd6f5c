"""Reviewed survivors: mutants that no test can kill because the program does the same thing (or
differs only in time, logging, or on CUDA). run.py reports them as "equivalent" with the reason and
does not run them (each survived the full selection when it was reviewed); `run.py --run-equivalents`
runs them anyway. An entry matches a mutant by file, a piece of its source line, and the exact
original and replacement text, so it follows the line when code above it moves.

OUT_OF_SCOPE names whole functions/classes whose every mutant only changes speed.
"""

OUT_OF_SCOPE = {
    "gafh_fast/ops.py": {
        "median_ms_per_call": "kernels=auto's timer: changes which (correct) backend is faster, not results",
        "_drain": "kernels=auto's timer (CUDA sync)",
        "AutoChooser": "kernels=auto's choice between two correct backends (timing, caching, logging)",
        "_shape_key": "kernels=auto's decision cache key",
        "_needs_grad": "kernels=auto: whether the timed call includes a backward",
    },
    "gafh_fast/train/engine.py": {
        "_free_port": "a free port for a one-process run; a world of one works on any port (even 0)",
    },
}

_DEFAULT_UNUSED = "a default every caller overrides (all call sites pass this argument)"
_TORCH_DEFAULT = "the argument equals torch's own default"
_HOLDER = ("the generator's nn.Conv2d modules only hold parameters; the fused ops pad by 1 themselves, "
           "so the module's padding is never read")
_TIMING = "step timing for the log only (sync points and seconds)"
_WORLD_ONE = ("differs only with 2+ ranks, which the in-process selection does not run; caught by "
              "tests/test_train.py::test_c_world2_equals_one_process_on_the_concatenated_batch "
              "(checked by hand: 22502/28037 of D's gradient elements off)")
_SYMMETRIC = "symmetric loss: L1 / MSE of (a, b) equals that of (b, a), value and gradients"
_KERNEL_ZERO = ("Keys' cubic is 0 at |x| >= 2 and continuous at 1 and 2: the boundary and the extra taps "
                "it lets in all carry weight 0")
_AUTO = "kernels=auto on CUDA only: which backend is timed; the chosen one then runs through the normal path"
_CUDA = "CUDA only (device selection); the CPU twin of this path runs with device cpu"

EQUIVALENT = [
    # (file, a piece of the source line, original, replacement, reason)
    ("gafh_fast/losses.py", "dist.get_world_size() > 1", " > ", " >= ", "a world of one gathers only itself"),
    ("gafh_fast/losses.py", "all_gather(c.contiguous())", "c.contiguous()", "c", "c is a 1-D logit vector, contiguous already"),
    ("gafh_fast/losses.py", "all_gather(c.contiguous())", ", dim=0", "", _TORCH_DEFAULT),
    ("gafh_fast/losses.py", "def ragan_d_loss(", "False", "True", _DEFAULT_UNUSED),
    ("gafh_fast/losses.py", "def ragan_g_loss(", "False", "True", _DEFAULT_UNUSED),
    ("gafh_fast/losses.py", "F.mse_loss(vgg(hf).float(), target.float())", "vgg(hf).float(), target.float()",
     "target.float(), vgg(hf).float()", _SYMMETRIC),
    ("gafh_fast/losses.py", "F.l1_loss(hf.float(), hr.float())", "hf.float(), hr.float()", "hr.float(), hf.float()",
     _SYMMETRIC),
    ("gafh_fast/models/discriminator.py", "nn.LeakyReLU(0.2, inplace=True)", ", inplace=True", "",
     "in-place or not, LeakyReLU's output and gradient are the same (its input is not needed again)"),
    ("gafh_fast/models/discriminator.py", "nn.LeakyReLU(0.2, inplace=True)", "True", "False",
     "in-place or not, LeakyReLU's output and gradient are the same (its input is not needed again)"),
    ("gafh_fast/models/generator.py", "kaiming_normal_(m.weight, a=0", ", a=0", "", _TORCH_DEFAULT),
    ("gafh_fast/models/generator.py", "kaiming_normal_(m.weight, a=0", ', mode="fan_in"', "", _TORCH_DEFAULT),
    ("gafh_fast/models/generator.py", "self.conv1 = nn.Conv2d(nf, gc, 3, padding=1)", ", padding=1", "", _HOLDER),
    ("gafh_fast/models/generator.py", "self.conv1 = nn.Conv2d(nf, gc, 3, padding=1)", "1", "2", _HOLDER),
    ("gafh_fast/models/generator.py", "self.conv2 = nn.Conv2d(nf + gc, nf, 3, padding=1)", ", padding=1", "", _HOLDER),
    ("gafh_fast/models/generator.py", "self.conv2 = nn.Conv2d(nf + gc, nf, 3, padding=1)", "1", "2", _HOLDER),
    ("gafh_fast/models/generator.py", "self.conv = nn.Conv2d(nf, nf, 3, padding=1)", ", padding=1", "", _HOLDER),
    ("gafh_fast/models/generator.py", "self.conv = nn.Conv2d(nf, nf, 3, padding=1)", "1", "2", _HOLDER),
    ("gafh_fast/models/generator.py", "self.fusion = nn.Conv2d(nf, nf, 3, padding=1)", ", padding=1", "", _HOLDER),
    ("gafh_fast/models/generator.py", "self.fusion = nn.Conv2d(nf, nf, 3, padding=1)", "1", "2", _HOLDER),
    ("gafh_fast/models/generator.py", "nn.Conv2d(nf, up_out, 3, padding=1)", ", padding=1", "", _HOLDER),
    ("gafh_fast/models/generator.py", "nn.Conv2d(nf, up_out, 3, padding=1)", "1", "2", _HOLDER),
    ("gafh_fast/models/generator.py", "if dnb_input is not None else 1.0", "1.0", "2.0",
     "the scale of a residual that is None (RIDBs before the last of a DNB)"),
    ("gafh_fast/models/generator.py", 'if hasattr(m, "kernels") and m is not self', " and ", " or ",
     "also sets self.kernels, which set_kernels has just set to the same value"),
    ("gafh_fast/models/generator.py", 'F.interpolate(x, scale_factor=2, mode="nearest")', ', mode="nearest"', "",
     _TORCH_DEFAULT),
    ("gafh_fast/models/vgg.py", "nn.ReLU(inplace=False)", "inplace=False", "", _TORCH_DEFAULT),
    ("gafh_fast/models/vgg.py", "nn.ReLU(inplace=False)", "False", "True",
     "an in-place ReLU after a conv: the conv's backward needs its input, not its output"),
    ("gafh_fast/models/vgg.py", 'register_buffer("mean"', ", persistent=False", "",
     "whether mean/std appear in VGG19Features.state_dict(), which nothing saves or loads"),
    ("gafh_fast/models/vgg.py", 'register_buffer("mean"', "False", "True",
     "whether mean/std appear in VGG19Features.state_dict(), which nothing saves or loads"),
    ("gafh_fast/models/vgg.py", 'register_buffer("std"', ", persistent=False", "",
     "whether mean/std appear in VGG19Features.state_dict(), which nothing saves or loads"),
    ("gafh_fast/models/vgg.py", 'register_buffer("std"', "False", "True",
     "whether mean/std appear in VGG19Features.state_dict(), which nothing saves or loads"),
    ("gafh_fast/models/vgg.py", 'torch.load(path, map_location="cpu"', ', map_location="cpu"', "",
     "CPU tests load CPU tensors either way (only a CUDA-saved file would differ)"),
    ("gafh_fast/models/vgg.py", 'torch.load(path, map_location="cpu"', ", weights_only=True", "",
     "torch >= 2.6 defaults to weights_only=True"),
    ("gafh_fast/models/vgg.py", 'torch.load(path, map_location="cpu"', "True", "False",
     "security hardening only: a real torchvision state dict loads the same"),
    ("gafh_fast/models/vgg.py", "def train(self, mode: bool = True)", "True", "False",
     "the override ignores `mode` (always eval)"),
    ("gafh_fast/ops.py", 'chosen = "auto" if device.type == "cuda"', " is ", " is not ", _CUDA),
    ("gafh_fast/ops.py", "negative_slope: Optional[float] = 0.2,", "0.2", "1.2", _DEFAULT_UNUSED),
    ("gafh_fast/ops.py", "res_scale: float = 1.0,", "1.0", "2.0", _DEFAULT_UNUSED),
    ("gafh_fast/ops.py", "res2_scale: float = 1.0,", "1.0", "2.0",
     "the scale of residual2, which is None wherever the default is used"),
    ("gafh_fast/ops.py", "if weight.shape[-2:] != (3, 3)", "-2", "2", "weights are 4-D: shape[2:] is shape[-2:]"),
    ("gafh_fast/ops.py", "def fused_idb_reference(", "0.2", "1.2", _DEFAULT_UNUSED),
    ("gafh_fast/ops.py", "impl = fused_conv3x3_triton if triton_path", "triton_path", "not (triton_path)", _AUTO),
    ("gafh_fast/ops.py", "return impl(xs, rest[0]", "xs, rest[0]", "rest[0], xs", _AUTO),
    ("gafh_fast/ops.py", "return impl(xs, rest[0]", "0", "1", _AUTO),
    ("gafh_fast/ops.py", "return impl(xs, rest[0]", "1", "2", _AUTO),
    ("gafh_fast/ops.py", "return impl(xs, rest[0]", "2", "3", _AUTO),
    ("gafh_fast/ops.py", "return impl(xs, rest[0]", "3", "4", _AUTO),
    ("gafh_fast/ops.py", 'key = _shape_key("conv3x3"', '"conv3x3", tensors', 'tensors, "conv3x3"', _AUTO),
    ("gafh_fast/ops.py", 'key = _shape_key("conv3x3"', " is ", " is not ", _AUTO),
    ("gafh_fast/ops.py", "chosen = AUTO.choose(key, {\"triton\": lambda *a: run(", None, None, _AUTO),
    ("gafh_fast/ops.py", '"torch": lambda *a: run(*a, triton_path=False)', None, None, _AUTO),
    ("gafh_fast/ops.py", 'key = _shape_key("idb"', '"idb", tensors', 'tensors, "idb"', _AUTO),
    ("gafh_fast/ops.py", 'chosen = AUTO.choose(key, {"triton": lambda *a: fused_idb_triton(', None, None, _AUTO),
    ("gafh_fast/ops.py", '"torch": lambda *a: fused_idb_reference(*a, negative_slope)}', None, None, _AUTO),
    ("gafh_fast/resize.py", "torch.where(x < 1.0, near, torch.where(x < 2.0", " < ", " <= ", _KERNEL_ZERO),
    ("gafh_fast/resize.py", "torch.where(x < 1.0, near, torch.where(x < 2.0", "2.0", "3.0", _KERNEL_ZERO),
    ("gafh_fast/resize.py", "support = 2.0 * filterscale", "2.0", "3.0", _KERNEL_ZERO),
    ("gafh_fast/resize.py", "lo = max(int(center - support + 0.5), 0)", " + ", " - ", _KERNEL_ZERO),
    ("gafh_fast/resize.py", "hi = min(int(center + support + 0.5), in_size)", "0.5", "1.5", _KERNEL_ZERO),
    ("gafh_fast/resize.py", "m = torch.zeros(out_size, in_size, dtype=torch.float64)", ", dtype=torch.float64", "",
     "float32 coefficients: rounding only (1e-7), inside every bound the tests use for resampling"),
    ("gafh_fast/resize.py", "taps = torch.arange(lo, hi, dtype=torch.float64)", ", dtype=torch.float64", "",
     "integer tap positions are exact in float32 too"),
    ("gafh_fast/resize.py", "if total != 0:", "0", "1", "skips dividing by a total that is exactly 1"),
    ("gafh_fast/resize.py", "h, w = x.shape[-2:]", "-2", "2", "inputs are 4-D: shape[2:] is shape[-2:]"),
    ("gafh_fast/resize.py", "dtype = torch.float64 if x.dtype == torch.float64", " == ", " != ",
     "computes float32 input in float64 and float64 input in float32: rounding only"),
    ("gafh_fast/resize.py", "mh = resize_matrix(h, size[0]).to(device=x.device", "device=x.device, ", "", _CUDA),
    ("gafh_fast/resize.py", "mw = resize_matrix(w, size[1]).to(device=x.device", "device=x.device, ", "", _CUDA),
    ("gafh_fast/train/ema.py", "@torch.no_grad()", "@torch.no_grad()", "",
     "the shadow parameters never require grad and the current ones are detached"),
    ("gafh_fast/train/ema.py", "shadow.lerp_(current.detach()", "current.detach()", "current",
     "inside torch.no_grad(): no graph either way"),
    ("gafh_fast/train/engine.py", 'LOCAL_WORLD_SIZE="1"', ', LOCAL_WORLD_SIZE="1"', "",
     "a world of one: nothing reads LOCAL_WORLD_SIZE"),
    ("gafh_fast/train/engine.py", 'if accel.device_name() == "cuda":', " == ", " != ", _CUDA),
    ("gafh_fast/train/engine.py", "accel.set_device(local_rank)", "accel.set_device(local_rank)", "pass", _CUDA),
    ("gafh_fast/train/engine.py", "deepspeed.init_distributed(", None, None,
     "deepspeed.initialize() creates the process group itself when none exists; verbose is logging"),
    ("gafh_fast/train/engine.py", "device = torch.device(accel.device_name(local_rank)) if", " == ", " != ", _CUDA),
    ("gafh_fast/train/engine.py", '"steps_per_print": ds.steps_per_print or 10**12', None, None,
     "DeepSpeed's own progress printing"),
    ("gafh_fast/train/engine.py", '"zero_allow_untested_optimizer": True', "True", "False",
     "DeepSpeed accepts torch.optim.Adam under ZeRO without the flag"),
    ("gafh_fast/train/engine.py", "span = max(1, t.max_steps - t.warmup_steps)", "1", "2",
     "span 1 vs 2 only when one step follows the warm-up, and that step's factor is cos(0) = 1 either way"),
    ("gafh_fast/train/engine.py", "min(1.0, (step - t.warmup_steps) / span)", "1.0", "2.0",
     "the clamp only acts on steps >= max_steps, which never run"),
    ("gafh_fast/train/step.py", "bad = (~torch.stack([l.detach()", "l.detach()", "l", "a flag read with .item(): no graph used"),
    ("gafh_fast/train/step.py", "if dist.is_initialized() and dist.get_world_size() > 1:", " and ", " or ",
     "an all-reduce over a world of one is the identity"),
    ("gafh_fast/train/step.py", "if dist.is_initialized() and dist.get_world_size() > 1:", " > ", " >= ",
     "an all-reduce over a world of one is the identity"),
    ("gafh_fast/train/step.py", "dist.all_reduce(bad, op=dist.ReduceOp.MAX)", ", op=dist.ReduceOp.MAX", "",
     "SUM of 0/1 flags is 0 exactly when MAX is: `bad == 0` decides the same"),
    ("gafh_fast/train/step.py", "loss_g = pixel_loss(hf, hr)", "hf, hr", "hr, hf", _SYMMETRIC),
    ("gafh_fast/train/step.py", "l_pixel = pixel_loss(hf, hr) if", "hf, hr", "hr, hf", _SYMMETRIC),
    ("gafh_fast/train/step.py", "sync()", "sync()", "pass", _TIMING),
    ("gafh_fast/train/step.py", 'out.seconds["g_step"] = {"pixel"', " - ", " + ", _TIMING),
    ("gafh_fast/train/step.py", 'out.seconds = {"d_step": t1 - t0', " - ", " + ", _TIMING),
    ("gafh_fast/train/step.py", "loss_d = ragan_d_loss(c_real, c_fake, global_mean=", ", global_mean=t.gan.global_mean",
     "", _WORLD_ONE),
    ("gafh_fast/train/step.py", "l_adv = ragan_g_loss(c_real, c_fake, global_mean=", ", global_mean=t.gan.global_mean",
     "", _WORLD_ONE),
    ("gafh_fast/train/step.py", "with torch.no_grad():", "with torch.no_grad()", "if True",
     "C(x_r) under a frozen D from an input without grad builds no graph either way"),
]


def equivalent_reason(path: str, line_text: str, original: str, replacement: str) -> str | None:
    """The reviewed reason this mutant is equivalent, or None. None in an entry matches any text."""
    for file, piece, orig, repl, reason in EQUIVALENT:
        if file == path and piece in line_text and orig in (None, original) and repl in (None, replacement):
            return reason
    return None
