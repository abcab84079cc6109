"""Recipes: every script's defaults against README's "## Recipes" tables; BEiT's block-wise masking
(against a transcription of its generator, and its statistics); SimMIM's initialization and
weight-decay set as the released code; the multistep schedule."""
import importlib
import math
import os
import random

import numpy as np
import pytest
import torch

import common
import maskdistill
import simmim
from utils import ROOT, TINY

# ----------------------------------------------------------------------------------------------
# README tables


def recipe_tables():
    """{script: [(flag, default text, source, other source), ...]} from README's "## Recipes"."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    if '\n## Recipes\n' not in text:
        return {}
    section = text.split('\n## Recipes\n', 1)[1].split('\n## ', 1)[0]
    tables = {}
    for block in section.split('\n### ')[1:]:
        rows = [[c.strip() for c in line.strip().strip('|').split('|')] for line in block.splitlines()
                if line.startswith('| `--')]
        tables[block.split('\n', 1)[0].strip().strip('`')] = rows
    return tables


def parse_cell(text):
    """A default cell as the Python value: None/True/False, numbers, comma-separated tuples, strings."""
    text = text.strip().strip('`')
    if ',' in text:
        return tuple(parse_cell(t) for t in text.split(','))
    if text in ('None', 'True', 'False'):
        return {'None': None, 'True': True, 'False': False}[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def same(want, got):
    if isinstance(got, (tuple, list)):
        want = want if isinstance(want, tuple) else (want,)
        return len(want) == len(got) and all(same(w, g) for w, g in zip(want, got))
    if isinstance(got, float) and isinstance(want, (int, float)) and not isinstance(want, bool):
        return math.isclose(want, got, rel_tol=1e-9)
    return type(want) is type(got) and want == got


TABLES = recipe_tables()
REQUIRED = ['--model', '--img-size', '--patch-size', '--batch-size', '--accum-iter', '--epochs', '--blr',
            '--warmup-epochs', '--min-lr', '--betas', '--weight-decay', '--clip-grad', '--drop-path']
REQUIRED_IF_FLAG = ['--mask-ratio', '--crop-scale', '--layer-scale', '--rel-pos-bias']  # where the script has them


def test_readme_has_a_recipe_table_per_script():
    assert {'simmim.py', 'maskdistill.py', 'deepmim.py'} <= set(TABLES), "README.md needs '## Recipes' tables"
    assert all(rows for rows in TABLES.values())


@pytest.mark.parametrize('script', sorted(TABLES))
def test_defaults_match_readme(script):
    args = vars(importlib.import_module(script[:-3]).get_args(['--data', 'synthetic']))
    rows = {r[0].strip('`'): r for r in TABLES[script]}
    for flag, (_, cell, source, *_) in rows.items():
        dest = flag[2:].replace('-', '_')
        assert dest in args, f"{script}: README row {flag} is not a flag of the script"
        assert same(parse_cell(cell), args[dest]), f"{script} {flag}: default {args[dest]!r}, README {cell}"
        assert source, f"{script} {flag}: no source"
    required = REQUIRED + [f for f in REQUIRED_IF_FLAG if f[2:].replace('-', '_') in args]
    assert not [f for f in required if f not in rows], f"{script}: README rows missing"


def test_parse_cell_and_same_can_fail():
    assert parse_cell('`0.9,0.95`') == (0.9, 0.95) and parse_cell('`None`') is None and parse_cell('`cosine`') == 'cosine'
    assert same(700, (700,)) and same(1.875e-4, 1.5e-3 * 256 / 2048) and same(True, True)
    assert not same(0.1, 0.2) and not same(1, True) and not same((0.9, 0.95), (0.9, 0.999)) and not same('a', None)


def test_peak_lr_at_the_papers_batch():
    """lr = blr x effective batch / 256 over 8 processes gives each source's peak lr."""
    for script, batch, lr in [('simmim', 2048, 4e-4),  # released config: 1e-4 per 512 images
                              ('maskdistill', 2048, 1.5e-3),  # Tab. 11
                              ('deepmim', 4096, 1.5e-4 * 4096 / 256)]:  # App. A
        args = importlib.import_module(script).get_args(['--data', 'synthetic'])
        assert args.batch_size * args.accum_iter * 8 == batch
        assert math.isclose(args.blr * batch / 256, lr, rel_tol=1e-9)


