"""evaluate.py: each protocol's arithmetic against a hand computation or a brute-force loop, and the
command line on tiny checkpoints (a 32 px ViT with 4 px patches, a few steps, CPU)."""
import itertools
import json
import math
import os
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import evaluate
from utils import TINY, run

CPU = ['--data', 'synthetic', '--num-workers', '0', '--device', 'cpu']


def top1(text):
    return float(re.search(r'top-1 (\d+\.\d+)%', text).group(1))


@pytest.fixture(scope='module')
def simmim_ckpt(tmp_path_factory):
    """A SimMIM checkpoint from the tiny flags, written as a user's run writes it."""
    out = tmp_path_factory.mktemp('simmim')
    # the paper's plain ViT (no layer scale, absolute position embedding): an encoder timm's vit_* loads
    r = run('simmim.py', *TINY, '--mask-patch-size', '8', '--layer-scale', '0', '--no-rel-pos-bias', '--output-dir', out)
    assert r.returncode == 0 and (out / 'checkpoint.pth').is_file(), r.stderr
    return str(out / 'checkpoint.pth')


@pytest.fixture(scope='module')
def small_ckpt(tmp_path_factory):
    """A 48-wide, 2-block ViT saved as common.train saves (encoder plus a method part)."""
    torch.manual_seed(0)
    vit = common.VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)
    path = str(tmp_path_factory.mktemp('small') / 'checkpoint.pth')
    common.save_checkpoint({'model': dict(vit.state_dict(), mask_token=torch.zeros(1, 1, 48)),
                            'encoder_kwargs': vit.encoder_kwargs, 'args': {'model': 'custom'}, 'step': 0, 'epoch': 0}, path)
    return path


# ----------------------------------------------------------------------------------------------
# Fine-tuning: layer decay, mixup / cutmix, label smoothing


def test_layer_decay_groups_follow_mae():
    vit = common.VisionTransformer(img_size=32, patch_size=4, embed_dim=24, depth=4, num_heads=2, num_classes=5,
                                   global_pool='avg', init_values=0.1)
    decay, wd = 0.75, 0.05
    groups = evaluate.layer_decay_groups(vit, wd, decay)
    found = {id(p): g for g in groups for p in g['params']}
    assert sum(len(g['params']) for g in groups) == len(found) == len(list(vit.parameters()))
    num_layers = 4 + 1  # MAE: depth + 1
    for name, p in vit.named_parameters():
        if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed.'):
            layer = 0
        elif name.startswith('blocks.'):
            layer = int(name.split('.')[1]) + 1
        else:  # fc_norm, head
            assert name.startswith(('fc_norm.', 'head.')), name
            layer = num_layers
        assert found[id(p)]['lr_scale'] == pytest.approx(decay ** (num_layers - layer)), name
        no_wd = p.ndim == 1 or name in ('cls_token', 'pos_embed')  # biases, norms, layer scales
        assert found[id(p)]['weight_decay'] == (0.0 if no_wd else wd), name
    assert found[id(vit.head.weight)]['lr_scale'] == 1.0
    assert found[id(vit.patch_embed.proj.weight)]['lr_scale'] == pytest.approx(decay ** 5)


def finetune_model(num_classes, *flags):
    """evaluate.finetune's model on a tiny classifier, with its default (MAE) flags and `flags`."""
    args = evaluate.get_args(['finetune', '--ckpt', 'x', '--data', 'synthetic', *flags])
    vit = common.VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=2, num_classes=num_classes,
                                   global_pool='avg')
    vit.mean_std = (common.IMAGENET_MEAN, common.IMAGENET_STD)
    return evaluate.Finetune(vit, args)


def finetune_mix(seed, x, y, num_classes):
    """evaluate.finetune's batch mixing with its default (MAE) flags, its draws seeded as the loop does."""
    model = finetune_model(num_classes)
    assert (model.mixup, model.cutmix, model.smoothing) == (0.8, 1.0, 0.1)
    torch.manual_seed(seed)
    return model.mix(x, y)


