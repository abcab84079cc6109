"""Improve Supervised Representation Learning with Masked Image Modeling (SupMIM; Chen et al., 2023, arXiv:2312.00950).

Supervised ViT training with a masked-image-modeling task on the same batch. Each step runs the
shared encoder twice and backpropagates once (Sec. 3.4): (1) the full image -> global average
pooling -> classifier with a sigmoid cross-entropy on the labels; (2) the image with 20% of its
patches dropped, MAE style -> a one-layer transformer decoder that sees the encoded visible tokens
in place and their average [E] at the masked places -> the frozen VQGAN's token id of every patch
(cross-entropy on all tokens). L = L_CE + lambda * L_MIM; the decoder is thrown away after training.

  torchrun --nproc_per_node=8 supmim.py --data /imagenet --tokenizer vqgan_imagenet_f16_1024/last.ckpt  # ViT-B/14, 300 epochs
  torchrun --nproc_per_node=8 supmim.py --data /imagenet --mim-weight 0      # the supervised baseline (same recipe)
  python supmim.py --data synthetic --model vit_pico --img-size 32 --patch-size 4 --target pixels \
      --batch-size 64 --accum-iter 1 --epochs 4 --warmup-steps 20 --synthetic-size 4000 --blr 5e-4 --output-dir out/quick_supmim  # CPU, ~1 min

Expected: ViT-B/14, ImageNet-1k, 300 epochs: 81.72% val top-1 against 79.71% for the baseline
(Tab. 2), ImageNet k-NN recall@1 79.47% against 78.15% (Tab. 4). Every run ends by printing the
classifier's top-1 on DIR/val (or the synthetic val split): `val top-1 XX.XX%`.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import common

# ----------------------------------------------------------------------------------------------
# Arguments


def get_args(argv=None):
    parser = common.get_parser(__doc__)
    parser.add_argument('--mim-weight', type=float, default=1.0, help='lambda in Eq. 3 (Sec. 4.1); 0 = supervised baseline')
    parser.add_argument('--target', choices=['tokens', 'pixels'], default='tokens',
                        help='tokens: VQGAN ids (the paper, Sec. 3.3); pixels: per-patch normalized pixels (Fig. 1)')
    parser.add_argument('--tokenizer', default=None, help="taming-transformers' vqgan_imagenet_f16_1024 last.ckpt")
    parser.add_argument('--tokenizer-size', type=int, default=None,
                        help="VQGAN input size (default: patch grid x the VQGAN's downsampling, 256 for ViT/14 at 224, Sec. 4.1)")
    parser.add_argument('--mask-ratio', type=float, default=0.2, help='Sec. 4.1: constant 20%% (Fig. 3 sweeps 5-95%%)')
    parser.add_argument('--decoder-depth', type=int, default=1, help='Sec. 3.1, Fig. 3: one transformer layer')
    parser.add_argument('--pool-cls', choices=['gap', 'cls'], default='gap', help='Fig. 4: classifier input, GAP or [CLS]')
    parser.add_argument('--pool-mim', choices=['gap', 'cls'], default='gap', help='Fig. 4: [E], GAP of the visible tokens or [CLS]')
    parser.add_argument('--mask-cls-input', action='store_true', help='Fig. 5: the classifier sees the masked image too')
    parser.add_argument('--crop-scale', type=float, nargs=2, default=(0.05, 1.0), help="AugReg's inception crop area range")
    parser.add_argument('--randaug', type=float, nargs=2, default=(2, 15), metavar=('OPS', 'MAGNITUDE'),
                        help="AugReg 'medium2' for B/16 and L/16 on ImageNet-1k: big_vision's randaug(2, 15)")
    parser.add_argument('--mixup', type=float, default=0.5, help="AugReg 'medium2': mixup alpha 0.5 (0 = off)")
    parser.add_argument('--dropout', type=float, default=0.1, help="AugReg ViT-B/16 i1k 300ep ('do_0.1' in its checkpoint "
                        "names): after the embedding, the attention output and inside and after the MLP (big_vision ViT)")
    parser.add_argument('--head-bias', type=float, default=-6.9,
                        help="big_vision vit_i1k.py init_head_bias = -6.9 = -log(1000): sigmoids start at 1/1000")
    parser.set_defaults(
        model='vit_base', patch_size=14, img_size=224,  # Sec. 4.1: ViT-B/14 at 224 -> 16 x 16 = 256 tokens
        batch_size=256, accum_iter=2,    # x 8 GPUs = 4096 (Tab. 1). Saved activations ~208 MiB/img under bf16
                                         # (158 without the dropout masks): ~52 GiB at 256, ~104 GiB at 512 per GPU
        blr=6.25e-5,                     # Tab. 1: lr 1e-3 at batch 4096 (an absolute value; = 6.25e-5 per 256)
        epochs=300, warmup_steps=10000,  # Tab. 1: 300 epochs on IN-1k, 10k warmup steps then cosine
        betas=(0.9, 0.96),               # Tab. 1
        weight_decay=None,               # Tab. 1: 0.03 (B), 0.1 (L); set from --model below
        drop_path=0.1,                   # AugReg ViT-B/16 i1k 300ep: stochastic depth 0.1 ('sd_0.1')
        min_lr=0.0, clip_grad=1.0,       # paper silent; big_vision's vit_i1k.py: grad_clip_norm 1.0
        output_dir='out/supmim')
    args = parser.parse_args(argv)
    if args.weight_decay is None:
        args.weight_decay = 0.1 if args.model in ('vit_large', 'vit_huge') else 0.03
    if not 0 <= args.mask_ratio < 1:
        raise common.UsageError(f"--mask-ratio must be in [0, 1) (got {args.mask_ratio})")
    args.num_classes = len(common.SyntheticImages.SHAPES) if args.data == 'synthetic' else None  # else main() sets it
    return args


# ----------------------------------------------------------------------------------------------
# Model


class SupMIM(common.VisionTransformer):
    """A ViT classifier (`head`, timm names) plus the MIM decoder (`decoder_*`) and the frozen VQGAN
    (`tokenizer.*`, never saved). GAP for both tasks means no [CLS] token at all (Sec. 3.1, Fig. 4)."""
    frozen_prefixes = ('tokenizer.',)
    # big_vision decays only kernels (optax.py: wd_mults [('.*/kernel$', 1.0)]): no decay on the embeddings either
    no_weight_decay = ('pos_embed', 'cls_token', 'decoder_pos_embed')

    def __init__(self, args):
        width, depth, heads = common.model_size(args.model)
        super().__init__(img_size=args.img_size, patch_size=args.patch_size, embed_dim=width, depth=depth,
                         num_heads=heads, num_classes=args.num_classes, drop_path_rate=args.drop_path,
                         class_token='cls' in (args.pool_cls, args.pool_mim), global_pool='token')
        if args.dropout:  # big_vision's dropout sites, put in this ViT's parameter-free slots (state dict unchanged)
            self.norm_pre = nn.Dropout(args.dropout)  # after the position embedding
            for blk in self.blocks:
                blk.ls1, blk.ls2 = nn.Dropout(args.dropout), nn.Dropout(args.dropout)  # attention out, MLP out
                blk.mlp.act = nn.Sequential(blk.mlp.act, nn.Dropout(args.dropout))  # between the MLP's two layers
        # big_vision ViT: zero classifier weights (head_zeroinit); bias -6.9 (vit_i1k.py's init_head_bias)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, args.head_bias)
        self.pool_cls, self.pool_mim, self.mask_cls_input = args.pool_cls, args.pool_mim, args.mask_cls_input
        self.mim_weight, self.mask_ratio, self.target = args.mim_weight, args.mask_ratio, args.target
        self.mixup_alpha, self.num_classes = args.mixup, args.num_classes
        # lambda 0: no MIM branch, built or run: the baseline costs a supervised run's, DDP meets no unused parameter
        self.tokenizer = self.decoder_blocks = None
        if self.mim_weight == 0:
            return
        grid, out = self.patch_embed.grid, args.patch_size ** 2 * 3  # --target pixels: p*p*3 values per patch
        if args.target == 'tokens':
            self.tokenizer = load_vqgan(args.tokenizer)  # frozen; GroupNorm only: train() and eval() agree
            factor = 2 ** (len(self.tokenizer.encoder.down) - 1)
            size = self.tokenizer_size = args.tokenizer_size or grid[0] * factor
            if size != grid[0] * factor or grid[0] != grid[1]:  # Sec. 3.3: one token per patch
                t = f"{size / factor:g}"
                raise common.UsageError(f"the VQGAN's token grid ({t}x{t} at --tokenizer-size {size}) differs "
                                        f"from the encoder's patch grid ({grid[0]}x{grid[1]} at --img-size {args.img_size} "
                                        f"--patch-size {args.patch_size}): use --tokenizer-size {grid[0] * factor}, "
                                        "or ViT/14 at 224 with a 256 px VQGAN as the paper (Sec. 4.1)")
            out = self.tokenizer.quantize.embedding.num_embeddings  # 1024 logits per token
        # learned, like the encoder's 1D position embedding ("same set of parameters as the ViT-B
        # model", Sec. 3.1) and MAGE's decoder, whose [E]-filled layout SupMIM follows (Sec. 3.3)
        self.decoder_pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, self.num_patches, width), std=.02))
        self.decoder_blocks = nn.ModuleList([common.Block(width, heads, 4.0, None, 0.0, nn.GELU(), 1e-6)
                                             for _ in range(args.decoder_depth)])  # pre-LN layers at the encoder width
        self.decoder_norm, self.decoder_pred = nn.LayerNorm(width, eps=1e-6), nn.Linear(width, out)
        for m in [*self.decoder_blocks.modules(), self.decoder_pred]:
            if isinstance(m, nn.Linear):  # the encoder's init (MAE's xavier-uniform)
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def pool(self, x):
        """Sec. 3.1: GAP "averages the encoded token embeddings at the transformer output" (after the
        final norm, as [63]'s big_vision ViT), or the [CLS] token (Fig. 4). x [B, prefix + L', D] -> [B, D]."""
        return x[:, self.num_prefix:].mean(1) if self.pool_cls == 'gap' else x[:, 0]

    def classify(self, img, ids_keep=None):
        """Logits [B, C] of the classifier; ids_keep [B, K] encodes only those patches (Fig. 5)."""
        return self.head(self.pool(self.encode(img, ids_keep)))

    def encode(self, img, ids_keep=None):
        """The encoder on the visible patches only (MAE): [B, prefix + K, D] after the final norm."""
        x = self.add_pos(self.patch_embed(img))  # [B, L, D]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, D]
        return self.norm(self.run_blocks(self.add_cls(x)))

    @torch.compiler.disable  # host-side random numbers: keep them out of the compiled graph
    def mixup(self, img, labels):  # AugReg's: one lambda ~ Beta(a, a) per batch, with the reversed batch -> img, soft [B, C]
        rng = np.random.default_rng(int(torch.randint(2 ** 62, ())))  # CPU generator, seeded per step by the loop
        return common.mixup_cutmix(rng, img, labels, self.num_classes, mixup_alpha=self.mixup_alpha,
                                   cutmix_alpha=0.0, label_smoothing=0.0)

    def decoder_input(self, latent, ids_restore):
        """Sec. 3.3: "At the output of the encoder we produce a representation, denoted by [E], by applying GAP
        to the unmasked encoded patches ... the original masked positions are replaced by [E]." (or by [CLS],
        Fig. 4). latent [B, prefix + K, D], after the final norm; ids_restore [B, L] -> [B, L, D]."""
        x = latent[:, self.num_prefix:]  # [B, K, D]
        B, K, D = x.shape
        fill = latent[:, :1] if self.pool_mim == 'cls' else x.mean(1, keepdim=True)  # [B, 1, D]: [CLS] or [E] = GAP
        x = torch.cat([x, fill.expand(B, ids_restore.shape[1] - K, D)], 1)  # [B, L, D], kept tokens first
        return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # [B, L, D], original order

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_input(latent, ids_restore) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))  # [B, L, 1024 token logits or p*p*3 pixels]

    def tokenize(self, img, chunk=64):
        """VQGAN ids [B, L] of the image at the VQGAN's input size (256 px, Sec. 4.1), `chunk` images (~130 MiB each) at once."""
        x = common.renormalize(img.float(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # (p - 0.5) / 0.5 = 2p - 1
        if x.shape[-1] != self.tokenizer_size:
            x = F.interpolate(x, size=self.tokenizer_size, mode='bicubic', align_corners=False).clamp(-1, 1)
        return torch.cat([self.tokenizer.tokenize(c) for c in x.split(chunk)])  # [B, L]

    def forward(self, batch):
        img, labels = batch['img'], batch['label']  # [B, 3, H, W] normalized, [B]
        # the targets first: the VQGAN's temporaries are freed before the encoder's activations pile up
        ids = self.tokenize(img) if self.decoder_blocks is not None and self.target == 'tokens' else None
        ids_keep = ids_restore = None
        if self.decoder_blocks is not None or self.mask_cls_input:
            noise = torch.rand(img.shape[0], self.num_patches, device=img.device)
            ids_keep, _, ids_restore = common.random_masking(noise, self.mask_ratio)  # [B, K], _, [B, L]
        # (1) classification of the mixed image (Eq. 1), of its visible patches with --mask-cls-input (Fig. 5).
        # Mixup stays out of MIM: a blend of two photos is no natural image, its tokens a target of neither.
        mixed, targets = self.mixup(img, labels)
        loss_ce = sigmoid_cross_entropy(self.classify(mixed, ids_keep if self.mask_cls_input else None), targets)
        if self.decoder_blocks is None:
            return loss_ce, {'loss_ce': loss_ce}
        # (2) MIM on the un-mixed image (Eq. 2): only the visible patches are encoded (MAE), all are predicted
        pred = self.forward_decoder(self.encode(img, ids_keep), ids_restore)  # [B, L, V]
        loss_mim = (token_cross_entropy(pred, ids) if self.target == 'tokens'
                    else pixel_loss(pred, common.patchify(img, self.patch_size)))
        loss = loss_ce + self.mim_weight * loss_mim  # Eq. (3)
        return loss, {'loss_ce': loss_ce, 'loss_mim': loss_mim}


# ----------------------------------------------------------------------------------------------
# Loss


def sigmoid_cross_entropy(logits, targets):
    """Eq. (1): -y log(sigmoid(l)) - (1 - y) log(1 - sigmoid(l)), summed over the classes and averaged
    over the batch, as big_vision's / Scenic's sigmoid_xent. logits, targets: [B, C]."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction='none').sum(-1).mean()


def token_cross_entropy(logits, ids):
    """Eq. (2) on ALL tokens (the note under it; supp. B). Eq. (2) sums over the tokens j; this
    averages them (as MAGE), so lambda = 1 weighs one token's loss against one image's L_CE: the
    literal sum is --mim-weight L. logits [B, L, V], ids [B, L]."""
    return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())  # [B*L, V], [B*L]


def pixel_loss(pred, target):
    """--target pixels (Fig. 1): MSE to MAE's per-patch normalized pixels, over all tokens. pred, target: [B, L, p*p*3]."""
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return ((pred.float() - (target - mean) / (var + 1e-6) ** .5) ** 2).mean()


# ----------------------------------------------------------------------------------------------
# Tokenizer: taming-transformers' VQGAN encoder and quantizer (vqgan_imagenet_f16_1024), with the
# official module names so its Lightning checkpoint loads as is; the decoder is not needed.


class ResnetBlock(nn.Module):  # pre-activation (swish = silu), GroupNorm 32; a 1x1 `nin_shortcut` where the width changes
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(32, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):  # single-head self-attention over positions, 1x1-conv q/k/v/proj_out, residual
    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(2, 3) for m in (self.q, self.k, self.v))  # [B, 1, HW, C]
        o = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj_out(o.transpose(2, 3).reshape(B, C, H, W))  # [B, C, H, W]


class Downsample(nn.Module):  # 3x3 stride-2 conv after a zero pad on the right and bottom only: halves H and W
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):  # conv_in; per level `down.i`: blocks (+ attn), downsample but the last; mid; out
    def __init__(self, ch, ch_mult, num_res_blocks, attn_levels, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down, c = nn.ModuleList(), ch
        for i, mult in enumerate(ch_mult):
            level, cin, c = nn.Module(), c, ch * mult
            level.block = nn.ModuleList([ResnetBlock(cin if j == 0 else c, c) for j in range(num_res_blocks)])
            level.attn = nn.ModuleList([AttnBlock(c) for _ in range(num_res_blocks)] if i in attn_levels else [])
            if i < len(ch_mult) - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = nn.Module()  # a plain container: keys mid.block_1, mid.attn_1, mid.block_2
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
        self.norm_out, self.conv_out = nn.GroupNorm(32, c, eps=1e-6), nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = level.attn[j](block(h)) if len(level.attn) else block(h)
            if hasattr(level, 'downsample'):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid.block_2(self.mid.attn_1(self.mid.block_1(h))))))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)  # key: quantize.embedding.weight

    def forward(self, z):  # z [N, D] -> ids [N] of the nearest code: argmin_k |z|^2 + |e_k|^2 - 2 z.e_k
        e = self.embedding.weight
        return (z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()).argmin(1)  # [N, K] -> [N]


