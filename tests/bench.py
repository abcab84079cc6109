"""Benchmarks (not collected by pytest): training-step speed of the five methods next to timm's
supervised ViT step, and the speed of each method's data path next to torchvision's.

  python tests/bench.py --device cuda --model vit_base --batch 128 --compile       # one GPU, bf16
  python tests/bench.py --device cpu --model vit_pico --img-size 32 --patch-size 4 --batch 32 --steps 5 --no-compile
  python tests/bench.py --data-only --workers 1      # images/s per core on ~500x375 JPEG photos

Step table: ms/step, img/s, MFU (each method's `flops_per_image()`: encoder, decoders and frozen
teachers counted) and peak memory, N steps after warm-up on a fixed batch made by the method's own
training transform. Decoders, heads and teachers are the paper's sizes (random weights), or the
tests' tiny ones with --parts tiny (the default for vit_pico). The timm row (when timm is
importable; it is not a dependency) is `vit_base_patch16_224` resized to --model, trained
supervised on the same images with the same compile and precision.

Data table: images per CPU-second (one thread, as in a DataLoader worker) from JPEG file to the
collated batch, for each method's transform and for the same pipeline written with torchvision
(when importable), and images/s through a DataLoader with --workers processes. The photos are
cut from scikit-image's samples (installed for the benchmark only).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import utils  # noqa: E402

METHODS = ['simmim', 'maskdistill', 'deepmim', 'lut', 'supmim']
TINY_PARTS = dict(utils.METHOD_FLAGS)  # the tests' tiny decoders, heads and teachers


def time_steps(model, batch, args, device, loss_fn=None):
    """Mean seconds per optimizer step (forward, backward, AdamW, and the EMA update of methods with
    one) after warm-up, and the peak memory of the timed steps."""
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == 'cuda')
    step_model = torch.compile(model) if args.compile else model
    dtype = {'bf16': torch.bfloat16, 'fp32': torch.float32}[args.precision]
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    total = args.warmup + args.steps

    def step(i):
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision != 'fp32'):
            loss = loss_fn(step_model, batch) if loss_fn else step_model(batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(model, 'after_step'):  # LUT's EMA target, as the training loop does
            model.after_step(i, total)
    for i in range(args.warmup):
        step(i)
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(args.warmup, total):
        step(i)
    sync()
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else None
    return (time.perf_counter() - t) / args.steps, mem


def row(name, sec, flops, args, mem):
    ips = args.batch / sec
    mfu = f"{100 * flops * ips / (args.peak_tflops * 1e12):5.1f}%" if args.peak_tflops else '-'
    mem = f"{mem:8.2f}" if mem is not None else '-'
    print(f"{name:<14} {1000 * sec:9.1f} {ips:9.0f} {mfu:>7} {flops / 1e9:9.2f} {mem:>8}", flush=True)


def method_flags(name, args, tmp, a):
    """Flags for the method's parts: --parts tiny takes those of tests/utils.py (a CPU check); paper
    the paper's: decoders and heads at the scripts' defaults, DeepMIM's taps at 1/2, 2/3 and 5/6 of
    the depth (6, 8, 10 of 12), MaskDistill's teacher a ViT the size of the student (CLIP-B/16's for
    ViT-B), SupMIM's target the tokens of an f16 VQGAN with 1024 codes. All weights random."""
    if args.parts == 'tiny':
        return TINY_PARTS.get(name, lambda t, a: [])(tmp, a)
    width, depth, heads = common.model_size(args.model)
    if name == 'simmim':
        return ['--mask-patch-size', str(max(args.patch_size, 32 // args.patch_size * args.patch_size))]
    if name == 'maskdistill':
        return ['--teacher-type', 'timm', '--teacher', utils.random_vit_file(
            os.path.join(tmp, 'teacher.pth'), img_size=args.img_size, patch_size=args.patch_size, embed_dim=width,
            depth=depth, num_heads=heads)]
    if name == 'deepmim':
        return ['--taps', ','.join(str(round(depth * f)) for f in (1 / 2, 2 / 3, 5 / 6))]
    if name == 'supmim':
        import supmim
        path = os.path.join(tmp, 'vqgan.pth')
        torch.save(supmim.VQGANTokenizer().state_dict(), path)
        return ['--tokenizer', path]
    return []


def bench_steps(args, device):
    print(f"\n{args.model}/{args.patch_size} at {args.img_size} px, {args.parts} parts, batch {args.batch}, {args.precision}, "
          f"compile={args.compile}, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'method':<14} {'ms/step':>9} {'img/s':>9} {'MFU':>7} {'GFLOP/im':>9} {'mem GiB':>8}")
    tmp = tempfile.mkdtemp()
    for name in args.methods:
        if not os.path.exists(os.path.join(ROOT, f'{name}.py')):
            continue
        torch.manual_seed(0)
        utils.METHOD_FLAGS[name] = lambda t, a, name=name: method_flags(name, args, t, a)
        model, batch = utils.method_setup(name, args.model, args.img_size, args.patch_size, args.batch, tmp)
        batch = common.to_device(batch, device)
        sec, mem = time_steps(model, batch, args, device)
        row(name, sec, model.flops_per_image(), args, mem)
        del model, batch
    try:
        import timm
    except ImportError:
        print("timm           (not installed: no peer row)")
        return
    width, depth, heads = common.model_size(args.model)
    peer = timm.create_model('vit_base_patch16_224', img_size=args.img_size, patch_size=args.patch_size,
                             embed_dim=width, depth=depth, num_heads=heads, num_classes=1000)
    x = torch.randint(0, 256, (args.batch, 3, args.img_size, args.img_size), dtype=torch.uint8)
    batch = {'img': common.normalize(x.to(device)), 'label': torch.randint(0, 1000, (args.batch,), device=device)}
    sec, mem = time_steps(peer, batch, args, device, lambda m, b: F.cross_entropy(m(b['img']), b['label']))
    ours = common.VisionTransformer(args.img_size, args.patch_size, width, depth, heads, num_classes=1000)
    row(f'timm {timm.__version__}', sec, 3 * (ours.flops() + 2 * width * 1000), args, mem)


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


def torchvision_transforms():
    """Each method's training transform written with torchvision, as the reference code does (float
    ToTensor + Normalize on the CPU, crop then resize), with the same crop scales, bicubic resizing and
    mask generators (common's NumPy ones; torchvision has none), so only the image path differs."""
    import torchvision.transforms as T
    from PIL import ImageFilter
    bicubic, rng = T.InterpolationMode.BICUBIC, np.random.default_rng(0)
    tensor = T.Compose([T.ToTensor(), T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])

    def rrc_flip(scale):
        return T.Compose([T.RandomResizedCrop(224, scale=scale, interpolation=bicubic), T.RandomHorizontalFlip()])
    simmim, maskdistill, deepmim = rrc_flip((0.67, 1.0)), rrc_flip((0.08, 1.0)), rrc_flip((0.2, 1.0))
    jitter = T.ColorJitter(0.4, 0.4, 0.4)
    # DeiT III's simple resized crop and 3-augment (LUT's views); blur as DeiT III, with PIL's filter
    src = T.Compose([T.Resize(224, bicubic), T.RandomCrop(224, padding=4, padding_mode='reflect'), T.RandomHorizontalFlip()])
    blur = T.Lambda(lambda im: im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0)))))
    view2 = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                       T.RandomChoice([T.Grayscale(3), T.RandomSolarize(128, p=1.0), blur])])
    # timm's RandAugment (each of 2 ops applied w.p. 0.5, bicubic, gray fill) from torchvision's, at its top magnitude
    randaug = T.Compose([T.RandomApply([T.RandAugment(1, 30, interpolation=bicubic, fill=[128] * 3)], p=0.5)] * 2)
    supmim = T.Compose([rrc_flip((0.05, 1.0)), randaug])
    return {
        'simmim': lambda im: {'img': tensor(simmim(im)), 'mask': torch.from_numpy(common.simmim_mask(rng))},
        'maskdistill': lambda im: {'img': tensor(jitter(maskdistill(im))),
                                   'mask': torch.from_numpy(common.block_mask(rng, (14, 14), 78))},
        'deepmim': lambda im: {'img': tensor(deepmim(im))},
        'lut': lambda im: {'img': tensor(src(im)), 'img2': tensor(view2(src(im)))},
        'supmim': lambda im: {'img': tensor(supmim(im))},
    }


class TorchvisionFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder reading (pil_loader: open, convert('RGB')) with a dict-valued transform."""
    def __init__(self, samples, transform):
        from torchvision.datasets.folder import pil_loader
        self.samples, self.transform, self.loader = samples, transform, pil_loader

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return dict(self.transform(self.loader(self.samples[i][0])), label=self.samples[i][1])


def per_core(datasets, n, repeats=5):
    """Images per CPU-second of each dataset in this process with one thread, items then collation in
    batches of 32 as a DataLoader worker does. Best of `repeats`, the datasets taking turns, so that
    other load on the machine hits all of them alike (CPU time is robust to it, not immune)."""
    torch.set_num_threads(1)
    order, best = np.random.default_rng(0).permutation(np.arange(n) % len(datasets[0])), [0.0] * len(datasets)
    for _ in range(repeats):
        for k, dataset in enumerate(datasets):
            t = time.process_time()
            for i in range(0, n, 32):
                torch.utils.data.default_collate([dataset[int(j)] for j in order[i:i + 32]])
            best[k] = max(best[k], n / (time.process_time() - t))
    return best


def with_workers(dataset, workers, n):
    """Images per wall-clock second through a DataLoader with `workers` processes."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=workers, shuffle=True, drop_last=True,
                                         persistent_workers=workers > 0)
    next(iter(loader))  # start the workers
    seen, t = 0, time.perf_counter()
    while seen < n:
        for b in loader:
            seen += len(b['label'])
    return seen / (time.perf_counter() - t)


