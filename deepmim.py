"""DeepMIM: Deep Supervision for Masked Image Modeling (Ren et al., 2023, arXiv:2303.08817).

MAE with deep supervision: besides the usual decoder on the last encoder block, independent
lightweight decoders (own embedding, mask token, 4 blocks at width 512, norm and prediction) read
the outputs of intermediate blocks (6, 8, 10 of ViT-B, before the final norm) and reconstruct the
masked patches too; the loss is the unweighted sum of all decoders' losses (Eq. 2). Optionally
(DeepMIM-dagger) a frozen pretrained MAE reconstructs the masked image and the shallow decoders
regress a blend of it with the real image, more of the reconstruction the shallower (Eq. 1). The
same decoders can regress CLIP features instead of pixels (DeepMIM-MAE-CLIP). `--taps ''
--decoder-depth 8` is plain MAE, whose official checkpoints load into this model as they are.

  torchrun --nproc_per_node=8 deepmim.py --data /imagenet                    # DeepMIM-MAE, ViT-B/16, 1600 epochs
  torchrun --nproc_per_node=8 deepmim.py --data /imagenet --hybrid-mae mae_visualize_vit_large.pth  # DeepMIM-dagger
  torchrun --nproc_per_node=8 deepmim.py --data /imagenet --target clip --teacher ViT-B-16.pt      # DeepMIM-MAE-CLIP
  torchrun --nproc_per_node=8 deepmim.py --data /imagenet --taps '' --decoder-depth 8            # plain MAE
  python deepmim.py --data synthetic --model vit_pico --img-size 32 --patch-size 4 --taps 2,3 --decoder-dim 128 \
      --decoder-heads 4 --batch-size 64 --epochs 4 --warmup-epochs 1 --synthetic-size 4000 --blr 2e-3 --output-dir out/quick_deepmim  # CPU

Expected (Tab. 2, ImageNet top-1 after fine-tuning, ViT-B/16): 1600 epochs: MAE 83.6, DeepMIM-MAE
84.0, DeepMIM-dagger-MAE 84.2, DeepMIM-MAE-CLIP 85.6; 300 epochs: 82.6 / 83.4 / 83.6 / 84.8. The CPU
run takes a few minutes on two cores and every decoder's loss (loss_b2 ... loss_b4) falls.
"""
import argparse
import fractions

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------
# Arguments


def parse_taps(text):
    try:
        return tuple(sorted({int(t) for t in text.split(',') if t.strip()}))
    except ValueError:
        raise common.UsageError(f"--taps '{text}': give 1-indexed block numbers such as 6,8,10, or '' for plain MAE") from None


def parse_alphas(text):
    try:
        return tuple(float(fractions.Fraction(t.strip())) for t in text.split(','))
    except ValueError:
        raise common.UsageError(f"--alphas '{text}': give numbers or fractions such as 0,1/3,2/3,1") from None


