"""What keeps a GPU busy, checked on the CPU with tiny models: torch.compile captures each method's
step in as few graphs as the method allows (graph breaks listed and justified below), and the
training loop reads nothing back from the device (no host sync) outside its logging steps."""
import importlib
import os
import sys
import tempfile

import pytest
import torch

import common
import utils
from utils import clip_target, clip_teacher, tiny_vqgan

METHODS = [m for m in ['simmim', 'maskdistill', 'deepmim', 'lut', 'supmim'] if os.path.exists(os.path.join(utils.ROOT, f'{m}.py'))]
CASES = [(m, []) for m in METHODS] + [('maskdistill', clip_teacher), ('deepmim', clip_target), ('supmim', tiny_vqgan)]
# Graph breaks per forward, by method; the others have none: their forward is one graph (masks are
# drawn with torch.rand on the device or arrive with the batch, losses are (loss * mask).sum() / mask.sum(),
# the colour augmentations select per image with torch.where).
GRAPH_BREAKS = {
    'supmim': 1,  # SupMIM.mixup is torch.compiler.disable'd: its Beta draw comes from a NumPy generator on
                  # the host (seeded by a CPU torch.randint, no device read); the step runs as two graphs
}


def case_id(v):
    return v if isinstance(v, str) else v.__name__ if callable(v) else 'defaults'


def setup(name, flags, monkeypatch, tmp):
    base = utils.METHOD_FLAGS.get(name, lambda t, a: [])
    monkeypatch.setitem(utils.METHOD_FLAGS, name, lambda t, a: base(t, a) + (flags(t) if callable(flags) else flags))
    torch.manual_seed(0)
    return utils.method_setup(name, 'vit_pico', 32, 4, 4, tmp)


@pytest.mark.parametrize('name,flags', CASES, ids=case_id)
def test_graph_breaks(name, flags, monkeypatch):
    """A counting backend (torch.compile's public backend hook) sees one graph per compiled region:
    graphs - 1 = graph breaks in the forward of one training step."""
    torch.compiler.reset()
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    with tempfile.TemporaryDirectory() as tmp:
        model, batch = setup(name, flags, monkeypatch, tmp)
    loss, _ = torch.compile(model, backend=count)(common.to_device(batch, torch.device('cpu')))
    loss.backward()
    assert len(graphs) - 1 == GRAPH_BREAKS.get(name, 0), [str(g.graph)[-300:] for g in graphs]


# Python-level reads of a tensor's value: on a GPU each one waits for the device to catch up
SYNCS = ['item', 'tolist', '__bool__', '__float__', '__int__', '__index__', 'numpy', 'cpu', 'nonzero']
# reads of tensors that live on the host whatever the device (on the CPU the test cannot tell them apart)
HOST_TENSOR_READS = {
    'supmim.py:mixup',  # the seed of its NumPy generator: torch.randint on the CPU generator the loop seeds per step
}


