"""Photometric and batch augmentations in common.py (and LUT's view 2 in lut.py): determinism, ranges,
formulas; the device-side colour ops against torchvision's PIL ops (the reference pipelines) on the
same parameters."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

try:  # the reference ops: torchvision comes with requirements-test.txt
    import torchvision.transforms.functional as TF
except ImportError:
    TF = None
needs_torchvision = pytest.mark.skipif(TF is None, reason='torchvision (requirements-test.txt) is the reference')
from PIL import ImageFilter

from common import color_jitter, jitter_params, luma, mixup_cutmix, renormalize_unit, shift_hue, to_tensor, unnormalize
from evaluate import RA_OPS, erase, erasing_box, rand_augment, soft_target_cross_entropy
from lut import gaussian_blur, solarize, view2, view2_params


def rand_img(seed=0, size=(48, 40)):
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a)


def const_img(v, size=(16, 16)):
    return Image.new('RGB', size, (v, v, v))


def arr(img):
    return np.asarray(img)


G = np.random.default_rng


def test_rand_augment_determinism():
    img = rand_img()
    a = rand_augment(G(123), img).tobytes()
    assert a == rand_augment(G(123), img).tobytes()
    outs = {rand_augment(G(s), img).tobytes() for s in range(8)}
    assert len(outs) >= 4  # different seeds give different outputs


# ---- colour augmentations on the device, against torchvision's PIL ops on the same parameters ----

def photo(seed, size=48):
    """A smooth random image with pixel noise (flat areas, edges and texture)."""
    r = G(seed)
    a = Image.fromarray(r.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    return Image.fromarray((np.asarray(a).astype(np.int16) + r.integers(-20, 21, (size, size, 3))).clip(0, 255).astype(np.uint8))


PHOTOS = [photo(s) for s in range(8)]


def on_device(fn, params=None):
    """fn on the batch of PHOTOS as [0, 1] floats; returns [B, 3, H, W] on the 0..255 scale."""
    x = torch.stack([to_tensor(i) for i in PHOTOS]).float() / 255
    return (fn(x) * 255).numpy()


def with_pil(fn):
    """fn(i, image) on each of PHOTOS; returns [B, 3, H, W] on the 0..255 scale."""
    return np.stack([np.asarray(fn(i, im)).transpose(2, 0, 1) for i, im in enumerate(PHOTOS)]).astype(np.float64)


def pil_jitter(img, p):
    """torchvision's PIL ops in the order of p (jitter_params); ops at their identity are skipped."""
    k = round(float(p[3]) * 255)  # the hue byte shift; torchvision truncates hue * 255, so aim inside the byte
    ops = [lambda im: TF.adjust_brightness(im, float(p[0])), lambda im: TF.adjust_contrast(im, float(p[1])),
           lambda im: TF.adjust_saturation(im, float(p[2])), lambda im: TF.adjust_hue(im, (k + 0.1 * np.sign(k)) / 255)]
    for o in p[4:8].astype(int):
        if p[o] != (0 if o == 3 else 1):
            img = ops[o](img)
    return img


@needs_torchvision
def test_jitter_params_are_torchvision_colorjitter_draws_in_the_old_order():
    for s in range(20):
        rng = G(s)  # by hand: brightness, contrast, saturation, hue factors, then a permutation of the ops
        f = [rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)]
        np.testing.assert_allclose(jitter_params(G(s), 0.4, 0.4, 0.2, 0.1), f + list(rng.permutation(4)), rtol=1e-6)
        rng = G(s)  # MaskDistill: no hue, so 3 ops are permuted and hue sits last at its identity
        f = [rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), 0.0]
        np.testing.assert_allclose(jitter_params(G(s), 0.4, 0.4, 0.4, 0.0), f + list(rng.permutation(3)) + [3], rtol=1e-6)


def test_lut_view2_params_are_the_old_draws_and_distribution():
    for s in range(20):
        rng, p = G(s), view2_params(G(s))
        jittered = rng.random() < 0.8
        if jittered:
            np.testing.assert_array_equal(p[:8], jitter_params(rng, 0.4, 0.4, 0.2, 0.1))
        k = rng.integers(3)
        assert p[8] == k and (p[9] == np.float32(rng.uniform(0.1, 2.0)) if k == 2 else p[9] == 0)
        assert jittered or list(p[:8]) == [1, 1, 1, 0, 0, 1, 2, 3]
    p = np.stack([view2_params(G(s)) for s in range(3000)])
    jittered = (p[:, :4] != [1, 1, 1, 0]).any(1)
    assert 0.77 < jittered.mean() < 0.83  # p 0.8
    assert all(0.30 < (p[:, 8] == k).mean() < 0.37 for k in range(3))  # one of three, uniformly
    sigma = p[p[:, 8] == 2, 9]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.05
    perms = {}
    for row in p[jittered, 4:8].astype(int):
        perms[tuple(row)] = perms.get(tuple(row), 0) + 1
    assert len(perms) == 24 and min(perms.values()) > 0.6 * jittered.sum() / 24  # every order, about equally often


