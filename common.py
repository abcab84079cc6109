"""Shared mechanics of the five nanoMIM scripts: the ViT, checkpoints, masking, data, and the training loop.

Method logic lives in the method scripts (simmim.py, maskdistill.py, deepmim.py, lut.py, supmim.py).
Conventions used everywhere:
  - masks are 1 = masked, 0 = visible;
  - images leave the data pipeline as uint8 [B, 3, H, W] and are normalized on the device;
  - checkpoints hold the encoder under timm's ViT names at the top level of 'model'.
"""
import argparse
import atexit
import colorsys
import errno
import glob
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.flop_counter as flop_counter
from torch.nn.attention import SDPBackend, sdpa_kernel
from PIL import Image, ImageDraw
from tqdm import tqdm


class UsageError(Exception):  # bad input from the user: one line on stderr, exit status `code`
    code, agreed = 2, False  # agreed: raised by every rank at once, so rank 0 alone prints it


class NonFiniteLoss(UsageError):
    code, agreed = 3, True


class Stopped(UsageError):  # a stop asked for by a signal (preemption), the checkpoint saved: not a failure
    code, agreed = 0, True


# SLURM sends SIGTERM (or SIGUSR1 with --signal) to every process of the job; torchrun forwards
# what its --signals-to-handle lists; SIGINT is Ctrl-C and SIGHUP a closed terminal
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
STOP_REQUESTS = []  # signal numbers received; the loop stops at a step boundary all ranks agree on


def request_stop(signum=None, frame=None):
    STOP_REQUESTS.append(signum)


