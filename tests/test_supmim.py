"""supmim.py: the VQGAN tokenizer against taming's layout (and in float32 under autocast), the [E]
fill after the final norm, the losses against the paper's formulas, the gradient of each branch,
big_vision's RandAugment, the AugReg recipe, and the CLI (tokens, pixels, two processes)."""
import argparse
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import evaluate
import supmim
from supmim import AttnBlock, Downsample, VectorQuantizer, VQGANTokenizer, load_vqgan
from utils import TINY, run

TINY_VQ = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_levels=(1,), z_channels=8, embed_dim=8, n_embed=16)
# 32 px, patch 4: an 8 x 8 grid, so the f2 tiny VQGAN takes 16 px inputs; no accumulation (4 logged steps),
# no dropout or stochastic depth (so that two forward passes can be compared)
ARGS = TINY + ['--warmup-steps', '1', '--accum-iter', '1', '--dropout', '0', '--drop-path', '0']
PIXELS = ARGS + ['--target', 'pixels']


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    """A Lightning-style last.ckpt of a random 2-level VQGAN, with decoder and loss keys to ignore."""
    torch.manual_seed(1)
    sd = VQGANTokenizer(**TINY_VQ).state_dict()
    path = tmp_path_factory.mktemp('vq') / 'last.ckpt'
    torch.save({'state_dict': {**sd, 'decoder.conv_in.weight': torch.zeros(3), 'loss.logvar': torch.ones(1),
                               'post_quant_conv.weight': torch.zeros(2)}, 'global_step': 5, 'epoch': 1}, path)
    return str(path)


def make_batch(args, n=4):
    ds = common.SyntheticImages(supmim.train_transform(args), n)
    return common.to_device(torch.utils.data.default_collate([ds[i] for i in range(n)]), 'cpu')


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_real_vqgan_keys_shapes_and_16x16_grid():
    torch.manual_seed(0)
    real = VQGANTokenizer().eval()
    sd = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    table = {  # taming-transformers' vqgan_imagenet_f16_1024 encoder, quant_conv and codebook
        'encoder.conv_in.weight': (128, 3, 3, 3), 'encoder.conv_in.bias': (128,),
        'encoder.down.0.block.0.conv1.weight': (128, 128, 3, 3), 'encoder.down.0.block.1.conv2.weight': (128, 128, 3, 3),
        'encoder.down.1.block.0.conv1.weight': (128, 128, 3, 3), 'encoder.down.2.block.0.conv1.weight': (256, 128, 3, 3),
        'encoder.down.2.block.0.nin_shortcut.weight': (256, 128, 1, 1), 'encoder.down.2.block.1.conv2.weight': (256, 256, 3, 3),
        'encoder.down.3.block.0.conv1.weight': (256, 256, 3, 3), 'encoder.down.4.block.0.conv1.weight': (512, 256, 3, 3),
        'encoder.down.4.block.0.nin_shortcut.weight': (512, 256, 1, 1), 'encoder.down.4.block.0.norm1.weight': (256,),
        'encoder.down.4.block.1.conv2.weight': (512, 512, 3, 3), 'encoder.down.4.attn.0.q.weight': (512, 512, 1, 1),
        'encoder.down.4.attn.1.proj_out.bias': (512,), 'encoder.down.4.attn.1.norm.weight': (512,),
        'encoder.down.0.downsample.conv.weight': (128, 128, 3, 3), 'encoder.down.1.downsample.conv.weight': (128, 128, 3, 3),
        'encoder.down.2.downsample.conv.weight': (256, 256, 3, 3), 'encoder.down.3.downsample.conv.weight': (256, 256, 3, 3),
        'encoder.mid.block_1.conv1.weight': (512, 512, 3, 3), 'encoder.mid.attn_1.k.weight': (512, 512, 1, 1),
        'encoder.mid.block_2.norm2.bias': (512,), 'encoder.norm_out.weight': (512,),
        'encoder.conv_out.weight': (256, 512, 3, 3), 'encoder.conv_out.bias': (256,),
        'quant_conv.weight': (256, 256, 1, 1), 'quant_conv.bias': (256,), 'quantize.embedding.weight': (1024, 256),
    }
    for k, shape in table.items():
        assert sd.get(k) == shape, k
    for i, has_nin in enumerate([False, False, True, False, True]):  # the width changes at levels 2 and 4
        assert (f'encoder.down.{i}.block.0.nin_shortcut.weight' in sd) == has_nin
        assert f'encoder.down.{i}.block.1.nin_shortcut.weight' not in sd
        assert (f'encoder.down.{i}.attn.0.q.weight' in sd) == (i == 4)
    assert not any(k.startswith('encoder.down.4.downsample') for k in sd)
    # key count from the layout: resblock 8 tensors (+2 nin), attn 10, conv 2, norm 2
    n, cin, res = 2, 128, 256
    for i, w in enumerate([128, 128, 256, 256, 512]):
        for _ in range(2):
            n += 8 + (2 if cin != w else 0) + (10 if res == 16 else 0)
            cin = w
        if i < 4:
            n, res = n + 2, res // 2
    n += 8 + 10 + 8 + 2 + 2 + 2 + 1  # mid.block_1, attn_1, block_2, norm_out, conv_out, quant_conv, codebook
    assert len(sd) == n
    assert supmim.vqgan_config(real.state_dict()) == dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                                                     attn_levels=(4,), z_channels=256, embed_dim=256, n_embed=1024)
    ids = real.tokenize(torch.rand(1, 3, 256, 256) * 2 - 1)  # the only full-size forward (~2 s)
    assert ids.shape == (1, 256) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 1024