@needs_torchvision
@pytest.mark.parametrize('op,factor', [(0, 0.6), (0, 1.37), (1, 0.6), (1, 1.37), (2, 0.6), (2, 1.4)])
def test_device_blends_match_pil_within_rounding(op, factor):
    """Brightness, contrast, saturation: PIL truncates to uint8 (and rounds the contrast mean to an
    integer): at most 1.25 levels apart."""
    p = np.array([1, 1, 1, 0, op] + [o for o in range(4) if o != op], np.float32)
    p[op] = factor
    got = on_device(lambda x: color_jitter(x, torch.from_numpy(p).expand(len(PHOTOS), 8)))
    d = np.abs(got - with_pil(lambda i, im: pil_jitter(im, p)))
    assert d.max() <= 1.25 and d.mean() < 0.5


@needs_torchvision
@pytest.mark.parametrize('h', [-0.49, -0.1, 0.03, 0.3, 0.49])
def test_device_hue_matches_pil_within_its_hsv_bytes(h):
    """PIL stores H, S, V as bytes (truncated) on the way; the device keeps floats: single pixels
    of saturated colours move up to ~6 levels, the average well under 1."""
    p = np.array([1, 1, 1, h, 3, 0, 1, 2], np.float32)
    d = np.abs(on_device(lambda x: color_jitter(x, torch.from_numpy(p).expand(len(PHOTOS), 8)))
               - with_pil(lambda i, im: pil_jitter(im, p)))
    assert d.max() <= 8 and d.mean() < 0.7


def test_hue_shift_exact_on_primaries_and_gray():
    x = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5]]).view(2, 3, 1, 1).expand(2, 3, 2, 2)
    out = shift_hue(x, torch.tensor([85.0, 85.0]))  # 85 of 256 bytes: red to green (PIL's byte scale)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(out[1], x[1])  # gray has no hue
    assert torch.allclose(shift_hue(x, torch.tensor([-128.0, -128.0])), shift_hue(x, torch.tensor([128.0, 128.0])), atol=1e-6)


@needs_torchvision
def test_device_gray_solarize_blur_match_pil():
    n = len(PHOTOS)
    d = np.abs(on_device(lambda x: luma(x).expand_as(x)) - with_pil(lambda i, im: TF.rgb_to_grayscale(im, 3)))
    assert d.max() <= 0.501  # PIL rounds the luma
    assert np.abs(on_device(solarize) - with_pil(lambda i, im: TF.solarize(im, 128))).max() < 1e-3  # float rounding only
    sigmas = torch.tensor([0.1, 0.3, 0.5, 0.8, 1.0, 1.4, 1.7, 2.0])
    got = on_device(lambda x: gaussian_blur(x, sigmas[:n]))
    d = np.abs(got - with_pil(lambda i, im: im.filter(ImageFilter.GaussianBlur(float(sigmas[i])))))
    # PIL approximates the Gaussian by three box blurs; the device convolves with the true one
    assert d.max() <= 10 and d.mean() < 0.7
    assert np.abs(got - on_device(lambda x: x)).mean() > 2  # and it does blur


@needs_torchvision
def test_device_view2_matches_pil_pipeline_per_image():
    """Whole LUT view 2 and MaskDistill jitter, each image with its own parameters and op order. Float
    on the device vs uint8 after every PIL op: small differences, except single pixels near
    solarize's threshold that one side inverts and the other not."""
    for seed in range(3):
        p = np.stack([view2_params(G((seed, i))) for i in range(len(PHOTOS))])
        got = on_device(lambda x: unnormalize(view2(renormalize_unit(x), torch.from_numpy(p))))
        last = [lambda im: TF.rgb_to_grayscale(im, 3), lambda im: TF.solarize(im, 128),
                lambda im, s=0: im.filter(ImageFilter.GaussianBlur(s))]
        ref = with_pil(lambda i, im: (last[2](pil_jitter(im, p[i]), float(p[i, 9])) if p[i, 8] == 2
                                      else last[int(p[i, 8])](pil_jitter(im, p[i]))))
        d = np.abs(got - ref)
        assert d.mean() < 1.5 and (d > 12).mean() < 0.005, (d.mean(), (d > 12).mean())
        p = np.stack([jitter_params(G((seed, i)), 0.4, 0.4, 0.4, 0.0) for i in range(len(PHOTOS))])
        d = np.abs(on_device(lambda x: color_jitter(x, torch.from_numpy(p), hue=False))
                   - with_pil(lambda i, im: pil_jitter(im, p[i])))
        assert d.max() <= 5 and d.mean() < 2  # PIL truncates each blend to uint8: about -0.5 level per op


def test_rand_augment_output():
    img = rand_img(2)
    for s in range(30):
        out = rand_augment(G(s), img)
        assert out.size == img.size and out.mode == 'RGB'
        o = arr(out)
        assert o.dtype == np.uint8 and o.min() >= 0 and o.max() <= 255


