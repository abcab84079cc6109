"""Evaluation protocols and analyses for ViT encoders: checkpoints of the five nanoMIM scripts, and
timm / DeiT / DINO / MAE / BEiT / SimMIM / OpenAI CLIP files.

Every subcommand reads --ckpt (`--format clip`: OpenAI CLIP; `--random-init`: its architecture with fresh weights,
the baseline to beat) and --data DIR (DIR/train and DIR/val class folders, or --train/--val) or --data synthetic.
Features come from the frozen encoder in eval mode, at the checkpoint's resolution unless --img-size says otherwise.

  python evaluate.py knn --ckpt out/simmim/checkpoint.pth --data /imagenet   weighted k-NN (DINO)
  python evaluate.py linear --ckpt CKPT --data /imagenet --cache-features    linear probe (MAE)
  torchrun --nproc_per_node=8 evaluate.py finetune --ckpt CKPT --data /imagenet   fine-tuning (BEiT/MAE) in the
      pretraining loop (--resume, preemption, log.jsonl); the best epoch kept in OUTPUT/finetune_best.pth
  python evaluate.py retrieval --ckpt CKPT --data /imagenet                  Recall@1 (SupMIM Tab. 4)
  python evaluate.py attention-distance --ckpt CKPT --data /imagenet         per block and head (LUT Eq. 4)
  python evaluate.py cka --ckpt CKPT --data /imagenet                        each block vs the last (DeepMIM Fig. 4)
  python evaluate.py spectrum --ckpt CKPT --data /imagenet                   of features per block (LUT Sec. 6.2.3)
  python evaluate.py reconstruct --ckpt out/simmim/checkpoint.pth --data /imagenet   PNG (SimMIM Fig. 4)
  python evaluate.py export --ckpt out/simmim/checkpoint.pth --out vit_b16.pth   the encoder under timm's names
      ('model'; timm's Beit layout with a relative position bias) and its architecture ('encoder_kwargs')
The protocols print top-1/top-5 % (Recall@1 %); the analyses write CSV tables and PNG plots to --output-dir.
On the synthetic data (CPU, a few minutes): add `--data synthetic --num-workers 2` (`linear ... --cache-features
--batch-size 256 --accum-iter 1 --epochs 30 --warmup-epochs 3 --blr 10`: LARS moves a weight matrix by about
lr / 1000 of its norm per step, so a few hundred steps need an lr near MAE's 6.4, not blr 0.1 x 256 / 256).

`reconstruct` and other methods: `--method NAME` (default: the checkpoint's 'method', else SimMIM given its head)
builds NAME.py's one VisionTransformer subclass from the checkpoint's 'args' (also `model.args`), loads it, and calls
NAME.reconstruct(model, img, mask_seed) -> (mask [B, L], 1 = masked; pred [B, 3, H, W]), img and pred normalized as
ImageNet (a method that predicts per-patch normalized pixels maps them back with each true patch's mean and variance).
"""
import argparse
import csv
import importlib
import itertools
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

import common

# ----------------------------------------------------------------------------------------------
# Arguments

