"""torch.compile of the training step (`train.compile`, gafh_fast/train/compile.py), on CPU with the real
inductor backend, on the demo model (configs/demo.yaml: every module type of G, D with BatchNorm, VGG).

`train.compile.enabled: auto` compiles on CUDA only; `on` runs the same calls on CPU, which is what these
tests do (the CUDA default's CPU twin). The compiled run also graphs VGG (`cuda_graphs: [vgg]`, mode
reduce-overhead): on CPU inductor runs that mode without graphs, so it covers that call path too.

Bound: the first iteration runs eagerly, so step 1 is the plain step bit for bit. From step 2 on the
compiled kernels add the same terms in another order (inductor's fused BatchNorm statistics, conv
epilogues), so each gradient element is held to the rounding bound of tests/grad_bounds.py: 2 gamma_T S,
S the sum of |terms| of that element, against the plain-PyTorch step recomputed at the compiled run's own
state (teacher forcing); each optimizer update must still be torch Adam's step on the gradient it got, bit
for bit. Losses: within 1e-5 relative. D's BatchNorm needs what the eager-vs-eager tests never did (the
same kernels give the same bits there): the sums of its affine parameters' gradients, and its backward's
own reductions over N*H*W terms, which every gradient upstream of it passes through
(TermSumsWithBatchNorm below).
"""
from __future__ import annotations

import copy
import inspect
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import grad_bounds  # noqa: E402
from grad_bounds import TermSums, assert_within, gan_step_gradients, gradient_bound  # noqa: E402
from test_train import assert_adam_step, state_before  # noqa: E402
from train_runner import build_test_models, flat_params, jsonl, make_batch, run  # noqa: E402

from gafh_fast.config import ConfigError, load_config  # noqa: E402
from gafh_fast.export import load_generator  # noqa: E402
from gafh_fast.models import build_discriminator, build_generator  # noqa: E402
from gafh_fast.train.compile import CLOCK, _Labelled, compile_region, use_compile  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
DEMO_RUN = ("train.pretrain_steps=0", "train.log_every=1", "train.checkpoint_every=3", "val.every=0",
            "data.batch_size=4", "val.grid_images=2", "train.compile.enabled=on", "train.compile.cuda_graphs=[vgg]")


def demo_config(*overrides: str):
    return load_config(REPO / "configs" / "demo.yaml", DEMO_RUN + overrides)


