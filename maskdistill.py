"""MaskDistill: A Unified View of Masked Image Modeling (Peng et al., TMLR 2023, arXiv:2210.10615).

Mask about 40% of the patches block-wise and replace their embeddings by one learnable mask token;
a ViT student encodes the corrupted image and one linear layer on every token predicts the
features that a frozen teacher (CLIP ViT-B/16) computes for the same patch of the full image.
The targets are the teacher's last-layer patch features normalized by a LayerNorm without affine
parameters, and the loss is Smooth-L1 averaged over the masked patches only (Eq. 3). With mask
ratio 0 and the loss on all patches it becomes plain feature distillation (Tab. 5).

Teacher: OpenAI CLIP's ViT-B-16.pt, the file `clip.load('ViT-B/16')` downloads into ~/.cache/clip,
https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt
(a TorchScript archive; a state dict of its weights works too). Any timm-format ViT checkpoint
(DINO, DeiT, MAE, or one of ours) can teach instead with --teacher-type timm (Tab. 8).

  torchrun --nproc_per_node=8 maskdistill.py --data /imagenet --teacher ViT-B-16.pt   # ViT-B/16, 300 epochs (Tab. 11)
  python simmim.py --data synthetic --model vit_pico --img-size 32 --patch-size 4 --mask-patch-size 8 \
      --batch-size 64 --epochs 4 --warmup-epochs 1 --synthetic-size 4000 --blr 2e-3 --output-dir out/quick  # a teacher, ~1 min
  python maskdistill.py --data synthetic --model vit_pico --img-size 32 --patch-size 4 --teacher out/quick/checkpoint.pth \
      --teacher-type timm --batch-size 64 --epochs 4 --warmup-epochs 1 --synthetic-size 4000 --output-dir out/quick_md  # CPU, ~1 min

Expected: ViT-B/16 with the CLIP-B/16 teacher, 300 epochs -> 85.0% ImageNet top-1 after fine-tuning
and 53.8 mIoU on ADE20k (Tab. 2; 84.9% without relative position bias); 800 epochs -> 85.5%.
The CPU run distills the SimMIM encoder into a fresh student: the loss falls from about 0.5 to well below it.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common

# ----------------------------------------------------------------------------------------------
# Arguments


def get_args(argv=None):
    parser = common.get_parser(__doc__)
    parser.add_argument('--teacher', default='ViT-B-16.pt', help="teacher weights: OpenAI CLIP's ViT-B-16.pt (Sec. 4.1)")
    parser.add_argument('--teacher-type', choices=['clip', 'timm'], default='clip',
                        help='clip: OpenAI CLIP image tower; timm: any timm-format ViT checkpoint (DINO, DeiT, MAE; Tab. 8)')
    parser.add_argument('--teacher-ln-post', action=argparse.BooleanOptionalAction, default=False,
                        help="pass the teacher's last block through its final LayerNorm (CLIP's ln_post) first; "
                             "paper: the last layer's output (Tab. 10); BEiT v2's CLIP targets use ln_post and proj")
    parser.add_argument('--teacher-proj', action=argparse.BooleanOptionalAction, default=False,
                        help="project CLIP's tokens with its image projection `proj` (768 -> 512 for B/16)")
    parser.add_argument('--mask-ratio', type=float, default=None,
                        help="default: BEiT v2's 75 of 196 patches, scaled for other grids (Sec. 3: 'roughly 40%%', "
                             "block-wise as BEiT); a ratio masks int(ratio * L) (0.4: 78 of 196)")
    parser.add_argument('--loss-on', choices=['masked', 'all'], default='masked',
                        help='Eq. 3: masked patches; all with --mask-ratio 0 is knowledge distillation (Tab. 5)')
    parser.add_argument('--beta', type=float, default=1.0,
                        help='Smooth-L1 threshold (paper gives none: the standard 1.0; some public code uses 2.0)')
    parser.add_argument('--layer-scale', type=float, default=0.1, help='Tab. 11: 0.1 (B), 1e-5 (L, H)')
    parser.add_argument('--rel-pos-bias', action=argparse.BooleanOptionalAction, default=True,
                        help='Sec. 4.1: BEiT shared relative position bias (Tab. 2: 85.0 with, 84.9 without)')
    parser.add_argument('--crop-scale', type=float, nargs=2, default=(0.08, 1.0),
                        help='RandomResizedCrop scale (Tab. 11 names no scale: torchvision and BEiT use 0.08-1)')
    parser.add_argument('--color-jitter', type=float, default=0.4, help='Tab. 11: brightness, contrast, saturation (BEiT)')
    parser.set_defaults(
        model='vit_base', img_size=224,    # Tab. 11: ViT-B/16 at 224
        batch_size=256,                    # x 8 GPUs = 2048 (Tab. 11)
        blr=1.5e-3 * 256 / 2048,           # Tab. 11: peak lr 1.5e-3 at batch 2048
        min_lr=1e-5, epochs=300, warmup_epochs=10,  # Tab. 11 (800 epochs for the longer schedule)
        weight_decay=0.05, betas=(0.9, 0.999),      # Tab. 11 (AdamW eps 1e-8 is PyTorch's default)
        drop_path=0.1,                     # Tab. 11: 0.1 (B), 0.2 (L), 0.25 (H)
        clip_grad=3.0,                     # Tab. 11
        output_dir='out/maskdistill')
    args = parser.parse_args(argv)  # the shared flags are checked there (common.validate_args)
    if args.mask_ratio is not None and not 0 <= args.mask_ratio <= 1:
        raise common.UsageError(f"--mask-ratio must be in [0, 1] (got {args.mask_ratio})")
    if num_masked(args, (args.img_size // args.patch_size,) * 2) < 1 and args.loss_on == 'masked':
        raise common.UsageError(f"--mask-ratio {args.mask_ratio} masks no patch, so the masked loss has nothing to "
                                "average: use --loss-on all for knowledge distillation (Tab. 5), or a larger ratio")
    return args


def num_masked(args, grid):
    """Patches masked per image: BEiT v2's 75 of 196 (scaled to the grid), or int(ratio * L)."""
    return beit_num_masked(grid) if args.mask_ratio is None else int(args.mask_ratio * grid[0] * grid[1])


