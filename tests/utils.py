"""Helpers for tests that run the scripts as a user would: in a subprocess, on tiny settings."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a 4-block, 96-wide ViT on 32 px synthetic images with 4 px patches: 8 x 8 = 64 tokens
TINY = ['--data', 'synthetic', '--model', 'vit_pico', '--img-size', '32', '--patch-size', '4',
        '--batch-size', '8', '--synthetic-size', '32', '--epochs', '1', '--warmup-epochs', '0',
        '--num-workers', '0', '--log-every', '1', '--device', 'cpu']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(script, *args, nproc=1, timeout=600):
    """Run `script` with `args` from the repository root (under torchrun with nproc > 1, gloo on
    CPU); returns the CompletedProcess with text stdout/stderr."""
    cmd = [sys.executable, script, *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
               '--master_addr', '127.0.0.1', '--master_port', str(free_port()), script, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def method_setup(name, model, img_size, patch_size, batch, tmp, transform_only=False):
    """A method's model and one collated training batch made by its own transform on synthetic
    images (random teacher/tokenizer files are written to `tmp` where the method needs one)."""
    import importlib

    import torch

    import common
    module = importlib.import_module(name)
    argv = ['--data', 'synthetic', '--model', model, '--img-size', str(img_size), '--patch-size', str(patch_size),
            '--device', 'cpu', '--output-dir', tmp] + METHOD_FLAGS.get(name, lambda t, a: [])(tmp, locals())
    args = module.get_args(argv)
    transform = module.train_transform(args)
    if transform_only:
        return transform
    net = getattr(module, MODEL_CLASS[name])(args)
    ds = common.SyntheticImages(transform, batch)
    return net, torch.utils.data.default_collate([ds[i] for i in range(batch)])


def random_vit_file(path, **kw):
    """A randomly initialized ViT checkpoint in our format, its architecture included (a stand-in teacher)."""
    import torch

    import common
    vit = common.VisionTransformer(**kw)
    torch.save({'model': vit.state_dict(), 'encoder_kwargs': vit.encoder_kwargs}, path)
    return path


MODEL_CLASS = {'simmim': 'SimMIM', 'maskdistill': 'MaskDistill', 'deepmim': 'DeepMIM', 'lut': 'LUT', 'supmim': 'SupMIM'}
# per method, the flags that make its parts tiny too (decoders, heads, teacher); a['...'] are method_setup's arguments
METHOD_FLAGS = {
    'simmim': lambda tmp, a: ['--mask-patch-size', str(2 * a['patch_size'])] if a['img_size'] < 64 else [],
    'maskdistill': lambda tmp, a: ['--teacher-type', 'timm', '--teacher', random_vit_file(
        os.path.join(tmp, 'teacher.pth'), img_size=a['img_size'], patch_size=a['patch_size'], embed_dim=64, depth=2,
        num_heads=1)],
    'deepmim': lambda tmp, a: ['--taps', '2,3', '--decoder-dim', '32', '--decoder-depth', '1', '--decoder-heads', '2'],
    'lut': lambda tmp, a: ['--decoder-dim', '32', '--decoder-depth', '1', '--decoder-heads', '2', '--head-dim', '64'],
    'supmim': lambda tmp, a: ['--target', 'pixels'],
}


def official_mae_shapes(dim, depth, patch, num_patches, dec_dim, dec_depth):
    """Key -> shape of an official MAE checkpoint (models_mae.py / mae_visualize_*.pth), from REFERENCE.md."""
    def block(prefix, w):
        return {f'{prefix}.norm1.weight': (w,), f'{prefix}.norm1.bias': (w,),
                f'{prefix}.attn.qkv.weight': (3 * w, w), f'{prefix}.attn.qkv.bias': (3 * w,),
                f'{prefix}.attn.proj.weight': (w, w), f'{prefix}.attn.proj.bias': (w,),
                f'{prefix}.norm2.weight': (w,), f'{prefix}.norm2.bias': (w,),
                f'{prefix}.mlp.fc1.weight': (4 * w, w), f'{prefix}.mlp.fc1.bias': (4 * w,),
                f'{prefix}.mlp.fc2.weight': (w, 4 * w), f'{prefix}.mlp.fc2.bias': (w,)}
    enc = {'cls_token': (1, 1, dim), 'pos_embed': (1, 1 + num_patches, dim),
           'patch_embed.proj.weight': (dim, 3, patch, patch), 'patch_embed.proj.bias': (dim,),
           'norm.weight': (dim,), 'norm.bias': (dim,)}
    for i in range(depth):
        enc.update(block(f'blocks.{i}', dim))
    dec = {'mask_token': (1, 1, dec_dim), 'decoder_embed.weight': (dec_dim, dim), 'decoder_embed.bias': (dec_dim,),
           'decoder_pos_embed': (1, 1 + num_patches, dec_dim), 'decoder_norm.weight': (dec_dim,),
           'decoder_norm.bias': (dec_dim,), 'decoder_pred.weight': (patch * patch * 3, dec_dim),
           'decoder_pred.bias': (patch * patch * 3,)}
    for i in range(dec_depth):
        dec.update(block(f'decoder_blocks.{i}', dec_dim))
    return enc, dec


def tiny_vqgan(tmp):
    """--target tokens with a random 3-level VQGAN (f = 4: 8 x 8 tokens for the 8 x 8 patches of 32 px)."""
    import torch

    import supmim
    path = os.path.join(tmp, 'vqgan.pth')
    torch.save(supmim.VQGANTokenizer(32, (1, 1, 2), 1, (2,), 32, 16, 64).state_dict(), path)
    return ['--target', 'tokens', '--tokenizer', path]


def tiny_clip(tmp):
    """A random CLIP-format image tower (OpenAI names, `proj` to 32 wide) for the same 8 x 8 grid."""
    import torch

    import common
    vit = common.VisionTransformer(32, 4, 64, 2, 1, pre_norm=True, act='quick_gelu', norm_eps=1e-5, patch_bias=False)
    sd = {}
    for k, v in vit.state_dict().items():
        for clip, ours in common.CLIP_NAMES:
            k = k.replace(ours, clip) if ours.startswith('.') or k.startswith(ours) else k
        sd[k] = v
    sd['class_embedding'], sd['positional_embedding'] = sd.pop('cls_token').flatten(), sd.pop('pos_embed')[0]
    sd['proj'] = torch.randn(64, 32)
    path = os.path.join(tmp, 'clip.pth')
    torch.save(sd, path)
    return path


def clip_teacher(tmp):
    return ['--teacher-type', 'clip', '--teacher', tiny_clip(tmp), '--teacher-proj']


def clip_target(tmp):
    return ['--target', 'clip', '--teacher', tiny_clip(tmp)]
