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
_HOST_TIME = "host seconds spent queueing a step: the progress bar and the log only"
_WORLD_ONE = ("differs only with 2+ ranks, which the in-process selection does not run; caught by "
              "tests/test_train.py::test_c_world2_equals_one_process_on_the_concatenated_batch "
              "(checked by hand: 22502/28037 of D's gradient elements off)")
_SYMMETRIC = "symmetric loss: L1 / MSE of (a, b) equals that of (b, a), value and gradients"
_KERNEL_ZERO = ("Keys' cubic is 0 at |x| >= 2 and continuous at 1 and 2: the boundary and the extra taps "
                "it lets in all carry weight 0")
_AUTO = "kernels=auto on CUDA only: which backend is timed; the chosen one then runs through the normal path"
_CUDA = "CUDA only (device selection); the CPU twin of this path runs with device cpu"
_FLOAT32 = "torch.zeros' default dtype is float32, the dtype named (nothing in the project changes the default)"
_STOP_DEVICE = ("where the read-back's stop flag is made (device, or the host for gloo): on CPU every choice is "
                "the CPU; differs only with a CUDA device")
_MAX_COMMUTES = "maximum commutes (both are 0/1 flags)"

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
    ("gafh_fast/train/ema.py", "(current.detach().float(), 1.0 - self.decay)", "current.detach()", "current",
     "inside torch.no_grad(): no graph either way"),  # lerp_ (ungated) and lerp inside torch.where (gated)
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
    ("gafh_fast/train/step.py", "bad = (~torch.stack([l.detach()", "l.detach()", "l",
     "isfinite() of the stacked losses is a bool tensor without history: no graph reaches the flag either way"),
    ("gafh_fast/train/step.py", "if dist.is_initialized() and dist.get_world_size() > 1:", " and ", " or ",
     "an all-reduce over a world of one is the identity"),
    ("gafh_fast/train/step.py", "if dist.is_initialized() and dist.get_world_size() > 1:", " > ", " >= ",
     "an all-reduce over a world of one is the identity"),
    ("gafh_fast/train/step.py", "dist.all_reduce(bad, op=dist.ReduceOp.MAX)", ", op=dist.ReduceOp.MAX", "",
     "SUM of 0/1 flags is 0 exactly when MAX is: `bad == 0` decides the same"),
    ("gafh_fast/train/step.py", "loss_g = pixel_loss(hf, hr)", "hf, hr", "hr, hf", _SYMMETRIC),
    ("gafh_fast/train/step.py", "l_pixel = pixel_loss(hf, hr) if", "hf, hr", "hr, hf", _SYMMETRIC),
    ("gafh_fast/train/step.py", '{"host_g": time.perf_counter() - t0}', " - ", " + ", _HOST_TIME),
    ("gafh_fast/train/step.py", '{"host_d": t1 - t0, "host_g": time.perf_counter() - t1}', " - ", " + ", _HOST_TIME),
    ("gafh_fast/train/step.py", "bad_g = torch.maximum(bad_d, any_rank_nonfinite(loss_g))",
     "bad_d, any_rank_nonfinite(loss_g)", "any_rank_nonfinite(loss_g), bad_d", _MAX_COMMUTES),
    ("gafh_fast/train/step.py", "many = dist.is_initialized() and dist.get_world_size() > 1", " and ", " or ",
     "the trainer always has a process group (init_distributed): `many` is then True in a world of one too, "
     "and the stop flag's all-reduce over one rank is the identity (2 ranks: the same True)"),
    ("gafh_fast/train/step.py", "many = dist.is_initialized() and dist.get_world_size() > 1", " > ", " >= ",
     "a world of one then all-reduces the stop flag over one rank: the identity"),
    ("gafh_fast/train/step.py", 'on = self.device if not many or dist.get_backend() == "nccl"', "not many", "many",
     _STOP_DEVICE),
    ("gafh_fast/train/step.py", 'on = self.device if not many or dist.get_backend() == "nccl"', " or ", " and ",
     _STOP_DEVICE),
    ("gafh_fast/train/step.py", 'on = self.device if not many or dist.get_backend() == "nccl"', " == ", " != ",
     _STOP_DEVICE),
    ("gafh_fast/train/step.py", "stop = torch.full((1,), float(stop_requested), device=on)", ", device=on", "",
     _STOP_DEVICE),
    ("gafh_fast/train/step.py", "dist.all_reduce(stop, op=dist.ReduceOp.MAX)", ", op=dist.ReduceOp.MAX", "",
     "SUM of 0/1 stop flags is > 0 exactly when MAX is: `values[-1] > 0` decides the same"),
    ("gafh_fast/train/optim.py", "self._bad = torch.zeros((), dtype=torch.float32, device=bad.device)",
     ", dtype=torch.float32", "", _FLOAT32),
    ("gafh_fast/train/optim.py", "self._bad = torch.zeros((), dtype=torch.float32, device=bad.device)",
     ", device=bad.device", "", _CUDA),
    ("gafh_fast/train/optim.py", "torch.maximum(self._bad, bad, out=self._bad)", "self._bad, bad", "bad, self._bad",
     _MAX_COMMUTES),
    ("gafh_fast/train/optim.py", "torch.zeros((), dtype=torch.float32, device=params[0].device)",
     ", dtype=torch.float32", "", _FLOAT32),
    ("gafh_fast/train/optim.py", "torch.zeros((), dtype=torch.float32, device=params[0].device)",
     ", device=params[0].device", "", _CUDA),
    ("gafh_fast/train/optim.py", 'self.__dict__.pop("found_inf", None)', None, None,
     "a found_inf left behind is never read differently: _before_step sets it again before every fused step "
     "that has a gradient (the same veto tensor, or a zero), and a step without one updates nothing"),
    ("gafh_fast/train/optim.py", '"param": p.detach().clone()', "p.detach()", "p",
     "runs under _before_step's torch.no_grad(): the copy has no history either way"),
    ("gafh_fast/train/optim.py", 'if k != "step" and torch.is_tensor(v)', " and ", " or ",
     "the copy then also holds the step counter, which _after_step never puts back (it skips `step`); every "
     "value of Adam's state is a tensor"),
    ("gafh_fast/train/optim.py", "if self.partitioned and dist.is_initialized() and dist.get_world_size() > 1:",
     " > ", " >= ", "an all-reduce over a world of one is the identity"),
    ("gafh_fast/train/step.py", "loss_d = ragan_d_loss(c_real, c_fake, global_mean=", ", global_mean=t.gan.global_mean",
     "", _WORLD_ONE),
    ("gafh_fast/train/step.py", "l_adv = ragan_g_loss(c_real, c_fake, global_mean=", ", global_mean=t.gan.global_mean",
     "", _WORLD_ONE),
    ("gafh_fast/train/step.py", "with torch.no_grad():", "with torch.no_grad()", "if True",
     "C(x_r) under a frozen D from an input without grad builds no graph either way"),
]