def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    enc, paths, pool, baseline = (argparse.ArgumentParser(add_help=False) for _ in range(4))
    a = enc.add_argument
    a('--ckpt', required=True, help='checkpoint: ours, timm, DeiT, DINO, MAE, BEiT, SimMIM or OpenAI CLIP')
    a('--format', choices=['auto', 'timm', 'clip'], default='auto', help='auto: a ViT checkpoint, else OpenAI CLIP')
    a('--random-init', action='store_true', help="the checkpoint's architecture with fresh weights (baseline)")
    a('--num-heads', type=int, help='heads, for a bare state dict of a non-standard width (default: from the width)')
    paths.add_argument('--train', help='train class folders (default: DATA/train)')
    paths.add_argument('--val', help='val class folders (default: DATA/val)')
    data = argparse.ArgumentParser(add_help=False, parents=[paths])
    a = data.add_argument
    a('--data', help="DIR holding train/ and val/ class folders, or 'synthetic'")
    a('--img-size', type=int, help="default: the checkpoint's (pos_embed is resampled otherwise)")
    a('--batch-size', type=int, default=256, help='images per forward pass')
    a('--num-workers', type=int, default=common.default_workers())
    a('--synthetic-size', type=int, default=10000, help='--data synthetic: train images (val: a quarter, at least 100)')
    a('--seed', type=int, default=0)
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda if available, else cpu')
    a('--output-dir', default='out/eval', help='where tables, plots and images go')
    pool.add_argument('--pool', choices=['cls', 'avg'], default='cls', help='image feature: cls token or mean patch token')
    baseline.add_argument('--baseline', action='store_true', help='then with random weights (--seed) too, and the gain')

    def add(name, help, parents, **defaults):  # 'resolve': common's parser brings its own -h
        p = sub.add_parser(name, help=help, description=help, parents=parents, conflict_handler='resolve',
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(**defaults)
        return p.add_argument
    a = add('knn', "DINO's weighted k-NN on frozen features", [enc, data, pool, baseline])
    a('--k', type=int, default=20, help='neighbours (DINO)')
    a('--temperature', type=float, default=0.07, help='votes weighted exp(sim / T) (DINO)')
    add('retrieval', 'Recall@1, val queries against the train index (SupMIM Tab. 4)', [enc, data, pool, baseline])
    a = add('linear', "MAE's linear probe on the frozen encoder", [enc, data, pool], batch_size=512)  # x 32 GPUs
    a('--accum-iter', type=int, default=32, help='micro-batches per LARS step (MAE: 32 GPUs)')
    a('--epochs', type=int, default=90, help='MAE linear probe')
    a('--warmup-epochs', type=float, default=10, help='MAE linear probe')
    a('--blr', type=float, default=0.1, help='lr = blr * effective batch / 256 (MAE)')
    a('--lr', type=float, default=None, help='absolute lr (overrides --blr)')
    a('--weight-decay', type=float, default=0.0, help='MAE linear probe')
    a('--cache-features', action='store_true', help='extract features once (center crop, no augmentation) and train on '
      "them: fast; MAE's probe instead sees RandomResizedCrop + flip views")
    for name, help in (('attention-distance', 'mean attention distance per block and head (LUT Eq. 4)'),
                       ('cka', "linear CKA of each block's features with the last block's (DeepMIM Fig. 4)"),
                       ('spectrum', 'singular values of the feature covariance per block (LUT Sec. 6.2.3)')):
        a = add(name, help, [enc, data], batch_size=64)
        a('--num-images', type=int, default=5000, help='val images (a seeded random subset)')
    a('--layers', type=int, nargs='+', help='blocks to plot (default: four, the last included)')  # spectrum's
    a = add('reconstruct', 'original / masked / reconstruction PNG grid (SimMIM Fig. 4)', [data])
    a('--ckpt', required=True, help='a pretraining checkpoint of a pixel method')
    a('--method', help="script name (default: the checkpoint's, or simmim)")
    a('--num-images', type=int, default=8)
    a('--mask-seed', type=int, default=0)
    a('--out', help='PNG path (default: OUTPUT/reconstruct.png)')
    a = add('export', 'plain encoder state dict under timm names', [enc])
    a('--out', required=True, help='output .pth file')
    a('--seed', type=int, default=0, help='for --random-init')
    a = add('finetune', 'end-to-end fine-tuning with the BEiT/MAE recipe', [common.get_parser(__doc__), enc, paths],
            batch_size=128,  # x 8 GPUs = 1024; the rest is MAE's ViT-B recipe (FINETUNE.md, REFERENCE.md)
            blr=5e-4, min_lr=1e-6, epochs=100, warmup_epochs=5, weight_decay=0.05, drop_path=0.1,
            betas=(0.9, 0.999), img_size=None, output_dir='out/finetune', save_every=1)  # MAE: a checkpoint every epoch
    a('--layer-decay', type=float, default=0.65, help="layer-wise lr decay (MAE's ViT-B)")
    a('--smoothing', type=float, default=0.1, help='label smoothing')
    a('--mixup', type=float, default=0.8, help='mixup alpha (0: off)')
    a('--cutmix', type=float, default=1.0, help='cutmix alpha (0: off)')
    a('--reprob', type=float, default=0.25, help='random erasing probability')
    a('--randaug-magnitude', type=float, default=9, help="RandAugment 'rand-m9-mstd0.5-inc1'")
    a('--randaug-mstd', type=float, default=0.5)
    # Per-paper ViT-B/16 fine-tuning (all: AdamW, cosine, RandAug 9/0.5, mixup .8, cutmix 1, smoothing .1):
    #   MaskDistill Tab. 13: lr 5e-4 at batch 1024, 100 epochs, 20 warmup, layer decay 0.65, drop path .1, min lr 1e-6
    #   SimMIM Sec. 4.1.1 + 4.2: batch 2048, base lr 5e-3, 100 epochs, 10 warmup, layer decay 0.65, drop path .1
    #   DeepMIM App. A: MAE's recipe with lr 2e-4 (4e-4 for CLIP targets), layer decay 0.65 (0.6 after 800 epochs)
    #   LUT App. B Tab. D: base lr 2.5e-4 (B) / 5e-4 (S), layer decay 0.65 (B) / 0.75 (S), 100 (B) / 300 (S) epochs
    for action in sub.choices['finetune']._actions:  # --model and --patch-size are the checkpoint's
        action.help = argparse.SUPPRESS if action.dest in ('model', 'patch_size') else action.help
        action.required = action.required and action.dest != 'data'  # --train and --val do without it
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Encoders and features

def load_model(args, **overrides):
    """The --ckpt encoder built with `overrides`, --img-size and --num-heads; `.mean_std`: its input normalization."""
    if not os.path.isfile(args.ckpt):
        raise common.UsageError(f"--ckpt file not found: {args.ckpt}")
    overrides.update(img_size=getattr(args, 'img_size', None), num_heads=getattr(args, 'num_heads', None))
    vit, error, mean_std = None, None, (common.IMAGENET_MEAN, common.IMAGENET_STD)
    try:
        vit = common.build_encoder(args.ckpt, **overrides)[0] if args.format != 'clip' else None
    except common.UsageError as e:
        if args.format == 'timm':
            raise
        error = e  # auto: perhaps OpenAI CLIP; if not, this is the error to report
    if vit is None:  # OpenAI CLIP: rebuild with the overrides, then copy the weights across
        try:
            clip = common.load_clip_visual(args.ckpt)[0]
        except common.UsageError as e:
            raise (error or e) from None
        vit = common.VisionTransformer(**dict(clip.encoder_kwargs, **{k: v for k, v in overrides.items() if v is not None}))
        common.load_encoder(vit, clip.state_dict(), allow_missing=('fc_norm.', 'head.'), path=args.ckpt)
        mean_std = (common.CLIP_MEAN, common.CLIP_STD)
    if args.random_init:
        torch.manual_seed(args.seed)
        vit = common.VisionTransformer(**vit.encoder_kwargs)
    vit.mean_std, kw = mean_std, vit.encoder_kwargs
    print(f"encoder: {kw['embed_dim']} wide, {kw['depth']} blocks, patch {kw['patch_size']}, {kw['img_size']} px, "
          f"{sum(p.numel() for p in vit.parameters()) / 1e6:.1f}M params" + (' (random init)' if args.random_init else ''))
    return vit


def prepare(vit, img):  # ImageNet-normalized img in the normalization the encoder was trained with (CLIP's differs)
    return img if vit.mean_std[0] == common.IMAGENET_MEAN else common.renormalize(img, *vit.mean_std)


def dataset(args, split, transform):  # the split's images: --train/--val, DATA/split or the synthetic one
    if getattr(args, split):
        return common.ImageFolder(getattr(args, split), transform, args.seed)
    if args.data is None:
        raise common.UsageError(f"pass --data DIR (holding {split}/) or --data synthetic, or --{split} DIR")
    if args.data != 'synthetic' and not os.path.isdir(os.path.join(args.data, split)):
        raise common.UsageError(f"{os.path.join(args.data, split)} not found: --data DIR needs DIR/train and DIR/val "
                                f"class folders (or pass --{split} DIR)")
    return common.build_dataset(args, transform, split)


def datasets(args, train_transform, val_transform):
    train, val = dataset(args, 'train', train_transform), dataset(args, 'val', val_transform)
    if train.classes != val.classes:
        raise common.UsageError(f"train and val have different class folders ({len(train.classes)} vs {len(val.classes)})")
    return train, val


def loader(ds, args, shuffle=False):
    return common.make_loader(ds, args, 0, 1, shuffle=shuffle, drop_last=False)


def bf16(device):  # frozen encoders run in bf16 on GPUs, fp32 on the CPU
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')


@torch.no_grad()
def features(vit, img, pool):  # the cls token or the mean patch token (through fc_norm if the encoder pools so)
    if pool == 'cls' and not vit.num_prefix:
        raise common.UsageError("this encoder has no cls token: use --pool avg")
    with bf16(img.device):
        z = vit.forward_features(prepare(vit, img))  # [B, prefix + L, D]
    return z[:, 0] if pool == 'cls' else vit.pool(z) if vit.global_pool == 'avg' else z[:, vit.num_prefix:].mean(1)


@torch.no_grad()
def outputs(fn, data, device):  # fn(img) and the labels over a loader, concatenated on the device: [N, ...], [N]
    out, labels = zip(*[(fn(b['img']).float(), b['label']) for b in common.device_batches(data, device)])
    return torch.cat(out), torch.cat(labels)


def topk_correct(scores, labels, ks=(1, 5)):  # per k: how many rows of scores [M, C] rank the label in their top k
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices == labels[:, None]  # [M, 5]
    return torch.stack([top[:, :k].any(1).sum() for k in ks]).float()


# ----------------------------------------------------------------------------------------------
# Protocols on frozen features: k-NN, retrieval, linear probe (MAE, main_linprobe.py)

def knn_classify(train_x, train_y, test_x, num_classes, k=20, T=0.07, chunk=1024):
    """DINO's weighted k-NN: the k most cosine-similar train features vote exp(sim / T) for their labels -> [M, C]."""
    train_x, k, scores = F.normalize(train_x, dim=1), min(k, len(train_x)), []
    for q in F.normalize(test_x, dim=1).split(chunk):
        sim, idx = (q @ train_x.T).topk(k, dim=1)  # [b, k] similarities and indices of the nearest
        scores.append(torch.zeros(len(q), num_classes, device=q.device).scatter_add_(1, train_y[idx], (sim / T).exp()))
    return torch.cat(scores)


def recall_at_1(index_x, index_y, query_x, query_y, chunk=1024):
    """% of queries whose cosine-nearest index item has the query's label (SupMIM Tab. 4)."""
    index_x = F.normalize(index_x, dim=1)
    nearest = torch.cat([(q @ index_x.T).argmax(1) for q in F.normalize(query_x, dim=1).split(chunk)])  # [M]
    return 100 * (index_y[nearest] == query_y).float().mean().item()


def knn(args):  # and retrieval; --baseline: then the same on the architecture with random weights
    device, results, train = torch.device(args.device), [], None
    for random_init in (False, True) if args.baseline else (args.random_init,):
        vit = load_model(argparse.Namespace(**dict(vars(args), random_init=random_init))).to(device).eval()
        if train is None:  # the same images for the baseline
            train, val = datasets(args, *[common.eval_transform(vit.patch_embed.grid[0] * vit.patch_size)] * 2)
        (xtr, ytr), (xva, yva) = [outputs(lambda img: features(vit, img, args.pool), loader(ds, args), device)
                                  for ds in (train, val)]
        if args.command == 'retrieval':
            results.append(recall_at_1(xtr, ytr, xva, yva))
            print(f"Recall@1 ({args.pool}): {results[-1]:.2f}%  ({len(yva)} queries / {len(ytr)} index)")
        else:
            scores = knn_classify(xtr, ytr, xva, len(train.classes), args.k, args.temperature)  # [M, C]
            top1, top5 = (100 * topk_correct(scores, yva) / len(yva)).tolist()
            results.append(top1)
            print(f"k-NN (k={args.k}, T={args.temperature:g}, {args.pool}): top-1 {top1:.2f}%  top-5 {top5:.2f}%  "
                  f"({len(ytr)} train / {len(yva)} val)")
    if args.baseline:
        print(f"checkpoint {results[0]:.2f}% vs random init {results[1]:.2f}%: {results[0] - results[1]:+.2f} points")


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as MAE's: u = g + wd * p times eta * ||p|| / ||u|| (1-D: u = g), heavy-ball momentum."""
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in (p for p in g['params'] if p.grad is not None):
                u = p.grad
                if p.ndim > 1:
                    u = u.add(p, alpha=g['weight_decay'])
                    pn, un = p.norm(), u.norm()
                    u = u * torch.where((pn > 0) & (un > 0), g['trust_coefficient'] * pn / un, torch.ones_like(pn))
                mu = self.state[p].setdefault('mu', torch.zeros_like(p))
                p.add_(mu.mul_(g['momentum']).add_(u), alpha=-g['lr'])


def linear(args):
    device = torch.device(args.device)
    vit = load_model(args).to(device).eval()
    size, fn = vit.patch_embed.grid[0] * vit.patch_size, lambda img: features(vit, img, args.pool)
    augment = lambda rng, img: {'img': common.to_tensor(common.hflip(rng, common.random_resized_crop(rng, img, size)))}  # noqa: E731
    train, val = datasets(args, common.eval_transform(size) if args.cache_features else augment, common.eval_transform(size))
    (xva, yva), train_loader = outputs(fn, loader(val, args), device), common.make_loader(train, args, 0, 1)
    xtr, ytr = outputs(fn, loader(train, args), device) if args.cache_features else (None, None)
    eff_batch = args.batch_size * args.accum_iter
    if (steps_per_epoch := len(train) // eff_batch) == 0:
        raise common.UsageError(f"{len(train)} train images give no step at --batch-size {args.batch_size} x "
                                f"--accum-iter {args.accum_iter}: lower them")
    args.lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    print(f"lr {args.lr:.3g} = blr {args.blr:g} x batch {eff_batch} / 256 | {total} LARS steps, {warmup} warmup")
    torch.manual_seed(args.seed)  # the head's init: the same probe for the same --seed
    head = nn.Linear(xva.shape[1], len(train.classes))
    nn.init.trunc_normal_(head.weight, std=0.01)  # MAE: trunc_normal(.01), bias 0, after a BatchNorm without affine,
    nn.init.zeros_(head.bias)  # a per-feature standardization that the badly scaled MIM features need
    head = nn.Sequential(nn.BatchNorm1d(xva.shape[1], affine=False, eps=1e-6), head).to(device).train()
    opt = LARS(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for epoch in range(args.epochs):
        if args.cache_features:
            order = torch.randperm(len(ytr), generator=gen, device=device)[:steps_per_epoch * eff_batch]
            micro = ((xtr[i], ytr[i]) for i in order.split(args.batch_size))
        else:
            train_loader.sampler.set_epoch(epoch)
            micro = ((fn(b['img']).float(), b['label']) for b in common.device_batches(train_loader, device))
        loss_sum = 0.0
        for i, (x, y) in zip(range(steps_per_epoch * args.accum_iter), micro):
            opt.param_groups[0]['lr'] = common.get_lr(epoch * steps_per_epoch + i // args.accum_iter, total, warmup, args.lr, 0.0)
            loss = F.cross_entropy(head(x), y)
            (loss / args.accum_iter).backward()
            loss_sum += loss.detach()
            if (i + 1) % args.accum_iter == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            print(f"ep {epoch + 1:3d}/{args.epochs} | loss {loss_sum.item() / (steps_per_epoch * args.accum_iter):.4f}")
    with torch.no_grad():
        top1, top5 = (100 * topk_correct(head.eval()(xva), yva) / len(yva)).tolist()
    print(f"linear probe ({args.pool}, {args.epochs} epochs{', cached features' if args.cache_features else ''}): "
          f"top-1 {top1:.2f}%  top-5 {top5:.2f}%  ({len(train)} train / {len(yva)} val)")


# ----------------------------------------------------------------------------------------------
# Fine-tuning (BEiT / MAE, main_finetune.py)

def layer_decay_groups(model, weight_decay, layer_decay):
    """MAE's param_groups_lrd: lr_scale = layer_decay ** (depth + 1 - layer_id), layer_id 0 for the embeddings
    (and CLIP's norm_pre, as FT-CLIP), i + 1 for blocks.i, depth + 1 for the rest (as BEiT's code: also the shared
    relative position bias). No weight decay on 1-D parameters, cls_token, pos_embed, the bias table (BEiT)."""
    num_layers, groups = model.depth + 1, {}
    for name, p in model.named_parameters():
        embedding = name.startswith(('cls_token', 'pos_embed', 'patch_embed.', 'norm_pre.'))
        i = 0 if embedding else int(name.split('.')[1]) + 1 if name.startswith('blocks.') else num_layers
        no_wd = p.ndim == 1 or name.endswith(('cls_token', 'pos_embed', 'bias_table'))
        groups.setdefault((i, no_wd), {'params': [], 'weight_decay': 0.0 if no_wd else weight_decay,
                                       'lr_scale': layer_decay ** (num_layers - i)})['params'].append(p)
    return list(groups.values())


# timm's RandAugment 'rand-m9-mstd0.5-inc1' and RandomErasing, as MAE and BEiT fine-tune
BICUBIC, GRAY = Image.Resampling.BICUBIC, (128, 128, 128)  # GRAY: fill for pixels uncovered by geometric ops


def _affine(img, coeffs):  # PIL maps output -> input coords; fixed bicubic, gray fill (timm randomizes these)
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, BICUBIC, fillcolor=GRAY)


def _enhance(cls):  # timm '_enhance_increasing': factor 1 +- 0.9*m/10, floored at 0.1 so it never degenerates
    return lambda im, m, s: cls(im).enhance(max(0.1, 1 + s * 0.9 * m / 10))


def _lut(im, f):  # the 8-bit table f(0), ..., f(255) on every band
    return im.point([f(i) for i in range(256)] * len(im.getbands()))


# name -> f(img, magnitude in [0, 10], sign in {-1, +1}); "Increasing" = larger m is stronger
RA_OPS = {
    'AutoContrast': lambda im, m, s: ImageOps.autocontrast(im),
    'Equalize': lambda im, m, s: ImageOps.equalize(im),
    'Invert': lambda im, m, s: ImageOps.invert(im),
    'Rotate': lambda im, m, s: im.rotate(s * 30 * m / 10, BICUBIC, fillcolor=GRAY),
    # keeps 4 - int(m / 10 * 4) bits; own table: Pillow >= 12 rejects bits=0, which timm reaches at m=10 (all black)
    'PosterizeIncreasing': lambda im, m, s: _lut(im, lambda i: i & ~(2 ** (4 + int(m / 10 * 4)) - 1)),
    'SolarizeIncreasing': lambda im, m, s: ImageOps.solarize(im, 256 - int(m / 10 * 256)),
    'SolarizeAdd': lambda im, m, s: _lut(im, lambda i: min(255, i + int(m / 10 * 110)) if i < 128 else i),  # dark half
    'ColorIncreasing': _enhance(ImageEnhance.Color),
    'ContrastIncreasing': _enhance(ImageEnhance.Contrast),
    'BrightnessIncreasing': _enhance(ImageEnhance.Brightness),
    'SharpnessIncreasing': _enhance(ImageEnhance.Sharpness),
    'ShearX': lambda im, m, s: _affine(im, (1, s * 0.3 * m / 10, 0, 0, 1, 0)),
    'ShearY': lambda im, m, s: _affine(im, (1, 0, 0, s * 0.3 * m / 10, 1, 0)),
    'TranslateXRel': lambda im, m, s: _affine(im, (1, 0, s * 0.45 * m / 10 * im.size[0], 0, 1, 0)),
    'TranslateYRel': lambda im, m, s: _affine(im, (1, 0, 0, 0, 1, s * 0.45 * m / 10 * im.size[1])),
}


def rand_augment(rng, img, num_ops=2, magnitude=9, mstd=0.5):  # timm's: num_ops draws, each w.p. 0.5, m ~ N(9, 0.5)
    for i in rng.integers(len(RA_OPS), size=num_ops):
        if rng.random() < 0.5:  # timm's per-op prob 0.5 ('p' default)
            m = float(np.clip(rng.normal(magnitude, mstd), 0, 10)) if mstd > 0 else magnitude
            img = list(RA_OPS.values())[i](img, m, 1 if rng.random() < 0.5 else -1)  # sign: timm '_randomly_negate'
    return img


def erasing_box(rng, size, p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)):
    """timm RandomErasing's box (MAE fine-tune: reprob 0.25, mode 'pixel', one box) in an image of `size`
    (H, W): int64 [4] (top, left, h, w), zeros if not erased. `erase` fills it on the device (uint8 travels)."""
    H, W = size
    if rng.random() < p:
        for _ in range(10):
            area = rng.uniform(*scale) * H * W
            r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))  # log-uniform: r and 1/r equally likely
            h, w = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if h < H and w < W:
                return np.array([rng.integers(H - h + 1), rng.integers(W - w + 1), h, w], np.int64)
    return np.zeros(4, np.int64)


