"""LUT: Learning with Unmasked Tokens Drives Stronger Vision Learners (Kim et al., ECCV 2024, arXiv:2310.13593).

MAE (mask 75% of the patches, encode the visible 25%, reconstruct the masked pixels with an
8-block decoder) plus a "broader contextualization" loss on the unmasked tokens: the mean of the
encoder's visible tokens goes through a projector and a predictor MLP and is pulled (2 - 2 cos)
toward what a momentum (EMA) copy of the encoder and projector makes of the full, unmasked, more
strongly augmented other view of the same image. Both views are made with a simple resized crop,
so they show nearly the same content; the loss is symmetrized over the two views.

  torchrun --nproc_per_node=8 lut.py --data /imagenet          # ViT-B/16, 224 px, 1600 epochs (Sec. 5.1.2)
  python lut.py --data synthetic --model vit_pico --img-size 32 --patch-size 4 --decoder-dim 128 \
      --decoder-depth 2 --decoder-heads 4 --batch-size 32 --accum-iter 1 --epochs 3 --warmup-epochs 1 \
      --synthetic-size 4000 --lr 5e-4 --output-dir out/quick_lut  # CPU, ~2.5 min on 2 cores (README quick start)

Expected: ViT-B/16 1600 epochs -> 84.2% ImageNet top-1 after fine-tuning (MAE: 83.6), ViT-S/16
82.0 (Tab. 1); 400 epochs -> 83.6 (Sec. 5.1.4). The CPU run's k-NN on the synthetic data
(`python evaluate.py knn --ckpt out/quick_lut/checkpoint.pth --data synthetic --baseline`): 94.9% against
80.0% for the same ViT with random weights (seed 1: 94.2 vs 82.0).
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common

# ----------------------------------------------------------------------------------------------
# Arguments


def get_args(argv=None):
    parser = common.get_parser(__doc__)
    parser.add_argument('--mask-ratio', type=float, default=0.75, help='Sec. 5.1.2 (MAE)')
    parser.add_argument('--context-weight', type=float, default=None,
                        help='lambda of Eq. (3); Sec. 5.1.2: 0.25 for ViT-B, 1.0 for ViT-S (default: by --model)')
    parser.add_argument('--momentum', type=float, default=0.996,
                        help='Sec. 5.1.2: target EMA momentum, raised to 1 by a cosine (the public recipe passes 0.996; '
                             'its argparse default is 0.99996)')
    parser.add_argument('--norm-pix-loss', action=argparse.BooleanOptionalAction, default=True,
                        help="MAE's per-patch normalized pixel targets (the public recipe passes --norm_pix_loss)")
    parser.add_argument('--views', choices=['src', 'rrc'], default='src',
                        help='Tab. 4f: simple resized crop 83.5 vs random resized crop 83.4')
    parser.add_argument('--supervision', choices=['pooled', 'token'], default='pooled',
                        help='Tab. 4c: pooled tokens 83.5 vs token-wise 83.2')
    parser.add_argument('--steer', choices=['visible', 'all'], default='visible',
                        help='Tab. 4a: unmasked tokens only 83.5 vs unmasked and mask tokens 83.0')
    parser.add_argument('--target-mask-ratio', type=float, default=0.0, help='Tab. 4e: 0 -> 83.5, 0.5 -> 82.6, 0.75 -> 82.5')
    parser.add_argument('--decoder-dim', type=int, default=512, help='Sec. 5.1.1: the MAE decoder')
    parser.add_argument('--decoder-depth', type=int, default=8, help='Sec. 5.1.1: 8 blocks')
    parser.add_argument('--decoder-heads', type=int, default=16, help='MAE: 16 heads')
    parser.add_argument('--head-dim', type=int, default=4096, help='Sec. 5.1.1: hidden width of the MLP heads')
    parser.set_defaults(
        model='vit_base', img_size=224, patch_size=16,  # Sec. 5.1.1: ViT-B/16 at 224
        batch_size=128, accum_iter=4,    # released PRETRAIN.md: 128 x accum 4 x 8 GPUs = 4096 (Sec. 5.1.2: 4096);
                                         # the projector's BatchNorm sees 128 x 8 = 1024 images per view (GlobalBatchNorm1d)
        blr=1.5e-4,                      # released PRETRAIN.md; lr = blr x sqrt(effective batch) / 4 (main_lut.py,
                                         # see lr_from_blr) = 2.4e-3 at 4096, where MAE's linear rule agrees
        epochs=1600, warmup_epochs=40,   # Sec. 5.1.2 (ablations: 400 epochs)
        weight_decay=0.05,               # released PRETRAIN.md (MAE's); the paper does not state it
        betas=(0.9, 0.95),               # released main_lut.py hard-codes MAE's (0.9, 0.95); Sec. 5.1.2's "(0.9, 0.999)"
                                         # sits beside MAE's fine-tuning values: --betas 0.9 0.999
        min_lr=0.0, clip_grad=None,      # MAE: cosine to 0, no clipping. Sec. 5.1.2 also names a layer-wise
                                         # lr decay of 0.65, which the public pretraining code does not apply
        output_dir='out/lut')
    args = parser.parse_args(argv)
    if args.context_weight is None:  # Sec. 5.1.2 gives ViT-S and ViT-B: smaller models take S's, larger B's
        args.context_weight = 1.0 if common.model_size(args.model)[0] <= 384 else 0.25
    if not 0.5 <= args.mask_ratio < 1:
        raise common.UsageError(f"--mask-ratio {args.mask_ratio}: the two views keep disjoint visible sets, "
                                "so choose a ratio in [0.5, 1)")
    if not 0 <= args.target_mask_ratio < 1:
        raise common.UsageError(f"--target-mask-ratio {args.target_mask_ratio}: choose a ratio in [0, 1)")
    if args.supervision == 'token' and args.target_mask_ratio > 0:
        raise common.UsageError("--supervision token needs the target's tokens at every position: use --target-mask-ratio 0")
    if args.batch_size < 2:
        raise common.UsageError("--batch-size must be at least 2: the projector's BatchNorm needs 2 images per view")
    return args


# ----------------------------------------------------------------------------------------------
# Model


class AllReduceSum(torch.autograd.Function):
    """Sum over all processes, differentiable: each process's loss depends on the sum, so the gradient
    of every input is the sum of the processes' output gradients. dist.all_reduce is public, and
    torch.compile traces it as a functional collective (fullgraph, checked in tests/test_lut.py); the
    deprecated torch.distributed.nn.functional.all_reduce refuses to compile, and the functional
    collectives module that replaces it is private (underscore)."""
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with training statistics over the batches of all processes, what the public code
    gets from SyncBatchNorm (128 x 8 GPUs = 1024 images per view), with one all-reduce of [sum, sum of
    squares, count] per call: no host sync, no graph break, on CPU (gloo) too. Gradients flow
    through the global mean and variance. Parameters, buffers (names included), running-statistics
    update (unbiased variance, momentum 0.1) and eval mode are nn.BatchNorm1d's."""
    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()  # [N, C]; statistics in float32 under autocast
        shift = self.running_mean.clone()  # sums of (x - shift): no cancellation in E[d^2] - E[d]^2
        d = xf - shift
        stats = AllReduceSum.apply(torch.cat([d.sum(0), (d * d).sum(0), d.new_full((1,), x.shape[0])]))  # [2C + 1]
        C, n = x.shape[1], stats[-1]
        mean_d = stats[:C] / n
        var = stats[C:2 * C] / n - mean_d * mean_d  # biased, as BatchNorm normalizes
        mean = mean_d + shift
        # (1 - momentum) * running + momentum * batch; detach() rather than a no_grad block, which under
        # torch.compile (2.14) loses the gradient through the statistics
        self.running_mean.lerp_(mean.detach(), self.momentum)
        self.running_var.lerp_((var * n / (n - 1)).detach(), self.momentum)
        self.num_batches_tracked.add_(1)
        return ((xf - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias).to(x.dtype)


def mlp(dim, hidden):
    """Sec. 5.1.1: the projector and the predictor (BYOL's): Linear, BatchNorm, ReLU, Linear, no biases."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), GlobalBatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, dim, bias=False))


def lr_from_blr(blr, eff_batch):
    """Released main_lut.py: lr = blr * sqrt(effective batch) / 4, MAE's blr * batch / 256 at 4096 only."""
    return blr * math.sqrt(eff_batch) / 4


def ema_momentum(step, total_steps, base):
    """BYOL's schedule: m = 1 - (1 - m0) (cos(pi k / K) + 1) / 2, from m0 at step 0 to 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


def encode(vit, img, ids_keep=None):
    """MAE's encoder: only the visible patches ids_keep [B, K] enter (all if None) -> [B, 1 + K, D] after the norm."""
    x = vit.add_pos(vit.patch_embed(img))  # [B, L, D]
    if ids_keep is not None:
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, D]
    return vit.norm(vit.run_blocks(vit.add_cls(x)))


