"""common.py: the ViT against timm's layout and a manual forward, masking, data and transforms."""
import io
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import evaluate

D, DEPTH, HEADS, P, IMG = 96, 2, 3, 8, 32  # a small ViT: 4 x 4 = 16 patches


def small_vit(**kw):
    torch.manual_seed(0)
    return common.VisionTransformer(**dict(dict(img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS), **kw))


# ---- ViT layout -------------------------------------------------------------------------------

def timm_table(num_classes=0, global_pool='token', layer_scale=False, pre_norm=False):
    """timm's vit key -> shape table (REFERENCE.md), written out for the small config."""
    t = {'patch_embed.proj.weight': (D, 3, P, P), 'patch_embed.proj.bias': (D,), 'cls_token': (1, 1, D),
         'pos_embed': (1, 1 + (IMG // P) ** 2, D)}
    for i in range(DEPTH):
        b = f'blocks.{i}.'
        t.update({b + 'norm1.weight': (D,), b + 'norm1.bias': (D,), b + 'attn.qkv.weight': (3 * D, D),
                  b + 'attn.qkv.bias': (3 * D,), b + 'attn.proj.weight': (D, D), b + 'attn.proj.bias': (D,),
                  b + 'norm2.weight': (D,), b + 'norm2.bias': (D,), b + 'mlp.fc1.weight': (4 * D, D),
                  b + 'mlp.fc1.bias': (4 * D,), b + 'mlp.fc2.weight': (D, 4 * D), b + 'mlp.fc2.bias': (D,)})
        if layer_scale:
            t.update({b + 'ls1.gamma': (D,), b + 'ls2.gamma': (D,)})
    norm = 'fc_norm' if global_pool == 'avg' else 'norm'
    t.update({f'{norm}.weight': (D,), f'{norm}.bias': (D,)})
    if pre_norm:
        t.update({'norm_pre.weight': (D,), 'norm_pre.bias': (D,)})
    if num_classes:
        t.update({'head.weight': (num_classes, D), 'head.bias': (num_classes,)})
    return t


@pytest.mark.parametrize('kw', [{}, dict(num_classes=10, global_pool='avg'),
                                dict(init_values=0.1, pre_norm=True)])
def test_vit_keys_and_shapes_match_timm(kw):
    vit = small_vit(**kw)
    got = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    want = timm_table(kw.get('num_classes', 0), kw.get('global_pool', 'token'), 'init_values' in kw, kw.get('pre_norm', False))
    assert got == want


def test_qkv_rows_are_q_k_v_with_contiguous_heads():
    attn = common.Attention(D, HEADS)
    x = torch.randn(2, 5, D)
    W, b = attn.qkv.weight, attn.qkv.bias
    hd = D // HEADS
    out = torch.zeros(2, 5, D)
    for h in range(HEADS):  # q of head h is rows h*hd:(h+1)*hd of the first D rows, and so on
        rows = slice(h * hd, (h + 1) * hd)
        q = x @ W[:D][rows].T + b[:D][rows]
        k = x @ W[D:2 * D][rows].T + b[D:2 * D][rows]
        v = x @ W[2 * D:][rows].T + b[2 * D:][rows]
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1)
        out[..., rows] = a @ v
    ref = out @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_sincos_matches_formula():
    dim, gh, gw = 8, 2, 3
    pe = common.sincos_pos_embed(dim, gh, gw, cls_token=True)
    assert pe.shape == (1 + gh * gw, dim) and pe[0].abs().sum() == 0
    for i in range(gh):
        for j in range(gw):
            row = []
            for pos in (j, i):  # MAE: first half from the column index, second from the row
                w = [1 / 10000 ** (k / (dim / 4)) for k in range(dim // 4)]
                row += [math.sin(pos * o) for o in w] + [math.cos(pos * o) for o in w]
            torch.testing.assert_close(pe[1 + i * gw + j], torch.tensor(row), atol=1e-6, rtol=0)


def test_pos_embed_resampling():
    pe = torch.randn(1, 1 + 16, D)
    same = common.resample_pos_embed(pe, (4, 4))
    torch.testing.assert_close(same, pe, atol=1e-5, rtol=1e-5)  # same grid: unchanged
    const = torch.cat([torch.randn(1, 1, D), torch.ones(1, 16, D) * 0.3], 1)
    big = common.resample_pos_embed(const, (7, 7))
    assert big.shape == (1, 50, D)
    assert torch.equal(big[:, :1], const[:, :1])  # the cls slot is kept as is
    torch.testing.assert_close(big[:, 1:], torch.full((1, 49, D), 0.3), atol=1e-5, rtol=0)
    ramp = torch.arange(4.).repeat(4).reshape(1, 16, 1).expand(1, 16, D)  # linear in the column index
    up = common.resample_pos_embed(torch.cat([torch.zeros(1, 1, D), ramp], 1), (8, 8))[0, 1:, 0].reshape(8, 8)
    assert torch.all(up[:, 1:] >= up[:, :-1] - 1e-5) and torch.allclose(up[0], up[5])  # still increasing along x only


def manual_forward(vit, img, ids_keep=None, mask=None, mask_token=None):
    """The forward written out block by block, as the papers describe it."""
    x = F.conv2d(img, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=P).flatten(2).transpose(1, 2)
    if mask is not None:
        x = torch.where(mask.bool()[..., None], mask_token.expand_as(x), x)
    x = x + vit.pos_embed[:, 1:]
    if ids_keep is not None:
        x = torch.stack([x[b, ids_keep[b]] for b in range(x.shape[0])])
    x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], 1)
    outs = []
    for blk in vit.blocks:
        x = x + blk.attn(blk.norm1(x))
        x = x + blk.mlp(blk.norm2(x))
        outs.append(x)
    return vit.norm(x), outs


def test_forward_parts_match_manual_computation():
    vit = small_vit().eval()
    img = torch.randn(2, 3, IMG, IMG)
    ids_keep, mask, _ = common.random_masking(torch.rand(2, 16), 0.75)
    # (a) only kept tokens, as MAE puts the parts together
    x = vit.add_pos(vit.patch_embed(img))
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    torch.testing.assert_close(vit.norm(vit.run_blocks(vit.add_cls(x))), manual_forward(vit, img, ids_keep)[0])
    # (b) mask token, as SimMIM puts them together
    token = torch.randn(1, 1, D)
    x = torch.where(mask.bool()[..., None], token, vit.patch_embed(img))
    torch.testing.assert_close(vit.norm(vit.run_blocks(vit.add_cls(vit.add_pos(x)))),
                               manual_forward(vit, img, mask=mask, mask_token=token)[0])
    # (c) block by block, before the final norm; forward_features is the whole chain
    ref, ref_outs = manual_forward(vit, img)
    torch.testing.assert_close(vit.forward_features(img), ref)
    x = vit.add_cls(vit.add_pos(vit.patch_embed(img)))
    for blk, want in zip(vit.blocks, ref_outs):
        torch.testing.assert_close(x := vit.run_blocks(x, [blk]), want)
    # (d) explicit attention maps: rows sum to one, and weighting the values by them is the block's attention
    y = vit.blocks[0].norm1(vit.add_cls(vit.add_pos(vit.patch_embed(img))))
    attn = evaluate.attention_maps(vit.blocks[0].attn, y)
    assert attn.shape == (2, HEADS, 17, 17)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, HEADS, 17))
    v = vit.blocks[0].attn.qkv(y)[..., 2 * D:].reshape(2, 17, HEADS, D // HEADS).transpose(1, 2)
    out = vit.blocks[0].attn.proj((attn @ v).transpose(1, 2).reshape(2, 17, D))
    torch.testing.assert_close(out, vit.blocks[0].attn(y), atol=1e-5, rtol=1e-5)


def test_relative_position_bias_index():
    rpb = common.RelativePositionBias((3, 3), 2)
    idx = rpb.relative_position_index
    n = 5 * 5
    assert idx.shape == (10, 10) and idx[0, 0] == n + 2 and (idx[0, 1:] == n).all() and (idx[1:, 0] == n + 1).all()
    # same offset -> same index: patch (0,0)->(1,1) and (1,1)->(2,2)
    assert idx[1 + 0, 1 + 4] == idx[1 + 4, 1 + 8]
    assert idx[1:, 1:].unique().numel() == n  # every 2D offset has its own entry


class Classifier(nn.Module):  # the training protocol of common.train: loss, logs = model(batch)
    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, batch):
        return self.vit(batch['img']).logsumexp(-1).mean(), {}


