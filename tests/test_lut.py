"""lut.py: the EMA target, Eq. (1)-(3) against a hand computation, two-view masking and transform,
the official MAE layout, the FLOP count, the cross-process BatchNorm, the recipe (betas, batch, lr
rule), and the CLI (one process and DDP)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import lut
from utils import ROOT, TINY, official_mae_shapes, run

SMALL = ['--decoder-dim', '32', '--decoder-heads', '2', '--decoder-depth', '1', '--head-dim', '64', '--accum-iter', '1']
D, DEPTH, P, S = 96, 4, 4, 32  # vit_pico at 32 px, patch 4
L = (S // P) ** 2  # 64 patches
K = L // 4  # kept per view at the 0.75 mask ratio (int(64 * 0.25))


def make_model(*flags, seed=0):
    torch.manual_seed(seed)
    return lut.LUT(lut.get_args(TINY + SMALL + list(flags)))


def batch_of(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'img': torch.randn(n, 3, S, S, generator=g), 'img2': torch.randn(n, 3, S, S, generator=g)}


def ema_twins(sd):
    """target key -> online key, listed from the state dict alone (encoder under timm names, projector)."""
    twins = {}
    for k in sd:
        if k.startswith('target_encoder.'):
            twins[k] = k[len('target_encoder.'):]
        elif k.startswith('target_projector.'):
            twins[k] = 'head_projector.' + k[len('target_projector.'):]
    return twins


# ----------------------------------------------------------------------------------------------
# The momentum (EMA) target


def test_momentum_schedule_rises_by_a_cosine_from_0996_to_1():
    T, m0 = 1200, 0.996
    assert lut.ema_momentum(0, T, m0) == pytest.approx(0.996, abs=1e-12)  # Sec. 5.1.2
    assert lut.ema_momentum(T // 2, T, m0) == pytest.approx(0.998, abs=1e-12)  # cos(pi/2) = 0: (1 + m0) / 2
    assert lut.ema_momentum(T // 3, T, m0) == pytest.approx(1 - 0.004 * 0.75, abs=1e-12)  # cos(pi/3) = 1/2
    assert lut.ema_momentum(2 * T // 3, T, m0) == pytest.approx(1 - 0.004 * 0.25, abs=1e-12)  # cos(2pi/3) = -1/2
    assert lut.ema_momentum(T, T, m0) == pytest.approx(1.0, abs=1e-12)
    ms = [lut.ema_momentum(k, T, m0) for k in range(T + 1)]
    assert all(b >= a for a, b in zip(ms, ms[1:]))
    for k in (1, 17, 599, 1199):  # BYOL: m = 1 - (1 - m0) (cos(pi k / K) + 1) / 2
        assert ms[k] == pytest.approx(1 - (1 - m0) * (math.cos(math.pi * k / T) + 1) / 2, abs=1e-12)


def test_target_twins_every_encoder_and_projector_tensor_and_nothing_else():
    sd = make_model().state_dict()
    twins = ema_twins(sd)
    encoder = {k for k in sd if k.startswith(('cls_token', 'pos_embed', 'patch_embed.', 'blocks.', 'norm.'))}
    projector = {k for k in sd if k.startswith('head_projector.')}
    assert set(twins.values()) == encoder | projector
    assert all(sd[t].shape == sd[o].shape for t, o in twins.items())
    assert not any(k.startswith('target_') and k not in twins for k in sd)  # no target predictor or decoder
    assert all(torch.equal(sd[t], sd[o]) for t, o in twins.items())  # the target starts as a copy


@pytest.mark.parametrize('step,total', [(0, 100), (50, 100), (99, 100)])
def test_after_step_is_the_ema_formula_for_encoder_and_projector(step, total):
    model = make_model()
    sd = model.state_dict()  # shares storage with the model
    twins = ema_twins(sd)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # online and target apart, BatchNorm statistics included
        for t, o in twins.items():
            if sd[t].is_floating_point():
                sd[t].copy_(torch.rand(sd[t].shape, generator=g) + 0.5)
                sd[o].copy_(torch.rand(sd[o].shape, generator=g) + 0.5)
    before = {k: v.clone() for k, v in sd.items()}
    model.after_step(step, total)
    m = 1 - (1 - 0.996) * (math.cos(math.pi * step / total) + 1) / 2
    checked = 0
    for t, o in twins.items():
        assert torch.equal(sd[o], before[o])  # the online side is read only
        if sd[t].is_floating_point():
            assert (sd[t] - (m * before[t] + (1 - m) * before[o])).abs().max() <= 1e-6, t
            checked += 1
    assert checked == sum(v.is_floating_point() for k, v in sd.items() if k.startswith('target_'))
    assert any(k.startswith('target_projector.') and k.endswith('running_var') for k in twins)


def test_target_gets_no_gradient_and_changes_only_through_the_ema():
    model = make_model()
    targets = {n: p for n, p in model.named_parameters() if n.startswith('target_')}
    assert targets and not any(p.requires_grad for p in targets.values())
    optimizer = torch.optim.AdamW(common.param_groups(model, 0.05), lr=1e-2)
    sd = model.state_dict()
    snapshot = {k: v.clone() for k, v in sd.items()}
    loss, _ = model(batch_of())
    loss.backward()
    assert all(p.grad is None for p in targets.values())
    assert model.head_projector[0].weight.grad.abs().sum() > 0 and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    optimizer.step()
    for k in sd:  # one full training step: parameters and BatchNorm statistics of the target untouched
        if k.startswith('target_'):
            assert torch.equal(sd[k], snapshot[k]), k
    assert not torch.equal(sd['blocks.0.attn.qkv.weight'], snapshot['blocks.0.attn.qkv.weight'])
    online = {k: v.clone() for k, v in sd.items()}
    model.after_step(0, 10)  # momentum 0.996 at step 0
    for t, o in ema_twins(sd).items():
        if sd[t].is_floating_point():
            assert (sd[t] - (0.996 * snapshot[t] + 0.004 * online[o])).abs().max() <= 1e-6, t


def test_train_mode_keeps_the_target_in_eval_mode():
    model = make_model()
    model.train()
    assert model.training and model.head_projector.training
    assert not any(m.training for m in [*model.target_encoder.modules(), *model.target_projector.modules()])


def test_ema_is_one_lerp_equal_to_the_formula_on_every_pair():
    model = make_model()
    online, target = model.ema_pairs()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in [*online, *target]:
            t.copy_(torch.randn(t.shape, generator=g))
    before = [t.clone() for t in target]
    model.after_step(30, 100)
    m = lut.ema_momentum(30, 100, 0.996)
    assert 0.996 < m < 1
    assert all(torch.allclose(t, m * b + (1 - m) * o, rtol=0, atol=1e-6) for t, b, o in zip(target, before, online))


# ----------------------------------------------------------------------------------------------
# The projector's BatchNorm: statistics over every process's batch (SyncBatchNorm's result)

BN_WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import lut
dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
N, C = 12, 5
calls = [(3 + 2 * torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)) for _ in range(3)]  # (x, loss weights)
weight, bias = 1 + torch.rand(C, generator=g), torch.randn(C, generator=g)

def run(bn, x, w):  # the per-image loss, averaged over the images this process holds
    x = x.clone().requires_grad_()
    y = bn(x)
    ((y * w).sum(1) ** 2).mean().backward()
    return y.detach(), x.grad

out = {}
for compiled in (False, True):
    ref, bn = torch.nn.BatchNorm1d(C), lut.GlobalBatchNorm1d(C)
    for m in (ref, bn):
        with torch.no_grad():
            m.weight.copy_(weight); m.bias.copy_(bias)
    step = torch.compile(bn, fullgraph=True, backend='aot_eager') if compiled else bn  # fullgraph: no graph break
    diff = 0.0
    for x, w in calls:  # three calls: the running mean (the sums' shift) moves away from 0
        y_ref, gx_ref = run(ref, x, w)  # one process, whole batch
        part = slice(rank * N // world, (rank + 1) * N // world)
        y, gx = run(step, x[part], w[part])
        gw, gb = bn.weight.grad.clone(), bn.bias.grad.clone()
        for t in (gw, gb):
            dist.all_reduce(t)  # DDP: gradients averaged over the processes
        diff = max(diff, (y - y_ref[part]).abs().max().item(),  # input gradients: each process's loss counts
                   (gx / world - gx_ref[part]).abs().max().item(),  # the others' images through the statistics
                   (gw / world - ref.weight.grad).abs().max().item(), (gb / world - ref.bias.grad).abs().max().item())
        for m in (ref, bn):
            m.weight.grad = m.bias.grad = None
    diff = max(diff, (bn.running_mean - ref.running_mean).abs().max().item(),
               (bn.running_var - ref.running_var).abs().max().item())
    out['compiled' if compiled else 'eager'] = diff
    out['batches_tracked'] = int(bn.num_batches_tracked)
bn.eval()
out['eval'] = (bn(calls[0][0]) - ref.eval()(calls[0][0])).abs().max().item()
if rank == 0:
    print('RESULT', json.dumps(out))
"""


