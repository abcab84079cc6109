"""simmim.py: the mask units, the loss against the paper's pixel-space formula, the model's layout, and the CLI."""
import json
import math

import numpy as np
import pytest
import torch

import common
import simmim
from utils import TINY, run

ARGS = TINY + ['--mask-patch-size', '8']


def test_loss_equals_pixel_space_formula():
    torch.manual_seed(0)
    B, p, H = 2, 4, 16
    img, rec = torch.randn(B, 3, H, H), torch.randn(B, 3, H, H)
    mask = (torch.rand(B, (H // p) ** 2) < 0.5).float()
    m = mask.reshape(B, H // p, H // p).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)  # [B, 1, H, W]
    want = ((rec - img).abs() * m).sum() / (m.sum() + 1e-5) / 3  # Sec. 3.4, Eq. (1) / released code
    got = simmim.forward_loss(common.patchify(rec, p), common.patchify(img, p), mask)
    torch.testing.assert_close(got, want)
    rec2 = torch.where(m.bool(), rec, torch.randn_like(rec))  # change only the visible pixels
    torch.testing.assert_close(simmim.forward_loss(common.patchify(rec2, p), common.patchify(img, p), mask), want)


def test_simmim_mask_units_cover_whole_patches():
    rng = np.random.default_rng(0)
    for size, mps, p, r in [(224, 32, 16, 0.6), (192, 32, 4, 0.6), (32, 8, 4, 0.5)]:
        m = simmim.simmim_mask(rng, size, mps, p, r)
        g, s, units = size // p, mps // p, (size // mps) ** 2
        assert m.shape == (g, g)
        blocks = m.reshape(g // s, s, g // s, s)
        assert (blocks.min((1, 3)) == blocks.max((1, 3))).all()  # each unit all masked or all visible
        assert blocks[:, 0, :, 0].sum() == math.ceil(units * r)
    assert simmim.simmim_mask(rng).sum() == 30 * 4  # 224: ceil(49 * 0.6) = 30 units of 2 x 2 patches
    with pytest.raises(common.UsageError):
        simmim.simmim_mask(rng, 224, 24, 16, 0.6)


def test_state_dict_is_timm_encoder_plus_method_parts():
    model = simmim.SimMIM(simmim.get_args(ARGS))
    vit = common.VisionTransformer(**model.encoder_kwargs)
    extra = set(model.state_dict()) - set(vit.state_dict())
    assert extra == {'mask_token', 'head_pred.weight', 'head_pred.bias'}
    assert model.head_pred.out_features == 4 * 4 * 3  # one linear layer to the patch's pixels


def test_masked_patches_enter_as_the_mask_token():
    """Sec. 3.2: a masked patch's pixels never reach the encoder; the mask token stands in its place."""
    torch.manual_seed(0)
    model = simmim.SimMIM(simmim.get_args(ARGS)).eval()
    img, mask = torch.randn(2, 3, 32, 32), (torch.rand(2, 64) < 0.5).float()  # 8 x 8 patches of 4 px
    m = mask.reshape(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).bool()  # [B, 1, H, W]
    with torch.no_grad():
        pred = model.predict(img, mask)
        torch.testing.assert_close(model.predict(torch.where(m, torch.randn_like(img), img), mask), pred)
        model.mask_token.add_(torch.randn_like(model.mask_token))  # (a constant shift would vanish in the LayerNorms)
        assert not torch.allclose(model.predict(img, mask), pred)


def test_overfits_one_batch():
    torch.manual_seed(0)
    args = simmim.get_args(ARGS + ['--drop-path', '0'])  # no stochastic depth when memorizing one batch
    model = simmim.SimMIM(args)
    ds = common.SyntheticImages(simmim.train_transform(args), 8)
    batch = common.to_device(torch.utils.data.default_collate([ds[i] for i in range(8)]), 'cpu')
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)  # BEiT's small init and layer scale 0.1 start slower
    losses = []
    for _ in range(200):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_cli_writes_checkpoint_and_log(tmp_path):
    r = run('simmim.py', *ARGS, '--output-dir', tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert ckpt['step'] == 4 and ckpt['epoch'] == 1 and ckpt['args']['mask_ratio'] == 0.6
    rows = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert 'args' in rows[0] and [r['step'] for r in rows[1:]] == [1, 2, 3, 4]
    assert all({'loss', 'lr', 'ms_step', 'img_s'} <= set(r) for r in rows[1:])


@pytest.mark.parametrize('flags, words', [
    (['--data', '/nonexistent'], '/nonexistent'),
    (['--img-size', '30'], 'divisible'),
    (['--model', 'vit_gigantic'], 'unknown model'),
    (['--mask-patch-size', '6'], '--mask-patch-size'),
])
def test_bad_input_gives_one_line(tmp_path, flags, words):
    r = run('simmim.py', *ARGS, '--output-dir', tmp_path, *flags)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and words in lines[0] and 'Traceback' not in r.stderr