class VQGANTokenizer(nn.Module):
    """[B, 3, H, W] in [-1, 1] -> [B, (H/f) * (W/f)] code ids, row-major, f = 2 ** (levels - 1).
    Defaults: the f16/1024 model (attention at level 4 = resolution 16 of a 256 px input)."""
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(4,), z_channels=256,
                 embed_dim=256, n_embed=1024):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, attn_levels, z_channels)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(n_embed, embed_dim)

    @torch.no_grad()
    def tokenize(self, x):
        with torch.autocast('cuda' if x.is_cuda else 'cpu', enabled=False):  # float32 always: bf16 flips ~3% of the ids
            z = self.quant_conv(self.encoder(x.float()))  # [B, D, h, w]
            return self.quantize(z.permute(0, 2, 3, 1).flatten(0, 2)).view(z.shape[0], -1)  # [B*h*w, D] -> [B, h*w]


def vqgan_config(sd):
    """VQGANTokenizer arguments read off the checkpoint's shapes, so smaller VQGANs load as well."""
    ch = sd['encoder.conv_in.weight'].shape[0]
    levels = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith('encoder.down.'))
    n_embed, embed_dim = sd['quantize.embedding.weight'].shape
    return dict(ch=ch, ch_mult=tuple(sd[f'encoder.down.{i}.block.0.conv1.weight'].shape[0] // ch for i in range(levels)),
                num_res_blocks=1 + max(int(k.split('.')[4]) for k in sd if k.startswith('encoder.down.0.block.')),
                attn_levels=tuple(i for i in range(levels) if f'encoder.down.{i}.attn.0.q.weight' in sd),
                z_channels=sd['encoder.conv_out.weight'].shape[0], embed_dim=embed_dim, n_embed=n_embed)


def load_vqgan(path):  # the frozen tokenizer from a Lightning last.ckpt (no Lightning needed: common.PICKLED) or a state dict
    ckpt = common.read_checkpoint(path, "VQGAN checkpoint (taming-transformers' vqgan_imagenet_f16_1024 last.ckpt)")
    sd = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else {}
    sd = {k: v for k, v in sd.items() if k.startswith(('encoder.', 'quant_conv.', 'quantize.'))}  # no decoder, loss
    try:
        model = VQGANTokenizer(**vqgan_config(sd))
        model.load_state_dict(sd)
    except (KeyError, ValueError, RuntimeError) as e:  # no such VQGAN: one line naming a key that does not fit
        why = f"no {e}" if isinstance(e, KeyError) else str(e).strip().splitlines()[-1].strip()
        raise common.UsageError(f"{path} does not fit a VQGAN encoder ({why}): expected taming's vqgan_imagenet_f16_1024 "
                                "last.ckpt or a state dict of encoder.*, quant_conv.*, quantize.*") from None
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# big_vision's RandAugment (pp/archive/autoaugment.py, forked from the TF EfficientNet code), on PIL
# images. Unlike timm's (evaluate.rand_augment): 16 ops with Cutout and SolarizeAdd, the chosen op is
# always applied, fixed magnitude, and TF's level mappings, under which posterize and solarize weaken
# with the magnitude (m=15: 6 bits kept, solarize threshold 384 = no-op).

FILL = (128, 128, 128)  # replace_value: pixels uncovered by geometric ops, and Cutout
SIGNED = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')  # _randomly_negate_tensor


def level_to_arg(name, level):  # big_vision's (cutout_const 40, translate_const 100), sign not yet drawn
    x = level / 10.0  # _MAX_LEVEL
    return {'Rotate': x * 30, 'Posterize': int(x * 4), 'Solarize': int(x * 256), 'SolarizeAdd': int(x * 110),
            'Color': x * 1.8 + 0.1, 'Contrast': x * 1.8 + 0.1, 'Brightness': x * 1.8 + 0.1, 'Sharpness': x * 1.8 + 0.1,
            'ShearX': x * 0.3, 'ShearY': x * 0.3, 'TranslateX': x * 100, 'TranslateY': x * 100, 'Cutout': int(x * 40)}.get(name)


def _lut(img, f):
    return img.point([min(255, max(0, f(i))) for i in range(256)] * len(img.getbands()))


def _affine(img, c):  # output pixel (x, y) <- input (c0 x + c1 y + c2, c3 x + c4 y + c5); tfa.image's nearest
    return img.transform(img.size, Image.Transform.AFFINE, c, Image.Resampling.NEAREST, fillcolor=FILL)


def _cutout(img, half, rng):  # a (2 half)^2 square of 128 around a uniform random centre, clipped at the borders
    a = np.array(img)  # [H, W, 3]
    cy, cx = rng.integers(a.shape[0]), rng.integers(a.shape[1])
    a[max(0, cy - half):cy + half, max(0, cx - half):cx + half] = FILL
    return Image.fromarray(a)


BV_OPS = {  # name -> f(img, level_to_arg value with its sign, rng); PIL's ops are the ones TF's imitate
    'AutoContrast': lambda im, v, rng: ImageOps.autocontrast(im),
    'Equalize': lambda im, v, rng: ImageOps.equalize(im),
    'Invert': lambda im, v, rng: ImageOps.invert(im),
    'Rotate': lambda im, v, rng: im.rotate(v, Image.Resampling.NEAREST, fillcolor=FILL),
    'Posterize': lambda im, v, rng: _lut(im, lambda i: i >> (8 - min(v, 8)) << (8 - min(v, 8))),  # keeps v bits
    'Solarize': lambda im, v, rng: _lut(im, lambda i: i if i < v else 255 - i),
    'Color': lambda im, v, rng: ImageEnhance.Color(im).enhance(v),
    'Contrast': lambda im, v, rng: ImageEnhance.Contrast(im).enhance(v),
    'Brightness': lambda im, v, rng: ImageEnhance.Brightness(im).enhance(v),
    'Sharpness': lambda im, v, rng: ImageEnhance.Sharpness(im).enhance(v),
    'ShearX': lambda im, v, rng: _affine(im, (1, v, 0, 0, 1, 0)),
    'ShearY': lambda im, v, rng: _affine(im, (1, 0, 0, v, 1, 0)),
    'TranslateX': lambda im, v, rng: _affine(im, (1, 0, v, 0, 1, 0)),
    'TranslateY': lambda im, v, rng: _affine(im, (1, 0, 0, 0, 1, v)),
    'Cutout': lambda im, v, rng: _cutout(im, v, rng),
    'SolarizeAdd': lambda im, v, rng: _lut(im, lambda i: i + v if i < 128 else i),
}


def randaugment(rng, img, num_layers=2, magnitude=15):  # distort_image_with_randaugment: per layer 1 of 16 ops, always applied
    for _ in range(num_layers):
        name = list(BV_OPS)[rng.integers(len(BV_OPS))]
        v = level_to_arg(name, magnitude)
        img = BV_OPS[name](img, -v if name in SIGNED and rng.random() < 0.5 else v, rng)
    return img


# ----------------------------------------------------------------------------------------------
# Main


def train_transform(args):
    """AugReg (big_vision's vit_i1k.py, 'medium2' for B/16 and L/16): inception crop, flip, big_vision's
    RandAugment (randaugment above; timm's, evaluate.rand_augment, is the fine-tuning one)."""
    ops, magnitude = int(args.randaug[0]), args.randaug[1]

    def transform(rng, img):
        img = common.hflip(rng, common.random_resized_crop(rng, img, args.img_size, tuple(args.crop_scale)))
        return {'img': common.to_tensor(randaugment(rng, img, ops, magnitude))}
    return transform


@torch.no_grad()
def evaluate(args, model, dataset):  # top-1 (%) of the classifier on center crops, in this process
    device, correct = next(model.parameters()).device, 0
    model.eval()
    for batch in torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers):
        batch = common.to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == 'bf16'):
            correct += (model.classify(batch['img']).argmax(-1) == batch['label']).sum()  # summed on the device
    return 100 * int(correct) / len(dataset)


