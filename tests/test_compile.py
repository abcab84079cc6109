"""After warm-up, further training steps of each method trigger no recompilation (CPU, tiny model)."""
import os
import tempfile

import pytest
import torch

import common
from utils import ROOT, method_setup

METHODS = [m for m in ['simmim', 'maskdistill', 'deepmim', 'lut', 'supmim'] if os.path.exists(os.path.join(ROOT, f'{m}.py'))]


@pytest.mark.parametrize('name', METHODS)
def test_no_recompile_after_warmup(name):
    torch.compiler.reset()
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    model, _ = method_setup(name, 'vit_pico', 32, 4, 4, tmp)
    transform = method_setup(name, 'vit_pico', 32, 4, 4, tmp, transform_only=True)
    ds = common.SyntheticImages(transform, 32)
    batches = [common.to_device(torch.utils.data.default_collate([ds[(i, e)] for i in range(4 * k, 4 * k + 4)]), 'cpu')
               for e, k in [(0, 0), (0, 1), (1, 2), (2, 3)]]  # different images, masks and augmentations
    # recompiles are decided by Dynamo's guards, whatever the backend: aot_eager traces forward and backward
    # as inductor does, without its C++ code generation (tests/test_train.py compiles with inductor end to end)
    compiled = torch.compile(model, backend='aot_eager')
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch, i):
        loss, _ = compiled(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(model, 'after_step'):
            model.after_step(i, 100)
    step(batches[0], 0)
    step(batches[1], 1)  # a second step may specialize once more (e.g. optimizer state now exists)
    with torch.compiler.set_stance('fail_on_recompile'):  # any compilation from here on raises
        for i, batch in enumerate(batches[2:], 2):
            step(batch, i)
