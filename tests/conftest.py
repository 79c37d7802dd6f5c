"""Shared test fixtures: tiny configs that keep the CPU suite fast."""
import pytest
import torch

from gafh_fast.config import load_config

TINY_OVERRIDES = (
    "model.generator.nf=8", "model.generator.gc=4", "model.generator.num_dnb=1",
    "model.generator.ridb_per_dnb=2", "model.generator.idb_per_ridb=2",
    "model.generator.sfm_kernel=3", "model.generator.out_kernel=3",
    "model.discriminator.nf=4", "model.discriminator.dense=16",
    "data.hr_size=32", "train.content.pretrained=false", "train.content.layer=relu2_1",
    "kernels=torch",
)


@pytest.fixture
def tiny_cfg():
    return load_config(None, TINY_OVERRIDES)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