def test_mixup_cutmix_targets_match_measured_lambda():
    B, C, eps = 4, 5, 0.1
    x = torch.arange(1, B + 1).float().view(B, 1, 1, 1).expand(B, 3, 16, 16)  # image i is the constant i + 1
    y = torch.tensor([0, 3, 1, 3])
    smooth = lambda labels: F.one_hot(labels, C).float() * (1 - eps) + eps / C  # noqa: E731
    seen = set()
    for seed in range(40):
        out, target = finetune_mix(seed, x, y, C)
        partner = x.flip(0)
        if (out == out[:, :1, :1, :1]).all():  # mixup: each image a constant blend
            lam = ((partner[0, 0, 0, 0] - out[0, 0, 0, 0]) / (partner[0, 0, 0, 0] - x[0, 0, 0, 0])).item()
            torch.testing.assert_close(out, lam * x + (1 - lam) * partner)
            seen.add('mixup')
        else:  # cutmix: lam is the fraction of pixels still from the image itself
            from_partner = (out == partner) & (x != partner)
            lam = 1 - from_partner[0].float().mean().item()
            assert torch.equal(from_partner[0], from_partner[-1])  # one box for the whole batch
            assert ((out == x) | from_partner).all()
            seen.add('cutmix')
        torch.testing.assert_close(target.sum(1), torch.ones(B))
        torch.testing.assert_close(target, lam * smooth(y) + (1 - lam) * smooth(y.flip(0)))
    assert seen == {'mixup', 'cutmix'}


def test_label_smoothing_loss_by_hand():
    model = finetune_model(3, '--mixup', '0', '--cutmix', '0')
    logits, y = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 1])
    img, target = model.mix(torch.zeros(2, 3, 4, 4), y)
    assert torch.equal(img, torch.zeros(2, 3, 4, 4))
    eps, want = 0.1, 0.0
    for row, label in zip(logits.tolist(), y.tolist()):
        lse = math.log(sum(math.exp(v) for v in row))
        t = [(1 - eps) * (c == label) + eps / 3 for c in range(3)]
        want += -sum(tc * (v - lse) for tc, v in zip(t, row)) / 2
    assert evaluate.soft_target_cross_entropy(logits, target).item() == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# k-NN, retrieval, top-k


def test_knn_weighted_vote_beats_majority():
    c = math.cos(math.radians(25.84193))  # 0.9
    s = math.sqrt(1 - c * c)
    train = torch.tensor([[1.0, 0], [c, s], [c, -s], [-1, 0.1], [-1, -0.1]]) * torch.tensor([[2.0], [1], [5], [1], [3]])
    labels = torch.tensor([0, 1, 1, 2, 2])
    query = torch.tensor([[3.0, 0.0]])  # cosine 1 with the class-0 point, 0.9 with both class-1 points
    for T in (0.07, 1.0):
        scores = evaluate.knn_classify(train, labels, query, 3, k=3, T=T)
        want = torch.tensor([[math.exp(1 / T), 2 * math.exp(0.9 / T), 0.0]])
        torch.testing.assert_close(scores, want, rtol=1e-4, atol=0)
    assert evaluate.knn_classify(train, labels, query, 3, k=3, T=0.07).argmax().item() == 0  # one close neighbour wins
    assert evaluate.knn_classify(train, labels, query, 3, k=3, T=1.0).argmax().item() == 1  # ~ majority vote


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g)
    ytr, yte = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    xtr = centres[ytr] + 0.8 * torch.randn(60, 16, generator=g)
    xte = centres[yte] + 0.8 * torch.randn(25, 16, generator=g)
    k, T = 7, 0.07
    got = evaluate.knn_classify(xtr, ytr, xte, 4, k=k, T=T, chunk=6)
    for i in range(25):
        sims = [float(xte[i] @ xtr[j] / (xte[i].norm() * xtr[j].norm())) for j in range(60)]
        want = [0.0] * 4
        for j in sorted(range(60), key=lambda j: -sims[j])[:k]:
            want[int(ytr[j])] += math.exp(sims[j] / T)
        torch.testing.assert_close(got[i], torch.tensor(want), rtol=1e-4, atol=1e-6)
    acc = 100 * evaluate.topk_correct(got, yte)[0].item() / 25
    assert acc > 80  # well-separated clusters