def main():
    args = get_args()
    if args.mim_weight > 0 and args.target == 'tokens' and not args.tokenizer:  # before the dataset scan
        raise common.UsageError("--target tokens needs --tokenizer PATH (taming-transformers' vqgan_imagenet_f16_1024 "
                                "last.ckpt); or use --target pixels, or --mim-weight 0 for the supervised baseline")
    dataset = common.build_dataset(args, train_transform(args))
    args.num_classes = len(dataset.classes)
    val = None
    if args.data == 'synthetic' or os.path.isdir(os.path.join(args.data, 'val')):
        val = common.build_dataset(args, common.eval_transform(args.img_size), split='val')
        if val.classes != dataset.classes:
            raise common.UsageError(f"the classes of {args.data}/val differ from the training classes "
                                    f"({len(val.classes)} vs {len(dataset.classes)} folders)")
    elif int(os.environ.get('RANK', 0)) == 0:
        print(f"no {args.data}/val folder: the final top-1 is skipped")
    train_transform(args)(np.random.default_rng(0), Image.new('RGB', (8, 8)))  # bad sizes fail here, not in a worker
    torch.manual_seed(args.seed)  # the same initial weights in every run with this seed
    model = SupMIM(args)
    if model.tokenizer is not None and (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')) == 'cuda':
        model.tokenizer.to(memory_format=torch.channels_last)  # NHWC convolutions, no layout copies around them
        torch.backends.cudnn.benchmark = True  # static shapes: cuDNN times its algorithms once, keeps the fastest
    model = common.train(args, model, dataset)
    if val is not None and int(os.environ.get('RANK', 0)) == 0:
        print(f"val top-1 {evaluate(args, model, val):.2f}%")


if __name__ == '__main__':
    common.run(main)