def test_global_batchnorm_on_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    """Outputs, input and parameter gradients and running statistics of GlobalBatchNorm1d on 2 gloo
    processes (6 images each) equal nn.BatchNorm1d's on all 12 images, eager and compiled (fullgraph)."""
    worker = tmp_path / 'bn_worker.py'
    worker.write_text(BN_WORKER)
    r = run(worker, ROOT, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split('RESULT ')[1])
    assert res['eager'] < 1e-5 and res['compiled'] < 1e-5 and res['eval'] < 1e-6, res
    assert res['batches_tracked'] == 3


def test_global_batchnorm_is_batchnorm_in_one_process_and_in_eval_mode():
    x = 5 + torch.randn(16, 8)
    ref, bn = nn.BatchNorm1d(8), lut.GlobalBatchNorm1d(8)
    assert bn.state_dict().keys() == ref.state_dict().keys()  # official key names
    assert torch.equal(bn(x), ref(x)) and torch.equal(bn.running_var, ref.running_var)
    model = make_model()
    assert all(isinstance(h[1], lut.GlobalBatchNorm1d) for h in (model.head_projector, model.head_predictor, model.target_projector))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


# ----------------------------------------------------------------------------------------------
# The recipe (released PRETRAIN.md / main_lut.py)


def test_defaults_are_the_released_recipe():
    args = lut.get_args(['--data', 'synthetic'])
    assert tuple(args.betas) == (0.9, 0.95)  # main_lut.py hard-codes them
    assert (args.batch_size, args.accum_iter) == (128, 4)  # x 8 GPUs: 4096, BatchNorm over 1024 per view
    assert (args.blr, args.weight_decay, args.epochs, args.warmup_epochs) == (1.5e-4, 0.05, 1600, 40)
    assert (args.mask_ratio, args.momentum, args.context_weight, args.norm_pix_loss) == (0.75, 0.996, 0.25, True)
    assert args.lr is None and args.views == 'src'