def test_recall_at_1():
    g = torch.Generator().manual_seed(1)
    centres = 10 * torch.eye(8)[:3]
    iy, qy = torch.arange(30) % 3, torch.arange(12) % 3
    ix, qx = centres[iy] + torch.randn(30, 8, generator=g), centres[qy] + torch.randn(12, 8, generator=g)
    assert evaluate.recall_at_1(ix, iy, qx, qy, chunk=5) == 100.0
    wrong = qy.clone()
    wrong[:3] = (wrong[:3] + 1) % 3  # three queries carry another label: 9 / 12 hits
    assert evaluate.recall_at_1(ix, iy, qx, wrong) == pytest.approx(75.0)
    qx, qy = torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)  # brute force on noise
    hits = [int(iy[max(range(30), key=lambda j: float(F.cosine_similarity(qx[i], ix[j], 0)))]) == int(qy[i]) for i in range(40)]
    assert evaluate.recall_at_1(ix, iy, qx, qy) == pytest.approx(100 * sum(hits) / 40)


def test_topk_correct():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3, 0.6, 0.05],   # ranks: 5, 1, 4, 2, 0 ...
                           [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([5, 3, 2])  # top-1 hit; in the top 5; neither
    assert evaluate.topk_correct(scores, labels).tolist() == [1.0, 2.0]


def test_lars_step_by_hand():
    w, b = nn.Parameter(torch.tensor([[3.0, 4.0]])), nn.Parameter(torch.tensor([1.0]))
    opt = evaluate.LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9)
    mu_w, mu_b = [0.0, 0.0], 0.0
    want_w, want_b = [3.0, 4.0], 1.0
    for gw, gb in (([0.6, 0.8], 2.0), ([-1.0, 0.5], -1.0)):
        w.grad, b.grad = torch.tensor([gw]), torch.tensor([gb])
        u = [g + 0.1 * p for g, p in zip(gw, want_w)]  # weight decay, then the trust ratio .001 |w| / |u|
        ratio = 0.001 * math.hypot(*want_w) / math.hypot(*u)
        mu_w = [0.9 * m + ratio * v for m, v in zip(mu_w, u)]
        mu_b = 0.9 * mu_b + gb  # 1-D: the plain gradient
        want_w, want_b = [p - 0.5 * m for p, m in zip(want_w, mu_w)], want_b - 0.5 * mu_b
        opt.step()
        torch.testing.assert_close(w.data, torch.tensor([want_w]))
        torch.testing.assert_close(b.data, torch.tensor([want_b]))


# ----------------------------------------------------------------------------------------------
# Analyses: attention distance, CKA, spectrum


def brute_attention_distance(a, grid, p):
    """a [L, L] over patches in row-major order; the mean over queries of sum_k a_qk |c_q - c_k|."""
    h, w = grid
    total = 0.0
    for q in range(h * w):
        total += sum(a[q][k] * p * math.hypot(q // w - k // w, q % w - k % w) for k in range(h * w))
    return total / (h * w)


def test_attention_distance():
    grid, p = (3, 4), 4
    L = 12
    eye = torch.eye(1 + L)[None, None]  # [1, 1, N, N] with a cls token
    assert evaluate.attention_distance(eye, grid, p).item() == 0.0
    uniform = torch.full((1, 1, 1 + L, 1 + L), 1 / (1 + L))  # the cls column is dropped, rows renormalized
    want = brute_attention_distance([[1 / L] * L] * L, grid, p)
    assert evaluate.attention_distance(uniform, grid, p).item() == pytest.approx(want, rel=1e-5)
    down = torch.zeros(1, 1, 1 + L, 1 + L)  # every query looks one row down (the last row at itself)
    for q in range(L):
        down[0, 0, 1 + q, 1 + (q + 4 if q + 4 < L else q)] = 1
    assert evaluate.attention_distance(down, grid, p).item() == pytest.approx(p * 8 / 12)
    torch.manual_seed(0)
    a = torch.randn(2, 3, 1 + L, 1 + L).softmax(-1)
    got = evaluate.attention_distance(a, grid, p)
    for b, hd in itertools.product(range(2), range(3)):
        rows = a[b, hd, 1:, 1:]
        rows = (rows / rows.sum(-1, keepdim=True)).tolist()
        assert got[b, hd].item() == pytest.approx(brute_attention_distance(rows, grid, p), rel=1e-5)


def test_linear_cka():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g) @ torch.randn(12, 12, generator=g)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    assert evaluate.linear_cka(x, x) == pytest.approx(1.0)
    assert evaluate.linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0)  # rotation, scale, shift
    assert evaluate.linear_cka(torch.randn(3000, 6, generator=g), torch.randn(3000, 6, generator=g)) < 0.02
    # the HSIC form (Kornblith et al., Eq. 1 with linear kernels) on a small sample
    a, b = torch.randn(20, 5, generator=g).double(), torch.randn(20, 3, generator=g).double()
    b = b + a[:, :3]
    H = torch.eye(20, dtype=torch.float64) - 1 / 20
    hsic = lambda k, l: torch.trace(k @ H @ l @ H)  # noqa: E731, E741
    K, Lm = a @ a.T, b @ b.T
    want = hsic(K, Lm) / torch.sqrt(hsic(K, K) * hsic(Lm, Lm))
    assert evaluate.linear_cka(a, b) == pytest.approx(want.item())