def get_args(argv=None):
    parser = common.get_parser(__doc__)
    parser.add_argument('--mask-ratio', type=float, default=0.75, help='App. A: 75%% of the patches are masked (MAE)')
    parser.add_argument('--taps', type=parse_taps, default=(6, 8, 10),
                        help="Sec. 3, Tab. 8: extra decoders on these blocks; '' = MAE")
    parser.add_argument('--decoder-depth', type=int, default=4,
                        help='Sec. 3: 4 blocks per decoder, the last one too (MAE: 8)')
    parser.add_argument('--decoder-dim', type=int, default=512, help='decoder width (MAE, official DeepMIM)')
    parser.add_argument('--decoder-heads', type=int, default=16, help='decoder heads (MAE, official DeepMIM)')
    parser.add_argument('--norm-pix-loss', action=argparse.BooleanOptionalAction, default=True,
                        help='per-patch normalized pixel targets (MAE recipe; paper silent; the official command sets it)')
    parser.add_argument('--target', choices=['pixel', 'clip'], default='pixel',
                        help='Tab. 2, 11: pixels, or CLIP-B/16 features')
    parser.add_argument('--teacher', default=None, help="OpenAI CLIP ViT-B-16.pt for --target clip (frozen, not saved)")
    parser.add_argument('--hybrid-mae', default=None,
                        help='Sec. 3: frozen MAE with decoder (mae_visualize_vit_*.pth) for hybrid targets')
    parser.add_argument('--hybrid-model', default='vit_large', help='architecture of --hybrid-mae (the paper names no size)')
    parser.add_argument('--alphas', type=parse_alphas, default=None,
                        help='Eq. 1 blending ratio per decoder, taps then last (Tab. 9: 0,1/3,2/3,1; '
                             'default: evenly spaced 0..1)')
    parser.add_argument('--crop-scale', type=float, nargs=2, default=(0.2, 1.0), help='RandomResizedCrop scale (MAE)')
    parser.set_defaults(
        model='vit_base', img_size=224,         # Sec. 5: ViT-B/16 at 224
        batch_size=512,                         # x 8 GPUs = 4096 (App. A)
        blr=1.5e-4,                             # App. A (MAE) and the official command
        epochs=1600, warmup_epochs=40,          # Tab. 2 (ablations: 300 epochs); App. A: 40 warmup
        weight_decay=0.05, betas=(0.9, 0.95),   # App. A; betas from MAE (official DeepMIM code too)
        min_lr=0.0, clip_grad=None,             # MAE's half-cycle cosine to 0, no clipping
        output_dir='out/deepmim')
    args = parser.parse_args(argv)  # the shared flags are checked there (common.validate_args)
    if not 0 < args.mask_ratio < 1:
        raise common.UsageError(f"--mask-ratio {args.mask_ratio}: must be in (0, 1), the fraction of patches masked")
    return args


# ----------------------------------------------------------------------------------------------
# Model


