"""maskdistill.py: block-wise masks, the CLIP teacher against a direct implementation of OpenAI's
image tower, the loss against Eq. (3) by hand, the frozen teacher, and the command line."""
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import maskdistill
from utils import TINY, run

# ----------------------------------------------------------------------------------------------
# Block-wise masking (maskdistill.block_mask, BEiT; its algorithm and statistics: test_recipes.py)


def test_block_mask_ratio_zero_and_small_grids():
    assert maskdistill.block_mask(np.random.default_rng(0), (14, 14), 0).sum() == 0
    for grid, n in [((4, 4), 6), ((3, 5), 6), ((3, 5), 15), ((8, 8), 25)]:
        for seed in range(20):
            m = maskdistill.block_mask(np.random.default_rng(seed), grid, n)
            assert m.shape == grid and m.sum() == n


# ----------------------------------------------------------------------------------------------
# CLIP teacher: OpenAI's image tower written directly, random weights, saved in OpenAI's naming


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([('c_fc', nn.Linear(width, width * 4)), ('gelu', QuickGELU()),
                                              ('c_proj', nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):  # [N, B, D], sequence first as OpenAI's
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """OpenAI CLIP's `VisionTransformer`, returning every token: (before ln_post, after ln_post @ proj)."""
    def __init__(self, resolution, patch, width, layers, heads, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((resolution // patch) ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim) * width ** -0.5)

    def forward(self, x):
        x = self.conv1(x)  # [B, D, h, w]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, L, D]
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # [B, 1 + L, D]
        x = self.ln_pre(x).permute(1, 0, 2)  # [1 + L, B, D]
        x = self.transformer(x).permute(1, 0, 2)  # [B, 1 + L, D]
        return x, self.ln_post(x) @ self.proj


class CLIP(nn.Module):  # only the image tower: enough for the `visual.` keys
    def __init__(self, **kw):
        super().__init__()
        self.visual = VisionTransformer(**kw)

    def forward(self, x):
        return self.visual(x)[1]


def random_clip(resolution=32, patch=8, width=64, layers=2, output_dim=48, seed=0):
    torch.manual_seed(seed)
    model = CLIP(resolution=resolution, patch=patch, width=width, layers=layers, heads=width // 64, output_dim=output_dim)
    with torch.no_grad():  # randomize everything, LayerNorms and biases included, so every name mapping matters
        for name, p in model.named_parameters():
            is_gain = 'ln_' in name and name.endswith('weight')
            p.copy_((1.0 if is_gain else 0.0) + (0.2 if is_gain else 0.1) * torch.randn_like(p))
    return model.eval()


def test_clip_loader_matches_openai_forward(tmp_path):
    model = random_clip()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, want = model.visual(x)
    files = {}
    sd = model.state_dict()
    files['fp16_prefixed.pt'] = {k: v.half() for k, v in sd.items()}  # as in OpenAI's release: visual.*, fp16
    files['fp32_bare.pt'] = {k[len('visual.'):]: v for k, v in sd.items()}  # no prefix, fp32
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    torch.jit.save(torch.jit.trace(model, x), str(tmp_path / 'traced.pt'))  # TorchScript archive with visual.* keys
    for name in ['fp32_bare.pt', 'traced.pt', 'fp16_prefixed.pt']:
        vit, proj = common.load_clip_visual(str(tmp_path / name))
        ref = want
        if name.startswith('fp16'):  # the loader casts fp16 -> fp32: compare with the fp16-rounded reference
            rounded = random_clip()
            rounded.load_state_dict({k: v.half().float() for k, v in sd.items()})
            with torch.no_grad():
                ref = rounded.visual(x)[1]
            assert not torch.allclose(ref, want, atol=1e-5)  # the rounding is visible, so the comparison means something
        with torch.no_grad():
            got = vit.forward_features(x) @ proj  # [B, 1 + L, E]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def teacher_args(path, *extra):
    return maskdistill.get_args(['--data', 'synthetic', '--model', 'vit_pico', '--img-size', '32', '--patch-size', '4',
                                 '--teacher', str(path), *extra])


def test_teacher_sees_clip_normalized_crop_and_gives_last_layer_tokens(tmp_path):
    model = random_clip(patch=4)
    torch.save(model.state_dict(), tmp_path / 'clip.pt')
    raw = torch.rand(2, 3, 32, 32)  # pixels in [0, 1]
    img = common.normalize((raw * 255).round().to(torch.uint8))  # what the loop hands the model
    clip_in = ((raw * 255).round() / 255 - torch.tensor(common.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(common.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        last, out = model.visual(clip_in)
        after_ln_post = model.visual.ln_post(last)
    for flags, want in [([], last), (['--teacher-ln-post', '--teacher-proj'], out), (['--teacher-ln-post'], after_ln_post)]:
        teacher = maskdistill.load_teacher(teacher_args(tmp_path / 'clip.pt', *flags), (8, 8))
        torch.testing.assert_close(teacher(img), want[:, 1:], atol=1e-5, rtol=1e-5)
    assert teacher.out_dim == 64 and maskdistill.load_teacher(teacher_args(tmp_path / 'clip.pt', '--teacher-proj'), (8, 8)).out_dim == 48


def test_teacher_is_resized_to_the_student_grid(tmp_path):
    torch.save(random_clip(patch=8).state_dict(), tmp_path / 'clip8.pt')  # native 4 x 4 grid at 32 px
    teacher = maskdistill.load_teacher(teacher_args(tmp_path / 'clip8.pt'), (8, 8))
    assert teacher.img_size == 64 and teacher.vit.patch_embed.grid == (8, 8) and teacher.vit.pos_embed.shape == (1, 65, 64)
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 64, 64)
    beit = common.VisionTransformer(32, 8, 64, 1, 1, rel_pos_bias=True, pos_embed='none')  # a grid it cannot leave
    torch.save({'model': beit.state_dict(), 'encoder_kwargs': beit.encoder_kwargs}, tmp_path / 'beit.pth')
    with pytest.raises(common.UsageError, match='grid'):
        maskdistill.load_teacher(teacher_args(tmp_path / 'beit.pth', '--teacher-type', 'timm'), (8, 8))


# ----------------------------------------------------------------------------------------------
# Loss (Eq. 3) and the frozen teacher


def smooth_l1(d, beta):
    d = abs(d)
    return 0.5 * d * d / beta if d < beta else d - 0.5 * beta


def test_loss_equals_eq3_by_hand():
    target = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 4.0], [-1.0, 5.0, 2.0, 2.0]]])  # [1, 3, 4]
    pred = torch.tensor([[[0.5, -2.0, 0.0, -1.5], [1.0, -1.0, 0.2, 0.9], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for beta in (1.0, 2.0):
        per_token, diffs = [], []
        for o, t in zip(pred[0].tolist(), target[0].tolist()):
            mean = sum(t) / 4
            var = sum((v - mean) ** 2 for v in t) / 4  # biased, as LayerNorm
            ln = [(v - mean) / (var + 1e-5) ** 0.5 for v in t]
            per_token.append(sum(smooth_l1(a - b, beta) for a, b in zip(o, ln)) / 4)
            diffs += [abs(a - b) for a, b in zip(o, ln)]
        assert min(diffs) < beta < max(diffs)  # both pieces of Smooth-L1 are exercised
        want = (per_token[0] + per_token[1]) / 2  # masked tokens only
        assert abs(maskdistill.forward_loss(pred, target, mask, beta).item() - want) < 1e-6
        assert abs(maskdistill.forward_loss(pred, target, torch.ones(1, 3), beta).item() - sum(per_token) / 3) < 1e-6


def test_unmasked_tokens_do_not_contribute():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    mask = (torch.rand(2, 16) < 0.4).float()
    base = maskdistill.forward_loss(pred, target, mask)
    torch.testing.assert_close(maskdistill.forward_loss(torch.where(mask.bool()[..., None], pred, pred + 5), target, mask), base)
    assert not torch.allclose(maskdistill.forward_loss(torch.where(mask.bool()[..., None], pred + 5, pred), target, mask), base)


@pytest.fixture(scope='module')
def clip_file(tmp_path_factory):
    """A tiny CLIP image tower in OpenAI's naming whose grid matches the tiny student's (patch 4 at 32 px)."""
    path = tmp_path_factory.mktemp('teacher') / 'ViT-tiny.pt'
    torch.save({k: v.half() for k, v in random_clip(patch=4).state_dict().items()}, path)
    return path


def test_teacher_frozen_no_grad_and_not_saved(clip_file):
    torch.manual_seed(0)
    args = teacher_args(clip_file)
    model = maskdistill.MaskDistill(args).train()
    assert not model.teacher.training and model.training
    ds = common.SyntheticImages(maskdistill.train_transform(args), 4)
    batch = common.to_device(torch.utils.data.default_collate([ds[i] for i in range(4)]), 'cpu')
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opt = torch.optim.AdamW(common.param_groups(model, 0.05), lr=1e-2)
    assert not {id(p) for p in model.teacher.parameters()} & {id(p) for g in opt.param_groups for p in g['params']}
    loss, _ = model(batch)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith('teacher.'))  # no unused parameters
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.teacher.state_dict().items())
    saved = common.model_state(model)
    assert not any(k.startswith('teacher') for k in saved)
    assert set(saved) - set(common.VisionTransformer(**model.encoder_kwargs).state_dict()) == {
        'mask_token', 'head_distill.weight', 'head_distill.bias'}
    assert model.head_distill.out_features == 64  # the teacher's last-layer width


def test_student_sees_the_mask_token_in_place_of_masked_patches(clip_file):
    """Eq. (2): masked patch embeddings are replaced by the shared e_M; their pixels reach the teacher only."""
    torch.manual_seed(0)
    model = maskdistill.MaskDistill(teacher_args(clip_file)).eval()
    target = torch.randn(2, 64, model.teacher.out_dim)
    model.teacher.forward = lambda img: target  # the student's side alone
    img, mask = torch.randn(2, 3, 32, 32), (torch.rand(2, 8, 8) < 0.5).float()  # 8 x 8 patches of 4 px
    m = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).bool()  # [B, 1, H, W]
    with torch.no_grad():
        loss, _ = model({'img': img, 'mask': mask})
        torch.testing.assert_close(model({'img': torch.where(m, torch.randn_like(img), img), 'mask': mask})[0], loss)
        model.mask_token.add_(torch.randn_like(model.mask_token))  # (a constant shift would vanish in the LayerNorms)
        assert not torch.allclose(model({'img': img, 'mask': mask})[0], loss)


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_trains_and_checkpoints(tmp_path, clip_file):
    r = run('maskdistill.py', *TINY, '--teacher', clip_file, '--output-dir', tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert ckpt['step'] == 4 and ckpt['args']['teacher'] == str(clip_file) and ckpt['args']['mask_ratio'] is None
    assert not any(k.startswith('teacher') for k in ckpt['model']) and 'rel_pos_bias.relative_position_bias_table' in ckpt['model']
    rows = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert [r['step'] for r in rows[1:]] == [1, 2, 3, 4] and all(np.isfinite(r['loss']) for r in rows[1:])


def test_cli_knowledge_distillation_case(tmp_path, clip_file):
    r = run('maskdistill.py', *TINY, '--teacher', clip_file, '--output-dir', tmp_path, '--mask-ratio', '0', '--loss-on', 'all')
    assert r.returncode == 0, r.stderr


def test_cli_two_process_ddp(tmp_path, clip_file):
    r = run('maskdistill.py', *TINY, '--teacher', clip_file, '--output-dir', tmp_path, nproc=2)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('bad')
    (d / 'notes.txt').write_text('not weights\n')
    torch.save({'fc.weight': torch.zeros(2, 2)}, d / 'other.pth')
    return d


@pytest.mark.parametrize('name, teacher_type', [
    ('missing.pt', 'clip'), ('notes.txt', 'clip'), ('other.pth', 'clip'), ('notes.txt', 'timm'), ('other.pth', 'timm')])
def test_bad_teacher_file_gives_one_line(tmp_path, bad_files, name, teacher_type):
    path = bad_files / name
    r = run('maskdistill.py', *TINY, '--teacher', path, '--teacher-type', teacher_type, '--output-dir', tmp_path)
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert r.returncode == 2 and len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
    assert str(path) in lines[0] and 'CLIP' in lines[0] and 'timm' in lines[0]


def test_masked_loss_without_masked_patches_is_refused(tmp_path, clip_file):
    with pytest.raises(common.UsageError, match='--loss-on all'):
        maskdistill.MaskDistill(teacher_args(clip_file, '--mask-ratio', '0'))
