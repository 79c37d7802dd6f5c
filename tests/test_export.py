"""The exported generator: safetensors + config, strict loading with named mismatches."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from gafh_fast.config import load_config
from gafh_fast.export import load_generator, read_generator_config, save_generator
from gafh_fast.models import build_generator


def test_round_trip(tiny_cfg, tmp_path):
    g = build_generator(tiny_cfg).eval()
    path = save_generator(g, tiny_cfg, tmp_path / "g.safetensors")
    assert read_generator_config(path) == tiny_cfg
    g2, cfg2 = load_generator(path)
    lr = torch.rand(1, 3, 4, 4) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(g(lr), g2(lr))
    assert not any(k.startswith("optim") for k in load_file(str(path)))


def test_mismatch_names_tensor_and_shapes(tiny_cfg, tmp_path):
    path = save_generator(build_generator(tiny_cfg), tiny_cfg, tmp_path / "g.safetensors")
    other = load_config(None, ["model.generator.nf=16", "model.generator.gc=4", "model.generator.num_dnb=1",
                                "model.generator.ridb_per_dnb=2", "model.generator.idb_per_ridb=2",
                                "model.generator.sfm_kernel=3", "model.generator.out_kernel=3"])
    with pytest.raises(ValueError, match=r"tensor 'sfm\.weight' has shape \(8, 3, 3, 3\) in the file but \(16, 3, 3, 3\)"):
        load_generator(path, cfg=other)


def test_foreign_file_is_rejected(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="not a gafh_fast generator export"):
        read_generator_config(tmp_path / "f.safetensors")
