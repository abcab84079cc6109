"""Benchmarks (not collected by pytest): each method's training step next to timm's supervised ViT
step, the peak memory of each script's defaults, and the speed of each method's data path.

  python tests/bench.py --device cuda --steps-only          # ViT-B, each script's default batch per GPU, bf16, compiled
  python tests/bench.py --device cpu --model vit_tiny --img-size 64 --patch-size 8 --batch 32 --threads 2 --no-compile --steps-only
  python tests/bench.py --memory-only                        # peak memory per GPU at the defaults, counted on the CPU
  python tests/bench.py --data-only --workers 1              # images/s per core on ~500x375 JPEG photos, cores per GPU

Step table: ms/step, img/s, MFU (FLOPs per image of one training step as common.train counts them:
common.train_flops, encoder, decoders and frozen teachers), peak memory (CUDA), and process CPU time per training FLOP next to timm's, N
steps after warm-up on a fixed batch made by the method's own training transform, already on the
device. Decoders, heads and teachers are the paper's sizes (random weights), or the tests' tiny
ones with --parts tiny (the default for vit_pico). The timm row (when timm is importable; it is
not a dependency) is `vit_base_patch16_224` resized to --model, trained supervised on random
images with the same compile and precision.

Memory table: see bench_memory. Data table: images per CPU-second (one thread, as in a DataLoader
worker) from JPEG file to the collated batch, for each method's transform and for the same pipeline
written with torchvision (when importable), images/s through a DataLoader with --workers
processes, and the cores per GPU that feed an H100 at the method's target MFU (50% full-token
methods, 40% the MAE family). The photos are cut from scikit-image's samples (installed for the
benchmark only).
"""
import argparse
import importlib
import os
import sys
import tempfile
import time
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode  # the extension point FlopCounterMode is built on

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import utils  # noqa: E402

METHODS = ['simmim', 'maskdistill', 'deepmim', 'lut', 'supmim']
TARGET_MFU = {'simmim': 0.5, 'maskdistill': 0.5, 'supmim': 0.5, 'deepmim': 0.4, 'lut': 0.4}  # full-token / MAE family
VIT_B = argparse.Namespace(model='vit_base', img_size=224, patch_size=16, parts='paper')  # the scripts' defaults
TINY_PARTS = dict(utils.METHOD_FLAGS)  # the tests' tiny decoders, heads and teachers


def time_steps(model, batch, args, device, loss_fn=None):
    """Mean wall and process CPU seconds per optimizer step (forward, backward, AdamW, and the EMA
    update of methods with one) after warm-up, and the peak memory (GiB) of the timed steps."""
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
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(args.warmup, total):
        step(i)
    sync()
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else None
    return (time.perf_counter() - t) / args.steps, (time.process_time() - cpu) / args.steps, mem


def row(name, batch, sec, cpu, flops, args, mem, peer_cpu_per_flop=None):
    """One line of the step table; CPU time per FLOP is the process's (all threads), per training FLOP."""
    ips = batch / sec
    mfu = f"{100 * flops * ips / (args.peak_tflops * 1e12):5.1f}%" if args.peak_tflops else '-'
    mem = f"{mem:8.2f}" if mem is not None else '-'
    per_flop = cpu / (batch * flops) * 1e12  # CPU seconds per TFLOP
    vs = f"{per_flop / peer_cpu_per_flop:6.3f}" if peer_cpu_per_flop else ' 1.000'
    print(f"{name:<14} {batch:5d} {1000 * sec:9.1f} {ips:9.0f} {mfu:>7} {flops / 1e9:9.2f} {mem:>8} {per_flop:10.2f} {vs:>8}",
          flush=True)
    return per_flop


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


def default_batch(name, tmp):
    """The script's default batch per GPU (its get_args with the flags its parts need)."""
    return importlib.import_module(name).get_args(['--data', 'synthetic'] + method_flags(name, VIT_B, tmp, {})).batch_size


class Supervised(nn.Module):  # timm's classifier under common.train's protocol, for its FLOP count
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        return F.cross_entropy(self.net(batch['img']), batch['label']), {}