def test_lr_rule_is_the_square_root_one():
    assert lut.lr_from_blr(1.5e-4, 4096) == pytest.approx(2.4e-3, rel=1e-12)  # = MAE's 1.5e-4 x 4096 / 256
    assert lut.lr_from_blr(1.5e-4, 1024) == pytest.approx(1.5e-4 * 32 / 4, rel=1e-12)  # linear would give 6e-4
    assert lut.lr_from_blr(1.5e-4, 16384) == pytest.approx(2 * 2.4e-3, rel=1e-12)  # 4x batch -> 2x lr


# ----------------------------------------------------------------------------------------------
# Eq. (1)-(3)


def test_context_loss_is_two_minus_two_cosine():
    q = torch.tensor([[1., 0.], [0., 2.], [3., 4.], [1., 1.]])
    z = torch.tensor([[5., 0.], [1., 0.], [4., 3.], [-2., -2.]])
    # cosines 1, 0, 24/25, -1  ->  2 - 2 cos = 0, 2, 2/25, 4
    assert lut.context_loss(q, z).item() == pytest.approx((0 + 2 + 0.08 + 4) / 4, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    q, z = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    by_hand = ((q / q.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    assert lut.context_loss(q, z).item() == pytest.approx(by_hand.item(), abs=1e-6)  # = |q/|q| - z/|z||^2
    assert lut.context_loss(3 * q, 0.5 * z).item() == pytest.approx(by_hand.item(), abs=1e-6)


def mae_loss_by_hand(img, pred, mask, p):
    """MAE's loss: (row, column, channel) patches, each normalized by its mean and unbiased variance
    (eps 1e-6), squared error averaged per patch, then over the masked patches."""
    B = img.shape[0]
    t = img.unfold(2, p, p).unfold(3, p, p)  # [B, 3, h, w, p, p]
    t = t.permute(0, 2, 3, 4, 5, 1).reshape(B, -1, p * p * 3)  # [B, L, p*p*3]
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).sum(-1, keepdim=True) / (t.shape[-1] - 1)
    t = (t - mean) / torch.sqrt(var + 1e-6)
    per_patch = ((pred - t) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def projector_by_hand(mlp, x):
    """Linear, BatchNorm with the running statistics (eval), ReLU, Linear: the target's projector."""
    bn = mlp[1]
    h = x @ mlp[0].weight.T
    h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    return h.clamp(min=0) @ mlp[3].weight.T


@pytest.mark.parametrize('weight', [0.0, 0.25, 1.0])
def test_loss_matches_an_independent_computation(weight):
    model = make_model('--context-weight', str(weight))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a target that differs from the online side, with non-trivial BN statistics
        for p in [*model.target_encoder.parameters(), *model.target_projector.parameters()]:
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        bn = model.target_projector[1]
        bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    batch, B = batch_of(), 4
    torch.manual_seed(3)
    with torch.no_grad():
        loss, logs = model(batch)

    torch.manual_seed(3)
    noise = torch.rand(B, L)  # the model's draw: one noise for both views (public code)
    order = noise.argsort(1)
    ids1, ids2 = order[:, :K], order[:, K:2 * K]  # view 1: the K smallest, view 2: the next K
    mask1 = torch.ones(B, L).scatter_(1, ids1, 0.0)  # 1 = masked
    with torch.no_grad():
        z1 = lut.encode(model, batch['img'], ids1)  # [B, 1 + K, D]
        z2 = lut.encode(model, batch['img2'], ids2)
        pred, _ = model.forward_decoder(z1, order.argsort(1))
        mae = mae_loss_by_hand(batch['img'], pred, mask1, P)  # Eq. (1) on view 1 only
        # online: pooled visible tokens -> projector -> predictor, one view per BatchNorm batch
        q1 = model.head_predictor(model.head_projector(z1[:, 1:].mean(1)))
        q2 = model.head_predictor(model.head_projector(z2[:, 1:].mean(1)))
        # target: the full, unmasked other view through the EMA encoder and projector
        t1, t2 = (projector_by_hand(model.target_projector, model.target_encoder.forward_features(x)[:, 1:].mean(1))
                  for x in (batch['img'], batch['img2']))

    def dist(q, t):
        return (2 - 2 * (q * t).sum(1) / (q.norm(dim=1) * t.norm(dim=1))).mean()
    forward, backward = dist(q1, t2), dist(q2, t1)  # view 1 -> view 2, view 2 -> view 1
    assert abs(forward - backward) > 1e-4  # the two directions differ, so averaging is tested
    context = (forward + backward) / 2  # Eq. (2), symmetrized
    assert logs['mae'].item() == pytest.approx(mae.item(), rel=1e-5, abs=1e-6)
    assert logs['context'].item() == pytest.approx(context.item(), rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx(mae.item() + weight * context.item(), rel=1e-5, abs=1e-6)  # Eq. (3)
    assert loss.item() == pytest.approx(logs['mae'].item() + weight * logs['context'].item(), rel=1e-6, abs=1e-7)


def test_context_weight_defaults_follow_sec_512():
    base = ['--data', 'synthetic']
    assert lut.get_args(base + ['--model', 'vit_small']).context_weight == 1.0
    assert lut.get_args(base + ['--model', 'vit_base']).context_weight == 0.25
    assert lut.get_args(base + ['--model', 'vit_base', '--context-weight', '0.5']).context_weight == 0.5


@pytest.mark.parametrize('flags', [['--steer', 'all'], ['--supervision', 'token'], ['--target-mask-ratio', '0.5'],
                                   ['--steer', 'all', '--supervision', 'token']])
def test_ablation_variants_train(flags):
    model = make_model(*flags)
    loss, logs = model(batch_of())
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {'mae', 'context'}


# ----------------------------------------------------------------------------------------------
# Masking


@pytest.mark.parametrize('length,ratio', [(64, 0.75), (196, 0.75), (49, 0.5), (64, 0.6)])
def test_two_view_masking_keeps_disjoint_sets(length, ratio):
    B = 6
    noise = torch.rand(B, length, generator=torch.Generator().manual_seed(length))
    (keep1, mask1, restore1), (keep2, mask2, restore2) = lut.two_view_masking(noise, ratio)
    k = int(length * (1 - ratio))
    if length == 196:
        assert k == 49  # MAE: 49 of 196 at 0.75
    assert keep1.shape == keep2.shape == (B, k)
    for b in range(B):
        order = sorted(range(length), key=lambda i: noise[b, i].item())
        s1, s2 = set(keep1[b].tolist()), set(keep2[b].tolist())
        assert s1 == set(order[:k]) and s2 == set(order[k:2 * k])  # smallest noise kept, then the next k
        assert len(s1) == len(s2) == k and not s1 & s2
        assert mask1[b].tolist() == [0.0 if i in s1 else 1.0 for i in range(length)]  # 1 = masked
        assert mask2[b].tolist() == [0.0 if i in s2 else 1.0 for i in range(length)]
    for keep, restore in ((keep1, restore1), (keep2, restore2)):
        assert torch.equal(restore.sort(1).values, torch.arange(length).expand(B, -1))  # a permutation
        assert torch.equal(restore.gather(1, keep), torch.arange(k).expand(B, -1))  # kept patches come first


def test_forward_encodes_each_view_on_its_own_disjoint_patches(monkeypatch):
    model = make_model()
    seen = []
    original = lut.encode

    def spy(vit, x, ids_keep=None):
        seen.append((vit is model, ids_keep))
        return original(vit, x, ids_keep)
    monkeypatch.setattr(lut, 'encode', spy)
    model(batch_of(n=4))
    online = [ids for is_online, ids in seen if is_online]
    target = [ids for is_online, ids in seen if not is_online]
    assert len(online) == 1 and online[0].shape == (8, K)  # both views in one batch
    ids1, ids2 = online[0][:4], online[0][4:]
    assert all(not set(a.tolist()) & set(b.tolist()) for a, b in zip(ids1, ids2))
    assert target == [None]  # the target sees every patch (Tab. 4e: no target masking)


# ----------------------------------------------------------------------------------------------
# Two views (Sec. 3.0.4, 5.1.2)


def coordinate_image(h, w):
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(h)[:, None]
    a[..., 1] = np.arange(w)[None, :]
    a[..., 2] = (np.arange(h)[:, None] * 7 + np.arange(w)[None, :] * 13) % 256
    return Image.fromarray(a)


@pytest.mark.parametrize('size', [(48, 32), (96, 64), (64, 96)])
def test_view1_is_a_reflect_padded_random_crop_of_the_short_side_resized_image(size):
    """DeiT III's SRC: Resize(S) (short side to S, bicubic, aspect kept), RandomCrop(S, padding=4,
    reflect), flip. The view must equal one such crop, every offset of the short side must occur."""
    transform = lut.train_transform(lut.get_args(TINY + SMALL))
    img = coordinate_image(size[1], size[0])
    W, H = size
    w, h = (S, int(S * H / W)) if W <= H else (int(S * W / H), S)
    resized = np.asarray(img if (w, h) == (W, H) else img.resize((w, h), Image.BICUBIC))
    padded = np.pad(resized, ((4, 4), (4, 4), (0, 0)), mode='reflect')
    keys, crops = [], []
    for top in range(h + 8 - S + 1):
        for left in range(w + 8 - S + 1):
            c = padded[top:top + S, left:left + S]
            keys += [(top, left, False), (top, left, True)]
            crops += [c, c[:, ::-1]]
    crops = np.stack(crops)  # [N, S, S, 3]
    offsets, short_axis = set(), 0 if h == S else 1
    for seed in range(120):
        out = transform(np.random.default_rng(seed), img)
        assert out['img'].dtype == torch.uint8 and out['img'].shape == (3, S, S)
        view = out['img'].permute(1, 2, 0).numpy()
        hits = np.flatnonzero((crops == view).all(axis=(1, 2, 3)))
        assert len(hits) >= 1, "view 1 is not a reflect-padded crop of the resized image"
        top, left, _ = keys[hits[0]]
        offsets.add((top, left)[short_axis])
        if (w, h) == (W, H):  # exact pixels: the crop keeps at least S - 4 of the S rows of the short side
            assert len(np.unique(view[..., 0] if short_axis == 0 else view[..., 1])) >= S - 4
    assert offsets == set(range(9))  # padding 4 on each side: 9 positions along the short side


def test_two_views_differ_and_view2_has_the_colour_augmentations():
    transform = lut.train_transform(lut.get_args(TINY + SMALL))
    images = [common.SyntheticImages(None, 8, resolution=64).load(i) for i in range(8)]

    def stats(x):  # per-channel mean and std
        return torch.cat([x.mean((1, 2)), x.std((1, 2))])

    def gray(x):
        return bool((x[0] == x[1]).all() and (x[1] == x[2]).all())
    d_colour, d_crop, gray1, gray2, n = 0.0, 0.0, 0, 0, 120
    for seed in range(n):
        img = images[seed % 8]
        a = transform(np.random.default_rng(seed), img)
        b = transform(np.random.default_rng(10_000 + seed), img)
        x = lut.view2(common.normalize(a['img2'][None]), a['view2'][None])  # as the step applies it
        a['img2'] = (common.unnormalize(x)[0] * 255).round().to(torch.uint8)
        for v in (a['img'], a['img2']):
            assert v.dtype == torch.uint8 and v.shape == (3, S, S)
        assert not torch.equal(a['img'], a['img2'])
        v1, v2, other = a['img'].float(), a['img2'].float(), b['img'].float()
        d_colour += (stats(v2) - stats(v1)).abs().mean().item() / n  # crop + colour
        d_crop += (stats(other) - stats(v1)).abs().mean().item() / n  # crop alone
        gray1, gray2 = gray1 + gray(a['img']), gray2 + gray(a['img2'])
    assert d_colour > 3 * d_crop
    assert gray1 == 0 and 20 <= gray2 <= 60  # view 2: one of grayscale / solarize / blur, ~1/3 gray


# ----------------------------------------------------------------------------------------------
# Official MAE layout


def mae_shapes(*args):
    """The official MAE table (encoder and decoder) as one key -> shape dict."""
    enc, dec = official_mae_shapes(*args)
    return {**enc, **dec}


def test_state_dict_is_official_mae_plus_the_lut_heads():
    model = make_model('--decoder-depth', '2')
    sd = model.state_dict()
    extra = [k for k in sd if k.startswith(('head_', 'target_'))]
    core = {k: tuple(v.shape) for k, v in sd.items() if k not in extra}
    assert core == mae_shapes(D, DEPTH, P, L, 32, 2)
    # Sec. 5.1.1: projector and predictor are Linear D -> H, BatchNorm(H), ReLU, Linear H -> D, no biases
    for head in ('head_projector', 'head_predictor', 'target_projector'):
        assert tuple(sd[f'{head}.0.weight'].shape) == (64, D) and tuple(sd[f'{head}.3.weight'].shape) == (D, 64)
        assert f'{head}.1.running_var' in sd and f'{head}.0.bias' not in sd and f'{head}.3.bias' not in sd

    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=g) for k, s in mae_shapes(D, DEPTH, P, L, 32, 2).items()}
    missing, unexpected = model.load_state_dict(official, strict=False)
    # strict on every MAE key (BatchNorm tolerates a missing num_batches_tracked, so it is not reported)
    assert unexpected == [] and sorted(missing) == sorted(k for k in extra if not k.endswith("num_batches_tracked"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in official.items())
    model.load_state_dict({**official, **{k: sd[k] for k in extra}}, strict=True)
    loss, _ = model(batch_of())
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_checkpoint_and_log(tmp_path):
    out = tmp_path / 'run'
    r = run('lut.py', *TINY, '--decoder-dim', '64', '--decoder-depth', '1', '--decoder-heads', '4',
            '--head-dim', '128', '--accum-iter', '1', '--output-dir', out)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert rows[0]['args']['lr'] == pytest.approx(1.5e-4 * math.sqrt(8) / 4, rel=1e-12)  # main_lut.py's rule at batch 8
    rows = rows[1:]
    assert len(rows) == 4 and all({'mae', 'context', 'loss'} <= set(row) for row in rows)
    assert all(math.isfinite(row['mae']) and 0 <= row['context'] <= 4 for row in rows)
    ckpt = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)
    assert ckpt['step'] == 4 and any(k.startswith('target_encoder.') for k in ckpt['model'])
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
    vit, _ = common.build_encoder(str(out / 'checkpoint.pth'))  # the online encoder, not the target
    assert torch.equal(vit.state_dict()['blocks.0.attn.qkv.weight'], ckpt['model']['blocks.0.attn.qkv.weight'])


def test_cli_ddp_two_processes(tmp_path):
    r = run('lut.py', *TINY, *SMALL, '--output-dir', tmp_path / 'ddp', nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / 'ddp' / 'log.jsonl')][1:]
    assert len(rows) == 2 and all('context' in row for row in rows)  # 32 images / 2 ranks / batch 8