def run(main):
    """Call main(); a UsageError, or a failed write (disk full, read-only), ends it with one line on stderr."""
    try:
        main()
    except UsageError as e:
        for sig in STOP_SIGNALS:  # exit with our code: torchrun's signal to the other ranks must not replace it
            signal.signal(sig, signal.SIG_IGN)
        msg = str(e).strip().splitlines()[-1].split('UsageError: ')[-1]  # from a DataLoader worker: its last line
        if not e.agreed or int(os.environ.get('RANK', 0)) == 0:
            print(f"error: {msg}" if e.code else msg, file=sys.stderr)
        sys.exit(e.code)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        print(f"error: cannot write {e.filename or 'to --output-dir'}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Vision Transformer with timm's parameter names (a checkpoint's encoder loads into timm as is)

# ViT sizes (ViT paper Tab. 1; tiny and small from DeiT): width, depth, heads, MLP ratio, then the models timm
# has of the size by the ends of their names: 'patch16_224' of vit_base is timm's vit_base_patch16_224 and, in
# the last column, its Beit beit_base_patch16_224
MODELS = {
    'vit_pico': (96, 4, 3, 4.0, '', ''),  # not a paper size: for the CPU quick start and the tests
    'vit_tiny': (192, 12, 3, 4.0, 'patch16_224 patch16_384', ''),
    'vit_small': (384, 12, 6, 4.0, 'patch8_224 patch16_224 patch16_384 patch32_224 patch32_384', ''),
    'vit_base': (768, 12, 12, 4.0, 'patch8_224 patch16_224 patch16_384 patch32_224 patch32_384',
                 'patch16_224 patch16_384'),
    'vit_large': (1024, 24, 16, 4.0, 'patch14_224 patch16_224 patch16_384 patch32_224 patch32_384',
                  'patch16_224 patch16_384 patch16_512'),
    'vit_huge': (1280, 32, 16, 4.0, 'patch14_224', '')}
HEADS = {width: heads for width, _, heads, *_ in MODELS.values()}  # of a state dict without architecture


def model_size(name):  # -> (width, depth, heads)
    if name not in MODELS:
        raise UsageError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    return MODELS[name][:3]


def sincos_pos_embed(dim, grid_h, grid_w, cls_token=False):
    """MAE's fixed 2D sin-cos table [(1 +) h*w, dim]. The first half of the channels encodes the
    column, the second the row, each as [sin, cos] at frequencies 1 / 10000^(k / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h).double(), torch.arange(grid_w).double(), indexing='ij')
    table = torch.cat([f(pos.reshape(-1, 1) * omega) for pos in (cols, rows) for f in (torch.sin, torch.cos)], 1)
    return torch.cat([torch.zeros(1, dim), table.float()]) if cls_token else table.float()


def resample_pos_embed(pos_embed, grid, num_prefix=1):  # [1, prefix + h*w, D] to a new (h, w) grid, as MAE's
    prefix, table = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(math.sqrt(table.shape[1]))
    table = table.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, D, h, w]
    table = F.interpolate(table.float(), size=grid, mode='bicubic', align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)  # [1, h'*w', D]
    return torch.cat([prefix, table.to(pos_embed.dtype)], 1)


def drop_path(x, p, training):  # stochastic depth: drop a sample's whole residual branch with probability p
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class QuickGELU(nn.Module):  # CLIP's activation
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def add_rel_pos_bias(m, grid, num_heads):
    """BEiT's relative position bias on module m, under timm Beit's names: a table of a learned value per head
    for each 2D offset between patches, (2h - 1)(2w - 1) of them, then cls->patch, patch->cls and cls->cls;
    and the [N, N] index into it (N = 1 + h*w, cls first)."""
    h, w = grid
    n = (2 * h - 1) * (2 * w - 1)
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')).flatten(1)  # [2, h*w]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, h*w, h*w]
    index = torch.full((h * w + 1, h * w + 1), n + 2)
    index[1:, 1:] = (rel[0] + h - 1) * (2 * w - 1) + rel[1] + w - 1
    index[0, 1:], index[1:, 0] = n, n + 1
    m.relative_position_bias_table = nn.Parameter(torch.zeros(n + 3, num_heads))
    m.register_buffer('relative_position_index', index, persistent=False)


class RelativePositionBias(nn.Module):  # one shared by all blocks (BEiT's pretraining)
    def __init__(self, grid, num_heads):
        super().__init__()
        add_rel_pos_bias(self, grid, num_heads)

    def forward(self):  # -> [H, N, N]
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, rel_pos_grid=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)  # rows are q; k; v, heads contiguous within each
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = None
        if rel_pos_grid:  # fine-tuned BEiT: a relative position bias of the block's own
            add_rel_pos_bias(self, rel_pos_grid, num_heads)

    def qkv_bias(self, x, bias):  # -> q, k, v [B, H, N, C/H] and the bias [1, H, N, N]: the block's own, given, None
        B, N, C = x.shape
        if self.relative_position_bias_table is not None:
            bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)[None]
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v, bias

    def forward(self, x, bias=None):  # [B, N, C]; bias: the shared relative position bias [1, H, N, N] or None
        q, k, v, bias = self.qkv_bias(x, bias)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).flatten(2))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, init_values, drop_path, act, eps, rel_pos_grid=None):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, num_heads, rel_pos_grid)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        hidden = int(dim * mlp_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=act, fc2=nn.Linear(hidden, dim)))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, bias=None):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), bias)), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, dim, bias=True):
        super().__init__()
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size, bias=bias)

    def forward(self, x):  # [B, 3, H, W] -> [B, L, D]
        return self.proj(x).flatten(2).transpose(1, 2)


def beit_trunc_normal_(t, std=.02):  # N(0, std) truncated at +-std: BEiT's and SimMIM's init (std ~0.54 std)
    return nn.init.trunc_normal_(t, std=std, a=-std, b=std)


class VisionTransformer(nn.Module):
    """timm's ViT (same parameter names and shapes), as small parts the methods put together:

      x = vit.patch_embed(img)    # [B, L, D] patch embeddings   (SimMIM/BEiT swap in mask tokens here)
      x = vit.add_pos(x)          # + absolute position embedding (MAE keeps the visible tokens here)
      x = vit.add_cls(x)          # [B, 1 + L', D]: cls token first, then norm_pre (CLIP)
      x = vit.run_blocks(x)       # the blocks, with the shared relative position bias if any
      x = vit.norm(x)             # final norm;  vit.forward_features(img) is these five lines
    """
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_classes=0, class_token=True, global_pool='token', pos_embed='learn',
                 init_values=None, drop_path_rate=0.0, pre_norm=False, act='gelu', norm_eps=1e-6,
                 patch_bias=True, rel_pos_bias=False):
        super().__init__()
        self.encoder_kwargs = {k: v for k, v in locals().items() if k not in ('self', '__class__')}
        if img_size % patch_size:
            raise UsageError(f"image size {img_size} is not divisible by patch size {patch_size}: "
                             "choose --img-size as a multiple of --patch-size")
        self.patch_size, self.embed_dim, self.depth, self.global_pool = patch_size, embed_dim, depth, global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim, patch_bias)
        grid = self.patch_embed.grid
        self.num_patches, self.num_prefix = grid[0] * grid[1], int(class_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = None
        if pos_embed == 'learn':
            self.pos_embed = nn.Parameter(torch.randn(1, self.num_prefix + self.num_patches, embed_dim) * .02)
        elif pos_embed == 'sincos':  # fixed, but kept in the state dict as MAE does
            self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, *grid, class_token)[None], requires_grad=False)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        # relative position bias (BEiT): True = one shared by all blocks (pretraining), 'block' = one per block
        self.rel_pos_bias = RelativePositionBias(grid, num_heads) if rel_pos_bias is True else None
        act_layer = {'gelu': nn.GELU, 'quick_gelu': QuickGELU}[act]
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # stochastic depth grows with depth (timm)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, init_values, dpr[i], act_layer(), norm_eps,
                                           grid if rel_pos_bias == 'block' else None) for i in range(depth)])
        # timm: global average pooling moves the final LayerNorm after the pooling, as `fc_norm`
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if global_pool != 'avg' else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if global_pool == 'avg' else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.init_weights()

    def init_weights(self, scheme='mae'):
        """'mae': MAE's init, xavier-uniform linears (patch conv seen as a linear), cls token N(0, .02).
        'beit': BEiT's, as SimMIM's and BEiT v2's pretraining code: linears, patch conv, cls token and
        learned pos_embed N(0, .02) truncated at +-.02 (their trunc_normal_ passes a=-std, b=std),
        biases 0, then fix_init_weight: block i's (1-indexed) attn.proj and mlp.fc2 weights / sqrt(2i).
        LayerNorms stay (1, 0), layer scales at init_values, the relative position bias table at 0."""
        init = nn.init.xavier_uniform_ if scheme == 'mae' else beit_trunc_normal_
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        init(self.patch_embed.proj.weight.view(self.embed_dim, -1))
        if scheme == 'mae':
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=.02)
            return
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        for p in (self.cls_token, self.pos_embed):
            if p is not None and p.requires_grad:  # a fixed sin-cos table stays
                beit_trunc_normal_(p)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks, 1):  # BEiT's fix_init_weight
                blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))

    def add_pos(self, x):  # [B, L, D] -> [B, L, D]
        return x if self.pos_embed is None else x + self.pos_embed[:, self.num_prefix:]

    def add_cls(self, x):  # [B, L', D] -> [B, prefix + L', D]
        if self.cls_token is not None:
            cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :1]
            x = torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        return self.norm_pre(x)

    def attn_bias(self):  # the shared relative position bias [1, H, N, N] (all patches), or None
        return None if self.rel_pos_bias is None else self.rel_pos_bias().unsqueeze(0)

    def run_blocks(self, x, blocks=None):  # [B, N, D] through all (or the given) blocks, before the final norm
        bias = self.attn_bias()
        for blk in self.blocks if blocks is None else blocks:
            x = blk(x, bias)
        return x

    def forward_features(self, img):  # [B, 3, H, W] -> [B, prefix + L, D] after the final norm
        return self.norm(self.run_blocks(self.add_cls(self.add_pos(self.patch_embed(img)))))

    def pool(self, x):  # image feature: the cls token, or (timm) the mean of the patch tokens, then fc_norm
        return self.fc_norm(x[:, self.num_prefix:].mean(1)) if self.global_pool == 'avg' else x[:, 0]

    def forward(self, x):
        return self.head(self.pool(self.forward_features(x)))


def patchify(img, p):  # [B, 3, H, W] -> [B, L, p*p*3], patch vectors in (row, column, channel) order as MAE
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum('bchpwq->bhwpqc', x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, grid):  # [B, L, p*p*3] -> [B, 3, h*p, w*p], the inverse of patchify
    B, (h, w) = x.shape[0], grid
    x = x.reshape(B, h, w, p, p, 3)
    return torch.einsum('bhwpqc->bchpwq', x).reshape(B, 3, h * p, w * p)


# ----------------------------------------------------------------------------------------------
# Loading encoders: ours, timm, DeiT, DINO, MAE, BEiT, SimMIM checkpoints, and OpenAI CLIP

ENCODER_PREFIXES = ('cls_token', 'pos_embed', 'patch_embed.', 'norm_pre.', 'blocks.', 'norm.', 'fc_norm.',
                    'head.', 'rel_pos_bias.')
# What training checkpoints pickle besides tensors, allowed under weights_only=True: their args (argparse, as MAE,
# DeiT, DINO, BEiT), and stand-ins for the classes of Lightning's last.ckpt and SimMIM's yacs config, whose
# instances are OrderedDicts that torch's unpickler fills: no code of Lightning or yacs is imported or run.
PICKLED = [argparse.Namespace] + [(type(name.rsplit('.', 1)[1], (), {'__new__': lambda cls, *a: OrderedDict()}), name)
                                  for name in ('pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint',
                                               'pytorch_lightning.utilities.parsing.AttributeDict', 'yacs.config.CfgNode')]


def read_checkpoint(path, what='checkpoint'):  # torch.load(weights_only=True), PICKLED allowed: no code runs
    if not os.path.isfile(path):
        raise UsageError(f"{what} file not found: {path}")
    try:
        with torch.serialization.safe_globals(PICKLED):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        why = next((line.strip() for line in str(e).splitlines() if 'GLOBAL' in line), type(e).__name__)
        raise UsageError(f"cannot read {path}: not a {what} that torch.load(weights_only=True) reads ({why[:150]}); "
                         "expected a file saved by torch.save holding a state dict (files that unpickle code are refused)")


BEIT_NAMES = [('.gamma_1', '.ls1.gamma'), ('.gamma_2', '.ls2.gamma')]  # (BEiT's and timm Beit's, ours)


def encoder_state_dict(ckpt, path='checkpoint'):
    """The ViT state dict under 'model', 'state_dict', DINO's 'teacher' or at the top level, under timm's
    names: no `module.`, `_orig_mod.`, DINO's `backbone.` or SimMIM's `encoder.`; official BEiT, BEiT v2 and
    SimMIM names converted: gamma_1/2 -> ls1/2.gamma, q_bias, v_bias -> a qkv bias with a zero k bias (BEiT
    has none), and their relative position indices checked against ours, then dropped."""
    sd = ckpt
    for key in ('model', 'state_dict', 'teacher'):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        raise UsageError(f"{path} holds no state dict (looked at the top level and under 'model', 'state_dict', 'teacher')")
    sd = {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in sd.items()}
    for prefix in ('backbone.', 'encoder.'):
        if prefix + 'patch_embed.proj.weight' in sd:
            if any(k.startswith('head.') for k in sd):
                print(f"{path}: not loading the projection head (head.*), only {prefix}*")
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out = {}
    for k, v in sd.items():
        if k.endswith('relative_position_index'):
            g = math.isqrt(v.shape[0] - 1)
            if not torch.equal(v, RelativePositionBias((g, g), 1).relative_position_index):
                raise UsageError(f"{path}: {k} is not BEiT's relative position index for a {g}x{g} grid")
            continue
        for beit, ours in BEIT_NAMES:
            k = k.replace(beit, ours)
        if k.endswith('.attn.q_bias'):
            k, v = k[:-6] + 'qkv.bias', torch.cat([v, torch.zeros_like(v), sd.get(k[:-6] + 'v_bias', torch.zeros_like(v))])
        if not k.endswith('.attn.v_bias'):
            out[k] = v
    return out


def infer_vit_kwargs(sd, num_heads=None, path='checkpoint'):
    """ViT constructor arguments read off a timm-named state dict; the head count, which no shape shows,
    is `num_heads` or that of the standard size of this width (HEADS)."""
    if 'patch_embed.proj.weight' not in sd:
        raise UsageError(f"{path} is not a ViT checkpoint: no 'patch_embed.proj.weight' "
                         "(expected timm, BEiT or SimMIM ViT names)")
    D, _, p, _ = sd['patch_embed.proj.weight'].shape
    if not (num_heads or D in HEADS):
        raise UsageError(f"{path} holds a {D}-wide ViT without its architecture, and {D} is not the width of a "
                         f"standard size ({', '.join(f'{w}: {h} heads' for w, h in HEADS.items())}): set --num-heads "
                         f"N, or pass the file `python evaluate.py export --ckpt {path} --num-heads N --out FILE` writes")
    shared, table = 'rel_pos_bias.relative_position_bias_table', 'blocks.0.attn.relative_position_bias_table'
    kw = dict(patch_size=p, embed_dim=D, depth=1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.')),
              num_heads=num_heads or HEADS[D], mlp_ratio=sd['blocks.0.mlp.fc1.weight'].shape[0] / D,
              class_token='cls_token' in sd, pre_norm='norm_pre.weight' in sd, patch_bias='patch_embed.proj.bias' in sd,
              global_pool='avg' if 'fc_norm.weight' in sd and 'norm.weight' not in sd else 'token',
              init_values=1.0 if 'blocks.0.ls1.gamma' in sd else None, img_size=224 // p * p,
              rel_pos_bias=True if shared in sd else 'block' if table in sd else False,
              pos_embed='learn' if 'pos_embed' in sd else 'none')
    if 'pos_embed' in sd:
        kw['img_size'] = math.isqrt(sd['pos_embed'].shape[1] - kw['class_token']) * p
    elif kw['rel_pos_bias']:  # (2g - 1)^2 + 3 rows for a g x g grid
        kw['img_size'] = (math.isqrt(sd[shared if shared in sd else table].shape[0] - 3) + 1) // 2 * p
    return kw


def load_encoder(vit, sd, allow_missing=(), path='checkpoint'):
    """Fill `vit` from a timm-named state dict, ignoring method parts (decoders, other heads). pos_embed is
    resampled to vit's grid; a classifier `head` is dropped when vit has none or one of another shape (said
    in a line, as MAE's fine-tuning), `norm` when vit pools with `fc_norm`. Missing or mismatching encoder
    keys are a UsageError, except missing keys that start with a prefix in `allow_missing`."""
    own = vit.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or (k.startswith(ENCODER_PREFIXES)
          and not (k.startswith('head.') and isinstance(vit.head, nn.Identity))
          and not (k.startswith('norm.') and isinstance(vit.norm, nn.Identity)))}
    for k in ('head.weight', 'head.bias'):
        if k in sd and k in own and sd[k].shape != own[k].shape:
            print(f"{path}: not loading {k} {tuple(sd.pop(k).shape)} (this model's is {tuple(own[k].shape)})")
    if 'pos_embed' in sd and 'pos_embed' in own and sd['pos_embed'].shape != own['pos_embed'].shape:
        n = sd['pos_embed'].shape[1] - vit.num_prefix
        if n == int(math.sqrt(n)) ** 2 and sd['pos_embed'].shape[-1] == own['pos_embed'].shape[-1]:
            sd['pos_embed'] = resample_pos_embed(sd['pos_embed'], vit.patch_embed.grid, vit.num_prefix)
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in sd and not k.startswith(tuple(allow_missing))]
    if wrong or unexpected or missing:
        raise UsageError(f"{path} does not fit this encoder ({len(wrong)} shape mismatches, {len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys): first: {', '.join((wrong + missing + unexpected)[:3])}")
    vit.load_state_dict(sd, strict=False)
    return vit


def build_encoder(path, **overrides):
    """(vit, ckpt) from any checkpoint file: ours (their 'encoder_kwargs', also in exported files), or
    timm / DeiT / DINO / MAE / BEiT / SimMIM files (architecture read off the keys)."""
    ckpt = read_checkpoint(path)
    sd = encoder_state_dict(ckpt, path)
    if isinstance(ckpt, dict) and 'encoder_kwargs' in ckpt:
        kw = dict(ckpt['encoder_kwargs'])
    else:
        kw = infer_vit_kwargs(sd, overrides.get('num_heads'), path)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    allow = ('fc_norm.', 'head.') if kw.get('global_pool') == 'avg' or kw.get('num_classes') else ()
    return load_encoder(VisionTransformer(**kw), sd, allow_missing=allow, path=path), ckpt


CLIP_NAMES = [('conv1.', 'patch_embed.proj.'), ('ln_pre.', 'norm_pre.'), ('ln_post.', 'norm.'),
              ('transformer.resblocks.', 'blocks.'), ('.ln_1.', '.norm1.'), ('.ln_2.', '.norm2.'),
              ('.attn.in_proj_', '.attn.qkv.'), ('.attn.out_proj.', '.attn.proj.'),
              ('.mlp.c_fc.', '.mlp.fc1.'), ('.mlp.c_proj.', '.mlp.fc2.')]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def load_clip_visual(path):
    """OpenAI CLIP's image tower as our ViT (norm_pre, QuickGELU, LayerNorm eps 1e-5, no patch bias), from the
    official TorchScript archive (e.g. ViT-B-16.pt) or a state dict, with or without the `visual.` prefix.
    Returns (vit, proj) with proj [width, embed] used as x @ proj."""
    expected = "expected OpenAI CLIP's ViT-B-16.pt (TorchScript) or a state dict with visual.conv1.weight etc."
    if not os.path.isfile(path):
        raise UsageError(f"CLIP file not found: {path} ({expected})")
    try:
        sd = read_checkpoint(path, 'CLIP state dict')
    except UsageError:
        try:  # TorchScript archives hold code as well as weights: open them only through this loader
            print(f"loading {path} as a TorchScript archive (trusted files only)")
            with warnings.catch_warnings():  # torch's deprecation note would bury the one-line error
                warnings.simplefilter('ignore', FutureWarning)
                sd = torch.jit.load(path, map_location='cpu').state_dict()
        except Exception:
            raise UsageError(f"cannot read {path}: {expected}") from None
    sd = sd.get('state_dict', sd) if isinstance(sd, dict) else sd
    if any(k.startswith('visual.') for k in sd):
        sd = {k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}
    if 'conv1.weight' not in sd or 'proj' not in sd:
        raise UsageError(f"{path} is not a CLIP ViT image tower: {expected}")
    out = {}
    for k, v in sd.items():
        for a, b in CLIP_NAMES:
            k = k.replace(a, b) if k.startswith(a.lstrip('.')) or a.startswith('.') else k
        out[k] = v.float()
    out['cls_token'] = out.pop('class_embedding').reshape(1, 1, -1)
    out['pos_embed'] = out.pop('positional_embedding').unsqueeze(0)
    proj = out.pop('proj')
    kw = infer_vit_kwargs(out, out['cls_token'].shape[-1] // 64, path)  # CLIP's heads are 64 channels wide
    return load_encoder(VisionTransformer(**kw, act='quick_gelu', norm_eps=1e-5), out, path=path), proj


# ----------------------------------------------------------------------------------------------
# Masking (1 = masked)

def random_masking(noise, mask_ratio):
    """MAE's per-sample random masking: of noise [B, L], the K = int(L * (1 - ratio)) smallest are kept.
    Returns ids_keep [B, K], mask [B, L] (in patch order) and ids_restore [B, L] (inverse of the shuffle)."""
    keep = int(noise.shape[1] * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :keep], (ids_restore >= keep).float(), ids_restore  # a patch's rank decides


# ----------------------------------------------------------------------------------------------
# Data: image folders, a synthetic dataset, and transforms written with PIL / NumPy

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class ImageFolder(torch.utils.data.Dataset):
    """DIR/CLASS/**/IMAGE files, classes in sorted order. Items are transform(rng, img) plus the label, rng
    seeded by (seed, epoch, index): augmentations do not depend on the number of workers. Non-image files
    and empty class folders are one warning, an unreadable image is replaced by the next (and said once)."""
    def __init__(self, root, transform, seed=0):
        if not os.path.isdir(root):
            raise UsageError(f"--data folder not found: {root} (expected DIR/CLASS/IMAGE.jpg, or --data synthetic)")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.samples, skipped, empty = [], [], []
        for label, c in enumerate(self.classes):
            n = len(self.samples)
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
                for f in sorted(files):
                    path = os.path.join(dirpath, f)
                    (self.samples.append((path, label)) if f.lower().endswith(IMG_EXTENSIONS) else skipped.append(path))
            if len(self.samples) == n:
                empty.append(os.path.join(root, c))
        if not self.samples:
            raise UsageError(f"no images in {root}: expected class sub-folders holding {'/'.join(IMG_EXTENSIONS)} files")
        if skipped or empty:
            what = (f"{len(skipped)} non-image files and {len(empty)} empty class folders in {root} "
                    f"(first: {', '.join((skipped + empty)[:3])})")
            if int(os.environ.get('RANK', 0)) == 0:
                print(f"warning: skipped {what}", file=sys.stderr)
        self.root, self.transform, self.seed, self.bad = root, transform, seed, set()

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        img = Image.open(self.samples[index][0])  # lazy: the transform may ask for a reduced JPEG decode
        if img.mode in ('I', 'I;16', 'I;16B', 'I;16L'):  # 16-bit gray (PNG): convert('RGB') would clip it to white
            img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
        return img

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                out = self.transform(np.random.default_rng((self.seed, epoch, i)), self.load(i))
                return dict(out, label=self.samples[i][1])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                if i not in self.bad:  # once per file and process
                    self.bad.add(i)
                    print(f"warning: unreadable image {self.samples[i][0]} ({e}): using the next one instead "
                          f"({len(self.bad)} so far in this process)", file=sys.stderr)
        raise UsageError(f"no readable image in {self.root}")


class SyntheticImages(ImageFolder):
    """`--data synthetic`: labelled images drawn from the index. Each class is a shape in a hue of its own
    (jittered, random saturation and brightness) at a random size, position and rotation on a textured
    background. Colour alone gives a random encoder a head start; the shape is what pretraining adds."""
    SHAPES = ['disc', 'square', 'triangle', 'sparkle', 'ring', 'diamond', 'hexagon', 'star', 'bar', 'crescent']
    POLYGONS = {'square': (4, [1]), 'triangle': (3, [1]), 'diamond': (4, [1, .55]), 'hexagon': (6, [1]),
                'star': (10, [1, .45]), 'sparkle': (12, [1, .35, .35]), 'bar': (4, [1])}  # corners, radii in turn

    def __init__(self, transform, size=4096, split='train', seed=0, resolution=64):
        self.classes, self.transform, self.seed, self.res = self.SHAPES, transform, seed, resolution
        self.samples = [(None, i % len(self.SHAPES)) for i in range(size)]
        self.salt = {'train': 0, 'val': 1}[split]  # train and val draw different images

    def load(self, index):
        rng, r, label = np.random.default_rng((1234, self.salt, index)), self.res, self.samples[index][1]
        # background: a muted low-frequency colour field with faint stripes of random frequency and angle
        field = Image.fromarray(rng.integers(64, 192, (3, 3, 3), dtype=np.uint8)).resize((r, r), Image.BICUBIC)
        yy, xx = np.mgrid[0:r, 0:r] / r
        theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 8)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))
        img = np.asarray(field, np.float32) * (0.8 + 0.2 * stripes[..., None])
        img = Image.fromarray(img.clip(0, 255).astype(np.uint8))
        # foreground: the class's shape
        draw, kind, s = ImageDraw.Draw(img), self.SHAPES[label], rng.uniform(0.3, 0.45) * r
        cx, cy = rng.uniform(s, r - s, size=2)
        rot = rng.uniform(0, 2 * np.pi)
        hue = (label / len(self.SHAPES) + rng.uniform(-0.04, 0.04)) % 1.0
        color = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)))
        box = [cx - s, cy - s, cx + s, cy + s]
        if kind == 'disc':
            draw.ellipse(box, fill=color)
        elif kind == 'ring':
            draw.ellipse(box, outline=color, width=max(2, int(s / 3)))
        elif kind == 'crescent':
            draw.chord(box, np.degrees(rot), np.degrees(rot) + 180, fill=color)
        else:  # corners at equal angles, a bar's close to two opposite angles
            n, radii = self.POLYGONS[kind]
            a = rot + (np.array([-.3, .3, np.pi - .3, np.pi + .3]) if kind == 'bar' else np.arange(n) * 2 * np.pi / n)
            corners = zip(np.resize(radii, n) * s, a)  # (radius, angle) pairs
            draw.polygon([(cx + q * np.cos(t), cy + q * np.sin(t)) for q, t in corners], fill=color)
        return img


def rrc_box(rng, width, height, scale, ratio):
    """torchvision's RandomResizedCrop box: area fraction ~ U(scale), log-uniform aspect, 10 tries,
    then a central crop with the aspect clamped into `ratio`. Returns (left, top, right, bottom)."""
    for _ in range(10):
        target = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    w = min(width, int(round(height * ratio[1])))
    h = min(height, int(round(width / ratio[0])))
    return (width - w) // 2, (height - h) // 2, (width - w) // 2 + w, (height - h) // 2 + h


def crop_resize(img, box, size):
    """Crop `box` (left, top, right, bottom) resized to size x size, bicubic with antialiasing, as torchvision
    in one pass: a JPEG decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the crop >= size (PIL's
    draft), the box rounded to its pixels; torch's uint8 kernel (PIL's bicubic weights), ~5x faster than PIL's."""
    W, H = img.size
    shrink = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
    if img.format == 'JPEG' and shrink >= 2:
        img.draft('RGB', (math.ceil(W / shrink), math.ceil(H / shrink)))
        fx, fy = img.size[0] / W, img.size[1] / H
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    left, top, right, bottom = (round(v) for v in box)
    pixels = np.asarray(img if img.mode == 'RGB' else img.convert('RGB'))[top:bottom, left:right]  # [h, w, 3], read-only
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None]  # [1, 3, h, w], channels-last memory
    x = F.interpolate(x, size=(size, size), mode='bicubic', antialias=True)[0].contiguous()  # [3, size, size] uint8
    # back to PIL one plane at a time: frombuffer shares each plane, merge interleaves them (a permuted copy is 4x slower)
    return Image.merge('RGB', [Image.frombuffer('L', (size, size), c.numpy(), 'raw', 'L', 0, 1) for c in x])