# ----------------------------------------------------------------------------------------------
# Model


class Teacher(nn.Module):
    """The frozen teacher T: the student's crop, with ImageNet's normalization swapped for the
    teacher's and resized so that the teacher's patches give the student's token grid (Sec. 3,
    Sec. 4.1: CLIP-L/14 sees 196 px for a /16 student at 224). Returns patch tokens [B, L, D_t]."""

    def __init__(self, vit, proj, mean, std, ln_post):
        super().__init__()
        self.vit, self.ln_post = vit, ln_post
        self.register_buffer('proj', proj)  # [D, E] as x @ proj, or None
        self.mean, self.std = mean, std  # the teacher's input normalization
        self.img_size = vit.patch_embed.grid[0] * vit.patch_size
        self.out_dim = vit.embed_dim if proj is None else proj.shape[1]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # always in eval mode, whatever the student does

    @torch.no_grad()
    def forward(self, img):
        x = common.renormalize(img, self.mean, self.std)  # ImageNet's normalization undone, the teacher's applied
        if x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode='bicubic', align_corners=False)
        x = x.to(self.vit.patch_embed.proj.weight.dtype)  # bf16 when cast for a CUDA run
        x = self.vit.run_blocks(self.vit.add_cls(self.vit.add_pos(self.vit.patch_embed(x))))  # before the final norm
        t = (self.vit.norm(x) if self.ln_post else x)[:, self.vit.num_prefix:]  # [B, L, D]
        return t if self.proj is None else t @ self.proj  # [B, L, E]