class TermSumsWithBatchNorm(TermSums):
    """grad_bounds.TermSums plus F.batch_norm in training mode: its weight's gradient is the sum over
    (N, H, W) of delta * x_hat and its bias's of delta (m = N*H*W terms each), and its backward reduces
    over the same m terms, so m counts in K (the longest sum a delta comes out of)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return super().__torch_function__(func, types, args, kwargs)
        out = func(*args, **kwargs)
        a = inspect.signature(F.batch_norm).bind(*args, **kwargs)
        a.apply_defaults()
        x, weight, bias, eps = a.arguments["input"].detach(), a.arguments["weight"], a.arguments["bias"], a.arguments["eps"]
        m = x.numel() // x.shape[1]
        self.K = max(self.K, m)
        if weight is not None and weight.requires_grad:
            x64 = x.double()
            mean, var = x64.mean((0, 2, 3), keepdim=True), x64.var((0, 2, 3), unbiased=False, keepdim=True)
            x_hat = ((x64 - mean) / (var + eps).sqrt()).abs()

            def hook(grad):
                with torch.no_grad():
                    g = grad.detach().abs().double()
                    self._add(weight, (g * x_hat).sum((0, 2, 3)), m)
                    self._add(bias, g.sum((0, 2, 3)), m)

            out.register_hook(hook)
        return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """3 steps of the demo model with compile on (checkpoint and export at step 3), then 2 more resumed."""
    cfg = demo_config(f"train.max_steps={STEPS}")
    run_dir = tmp_path_factory.mktemp("compiled")
    graphs_before = dict(CLOCK.graphs)
    t0 = time.perf_counter()
    trainer, _, trace = run(cfg, run_dir, resume="none")
    seconds = time.perf_counter() - t0
    graphs = {k: v - graphs_before.get(k, 0) for k, v in CLOCK.graphs.items()}
    resumed = run(demo_config(f"train.max_steps={STEPS + 2}"), run_dir, resume="auto")
    return {"cfg": cfg, "dir": run_dir, "trainer": trainer, "trace": trace, "seconds": seconds, "graphs": graphs,
            "resumed": resumed}


def test_compiled_step_equals_the_eager_step_within_rounding(compiled, monkeypatch):
    monkeypatch.setattr(grad_bounds, "TermSums", TermSumsWithBatchNorm)
    cfg, tr = compiled["cfg"], compiled["trace"]
    G, D, vgg = build_test_models(cfg)
    n = {"g": tr["g"][0].numel(), "d": tr["d"][0].numel()}
    worst = {}
    for i in range(STEPS):
        batch = make_batch(cfg, 0, i, cfg.data.batch_size)
        ref = gan_step_gradients(cfg, G, D, vgg, batch["hr"], batch["lr"], g_state=state_before(tr, "g", i),
                                 d_state=state_before(tr, "d", i), d_after=tr["d"][i])
        for key in ("g", "d"):
            got = tr["grad_" + key][i][:n[key]]
            if i == 0:  # the eager first iteration
                assert torch.equal(got, ref["grad_" + key]), f"step 1 (eager): {key} gradient"
            else:
                bound = gradient_bound(ref["S_" + key], ref["m_" + key], ref["K"])
                worst[(i + 1, key)] = assert_within(f"step {i + 1} (compiled) {key} gradient", got,
                                                    ref["grad_" + key], bound)
            assert_adam_step(f"{key.upper()} step {i + 1}", state_before(tr, "opt_state_" + key, i),
                             tr["grad_" + key][i], tr["hparams_" + key][i], tr["opt_state_" + key][i])
        for name, value in ref["losses"].items():
            assert tr["losses"][i][name] == (value if i == 0 else pytest.approx(value, rel=1e-5)), f"step {i + 1} {name}"
    assert any(v > 0 for v in worst.values()), "the compiled steps equal the eager ones bit for bit: nothing compiled?"
    print(f"compiled demo run {compiled['seconds']:.1f} s; largest |compiled - eager| / bound per step: {worst}")


def test_compile_is_logged_once_per_part_and_left_out_of_img_s(compiled):
    records = jsonl(compiled["dir"])
    compiles = [r for r in records if r["kind"] == "compile"]
    assert [r["step"] for r in compiles if r["step"] <= STEPS] == [2]
    assert set(compiles[0]["seconds"]) == {"g", "d", "vgg"} and min(compiles[0]["seconds"].values()) > 0
    train = {r["step"]: r for r in records if r["kind"] == "train" and r["step"] <= STEPS}
    assert train[2]["compiling"] and train[2]["img_s"] is None  # the compile step is not in img/s
    assert train[1]["img_s"] > 0 and train[3]["img_s"] > 0 and "compiling" not in train[3]
    # fullgraph everywhere, so no graph breaks; one graph per grad signature: D step, C(x_r) under
    # no_grad, C(G(z)) with D frozen; VGG target (no_grad) and VGG(G(z)); one for the two DNBs
    assert compiled["graphs"] == {"d": 3, "vgg": 2, "g": 1}, compiled["graphs"]


def test_checkpoints_and_exports_of_a_compiled_run_load_into_eager_models(compiled):
    cfg, run_dir, trainer = compiled["cfg"], compiled["dir"], compiled["trainer"]
    tag = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    for name, eager in (("generator", build_generator(cfg)), ("discriminator", build_discriminator(cfg))):
        saved = torch.load(tag / name / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        assert list(saved) == list(eager.state_dict()), f"{name}: checkpoint keys differ from the eager model's"
        eager.load_state_dict(saved)  # strict
    exported, _ = load_generator(tag / "generator.safetensors")  # builds an eager G, loads strictly
    assert torch.equal(flat_params(exported), flat_params(trainer.ema.module))
    # resumed with compile on: starts from the checkpoint bit for bit, compiles again, exports again
    resumed, _, rtr = compiled["resumed"]
    assert (resumed.start_step, resumed.step) == (STEPS, STEPS + 2)
    assert torch.equal(rtr["start"]["g"], compiled["trace"]["g"][-1])
    assert torch.equal(rtr["start"]["d"], compiled["trace"]["d"][-1])
    # compiled again (in this process dynamo's cache already holds graphs whose guards the new modules pass)
    assert isinstance(resumed.d_engine.module.__dict__.get("forward"), _Labelled)
    assert sum("inside DeepSpeed's hooks" in r.get("message", "") for r in jsonl(run_dir)) == 2
    final, _ = load_generator(run_dir / "generator.safetensors")
    assert torch.equal(flat_params(final), flat_params(resumed.ema.module))


def test_auto_compiles_on_cuda_only_and_a_compiled_region_refuses_deepcopy():
    assert use_compile("auto", torch.device("cuda", 0)) is True
    assert use_compile("auto", torch.device("cpu")) is False
    assert use_compile(True, torch.device("cpu")) is True and use_compile(False, torch.device("cuda")) is False
    block = torch.nn.Linear(2, 2)
    compile_region(block, "d", {})  # lazy: nothing compiles until a call
    with pytest.raises(RuntimeError, match="cannot be deep-copied"):
        copy.deepcopy(block)  # a copy would run the original's weights
    assert list(block.state_dict()) == ["weight", "bias"]
    with pytest.raises(ConfigError, match="cuda_graphs"):
        load_config(None, ["train.compile.parts=[g]", "train.compile.cuda_graphs=[vgg]"])