def erase(x, box):  # each image's box [B, 4] (erasing_box) filled with N(0, 1) noise, the scale of the normalized x
    rows, cols = torch.arange(x.shape[-2], device=x.device), torch.arange(x.shape[-1], device=x.device)
    top, left, h, w = (v[:, None] for v in box.unbind(1))  # [B, 1] each
    inside = ((rows >= top) & (rows < top + h))[:, None, :, None] & ((cols >= left) & (cols < left + w))[:, None, None, :]
    return torch.where(inside, torch.randn_like(x), x)  # [B, C, H, W]


def soft_target_cross_entropy(logits, target):  # averaged over the batch
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class Finetune(common.VisionTransformer):
    """Encoder and classifier, `loss, logs = model(batch)`: timm's RandomErasing, Mixup/CutMix, soft-target CE (MAE)."""
    def __init__(self, vit, args):
        super().__init__(**vit.encoder_kwargs)
        self.load_state_dict(vit.state_dict())
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: start near zero logits
        nn.init.zeros_(self.head.bias)
        self.mean_std, self.mixup, self.cutmix, self.smoothing = vit.mean_std, args.mixup, args.cutmix, args.smoothing

    @torch.compiler.disable  # host-side random numbers: keep them out of the compiled graph
    def mix(self, img, labels):  # Mixup/CutMix, label-smoothed soft targets [B, C] (alphas 0: smoothed one-hots)
        rng = np.random.default_rng(int(torch.randint(2 ** 62, ())))  # CPU generator, seeded per step by the loop
        return common.mixup_cutmix(rng, img, labels, self.head.out_features, self.mixup, self.cutmix, label_smoothing=self.smoothing)

    def logits(self, img):  # img ImageNet-normalized
        return super().forward(prepare(self, img))

    def forward(self, batch):
        img, target = self.mix(erase(batch['img'], batch['erase']), batch['label'])  # noise N(0, 1): normalized
        return soft_target_cross_entropy(self.logits(img), target), {}


