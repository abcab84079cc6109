"""SimMIM: A Simple Framework for Masked Image Modeling (Xie et al., CVPR 2022, arXiv:2111.09886).

Mask random 32x32 squares of the image (60% of them), replace the masked patch embeddings by one
learnable mask token, run a plain ViT over all tokens, and regress the raw (normalized) pixels of
the masked patches with a single linear layer and an L1 loss on the masked pixels only.

  torchrun --nproc_per_node=8 simmim.py --data /imagenet          # ViT-B/16, 224 px, 800 epochs (Sec. 4.2)
  python simmim.py --data synthetic --model vit_pico --img-size 32 --patch-size 4 --mask-patch-size 8 \
      --batch-size 64 --epochs 4 --warmup-epochs 1 --synthetic-size 4000 --blr 2e-3 --output-dir out/quick  # CPU, ~1 min

Expected: ViT-B/16 800 epochs -> 83.8% ImageNet top-1 after fine-tuning (Tab. 6), 56.7% linear
probe on an intermediate layer. In the CPU run (the released recipe's architecture, tiny) the loss
falls from about 0.66 to 0.59; its k-NN accuracy on the synthetic data (`python evaluate.py knn --ckpt
out/quick/checkpoint.pth --data synthetic`) is about a random encoder's (71% vs 72%): it checks the pipeline.
"""
import argparse
import math

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import common

# ----------------------------------------------------------------------------------------------
# Arguments


def get_args(argv=None):
    # Defaults: the released config that produced 83.8% (Tab. 6), configs/vit_base__800ep/
    # simmim_pretrain__vit_base__img224__800ep.yaml on config.py's defaults ("released config" below).
    # The paper's schedule (Sec. 4.1.1, 4.2: 8e-4 at 2048, cosine, 20 warmup epochs) is
    # --schedule cosine --blr 1e-4 --warmup-epochs 20 (min and warmup lr: the released config.py's).
    parser = common.get_parser(__doc__)
    parser.add_argument('--mask-ratio', type=float, default=0.6, help='Tab. 1: 0.6 with 32 px units')
    parser.add_argument('--mask-patch-size', type=int, default=32, help='Sec. 3.2, Tab. 1: 32x32 mask units')
    parser.add_argument('--crop-scale', type=float, nargs=2, default=(0.67, 1.0), help='RandomResizedCrop scale (released code)')
    parser.add_argument('--loss-on', choices=['masked', 'all'], default='masked', help='Tab. 4: masked 82.8 vs all 81.7')
    parser.add_argument('--layer-scale', type=float, default=0.1, help='released config: INIT_VALUES 0.1 (paper: plain ViT)')
    parser.add_argument('--rel-pos-bias', action=argparse.BooleanOptionalAction, default=True,
                        help='released config: one shared relative position bias, no absolute position embedding '
                             '(USE_SHARED_RPB, USE_APE False); --no-rel-pos-bias: learned absolute embedding')
    parser.add_argument('--schedule', choices=['multistep', 'cosine'], default='multistep',
                        help='released config: lr x0.1 at each of --milestones; paper Sec. 4.1.1: cosine to --min-lr')
    parser.add_argument('--milestones', type=int, nargs='*', default=(700,), help='released config: MULTISTEPS [700] (epochs)')
    parser.add_argument('--warmup-lr', type=float, default=2e-6, help='released config: WARMUP_LR 5e-7 per 512 images, at 2048')
    parser.set_defaults(
        model='vit_base', img_size=224,  # Sec. 4.2: ViT-B at 224
        batch_size=256,                  # x 8 GPUs = 2048 (Sec. 4.1.1)
        blr=5e-5,                        # released config: BASE_LR 1e-4 per 512 = 4e-4 at 2048; paper: 8e-4 (--blr 1e-4)
        epochs=800, warmup_epochs=10,    # released config (paper Sec. 4.2: 20 warmup epochs)
        weight_decay=0.05, betas=(0.9, 0.999),  # Sec. 4.1.1 and released config
        min_lr=2e-5,                     # released config: MIN_LR 5e-6 per 512 (only the cosine schedule uses it)
        clip_grad=5.0,                   # released config: CLIP_GRAD 5.0 (paper silent)
        drop_path=0.1,                   # released config: DROP_PATH_RATE 0.1 (paper silent)
        output_dir='out/simmim')
    args = parser.parse_args(argv)  # the shared flags are checked there (common.validate_args)
    if not 0 < args.mask_ratio < 1:
        raise common.UsageError(f"--mask-ratio {args.mask_ratio}: must be in (0, 1), the fraction of patches masked")
    if args.schedule == 'cosine':
        args.milestones = ()
    return args


# ----------------------------------------------------------------------------------------------
# Model


