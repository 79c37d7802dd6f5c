"""Typed configuration: dataclasses loaded from YAML, with `section.key=value` overrides.

Every key is declared here with its type and default. An unknown or mistyped key is an error that
names the key and the file, never a silent default (see ../shared/spec/GAFH_RIDN.md for what each
model/train key means and where its default comes from).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------
@dataclass
class GeneratorConfig:
    nf: int = 64                      # feature channels
    gc: int = 32                      # growth channels of an IDB's first conv
    sfm_kernel: int = 9               # kernel of the shallow feature conv
    out_kernel: int = 9               # kernel of the output conv (before tanh)
    idb_per_ridb: int = 4
    ridb_per_dnb: int = 3
    num_dnb: int = 4
    res_scale: float = 0.2            # RIDB and DNB residual scale (paper's alpha)
    trunk_norm: Literal["batchnorm", "none"] = "batchnorm"
    upsample: Literal["nearest_conv", "pixel_shuffle"] = "nearest_conv"
    init_scale: float = 0.1           # Kaiming init scale inside the RIDBs (ESRGAN practice)


@dataclass
class DiscriminatorConfig:
    nf: int = 64                      # channels of the first conv; later convs use 1,1,2,2,4,4,8,8,8 x nf
    dense: int = 1024                 # width of the hidden dense layer
    norm: Literal["batchnorm", "none"] = "batchnorm"


@dataclass
class ModelConfig:
    scale: int = 8                    # the model is x8: lr_size * scale == hr_size
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


@dataclass
class DataConfig:
    root: Optional[str] = None        # dataset root; None + synthetic layout => generated faces
    layout: Literal["celeba_aligned", "celeba_wild", "folder"] = "celeba_aligned"
    split: Literal["official", "paper", "all"] = "official"
    loader: Literal["dali", "pil"] = "dali"
    batch_size: int = 8               # per rank
    val_batch_size: int = 16          # per rank, validation and test
    num_threads: int = 4              # DALI threads / PIL DataLoader workers
    hr_size: int = 256
    flip: bool = True                 # random horizontal flip at train time
    seed: int = 0                     # shuffling and the `paper` split permutation
    synthetic_count: int = 0          # >0: generate this many synthetic faces when root is unset


@dataclass
class ContentLossConfig:
    layer: str = "relu4_3"            # any VGG-19 layer name, conv1_1 ... relu5_4
    weights: Optional[str] = None     # torchvision vgg19 state dict; else $TORCH_HOME/hub/checkpoints
    pretrained: bool = True           # False: random VGG (tests, demo), with a warning
    weight: float = 1.0               # alpha


@dataclass
class GanConfig:
    weight: float = 1e-3              # beta
    global_mean: bool = False         # gather C over ranks before the relativistic mean


@dataclass
class CompileConfig:
    """torch.compile of the training step's modules (gafh_fast/train/compile.py says what and why)."""
    enabled: Literal["auto", True, False] = "auto"   # auto: on for CUDA, off elsewhere (on/off/true/false)
    # g: G's repeated blocks (the DNBs, regional); d: D inside its engine; vgg: the content-loss features
    parts: list[Literal["g", "d", "vgg"]] = field(default_factory=lambda: ["g", "d", "vgg"])
    # parts compiled with mode="reduce-overhead" (CUDA graphs on CUDA); none by default, see compile.py
    cuda_graphs: list[Literal["g", "d", "vgg"]] = field(default_factory=list)