# kernels/: the tile heuristic and plan arithmetic (which correct config or chunking runs), dummy
# arguments of absent operands, and masked lanes nothing stores.
_TILE_ORDER = ("which of the two legal candidates (BLOCK_M 128 with 3 stages, 64 with 4) comes first: on a GPU "
               "the tuner times both; the CPU tests run both (test_each_candidate_config, PickTuner). Every "
               "block stays a power of two >= 16 within H100 shared memory: only GPU timing sees the order")
_DW_CHUNKS = ("how many pixel chunks dW is split into on a GPU (programs per SM): a speed choice; any split "
              "sums to the same dW (splits 1-3 run in test_dw_partials_never_use_more_chunks_than_asked and "
              "test_each_candidate_config) and chunks stay >= 1024 pixels")
_ABSENT = "an argument of an operand that is absent (its constexpr flag is false or its loop has 0 steps): never read"
_UNSTORED = ("the fill value of lanes no store writes (masked out of the store as well); the interpreter fills "
             "0 without `other` too")
_COMMUTES = "pixel_rows(a, b) is a * b (in int64 when IDX64): the product commutes"
_KEY_FLAG = "a plan-key flag negated: the key still tells the same cases apart"
_OURS_ALIGNED = ("one more pointer in a launch key's alignment OR: the next argument is a buffer this module "
                 "allocates (y, the dW partials), which torch's allocator aligns to >= 64 bytes: the key part is the same")