@pytest.mark.parametrize('name', list(RA_OPS))
def test_each_ra_op(name):
    img = rand_img(3, (24, 20))
    for m in (0.0, 5.0, 10.0):
        for sign in (-1, 1):
            out = RA_OPS[name](img, m, sign)
            assert out.size == img.size and out.mode == 'RGB'


def test_ra_strength_increases():
    # smooth image: on noise every geometric op is already maximally different
    yy, xx = np.mgrid[0:40, 0:48]
    img = Image.fromarray(np.stack([xx * 5, yy * 6, np.full_like(xx, 90)], -1).astype(np.uint8))
    d = lambda o: np.abs(arr(o).astype(int) - arr(img)).mean()  # noqa: E731
    for name in ('Rotate', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
                 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel', 'SolarizeIncreasing',
                 'PosterizeIncreasing', 'SolarizeAdd'):
        assert d(RA_OPS[name](img, 2.0, 1)) < d(RA_OPS[name](img, 9.0, 1)), name
    assert (arr(RA_OPS['PosterizeIncreasing'](img, 10.0, 1)) == 0).all()  # 0 bits kept
    # translate by 0.45 of the width at m=10 fills the uncovered strip with gray
    img = rand_img(4)
    t = arr(RA_OPS['TranslateXRel'](img, 10.0, 1))
    assert (t[:, -int(0.45 * img.size[0]) + 1:] == 128).all()


def test_random_erasing_box_and_fill():
    assert not erasing_box(G(0), (32, 24), p=0.0).any()
    boxes = np.stack([erasing_box(G(s), (32, 24), p=1.0) for s in range(10)])
    x = torch.randn(10, 3, 32, 24)
    y = erase(x, torch.from_numpy(boxes))
    for b, (top, left, h, w) in zip(range(10), boxes):
        diff = (y[b] != x[b]).any(0)
        assert diff.sum() == h * w == diff[top:top + h, left:left + w].sum()  # exactly the box, one rectangle
        assert 0.02 * 32 * 24 * 0.8 <= h * w <= 32 * 24 / 3 * 1.2
    fill = y[0][:, boxes[0, 0]:boxes[0, 0] + boxes[0, 2], boxes[0, 1]:boxes[0, 1] + boxes[0, 3]]
    assert abs(fill.mean()) < 0.3 and 0.7 < fill.std() < 1.3  # N(0, 1): the scale of normalized images
    assert torch.equal(erase(x, torch.zeros(10, 4, dtype=torch.long)), x)


def test_mixup_targets_sum_and_shapes():
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 4])
    for s in range(6):
        xo, t = mixup_cutmix(G(s), x, y, 10)
        assert xo.shape == x.shape and t.shape == (6, 10)
        assert torch.allclose(t.sum(1), torch.ones(6), atol=1e-6)
        assert t.min() >= 0.1 / 10 * 0.999


def test_mixup_lam_recoverable():
    B, C = 6, 5
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 4, 4).contiguous()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for s in range(5):
        xo, t = mixup_cutmix(G(s), x, y, C, cutmix_alpha=0.0, label_smoothing=0.0)
        lam = 1 - xo[0, 0, 0, 0].item() / (B - 1)  # row 0 = lam*0 + (1-lam)*(B-1)
        assert torch.allclose(xo, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
        oh = F.one_hot(y, C).float()
        assert torch.allclose(t, lam * oh + (1 - lam) * oh.flip(0), atol=1e-5)


def test_cutmix_region():
    B, C = 4, 4
    x, y = torch.randn(B, 3, 16, 12), torch.arange(B)
    for s in range(8):
        xo, t = mixup_cutmix(G(s), x, y, C, mixup_alpha=0.0, label_smoothing=0.0)
        from_x, from_f = (xo == x), (xo == x.flip(0))
        assert (from_x | from_f).all()
        pasted = ~from_x.all(1)  # [B,H,W]; same box for the whole batch
        assert torch.equal(pasted, pasted[:1].expand_as(pasted))
        lam = t[0, 0].item()  # y[0] == 0 and no smoothing: weight of own class
        assert abs((1 - pasted[0].float().mean().item()) - lam) < 1e-6
        assert abs(t[0, C - 1].item() - (1 - lam)) < 1e-6


def test_cutmix_does_not_modify_input():
    x = torch.randn(4, 3, 8, 8)
    x0 = x.clone()
    mixup_cutmix(G(0), x, torch.arange(4), 4, mixup_alpha=0.0)
    assert torch.equal(x, x0)


def test_soft_target_cross_entropy():
    logits, y = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    got = soft_target_cross_entropy(logits, F.one_hot(y, 7).float())
    assert torch.allclose(got, F.cross_entropy(logits, y), atol=1e-6)
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    tgt = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    lse0 = np.log(np.exp(1) + np.exp(2) + np.exp(3))
    row0 = 0.5 * (lse0 - 1) + 0.5 * (lse0 - 2)
    row1 = np.log(3.0)  # uniform logits: -log(1/3) for every class, weights sum to 1
    assert abs(soft_target_cross_entropy(logits, tgt).item() - (row0 + row1) / 2) < 1e-5