def finetune(args):
    rank, world, device = common.setup(args)

    def augment(rng, img):  # timm's create_transform as MAE fine-tunes: crop, flip, RandAugment; RandomErasing's box
        img = common.hflip(rng, common.random_resized_crop(rng, img, args.img_size))
        img = rand_augment(rng, img, 2, args.randaug_magnitude, args.randaug_mstd)
        return {'img': common.to_tensor(img), 'erase': erasing_box(rng, (args.img_size,) * 2, args.reprob)}
    # args.img_size (None: the checkpoint's) is read when the transforms run, after load_model
    train, val = datasets(args, augment, lambda rng, img: common.eval_transform(args.img_size)(rng, img))
    model = Finetune(load_model(args, global_pool='avg', num_classes=len(train.classes), drop_path_rate=args.drop_path), args)
    args.img_size = model.patch_embed.grid[0] * model.patch_size
    val_loader = common.make_loader(val, args, rank, world, shuffle=False, drop_last=False)  # drops < world images
    best_path, best = os.path.join(args.output_dir, 'finetune_best.pth'), {'top1': -1.0, 'top5': 0.0, 'epoch': 0}
    if os.path.isfile(best_path) and os.path.isfile(os.path.join(args.output_dir, 'checkpoint.pth')):  # --resume
        best.update({k: v for k, v in common.read_checkpoint(best_path).items() if k in best})

    def evaluate(epoch):  # top-1 / top-5 % on val, each rank its share, summed across ranks
        logits, labels = outputs(model.eval().logits, val_loader, device)
        hits = torch.cat([topk_correct(logits, labels), logits.new_tensor([len(labels)])])  # top-1, top-5, images
        if world > 1:
            dist.all_reduce(hits)
        top1, top5 = (100 * hits[:2] / hits[2]).tolist()
        if top1 > best['top1']:
            best.update(top1=top1, top5=top5, epoch=epoch)
            if rank == 0:
                common.save_checkpoint({'model': model.state_dict(), 'encoder_kwargs': model.encoder_kwargs,
                                        'args': vars(args), **best}, best_path)
        return {'top1': top1, 'top5': top5, 'best_top1': best['top1']}

    if rank == 0:
        print(f"layer decay {args.layer_decay} | {len(train.classes)} classes, {len(train)} train / {len(val)} val images")
    common.train(args, model, train, layer_decay_groups(model, args.weight_decay, args.layer_decay), evaluate)
    if rank == 0:
        print(f"fine-tune: best top-1 {best['top1']:.2f}%  top-5 {best['top5']:.2f}%  (epoch {best['epoch']}) -> {best_path}")


