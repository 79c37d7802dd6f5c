"""VGG-19 layer table, the torchvision-format loader and its errors."""
import pytest
import torch

from gafh_fast.models.vgg import VGG19_FILENAME, VGG19_LAYERS, VGG19Features

# torchvision's vgg19().features indices, written out by hand
TORCHVISION_INDEX = {
    "conv1_1": 0, "relu1_1": 1, "conv1_2": 2, "pool1": 4, "conv2_1": 5, "relu2_2": 8, "pool2": 9,
    "conv3_1": 10, "conv3_4": 16, "pool3": 18, "conv4_1": 19, "conv4_3": 23, "relu4_3": 24,
    "conv4_4": 25, "pool4": 27, "conv5_1": 28, "conv5_4": 34, "relu5_4": 35, "pool5": 36,
}
CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
WIDTHS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]


def torchvision_style_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state, c_in = {}, 3
    for idx, c_out in zip(CONV_INDICES, WIDTHS):
        state[f"features.{idx}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.01
        state[f"features.{idx}.bias"] = torch.randn(c_out, generator=g) * 0.01
        c_in = c_out
    state["classifier.0.weight"] = torch.zeros(4, 4)  # ignored, as in a real file
    return state


def test_layer_names_map_to_torchvision_indices():
    for name, index in TORCHVISION_INDEX.items():
        assert VGG19_LAYERS[name][0] == index, name
    assert len(VGG19_LAYERS) == 37


@pytest.mark.parametrize("layer,channels,side", [("relu1_2", 64, 16), ("pool2", 128, 4), ("relu4_3", 512, 2)])
def test_cut_point_selects_output(layer, channels, side):
    vgg = VGG19Features(layer, pretrained=False)
    out = vgg(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert out.shape == (1, channels, side, side)
    assert len(vgg.features) == VGG19_LAYERS[layer][0] + 1
    assert not any(p.requires_grad for p in vgg.parameters())
    assert not vgg.training


def test_torchvision_state_dict_loads(tmp_path):
    state = torchvision_style_state()
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    vgg = VGG19Features("relu2_1", weights=str(path))
    torch.testing.assert_close(vgg.features[5].weight, state["features.5.weight"])
    torch.testing.assert_close(vgg.features[0].bias, state["features.0.bias"])
    # the normalisation: [-1, 1] -> [0, 1] -> ImageNet mean/std, then conv1_1
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = torch.nn.functional.conv2d(((x + 1) / 2 - mean) / std, state["features.0.weight"],
                                      state["features.0.bias"], padding=1)
    torch.testing.assert_close(vgg.features[0]((((x + 1) / 2) - mean) / std), want)


def test_default_location_under_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / VGG19_FILENAME
    target.parent.mkdir(parents=True)
    torch.save(torchvision_style_state(), target)
    VGG19Features("relu1_1")  # found without a configured path


def test_wrong_state_dict_fails_clearly(tmp_path):
    state = torchvision_style_state()
    state["features.2.weight"] = torch.zeros(64, 32, 3, 3)
    del state["features.5.bias"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"features\.2\.weight has shape \(64, 32, 3, 3\), expected \(64, 64, 3, 3\)") as err:
        VGG19Features("relu2_1", weights=str(path))
    assert "missing features.5.bias" in str(err.value) and str(path) in str(err.value)


def test_the_cut_layers_own_conv_is_checked(tmp_path):
    state = torchvision_style_state()
    state["features.5.weight"] = torch.zeros(128, 32, 3, 3)  # conv2_1, the cut itself
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"features\.5\.weight has shape \(128, 32, 3, 3\), expected \(128, 64, 3, 3\)"):
        VGG19Features("conv2_1", weights=str(path))


def test_default_location_without_torch_home(tmp_path, monkeypatch):
    """$TORCH_HOME unset: $XDG_CACHE_HOME/torch, else ~/.cache/torch (torch.hub's own rule)."""
    from gafh_fast.models.vgg import vgg19_candidate_paths

    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vgg19_candidate_paths(None) == [tmp_path / "xdg" / "torch" / "hub" / "checkpoints" / VGG19_FILENAME]
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert vgg19_candidate_paths("~/w.pth") == [tmp_path / "home" / "w.pth",
                                               tmp_path / "home" / ".cache" / "torch" / "hub" / "checkpoints" / VGG19_FILENAME]


def test_missing_file_names_every_path_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(FileNotFoundError) as err:
        VGG19Features("relu4_3", weights=str(tmp_path / "nope.pth"))
    msg = str(err.value)
    assert str(tmp_path / "nope.pth") in msg and str(tmp_path / "th" / "hub" / "checkpoints" / VGG19_FILENAME) in msg
    assert "pretrained: false" in msg


def test_random_weights_warn(caplog):
    with caplog.at_level("WARNING", logger="gafh_fast"):
        VGG19Features("relu1_1", pretrained=False)
    assert any("RANDOM" in r.getMessage() for r in caplog.records)


def test_unknown_layer():
    with pytest.raises(ValueError, match="unknown VGG-19 layer"):
        VGG19Features("relu6_1", pretrained=False)
