"""Each method's `flops_per_image()` (the hand count behind the MFU column) against PyTorch's
FlopCounterMode on one real training step: forward and backward of the trainable part, the frozen
teachers' forward only, on the tiny configs of tests/utils.method_setup.

Both sides count matmul-like ops only (linear, bmm, attention, convolution): LayerNorm, BatchNorm,
softmax, GELU, the losses, bicubic resizes, EMA updates and the optimizer are in neither. The hand
count uses the 3x rule (backward = 2x forward: one matmul for the input gradient, one for the
weight gradient); two places where the measured step differs from that rule by construction are
reconciled exactly before comparing, so the stated tolerance is float rounding (1e-9 relative):
  - the patch-embedding convolution gets no input gradient (the image needs none): its backward is
    1x its forward, and the 3x rule counts one more forward's worth;
  - the fused attention backward recomputes the scores q k^T (FlopCounterMode counts 5 bmm-sized
    products where the 3x rule counts 4).
Without them the raw counter and the hand count differ by -0.3% to +1.4% at these sizes.
PyTorch registers no FLOP formula for the CPU flash-attention kernel; it gets the same formulas as
the CUDA ones here. Any remaining difference is a term of the hand count: the failure message
prints per-op counts to find it.
"""
import os
import tempfile

import pytest
import torch
import torch.utils.flop_counter as flop_counter

import common
import utils

aten = torch.ops.aten
B = 2  # images per step; LUT's projector BatchNorm needs 2


def _sdpa_cpu(q, k, v, *args, out_val=None, **kwargs):
    return flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape)


def _sdpa_cpu_backward(grad_out, q, k, v, *args, out_val=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)


_sdpa_cpu._get_raw = _sdpa_cpu_backward._get_raw = True  # called with tensors, not shapes
CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}
FUSED_SDPA_BACKWARD = ('_scaled_dot_product_flash_attention_for_cpu_backward', '_scaled_dot_product_flash_attention_backward',
                       '_scaled_dot_product_efficient_attention_backward', '_scaled_dot_product_cudnn_attention_backward')


def measured_flops(model, batch):
    """FLOPs per image of one training step as the 3x rule books them, and the raw per-op counts."""
    model.train()
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        loss, _ = model(batch)
        loss.backward()
    ops = {str(k).removeprefix('aten.'): v / B for k, v in fc.get_flop_counts()['Global'].items()}
    recompute = sum(ops.get(k, 0) for k in FUSED_SDPA_BACKWARD) / 5  # the scores, computed again
    no_input_grad = ops.get('convolution_backward', 0)  # the patch embeddings' weight gradients: as much for the input's
    return sum(ops.values()) - recompute + no_input_grad, ops


def tiny_vqgan(tmp):
    """--target tokens with a random 3-level VQGAN (f = 4: 8 x 8 tokens for the 8 x 8 patches of 32 px)."""
    import supmim
    path = os.path.join(tmp, 'vqgan.pth')
    torch.save(supmim.VQGANTokenizer(32, (1, 1, 2), 1, (2,), 32, 16, 64).state_dict(), path)
    return ['--target', 'tokens', '--tokenizer', path]


def tiny_clip(tmp):
    """A random CLIP-format image tower (OpenAI names, `proj` to 32 wide) for the same 8 x 8 grid."""
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


CASES = [  # (method, extra flags on top of utils.METHOD_FLAGS, or a function of the temporary folder giving them)
    ('simmim', []), ('simmim', ['--rel-pos-bias']),
    ('maskdistill', []), ('maskdistill', ['--no-rel-pos-bias']), ('maskdistill', clip_teacher),
    ('deepmim', []), ('deepmim', ['--taps', '']),
    ('deepmim', clip_target),
    ('lut', []), ('lut', ['--steer', 'all', '--supervision', 'token']), ('lut', ['--target-mask-ratio', '0.5']),
    ('supmim', []), ('supmim', tiny_vqgan), ('supmim', ['--mask-cls-input', '--pool-cls', 'cls']),
    ('supmim', ['--mim-weight', '0']),
]


@pytest.fixture(autouse=True)
def one_thread():  # tiny matmuls gain nothing from more, and lose much when the cores are busy elsewhere
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def case_id(v):
    return v if isinstance(v, str) else v.__name__ if callable(v) else ' '.join(a.lstrip('-') or "''" for a in v) or 'defaults'


@pytest.mark.parametrize('name,flags', CASES, ids=case_id)
def test_flops_per_image_matches_flop_counter(name, flags, monkeypatch):
    base = utils.METHOD_FLAGS.get(name, lambda tmp, a: [])
    monkeypatch.setitem(utils.METHOD_FLAGS, name, lambda tmp, a: base(tmp, a) + (flags(tmp) if callable(flags) else flags))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, batch = utils.method_setup(name, 'vit_pico', 32, 4, B, tmp)
    measured, ops = measured_flops(model, common.to_device(batch, torch.device('cpu')))
    hand = model.flops_per_image()
    assert hand == pytest.approx(measured, rel=1e-9), (
        f"{name}: flops_per_image {hand:,.0f} vs measured {measured:,.0f} "
        f"({hand - measured:+,.0f}, {100 * (hand / measured - 1):+.3g}%); per op and image: {ops}")