def test_spectrum_of_known_covariance():
    g = torch.Generator().manual_seed(0)
    n, var = 500, torch.tensor([4.0, 1.0, 0.25, 0.0625])
    z = torch.randn(n, 4, generator=g, dtype=torch.float64)
    z, _ = torch.linalg.qr(z - z.mean(0))  # orthonormal, zero-mean columns: sample covariance exactly I / (n - 1)
    x = z * math.sqrt(n - 1) * var.double().sqrt()  # sample covariance diag(4, 1, 1/4, 1/16)
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    got = evaluate.spectrum((x @ rot + 7.0).float())
    torch.testing.assert_close(got, (var / var.sum()).double(), rtol=1e-4, atol=1e-6)
    few = evaluate.spectrum(torch.randn(5, 10, generator=g))  # 5 samples: rank 4, the zero tail left out
    assert len(few) == 4 and few.min() > 1e-6 and few.sum().item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Reconstructions


def test_reconstruction_grid_panels():
    g = torch.Generator().manual_seed(0)
    orig, rec = (torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8) for _ in range(2))
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0]]).float()  # 2 x 2 patches of 4 px
    grid = evaluate.reconstruction_grid(common.normalize(orig), mask, common.normalize(rec), 4)
    assert grid.shape == (16, 24, 3) and grid.dtype == np.uint8
    o, r = orig.permute(0, 2, 3, 1).numpy().astype(int), rec.permute(0, 2, 3, 1).numpy().astype(int)
    px = np.zeros((2, 8, 8, 1), bool)
    px[0, :4, :4] = px[0, 4:, 4:] = True  # patches 0 and 3 of image 0
    masked_panel = np.where(px, 128, o)
    rec_panel = np.where(px, r, o)
    want = np.concatenate([np.concatenate([o[i], masked_panel[i], rec_panel[i]], 1) for i in range(2)], 0)
    assert np.abs(grid.astype(int) - want).max() <= 1


def test_reconstruct_writes_png(simmim_ckpt, tmp_path):
    out = tmp_path / 'rec.png'
    evaluate.main(['reconstruct', '--ckpt', simmim_ckpt, *CPU, '--synthetic-size', '8', '--num-images', '2', '--out', str(out)])
    img = Image.open(out)
    assert img.size == (3 * 32, 2 * 32)  # original | masked | reconstruction, one row per image


# ----------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize('argv', [
    ['knn', '--ckpt', 'c', '--data', 'synthetic'], ['retrieval', '--ckpt', 'c', '--pool', 'avg'],
    ['linear', '--ckpt', 'c', '--cache-features'], ['finetune', '--ckpt', 'c', '--train', 'a', '--val', 'b'],
    ['attention-distance', '--ckpt', 'c'], ['cka', '--ckpt', 'c'], ['spectrum', '--ckpt', 'c', '--layers', '1', '4'],
    ['reconstruct', '--ckpt', 'c'], ['export', '--ckpt', 'c', '--out', 'o', '--random-init'],
])
def test_every_command_parses(argv):
    args = evaluate.get_args(argv)
    assert args.command == argv[0] and callable(evaluate.COMMANDS[args.command])