def bench_steps(args, device):
    """The step table: timm's supervised ViT first (the reference for CPU time per FLOP), then each
    method; a method that runs out of device memory gets an OOM row."""
    print(f"\n{args.model}/{args.patch_size} at {args.img_size} px, {args.parts} parts, {args.precision}, "
          f"compile={args.compile}, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; batch: "
          + (str(args.batch) if args.batch else "each script's default per GPU"))
    print(f"{'method':<14} {'batch':>5} {'ms/step':>9} {'img/s':>9} {'MFU':>7} {'GFLOP/im':>9} {'mem GiB':>8} "
          f"{'CPU s/TFLOP':>10} {'vs timm':>8}")
    tmp, width, depth, heads, peer = tempfile.mkdtemp(), *common.model_size(args.model), None
    try:
        import timm
        model = timm.create_model('vit_base_patch16_224', img_size=args.img_size, patch_size=args.patch_size,
                                  embed_dim=width, depth=depth, num_heads=heads, num_classes=1000)
        n = args.batch or 256
        x = torch.randint(0, 256, (n, 3, args.img_size, args.img_size), dtype=torch.uint8)
        batch = {'img': common.normalize(x.to(device)), 'label': torch.randint(0, 1000, (n,), device=device)}
        sec, cpu, mem = time_steps(model, batch, args, device, lambda m, b: F.cross_entropy(m(b['img']), b['label']))
        flops = common.train_flops(Supervised(model), {k: v[:2] for k, v in batch.items()})
        peer = row(f'timm {timm.__version__}', n, sec, cpu, flops, args, mem)
        del model, batch
    except ImportError:
        print("timm           (not installed: no peer row)")
    for name in args.methods:
        torch.manual_seed(0)
        n = args.batch or default_batch(name, tmp)
        utils.METHOD_FLAGS[name] = lambda t, a, name=name: method_flags(name, args, t, a) + ['--device', device.type]
        model, batch = utils.method_setup(name, args.model, args.img_size, args.patch_size, n, tmp)
        try:
            batch = common.to_device(batch, device)
            flops = common.train_flops(model, {k: v[:2] for k, v in batch.items()})
            sec, cpu, mem = time_steps(model, batch, args, device)
            row(name, n, sec, cpu, flops, args, mem, peer)
        except torch.OutOfMemoryError:
            print(f"{name:<14} {n:5d} OOM", flush=True)
        del model, batch
        if device.type == 'cuda':
            torch.cuda.empty_cache()


# ---- memory at the defaults ------------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """The peak bytes of the tensors made while active that are still alive (a tensor autograd saves
    keeps its Python object, so it counts until backward frees it)."""
    def __init__(self):
        super().__init__()
        self.refs, self.now, self.peak, self.paused = {}, 0, 0, False

    def track(self, t):
        key = t.untyped_storage().data_ptr()
        n, count = self.refs.get(key, (t.untyped_storage().nbytes(), 0))
        if count == 0:
            self.now += n
            self.peak = max(self.peak, self.now)
        self.refs[key] = (n, count + 1)
        weakref.finalize(t, self._drop, key)
        return t

    def _drop(self, key):
        n, count = self.refs[key]
        self.refs[key] = (n, count - 1)
        if count == 1:
            del self.refs[key]
            self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not self.paused:
                self.track(t)
        return out


def fp32_norms(fn):
    """CUDA's autocast runs layer_norm and group_norm in float32 whatever their input; the CPU's runs
    them in the input's dtype. Counting on the CPU, cast their inputs as CUDA would."""
    def norm(*a, **k):
        if torch.is_autocast_enabled('cpu'):  # input, weight and bias alike (bf16 teachers have bf16 weights)
            a = [v.float() if isinstance(v, torch.Tensor) else v for v in a]
            k = {n: v.float() if isinstance(v, torch.Tensor) else v for n, v in k.items()}
        return fn(*a, **k)
    return norm


def fast_bf16_conv(fn):
    """A no-grad bf16 convolution computed in float32 and rounded to bf16: CPUs without bf16 units
    run bf16 convolutions about 200x slower (the VQGAN tokenizer would take hours). Only the bf16
    output counts as allocated, as on CUDA."""
    def conv(x, w, b=None, *a, **k):
        if torch.is_grad_enabled() or not torch.is_autocast_enabled('cpu') or LIVE is None:
            return fn(x, w, b, *a, **k)
        LIVE.paused = True
        with torch.autocast('cpu', enabled=False):
            out = fn(x.float(), w.float(), None if b is None else b.float(), *a, **k).to(torch.bfloat16)
        LIVE.paused = False
        return LIVE.track(out)
    return conv


LIVE = None  # the LiveBytes of the forward being counted


def forward_memory(model, batch):
    """One bf16-autocast forward: (bytes autograd saves for backward, peak bytes alive: the saved
    ones and the working set on top of them, e.g. the VQGAN tokenizer's temporaries)."""
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t
    global LIVE
    live = LIVE = LiveBytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast('cpu', dtype=torch.bfloat16), live:
        loss, _ = model(batch)
    del loss
    LIVE = None
    return sum(saved.values()), live.peak