# ----------------------------------------------------------------------------------------------
# Analyses: attention distance, CKA, spectrum; their tables and plots (PIL only)

def attention_distance(attn, grid, patch_size, num_prefix=1):
    """LUT Eq. 4 / ViT Fig. 7: sum_k a_qk ||c_q - c_k|| (c: patch centres, px) averaged over queries q -> [B, H]. With
    the cls row and column dropped and rows renormalized: the distance of what a query attends to besides the cls
    token (LUT's units: divide by img size)."""
    a = attn[:, :, num_prefix:, num_prefix:].float()
    a = a / a.sum(-1, keepdim=True)  # [B, H, L, L]
    centres = torch.cartesian_prod(torch.arange(grid[0]), torch.arange(grid[1])).float().to(a.device) * patch_size
    return (a * torch.cdist(centres, centres)).sum(-1).mean(-1)  # [B, H]


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019) of centred x [n, d1], y [n, d2]: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()


def spectrum(x):
    """Singular values of the feature covariance of x [n, d] as fractions of their sum, the first min(n - 1, d)
    (its rank at most). LUT takes the n x n covariance: its nonzero singular values are this d x d one's."""
    x = x.double() - x.double().mean(0)
    s = torch.linalg.svdvals(x.T @ x / (len(x) - 1))[:len(x) - 1]
    return s / s.sum()