def test_quantizer_picks_nearest_code():
    vq = VectorQuantizer(5, 3)
    codes = torch.tensor([[0., 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, -3], [5, 5, 5]])
    vq.embedding.weight.data.copy_(codes)
    z = torch.tensor([[0.1, 0, 0], [0.9, 0.2, 0], [0, 1.6, 0], [0, 0, -1.6], [4, 4, 4], [0.6, 0, 0]])
    brute = torch.stack([((codes - zi) ** 2).sum(1).sqrt().argmin() for zi in z])
    assert brute.tolist() == [0, 1, 2, 3, 4, 1]
    assert torch.equal(vq(z), brute)


def test_downsample_halves_with_right_bottom_pad():
    assert Downsample(4)(torch.randn(2, 4, 32, 32)).shape == (2, 4, 16, 16)
    ds = Downsample(1)  # a kernel with only its top-left tap must read x[2i, 2j] (a symmetric pad would shift it)
    ds.conv.weight.data.zero_()
    ds.conv.weight.data[0, 0, 0, 0] = 1
    ds.conv.bias.data.zero_()
    x = torch.arange(64.).view(1, 1, 8, 8)
    assert torch.equal(ds(x).detach(), x[:, :, ::2, ::2])


def test_attention_matches_explicit_softmax():
    torch.manual_seed(3)
    a = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 5)
    h = a.norm(x)
    q, k, v = (m(h).flatten(2) for m in (a.q, a.k, a.v))  # [B, C, N]
    w = torch.softmax(q.transpose(1, 2) @ k * 32 ** -0.5, dim=2)  # [B, Nq, Nk], softmax over keys
    o = (v @ w.transpose(1, 2)).view(2, 32, 4, 5)
    torch.testing.assert_close(a(x), x + a.proj_out(o), atol=1e-5, rtol=1e-5)


def test_tiny_token_grid_is_row_major_nearest_code():
    torch.manual_seed(0)
    m = VQGANTokenizer(**TINY_VQ).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = m.tokenize(x)
    assert ids.shape == (2, 256)
    z = m.quant_conv(m.encoder(x)).detach()  # [2, 8, 16, 16]
    # [B, D, 1, h, w] - [1, D, K, 1, 1] -> squared distance to each code [B, K, h, w]
    d = ((z.unsqueeze(2) - m.quantize.embedding.weight.detach().t().reshape(1, 8, 16, 1, 1)) ** 2).sum(1)
    assert torch.equal(ids, d.argmin(1).reshape(2, 256))


def test_load_lightning_and_plain_state_dict(tiny_ckpt, tmp_path):
    src = VQGANTokenizer(**TINY_VQ)
    src.load_state_dict(torch.load(tiny_ckpt, weights_only=True)['state_dict'], strict=False)
    m = load_vqgan(tiny_ckpt)  # config read off the shapes, decoder and loss keys ignored
    assert supmim.vqgan_config(m.state_dict()) == TINY_VQ
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(m.tokenize(x), src.tokenize(x))
    torch.save(src.state_dict(), tmp_path / 'enc.pt')
    assert torch.equal(load_vqgan(str(tmp_path / 'enc.pt')).tokenize(x), src.tokenize(x))