# ----------------------------------------------------------------------------------------------
# Schedule


def test_multistep_schedule_as_released_simmim():
    """SimMIM's MultiStepLRScheduler: linear warmup from warmup_lr, then lr x 0.1 from each milestone on."""
    spe, lr, warm = 10, 4e-4, 100
    f = lambda s: common.get_lr(s, 8000, warm, lr, 2e-5, 2e-6, (700,), spe)  # noqa: E731
    assert f(0) == 2e-6 and f(50) == pytest.approx(2e-6 + (lr - 2e-6) / 2) and f(warm) == lr
    assert f(6999) == lr and f(7000) == pytest.approx(0.1 * lr) and f(7999) == pytest.approx(0.1 * lr)
    assert common.get_lr(6000, 8000, warm, lr, 0.0, 0.0, (), spe) < lr  # no milestones: cosine
    args = simmim.get_args(['--data', 'synthetic'])
    assert args.schedule == 'multistep' and args.milestones == (700,) and args.warmup_lr == 2e-6
    assert simmim.get_args(['--data', 'synthetic', '--schedule', 'cosine']).milestones == ()


# ----------------------------------------------------------------------------------------------
# BEiT's block-wise masking


def beit_masking_generator(rnd, nprng, grid=(14, 14), num_masking_patches=75, min_num_patches=16, min_aspect=0.3,
                           v2=True):
    """microsoft/unilm beit2/masking_generator.py MaskingGenerator.__call__, transcribed: Python's
    `random` for the rectangles, NumPy's global-style RandomState for BEiT v2's exact-count fill."""
    height, width = grid
    mask = np.zeros(grid, np.int32)
    log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    mask_count = 0
    while mask_count < num_masking_patches:
        max_mask_patches = num_masking_patches - mask_count
        delta = 0
        for attempt in range(10):
            target_area = rnd.uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rnd.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rnd.randint(0, height - h)
                left = rnd.randint(0, width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    if v2 and mask_count < num_masking_patches:
        mask_x, mask_y = (mask == 0).nonzero()
        to_mask = nprng.choice(mask_x.shape[0], num_masking_patches - mask_count, replace=False)
        mask[mask_x[to_mask], mask_y[to_mask]] = 1
    return mask


class PythonRandom:
    """numpy Generator calls answered by Python's `random` and a RandomState, as BEiT draws them."""
    def __init__(self, seed):
        self.rnd, self.nprng = random.Random(seed), np.random.RandomState(seed)

    def random(self):
        return self.rnd.random()

    def uniform(self, a, b):
        return self.rnd.uniform(a, b)

    def integers(self, low, high):  # [low, high) = randint(low, high - 1)
        return self.rnd.randint(low, high - 1)

    def choice(self, pool, k, replace=False):
        return pool[self.nprng.choice(len(pool), k, replace=replace)]


@pytest.mark.parametrize('grid, n, v2', [((14, 14), 75, True), ((14, 14), 75, False), ((14, 14), 118, True),
                                         ((8, 8), 24, True), ((7, 10), 40, True)])
def test_block_mask_is_beits_algorithm(grid, n, v2):
    """Fed the same random draws, maskdistill.block_mask gives BEiT's masks cell for cell, including the
    rounds where fewer than 16 cells are left and BEiT's U(16, room) draws a smaller area."""
    for seed in range(150):
        want = beit_masking_generator(random.Random(seed), np.random.RandomState(seed), grid, n, v2=v2)
        got = maskdistill.block_mask(PythonRandom(seed), grid, n, exact=v2)
        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"seed {seed}")


