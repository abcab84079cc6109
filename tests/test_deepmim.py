"""deepmim.py: official MAE checkpoint layout, taps, Eq. 1 and 2, norm_pix, frozen parts, and the CLI."""
import json

import pytest
import torch

import common
import deepmim
from utils import TINY, official_mae_shapes, run

SMALL = ['--decoder-dim', '32', '--decoder-heads', '2', '--decoder-depth', '1']  # a fast decoder for CLI runs
D, DEPTH, P, L = 96, 4, 4, 64  # vit_pico at 32 px, patch 4: 8 x 8 patches


def args_for(*flags):
    return deepmim.get_args(TINY + ['--taps', '2,3'] + SMALL + list(flags))


def batch_of(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'img': torch.randn(n, 3, 32, 32, generator=g)}


def random_mae_file(path, dec_dim=32, dec_depth=2, seed=0):
    """A random MAE checkpoint in the official layout {'model': state dict}; returns the state dict."""
    g = torch.Generator().manual_seed(seed)
    enc, dec = official_mae_shapes(D, DEPTH, P, L, dec_dim, dec_depth)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in {**enc, **dec}.items()}
    torch.save({'model': sd}, path)
    return sd


def random_clip_file(path, width=64, depth=2, embed=24, seed=0):
    """A random OpenAI-CLIP-format image tower (`visual.` names) seeing 32 px images in 4 px patches."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    sd = {'visual.conv1.weight': r(width, 3, P, P), 'visual.class_embedding': r(width),
          'visual.positional_embedding': r(1 + L, width), 'visual.proj': r(width, embed)}
    for ln in ('ln_pre', 'ln_post'):
        sd[f'visual.{ln}.weight'], sd[f'visual.{ln}.bias'] = 1 + r(width), r(width)
    for i in range(depth):
        b = f'visual.transformer.resblocks.{i}'
        sd.update({f'{b}.ln_1.weight': 1 + r(width), f'{b}.ln_1.bias': r(width),
                   f'{b}.attn.in_proj_weight': r(3 * width, width), f'{b}.attn.in_proj_bias': r(3 * width),
                   f'{b}.attn.out_proj.weight': r(width, width), f'{b}.attn.out_proj.bias': r(width),
                   f'{b}.ln_2.weight': 1 + r(width), f'{b}.ln_2.bias': r(width),
                   f'{b}.mlp.c_fc.weight': r(4 * width, width), f'{b}.mlp.c_fc.bias': r(4 * width),
                   f'{b}.mlp.c_proj.weight': r(width, 4 * width), f'{b}.mlp.c_proj.bias': r(width)})
    torch.save(sd, path)


# ----------------------------------------------------------------------------------------------
# Official MAE layout


def test_official_mae_state_dict_loads_strictly_and_exports_timm_encoder():
    model = deepmim.DeepMIM(deepmim.get_args(TINY + ['--taps', '', '--decoder-depth', '8', '--decoder-dim', '32',
                                                     '--decoder-heads', '2']))
    enc, dec = official_mae_shapes(D, DEPTH, P, L, 32, 8)
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) for k, s in {**enc, **dec}.items()}
    model.load_state_dict(sd, strict=True)  # exactly the official keys and shapes
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert set(common.model_state(model)) == set(sd)  # what a checkpoint saves
    vit = common.VisionTransformer(**model.encoder_kwargs)
    assert set(vit.state_dict()) == set(enc)  # the encoder part is timm's names, no more
    vit.load_state_dict({k: v for k, v in model.state_dict().items() if k in enc}, strict=True)
    # MAE's fixed tables: 2D sin-cos with a zero cls slot, not trained
    fresh = deepmim.DeepMIM(deepmim.get_args(TINY + ['--taps', '']))
    assert not fresh.decoder_pos_embed.requires_grad and not fresh.pos_embed.requires_grad
    torch.testing.assert_close(fresh.decoder_pos_embed[0], common.sincos_pos_embed(512, 8, 8, cls_token=True))
    assert fresh.decoder_pred.out_features == P * P * 3 and len(fresh.decoder_blocks) == 4
    assert fresh.decoder_blocks[0].attn.num_heads == 16 and fresh.mask_token.std() < 0.05


def test_deep_supervision_decoders_are_named_apart_from_mae():
    model = deepmim.DeepMIM(args_for())
    keys = set(model.state_dict())
    for t in ('2', '3'):
        assert {f'aux_decoders.{t}.{k}' for k in ('embed.weight', 'mask_token', 'norm.weight', 'pred.weight',
                                                   'blocks.0.attn.qkv.weight')} <= keys
    enc, dec = official_mae_shapes(D, DEPTH, P, L, 32, 1)
    assert keys - {k for k in keys if k.startswith('aux_decoders.')} == set(enc) | set(dec)


# ----------------------------------------------------------------------------------------------
# Encoder taps, Eq. 2


def test_taps_are_the_visible_tokens_block_outputs_before_the_final_norm():
    torch.manual_seed(0)
    model = deepmim.DeepMIM(args_for()).eval()
    img = batch_of()['img']
    ids_keep, _, _ = common.random_masking(torch.rand(4, L), 0.75)
    got = model.forward_encoder(img, ids_keep)
    x = model.patch_embed(img) + model.pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # [B, K, D]
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(4, -1, -1), x], 1)
    want = []
    for i, blk in enumerate(model.blocks, 1):
        x = blk(x)
        if i in (2, 3):
            want.append(x)
    want.append(model.norm(x))
    assert len(got) == 3 and got[0].shape == (4, 1 + 16, D)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_eq2_sum_of_independent_decoders_each_with_its_own_loss():
    torch.manual_seed(0)
    model = deepmim.DeepMIM(args_for())
    batch = batch_of()
    torch.manual_seed(5)
    loss, logs = model(batch)
    assert set(logs) == {'loss_b2', 'loss_b3', 'loss_b4'}
    torch.testing.assert_close(loss, sum(logs.values()))
    # the same step by hand: same noise, each decoder's norm_pix MSE on masked patches vs the image
    torch.manual_seed(5)
    ids_keep, mask, ids_restore = common.random_masking(torch.rand(4, L), 0.75)
    preds = model.predict(batch['img'], ids_keep, ids_restore)
    x = common.patchify(batch['img'], P)
    for name, pred in zip(('loss_b2', 'loss_b3', 'loss_b4'), preds):
        t = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()
        torch.testing.assert_close(logs[name], (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum())
    # every trainable parameter gets a gradient from the sum (no unused parameters under DDP)
    loss.backward()
    for n, p in model.named_parameters():
        assert not p.requires_grad or (p.grad is not None and p.grad.abs().sum() > 0), n
    # one decoder's loss reaches its own decoder only
    model.zero_grad()
    model(batch)[1]['loss_b2'].backward()
    for t, dec in model.aux_decoders.items():
        assert all((p.grad is not None) == (t == '2') for p in dec.parameters())
    assert model.decoder_pred.weight.grad is None and model.norm.weight.grad is None
    assert model.blocks[1].mlp.fc2.weight.grad is not None and model.blocks[2].mlp.fc2.weight.grad is None
    # decoders share no parameter storage
    groups = [{p.data_ptr() for p in parts[1].parameters()} | {parts[2].data_ptr()}
              for parts in model.decoders()]
    assert sum(len(g) for g in groups) == len(set().union(*groups))


# ----------------------------------------------------------------------------------------------
# Losses


def test_norm_pix_target_and_masked_only_mse():
    g = torch.Generator().manual_seed(0)
    B, n, p3 = 2, 6, 12
    target, pred = torch.randn(B, n, p3, generator=g) * 3 + 1, torch.randn(B, n, p3, generator=g)
    mean = target.sum(-1, keepdim=True) / p3
    var = ((target - mean) ** 2).sum(-1, keepdim=True) / (p3 - 1)  # unbiased
    want_t = (target - mean) / torch.sqrt(var + 1e-6)
    torch.testing.assert_close(deepmim.norm_pix(target), want_t)
    mask = torch.tensor([[1., 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]])
    per_patch = ((pred - want_t) ** 2).sum(-1) / p3
    want = sum(per_patch[b, i] for b in range(B) for i in range(n) if mask[b, i]) / 6
    torch.testing.assert_close(deepmim.forward_loss(pred, target, mask), want)
    pred2 = torch.where(mask.bool()[..., None], pred, torch.randn_like(pred))  # change only visible patches
    torch.testing.assert_close(deepmim.forward_loss(pred2, target, mask), want)
    raw = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(deepmim.forward_loss(pred, target, mask, False), (raw * mask).sum() / 6)


def test_cosine_loss_on_masked_patches():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1., 1, 0, 0, 0], [0, 0, 0, 1, 0]])
    cos = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1))
    want = (2 - 2 * cos)[mask.bool()].mean()
    torch.testing.assert_close(deepmim.cosine_loss(pred, target, mask), want)
    torch.testing.assert_close(deepmim.cosine_loss(pred * (1 + 4 * (1 - mask))[..., None], target, mask), want)


# ----------------------------------------------------------------------------------------------
# Hybrid targets (Eq. 1) and the frozen generator


def test_hybrid_blend_formula():
    x, x_hat = torch.tensor([[3.0, -6.0]]), torch.tensor([[0.0, 3.0]])
    t = deepmim.hybrid_targets(x, x_hat, (0.0, 1 / 3, 2 / 3, 1.0))
    for got, want in zip(t, ([[0.0, 3.0]], [[1.0, 0.0]], [[2.0, -3.0]], [[3.0, -6.0]])):
        torch.testing.assert_close(got, torch.tensor(want))
    assert deepmim.hybrid_alphas(args_for()) == (0.0, 0.5, 1.0)  # evenly spaced: 0, 1/3, 2/3, 1 for 3 taps
    assert deepmim.hybrid_alphas(deepmim.get_args(TINY + ['--taps', '1,2,3'])) == pytest.approx((0, 1 / 3, 2 / 3, 1))
    assert deepmim.get_args(TINY + ['--alphas', '0,1/3,1']).alphas == pytest.approx((0, 1 / 3, 1))


def test_hybrid_generator_is_frozen_uses_the_same_mask_and_sets_the_targets(tmp_path):
    sd = random_mae_file(tmp_path / 'mae_visualize.pth')
    torch.manual_seed(0)
    model = deepmim.DeepMIM(args_for('--hybrid-mae', str(tmp_path / 'mae_visualize.pth'), '--hybrid-model', 'vit_pico'))
    gen = model.hybrid_mae
    assert set(gen.state_dict()) == set(sd) and all(torch.equal(v, sd[k]) for k, v in gen.state_dict().items())
    assert not any(k.startswith('hybrid_mae.') for k in common.model_state(model))  # not saved
    seen = {}

    def spy(name, f):
        def wrapped(img, ids_keep, *rest):
            seen[name] = ids_keep
            return f(img, ids_keep, *rest)
        return wrapped
    model.forward_encoder = spy('student', model.forward_encoder)
    gen.predict = spy('generator', gen.predict)
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert not gen.training
    batch = batch_of()
    torch.manual_seed(3)
    loss, logs = model(batch)
    loss.backward()
    opt.step()
    assert torch.equal(seen['student'], seen['generator'])
    assert all(p.grad is None and not p.requires_grad for p in gen.parameters())
    assert all(torch.equal(v, before[k]) for k, v in gen.state_dict().items())
    # alphas 0, 1/2, 1: block 2 regresses the reconstruction, block 4 the image (norm_pix after the blend)
    del model.forward_encoder, gen.predict
    opt.zero_grad()
    torch.manual_seed(3)
    loss, logs = model(batch)
    torch.manual_seed(3)
    ids_keep, mask, ids_restore = common.random_masking(torch.rand(4, L), 0.75)
    preds = model.predict(batch['img'], ids_keep, ids_restore)
    x, x_hat = common.patchify(batch['img'], P), gen.predict(batch['img'], ids_keep, ids_restore)[0]
    for name, pred, t in zip(('loss_b2', 'loss_b3', 'loss_b4'), preds, (x_hat, (x + x_hat) / 2, x)):
        torch.testing.assert_close(logs[name], deepmim.forward_loss(pred, t, mask))
    assert not torch.allclose(logs['loss_b2'], deepmim.forward_loss(preds[0], x, mask))


# ----------------------------------------------------------------------------------------------
# Reconstruction for figures


def test_reconstruct_returns_mask_and_pixels():
    model = deepmim.DeepMIM(args_for('--no-norm-pix-loss'))
    img = batch_of()['img']
    mask, rec = deepmim.reconstruct(model, img, mask_seed=7)
    mask2, rec2 = deepmim.reconstruct(model, img, mask_seed=7)
    assert torch.equal(mask, mask2) and torch.equal(rec, rec2) and model.training
    assert mask.shape == (4, L) and rec.shape == img.shape and (mask.sum(1) == 48).all()
    model.norm_pix = True  # predictions mapped back with each patch's own mean and std
    x = common.patchify(img, P)
    got = common.patchify(deepmim.reconstruct(model, img, mask_seed=7)[1], P)
    torch.testing.assert_close(got, common.patchify(rec, P) * (x.var(-1, keepdim=True) + 1e-6).sqrt()
                               + x.mean(-1, keepdim=True))


# ----------------------------------------------------------------------------------------------
# Command line


def log_rows(out):
    return [json.loads(line) for line in open(out / 'log.jsonl')][1:]


def test_cli_plain_mae_saves_the_official_layout(tmp_path):
    r = run('deepmim.py', *TINY, '--taps', '', '--decoder-depth', '8', '--decoder-dim', '32', '--decoder-heads', '2',
            '--output-dir', tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    enc, dec = official_mae_shapes(D, DEPTH, P, L, 32, 8)
    assert {k: tuple(v.shape) for k, v in ckpt['model'].items()} == {**enc, **dec}
    rows = log_rows(tmp_path)
    assert [r['step'] for r in rows] == [1, 2, 3, 4] and all(r['loss'] == r['loss_b4'] for r in rows)


def test_cli_deepmim(tmp_path):
    r = run('deepmim.py', *TINY, '--taps', '2,3', *SMALL, '--output-dir', tmp_path)
    assert r.returncode == 0, r.stderr
    for row in log_rows(tmp_path):
        assert row['loss'] == pytest.approx(row['loss_b2'] + row['loss_b3'] + row['loss_b4'], abs=1e-4)
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert tuple(ckpt['args']['taps']) == (2, 3) and 'aux_decoders.3.pred.weight' in ckpt['model']


def test_cli_hybrid_targets(tmp_path):
    random_mae_file(tmp_path / 'mae.pth')
    r = run('deepmim.py', *TINY, '--taps', '2,3', *SMALL, '--hybrid-mae', tmp_path / 'mae.pth',
            '--hybrid-model', 'vit_pico', '--output-dir', tmp_path / 'out')
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'out' / 'checkpoint.pth', weights_only=True)
    assert not any(k.startswith('hybrid_mae') for k in ckpt['model'])
    assert {'loss_b2', 'loss_b3', 'loss_b4'} <= set(log_rows(tmp_path / 'out')[0])


def test_cli_clip_target(tmp_path):
    random_clip_file(tmp_path / 'clip.pt')
    r = run('deepmim.py', *TINY, '--taps', '2,3', *SMALL, '--target', 'clip', '--teacher', tmp_path / 'clip.pt',
            '--output-dir', tmp_path / 'out')
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'out' / 'checkpoint.pth', weights_only=True)
    assert not any(k.startswith('teacher') for k in ckpt['model'])
    assert ckpt['model']['decoder_pred.weight'].shape == (24, 32)  # predicts the 24-d CLIP embedding
    assert all(0 <= row['loss_b4'] <= 4 for row in log_rows(tmp_path / 'out'))


def test_cli_ddp_two_processes(tmp_path):
    r = run('deepmim.py', *TINY, '--taps', '2,3', *SMALL, '--output-dir', tmp_path, nproc=2)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('flags, words', [
    (['--taps', '4'], '--taps'),
    (['--taps', '2,3', '--alphas', '0,1'], '--hybrid-mae'),
    (['--taps', '2,3', '--target', 'clip'], '--teacher'),
])
def test_bad_input_gives_one_line(tmp_path, flags, words):
    r = run('deepmim.py', *TINY, *SMALL, '--output-dir', tmp_path, *flags)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and words in lines[0] and 'Traceback' not in r.stderr