def attention_maps(attn, x, bias=None):  # the probabilities [B, H, N, N] that common.Attention's forward uses
    q, k, _, bias = attn.qkv_bias(x, bias)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, N, N]
    return (scores if bias is None else scores + bias).softmax(-1)


def block_outputs(vit, img, attention=False):  # [B, depth, H] attention distances, else [B, depth, D] mean patch tokens
    with bf16(img.device):
        x, bias, out = vit.add_cls(vit.add_pos(vit.patch_embed(prepare(vit, img)))), vit.attn_bias(), []
        for blk in vit.blocks:
            attn = attention_maps(blk.attn, blk.norm1(x), bias) if attention else None
            x = blk(x, bias)
            out.append(x[:, vit.num_prefix:].mean(1) if attn is None else
                       attention_distance(attn, vit.patch_embed.grid, vit.patch_size, vit.num_prefix))
    return torch.stack(out, 1)


def analysis(args):  # attention-distance, cka, spectrum on --num-images random val images (--seed): CSV and PNG
    device = torch.device(args.device)
    vit = load_model(args).to(device).eval()
    val = dataset(args, 'val', common.eval_transform(vit.patch_embed.grid[0] * vit.patch_size))
    batches = itertools.islice(loader(val, args, shuffle=True), math.ceil(args.num_images / args.batch_size))
    attention, spectra = args.command == 'attention-distance', args.command == 'spectrum'
    f, _ = outputs(lambda img: block_outputs(vit, img, attention), batches, device)
    f, depth, blocks = f[:args.num_images].cpu(), f.shape[1], list(range(1, f.shape[1] + 1))  # f [N, depth, ...]
    os.makedirs(args.output_dir, exist_ok=True)
    if attention:
        d, heads = f.mean(0), f.shape[2]  # [depth, H], averaged over images
        header = ['block', *[f'head{h}' for h in range(heads)], 'mean']
        rows = [[i, *v.tolist(), v.mean().item()] for i, v in zip(blocks, d)]
        series = [('heads', [i for i in blocks for _ in range(heads)], d.flatten().tolist(), 'dots'),
                  ('mean', blocks, d.mean(1).tolist(), 'line')]
        labels = 'block', 'mean attention distance (px)', f'attention distance, {depth} blocks x {heads} heads'
    elif not spectra:  # CKA
        values = [linear_cka(f[:, i], f[:, -1]) for i in range(depth)]
        header, rows = ['block', 'cka_with_last'], [[i, v] for i, v in zip(blocks, values)]
        series = [('CKA with the last block', blocks, values, 'line')]
        labels = 'block', 'linear CKA', f'CKA with block {depth} ({len(f)} images)'
    else:
        layers = args.layers or sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)})
        if not all(1 <= i <= depth for i in layers):
            raise common.UsageError(f"--layers must be between 1 and {depth}")
        s = {i: spectrum(f[:, i - 1]) for i in layers}
        rank = {i: math.exp(-(v * v.clamp_min(1e-30).log()).sum().item()) for i, v in s.items()}  # exp(entropy)
        print(' | '.join(f"block {i}: effective rank {rank[i]:.1f}, top-1 share {s[i][0]:.3f}" for i in layers))
        header = ['index', *[f'block{i}' for i in layers]]
        rows = [[j + 1, *[s[i][j].item() for i in layers]] for j in range(len(s[layers[0]]))]
        series = [(f'block {i}', list(range(1, len(v) + 1)), v.clamp_min(1e-12).tolist(), 'line') for i, v in s.items()]
        labels = 'singular value index', 'normalized singular value', f'feature covariance spectrum ({len(f)} images)'
    report(args, header, rows, series, *labels, logy=spectra, show=10 if spectra else None)


