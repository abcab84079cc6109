"""Benchmarks (not collected by pytest): training-step speed of the five methods next to timm's
supervised ViT step, and the speed of each method's data path next to torchvision's.

  python tests/bench.py --device cuda --model vit_base --batch 128 --compile       # one GPU, bf16
  python tests/bench.py --device cpu --model vit_pico --img-size 32 --patch-size 4 --batch 32 --steps 5
  python tests/bench.py --data-only --workers 1      # images/s per worker on ~500x375 JPEG photos

Step table: ms/step, img/s, MFU (each method's `flops_per_image()`: encoder, decoders and frozen
teachers counted) and peak memory, N steps after warm-up on a fixed batch made by the method's own
training transform. The timm row (when timm is importable; it is not a dependency) is
`vit_base_patch16_224`-style supervised training with the same batch, compile and precision.
The data table needs scikit-image for its sample photographs (benchmark only).
"""
import argparse
import importlib
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from utils import method_setup  # noqa: E402

METHODS = ['simmim', 'maskdistill', 'deepmim', 'lut', 'supmim']


def time_steps(model, batch, args, device, loss_fn=None):
    """Mean seconds per optimizer step (forward, backward, AdamW) after warm-up, and peak memory."""
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == 'cuda')
    step_model = torch.compile(model) if args.compile else model
    dtype = {'bf16': torch.bfloat16, 'fp32': torch.float32}[args.precision]
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision != 'fp32'):
            loss = loss_fn(step_model, batch) if loss_fn else step_model(batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else float('nan')
    return (time.perf_counter() - t) / args.steps, mem


def row(name, sec, flops, args, mem):
    ips = args.batch / sec
    mfu = f"{100 * flops * ips / (args.peak_tflops * 1e12):5.1f}%" if args.peak_tflops else '    -'
    print(f"{name:<14} {1000 * sec:9.1f} {ips:9.0f} {mfu:>7} {flops / 1e9:9.1f} {mem:8.2f}", flush=True)


def bench_steps(args, device):
    print(f"\n{args.model}/{args.patch_size} at {args.img_size} px, batch {args.batch}, {args.precision}, "
          f"compile={args.compile}, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}")
    print(f"{'method':<14} {'ms/step':>9} {'img/s':>9} {'MFU':>7} {'GFLOP/im':>9} {'mem GiB':>8}")
    tmp = tempfile.mkdtemp()
    for name in args.methods:
        if not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f'{name}.py')):
            continue
        torch.manual_seed(0)
        model, batch = method_setup(name, args.model, args.img_size, args.patch_size, args.batch, tmp)
        batch = common.to_device(batch, device)
        sec, mem = time_steps(model, batch, args, device)
        row(name, sec, model.flops_per_image(), args, mem)
        del model, batch
    try:
        import timm
    except ImportError:
        print("timm             (not installed: no peer row)")
        return
    width, depth, heads = common.model_size(args.model)
    peer = timm.create_model('vit_base_patch16_224', img_size=args.img_size, patch_size=args.patch_size,
                             embed_dim=width, depth=depth, num_heads=heads, num_classes=1000)
    x = torch.randint(0, 255, (args.batch, 3, args.img_size, args.img_size), dtype=torch.uint8)
    batch = {'img': common.normalize(x.to(device)), 'label': torch.randint(0, 1000, (args.batch,), device=device)}
    sec, mem = time_steps(peer, batch, args, device, lambda m, b: F.cross_entropy(m(b['img']), b['label']))
    ours = common.VisionTransformer(args.img_size, args.patch_size, width, depth, heads, num_classes=1000)
    row('timm (sup.)', sec, 3 * (ours.flops() + 2 * width * 1000), args, mem)


# ---- data path ------------------------------------------------------------------------------

def make_photos(folder, n=64):
    """~500x375 JPEGs (quality 90) cut from the sample photographs that scikit-image ships."""
    import skimage.data as data
    names = ['astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field', 'retina', 'immunohistochemistry', 'colorwheel']
    photos = [Image.fromarray(getattr(data, n)()).convert('RGB') for n in names]
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, 'photos'), exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        W, H = img.size
        s = rng.uniform(0.6, 1.0)
        w, h = int(W * s), int(H * s)
        left, top = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
        img = img.crop((left, top, left + w, top + h)).resize((500, 375), Image.BICUBIC)
        img.save(os.path.join(folder, 'photos', f'{i}.jpg'), quality=90)
    return folder


def bench_data(args):
    """Images per second and per worker of each method's training transform, from JPEG file to
    the collated uint8 batch (what the DataLoader workers do)."""
    folder = make_photos(tempfile.mkdtemp())
    print(f"\ndata path: {args.workers} worker(s), 224 px, ~500x375 JPEG q90 photos")
    print(f"{'pipeline':<28} {'img/s':>8} {'img/s/worker':>13}")
    tmp = tempfile.mkdtemp()

    def measure(name, dataset):
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=args.workers, shuffle=True,
                                             persistent_workers=args.workers > 0, drop_last=True)
        for i, _ in enumerate(loader):  # warm-up epoch
            if i == 1:
                break
        n, t = 0, time.perf_counter()
        for _ in range(args.data_epochs):
            for b in loader:
                n += len(b['img'] if isinstance(b, dict) else b[0])
        ips = n / (time.perf_counter() - t)
        print(f"{name:<28} {ips:8.0f} {ips / max(1, args.workers):13.0f}", flush=True)
    for name in args.methods:
        if os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f'{name}.py')):
            transform = method_setup(name, 'vit_pico', 224, 16, 0, tmp, transform_only=True)
            measure(name, common.ImageFolder(folder, transform))
    try:
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
    except ImportError:
        print("torchvision                  (not installed: no comparison row)")
        return
    tv = T.Compose([T.RandomResizedCrop(224, scale=(0.67, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])
    measure('torchvision RRC+flip', ImageFolder(folder, tv))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--model', default='vit_base')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--patch-size', type=int, default=16)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--precision', choices=['bf16', 'fp32'], default=None)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--peak-tflops', type=float, default=None, help='default: 989 on CUDA (H100 bf16 dense)')
    p.add_argument('--methods', type=lambda s: s.split(','), default=METHODS)
    p.add_argument('--data-only', action='store_true')
    p.add_argument('--steps-only', action='store_true')
    p.add_argument('--workers', type=int, default=1)
    p.add_argument('--data-epochs', type=int, default=2)
    args = p.parse_args()
    device = torch.device(args.device)
    args.precision = args.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    args.peak_tflops = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == 'cuda' else 0.0)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if not args.data_only:
        bench_steps(args, device)
    if not args.steps_only:
        bench_data(args)


if __name__ == '__main__':
    main()