def random_resized_crop(rng, img, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    return crop_resize(img, rrc_box(rng, *img.size, scale, ratio), size)


def hflip(rng, img):
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def center_crop(img, size, crop_pct=0.875):  # evaluation: short side resized to size / crop_pct, the central crop
    W, H = img.size
    side = max(1, round(min(W, H) * crop_pct))  # the crop, measured in original pixels
    left, top = (W - side) // 2, (H - side) // 2
    return crop_resize(img, (left, top, left + side, top + side), size)


def to_tensor(img):  # PIL RGB -> uint8 [3, H, W], one plane per channel (collating is a plain copy)
    return torch.from_numpy(np.stack([np.asarray(c) for c in img.split()]))


def normalize(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 [B, 3, H, W] -> float32 (x / 255 - mean) / std. Mean and std stay Python numbers: a tensor made
    from them would be copied to the device, a copy that waits for the device every step."""
    x = img.float()
    for c in range(3):
        x[:, c].sub_(255 * mean[c]).div_(255 * std[c])
    return x


def renormalize(x, mean, std):
    """ImageNet-normalized [B, 3, H, W] -> the same pixels normalized by (mean, std) (a teacher's or
    tokenizer's input), per channel x * s + t; Python-number constants, as in normalize."""
    return torch.stack([x[:, c] * (IMAGENET_STD[c] / std[c]) + (IMAGENET_MEAN[c] - mean[c]) / std[c] for c in range(3)], 1)


# Colour jitter (MaskDistill's, and LUT's second view: lut.view2), batch-wise on the device. The data
# workers only draw each image's parameters (jitter_params: the NumPy draws of the PIL transforms
# these replace, in their order) and ship them beside the uint8 crop; the step applies them to the
# whole batch with static shapes. Each op is PIL's formula, computed in float on [0, 1] pixels:
# ImageEnhance blends, convert('L') luma, the HSV round trip.

def jitter_params(rng, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1):
    """torchvision ColorJitter's draws: factors ~ U[1-s, 1+s], hue shift ~ U[-h, h], then a random
    order of the ops that are on (they do not commute: the order adds diversity). Returns float32 [8]:
    the factors (brightness, contrast, saturation, hue; identity for ops that are off), then the op
    ids 0-3 in the order to apply them, ops that are off last."""
    factors, on = [1.0, 1.0, 1.0, 0.0], []
    for i, s in enumerate((brightness, contrast, saturation)):
        if s > 0:
            factors[i] = rng.uniform(max(0.0, 1 - s), 1 + s)
            on.append(i)
    if hue > 0:
        factors[3] = rng.uniform(-hue, hue)
        on.append(3)
    order = [on[i] for i in rng.permutation(len(on))] + [i for i in range(4) if i not in on]
    return np.array(factors + order, np.float32)


def unnormalize(x):
    """ImageNet-normalized [B, 3, H, W] -> pixels in [0, 1] (Python-number constants: no device copy)."""
    return renormalize(x, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def renormalize_unit(x):
    """Pixels in [0, 1] [B, 3, H, W] -> ImageNet-normalized."""
    return torch.stack([(x[:, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for c in range(3)], 1)


def luma(x):
    """PIL's convert('L') (ITU-R 601-2): [B, 3, H, W] -> [B, 1, H, W]."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def shift_hue(x, shift):
    """PIL's HSV round trip with the hue byte (0..255 for the whole wheel) moved by `shift` [B] and
    wrapped like uint8 (at 256), as torchvision's PIL adjust_hue. x: [B, 3, H, W] in [0, 1]."""
    v, m = x.amax(1), x.amin(1)  # [B, H, W]
    c = v - m
    s = torch.where(v > 0, c / v.clamp(min=1e-12), 0.0)
    r, g, b = ((v - x[:, i]) / c.clamp(min=1e-12) for i in range(3))  # distance to the max, in chroma units
    h = torch.where(x[:, 0] == v, b - g, torch.where(x[:, 1] == v, 2 + r - b, 4 + g - r))  # sextants, [-1, 5)
    h6 = ((h / 6 % 1) * 255 + shift.view(-1, 1, 1)) % 256 * (6 / 255)  # shifted hue, in sextants
    # HSV -> RGB: channel n (5 red, 3 green, 1 blue) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6
    return torch.stack([v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1) for k in ((n + h6) % 6 for n in (5, 3, 1))], 1)


def color_jitter(x, params, hue=True):
    """x: [B, 3, H, W] pixels in [0, 1]; params: [B, 8] from jitter_params. Each image gets its own
    factors in its own order. Brightness, contrast and saturation blend toward black, the mean luma and
    the luma (ImageEnhance); each op clips to [0, 1] as PIL's uint8 does. hue=False skips the hue
    op (when the jitter has none) to save its cost."""
    for j in range(4 if hue else 3):
        op = params[:, 4 + j].view(-1, 1, 1, 1)  # [B, 1, 1, 1], the op id at position j
        f = params[:, :4].gather(1, params[:, 4 + j:5 + j].long()).view(-1, 1, 1, 1)  # its factor
        gray = luma(x)
        base = torch.where(op == 0, 0.0, torch.where(op == 1, gray.mean((2, 3), keepdim=True), gray))
        blend = (base + f * (x - base)).clamp(0, 1)
        x = torch.where(op == 3, shift_hue(x, torch.round(f.view(-1) * 255)), blend) if hue else blend
    return x


# Mixup / CutMix (fine-tuning and SupMIM)

def mixup_cutmix(rng, x, y, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
                 label_smoothing=0.1):
    """timm Mixup 'batch' mode (MAE/DeiT fine-tune) with x.flip(0). Returns (x, soft_targets)."""
    # scalars come from the host rng, so nothing on the device is synced back
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    if use_cutmix:
        H, W = x.shape[-2:]
        cut = math.sqrt(1 - lam)  # box side ratio so that its area is (1 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = rng.integers(H), rng.integers(W)
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, H)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1 - float((y1 - y0) * (x1 - x0)) / (H * W)  # clipping shrinks the box: use true area
    elif lam < 1:
        x = x * lam + x.flip(0) * (1 - lam)
    off = label_smoothing / num_classes
    t = F.one_hot(y, num_classes).float() * (1 - label_smoothing) + off
    return x, t * lam + t.flip(0) * (1 - lam)


def eval_transform(size):
    return lambda rng, img: {'img': to_tensor(center_crop(img, size))}


def build_dataset(args, transform, split='train'):
    """`--data synthetic`, or an image folder: DIR/train (or DIR itself) and DIR/val."""
    if args.data == 'synthetic':
        n = args.synthetic_size if split == 'train' else max(args.synthetic_size // 4, 100)
        return SyntheticImages(transform, n, split, args.seed)
    root = os.path.join(args.data, split)
    if not os.path.isdir(root) and split == 'train':
        root = args.data
    return ImageFolder(root, transform, args.seed)


# ----------------------------------------------------------------------------------------------
# Command line shared by the five scripts

class Parser(argparse.ArgumentParser):  # one-line errors (exit 2); parse_args also checks the shared flags' ranges
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")

    def parse_args(self, args=None, namespace=None):
        return validate_args(super().parse_args(args, namespace))


def default_workers():
    """Data loading processes per training process: the cores this job may use on this node, shared among
    the processes torchrun starts on it, at most 12 (more rarely helps), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, min(12, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))


def get_parser(doc):
    """The flags every script shares; a script adds its method's, sets the paper's values with set_defaults."""
    p = Parser(description=doc.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--data', required=True, help="ImageFolder root (DIR/train, DIR/val or DIR/CLASS/*.jpg) or 'synthetic'")
    a('--output-dir', default='output', help='where checkpoint.pth and log.jsonl go')
    a('--model', default='vit_base', help=f"one of {', '.join(MODELS)}")
    a('--patch-size', type=int, default=16)
    a('--img-size', type=int, default=224)
    a('--batch-size', type=int, default=256, help='per process; effective batch = batch * accum * processes')
    a('--accum-iter', type=int, default=1, help='micro-batches per optimizer step')
    a('--epochs', type=int, default=800)
    a('--warmup-epochs', type=float, default=10)
    a('--warmup-steps', type=int, default=None, help='overrides --warmup-epochs')
    a('--blr', type=float, default=1.5e-4, help='base lr: lr = blr * effective batch / 256')
    a('--lr', type=float, default=None, help='absolute lr (overrides --blr)')
    a('--min-lr', type=float, default=0.0)
    a('--weight-decay', type=float, default=0.05)
    a('--betas', type=float, nargs=2, default=(0.9, 0.999))
    a('--clip-grad', type=float, default=None, help='max gradient norm (off when not given)')
    a('--drop-path', type=float, default=0.0)
    a('--num-workers', type=int, default=default_workers(), help='data loading processes per GPU (cores / GPUs)')
    a('--seed', type=int, default=0)
    a('--resume', action='store_true', help='continue from OUTPUT/checkpoint.pth')
    a('--compile', action=argparse.BooleanOptionalAction, default=None, help='torch.compile (default: on for CUDA)')
    a('--precision', choices=['bf16', 'fp16', 'fp32'], default=None, help='default: bf16 on CUDA, fp32 on CPU')
    a('--device', default=None, help='default: cuda if available, else cpu')
    a('--log-every', type=int, default=50, help='steps between log lines')
    a('--save-every', type=int, default=20, help='epochs between checkpoints (and at the end)')
    a('--peak-tflops', type=float, default=None, help='per-device peak for MFU (default: 989, H100 bf16 dense)')
    a('--synthetic-size', type=int, default=10000, help='images in --data synthetic (train; val gets a quarter)')
    a('--skip-nonfinite', action='store_true',
      help='skip steps whose gradients are not finite instead of stopping (a host sync per step)')
    return p


def validate_args(args):
    """The shared flags' ranges: a bad value is one line (exit 2), not a traceback or a run on nonsense."""
    for flags, ok, want in [
            ('img-size patch-size batch-size accum-iter epochs log-every save-every synthetic-size',
             lambda v: v >= 1, 'must be at least 1'),
            ('num-workers', lambda v: v >= 0, 'must be 0 (load in the main process) or more'),
            ('blr lr clip-grad', lambda v: 0 < v < math.inf, 'must be a positive number'),
            ('warmup-epochs warmup-steps min-lr weight-decay', lambda v: 0 <= v < math.inf, 'must be a number >= 0'),
            ('drop-path', lambda v: 0 <= v < 1, 'must be in [0, 1)'),
            ('betas', lambda v: all(0 <= b < 1 for b in v), 'must be two numbers in [0, 1)')]:
        for flag in flags.split():
            v = getattr(args, flag.replace('-', '_'))
            if v is not None and not ok(v):
                raise UsageError(f"--{flag} {v}: {want}")
    return args  # (--img-size against --patch-size: the ViT checks it, whose patch size may come from a checkpoint)


def setup(args):
    """Processes, device, precision and seeds. torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without
    them this is one plain process. Returns (rank, world_size, device)."""
    validate_args(args)  # again for parsers built elsewhere from these flags (evaluate.py finetune)
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)))
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(f'cuda:{local}' if args.device == 'cuda' else args.device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    args.precision = args.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    args.compile = device.type == 'cuda' if args.compile is None else args.compile
    args.peak_tflops = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == 'cuda' else 0.0)
    args.world_size = world
    torch.manual_seed(args.seed + rank)
    return rank, world, device


# ----------------------------------------------------------------------------------------------
# Optimization: parameter groups, schedule, checkpoints, and the training loop

def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on 1-D parameters (norms, layer scales) and biases (MAE's timm
    add_weight_decay), nor on the names in the model's `no_weight_decay` (BEiT / SimMIM's skip list)."""
    skip, decay, no_decay = set(getattr(model, 'no_weight_decay', ())), [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith('.bias') or name in skip else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def get_lr(step, total_steps, warmup_steps, lr, min_lr, warmup_lr=0.0, milestones=(), steps_per_epoch=1, gamma=0.1):
    """Per step: linear warmup from warmup_lr to lr, then half-cycle cosine to min_lr (MAE), or, given
    milestones (epochs), lr * gamma ** (milestones passed) with min_lr unused (SimMIM's multistep)."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    if milestones:
        return lr * gamma ** sum(step >= m * steps_per_epoch for m in milestones)
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def save_checkpoint(obj, path):
    """Atomic write (a temporary file, fsync, rename over `path`): a kill at any moment, or a failed
    write (disk full), leaves the previous checkpoint or the new one, never a torn file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        err = e if isinstance(e, OSError) else e.__context__  # torch's zip writer wraps the failed write's OSError
        if not isinstance(err, OSError):
            raise
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UsageError(f"cannot write {path} ({err.strerror}): it is left as it was; make room, "
                         "then rerun with --resume") from None
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(fd)  # make the rename itself durable
    os.close(fd)


def prepare_output_dir(out, ckpt_path, rank):
    """Create --output-dir and make sure it takes files before any training time is spent; rank 0
    removes the temporary files of a process killed while saving (checkpoint.pth.tmpPID)."""
    probe = os.path.join(out, f'.write_test{os.getpid()}')
    try:
        os.makedirs(out, exist_ok=True)
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        why = 'a file' if os.path.isfile(out) else e.strerror
        raise UsageError(f"--output-dir {out}: cannot write there ({why}): choose another directory") from None
    if rank == 0:
        for tmp in glob.glob(glob.escape(ckpt_path) + '.tmp*'):
            os.remove(tmp)


def truncate_log(path, step):
    """Drop the rows of log.jsonl written after `step` (a resumed run repeats those steps) and a
    line torn by a kill, through a temporary file as the checkpoint."""
    if not os.path.isfile(path):
        return
    keep = []
    for line in open(path):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get('step', 0) <= step:  # the arguments' rows have no step: kept
            keep.append(line.rstrip('\n') + '\n')
    with open(f"{path}.tmp", 'w') as f:
        f.writelines(keep)
    os.replace(f"{path}.tmp", path)


def model_state(model):
    """The model's state dict without its frozen teachers (named in `model.frozen_prefixes`)."""
    skip = tuple(getattr(model, 'frozen_prefixes', ()))
    return {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's split (a seeded permutation per epoch, every rank the same length, the
    remainder dropped), yielding (index, epoch), the seed of a sample's augmentation; `skip` resumes mid-epoch."""
    def __init__(self, n, rank, world, seed, shuffle=True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.epoch, self.skip, self.per_rank = 0, 0, n // world

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        return iter([(int(i), self.epoch) for i in order[self.rank:self.per_rank * self.world:self.world][self.skip:]])

    def __len__(self):
        return self.per_rank - self.skip


def ignore_stop_signals(worker_id):
    """DataLoader workers leave stop signals to the main process, which saves and then ends them: a
    signal to the whole process group would otherwise kill a worker first, and with it the run."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@atexit.register
def end_workers():
    """At exit, end the DataLoader workers still running with SIGKILL: they ignore the SIGTERM that
    multiprocessing ends them with, and it would wait for them forever."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker failure
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


def make_loader(dataset, args, rank, world, shuffle=True, drop_last=True):
    sampler, workers = EpochSampler(len(dataset), rank, world, args.seed, shuffle), args.num_workers
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=args.device == 'cuda', drop_last=drop_last,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                       worker_init_fn=ignore_stop_signals)


class StopVote:
    """Whether to stop now, the same answer on every rank: at once with one process; with several,
    each step launches an asynchronous all-reduce (max) of this rank's flag and reads the one launched
    two steps earlier, long finished: all ranks stop at the same step, and the host never waits."""
    def __init__(self, world, device, lag=2):
        self.world, self.device, self.lag, self.pending = world, device, lag, []

    def __call__(self):
        if self.world == 1:
            return bool(STOP_REQUESTS)
        flag = torch.full((), float(bool(STOP_REQUESTS)), device=self.device)  # a fill, not a host-to-device copy
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type == 'cuda':
            work.wait()  # NCCL: the stream waits for the all-reduce, the host does not
            flag = flag.to('cpu', non_blocking=True)  # into pinned memory, when the stream gets there
            work = torch.cuda.Event()
            work.record()
        self.pending.append((work, flag))
        if len(self.pending) <= self.lag:
            return False
        work, flag = self.pending.pop(0)
        work.synchronize() if isinstance(work, torch.cuda.Event) else work.wait()
        return flag.item() > 0

    def close(self):  # every rank, at the same step: no all-reduce left in flight when the process group ends
        for work, _ in self.pending:
            work.synchronize() if isinstance(work, torch.cuda.Event) else work.wait()
        self.pending.clear()


def to_device(batch, device):
    """Host batch -> device; uint8 images become ImageNet-normalized float32 there."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {k: normalize(v) if v.dtype == torch.uint8 and v.ndim == 4 else v for k, v in batch.items()}


def device_batches(batches, device):
    """to_device over an iterator of host batches. On CUDA the next batch is copied (and normalized)
    on a side stream while the current one trains, so the copy never waits behind the step."""
    if device.type != 'cuda':
        yield from (to_device(b, device) for b in batches)
        return
    stream, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    nxt = None
    for b in batches:
        with torch.cuda.stream(stream):
            b = to_device(b, device)
        if nxt is not None:
            yield nxt
        main.wait_stream(stream)  # the batch is there before the step uses it
        for v in b.values():
            v.record_stream(main)  # its memory is not reused before the main stream is done with it
        nxt = b
    if nxt is not None:
        yield nxt


def train_flops(model, batch, autocast=nullcontext()):
    """FLOPs per image of one training step (forward and backward; frozen teachers forward only), for
    MFU as nanoGPT and PaLM (App. B) count it: matmuls, convolutions and attention, a multiply-add
    being 2, no recomputation. Counted by torch.utils.flop_counter on `batch` with attention as plain
    matmuls, leaving weights, buffers and gradients as they were. For ViT-B/16 at 224 px the forward is
    35.1 GFLOPs per image: per block and token 8 D^2 (qkv, proj) + 16 D^2 (MLP) + 4 N D (attention)."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with flop_counter.FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), autocast:
        loss, _ = model(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(buffers, strict=False)  # e.g. BatchNorm statistics: the count does not train
    return counter.get_total_flops() / len(next(v for v in batch.values() if torch.is_tensor(v)))


# flags whose change on --resume changes the schedule or the data a run sees: named when they differ
RESUME_FLAGS = ('data', 'synthetic_size', 'epochs', 'warmup_epochs', 'warmup_steps', 'blr', 'lr', 'min_lr', 'batch_size',
                'accum_iter', 'world_size', 'weight_decay', 'betas', 'clip_grad', 'seed')


def train(args, model, dataset, groups=None, evaluate=None):
    """Train `model` on `dataset` (pretraining, and fine-tuning in evaluate.py). The model protocol:
    `loss, logs = model(batch)` with batch a dict of device tensors; optionally `model.after_step(step,
    total_steps)` after every optimizer step (EMA teachers). `groups`: AdamW parameter groups (default
    param_groups), each group's lr times its 'lr_scale'. `evaluate(epochs_done) -> {name: number}`:
    called on every rank, under autocast, after each epoch; printed and logged."""
    rank, world, device = setup(args)
    ckpt_path, step = os.path.join(args.output_dir, 'checkpoint.pth'), 0
    prepare_output_dir(args.output_dir, ckpt_path, rank)
    model.to(device)
    eff_batch = args.batch_size * args.accum_iter * world
    lr_rule = f"blr {args.blr:.3g} x effective batch {eff_batch} / 256" if args.lr is None else "--lr or the method's rule"
    args.lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(groups or param_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.betas),
                                  fused=device.type == 'cuda')
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == 'fp16')  # a no-op unless fp16
    loader = make_loader(dataset, args, rank, world)
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        raise UsageError(f"{len(dataset)} images give no full step at batch {args.batch_size} x {args.accum_iter} "
                         f"x {world} processes: lower --batch-size or add data")
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_epochs * steps_per_epoch)

    log_path = os.path.join(args.output_dir, 'log.jsonl')
    if os.path.isfile(ckpt_path):
        if not args.resume:
            raise UsageError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --output-dir")
        ckpt = read_checkpoint(ckpt_path)
        own, theirs = model_state(model), ckpt['model']
        bad = [k for k in {**theirs, **own} if k not in own or k not in theirs or own[k].shape != theirs[k].shape]
        if bad:
            raise UsageError(f"{ckpt_path} was written by another model (first differing keys: {', '.join(bad[:3])}): "
                             "resume with the same --model and method flags, or choose another --output-dir")
        model.load_state_dict(ckpt['model'], strict=False)
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        step = ckpt['step']
        changed = [f"--{k.replace('_', '-')} {ckpt['args'][k]} -> {getattr(args, k)}" for k in RESUME_FLAGS  # JSON: (a, b) == [a, b]
                   if k in ckpt['args'] and json.dumps(ckpt['args'][k]) != json.dumps(getattr(args, k))]
        if rank == 0:
            truncate_log(log_path, step)
            if changed:
                print(f"warning: resuming step {step} with changed flags: {', '.join(changed)}", file=sys.stderr)
    elif args.resume and rank == 0:  # the usual first launch of a job script that always passes --resume
        print(f"--resume: no checkpoint in {args.output_dir} yet, starting from step 0", file=sys.stderr)

    train_model = torch.compile(model) if args.compile else model  # compile before the DDP wrap
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == 'cuda' else None,
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy in and out
            forward_sync_buffers=False)  # no method trains with buffers that rank 0 would have to impose (BN stats are all-reduced)
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.precision != 'fp32')
    log_file = open(log_path, 'a') if rank == 0 else None
    if rank == 0:
        print(f"lr {args.lr:.3g} ({lr_rule}), effective batch {eff_batch} | "
              f"{total_steps} steps, {warmup_steps} warmup | {sum(p.numel() for p in params) / 1e6:.1f}M trainable params")
        print(json.dumps(vars(args)))
        log_file.write(json.dumps({'args': vars(args)}) + '\n')
    # a bar on a terminal only: in a log file its carriage returns make one line of megabytes
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True, leave=False)
    # first step whose loss was not finite on this rank, total_steps if none: kept on the device (no host sync)
    sums, bad_step, t0, t0_step = {}, torch.full((), total_steps, device=device), time.perf_counter(), step
    model.train()
    flops = train_flops(model, to_device(torch.utils.data.default_collate([dataset[0], dataset[1]]), device), autocast)
    STOP_REQUESTS.clear()
    stop_vote = StopVote(world, device)
    handlers = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}  # preemption

    def check_finite(weights=False):
        """Stop every rank (exit 3) if any rank's loss, or (`weights`) weight, is non-finite: a host sync."""
        first = bad_step.clone()
        if world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = first.item()
        what = f"loss became non-finite at step {first}" if first < total_steps else None
        if weights and what is None and not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
            what = f"weights became non-finite by step {step}"
        if what:
            kept = f"{ckpt_path} keeps the last good state" if os.path.isfile(ckpt_path) else "no checkpoint was written"
            raise NonFiniteLoss(f"{what}; {kept} (lower --lr, set --clip-grad, or use --precision bf16)")

    def log(row, line):
        if rank == 0:
            bar.write(line)
            log_file.write(json.dumps(row) + '\n')
            log_file.flush()

    def save(epoch):
        check_finite(weights=True)  # never overwrite the last good checkpoint with a diverged model
        if rank == 0:
            save_checkpoint({'model': model_state(model), 'encoder_kwargs': model.encoder_kwargs, 'args': vars(args),
                             'method': type(model).__name__.lower(),  # the script that wrote it: simmim, lut, ...
                             'step': step, 'epoch': epoch, 'optimizer': optimizer.state_dict(),
                             'scaler': scaler.state_dict()}, ckpt_path)

    try:
        while step < total_steps:
            epoch, done = divmod(step, steps_per_epoch)
            loader.sampler.set_epoch(epoch, skip=done * args.accum_iter * args.batch_size)
            batches = device_batches(iter(loader), device)
            model.train()
            for _ in range(steps_per_epoch - done):
                lr = get_lr(step, total_steps, warmup_steps, args.lr, args.min_lr, getattr(args, 'warmup_lr', 0.0), getattr(args, 'milestones', ()), steps_per_epoch)
                for group in optimizer.param_groups:
                    group['lr'] = lr * group.get('lr_scale', 1.0)
                torch.manual_seed(hash((args.seed, rank, step)) % 2 ** 62)  # per-step seed: resuming reproduces the run
                for micro in range(args.accum_iter):  # DDP all-reduces on the last micro-step only
                    with (train_model.no_sync() if world > 1 and micro < args.accum_iter - 1 else nullcontext()), autocast:
                        loss, logs = train_model(next(batches))
                    scaler.scale(loss / args.accum_iter).backward()
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    logs['grad_norm'] = nn.utils.clip_grad_norm_(params, args.clip_grad)
                # the gradients are all-reduced, so every rank skips the same steps (the flag's documented host sync)
                if args.skip_nonfinite and not torch.isfinite(
                        logs['grad_norm'] if args.clip_grad else nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])):
                    if rank == 0:
                        bar.write(f"step {step}: non-finite gradients, update skipped")
                else:
                    scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if hasattr(model, 'after_step'):
                    model.after_step(step, total_steps)
                if not args.skip_nonfinite:
                    bad_step = torch.where(torch.isfinite(loss.detach()), bad_step, bad_step.clamp(max=step))  # no host sync
                for k, v in dict(logs, loss=loss).items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                step += 1
                bar.update(1)
                if step % args.log_every == 0 or step == total_steps:
                    check_finite()
                    n, dt = step - t0_step, time.perf_counter() - t0
                    ips = n * eff_batch / dt
                    row = {'epoch': epoch, 'step': step, **{k: round(v.item() / n, 5) for k, v in sums.items()},
                           'lr': lr, 'ms_step': 1000 * dt / n, 'img_s': ips,
                           'mfu': flops * ips / (args.peak_tflops * 1e12 * world) if args.peak_tflops else None}
                    extra = ''.join(f" | {k} {v:.4f}" for k, v in row.items() if k in sums and k != 'loss')
                    mfu = f"{100 * row['mfu']:.1f}%" if row['mfu'] is not None else '-'
                    log(row, f"ep {epoch:3d} | step {step:6d}/{total_steps} | loss {row['loss']:.4f} | lr {lr:.2e} | "
                             f"{row['ms_step']:7.1f} ms/step | {ips:7.0f} img/s | MFU {mfu}{extra}")
                    sums, t0, t0_step = {}, time.perf_counter(), step
                if stop := stop_vote():
                    break
            end = step % steps_per_epoch == 0  # the epoch is complete: evaluated even when stopping
            if end and evaluate:
                with autocast:
                    t, metrics = time.perf_counter(), evaluate(epoch + 1)
                log({'epoch': epoch, 'step': step, **metrics},
                    f"ep {epoch:3d} | step {step:6d}/{total_steps} | " + ' | '.join(f"{k} {v:.4g}" for k, v in metrics.items()))
                t0 += time.perf_counter() - t  # the evaluation's time is no training step's
            if stop or end and ((epoch + 1) % args.save_every == 0 or step == total_steps):
                save(step // steps_per_epoch)
            if stop:
                stop_vote.close()
                raise Stopped(f"stopped by signal at step {step}; {ckpt_path} saved: rerun with --resume to continue")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    bar.close()
    stop_vote.close()
    if rank == 0:
        print(f"done: {ckpt_path}")
    return model