def two_view_masking(noise, mask_ratio):
    """One noise draw [B, L] masks both views (public code): view 1 keeps the K patches with the
    smallest noise, view 2 the next K, so their visible sets are disjoint. Returns (ids_keep [B, K],
    mask [B, L] with 1 = masked, ids_restore [B, L]) for each view."""
    view1 = common.random_masking(noise, mask_ratio)
    view2 = common.random_masking(noise + (1 - view1[1]), mask_ratio)  # view 1's kept patches move last
    return view1, view2


class LUT(common.VisionTransformer):
    """MAE with MAE's own parameter names (an official MAE checkpoint loads into it as is), plus the
    LUT parts: `head_projector`, `head_predictor` and the EMA target `target_encoder`,
    `target_projector` (saved in checkpoints: they are training state, not a frozen teacher)."""

    def __init__(self, args):
        width, depth, heads = common.model_size(args.model)
        super().__init__(img_size=args.img_size, patch_size=args.patch_size, embed_dim=width, depth=depth,
                         num_heads=heads, drop_path_rate=args.drop_path, pos_embed='sincos')
        self.mask_ratio, self.norm_pix_loss, self.context_weight = args.mask_ratio, args.norm_pix_loss, args.context_weight
        self.momentum, self.supervision, self.steer = args.momentum, args.supervision, args.steer
        self.target_mask_ratio = args.target_mask_ratio
        dim = args.decoder_dim
        # MAE decoder: one shared mask token, fixed sin-cos positions (zero cls slot), blocks, norm, pixels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_embed = nn.Linear(width, dim)
        self.decoder_pos_embed = nn.Parameter(common.sincos_pos_embed(dim, *self.patch_embed.grid, cls_token=True)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([common.Block(dim, args.decoder_heads, 4.0, None, 0.0, nn.GELU(), 1e-6)
                                             for _ in range(args.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, args.patch_size ** 2 * 3)
        # LUT: online heads, and the target: an EMA copy of encoder + projector
        self.head_projector, self.head_predictor = mlp(width, args.head_dim), mlp(width, args.head_dim)
        if args.steer == 'all':  # the decoder's tokens are `dim` wide; bring them to the projector's width
            self.head_steer = nn.Linear(dim, width)
        self.target_encoder = common.VisionTransformer(**self.encoder_kwargs)
        self.target_projector = mlp(width, args.head_dim)
        self.init_weights()  # MAE: xavier-uniform for every linear layer, decoder and heads included
        nn.init.normal_(self.mask_token, std=.02)
        with torch.no_grad():
            for online, target in zip(*self.ema_pairs()):
                target.copy_(online)
        self.target_encoder.requires_grad_(False)
        self.target_projector.requires_grad_(False)
        self.train()

    def train(self, mode=True):
        super().train(mode)
        self.target_encoder.eval()  # the target normalizes with its averaged BatchNorm statistics (public code)
        self.target_projector.eval()
        return self

    def ema_pairs(self):
        """(online, target) tensor lists: encoder and projector weights, and the projector's BatchNorm
        running statistics, which the target uses in eval mode (the public code averages them too)."""
        own = dict(self.named_parameters())
        own.update(self.named_buffers())
        pairs = [(own[n], t) for n, t in self.target_encoder.named_parameters()]
        pairs += [(own['head_projector.' + n], t) for n, t in
                  [*self.target_projector.named_parameters(), *self.target_projector.named_buffers()] if t.is_floating_point()]
        return [o for o, _ in pairs], [t for _, t in pairs]

    @torch.no_grad()
    def after_step(self, step, total_steps):
        """target = m * target + (1 - m) * online after every optimizer step: one fused lerp over all
        tensors (torch._foreach_lerp_, as torch.optim's foreach paths; no host sync)."""
        online, target = self.ema_pairs()
        torch._foreach_lerp_(target, online, 1 - ema_momentum(step, total_steps, self.momentum))

    def forward_decoder(self, x, ids_restore):
        """MAE's decoder. x: encoded [B, 1 + K, D] (cls first, then the kept patches in shuffled
        order); ids_restore [B, L]. Returns pixel predictions [B, L, p*p*3] and the decoder's last
        hidden tokens [B, L, dim], both in image order."""
        x = self.decoder_embed(x)  # [B, 1 + K, dim]
        B, L = ids_restore.shape
        fill = self.mask_token.to(x.dtype).expand(B, L + 1 - x.shape[1], -1)  # [B, L - K, dim]
        x_ = torch.cat([x[:, 1:], fill], 1)  # [B, L, dim], kept patches first
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, L, dim], image order
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos_embed  # [B, 1 + L, dim]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, 1:]  # [B, L, dim], cls dropped
        return self.decoder_pred(x), x

    def heads(self, tokens, online):
        """Rows for the MLP heads: the mean of the tokens (pooled) or every token [N, D]; the online
        side runs projector then predictor on each view's rows apart (BatchNorm per view, public code)."""
        rows = tokens.mean(1) if self.supervision == 'pooled' else tokens.flatten(0, 1)  # [2B, D] or [2B*T, D]
        if not online:
            return self.target_projector(rows)
        return torch.cat([self.head_predictor(self.head_projector(r)) for r in rows.chunk(2)])

    def forward(self, batch):
        img1, img2 = batch['img'], batch['img2']  # [B, 3, H, W] each; view 2 is the colour-augmented one
        if 'view2' in batch:  # its colour augmentations, drawn by the data workers, applied here on the device
            img2 = view2(img2, batch['view2'])
        B = img1.shape[0]
        (ids1, mask1, restore1), (ids2, _, restore2) = two_view_masking(
            torch.rand(B, self.num_patches, device=img1.device), self.mask_ratio)
        # both views through the online encoder in one batch, each with its own visible patches
        z = encode(self, torch.cat([img1, img2]), torch.cat([ids1, ids2]))  # [2B, 1 + K, D]
        if self.steer == 'visible':
            pred, _ = self.forward_decoder(z[:B], restore1)  # [B, L, p*p*3]
            online, pos = z[:, 1:], torch.cat([ids1, ids2])  # [2B, K, D]; their positions [2B, K]
        else:  # Tab. 4a "unmasked/masked": the decoder's hidden tokens at every position, both views
            pred, hidden = self.forward_decoder(z, torch.cat([restore1, restore2]))  # [2B, L, .], [2B, L, dim]
            online, pos, pred = self.head_steer(hidden), None, pred[:B]  # [2B, L, D]
        loss_mae = forward_loss(img1, pred, mask1, self.patch_size, self.norm_pix_loss)  # Eq. (1), view 1 only
        with torch.no_grad():  # the target: full views, swapped so that row i faces the other view
            ids_t = None
            if self.target_mask_ratio > 0:  # Tab. 4e: the target sees a random subset too
                ids_t = common.random_masking(torch.rand(2 * B, self.num_patches, device=img1.device), self.target_mask_ratio)[0]
            t = encode(self.target_encoder, torch.cat([img2, img1]), ids_t)[:, 1:]  # [2B, L', D]
            if self.supervision == 'token' and pos is not None:  # the target's tokens where the online ones are
                t = torch.gather(t, 1, pos.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # [2B, K, D]
            target = self.heads(t, online=False)  # [N, D]
        loss_context = context_loss(self.heads(online, online=True), target)  # Eq. (2), both directions
        return loss_mae + self.context_weight * loss_context, {'mae': loss_mae, 'context': loss_context}  # Eq. (3)


@torch.no_grad()
def reconstruct(model, img, mask_seed=0):
    """MAE-style reconstruction for visualization: returns mask [B, L] (1 = masked) and the predicted
    image [B, 3, H, W] in ImageNet-normalized space, every patch predicted. A --norm-pix-loss model
    predicts each patch's normalized pixels; they are mapped back with that patch's true mean and
    variance taken from `img` (as MAE's visualization demo does), so the colours of masked patches are
    borrowed from the image, not predicted. Call model.eval() first."""
    B, p = img.shape[0], model.patch_size
    g = torch.Generator(device=img.device).manual_seed(mask_seed)
    ids_keep, mask, ids_restore = common.random_masking(torch.rand(B, model.num_patches, generator=g, device=img.device),
                                                        model.mask_ratio)
    pred, _ = model.forward_decoder(encode(model, img, ids_keep), ids_restore)  # [B, L, p*p*3]
    if model.norm_pix_loss:
        target = common.patchify(img, p)  # [B, L, p*p*3]
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** .5 + target.mean(-1, keepdim=True)
    return mask, common.unpatchify(pred.float(), p, model.patch_embed.grid)


# ----------------------------------------------------------------------------------------------
# Loss


def forward_loss(img, pred, mask, patch_size, norm_pix=True):
    """Eq. (1), MAE's loss: per-patch MSE to the pixels, each target patch normalized by its own mean
    and (unbiased) variance with norm_pix, averaged over the masked patches only.
    img: [B, 3, H, W]; pred: [B, L, p*p*3]; mask: [B, L], 1 = masked."""
    target = common.patchify(img, patch_size)  # [B, L, p*p*3]
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
    loss = ((pred.float() - target) ** 2).mean(-1)  # [B, L]
    return (loss * mask).sum() / mask.sum()


def context_loss(q, z):
    """Sec. 3.0.5, Eq. (2): the cosine distance 2 - 2 cos(q, z) = |q/|q| - z/|z||^2, averaged over
    rows. Rows stack (view 1 online, view 2 target) on (view 2 online, view 1 target), so the mean
    is the symmetrized loss, the average of the two directions (public code). q, z: [N, D]."""
    return (2 - 2 * (F.normalize(q.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1)).mean()


# ----------------------------------------------------------------------------------------------
# Main


def resize_short_side(img, size):
    """Resize (bicubic) so that the short side is `size`, keeping the aspect ratio (torchvision's
    Resize(int)). JPEGs are first decoded at a reduced scale that stays above the result (PIL draft)."""
    W, H = img.size
    w, h = (size, int(size * H / W)) if W <= H else (int(size * W / H), size)
    if (w, h) == (W, H):
        return img.convert('RGB')
    img.draft('RGB', (w, h))
    return img.convert('RGB').resize((w, h), Image.BICUBIC)


def simple_resized_crop(rng, img, size, pad=4):
    """DeiT III's simple resized crop (Sec. 3.0.4): short side resized to `size`, the image padded
    by `pad` px by reflection, then a random size x size crop: the crop spans the whole short side
    up to the padding, so both views show nearly the whole image."""
    a = np.asarray(resize_short_side(img, size))  # [h, w, 3], min(h, w) = size
    a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode='reflect')  # [h + 2 pad, w + 2 pad, 3]
    top, left = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
    return Image.fromarray(a[top:top + size, left:left + size])


def view2_params(rng):
    """LUT's view 2 (Sec. 5.1.2): jitter (0.4, 0.4, 0.2, 0.1) w.p. 0.8, then exactly one of grayscale,
    solarize, blur (sigma ~ U[0.1, 2], SimCLR / BYOL), chosen uniformly instead of BYOL's independent
    coins. Returns float32 [10]: jitter_params (identity when skipped), the op (0 gray, 1 solarize,
    2 blur) and sigma."""
    identity = np.array([1, 1, 1, 0, 0, 1, 2, 3], np.float32)  # jitter_params with every op off
    jitter = common.jitter_params(rng, 0.4, 0.4, 0.2, 0.1) if rng.random() < 0.8 else identity
    k = rng.integers(3)
    return np.append(jitter, [k, rng.uniform(0.1, 2.0) if k == 2 else 0.0]).astype(np.float32)


def solarize(x, threshold=128):
    """ImageOps.solarize: invert every pixel >= threshold (BYOL: 128 of 255). x in [0, 1]."""
    return torch.where(x >= (threshold - 0.5) / 255, 1 - x, x)


def gaussian_blur(x, sigma, radius=6):
    """ImageFilter.GaussianBlur(sigma) per image: x [B, C, H, W]; sigma [B] (0: unchanged). A separable
    kernel of 2 radius + 1 taps (3 sigma at the largest sigma, 2), edges replicated as PIL does."""
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-0.5 * (t / sigma.clamp(min=1e-3)[:, None]) ** 2)  # [B, K]; sigma 0 -> the identity
    w = (w / w.sum(1, keepdim=True)).view(-1, 1, 1, 2 * radius + 1)  # [B, 1, 1, K]
    H, W = x.shape[-2:]
    x = F.pad(x, (radius, radius, 0, 0), mode='replicate')  # shifted slices, not a conv: no autocast, no bf16
    x = sum(w[..., k:k + 1] * x[..., k:k + W] for k in range(2 * radius + 1))  # [B, C, H, W]
    x = F.pad(x, (0, 0, radius, radius), mode='replicate')
    return sum(w[..., k:k + 1] * x[..., k:k + H, :] for k in range(2 * radius + 1))


def view2(img, params):
    """LUT's view-2 colour augmentation on the device: img ImageNet-normalized [B, 3, H, W]; params
    [B, 10] from view2_params. Returns the augmented view, ImageNet-normalized."""
    x = common.color_jitter(common.unnormalize(img), params[:, :8])
    k = params[:, 8].view(-1, 1, 1, 1)
    x = torch.where(k == 0, common.luma(x).expand_as(x), torch.where(k == 1, solarize(x), gaussian_blur(x, params[:, 9])))
    return common.renormalize_unit(x)


def train_transform(args):
    """Two views per image (Sec. 3.0.4, 5.1.2), crop and flip drawn independently; view 2 also gets
    colour jitter (p 0.8) and one of grayscale / solarize / blur: their parameters are drawn here
    (view2_params) and applied on the device, in forward (view2)."""
    def view(rng, img):
        if args.views == 'src':
            return common.hflip(rng, simple_resized_crop(rng, img, args.img_size))
        return common.hflip(rng, common.random_resized_crop(rng, img, args.img_size, (0.2, 1.0)))  # MAE's RRC

    def transform(rng, img):
        if args.views == 'src':
            img = resize_short_side(img, args.img_size)  # once for both views (then a no-op in each)
        return {'img': common.to_tensor(view(rng, img)), 'img2': common.to_tensor(view(rng, img)),
                'view2': torch.from_numpy(view2_params(rng))}
    return transform


def main():
    args = get_args()
    torch.manual_seed(args.seed)  # the same initial weights in every run with this seed
    model = LUT(args)
    if args.lr is None:  # the released code's rule (the loop would apply MAE's linear one)
        args.lr = lr_from_blr(args.blr, args.batch_size * args.accum_iter * int(os.environ.get('WORLD_SIZE', 1)))
    dataset = common.build_dataset(args, train_transform(args))
    common.train(args, model, dataset)


if __name__ == '__main__':
    common.run(main)