def test_checkpoint_with_pickled_args_loads_under_weights_only(tmp_path):
    torch.manual_seed(2)
    src = VQGANTokenizer(**TINY_VQ)
    p = tmp_path / 'last.ckpt'  # a Namespace: on common.PICKLED's allowlist (Lightning's classes: tests/test_interop.py)
    torch.save({'state_dict': src.state_dict(), 'hparams': argparse.Namespace(lr=1e-4)}, p)
    m = load_vqgan(str(p))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(m.tokenize(x), src.tokenize(x))


def test_bad_vqgan_files_raise_one_line_usage_errors(tmp_path):
    sd = VQGANTokenizer(**TINY_VQ).state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith('quantize')}, tmp_path / 'noq.pt')
    torch.save({**sd, 'quant_conv.weight': torch.zeros(8, 4, 1, 1)}, tmp_path / 'shape.pt')
    (tmp_path / 'junk.ckpt').write_bytes(b'not a checkpoint')
    for name, words in [('noq.pt', 'quantize.embedding.weight'), ('shape.pt', 'quant_conv.weight'),
                        ('junk.ckpt', 'cannot read'), ('nope.ckpt', 'not found')]:
        with pytest.raises(common.UsageError) as e:
            load_vqgan(str(tmp_path / name))
        assert name in str(e.value) and words in str(e.value) and '\n' not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Model and losses


@pytest.mark.parametrize('pool_mim', ['gap', 'cls'])
def test_decoder_input_fills_masked_places_with_E(pool_mim):
    torch.manual_seed(0)
    model = supmim.SupMIM(supmim.get_args(PIXELS + ['--pool-mim', pool_mim, '--mask-ratio', '0.5']))
    B, L, D, P = 3, model.num_patches, model.embed_dim, model.num_prefix
    ids_keep, mask, ids_restore = common.random_masking(torch.rand(B, L), 0.5)  # K = 32 of 64
    latent = torch.randn(B, P + ids_keep.shape[1], D)
    x = model.decoder_input(latent, ids_restore)
    assert x.shape == (B, L, D) and P == (pool_mim == 'cls')
    for b in range(B):
        fill = latent[b, 0] if pool_mim == 'cls' else latent[b, P:].mean(0)  # [CLS] output, or [E] = GAP
        torch.testing.assert_close(x[b, mask[b].bool()], fill.expand(int(mask[b].sum()), D))
        torch.testing.assert_close(x[b, ids_keep[b]], latent[b, P:])  # visible tokens in their places


def test_sigmoid_cross_entropy_is_eq1_summed_over_classes():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 3.0, -2.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.3, 0.7]])  # a one-hot row and a mixed row
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    per_image = [sum(-yc * math.log(s(lc)) - (1 - yc) * math.log(1 - s(lc)) for lc, yc in zip(lr.tolist(), yr.tolist()))
                 for lr, yr in zip(logits, y)]
    assert supmim.sigmoid_cross_entropy(logits, y).item() == pytest.approx(sum(per_image) / 2, rel=1e-6)


def test_token_and_pixel_losses_match_formulas():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], [[-1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]])  # [B=2, L=2, V=3]
    ids = torch.tensor([[1, 0], [2, 1]])
    nll = [-math.log(math.exp(r[t]) / sum(math.exp(v) for v in r)) for row, tr in zip(logits.tolist(), ids.tolist())
           for r, t in zip(row, tr)]
    assert supmim.token_cross_entropy(logits, ids).item() == pytest.approx(sum(nll) / 4, rel=1e-6)
    target = torch.tensor([[[1.0, 2.0, 4.0, 5.0]]])  # one patch: mean 3, unbiased var 10/3
    pred = torch.tensor([[[0.0, 1.0, 0.0, -1.0]]])
    norm = [(t - 3) / math.sqrt(10 / 3 + 1e-6) for t in [1, 2, 4, 5]]
    want = sum((p - t) ** 2 for p, t in zip([0, 1, 0, -1], norm)) / 4
    assert supmim.pixel_loss(pred, target).item() == pytest.approx(want, rel=1e-6)