def test_block_mask_count_is_beits():
    assert maskdistill.beit_num_masked((14, 14)) == 75 and maskdistill.beit_num_masked((8, 8)) == 24  # round(75 * 64 / 196)
    for seed in range(300):
        m = maskdistill.block_mask(np.random.default_rng(seed), (14, 14), 75)
        assert m.shape == (14, 14) and m.dtype == np.float32 and m.sum() == 75 and set(np.unique(m)) <= {0.0, 1.0}
    from PIL import Image
    out = maskdistill.train_transform(maskdistill.get_args(['--data', 'synthetic']))(np.random.default_rng(0), Image.new('RGB', (300, 200)))
    assert out['mask'].sum() == 75 and out['mask'].shape == (14, 14)
    tiny = maskdistill.get_args(TINY)  # 8 x 8 grid
    assert maskdistill.num_masked(tiny, (8, 8)) == 24
    assert maskdistill.num_masked(maskdistill.get_args(TINY + ['--mask-ratio', '0.4']), (14, 14)) == 78  # int(0.4 * 196)


def pieces(mask):
    """4-connected pieces of a mask: (number of pieces, number of single isolated cells)."""
    seen, sizes = np.zeros(mask.shape, bool), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size, seen[start] = [start], 0, True
        while stack:
            i, j = stack.pop()
            size += 1
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    stack.append((a, b))
        sizes.append(size)
    return len(sizes), sizes.count(1)


def test_pieces_counts_connected_cells():
    m = np.zeros((5, 5))
    m[0, 0] = m[0, 1] = m[2, 2] = m[4, 0] = m[3, 1] = 1  # a pair, a single, two diagonal singles
    assert pieces(m) == (4, 3)


# BEiT's algorithm (beit_masking_generator above, Python's random seeds 0.., 2000 masks of 75 on
# 14 x 14) measures: BEiT v2 0.389 isolated single cells and 1.794 pieces per mask; BEiT v1 (no
# exact count) 0.044 and 1.444 (REFERENCE: 0.39 / 1.79 and 0.04 / 1.42). Bounds: about 4 standard
# errors of a 1000-mask mean around those (per-mask std: singles 0.77 / 0.19, pieces 0.91 / 0.57).
# The earlier generator here gave 1.63 singles and 2.94 pieces.
BEIT_STATS = {True: ((0.29, 0.49), (1.68, 1.91)), False: ((0.02, 0.07), (1.37, 1.52))}


@pytest.mark.parametrize('v2', [True, False])
def test_block_mask_statistics_within_beits(v2):
    counts = np.array([pieces(maskdistill.block_mask(np.random.default_rng(s), (14, 14), 75, exact=v2)) for s in range(1000)])
    (lo_s, hi_s), (lo_p, hi_p) = BEIT_STATS[v2]
    assert lo_s <= counts[:, 1].mean() <= hi_s and lo_p <= counts[:, 0].mean() <= hi_p, counts.mean(0)


def contains_rectangle(mask, h, w):
    S = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    S[1:, 1:] = mask.cumsum(0).cumsum(1)  # integral image
    return bool(((S[h:, w:] - S[:-h, w:] - S[h:, :-w] + S[:-h, :-w]) == h * w).any())


def test_block_mask_rectangle_size_and_aspect():
    """A mask of 16 starts with one rectangle drawn from area 16 and an aspect in [0.3, 1/0.3],
    sides rounded as BEiT rounds them (12 to 16 cells); later rounds only fill what is left."""
    aspects = np.exp(np.linspace(math.log(0.3), math.log(1 / 0.3), 2001))
    allowed = {(round(math.sqrt(16 * a)), round(math.sqrt(16 / a))) for a in aspects}
    allowed = {(h, w) for h, w in allowed if h * w <= 16}
    assert min(h * w for h, w in allowed) == 12 and max(max(hw) for hw in allowed) == 7
    firsts = []
    for seed in range(300):
        m = maskdistill.block_mask(np.random.default_rng(seed), (14, 14), 16, exact=False)
        if m.any():  # else all ten attempts drew a rectangle of more than 16 cells
            firsts.append([hw for hw in allowed if contains_rectangle(m, *hw)])
            assert firsts[-1] and m.sum() <= 16, seed
    assert len(firsts) > 250
    scattered = (np.random.default_rng(0).permutation(196) < 16).reshape(14, 14)
    assert not any(contains_rectangle(scattered, *hw) for hw in allowed)  # the check rejects random cells


# ----------------------------------------------------------------------------------------------
# SimMIM's initialization and weight decay (released microsoft/SimMIM code)