def bench_memory(args):
    """Peak memory of each method's training step at its defaults (ViT-B, default batch per GPU):
    parameters, gradients and AdamW's two moments in float32, frozen parts as the scripts keep them
    on CUDA (teachers bf16), plus the peak of the forward: the bytes saved for backward and the
    working set on top of them (the largest temporaries, e.g. the VQGAN tokenizer's under no_grad),
    counted on the CPU under bf16 autocast with CUDA's rules at two small batches and extrapolated
    linearly. Backward frees saved tensors as it makes gradients, so its peak is about the
    forward's. Not counted: allocator caching and fragmentation, cuDNN / NCCL workspaces, hence
    the 10% margin of the last column."""
    gib, tmp = 2 ** 30, tempfile.mkdtemp()
    print("\npeak memory per GPU at the defaults (bf16, CUDA's autocast rules, counted on the CPU)")
    print(f"{'method':<12} {'batch':>5} {'params+grads+AdamW':>19} {'frozen':>7} {'saved act.':>10} {'largest temp.':>13} "
          f"{'total GiB':>9} {'fits 80 GB':>10}")
    torch.nn.functional.layer_norm = fp32_norms(real_layer_norm := torch.nn.functional.layer_norm)
    torch.nn.functional.group_norm = fp32_norms(real_group_norm := torch.nn.functional.group_norm)
    torch.nn.functional.conv2d = fast_bf16_conv(real_conv2d := torch.nn.functional.conv2d)
    try:
        for name in args.methods:
            batch_size = default_batch(name, tmp)
            # the paper's parts at ViT-B; --device cuda: frozen teachers cast to bf16 as a CUDA run does
            utils.METHOD_FLAGS[name] = lambda t, a, name=name: method_flags(name, VIT_B, t, a) + ['--device', 'cuda']
            counts = []
            for b in (2, 3):  # LUT's BatchNorm needs 2 images
                torch.manual_seed(0)
                model, batch = utils.method_setup(name, 'vit_base', 224, 16, b, tmp)
                counts.append(forward_memory(model, common.to_device(batch, torch.device('cpu'))))
            (s2, p2), (s3, p3) = counts
            saved, peak = s2 + (s3 - s2) * (batch_size - 2), p2 + (p3 - p2) * (batch_size - 2)
            temp = max(0, peak - saved)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            frozen = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.requires_grad)
            total = 16 * trainable + frozen + saved + temp  # float32 weights, gradients, AdamW's two moments
            print(f"{name:<12} {batch_size:5d} {16 * trainable / gib:19.2f} {frozen / gib:7.2f} {saved / gib:10.2f} "
                  f"{temp / gib:13.2f} {total / gib:9.1f} {'yes' if 1.1 * total < 80 * gib else 'NO':>10}", flush=True)
            del model, batch
    finally:
        torch.nn.functional.layer_norm, torch.nn.functional.group_norm = real_layer_norm, real_group_norm
        torch.nn.functional.conv2d = real_conv2d


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
    mask generators (the scripts' NumPy ones; torchvision has none), so only the image path differs."""
    import torchvision.transforms as T
    from PIL import ImageFilter

    from maskdistill import beit_num_masked, block_mask
    from simmim import simmim_mask
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
        'simmim': lambda im: {'img': tensor(simmim(im)), 'mask': torch.from_numpy(simmim_mask(rng))},
        'maskdistill': lambda im: {'img': tensor(jitter(maskdistill(im))),
                                   'mask': torch.from_numpy(block_mask(rng, (14, 14), beit_num_masked((14, 14))))},
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
    same pipeline written with torchvision (when importable), and the CPU cores per GPU it takes
    to feed an H100 at the method's target MFU (989 TFLOP/s dense bf16; FLOPs per image of the
    method at its ViT-B defaults, common.train_flops)."""
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
    print(f"{'method':<12} {'img/s/core':>10} {'torchvision':>11} {'ratio':>6} {f'img/s, {args.workers} worker(s)':>20} "
          f"{'GFLOP/img':>9} {'H100 img/s':>10} {'cores/GPU':>9}")
    threads = torch.get_num_threads()
    for name in args.methods:
        ours = common.ImageFolder(folder, utils.method_setup(name, 'vit_pico', 224, 16, 0, tmp, transform_only=True))
        pipelines = [ours, TorchvisionFolder(ours.samples, tv[name])] if name in tv else [ours]
        core, ref = (per_core(pipelines, n) + [float('nan')])[:2]
        torch.set_num_threads(threads)
        wall = with_workers(ours, args.workers, n) if args.workers else float('nan')
        utils.METHOD_FLAGS[name] = lambda t, a, name=name: method_flags(name, VIT_B, t, a)
        model, batch = utils.method_setup(name, 'vit_base', 224, 16, 2, tmp)  # the script's parts at ViT-B
        flops = common.train_flops(model, common.to_device(batch, torch.device('cpu')))
        need = TARGET_MFU[name] * 989e12 / flops  # images per second an H100 trains on at the target MFU
        print(f"{name:<12} {core:10.0f} {ref:11.0f} {core / ref:5.2f}x {wall:20.0f} {flops / 1e9:9.1f} {need:10.0f} "
              f"{need / core:9.1f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--model', default='vit_base')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--patch-size', type=int, default=16)
    p.add_argument('--batch', type=int, default=None, help="images per step (default: each script's default per GPU; timm 256)")
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
    p.add_argument('--memory-only', action='store_true', help='the peak-memory estimate at the defaults (CPU, a few minutes)')
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
    only = args.steps_only or args.memory_only or args.data_only
    if args.steps_only or not only:
        bench_steps(args, device)
    if args.memory_only or not only:
        bench_memory(args)
    if args.data_only or not only:
        bench_data(args)


if __name__ == '__main__':
    main()