EQUIVALENT += [
    ("kernels/configs.py", "waves_128 = cdiv(m_bucket(m), 128) * n_tiles / H100_SMS", "128", "129", _TILE_ORDER),
    ("kernels/configs.py", "waves_128 = cdiv(m_bucket(m), 128) * n_tiles / H100_SMS", " * ", " / ", _TILE_ORDER),
    ("kernels/configs.py", "if waves_128 >= 2 else", "2", "3", _TILE_ORDER),
    ("kernels/configs.py", "if sms <= 0:", " <= ", " < ",
     "sms = 0 gives one chunk through the formula as well: cdiv(0, tiles) = 0, then max(1, .)"),
    ("kernels/configs.py", "tiles = 9 * cdiv(c_in, 64) * cdiv(c_out, 64)", "c_in, 64", "64, c_in", _DW_CHUNKS),
    ("kernels/conv3x3.py", "return 0", "0", "1",
     "_sms of a non-CUDA device: dw_split with 1 SM gives one chunk, as with 0 (4 programs over >= 9 tap "
     "tiles round to 1)"),
    ("kernels/conv3x3.py", "return s_ci == 1 and s_kh == 3 * s_kw", " * ", " / ",
     "a channels_last weight then takes the copy branch: a channels_last copy of the same values, read the same way"),
    ("kernels/conv3x3.py", "return copy.copy_(weight.detach())", "weight.detach()",
     "weight", "kernel_weight runs only where autograd records nothing (inside autograd.Function forward/backward "
     "and custom-op bodies, or without grad): the copy has no history either way"),
    ("kernels/conv3x3.py", "IDX64=", "**", "*",
     "64-bit index arithmetic for (nearly) every shape: the same addresses, only slower on a GPU; shapes of "
     ">= 2**31 elements keep IDX64 either way"),
    ("kernels/conv3x3.py", "n1, n_tot, omask is not None, a_mask is not None, gz_out is not None,", " is not ", " is ",
     _KEY_FLAG),
    ("kernels/conv3x3.py", "dbp = torch.empty((s, c_out), dtype=torch.float32", ", dtype=torch.float32", "",
     "torch.empty's default dtype is float32, the dtype named (nothing in the project changes the default)"),
    ("kernels/conv3x3.py", "dwp = torch.empty((s, 9, c1 + c2, c_out), dtype=torch.float32", ", dtype=torch.float32",
     "", "torch.empty's default dtype is float32, the dtype named (nothing in the project changes the default)"),
    ("kernels/conv3x3.py", "float(fin_a.scale) if fin_a is not None else 1.0", "1.0", "2.0", _ABSENT),
    ("kernels/conv3x3.py", "float(fin_b.scale) if fin_b is not None else 1.0", "1.0", "2.0", _ABSENT),
    ("kernels/idb.py", "h1, mask1 = conv_forward([x], w1, b1, slope, None, 1.0, None, 1.0,", "1.0", "2.0",
     "the scale of a residual that is None (HAS_R1 / HAS_R2 false: never read)"),
    ("kernels/idb.py", "y, mask2 = conv_forward([x, h1], w2, b2, slope, x0, 1.0, None, 1.0, save_mask, w_k=w2_k)",
     ", w_k=w2_k", "", "conv_forward then makes kernel_weight(w2) itself: the same values as the caller's w2_k"),
    ("kernels/idb.py", "_dx((gz2, w2_k, 0), (gz1, w1_k, 0), out,", "(gz2, w2_k, 0), (gz1, w1_k, 0)",
     "(gz1, w1_k, 0), (gz2, w2_k, 0)",
     "the dX GEMM sums its two sources into one accumulator: swapping them changes only the fp32 summation order"),
    ("kernels/conv3x3_bwd.py", "acc += tl.load(dwp_ptr + s * per_split + offs, mask=ok, other=0.0)", ", other=0.0", "",
     _UNSTORED),
    ("kernels/conv3x3_bwd.py", "b_acc += tl.load(dbp_ptr + s * C_OUT + offs, mask=b_ok, other=0.0)", ", other=0.0", "",
     _UNSTORED),
    ("kernels/conv3x3_bwd.py", "tl.store(out1_ptr + pixel_rows(offs_m, N1, IDX64)", "offs_m, N1", "N1, offs_m", _COMMUTES),
    ("kernels/conv3x3_bwd.py", "gz = tl.load(g_ptr + pixel_rows(pix, C_OUT, IDX64)", "pix, C_OUT", "C_OUT, pix", _COMMUTES),
    ("kernels/conv3x3_bwd.py", "tl.store(out2_ptr + pixel_rows(offs_m, N_TOT - N1, IDX64)", "offs_m, N_TOT - N1",
     "N_TOT - N1, offs_m", _COMMUTES),
    ("kernels/conv3x3_fwd.py", "if K2_STEPS > 0:", " > ", " >= ", "K2_STEPS = 0: the second loop would run 9 * 0 steps"),
    ("kernels/conv3x3_fwd.py", "acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)", ", other=0.0", "",
     _UNSTORED + " (the mask bits of channels >= C_OUT in the last byte are never read: act_grad masks co < C)"),
    ("kernels/conv3x3_fwd.py", "acc = tl.load(r2_ptr + out_off, mask=out_ok, other=0.0)", ", other=0.0", "", _UNSTORED),
    ("kernels/conv3x3_fwd.py", "tl.store(mask_ptr + pixel_rows(rows, c_bytes, IDX64)", "rows, c_bytes",
     "c_bytes, rows", _COMMUTES),  # bias_act's mask store (the conv's and the upsampling conv's forward)
    ("kernels/conv3x3.py", 'grid = (cdiv(m, cfg.kwargs["BLOCK_M"]), cdiv(c_out, cfg.kwargs["BLOCK_N"]), 1)', "1", "2",
     "the forward kernel reads no program_id(2): a second z-slice of programs repeats the same stores"),
    ("kernels/conv3x3.py", "FWD.launch((key, aligned(*ptrs[:6]))", "6", "7", _OURS_ALIGNED),
    ("kernels/conv3x3.py", "DW.launch((key, aligned(*ptrs[:3], *ptrs[5:7]))", "3", "4", _OURS_ALIGNED),
    ("kernels/conv3x3.py", "DW.launch((key, aligned(*ptrs[:3], *ptrs[5:7]))", "7", "8", _OURS_ALIGNED),
    ("kernels/conv3x3.py", "DX.launch((key, aligned(ptrs[0], *ptrs[3:6], ptrs[9]))", "6", "7", _OURS_ALIGNED),
    ("kernels/conv3x3.py", "DX.launch((key, aligned(ptrs[0], *ptrs[3:6], ptrs[9]))", "0", "1",
     "a caller's tensor reaches source A only in launches without a source B (the conv's and the IDB's first dX, the "
     "RIDB's closing dX), where ptrs[4] (source B) is source A itself: its alignment is in the key either way"),
    ("kernels/conv3x3.py", "FIN.launch((key, ()), (fin.programs(), 1, 1),", "1", "2",
     "the finalize kernel reads only program_id(0): a second z-slice of programs writes the same dW again"),
    ("kernels/launch.py", "DIRECT_LAUNCH = _triton_version() >= _MIN_DIRECT", " >= ", " > ",
     "differs only on Triton 3.3.x; this machine runs 3.9, the GPU machine 3.6"),
    ("kernels/op.py", "check_idb_args(x, x0, w1, b1, w2, b2)", "x, x0", "x0, x",
     "x and x0 must both be (N, nf, H, W) in the weights' dtype: the swapped check refuses the same inputs (it "
     "would differ only for an x0 on another device, which neither order's residual check covers)"),
]