class Decoder(nn.Module):
    """One extra decoder of deep supervision: own embedding, mask token, blocks, norm and prediction."""

    def __init__(self, in_dim, dim, depth, heads, out_dim):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([common.Block(dim, heads, 4.0, None, 0.0, nn.GELU(), 1e-6) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)


class DeepMIM(common.VisionTransformer):
    """MAE's encoder (timm names, fixed sin-cos pos embed) and last-block decoder under the official
    MAE names (mask_token, decoder_embed, decoder_pos_embed, decoder_blocks, decoder_norm,
    decoder_pred), plus one `Decoder` per tap in `aux_decoders['6']` etc. The frozen hybrid MAE
    (`hybrid_mae`) and CLIP teacher (`teacher`, `teacher_proj`) are not saved.
    Masks: [B, L], 1 = masked (removed from the encoder's input)."""
    frozen_prefixes = ('hybrid_mae.', 'teacher')

    def __init__(self, args):
        width, depth, heads = common.model_size(args.model)
        super().__init__(img_size=args.img_size, patch_size=args.patch_size, embed_dim=width, depth=depth,
                         num_heads=heads, drop_path_rate=args.drop_path, pos_embed='sincos')
        if any(not 1 <= t < depth for t in args.taps):
            raise common.UsageError(f"--taps must be block numbers from 1 to {depth - 1} ({args.model} has {depth} "
                                    "blocks; the last one always has its decoder)")
        if args.decoder_dim % args.decoder_heads:
            raise common.UsageError(f"--decoder-dim {args.decoder_dim} is not divisible by --decoder-heads {args.decoder_heads}")
        self.taps, self.mask_ratio, self.norm_pix, self.target = args.taps, args.mask_ratio, args.norm_pix_loss, args.target
        self.teacher, self.hybrid_mae = None, None
        teacher = load_clip_teacher(args, self.patch_embed.grid) if args.target == 'clip' else None
        out_dim = teacher[1].shape[1] if teacher else args.patch_size ** 2 * 3  # CLIP: proj width (512)
        d = args.decoder_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_embed = nn.Linear(width, d)
        # fixed 2D sin-cos table with a zero cls slot; the official DeepMIM code shares one such table by all decoders
        self.decoder_pos_embed = nn.Parameter(common.sincos_pos_embed(d, *self.patch_embed.grid, cls_token=True)[None],
                                              requires_grad=False)  # [1, 1 + L, d]
        self.decoder_blocks = nn.ModuleList([common.Block(d, args.decoder_heads, 4.0, None, 0.0, nn.GELU(), 1e-6)
                                             for _ in range(args.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, out_dim)
        # independent decoders: Tab. 10, one decoder shared by all blocks loses 2.0 points
        self.aux_decoders = nn.ModuleDict({str(t): Decoder(width, d, args.decoder_depth, args.decoder_heads, out_dim)
                                           for t in self.taps})
        self.init_weights()  # MAE's init again, now that the decoders exist: xavier linears
        for p in [self.mask_token] + [dec.mask_token for dec in self.aux_decoders.values()]:
            nn.init.normal_(p, std=.02)  # MAE: mask token N(0, .02)
        if teacher:
            self.teacher, proj = teacher
            self.teacher_proj = nn.Parameter(proj, requires_grad=False)  # [W, 512], used as x @ proj
            if (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda') and args.precision in (None, 'bf16'):
                self.teacher.to(torch.bfloat16)  # once: autocast would re-cast frozen weights every step (it caches trainable ones)
                self.teacher_proj.data = self.teacher_proj.data.to(torch.bfloat16)
        self.alphas = (1.0,) * (len(self.taps) + 1)  # plain DeepMIM: alpha = 1, raw pixels for all (Sec. 3)
        if args.hybrid_mae:
            self.hybrid_mae, self.alphas = load_hybrid_mae(args), hybrid_alphas(args)
        elif args.alphas is not None:
            raise common.UsageError("--alphas blends with the reconstructions of --hybrid-mae: give --hybrid-mae too")

    def train(self, mode=True):
        super().train(mode)
        for m in (self.teacher, self.hybrid_mae):
            if m is not None:
                m.eval()  # frozen parts stay in eval mode
        return self

    def decoders(self):
        """(log name, embed, mask token, blocks, norm, pred) per decoder: the taps' in block order, then the last."""
        out = [(f'b{t}', d.embed, d.mask_token, d.blocks, d.norm, d.pred) for t, d in self.aux_decoders.items()]
        return out + [(f'b{self.depth}', self.decoder_embed, self.mask_token, self.decoder_blocks,
                       self.decoder_norm, self.decoder_pred)]

    def forward_encoder(self, img, ids_keep):
        """The visible patches through the encoder: [block t output for t in taps] (before the final
        norm, as the official code) + [last block output after the norm], each [B, 1 + K, D]."""
        x = self.add_pos(self.patch_embed(img))  # [B, L, D]
        x = self.add_cls(torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])))  # MAE: visible only
        outs, start = [], 0
        for t in self.taps:  # Sec. 3, Multi-decoder: the deep supervision taps, 1-indexed blocks
            x = self.run_blocks(x, self.blocks[start:t])
            outs.append(x)
            start = t
        return outs + [self.norm(self.run_blocks(x, self.blocks[start:]))]

    def forward_decoder(self, x, ids_restore, embed, mask_token, blocks, norm, pred):
        """MAE's decoder: encoded visible tokens x [B, 1 + K, D] -> predictions [B, L, out] for all patches."""
        x = embed(x)  # [B, 1 + K, d]
        B, K, L = x.shape[0], x.shape[1] - 1, ids_restore.shape[1]
        x_ = torch.cat([x[:, 1:], mask_token.to(x.dtype).expand(B, L - K, -1)], 1)  # [B, L, d] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, L, d] unshuffled
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos_embed  # [B, 1 + L, d]
        for blk in blocks:
            x = blk(x)
        return pred(norm(x))[:, 1:]  # [B, L, out], cls dropped

    def predict(self, img, ids_keep, ids_restore):
        """Every decoder's prediction [B, L, out], the taps' first, the last block's at the end."""
        feats = self.forward_encoder(img, ids_keep)
        return [self.forward_decoder(f, ids_restore, *parts) for f, (_, *parts) in zip(feats, self.decoders())]

    def targets(self, img, ids_keep, ids_restore):
        """One target [B, L, P] per decoder (unnormalized: norm_pix is applied in the loss)."""
        if self.target == 'clip':  # the full image's CLIP patch features, for every decoder (Tab. 11)
            with torch.no_grad():
                x = common.renormalize(img, common.CLIP_MEAN, common.CLIP_STD)  # the same crop, CLIP's normalization
                size = self.teacher.patch_embed.grid[0] * self.teacher.patch_size
                if x.shape[-1] != size:  # same grid, other patch size: resize for the teacher
                    x = F.interpolate(x, size=(size, size), mode='bicubic', align_corners=False)
                t = self.teacher.forward_features(x.to(self.teacher_proj.dtype))[:, 1:]  # after ln_post: [B, L, W]
                t = t.to(self.teacher_proj.dtype) @ self.teacher_proj  # proj: [B, L, 512]
            return [t] * len(self.alphas)
        x = common.patchify(img, self.patch_size)  # [B, L, p*p*3] ImageNet-normalized pixels
        if self.hybrid_mae is None:
            return [x] * len(self.alphas)
        with torch.no_grad():  # the frozen MAE reconstructs the image masked with the student's own mask
            x_hat = self.hybrid_mae.predict(img, ids_keep, ids_restore)[-1].float()  # [B, L, p*p*3]
        # mae_visualize models were trained without norm_pix_loss, so x_hat lives in the same
        # ImageNet-normalized pixel space as x: blend there (Eq. 1); norm_pix comes after, in the loss
        return hybrid_targets(x, x_hat, self.alphas)

    def forward(self, batch):
        img = batch['img']  # [B, 3, H, W], ImageNet-normalized
        noise = torch.rand(img.shape[0], self.num_patches, device=img.device)  # [B, L]
        ids_keep, mask, ids_restore = common.random_masking(noise, self.mask_ratio)  # [B, K], [B, L], [B, L]
        preds = self.predict(img, ids_keep, ids_restore)
        targets = self.targets(img, ids_keep, ids_restore)
        logs = {}
        for (name, *_), pred, target in zip(self.decoders(), preds, targets):
            logs[f'loss_{name}'] = (cosine_loss(pred, target, mask) if self.target == 'clip'
                                    else forward_loss(pred, target, mask, self.norm_pix))
        return sum(logs.values()), logs  # Eq. 2: the unweighted sum over the M + 1 decoders


def hybrid_alphas(args):
    """Eq. 1 ratios, one per decoder (taps, then last). Default: evenly spaced from 0 (the shallowest
    regresses the pure reconstruction) to 1 (the last regresses the image): 0, 1/3, 2/3, 1 (Tab. 9)."""
    m = len(args.taps)
    alphas = args.alphas if args.alphas is not None else tuple(i / m for i in range(m + 1)) if m else (1.0,)
    if len(alphas) != m + 1:
        raise common.UsageError(f"--alphas has {len(alphas)} values: give one per tap plus one for the last block ({m + 1})")
    return alphas


def hybrid_targets(x, x_hat, alphas):
    """Eq. 1: t_i = alpha_i * x + (1 - alpha_i) * x_hat for every decoder i."""
    return [a * x + (1 - a) * x_hat for a in alphas]


def load_hybrid_mae(args):
    """The frozen hybrid target generator: an official MAE with its decoder (mae_visualize_vit_*.pth
    or *_full.pth), built as our plain MAE (no taps) with --hybrid-model's encoder and the file's decoder."""
    path = args.hybrid_mae
    sd = common.encoder_state_dict(common.read_checkpoint(path, 'hybrid MAE'), path)
    if 'decoder_embed.weight' not in sd or 'patch_embed.proj.weight' not in sd:
        raise common.UsageError(f"{path} holds no MAE decoder: use mae_visualize_vit_large.pth (or *_full.pth), "
                                "not the encoder-only mae_pretrain_*.pth")
    p, d = sd['patch_embed.proj.weight'].shape[-1], sd['decoder_embed.weight'].shape[0]
    if p != args.patch_size:
        raise common.UsageError(f"{path} has patch size {p}; the hybrid MAE must share --patch-size {args.patch_size} "
                                "to reconstruct with the same mask")
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('decoder_blocks.'))
    mae = DeepMIM(argparse.Namespace(**{
        **vars(args), 'model': args.hybrid_model, 'taps': (), 'drop_path': 0.0, 'target': 'pixel', 'hybrid_mae': None,
        'alphas': None, 'decoder_depth': depth, 'decoder_dim': d, 'decoder_heads': max(1, d // 32)}))  # MAE: 512 / 16 heads
    own = mae.state_dict()
    for k in ('pos_embed', 'decoder_pos_embed'):  # fixed sin-cos tables: ours fit this image size
        if k in sd and sd[k].shape != own[k].shape:
            sd[k] = own[k]
    bad = sorted(set(own) ^ set(sd)) + [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                                       if k in sd and sd[k].shape != v.shape]
    if bad:
        raise common.UsageError(f"{path} does not fit a {args.hybrid_model} MAE ({len(bad)} differing keys, first: "
                                f"{', '.join(bad[:2])}): set --hybrid-model to the file's architecture")
    mae.load_state_dict(sd)
    return mae.requires_grad_(False).eval()


def load_clip_teacher(args, grid):
    """OpenAI CLIP's image tower, frozen: (vit, proj [W, 512])."""
    if not args.teacher:
        raise common.UsageError("--target clip needs --teacher PATH (OpenAI CLIP ViT-B-16.pt)")
    if args.hybrid_mae:
        raise common.UsageError("--hybrid-mae blends pixels: it does not combine with --target clip (Sec. 5)")
    vit, proj = common.load_clip_visual(args.teacher)
    if vit.patch_embed.grid != grid:
        raise common.UsageError(f"the CLIP teacher sees a {vit.patch_embed.grid} grid of patches, the student {grid}: "
                                "choose --img-size / --patch-size giving the same grid")
    return vit.requires_grad_(False).eval(), proj


# ----------------------------------------------------------------------------------------------
# Loss


def norm_pix(target):
    """MAE's norm_pix_loss target: each patch [B, L, P] as (t - mean) / sqrt(var + 1e-6), unbiased var."""
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return (target - mean) / (var + 1e-6) ** .5


def forward_loss(pred, target, mask, norm_pix_loss=True):
    """Eq. 2, one term ||M(t_i) - p_i||^2: the MSE per patch, averaged over the masked patches (MAE).
    pred, target: [B, L, P]; mask: [B, L], 1 = masked."""
    target = norm_pix(target) if norm_pix_loss else target
    loss = ((pred.float() - target) ** 2).mean(-1)  # [B, L]
    return (loss * mask).sum() / mask.sum()


def cosine_loss(pred, target, mask):
    """CLIP target: 2 - 2 cos(pred, target) per patch, averaged over the masked patches (official code)."""
    loss = 2 - 2 * F.cosine_similarity(pred.float(), target.float(), dim=-1)  # [B, L]
    return (loss * mask).sum() / mask.sum()


@torch.no_grad()
def reconstruct(model, img, mask_seed=0):
    """Pixels predicted by the last decoder for every patch (visible ones included), for figures.
    img: [B, 3, H, W] ImageNet-normalized. Returns (mask [B, L], 1 = masked; pred [B, 3, H, W] in the
    same normalized space). A norm_pix_loss model predicts each patch only up to its mean and
    variance, which the visible patches do not determine: its output is mapped back with the true
    patch's own mean and variance, taken from img (a visualization aid, not a reconstruction)."""
    if model.target != 'pixel':
        raise common.UsageError("only pixel-target models reconstruct images (this one predicts CLIP features)")
    noise = torch.rand(img.shape[0], model.num_patches, generator=torch.Generator().manual_seed(mask_seed))
    ids_keep, mask, ids_restore = common.random_masking(noise.to(img.device), model.mask_ratio)
    was_training = model.training
    pred = model.eval().predict(img, ids_keep, ids_restore)[-1].float()  # [B, L, p*p*3]
    model.train(was_training)
    if model.norm_pix:
        x = common.patchify(img, model.patch_size)  # [B, L, p*p*3]
        pred = pred * (x.var(-1, keepdim=True) + 1e-6) ** .5 + x.mean(-1, keepdim=True)
    return mask, common.unpatchify(pred, model.patch_size, model.patch_embed.grid)


# ----------------------------------------------------------------------------------------------
# Main


def train_transform(args):
    """RandomResizedCrop (scale 0.2-1, bicubic) + flip (MAE); the mask is drawn on the device."""
    def transform(rng, img):
        img = common.hflip(rng, common.random_resized_crop(rng, img, args.img_size, tuple(args.crop_scale)))
        return {'img': common.to_tensor(img)}
    return transform


def main():
    args = get_args()
    torch.manual_seed(args.seed)  # the same initial weights in every run with this seed
    model = DeepMIM(args)
    dataset = common.build_dataset(args, train_transform(args))
    common.train(args, model, dataset)


if __name__ == '__main__':
    common.run(main)