def load_teacher(args, grid):
    """The teacher named by --teacher / --teacher-type, at the resolution giving the student's grid."""
    formats = ("--teacher-type clip reads OpenAI CLIP's ViT-B-16.pt (TorchScript) or its state dict; "
               "--teacher-type timm reads ViT checkpoints (timm, DINO, DeiT, MAE, BEiT, SimMIM, ours)")
    path = args.teacher
    if not os.path.isfile(path):
        raise common.UsageError(f"teacher file not found: {path} ({formats})")
    try:
        if args.teacher_type == 'clip':
            vit, proj = common.load_clip_visual(path)
            mean, std = common.CLIP_MEAN, common.CLIP_STD
        else:
            vit, _ = common.build_encoder(path)
            proj, mean, std = None, common.IMAGENET_MEAN, common.IMAGENET_STD  # timm teachers keep ImageNet's
    except common.UsageError as e:  # the loaders' messages name the file; add the formats we read
        raise common.UsageError(f"{e} ({formats})") from None
    if args.teacher_proj and proj is None:
        raise common.UsageError("--teacher-proj needs a CLIP teacher (--teacher-type clip): timm ViTs have no projection")
    if vit.patch_embed.grid != grid:
        if vit.encoder_kwargs['rel_pos_bias']:
            raise common.UsageError(f"teacher {path} has a relative position bias for a {vit.patch_embed.grid[0]}x"
                                    f"{vit.patch_embed.grid[1]} token grid, the student a {grid[0]}x{grid[1]} one: "
                                    "choose --img-size / --patch-size giving the teacher's grid")
        state = vit.state_dict()  # rebuilt at the new size; load_encoder resamples pos_embed bicubically
        vit = common.VisionTransformer(**dict(vit.encoder_kwargs, img_size=grid[0] * vit.patch_size))
        common.load_encoder(vit, state, path=path)
    return Teacher(vit, proj if args.teacher_proj else None, mean, std, args.teacher_ln_post)