# (file, a piece of source that CONTAINS the mutated text, original, replacement, reason), matched by
# position: for lines where the same edit elsewhere on the line is not equivalent (a real scale next to
# the scale of an absent residual, a live shape next to a dummy one).
_EDGE_SENTINEL = ("the centre tap's edge sentinel (-1: 'no edge'): h and w lie in [0, H) and [0, W), so they equal "
                  "neither -1 nor -2, and the centre row/column never leaves the image either way")

EQUIVALENT_AT = [
    ("kernels/ridb.py", "weights[2 * q + 1], None)", " + ", " - ",
     "ridb_backward reads only the shape, dtype and layout of these weights (the kernels read w_ks), and "
     "every IDB's W2 has the same ones: another IDB's W2 gives the same buffers"),
    ("kernels/ridb.py", "act(p[0].shape", "0", "1",
     "the RIDB fake's h1 channels read off b1 instead of W1: check_ridb_args makes them equal"),
    ("kernels/ridb.py", "mask(p[0].shape", "0", "1",
     "the RIDB fake's mask1 channels read off b1 instead of W1: check_ridb_args makes them equal"),
    ("kernels/conv3x3_fwd.py", ", -1))", "1", "2", _EDGE_SENTINEL),  # tap_edge's -1 only
    ("kernels/conv3x3.py", "None, 1.0, save_mask", "1.0", "2.0",
     "the scale of residual2, which is None in both IDB convs (HAS_R2 false: never read)"),
    ("kernels/conv3x3.py", "if fin_a else (0, 1, 1, 0, 0, 0)", "0", "1", _ABSENT),
    ("kernels/conv3x3.py", "if fin_b else (0, 1, 1, 0, 0, 0)", "0", "1", _ABSENT),
    ("kernels/conv3x3.py", "if fin_a else (0, 1, 1, 0, 0, 0)", "1", "2", _ABSENT),
    ("kernels/conv3x3.py", "if fin_b else (0, 1, 1, 0, 0, 0)", "1", "2", _ABSENT),
    ("kernels/conv3x3.py", "fin_a.programs() if fin_a else 0", "0", "1",
     "one program for a finalize job that is absent (FIN_A false: the kernel's finalize-A branch is compiled out); "
     "job B's programs start one later and all still run"),
    ("kernels/conv3x3.py", "fin_b.programs() if fin_b else 0", "0", "1",
     "one program more at the end of the grid for a finalize job that is absent (FIN_B false: compiled out)"),
    ("kernels/conv3x3.py", "else (ga, wa, 0)", "0", "1", _ABSENT),
    ("gafh_fast/train/optim.py", "@torch.no_grad()\n    def _before_step(", "@torch.no_grad()", "",
     "_before_step touches gradients, detached copies and Adam's state, none of which requires grad: no graph "
     "is recorded either way (the same decorator on _after_step is needed: it writes into the parameters)"),
    # Round 13's sample of the tapes' host code (kernels/ridb.py, kernels/tape.py), each reviewed:
    ("kernels/ridb.py", "w_ks[2 * q + 1])", " + ", " - ",
     "idb_grad_buffers reads W2's kernel weight only for dtype, device and shape[0] (db2's length): the closing "
     "conv's and every IDB's W2 have nf outputs, the same dtype and device"),
    ("kernels/ridb.py", "(q_n - q) % 2", " - ", " + ", "q_n - q and q_n + q have the same parity"),
    ("kernels/ridb.py", "if n * h * wd == 0", " * ", " / ",
     "with h, wd > 0 both are zero exactly when n is; a zero-height or zero-width input, where the division "
     "would raise, is refused by the reference too (F.conv2d: kernel larger than the padded input)"),
    ("kernels/ridb.py", "res2_scale, False,\n                          w_k=w_ks[2 * q_n])",
     ",\n                          w_k=w_ks[2 * q_n]", "",
     "conv_forward then computes kernel_weight(w_ks[2 * q_n]), which returns that kernel-layout weight itself"),
    ("kernels/tape.py", "(*grid, *(1,) * (3 - len(grid)))", "1", "2",
     "every taped launch (conv3x3.py's fwd, dw, dx, fin) passes a 3-d grid already, so the padding is never "
     "applied; it is there for a launcher with a shorter grid (as KernelLauncher._launch pads)"),
]

