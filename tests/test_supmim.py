"""supmim.py: the VQGAN tokenizer against taming's layout, the [E] fill, the losses against the
paper's formulas, the gradient of each branch, and the CLI (tokens, pixels, two processes)."""
import argparse
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
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
    assert supmim.vqgan_config(real.state_dict(), 'x') == dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
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
    assert supmim.vqgan_config(m.state_dict(), 'x') == TINY_VQ
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(m.tokenize(x), src.tokenize(x))
    torch.save(src.state_dict(), tmp_path / 'enc.pt')
    assert torch.equal(load_vqgan(str(tmp_path / 'enc.pt')).tokenize(x), src.tokenize(x))


def test_pickled_lightning_checkpoint_falls_back_with_a_note(tmp_path, capsys):
    torch.manual_seed(2)
    src = VQGANTokenizer(**TINY_VQ)
    p = tmp_path / 'last.ckpt'  # a Namespace is not on the weights_only allowlist
    torch.save({'state_dict': src.state_dict(), 'hparams': argparse.Namespace(lr=1e-4)}, p)
    m = load_vqgan(str(p))
    assert 'weights_only=False' in capsys.readouterr().out
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
    forward_features = model.forward_features
    monkeypatch.setattr(model, 'forward_features', lambda x, **kw: seen['enc'].append(x) or forward_features(x, **kw))
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
    assert 'parameters identical on all 2 ranks' in r.stdout


def test_cli_grid_mismatch_is_one_line(tiny_ckpt, tmp_path):
    r = run('supmim.py', *ARGS, '--tokenizer', tiny_ckpt, '--tokenizer-size', '32', '--output-dir', tmp_path)
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert r.returncode == 2 and len(lines) == 1 and '16x16' in lines[0] and '8x8' in lines[0], r.stderr
