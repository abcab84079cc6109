"""The training loop in common.py: schedule, weight decay, checkpoints, exact resume, DDP, compile."""
import math
import os

import pytest
import torch

import common
import simmim
from utils import TINY, run

ARGS = TINY + ['--mask-patch-size', '8']


def test_lr_schedule_values():
    lr, min_lr, total, warm = 1e-3, 1e-5, 1000, 100
    f = lambda s: common.get_lr(s, total, warm, lr, min_lr)  # noqa: E731
    assert f(0) == 0 and f(50) == pytest.approx(lr / 2)
    assert f(warm) == pytest.approx(lr)  # end of warmup: the peak
    assert f(550) == pytest.approx(min_lr + (lr - min_lr) / 2)  # cosine midpoint
    assert f(total) == pytest.approx(min_lr)
    assert all(f(s) >= f(s + 1) for s in range(warm, total))


def test_no_weight_decay_on_1d_params_and_biases():
    model = simmim.SimMIM(simmim.get_args(ARGS))
    decay, no_decay = common.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0
    assert all(p.ndim > 1 and not names[id(p)].endswith('.bias') for p in decay['params'])
    assert {names[id(p)] for p in no_decay['params']} == {n for n, p in model.named_parameters() if p.ndim <= 1} | {'cls_token'}  # + SimMIM's skip list
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


def test_checkpoint_round_trip(tmp_path):
    model = simmim.SimMIM(simmim.get_args(ARGS))
    path = str(tmp_path / 'c.pth')
    common.save_checkpoint({'model': model.state_dict(), 'args': {'a': 1, 'betas': (0.9, 0.95)}}, path)
    ckpt = common.read_checkpoint(path)  # weights_only=True
    other = simmim.SimMIM(simmim.get_args(ARGS + ['--seed', '1']))
    other.load_state_dict(ckpt['model'])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert not list(tmp_path.glob('*.tmp*'))  # the temporary file was renamed


class StopAt(simmim.SimMIM):
    """SimMIM that asks for a stop (as SIGTERM would) after a given optimizer step."""
    stop_at = -1

    def after_step(self, step, total_steps):
        if step == self.stop_at:
            common.request_stop()


def train(argv, stop_at=-1):
    args = simmim.get_args(argv)
    torch.manual_seed(args.seed)  # as simmim.main
    model = StopAt(args)
    model.stop_at = stop_at
    return common.train(args, model, common.build_dataset(args, simmim.train_transform(args)))


def test_resume_continues_exactly(tmp_path):
    argv = ARGS + ['--epochs', '2', '--save-every', '1', '--blr', '1e-3', '--warmup-epochs', '1']
    full = train(argv + ['--output-dir', str(tmp_path / 'a')])
    with pytest.raises(common.Stopped):  # stopped mid-epoch (step 6 of 8, 4 steps per epoch)
        train(argv + ['--output-dir', str(tmp_path / 'b')], stop_at=5)
    assert common.read_checkpoint(str(tmp_path / 'b' / 'checkpoint.pth'))['step'] == 6
    with pytest.raises(common.UsageError, match='--resume'):  # never overwrite without --resume
        train(argv + ['--output-dir', str(tmp_path / 'b')])
    resumed = train(argv + ['--output-dir', str(tmp_path / 'b'), '--resume'])
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path):
    out = str(tmp_path)
    train(ARGS + ['--output-dir', out])
    before = common.read_checkpoint(f'{out}/checkpoint.pth')
    with pytest.raises(common.NonFiniteLoss, match='step'):
        train(ARGS + ['--output-dir', out, '--resume', '--epochs', '3', '--lr', '1e30'])
    after = common.read_checkpoint(f'{out}/checkpoint.pth')
    assert after['step'] == before['step'] and all(torch.equal(before['model'][k], after['model'][k]) for k in before['model'])


def test_two_process_ddp_trains_the_global_batch(tmp_path):
    r = run('simmim.py', *ARGS, '--output-dir', tmp_path, '--synthetic-size', '64', nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert common.read_checkpoint(str(tmp_path / 'checkpoint.pth'))['step'] == 4  # 64 images / (8 x 2 ranks)


def test_compile_runs_on_cpu(tmp_path):
    model = train(ARGS + ['--output-dir', str(tmp_path), '--compile', '--epochs', '2'])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = open(tmp_path / 'log.jsonl').read().splitlines()
    assert len(rows) == 1 + 8 and all(math.isfinite(float(r.split('"loss": ')[1].split(',')[0])) for r in rows[1:])


@pytest.mark.parametrize('device', ['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
def test_device_batches_match_plain_copies(device):
    g = torch.Generator().manual_seed(0)
    host = [{'img': torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=g), 'label': torch.arange(2) + i}
            for i in range(5)]
    got = list(common.device_batches(iter(host), torch.device(device)))  # on CUDA: copied on a side stream
    want = [common.to_device(b, torch.device(device)) for b in host]
    assert len(got) == 5 and all(torch.equal(a[k], b[k]) for a, b in zip(got, want) for k in a)


def test_num_workers_default_shares_the_node(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(96)))
    for local_world, want in [(None, 12), (8, 12), (16, 6), (128, 1)]:
        monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
        if local_world:
            monkeypatch.setenv('LOCAL_WORLD_SIZE', str(local_world))
        assert common.default_workers() == want


def test_log_off_a_terminal_is_plain_lines(tmp_path):
    """200 steps written to a file (as a cluster job's log): a few plain lines, no progress bar."""
    flags = ARGS + ['--batch-size', '4', '--synthetic-size', '16', '--epochs', '50', '--log-every', '50']
    r = run('simmim.py', *flags, '--output-dir', tmp_path)
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    assert '\r' not in text and len(text.splitlines()) <= 12 and text.count('| step ') == 4, text