# Lines whose mutants differ only where a CPU cannot look (matched by position as EQUIVALENT_AT).
OUT_OF_SCOPE_AT = [
    ("kernels/conv3x3_bwd.py", "mask=src_ok[:, None] & ci_ld[None, :], other=0.0)", ", other=0.0", "",
     "the dW loop's x tile at padded pixels: the interpreter fills masked lanes with 0 with or without `other`; "
     "on sm_90 Triton's pipelined load (cp.async) zero-fills them as well (src-size 0), but the language leaves "
     "them undefined, so `other=0.0` states the padding; only the GPU kernel tests run the compiled load"),
    ("kernels/conv3x3_fwd.py", """mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)""", """,
                        other=0.0""", "",
     "the weight tile's fill for channels k >= C: the interpreter fills masked lanes with 0 with or without "
     "`other`; on a GPU they are undefined but meet A lanes that are 0 (loaded with other=0.0), so only a NaN "
     "in undefined registers could show, on a GPU"),
]


def equivalent_reason(path: str, line_text: str, original: str, replacement: str) -> str | None:
    """The reviewed reason this mutant is equivalent, or None. None in an entry matches any text."""
    for file, piece, orig, repl, reason in EQUIVALENT:
        if file == path and piece in line_text and orig in (None, original) and repl in (None, replacement):
            return reason
    return None