def report(args, header, rows, series, xlabel, ylabel, title, logy=False, show=None):
    """Rows printed (the first `show`) and saved to OUTPUT/COMMAND.csv; series (label, xs, ys, kind) plotted to .png."""
    path = os.path.join(args.output_dir, args.command.replace('-', '_'))
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in [header] + rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    for r in cells[:None if show is None else show + 1]:
        print('  '.join(c.rjust(w) for c, w in zip(r, widths)))
    with open(path + '.csv', 'w', newline='') as file:
        csv.writer(file).writerows([header] + rows)
    print(f"-> {path}.csv")
    W, H, (L, R, T, B) = 760, 480, (80, 190, 50, 60)
    palette = '#1f77b4 #ff7f0e #2ca02c #d62728 #9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf'.split()  # tab10
    try:
        f, big = ImageFont.load_default(size=14), ImageFont.load_default(size=16)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        f = big = ImageFont.load_default()

    def ticks(lo, hi, n):  # about n round-numbered ticks (steps 1, 2 or 5 x 10^k) inside [lo, hi]
        step = 10 ** math.floor(math.log10((hi - lo) / n))
        step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
        return [round(k * step, 9) for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
    ty = math.log10 if logy else float
    xs, ys = [x for s in series for x in s[1]], [ty(y) for s in series for y in s[2]]
    x0, x1, pad = min(xs), max(xs) + (max(xs) == min(xs)), 0.05 * (max(ys) - min(ys) or 1)
    y0, y1 = min(ys) - pad, max(ys) + pad
    px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    py = lambda y: H - B - (y - y0) / (y1 - y0) * (H - T - B)  # noqa: E731
    d = ImageDraw.Draw(img := Image.new('RGB', (W, H), 'white'))
    for x in ticks(x0, x1, 8):
        d.line([(px(x), H - B), (px(x), H - B + 5)], fill='black')
        d.text((px(x), H - B + 8), f"{x:g}", fill='black', font=f, anchor='mt')
    for y in ticks(y0, y1, 6):  # log axis: labelled 10^y
        d.line([(L, py(y)), (W - R, py(y))], fill=(230, 230, 230))
        d.text((L - 8, py(y)), f"{10 ** y:.2g}" if logy else f"{y:g}", fill='black', font=f, anchor='rm')
    d.rectangle([L, T, W - R, H - B], outline='black')
    for i, (label, sx, sy, kind) in enumerate(series):
        color, pts, ly = palette[i % len(palette)], [(px(x), py(ty(y))) for x, y in zip(sx, sy)], T + 10 + 22 * i
        if kind == 'line' and len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for x, y in pts if kind == 'dots' or len(pts) < 30 else []:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.line([(W - R + 15, ly), (W - R + 40, ly)], fill=color, width=3)  # legend
        d.text((W - R + 48, ly), label, fill='black', font=f, anchor='lm')
    d.text(((L + W - R) / 2, 16), title, fill='black', font=big, anchor='mm')
    d.text((8, T - 10), ylabel, fill='black', font=f, anchor='ls')
    d.text(((L + W - R) / 2, H - 18), xlabel, fill='black', font=f, anchor='mm')
    img.save(path + '.png')
    print(f"-> {path}.png")


# ----------------------------------------------------------------------------------------------
# Reconstructions; export to timm

def reconstruction_grid(img, mask, pred, patch_size):
    """uint8 [B*H, 3*W, 3]: per image, original | masked patches grey | prediction in the masked
    patches pasted on the visible ones. img, pred: ImageNet-normalized [B, 3, H, W]; mask [B, L]."""
    m = F.interpolate(mask.reshape(len(img), 1, img.shape[2] // patch_size, -1).float(), scale_factor=patch_size)
    orig, rec = (common.unnormalize(x).clamp(0, 1) for x in (img, pred))
    rows = torch.cat([orig, orig * (1 - m) + 0.5 * m, orig * (1 - m) + rec * m], 3)  # [B, 3, H, 3W]
    return (torch.cat(list(rows), 1).permute(1, 2, 0) * 255).round().byte().cpu().numpy()


@torch.no_grad()
def reconstruct(args):
    ckpt = common.read_checkpoint(args.ckpt)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('args'), dict) or 'model' not in ckpt:
        raise common.UsageError(f"{args.ckpt} is not a pretraining checkpoint of a nanoMIM script (no 'model' and 'args')")
    simmim_like = 'head_pred.weight' in ckpt['model'] and 'mask_patch_size' in ckpt['args']
    method = args.method or ckpt.get('method') or ('simmim' if simmim_like else None)
    here = os.path.dirname(os.path.abspath(__file__))
    if not method or not method.isidentifier() or not os.path.isfile(os.path.join(here, f'{method}.py')):
        raise common.UsageError(f"cannot tell which script wrote {args.ckpt} ({method}): pass --method NAME for NAME.py next to evaluate.py")
    module = importlib.import_module(method)
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, common.VisionTransformer)
               and c.__module__ == module.__name__]
    if not hasattr(module, 'reconstruct') or len(classes) != 1:
        raise common.UsageError(f"{method}.py defines no reconstruct(model, img, mask_seed) (or no single model class): "
                                "see the contract in evaluate.py's docstring")
    model = classes[0](argparse.Namespace(**ckpt['args']))
    missing, unexpected = model.load_state_dict(ckpt['model'], strict=False)
    if unexpected or [k for k in missing if not k.startswith(tuple(getattr(model, 'frozen_prefixes', ())))]:
        raise common.UsageError(f"{args.ckpt} does not match {method}.py's model (first: {(unexpected + missing)[0]})")
    device, model.args, args.batch_size = torch.device(args.device), argparse.Namespace(**ckpt['args']), args.num_images
    val = dataset(args, 'val', common.eval_transform(model.patch_embed.grid[0] * model.patch_size))
    img = common.to_device(next(iter(loader(val, args, shuffle=True))), device)['img']
    mask, pred = module.reconstruct(model.to(device).eval(), img, args.mask_seed)
    grid = reconstruction_grid(img, mask, pred.float(), model.patch_size)
    out = args.out or os.path.join(args.output_dir, 'reconstruct.png')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    Image.fromarray(grid).save(out)
    print(f"{method}: {len(img)} images x (original | masked {mask.float().mean().item():.0%} | reconstruction) -> {out} "
          f"({grid.shape[1]}x{grid.shape[0]} px)")