def test_finetune_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.get_args(['finetune', '-h'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and '--layer-decay' in out and '--ckpt' in out and '--resume' in out and '--peak-tflops' in out
    assert '--patch-size' not in out  # the checkpoint's


def test_load_model_reads_openai_clip(tmp_path):
    torch.manual_seed(0)
    ref = common.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=1, pre_norm=True,
                                   act='quick_gelu', norm_eps=1e-5, patch_bias=False)
    names = [('patch_embed.proj.', 'conv1.'), ('norm_pre.', 'ln_pre.'), ('norm.', 'ln_post.'), ('blocks.', 'transformer.resblocks.'),
             ('.norm1.', '.ln_1.'), ('.norm2.', '.ln_2.'), ('.attn.qkv.', '.attn.in_proj_'), ('.attn.proj.', '.attn.out_proj.'),
             ('.mlp.fc1.', '.mlp.c_fc.'), ('.mlp.fc2.', '.mlp.c_proj.')]
    sd = {}
    for k, v in ref.state_dict().items():
        for a, b in names:
            k = b + k[len(a):] if k.startswith(a) else k.replace(a, b)
        sd['visual.' + k] = v.half()  # OpenAI's layout and dtype
    sd['visual.class_embedding'] = sd.pop('visual.cls_token').flatten()
    sd['visual.positional_embedding'] = sd.pop('visual.pos_embed')[0]
    sd['visual.proj'] = torch.zeros(64, 16)
    torch.save(sd, tmp_path / 'clip.pt')
    args = evaluate.get_args(['knn', '--ckpt', str(tmp_path / 'clip.pt')])
    vit = evaluate.load_model(args, global_pool='avg', num_classes=3)
    assert vit.mean_std == (common.CLIP_MEAN, common.CLIP_STD) and vit.encoder_kwargs['act'] == 'quick_gelu'
    own = vit.state_dict()
    assert all(torch.equal(own[k], v.half().float()) for k, v in ref.state_dict().items() if not k.startswith('norm.'))
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(evaluate.prepare(vit, common.normalize(u8)), common.normalize(u8, common.CLIP_MEAN, common.CLIP_STD))


def test_quick_start_knn_with_its_baseline(simmim_ckpt):
    """The README's quick start: the checkpoint's k-NN, then the random-init baseline's, and the gain."""
    flags = [*CPU, '--synthetic-size', '64', '--batch-size', '64']
    r = run('evaluate.py', 'knn', '--ckpt', simmim_ckpt, *flags, '--baseline')
    assert r.returncode == 0, r.stderr
    ours, rand = map(float, re.findall(r'top-1 (\d+\.\d+)%', r.stdout))
    alone = [top1(run('evaluate.py', 'knn', '--ckpt', simmim_ckpt, *flags, *extra).stdout) for extra in ([], ['--random-init'])]
    assert [ours, rand] == alone  # each line is what the command gives on its own
    assert r.stdout.count('(random init)') == 1
    assert re.search(r'checkpoint (\S+)% vs random init (\S+)%: ([+-]\S+) points', r.stdout).groups() == (
        f'{ours:.2f}', f'{rand:.2f}', f'{ours - rand:+.2f}')


def test_export_is_a_timm_encoder_with_its_architecture(simmim_ckpt, tmp_path):
    out = tmp_path / 'vit.pth'
    r = run('evaluate.py', 'export', '--ckpt', simmim_ckpt, '--out', out)
    assert r.returncode == 0, r.stderr
    exported = torch.load(out, weights_only=True)
    ckpt = torch.load(simmim_ckpt, weights_only=True)
    assert exported['encoder_kwargs'] == ckpt['encoder_kwargs'] and 'timm: model = ' in r.stdout  # the architecture travels along
    if ckpt['encoder_kwargs']['rel_pos_bias']:
        return  # timm's Beit layout: tests/test_interop.py
    sd = exported['model']
    vit = common.VisionTransformer(**ckpt['encoder_kwargs'])
    vit.load_state_dict(sd, strict=True)
    block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
             'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias']
    timm_keys = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias'}
    timm_keys |= {f'blocks.{i}.{k}' for i in range(4) for k in block}  # timm's vit_* names, num_classes=0
    assert set(sd) == timm_keys
    assert all(torch.equal(v, ckpt['model'][k]) for k, v in sd.items())


def test_missing_checkpoint_is_one_line():
    r = run('evaluate.py', 'knn', '--ckpt', '/nonexistent', '--data', 'synthetic')
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and '/nonexistent' in lines[0] and 'Traceback' not in r.stderr