def positional_reason(entries: list, path: str, source: bytes, start: int, end: int, original: str,
                      replacement: str) -> str | None:
    """The reason of an entry whose piece contains the mutated bytes [start, end) at some occurrence."""
    for file, piece, orig, repl, reason in entries:
        if file != path or orig != original or repl != replacement:
            continue
        needle = piece.encode()
        at = source.find(needle)
        while at >= 0:
            if at <= start and end <= at + len(needle):
                return reason
            at = source.find(needle, at + 1)
    return None

_PRECOMPILE_LAUNCHES = ("the precompile twins' upstream gradient: any reduction makes the same launches (the values "
                        "never reach a kernel's specialisation)")
EQUIVALENT += [
    ("gafh_fast/models/generator.py", "y.float().mean().backward()", "mean", "sum", _PRECOMPILE_LAUNCHES),
    ("gafh_fast/models/generator.py", "base = torch.empty(offset + span, dtype=live.dtype, device=live.device)",
     ", device=live.device", "", _CUDA + " (tests/kernels/test_precompile.py's twin test checks the device on a GPU)"),
    ("gafh_fast/models/generator.py", "lr = torch.zeros(batch, 3, lr_size, lr_size, dtype=like.dtype, device=like.device)",
     ", device=like.device", "", _CUDA + " (test_precompile_kernels_of_a_generator_on_gpu runs it on a GPU)"),
]

# Issue 11 round 5: the fused RIDB's dX epilogue (ADD_SUM / STORE_OUT) and its host code
EQUIVALENT += [
    ("kernels/conv3x3.py", "s_in, s_out, s_scale = add_sum if add_sum is not None else (ga, ga, 0.0)", "0.0", "1.0",
     _ABSENT),
    ("kernels/conv3x3.py", "scalars_tail = (fa_n, float(slope) if slope is not None else 0.0", "0.0", "1.0",
     "the slope is read only with A_ACT or OUT_ACT, and both come with one: without a slope it is never read"),
    ("kernels/conv3x3.py", "plan[0] = _choose(\"dx\", (ca, cb, n_tot, w, configs.m_bucket(m), str(ga.dtype), flags[\"OUT_ACT\"],",
     "\"dx\", (ca, cb, n_tot, w, configs.m_bucket(m), str(ga.dtype), flags[\"OUT_ACT\"],\n"
     "                                 flags[\"A_ACT\"], flags[\"WRITE_GZA\"], flags[\"ADD_SUM\"], flags[\"STORE_OUT\"])",
     "(ca, cb, n_tot, w, configs.m_bucket(m), str(ga.dtype), flags[\"OUT_ACT\"],\n"
     "                                 flags[\"A_ACT\"], flags[\"WRITE_GZA\"], flags[\"ADD_SUM\"], flags[\"STORE_OUT\"]), \"dx\"",
     "the tuner's kernel name and shape key swapped: every dX plan still gets its own cache entry, and the "
     "interpreter takes the first candidate either way"),
    ("kernels/conv3x3.py", "None if fin_b is None else (fin_b.dw.shape, fin_b.dw.stride(), fin_b.db is not None, fin_b.split),",
     " is not ", " is ", _KEY_FLAG),
    ("kernels/conv3x3.py", "add_sum is not None, store_out, cfg_key(config))", " is not ", " is ", _KEY_FLAG),
    ("kernels/conv3x3_bwd.py", "s_off = pixel_rows(offs_m, N_TOT, IDX64)", "offs_m, N_TOT", "N_TOT, offs_m", _COMMUTES),
    ("kernels/conv3x3_bwd.py", "total = acc + sum_scale * tl.load(dsum_in + s_off, mask=s_ok, other=0.0)",
     ", other=0.0", "", _UNSTORED),
    ("kernels/conv3x3_bwd.py", "total = acc + sum_scale * tl.load(dsum_in + s_off, mask=s_ok, other=0.0)",
     "0.0", "1.0", _UNSTORED),
    ("kernels/conv3x3_bwd.py", "if N_TOT > N1:  # a two-input conv", " > ", " >= ",
     "with N_TOT == N1 the second output's store mask (offs_n >= N1) is all false: nothing is stored"),
    ("kernels/ridb.py", "return torch.empty(mask_shape(n, h, wd, c) if save_mask else (0,), dtype=torch.uint8, "
     "device=x0.device)", ", device=x0.device", "", _CUDA),
    ("kernels/ridb.py", "copies = [torch.empty_strided(t.shape, cl_strides(*t.shape), dtype=t.dtype, device=t.device)",
     ", device=t.device", "", _CUDA),
    ("kernels/ridb.py", "return torch.empty_strided(t.shape, dw_strides(t), dtype=t.dtype, device=t.device)",
     ", device=t.device", "", _CUDA),
    ("kernels/launch.py", "if len(grid) != 3:", "3", "4",
     "padding a grid that already has 3 entries adds none: (*grid, *(1,) * 0) is the same tuple"),
]