def timm_model(kw):
    """The timm construction of the encoder kw, as Python text: Beit with a relative position bias, else
    VisionTransformer; timm.create_model where timm has the model by name. None if timm has no such model."""
    beit = bool(kw['rel_pos_bias'])
    if not kw['patch_bias'] and not kw['pre_norm'] or beit and (kw['pre_norm'] or not kw['class_token'] or kw['act'] != 'gelu'):
        return None
    arch = {k: kw[k] for k in ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio')}
    rest = dict(num_classes=kw['num_classes'], global_pool=kw['global_pool'], init_values=kw['init_values'])
    if beit:
        rest.update(use_abs_pos_emb=kw['pos_embed'] != 'none', use_rel_pos_bias=kw['rel_pos_bias'] == 'block',
                    use_shared_rel_pos_bias=kw['rel_pos_bias'] is True)
    else:
        rest.update(class_token=kw['class_token'], pos_embed='none' if kw['pos_embed'] == 'none' else 'learn',
                    pre_norm=kw['pre_norm'], **({'act_layer': 'quick_gelu'} if kw['act'] == 'quick_gelu' else {}))
        if not kw['class_token'] and kw['global_pool'] == 'token':  # no cls token (SupMIM): the mean of the normed tokens
            rest.update(global_pool='avg', fc_norm=False)
    args = [f"{k}={v!r}" for k, v in rest.items()]
    if kw['norm_eps'] != 1e-6:  # timm's default
        args.append(f"norm_layer=functools.partial(torch.nn.LayerNorm, eps={kw['norm_eps']!r})")
    arch_of = {v[:4]: (n, v[4 + beit].split()) for n, v in common.MODELS.items()}  # timm's names of our sizes
    size, names = arch_of.get((kw['embed_dim'], kw['depth'], kw['num_heads'], kw['mlp_ratio']), (None, []))
    if f"patch{kw['patch_size']}_{kw['img_size']}" in names:
        size = size.replace('vit_', 'beit_') if beit else size
        return f"timm.create_model('{size}_patch{kw['patch_size']}_{kw['img_size']}', {', '.join(args)})"
    cls = 'timm.models.beit.Beit' if beit else 'timm.models.vision_transformer.VisionTransformer'
    return f"{cls}({', '.join([f'{k}={v!r}' for k, v in arch.items()] + args)})"


def to_beit(sd):
    """Our names -> timm Beit's: ls1/ls2.gamma -> gamma_1/gamma_2, the qkv bias -> q_bias, v_bias. The
    k bias is dropped: it adds q.b_k to every score of a query alike, which the softmax cancels."""
    out = {}
    for k, v in sd.items():
        for beit, ours in common.BEIT_NAMES:
            k = k.replace(ours, beit)
        out[k] = v
        if k.endswith('.attn.qkv.bias'):
            out[k[:-8] + 'q_bias'], _, out[k[:-8] + 'v_bias'] = out.pop(k).chunk(3)
    return out


def export(args):
    vit = load_model(args)
    kw, build = vit.encoder_kwargs, timm_model(vit.encoder_kwargs)
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}  # encoder only: method parts were dropped
    sd = to_beit(sd) if kw['rel_pos_bias'] else sd
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    common.save_checkpoint({'model': sd, 'encoder_kwargs': kw, 'timm': build}, args.out)
    print(f"wrote {args.out}: {len(sd)} tensors under 'model' in timm's {'Beit' if kw['rel_pos_bias'] else 'ViT'} layout, "
          f"and 'encoder_kwargs'. Here: common.VisionTransformer(**{kw})")
    print(f"timm: model = {build}\n      model.load_state_dict(torch.load({args.out!r})['model'])" if build
          else "timm: no timm model has this architecture")


# ----------------------------------------------------------------------------------------------
# Main

COMMANDS = {'knn': knn, 'retrieval': knn, 'linear': linear, 'finetune': finetune, 'attention-distance': analysis,
            'cka': analysis, 'spectrum': analysis, 'reconstruct': reconstruct, 'export': export}


def main(argv=None):
    args = get_args(argv)
    COMMANDS[args.command](args)


if __name__ == '__main__':
    common.run(main)