class SimMIM(common.VisionTransformer):
    """A ViT whose masked patch embeddings are replaced by `mask_token` (Sec. 3.2), with a linear head
    that predicts each patch's p*p*3 pixels (Sec. 3.3, Tab. 2). Encoder keys are timm's; the method's
    own parts are `mask_token` and `head_pred`."""
    no_weight_decay = ('cls_token', 'pos_embed')  # besides 1-D and biases: the released code's skip list

    def __init__(self, args):
        width, depth, heads = common.model_size(args.model)
        super().__init__(img_size=args.img_size, patch_size=args.patch_size, embed_dim=width, depth=depth,
                         num_heads=heads, drop_path_rate=args.drop_path, init_values=args.layer_scale,
                         rel_pos_bias=args.rel_pos_bias, pos_embed='none' if args.rel_pos_bias else 'learn')
        self.init_weights('beit')  # released code: BEiT's truncated-normal init and fix_init_weight
        self.loss_on, self.mask_ratio, self.mask_patch_size = args.loss_on, args.mask_ratio, args.mask_patch_size
        self.mask_token = nn.Parameter(common.beit_trunc_normal_(torch.empty(1, 1, width)))
        # Sec. 3.3, Tab. 2: one linear layer; released code: a 1x1 conv outside the encoder, PyTorch's default init
        self.head_pred = nn.Linear(width, args.patch_size ** 2 * 3)

    def predict(self, img, mask):
        """img [B, 3, H, W], mask [B, L] (1 = masked) -> every patch's predicted pixels [B, L, p*p*3]."""
        x = self.patch_embed(img)  # [B, L, D]
        # Sec. 3.2: one learnable mask token vector replaces each masked patch embedding, before the
        # position information is added (released code)
        w = mask.unsqueeze(-1).to(x.dtype)  # [B, L, 1]
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        z = self.norm(self.run_blocks(self.add_cls(self.add_pos(x))))  # [B, 1 + L, D], all tokens
        return self.head_pred(z[:, self.num_prefix:])  # [B, L, p*p*3], each patch from its own token

    def forward(self, batch):
        img, mask = batch['img'], batch['mask'].flatten(1)  # [B, 3, H, W] normalized; [B, L], 1 = masked
        pred = self.predict(img, mask)  # [B, L, p*p*3]
        target = common.patchify(img, self.patch_size)  # [B, L, p*p*3], Sec. 3.4: the pixels (normalized, released code)
        loss = forward_loss(pred, target, mask if self.loss_on == 'masked' else torch.ones_like(mask))
        return loss, {}


# ----------------------------------------------------------------------------------------------
# Loss


def forward_loss(pred, target, mask):
    """Sec. 3.4, Eq. (1): L = ||y_M - x_M||_1 / Omega(x_M), the L1 distance on the masked pixels M
    over their number of values. As the released code: sum(|y - x| * M) / (sum(M) + 1e-5) / 3, where
    M counts pixels (p*p per masked patch) and the / 3 counts the colour channels.
    pred, target: [B, L, p*p*3]; mask: [B, L], 1 = masked."""
    pixels_per_patch = pred.shape[-1] // 3
    l1 = (pred.float() - target).abs().sum(-1)  # [B, L], summed over the patch's pixels and channels
    return (l1 * mask).sum() / (mask.sum() * pixels_per_patch + 1e-5) / 3


@torch.no_grad()
def reconstruct(model, img, mask_seed=0):
    """Fig. 4-5: a fresh SimMIM mask per image, mask tokens in, the linear head's pixels out.
    img: [B, 3, H, W] ImageNet-normalized. Returns mask [B, L] (1 = masked) and the predicted image
    [B, 3, H, W] in the same normalized space, every patch predicted. Call model.eval() first."""
    rng = np.random.default_rng(mask_seed)
    mask = np.stack([simmim_mask(rng, img.shape[-1], model.mask_patch_size, model.patch_size, model.mask_ratio)
                     for _ in range(len(img))])  # [B, G, G]
    mask = torch.from_numpy(mask).flatten(1).to(img.device)  # [B, L]
    pred = model.predict(img, mask)  # [B, L, p*p*3]
    return mask, common.unpatchify(pred.float(), model.patch_size, model.patch_embed.grid)


# ----------------------------------------------------------------------------------------------
# Main


def simmim_mask(rng, input_size=224, mask_patch_size=32, model_patch_size=16, mask_ratio=0.6):
    """SimMIM's random masking (Sec. 3.2): ceil(units * ratio) random mask units of mask_patch_size
    pixels, each expanded to the model patches it covers. Returns [G, G] float32."""
    if input_size % mask_patch_size or mask_patch_size % model_patch_size:
        raise common.UsageError(f"--mask-patch-size {mask_patch_size} must divide --img-size {input_size} "
                                f"and be a multiple of --patch-size {model_patch_size}")
    units, scale = input_size // mask_patch_size, mask_patch_size // model_patch_size
    mask = np.zeros(units * units, np.float32)
    mask[rng.permutation(units * units)[:math.ceil(units * units * mask_ratio)]] = 1
    return mask.reshape(units, units).repeat(scale, 0).repeat(scale, 1)  # [G, G]


def train_transform(args):
    """RandomResizedCrop (scale 0.67-1, ratio 3/4-4/3) + flip, and a SimMIM mask per image."""
    def transform(rng, img):
        img = common.hflip(rng, common.random_resized_crop(rng, img, args.img_size, tuple(args.crop_scale)))
        mask = simmim_mask(rng, args.img_size, args.mask_patch_size, args.patch_size, args.mask_ratio)
        return {'img': common.to_tensor(img), 'mask': torch.from_numpy(mask)}
    return transform


def main():
    args = get_args()
    torch.manual_seed(args.seed)  # the same initial weights in every run with this seed
    model = SimMIM(args)
    train_transform(args)(np.random.default_rng(0), Image.new('RGB', (8, 8)))  # bad mask sizes fail here, not in a worker
    dataset = common.build_dataset(args, train_transform(args))
    common.train(args, model, dataset)


if __name__ == '__main__':
    common.run(main)