# Issue 11 round 7: the upsampling conv by sub-pixel phases (kernels/upconv.py, upconv_kernels.py) and its
# tile candidates in configs.py
_IDX64_ONLY_HUGE = ("the IDX64 flag's size test: any shape the tests (or the interpreter) can run has far fewer "
                    "than 2**31 elements, so the flag is off either way; 64-bit offsets matter only beyond that")
EQUIVALENT += [
    ("kernels/configs.py", "block_n = pow2_block(n_channels, lo=16, hi=128)", ", lo=16", "",
     "pow2_block's own default lo is 16, the value named"),
    ("kernels/configs.py", "block_n = pow2_block(n_channels, lo=16, hi=128)", ", hi=128", "",
     "output-channel tiles of at most 64 instead of 128: more N tiles of the same GEMM (the forward's and dX's "
     "N loop is covered by C_out 136 and C_in 136), the same results; only GPU timing sees it"),
    ("kernels/configs.py", "n_tiles = cdiv(n_channels, block_n) * programs_per_tile", "n_channels, block_n",
     "block_n, n_channels", _TILE_ORDER),
    ("kernels/configs.py", "n_tiles = cdiv(n_channels, block_n) * programs_per_tile", " * ", " / ", _TILE_ORDER),
    ("kernels/configs.py", "for bm, st in _block_m_choices(m, n_tiles)]", "m, n_tiles", "n_tiles, m", _TILE_ORDER),
    ("kernels/upconv.py", "IDX64=4 * m * max(c_in, c_out) >= 2**31", " * ", " / ", _IDX64_ONLY_HUGE),
    ("kernels/upconv_kernels.py", "acc = tl.load(base + kh_lo * s_kh + kw_lo * s_kw, mask=ok, other=0.0)", "0.0", "1.0",
     _UNSTORED),
]


