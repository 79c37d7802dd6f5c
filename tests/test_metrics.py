"""PSNR/SSIM against scikit-image on natural-looking images, and the PIL-exact bicubic."""
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gafh_fast.metrics import bicubic_upsample, psnr, rgb_to_y, ssim
from gafh_fast.resize import bicubic_resize


def natural_images(n=3, size=48, seed=0):
    """Smooth shapes + texture + a noisy degraded copy: statistics like photos, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    clean, noisy = [], []
    for _ in range(n):
        img = np.stack([
            0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy) + rng.uniform(0, 6))
            for _ in range(3)])
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        img += 0.3 * (((xx - cx) ** 2 + (yy - cy) ** 2) < 0.05)
        img = np.clip(img, 0, 1)
        clean.append(img)
        noisy.append(np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1))
    return torch.tensor(np.stack(clean)), torch.tensor(np.stack(noisy))


def to_u8(t):
    return np.round(np.clip(t.numpy(), 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def y_numpy(u8):
    f = u8.astype(np.float64)
    return (65.481 * f[..., 0] + 128.553 * f[..., 1] + 24.966 * f[..., 2]) / 255.0 + 16.0


def test_psnr_rgb_matches_skimage():
    a, b = natural_images()
    got = psnr(a, b)
    for i, (x, y) in enumerate(zip(to_u8(a), to_u8(b))):
        assert got[i].item() == pytest.approx(peak_signal_noise_ratio(x, y, data_range=255), abs=1e-3)


def test_psnr_y_with_border_matches_skimage():
    a, b = natural_images(seed=1)
    got = psnr(a, b, channel="y", crop_border=8)
    for i, (x, y) in enumerate(zip(to_u8(a), to_u8(b))):
        want = peak_signal_noise_ratio(y_numpy(x)[8:-8, 8:-8], y_numpy(y)[8:-8, 8:-8], data_range=255)
        assert got[i].item() == pytest.approx(want, abs=1e-3)


def test_ssim_rgb_matches_skimage():
    a, b = natural_images(seed=2)
    got = ssim(a, b)
    for i, (x, y) in enumerate(zip(to_u8(a), to_u8(b))):
        want = structural_similarity(x.astype(np.float64), y.astype(np.float64), channel_axis=2, data_range=255,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert got[i].item() == pytest.approx(want, abs=1e-3)


def test_ssim_y_matches_skimage():
    a, b = natural_images(seed=3)
    got = ssim(a, b, channel="y", crop_border=4)
    for i, (x, y) in enumerate(zip(to_u8(a), to_u8(b))):
        want = structural_similarity(y_numpy(x)[4:-4, 4:-4], y_numpy(y)[4:-4, 4:-4], data_range=255,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert got[i].item() == pytest.approx(want, abs=1e-3)


def test_identical_images():
    a, _ = natural_images(n=2)
    assert torch.isinf(psnr(a, a)).all()
    torch.testing.assert_close(ssim(a, a), torch.ones(2, dtype=torch.float64))


def test_quantises_to_8_bit_first():
    levels = torch.randint(0, 255, (2, 3, 16, 16)).double() / 255
    nudged = levels + 0.2 / 255  # under half a level: the same 8-bit image
    assert torch.isinf(psnr(levels, nudged)).all()
    one_level = levels + 1.0 / 255  # every pixel one level up: MSE = 1, PSNR = 20 log10(255)
    assert psnr(levels, one_level).tolist() == pytest.approx([20 * np.log10(255.0)] * 2, abs=1e-9)


def test_y_of_white_and_black():
    x = torch.stack([torch.zeros(3, 1, 1), torch.full((3, 1, 1), 255.0)]).double()
    torch.testing.assert_close(rgb_to_y(x).flatten(), torch.tensor([16.0, 235.0], dtype=torch.float64))


@pytest.mark.parametrize("src,dst", [((32, 32), (256, 256)), ((178, 178), (256, 256)), ((256, 256), (32, 32)),
                                     ((13, 7), (5, 11))])
def test_bicubic_resize_equals_pil(src, dst):
    rng = np.random.default_rng(0)
    a = rng.random(src).astype(np.float32)
    want = np.asarray(Image.fromarray(a, mode="F").resize((dst[1], dst[0]), Image.BICUBIC))
    got = bicubic_resize(torch.from_numpy(a)[None, None], dst)[0, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bicubic_upsample_is_x8_and_not_torch_bicubic():
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    up = bicubic_upsample(lr)
    assert up.shape == (2, 3, 32, 32)
    torch_a075 = torch.nn.functional.interpolate(lr, scale_factor=8, mode="bicubic", align_corners=False)
    assert (up - torch_a075).abs().max() > 1e-3  # a = -0.5 vs torch's a = -0.75