def test_lambda_zero_drops_the_mim_gradient(tiny_ckpt):
    args0 = supmim.get_args(ARGS + ['--tokenizer', tiny_ckpt, '--mim-weight', '0', '--mixup', '0'])
    args1 = supmim.get_args(ARGS + ['--tokenizer', tiny_ckpt, '--mixup', '0'])
    torch.manual_seed(0)
    base = supmim.SupMIM(args0)
    torch.manual_seed(0)
    model = supmim.SupMIM(args1)  # the same encoder weights
    encoder = common.VisionTransformer(**base.encoder_kwargs).state_dict()
    assert set(base.state_dict()) == set(encoder)  # no decoder, no tokenizer at lambda 0
    batch = make_batch(args0)
    enc = [n for n, _ in base.named_parameters() if n.startswith(('patch_embed.', 'pos_embed', 'blocks.'))]
    grad = lambda loss, m: torch.autograd.grad(loss, [dict(m.named_parameters())[n] for n in enc], retain_graph=True)  # noqa: E731
    g0 = grad(base(batch)[0], base)
    target = F.one_hot(batch['label'], 10).float()  # Eq. (1) alone, by hand
    for a, b in zip(g0, grad(supmim.sigmoid_cross_entropy(base.classify(batch['img']), target), base)):
        torch.testing.assert_close(a, b)
    loss, logs = model(batch)
    g1, g_ce, g_mim = grad(loss, model), grad(logs['loss_ce'], model), grad(logs['loss_mim'], model)
    for a, b, c, d in zip(g1, g_ce, g_mim, g0):
        torch.testing.assert_close(a, b + c)  # Eq. (3), lambda 1
        torch.testing.assert_close(b, d)  # the classification branch is the baseline's
    assert sum(c.norm() for c in g_mim) > 1e-3  # which lambda 0 leaves out


def test_mixup_reaches_only_the_classifier(monkeypatch):
    args = supmim.get_args(PIXELS + ['--mixup', '0.5'])
    torch.manual_seed(0)
    model = supmim.SupMIM(args)
    batch = make_batch(args)
    batch['label'] = torch.arange(4)  # distinct labels: lambda can be read off the targets
    seen = {'enc': [], 'targets': [], 'pixels': []}
    encode = model.encode
    monkeypatch.setattr(model, 'encode', lambda x, ids_keep=None: seen['enc'].append(x) or encode(x, ids_keep))
    ce, pix = supmim.sigmoid_cross_entropy, supmim.pixel_loss
    monkeypatch.setattr(supmim, 'sigmoid_cross_entropy', lambda lg, t: seen['targets'].append(t) or ce(lg, t))
    monkeypatch.setattr(supmim, 'pixel_loss', lambda p, t: seen['pixels'].append(t) or pix(p, t))
    torch.manual_seed(3)
    model(batch)
    t, img = seen['targets'][0], batch['img']
    lam = t[0, 0].item()
    assert 0.01 < lam < 0.99 and torch.allclose(t.sum(1), torch.ones(4))
    torch.testing.assert_close(seen['enc'][0], lam * img + (1 - lam) * img.flip(0))  # classification: mixed
    assert torch.equal(seen['enc'][1], img)  # MIM: the un-mixed image, and its own pixels as the target
    assert torch.equal(seen['pixels'][0], common.patchify(img, 4))


def test_token_grid_mismatch_names_both_grids(tiny_ckpt):
    with pytest.raises(common.UsageError) as e:
        supmim.SupMIM(supmim.get_args(ARGS + ['--tokenizer', tiny_ckpt, '--tokenizer-size', '32']))
    assert '16x16' in str(e.value) and '8x8' in str(e.value) and '--tokenizer-size 16' in str(e.value)


def test_train_transform_is_uint8_and_deterministic():
    args = supmim.get_args(PIXELS)
    ds = common.SyntheticImages(supmim.train_transform(args), 16)
    imgs = [ds[(i, 0)]['img'] for i in range(16)]
    assert all(x.dtype == torch.uint8 and x.shape == (3, 32, 32) for x in imgs)
    assert torch.equal(imgs[3], ds[(3, 0)]['img']) and not torch.equal(imgs[3], ds[(3, 1)]['img'])