def vit_forward_flops(n, L, D, depth, r, p, classes):
    """The count behind MFU (PaLM App. B), per image: per block and token 8 D^2 (qkv, proj) + 4 r D^2
    (MLP) + 4 N D (scores and weighted sum), the patch embedding on L patches, the head on one token."""
    return depth * (n * (8 + 4 * r) * D * D + 4 * n * n * D) + 2 * L * 3 * p * p * D + 2 * D * classes


def test_train_flops_is_the_vit_formula():
    vit = small_vit(num_classes=10)
    counted = common.train_flops(Classifier(vit), {'img': torch.randn(3, 3, IMG, IMG)})
    fwd = vit_forward_flops(17, 16, D, DEPTH, 4, P, 10)
    # backward = 2 x forward (input and weight gradients), except that the image needs no gradient
    # (the patch convolution's backward is 1x)
    want = 3 * fwd - 2 * 16 * 3 * P * P * D
    assert counted == want
    assert all(p.grad is None for p in vit.parameters())  # counting leaves no gradients behind


def test_vit_base_forward_is_35_gflops():  # ViT-B/16 at 224: ~17.6 GMACs (REFERENCE.md)
    assert abs(vit_forward_flops(197, 196, 768, 12, 4, 16, 0) / 1e9 - 35.1) < 0.3


# ---- masking --------------------------------------------------------------------------------