def truncated_std(std):
    """Std of N(0, std) truncated at +-std: std * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))."""
    phi, mass = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))
    return std * math.sqrt(1 - 2 * phi / mass)


def test_simmim_init_as_released():
    torch.manual_seed(0)
    model = simmim.SimMIM(simmim.get_args(TINY + ['--model', 'vit_tiny', '--mask-patch-size', '8']))  # 192 wide, 12 blocks
    s = truncated_std(.02)  # 0.0108
    assert s == pytest.approx(.02 * 0.5396, rel=1e-3)
    for name, p in model.named_parameters():
        if name.endswith('.bias') and not name.startswith('head_pred'):
            assert not p.any(), name
    for i, blk in enumerate(model.blocks, 1):
        for lin, scale in [(blk.attn.qkv, 1), (blk.mlp.fc1, 1), (blk.attn.proj, math.sqrt(2 * i)), (blk.mlp.fc2, math.sqrt(2 * i))]:
            w = lin.weight
            assert w.std().item() == pytest.approx(s / scale, rel=0.03) and w.abs().max() <= .02 / scale + 1e-9
        assert (blk.ls1.gamma == 0.1).all() and (blk.ls2.gamma == 0.1).all()
        assert (blk.norm1.weight == 1).all() and not blk.norm1.bias.any()
    w = model.patch_embed.proj.weight
    assert w.std().item() == pytest.approx(s, rel=0.05) and w.abs().max() <= .02
    for tok in (model.cls_token, model.mask_token):  # 192 values each
        assert tok.std().item() == pytest.approx(s, rel=0.2) and tok.abs().max() <= .02
    assert model.pos_embed is None and not model.rel_pos_bias.relative_position_bias_table.any()
    bound = 1 / math.sqrt(192)  # head: PyTorch's default init, as the released 1x1 conv decoder
    assert model.head_pred.weight.abs().max() <= bound and model.head_pred.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_mae_family_keeps_xavier_init():
    torch.manual_seed(0)
    vit = common.VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3)
    qkv, fc2 = vit.blocks[1].attn.qkv.weight, vit.blocks[1].mlp.fc2.weight
    assert qkv.std().item() == pytest.approx(math.sqrt(2 / (192 + 576)), rel=0.03)  # xavier-uniform
    assert fc2.std().item() == pytest.approx(math.sqrt(2 / (768 + 192)), rel=0.03)  # no depth rescale
    import deepmim
    model = deepmim.DeepMIM(deepmim.get_args(TINY + ['--model', 'vit_tiny', '--taps', '6', '--decoder-dim', '64', '--decoder-heads', '2']))
    assert model.blocks[11].attn.qkv.weight.std().item() == pytest.approx(math.sqrt(2 / (192 + 576)), rel=0.03)
    assert model.blocks[11].mlp.fc2.weight.std().item() == pytest.approx(math.sqrt(2 / (768 + 192)), rel=0.03)
    assert no_decay_names(model) == {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith('.bias'))}


def no_decay_names(model):
    decay, no_decay = common.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0
    assert len(decay['params']) + len(no_decay['params']) == len([p for p in model.parameters() if p.requires_grad])
    return {names[id(p)] for p in no_decay['params']}


def test_simmim_no_weight_decay_set_as_released():
    """Released code: no decay for 1-D parameters, biases and the encoder's no_weight_decay() =
    {pos_embed, cls_token}; the mask token ([1, 1, D]) and the relative position bias table
    ([n, heads]) are decayed there (VisionTransformerForSimMIM adds nothing to the set)."""
    for flags, extra in [([], {'cls_token'}), (['--no-rel-pos-bias'], {'cls_token', 'pos_embed'})]:
        model = simmim.SimMIM(simmim.get_args(TINY + ['--mask-patch-size', '8'] + flags))
        plain = {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith('.bias')}
        assert no_decay_names(model) == plain | extra
        assert 'mask_token' not in plain | extra and any('gamma' in n for n in plain)
    assert 'rel_pos_bias.relative_position_bias_table' not in no_decay_names(simmim.SimMIM(simmim.get_args(TINY + ['--mask-patch-size', '8'])))
    assert set(maskdistill.MaskDistill.no_weight_decay) == {'cls_token', 'pos_embed'}  # BEiT v2's set