def test_tokenize_is_float32_under_bf16_autocast(tiny_ckpt):
    """Ids under bf16 autocast equal the float32 ids, in chunks too. The codebook holds pairs of codes
    a hair apart around the images' own latents, so that bf16 arithmetic (the VQGAN's layers called
    under autocast without the guard) flips many ids: the check can fail."""
    torch.manual_seed(0)
    model = supmim.SupMIM(supmim.get_args(ARGS + ['--tokenizer', tiny_ckpt]))
    img = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = F.interpolate(common.renormalize(img, (0.5,) * 3, (0.5,) * 3), size=16, mode='bicubic').clamp(-1, 1)
    vq = model.tokenizer
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).flatten(0, 2)  # [6 * 64, 8] latents
        centres, delta = z[:8], 1e-3 * z[:8].norm(dim=1, keepdim=True) * F.normalize(torch.randn(8, 8), dim=1)
        vq.quantize.embedding.weight.copy_(torch.cat([centres + delta, centres - delta]))  # 16 codes in 8 pairs
    ref = model.tokenize(img, chunk=4)  # 6 images in chunks of 4 and 2
    assert ref.shape == (6, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ids = model.tokenize(img)
        z = vq.quant_conv(vq.encoder(x))  # the VQGAN's layers without tokenize's float32 guard
        unguarded = vq.quantize(z.permute(0, 2, 3, 1).flatten(0, 2)).reshape(6, 64)
    assert torch.equal(ids, ref)
    assert (unguarded != ref).sum() >= 5  # bf16 convolutions move latents across the pairs (10 of 384 here)


def test_gap_and_E_come_after_the_final_norm():
    torch.manual_seed(0)
    model = supmim.SupMIM(supmim.get_args(PIXELS))
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.fc_norm, nn.Identity) and model.num_prefix == 0
    img = torch.randn(2, 3, 32, 32)
    ids_keep, _, ids_restore = common.random_masking(torch.rand(2, 64), 0.2)
    before = []  # the final norm's input
    hook = model.norm.register_forward_hook(lambda m, args, out: before.append(args[0]))
    latent = model.encode(img, ids_keep)  # [2, 51, D]
    hook.remove()
    normed = F.layer_norm(before[0], (latent.shape[-1],), eps=1e-6)  # weight 1, bias 0 at init
    torch.testing.assert_close(latent, normed)
    E = latent.mean(1)  # Sec. 3.3: GAP of the unmasked encoded patches
    x = model.decoder_input(latent, ids_restore)
    masked = ~torch.isin(torch.arange(64), ids_keep[0])
    torch.testing.assert_close(x[0, masked], E[0].expand(int(masked.sum()), -1))
    with torch.no_grad():
        model.head.weight.normal_()
    torch.testing.assert_close(model.classify(img), model.head(model.forward_features(img).mean(1)))  # same GAP


def test_no_weight_decay_names_are_the_non_kernel_embeddings():
    """big_vision decays only '/kernel' (Dense, Conv): the position embeddings and [CLS] are left out."""
    model = supmim.SupMIM(supmim.get_args(PIXELS + ['--pool-cls', 'cls']))
    names = dict(model.named_parameters())
    assert all(n in names and names[n].ndim == 3 for n in supmim.SupMIM.no_weight_decay)


def test_head_starts_at_big_vision_bias_and_zero_weights():
    model = supmim.SupMIM(supmim.get_args(PIXELS))
    assert torch.equal(model.head.weight, torch.zeros_like(model.head.weight))
    assert torch.equal(model.head.bias, torch.full_like(model.head.bias, -6.9))
    assert torch.sigmoid(model.classify(torch.randn(2, 3, 32, 32))).mean().item() == pytest.approx(1 / 1000, rel=0.01)


def test_dropout_sites_leave_the_state_dict_alone():
    torch.manual_seed(0)
    plain = supmim.SupMIM(supmim.get_args(PIXELS))
    torch.manual_seed(0)
    model = supmim.SupMIM(supmim.get_args(PIXELS + ['--dropout', '0.1']))
    assert model.state_dict().keys() == plain.state_dict().keys()
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 + 3 * len(model.blocks) and all(d.p == 0.1 for d in drops)  # embedding; attn, MLP mid, MLP out
    assert not any(isinstance(m, nn.Dropout) for m in model.decoder_blocks.modules())
    img = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model.classify(img), plain.eval().classify(img))  # eval: no dropout
    model.train()
    assert not torch.allclose(model.forward_features(img), plain.forward_features(img))