def test_random_masking_counts_and_restore():
    noise = torch.rand(4, 196)
    ids_keep, mask, ids_restore = common.random_masking(noise, 0.75)
    assert ids_keep.shape == (4, 49) and (mask.sum(1) == 147).all()
    ids_shuffle = torch.argsort(noise, 1)
    x = torch.randn(4, 196)
    torch.testing.assert_close(torch.gather(torch.gather(x, 1, ids_shuffle), 1, ids_restore), x)
    assert (torch.gather(mask, 1, ids_keep) == 0).all()  # kept patches are the visible ones
    assert torch.equal(ids_keep, torch.argsort(noise, 1)[:, :49])  # the smallest noise is kept


# ---- data -----------------------------------------------------------------------------------

def test_rrc_box_in_bounds():
    rng = np.random.default_rng(0)
    for W, H in [(500, 375), (64, 64), (300, 40)]:
        for _ in range(300):
            l, t, r, b = common.rrc_box(rng, W, H, (0.2, 1.0), (3 / 4, 4 / 3))
            assert 0 <= l < r <= W and 0 <= t < b <= H
            if (W, H) != (300, 40):  # the fallback (tried 10 times and failed) may leave the ranges
                area, aspect = (r - l) * (b - t) / (W * H), (r - l) / (b - t)
                assert 0.2 - 0.03 <= area <= 1.0 and 3 / 4 - 0.05 <= aspect <= 4 / 3 + 0.05
    l, t, r, b = common.rrc_box(rng, 300, 40, (0.9, 1.0), (3 / 4, 4 / 3))  # fallback: central, aspect clamped
    assert (r - l) / (b - t) == pytest.approx(4 / 3, abs=0.05) and b - t == 40


def test_jpeg_draft_decoding_matches_full_decode():
    yy, xx = np.mgrid[0:375, 0:500]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, 'JPEG', quality=90)
    full = common.crop_resize(Image.open(io.BytesIO(buf.getvalue())).convert('RGB'), (0, 0, 400, 300), 64)
    img = Image.open(io.BytesIO(buf.getvalue()))
    fast = common.crop_resize(img, (0, 0, 400, 300), 64)
    assert img.size[0] < 500  # decoded at a reduced size
    assert fast.size == (64, 64) and np.abs(np.asarray(fast, float) - np.asarray(full, float)).mean() < 6


def test_center_crop_and_normalize():
    img = Image.fromarray(np.full((40, 60, 3), 200, np.uint8))
    t = common.to_tensor(common.center_crop(img, 32))
    assert t.shape == (3, 32, 32) and t.dtype == torch.uint8
    x = common.normalize(t[None])
    want = (200 / 255 - torch.tensor(common.IMAGENET_MEAN)) / torch.tensor(common.IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 5, 5], want)


def test_image_folder(tmp_path):
    for c in ['b_cls', 'a_cls', 'c_cls']:
        os.makedirs(tmp_path / c / 'sub')
        Image.new('RGB', (8, 8), (1, 2, 3)).save(tmp_path / c / 'sub' / 'x.png')
    (tmp_path / 'a_cls' / 'notes.txt').write_text('not an image')
    ds = common.ImageFolder(str(tmp_path), lambda rng, img: {'img': common.to_tensor(img.convert('RGB'))})
    assert ds.classes == ['a_cls', 'b_cls', 'c_cls'] and len(ds) == 3
    assert [ds[i]['label'] for i in range(3)] == [0, 1, 2]
    with pytest.raises(common.UsageError, match='not found'):
        common.ImageFolder(str(tmp_path / 'missing'), None)
    os.makedirs(tmp_path / 'empty' / 'cls')
    with pytest.raises(common.UsageError, match='no images'):
        common.ImageFolder(str(tmp_path / 'empty'), None)


def test_synthetic_dataset_is_deterministic_and_labelled():
    tf = lambda rng, img: {'img': common.to_tensor(common.random_resized_crop(rng, img, 32))}  # noqa: E731
    a, b = common.SyntheticImages(tf, 40), common.SyntheticImages(tf, 40)
    assert torch.equal(a[(7, 3)]['img'], b[(7, 3)]['img'])  # same index and epoch: same image and crop
    assert not torch.equal(a[(7, 3)]['img'], a[(7, 4)]['img'])  # another epoch: another crop
    assert not torch.equal(a[7]['img'], a[8]['img'])
    assert [a[i]['label'] for i in range(12)] == [i % 10 for i in range(12)]
    val = common.SyntheticImages(tf, 40, split='val')
    assert not np.array_equal(np.asarray(a.load(3)), np.asarray(val.load(3)))


def test_renormalize_swaps_imagenet_for_another_normalization():
    p = torch.rand(2, 3, 4, 5)  # pixels in [0, 1]
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
    x = common.normalize((p * 255).round().to(torch.uint8))  # ImageNet-normalized, as the loop hands it over
    q = (p * 255).round() / 255
    want = torch.stack([(q[:, c] - mean[c]) / std[c] for c in range(3)], 1)
    torch.testing.assert_close(common.renormalize(x, mean, std), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(common.renormalize(x, (0.5,) * 3, (0.5,) * 3), 2 * q - 1, atol=1e-5, rtol=1e-5)