@dataclass
class TrainConfig:
    max_steps: int = 100_000
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine", "multistep"] = "constant"
    lr_milestones: list[int] = field(default_factory=list)   # multistep: steps where lr halves
    warmup_steps: int = 0
    grad_clip: float = 0.0            # 0 disables
    # torch Adam's implementation inside the DeepSpeed engines (gafh_fast/train/optim.py): fused is
    # one kernel and drops a bad step's update without touching Adam's step counter
    adam_impl: Literal["fused", "foreach", "for_loop"] = "fused"
    pixel_weight: float = 0.0         # lambda of the optional L1 pixel loss
    pretrain_steps: int = 0           # PSNR-oriented L1-only steps before the GAN phase
    ema_decay: float = 0.0            # 0 disables the EMA copy of G
    content: ContentLossConfig = field(default_factory=ContentLossConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    checkpoint_every: int = 5_000
    keep_checkpoints: int = 3
    log_every: int = 50
    max_nan_skips: int = 10           # consecutive non-finite steps before aborting
    deterministic: bool = False
    # activations (never parameters) in channels_last: auto = on CUDA, where cuDNN and the fused
    # kernels are fastest in it; true runs the CUDA layout on CPU (tests)
    channels_last: Literal["auto", True, False] = "auto"
    compile: CompileConfig = field(default_factory=CompileConfig)


@dataclass
class ValConfig:
    every: int = 5_000
    max_images: int = 0               # 0 = the whole validation split
    grid_images: int = 8              # faces in the LR | bicubic | HF | HR grid
    crop_border: int = 8              # for the Y-channel metrics


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2] = 1
    bf16: bool = True
    gradient_accumulation_steps: int = 1
    steps_per_print: int = 0          # 0: DeepSpeed's own printing off; we log ourselves


@dataclass
class Config:
    name: str = "gafh_ridn"
    seed: int = 0
    kernels: Literal["auto", "triton", "torch"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    @property
    def lr_size(self) -> int:
        return self.data.hr_size // self.model.scale

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_config(path: Optional[Union[str, Path]] = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML file into `Config`, then apply `section.key=value` overrides (type-checked).

    `path=None` gives the defaults (the paper). Raises ConfigError naming the key and the source.
    """
    cfg = Config()
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
        _merge(cfg, raw, source, prefix="")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        value = yaml.safe_load(text) if text.strip() else None
        nested: dict = value
        for part in reversed(dotted.strip().split(".")):
            nested = {part: nested}
        _merge(cfg, nested, f"override {item!r}", prefix="")
    _validate(cfg, source)
    return cfg


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Rebuild a Config from `Config.to_dict()` output (checkpoints, exported weights)."""
    cfg = Config()
    _merge(cfg, raw, source, prefix="")
    _validate(cfg, source)
    return cfg


def _merge(obj, raw: dict, source: str, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in fields:
            close = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{name}' (known here: {close})")
        hint = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{name}' is a section; expected a mapping, got {value!r}")
            _merge(current, value, source, prefix=f"{name}.")
        else:
            setattr(obj, key, _coerce(value, hint, name, source))


def _coerce(value, hint, name: str, source: str):
    """Check `value` against the type hint; the only conversions are int->float and list->tuple."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    bad = ConfigError(f"{source}: '{name}' must be {_describe(hint)}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name, source)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad
            return tuple(_coerce(v, a, f"{name}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else typing.Any
        out = [_coerce(v, item, f"{name}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{source}: '{name}': unsupported type {hint}")


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _validate(cfg: Config, source: str) -> None:
    """Cross-field checks that types alone cannot express."""
    if cfg.model.scale != 8:
        raise ConfigError(f"{source}: 'model.scale' must be 8 (three x2 upsampling stages), got {cfg.model.scale}")
    if cfg.data.hr_size % (cfg.model.scale * 4) != 0:
        # the discriminator halves 5 times; hr_size must be a multiple of 32
        raise ConfigError(f"{source}: 'data.hr_size' must be a multiple of 32, got {cfg.data.hr_size}")
    from gafh_fast.models.vgg import VGG19_LAYERS  # local: keeps config importable on its own

    if cfg.train.content.layer not in VGG19_LAYERS:
        raise ConfigError(
            f"{source}: 'train.content.layer' = {cfg.train.content.layer!r} is not a VGG-19 layer "
            f"(expected one of conv1_1 ... relu5_4, pool1 ... pool5)"
        )
    for key in ("batch_size", "val_batch_size", "num_threads"):
        if getattr(cfg.data, key) < 1:
            raise ConfigError(f"{source}: 'data.{key}' must be >= 1")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"{source}: 'train.ema_decay' must be in [0, 1)")
    graphed = [p for p in cfg.train.compile.cuda_graphs if p not in cfg.train.compile.parts]
    if graphed:
        raise ConfigError(f"{source}: 'train.compile.cuda_graphs' names {graphed}, which 'train.compile.parts' "
                          "does not compile")


def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