@pytest.mark.parametrize('name,flags', [(m, []) for m in METHODS] + [('supmim', tiny_vqgan)], ids=case_id)
def test_no_host_sync_outside_logging_steps(name, flags, monkeypatch, tmp_path):
    """common.train for 6 steps, a log line every 3: every read of a tensor's value is recorded with
    the step it happens in (counted by the batches moved to the device). Steps 3 and 6 log (and 6
    saves the checkpoint); the four others must read nothing. Eager mode: every Python-level read
    shows, including any that would be a graph break under compile. Data loading runs in a worker
    process, out of sight. The CPU's AdamW reads its step counters on the host (they live on the
    CPU); the loop uses fused AdamW on CUDA, which keeps them on the device: those reads are not
    counted."""
    module = importlib.import_module(name)
    flags = utils.METHOD_FLAGS.get(name, lambda t, a: [])(str(tmp_path), dict(img_size=32, patch_size=4)) + (
        flags(str(tmp_path)) if callable(flags) else flags)
    argv = utils.TINY + flags + ['--batch-size', '4', '--accum-iter', '1', '--synthetic-size', '24', '--log-every', '3', '--num-workers', '1',
                                 '--no-compile', '--output-dir', str(tmp_path)]
    args = module.get_args(argv)
    torch.manual_seed(0)
    model = getattr(module, utils.MODEL_CLASS[name])(args)
    dataset = common.build_dataset(args, module.train_transform(args))
    step, reads = [-1], []  # -1: the first batch moved is the FLOP count's (common.train_flops), before step 0
    to_device = common.to_device

    def counted_to_device(batch, device):
        step[0] += 1
        return to_device(batch, device)
    monkeypatch.setattr(common, 'to_device', counted_to_device)
    for attr in SYNCS:
        def spy(self, *a, _real=getattr(torch.Tensor, attr), _attr=attr, **k):
            files, frame = [], sys._getframe(1)
            while frame:
                files.append((frame.f_code.co_filename, frame.f_code.co_name))
                frame = frame.f_back
            if not any(f'{os.sep}torch{os.sep}optim{os.sep}' in f for f, _ in files):
                ours = [(f, fn) for f, fn in files if os.path.dirname(f) == utils.ROOT]  # the project code that asked
                where = f'{os.path.basename(ours[0][0])}:{ours[0][1]}' if ours else files[0][1]
                if where not in HOST_TENSOR_READS:
                    reads.append((step[0], _attr, where))
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, attr, spy)
    monkeypatch.setattr(sys, 'stdout', open(os.devnull, 'w'))  # the loop's log lines
    common.train(args, model, dataset)
    monkeypatch.undo()
    assert step[0] == 6
    outside = [r for r in reads if r[0] % 3 and r[0] >= 0]  # step -1: setup (the FLOP count's batch, made on the host)
    assert not outside, f"host syncs outside logging steps (step, read, where): {outside}"
    assert any(r[0] == 3 for r in reads)  # the spy works: the log line reads the loss


def test_teachers_cast_to_bf16_once_for_cuda_and_stay_fp32_on_cpu(monkeypatch):
    """MaskDistill's teacher and DeepMIM's CLIP target: bf16 weights when the run will autocast to
    bf16 on CUDA (cast at construction, not at every step), fp32 otherwise; a bf16 teacher gives the
    fp32 teacher's targets to bf16 precision."""
    import deepmim
    import maskdistill
    with tempfile.TemporaryDirectory() as tmp:
        common_flags = ['--data', 'synthetic', '--model', 'vit_pico', '--img-size', '32', '--patch-size', '4']
        for device, precision, dtype in [('cpu', None, torch.float32), ('cuda', None, torch.bfloat16),
                                         ('cuda', 'fp32', torch.float32)]:
            more = ['--device', device] + (['--precision', precision] if precision else [])
            md = maskdistill.MaskDistill(maskdistill.get_args(common_flags + clip_teacher(tmp) + more))
            dm = deepmim.DeepMIM(deepmim.get_args(common_flags + ['--taps', '2'] + clip_target(tmp) + more))
            assert {p.dtype for p in md.teacher.parameters()} | {p.dtype for p in md.teacher.buffers()} == {dtype}
            assert {p.dtype for p in dm.teacher.parameters()} == {dtype} and dm.teacher_proj.dtype == dtype
            assert {p.dtype for n, p in md.named_parameters() if not n.startswith('teacher.')} == {torch.float32}
        torch.manual_seed(0)
        fp32 = maskdistill.MaskDistill(maskdistill.get_args(common_flags + clip_teacher(tmp) + ['--device', 'cpu']))
        img = torch.randn(2, 3, 32, 32)
        ref = fp32.teacher(img)
        fp32.teacher.to(torch.bfloat16)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = fp32.teacher(img).float()
    assert torch.allclose(got, ref, atol=0.1 * ref.abs().max().item(), rtol=0.05)