def test_linear_probe_on_cached_features(small_ckpt, capsys):
    argv = ['linear', '--ckpt', small_ckpt, *CPU, '--synthetic-size', '64', '--batch-size', '16', '--accum-iter', '1',
            '--epochs', '2', '--warmup-epochs', '1', '--cache-features']
    results = []
    for seed in (0, 0, 1):
        torch.manual_seed(100 + len(results))  # the probe's own --seed, not the caller's state, decides its result
        evaluate.main(argv + ['--seed', str(seed)])
        out = capsys.readouterr().out
        results.append(out.splitlines()[-1])
    assert '8 LARS steps' in out and 0 <= top1(out) <= 100
    assert results[0] == results[1] and results[1] != results[2]  # a seed reproduces its probe


def log_rows(out):
    rows = [json.loads(line) for line in open(out / 'log.jsonl')]
    return [r for r in rows if 'loss' in r], [r for r in rows if 'top1' in r]  # training steps, evaluations


def test_finetune_improves(small_ckpt, tmp_path, capsys):
    evaluate.main(['finetune', '--ckpt', small_ckpt, *CPU, '--synthetic-size', '128', '--batch-size', '16', '--epochs', '4',
                   '--warmup-epochs', '1', '--blr', '0.2', '--mixup', '0', '--cutmix', '0', '--reprob', '0',
                   '--log-every', '4', '--peak-tflops', '1', '--output-dir', str(tmp_path)])
    steps, rows = log_rows(tmp_path)  # through common.train: its log.jsonl, throughput and MFU
    assert [r['step'] for r in steps] == list(range(4, 33, 4)) and all(r['img_s'] > 0 and 0 < r['mfu'] < 1 for r in steps)
    assert [(r['epoch'], r['step']) for r in rows] == [(0, 8), (1, 16), (2, 24), (3, 32)]  # evaluated after each epoch
    assert max(r['top1'] for r in rows[1:]) >= rows[0]['top1'] + 10
    assert steps[-1]['loss'] < steps[0]['loss']
    best = torch.load(tmp_path / 'finetune_best.pth', weights_only=True)
    assert best['top1'] == max(r['top1'] for r in rows) == rows[-1]['best_top1']
    assert f"best top-1 {best['top1']:.2f}%" in capsys.readouterr().out
    vit = common.VisionTransformer(**best['encoder_kwargs'])
    vit.load_state_dict(best['model'])  # a classifier with fc_norm and a 10-way head
    assert vit.head.out_features == 10 and best['encoder_kwargs']['global_pool'] == 'avg'


@pytest.mark.parametrize('stop_after', [6, 8])  # mid-epoch; at an epoch's end (its evaluation runs before the save)
def test_finetune_stopped_by_sigterm_resumes(small_ckpt, tmp_path, monkeypatch, stop_after):
    argv = ['finetune', '--ckpt', small_ckpt, *CPU, '--synthetic-size', '64', '--batch-size', '16', '--epochs', '3',
            '--warmup-epochs', '1', '--blr', '0.2', '--log-every', '2']  # 4 steps per epoch; mixup, cutmix, erasing, drop path
    evaluate.main(argv + ['--output-dir', str(tmp_path / 'a')])
    monkeypatch.setattr(evaluate.Finetune, 'after_step', lambda self, step, total: step + 1 == stop_after and
                        os.kill(os.getpid(), signal.SIGTERM), raising=False)  # preempted after that step
    with pytest.raises(common.Stopped):
        evaluate.main(argv + ['--output-dir', str(tmp_path / 'b')])
    assert common.read_checkpoint(str(tmp_path / 'b' / 'checkpoint.pth'))['step'] == stop_after
    monkeypatch.delattr(evaluate.Finetune, 'after_step')
    evaluate.main(argv + ['--output-dir', str(tmp_path / 'b'), '--resume'])
    a, b = (common.read_checkpoint(str(tmp_path / d / 'checkpoint.pth')) for d in 'ab')
    assert a['step'] == b['step'] == 12 and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert set(b['model']) >= {'blocks.0.attn.qkv.weight', 'head.weight', 'fc_norm.weight'} and 'encoder_kwargs' in b

    def rows(d):  # log.jsonl without the timings: each step and evaluation once, as in the run never stopped
        return [{k: v for k, v in r.items() if k not in ('ms_step', 'img_s')} for r in sum(log_rows(tmp_path / d), [])]
    assert rows('a') == rows('b') and len(rows('b')) == 6 + 3
    best = [common.read_checkpoint(str(tmp_path / d / 'finetune_best.pth')) for d in 'ab']
    assert best[0]['top1'] == best[1]['top1'] and best[0]['epoch'] == best[1]['epoch']