def test_defaults_are_tab1_and_augreg():
    a = supmim.get_args(['--data', 'synthetic', '--target', 'pixels'])
    assert a.batch_size * a.accum_iter * 8 == 4096 and (a.batch_size, a.accum_iter) == (256, 2)  # Tab. 1, fits 80 GB
    assert a.blr * 4096 / 256 == pytest.approx(1e-3) and tuple(a.betas) == (0.9, 0.96)  # Tab. 1
    assert (a.weight_decay, a.warmup_steps, a.epochs, a.mask_ratio, a.mim_weight) == (0.03, 10000, 300, 0.2, 1.0)
    assert (a.model, a.patch_size, a.img_size, a.min_lr) == ('vit_base', 14, 224, 0.0)  # ViT-B/14 at 224, cosine to 0
    assert (a.clip_grad, a.drop_path, a.dropout, a.head_bias) == (1.0, 0.1, 0.1, -6.9)  # AugReg B/16 i1k, big_vision
    assert tuple(a.crop_scale) == (0.05, 1.0) and tuple(a.randaug) == (2, 15) and a.mixup == 0.5  # 'medium2'
    assert supmim.get_args(['--data', 'synthetic', '--target', 'pixels', '--model', 'vit_large']).weight_decay == 0.1


# ----------------------------------------------------------------------------------------------
# big_vision's RandAugment (pp/archive/autoaugment.py)

# level_to_arg at m = 5, 10, 15, worked out by hand from big_vision's formulas (x = m / 10):
# rotate 30x, shear 0.3x, translate 100x (translate_const), posterize int(4x), solarize int(256x),
# solarize-add int(110x), cutout int(40x) (cutout_const), enhance 1.8x + 0.1
BV_ARGS = {
    'Rotate': (15.0, 30.0, 45.0), 'ShearX': (0.15, 0.3, 0.45), 'ShearY': (0.15, 0.3, 0.45),
    'TranslateX': (50.0, 100.0, 150.0), 'TranslateY': (50.0, 100.0, 150.0),
    'Posterize': (2, 4, 6), 'Solarize': (128, 256, 384), 'SolarizeAdd': (55, 110, 165), 'Cutout': (20, 40, 60),
    'Color': (1.0, 1.9, 2.8), 'Contrast': (1.0, 1.9, 2.8), 'Brightness': (1.0, 1.9, 2.8), 'Sharpness': (1.0, 1.9, 2.8),
    'AutoContrast': (None,) * 3, 'Equalize': (None,) * 3, 'Invert': (None,) * 3,
}