class MaskDistill(common.VisionTransformer):
    """A ViT student whose masked patch embeddings are replaced by `mask_token` (Eq. 2), with a
    linear head `head_distill` from every token to the teacher's feature (Sec. 3). Encoder keys are
    timm's; the method's own parts are `mask_token`, `head_distill` and the frozen `teacher`, which
    checkpoints leave out (its path is in args)."""
    frozen_prefixes = ('teacher.',)
    no_weight_decay = ('cls_token', 'pos_embed')  # besides 1-D and biases: BEiT v2's skip list

    def __init__(self, args):
        width, depth, heads = common.model_size(args.model)
        # Sec. 4.1 follows BEiT: one relative position bias shared by all blocks and no absolute
        # position embedding (BEiT pretrains without one); --no-rel-pos-bias gives the learnable absolute
        # embedding of Sec. 3 (added after Eq. 2) instead: the Tab. 2 row without Rel. Pos.
        super().__init__(img_size=args.img_size, patch_size=args.patch_size, embed_dim=width, depth=depth,
                         num_heads=heads, drop_path_rate=args.drop_path, init_values=args.layer_scale,
                         rel_pos_bias=args.rel_pos_bias, pos_embed='none' if args.rel_pos_bias else 'learn')
        self.loss_on, self.beta = args.loss_on, args.beta
        self.init_weights('beit')  # Sec. 4.1 follows BEiT v2, whose pretraining code inits so
        self.mask_token = nn.Parameter(common.beit_trunc_normal_(torch.empty(1, 1, width)))
        self.teacher = load_teacher(args, self.patch_embed.grid)
        if (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda') and args.precision in (None, 'bf16'):
            self.teacher.to(torch.bfloat16)  # once: autocast would re-cast frozen weights every step (it caches trainable ones)
        self.head_distill = nn.Linear(width, self.teacher.out_dim)  # the FC MIM head (Tab. 1), BEiT v2's lm_head init
        common.beit_trunc_normal_(self.head_distill.weight)
        nn.init.zeros_(self.head_distill.bias)

    def forward(self, batch):
        img, mask = batch['img'], batch['mask'].flatten(1)  # [B, 3, H, W] ImageNet-normalized; [B, L], 1 = masked
        if 'jitter' in batch:  # the colour jitter the data workers drew, applied here (teacher and student see it)
            img = common.renormalize_unit(common.color_jitter(common.unnormalize(img), batch['jitter'], hue=False))
        # Eq. (2): e_i = delta(i in M) e_M + (1 - delta(i in M)) e_i, one shared mask token e_M for the
        # masked patch embeddings (BEiT); then the class token, position information and blocks
        x = self.patch_embed(img)  # [B, L, D]
        w = mask.unsqueeze(-1).to(x.dtype)  # [B, L, 1], delta(i in M)
        x = w * self.mask_token.to(x.dtype) + (1 - w) * x
        z = self.norm(self.run_blocks(self.add_cls(self.add_pos(x))))  # S(I_masked): [B, 1 + L, D]
        pred = self.head_distill(z[:, self.num_prefix:])  # o = H(S(I_masked)): [B, L, D_t]
        target = self.teacher(img)  # t = T(I_full): [B, L, D_t], the same crop unmasked (Eq. 1)
        loss = forward_loss(pred, target, mask if self.loss_on == 'masked' else torch.ones_like(mask), self.beta)
        return loss, {}


# ----------------------------------------------------------------------------------------------
# Loss


def forward_loss(pred, target, mask, beta=1.0):
    """Eq. (3): L = 1/|M| sum_{i in M} SmoothL1(o_i, LN(t_i)), where LN (the normalization N of Eq. 1)
    is a LayerNorm without affine parameters (eps 1e-5, PyTorch's default; the paper gives none) and
    SmoothL1 is averaged over the D_t channels. pred, target: [B, L, D_t]; mask: [B, L], 1 = masked
    (all ones for --loss-on all)."""
    target = F.layer_norm(target.float(), target.shape[-1:])
    loss = F.smooth_l1_loss(pred.float(), target, reduction='none', beta=beta).mean(-1)  # [B, L]
    return (loss * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------------------------
# Main


def block_mask(rng, grid, num_masked, min_patches=16, min_aspect=0.3, exact=True):
    """BEiT's MaskingGenerator (beit2/masking_generator.py) drawing from the numpy Generator `rng`:
    rounds of up to 10 attempts to add a rectangle, until num_masked cells are masked or a round adds
    nothing; with `exact` (BEiT v2) random cells are then masked to reach num_masked exactly. -> [h, w]"""
    h, w = grid
    mask = np.zeros(grid, np.float32)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masked:
        room, added = num_masked - count, 0
        for _ in range(10):
            # Python's random.uniform(16, room): 16 + (room - 16) * U, so when room < 16 the area lies
            # in [room, 16] and a rectangle may have fewer than min_patches cells (BEiT does not clamp)
            area = min_patches + (room - min_patches) * rng.random()
            aspect = math.exp(rng.uniform(*log_aspect))
            rh, rw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if rw < w and rh < h:
                top, left = rng.integers(0, h - rh + 1), rng.integers(0, w - rw + 1)  # randint(0, h - rh)
                new = rh * rw - int(mask[top:top + rh, left:left + rw].sum())
                if 0 < new <= room:  # cells it adds: at least one, never past the count
                    mask[top:top + rh, left:left + rw] = 1
                    added = new
                    break
        if added == 0:
            break
        count += added
    if exact and count < num_masked:  # BEiT v2: mask random visible cells up to the exact count
        flat = mask.reshape(-1)
        flat[rng.choice(np.flatnonzero(flat == 0), num_masked - count, replace=False)] = 1
    return mask


def beit_num_masked(grid):  # BEiT's --num_mask_patches 75 of its 14 x 14 (not int(0.4 * 196) = 78), in proportion
    return round(75 * grid[0] * grid[1] / 196)


def train_transform(args):
    """RandomResizedCrop + flip + colour jitter 0.4 (Tab. 11; BEiT jitters before the crop, we after
    it, on fewer pixels: its parameters are drawn here and applied on the device, in forward), and
    BEiT's block-wise mask (75 of 196 patches) per image."""
    grid = (args.img_size // args.patch_size,) * 2
    count = num_masked(args, grid)

    def transform(rng, img):
        img = common.hflip(rng, common.random_resized_crop(rng, img, args.img_size, tuple(args.crop_scale)))
        jitter = common.jitter_params(rng, args.color_jitter, args.color_jitter, args.color_jitter, 0.0)  # no hue (BEiT)
        mask = block_mask(rng, grid, count)  # [h, w], 1 = masked
        return {'img': common.to_tensor(img), 'jitter': torch.from_numpy(jitter), 'mask': torch.from_numpy(mask)}
    return transform


def main():
    args = get_args()
    torch.manual_seed(args.seed)  # the same initial weights in every run with this seed
    model = MaskDistill(args)
    train_transform(args)(np.random.default_rng(0), Image.new('RGB', (8, 8)))  # bad sizes fail here, not in a worker
    dataset = common.build_dataset(args, train_transform(args))
    common.train(args, model, dataset)


if __name__ == '__main__':
    common.run(main)