def bench_data(args):
    """Each method's training transform, from JPEG file to the collated uint8 batch, next to the
    same pipeline written with torchvision (when importable)."""
    try:
        folder = make_photos(tempfile.mkdtemp())
    except ImportError:
        print("\ndata path: needs scikit-image for its sample photographs (pip install scikit-image; benchmark only)")
        return
    tmp, n = tempfile.mkdtemp(), args.data_images
    try:
        import torchvision
        tv, version = torchvision_transforms(), f", torchvision {torchvision.__version__}"
    except ImportError:
        tv, version = {}, " (torchvision not installed: no comparison)"
    import PIL
    print(f"\ndata path: 224 px from ~500x375 JPEG q90 photos, {n} images per pipeline; Pillow {PIL.__version__}, "
          f"torch {torch.__version__}{version}")
    print(f"{'method':<12} {'img/s/core':>10} {'torchvision':>11} {'ratio':>6} {f'img/s, {args.workers} worker(s)':>20}")
    threads = torch.get_num_threads()
    for name in args.methods:
        if not os.path.exists(os.path.join(ROOT, f'{name}.py')):
            continue
        ours = common.ImageFolder(folder, utils.method_setup(name, 'vit_pico', 224, 16, 0, tmp, transform_only=True))
        pipelines = [ours, TorchvisionFolder(ours.samples, tv[name])] if name in tv else [ours]
        core, ref = (per_core(pipelines, n) + [float('nan')])[:2]
        torch.set_num_threads(threads)
        wall = with_workers(ours, args.workers, n) if args.workers else float('nan')
        print(f"{name:<12} {core:10.0f} {ref:11.0f} {core / ref:5.2f}x {wall:20.0f}", flush=True)


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
    p.add_argument('--parts', choices=['paper', 'tiny'], default=None,
                   help="decoders, heads and teachers: the paper's, or the tests' tiny ones (default: tiny for vit_pico)")
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch\'s)')
    p.add_argument('--peak-tflops', type=float, default=None, help='default: 989 on CUDA (H100 bf16 dense)')
    p.add_argument('--methods', type=lambda s: s.split(','), default=METHODS)
    p.add_argument('--data-only', action='store_true')
    p.add_argument('--steps-only', action='store_true')
    p.add_argument('--workers', type=int, default=1, help='DataLoader workers for the wall-clock column (0: skip it)')
    p.add_argument('--data-images', type=int, default=256, help='images per pipeline and measurement')
    args = p.parse_args()
    device = torch.device(args.device)
    args.parts = args.parts or ('tiny' if args.model == 'vit_pico' else 'paper')
    if args.threads:
        torch.set_num_threads(args.threads)
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