def photo(seed, size=64):
    """A photo-like crop: a smooth random colour field (bicubic 4x4 grid) with fine noise."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    return Image.fromarray((np.asarray(base, np.float32) + rng.normal(0, 8, (size, size, 3))).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize('i,m', [(0, 5), (1, 10), (2, 15)])
def test_level_to_arg_is_big_vision_at_several_magnitudes(i, m):
    assert set(supmim.BV_OPS) == set(BV_ARGS) and len(BV_ARGS) == 16
    for name, values in BV_ARGS.items():
        got = supmim.level_to_arg(name, m)
        assert (got is None) if values[i] is None else got == pytest.approx(values[i], abs=1e-12), name
        if isinstance(values[i], int):
            assert isinstance(got, int), name


def test_op_effects_at_magnitude_15():
    img, a = photo(0, 96), np.asarray(photo(0, 96)).astype(int)
    rng = np.random.default_rng(0)
    op = lambda name: np.asarray(supmim.BV_OPS[name](img, supmim.level_to_arg(name, 15), rng)).astype(int)  # noqa: E731
    assert np.array_equal(op('Posterize'), a & 0b11111100)  # 6 bits kept (timm at m=15: all black)
    assert np.array_equal(op('Solarize'), a)  # threshold 384: nothing to invert
    assert np.array_equal(op('SolarizeAdd'), np.where(a < 128, np.minimum(a + 165, 255), a))
    assert np.array_equal(op('Invert'), 255 - a)
    const = Image.new('RGB', (8, 8), (50, 60, 70))
    assert np.asarray(supmim.BV_OPS['Brightness'](const, 2.8, rng)).tolist() == np.full((8, 8, 3), (140, 168, 196)).tolist()
    t = op('TranslateX')  # 150 px: output column x shows input column x + 150, the rest is the fill
    assert np.array_equal(t, np.full_like(a, 128))  # 96 px wide: everything shifted out
    img2, a2 = photo(1, 224), np.asarray(photo(1, 224)).astype(int)
    t = np.asarray(supmim.BV_OPS['TranslateX'](img2, 150.0, rng)).astype(int)
    assert np.array_equal(t[:, :74], a2[:, 150:]) and (t[:, 74:] == 128).all()
    t = np.asarray(supmim.BV_OPS['TranslateY'](img2, -150.0, rng)).astype(int)
    assert np.array_equal(t[150:], a2[:74]) and (t[:150] == 128).all()
    r = np.asarray(supmim.BV_OPS['Rotate'](img2, 45.0, rng)).astype(int)
    assert (r[0, 0] == 128).all() and (r[-1, -1] == 128).all() and np.array_equal(r[112, 112], a2[112, 112])
    for seed in range(20):  # Cutout: one square of 128, side 2 x 60 unless clipped by a border
        c = np.asarray(supmim.BV_OPS['Cutout'](img2, 60, np.random.default_rng(seed))).astype(int)
        changed = (c != a2).any(-1)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        cy, cx = np.random.default_rng(seed).integers(224, size=2)
        assert rows.min() >= max(0, cy - 60) and rows.max() < min(224, cy + 60) and cols.max() < min(224, cx + 60)
        box = c[max(0, cy - 60):cy + 60, max(0, cx - 60):cx + 60]
        assert (box == 128).all() and changed.sum() <= 120 * 120


def test_randaugment_at_m15_rarely_blackens_or_skips():
    """Each chosen op is applied: an image comes out unchanged only when both layers draw an identity
    (Solarize at m=15, AutoContrast on a full-range crop), ~1.5%; timm's (ops applied w.p. 0.5) leaves
    ~25% unchanged and its posterize at m=15 turns ~6% of the crops black."""
    imgs = [photo(i) for i in range(40)]
    stats = {}
    for name, fn in (('bv', lambda rng, im: supmim.randaugment(rng, im, 2, 15)),
                     ('timm', lambda rng, im: evaluate.rand_augment(rng, im, 2, 15, 0.0))):
        outs = [(np.asarray(fn(np.random.default_rng(i), imgs[i % 40])), np.asarray(imgs[i % 40])) for i in range(800)]
        stats[name] = (np.mean([o.max() == 0 for o, _ in outs]), np.mean([np.array_equal(o, a) for o, a in outs]))
    assert stats['bv'][0] == 0 and stats['bv'][1] < 0.04, stats
    assert stats['timm'][0] > 0.03 and stats['timm'][1] > 0.15, stats
    counts = {}
    rng = np.random.default_rng(0)
    for _ in range(1600):  # ops drawn uniformly from the 16
        name = list(supmim.BV_OPS)[rng.integers(16)]
        counts[name] = counts.get(name, 0) + 1
    assert len(counts) == 16 and min(counts.values()) > 60


# ----------------------------------------------------------------------------------------------
# Command line


def check_run(r, tmp_path, out_features):
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r'^val top-1 \d+\.\d\d%$', r.stdout, re.M)) == 1, r.stdout
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert not any(k.startswith('tokenizer.') for k in ckpt['model'])  # frozen: never saved
    assert ckpt['model']['decoder_pred.weight'].shape == (out_features, 96) and ckpt['model']['head.weight'].shape == (10, 96)
    rows = [json.loads(line) for line in open(tmp_path / 'log.jsonl')][1:]
    assert len(rows) == 4 // int(ckpt['args']['world_size']) and all({'loss_ce', 'loss_mim'} <= set(row) for row in rows)


def test_cli_tokens(tiny_ckpt, tmp_path):
    check_run(run('supmim.py', *ARGS, '--tokenizer', tiny_ckpt, '--output-dir', tmp_path), tmp_path, 16)


def test_cli_pixels(tmp_path):
    check_run(run('supmim.py', *PIXELS, '--output-dir', tmp_path), tmp_path, 4 * 4 * 3)


def test_cli_two_processes(tiny_ckpt, tmp_path):
    r = run('supmim.py', *ARGS, '--tokenizer', tiny_ckpt, '--output-dir', tmp_path, nproc=2)
    check_run(r, tmp_path, 16)


def test_cli_grid_mismatch_is_one_line(tiny_ckpt, tmp_path):
    r = run('supmim.py', *ARGS, '--tokenizer', tiny_ckpt, '--tokenizer-size', '32', '--output-dir', tmp_path)
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert r.returncode == 2 and len(lines) == 1 and '16x16' in lines[0] and '8x8' in lines[0], r.stderr