# Issue 11 round 8: the upsampling dX's gz pass and fold (GZ_PASS, FIN) and the output conv's Triton backward
# (kernels/outconv.py, outconv_kernels.py)
EQUIVALENT += [
    ("kernels/configs.py", "def up_dx_candidates(", "False", "True", _DEFAULT_UNUSED),
    ("kernels/configs.py", "return gz_pass_ways(tiles[0], (False, True))", "0", "1",
     "which of the heuristic's two legal dX tiles the two GZ_PASS candidates share (the tiles run without an "
     "activation in test_each_config_and_dw_walk): only GPU timing sees it"),
    ("kernels/upconv.py", "IDX64=4 * m * max(c_in, c_out) >= 2**31", " >= ", " > ", _IDX64_ONLY_HUGE),
    ("kernels/upconv.py", "stand_in = (torch.empty(0, dtype=torch.float32, device=g.device)", ", dtype=torch.float32",
     "", "torch.empty's default dtype is float32, the dtype named (nothing in the project changes the default)"),
    ("kernels/outconv.py", "gzp = torch.empty((n, h + ks - 1, w + ks - 1, cp)", ", device=g.device", "", _CUDA),
    ("kernels/outconv.py", "configs.dw_split(m, c_in, rows, conv3x3._sms(x.device), taps=1)", "m, c_in", "c_in, m",
     "how many pixel chunks the output conv's dW is split into on a GPU: a speed choice (on CPU _sms is 0: one "
     "chunk either way); any split sums to the same dW (test_outconv.py runs splits 1 to 3)"),
    ("kernels/outconv.py", "idx64 = gzp.numel() >= 2**31", " >= ", " > ", _IDX64_ONLY_HUGE),
    ("kernels/outconv.py", "IDX64=max(m * c_in, gzp.numel()) >= 2**31", "max", "min", _IDX64_ONLY_HUGE),
    ("kernels/outconv.py", "aligned(g, y, weight)", "g, y", "y, g",
     "aligned() is True when every tensor is aligned, else a tuple of flags: in another order the tuple still "
     "tells every alignment pattern apart (one launch key per pattern)"),
    ("kernels/outconv.py", "k = weight.shape[-1] if weight.dim() == 4 else 0", "0", "1",
     "the k of a weight that is not 4-D: the next check refuses it (weight.dim() != 4) whatever k is"),
    ("kernels/outconv_kernels.py", "return tl.multiple_of(pixel_rows((n * (H + (KS - 1)) + h) * (W + (KS - 1)) + w, CP,",
     "(n * (H + (KS - 1)) + h) * (W + (KS - 1)) + w, CP", "CP, (n * (H + (KS - 1)) + h) * (W + (KS - 1)) + w",
     _COMMUTES),
]
EQUIVALENT_AT += [  # positional: the other `1` of the line (x's alignment, ptrs[1]) is not equivalent
    ("kernels/outconv.py", "(tiles + int(flags[\"DO_BIAS\"]), split, 1)", "1", "2",
     "the dW kernel reads no program_id(2): a second z-slice of programs writes the same partials again"),
]
OUT_OF_SCOPE_AT += [
    ("kernels/outconv_kernels.py", "mask=p_ok[:, None] & ci_ok[None, :], other=0.0)", ", other=0.0", "",
     "the output conv's dW x tile at pixels past the chunk (their gz rows load as 0) and channels >= C_in "
     "(never stored): the interpreter fills masked lanes with 0 with or without `other`; on a GPU only a NaN "
     "in undefined registers could show, and only the GPU kernel tests run the compiled load"),
]


# Issue 11 round 9: the output layer's dX with the last upsampling step's mask (kernels/upout.py, the ACT
# epilogue in outconv.py)
EQUIVALENT += [
    ("kernels/outconv.py", 'key = ("out_dx", dx.shape, weight.shape, dx.dtype, dx.device, has_bias, act is not None',
     " is not ", " is ", "the plan key's mask flag inverted: still one plan with the mask epilogue and one without"),
    ("kernels/outconv.py", "float(act[1]) if act else 0.0)", "0.0", "1.0",
     "the slope a launch without ACT passes: the kernel reads it only under ACT"),
    ("kernels/outconv.py", "IDX64=max(m * c_in, gzp.numel()) >= 2**31", " * ", " / ", _IDX64_ONLY_HUGE),
    ("kernels/upout.py", "check_out_args(x.new_empty((0, up_weight.shape[0], 1, 1)), out_weight, out_bias)", "1", "2",
     "the stand-in for the step's output: check_out_args reads its dim, dtype, device and channels, not H or W"),
]
EQUIVALENT_AT += [  # positional: the `0` of shape[0] (the stand-in's channels) is not equivalent
    ("kernels/upout.py", "x.new_empty((0,", "0", "1",
     "the stand-in's batch: check_out_args reads its dim, dtype, device and channels, not N"),
]
