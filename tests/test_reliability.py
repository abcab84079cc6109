"""Runs survive kills, preemption, bad data and bad input without losing work (as subprocesses)."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
from utils import ROOT, TINY, run

ARGS = TINY + ['--mask-patch-size', '8']


def start(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, 'simmim.py', *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, timeout=120):
    t = time.time()
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.05)


def steps_logged(out):
    path = os.path.join(out, 'log.jsonl')
    return sum(1 for line in open(path) if '"step"' in line) if os.path.exists(path) else 0


def params(path):
    return common.read_checkpoint(path)['model']


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    flags = ARGS + ['--epochs', '6', '--save-every', '1', '--synthetic-size', '64', '--blr', '1e-3']
    assert run('simmim.py', *flags, '--output-dir', tmp_path / 'a').returncode == 0
    out = str(tmp_path / 'b')
    proc = start(*flags, '--output-dir', out)
    wait_for(lambda: os.path.exists(f'{out}/checkpoint.pth'), proc)  # the first epoch's checkpoint is there
    proc.kill()
    proc.wait()
    assert common.read_checkpoint(f'{out}/checkpoint.pth')['step'] < 48  # killed before the end
    open(f'{out}/checkpoint.pth.tmp999999', 'wb').write(b'PK half a checkpoint')  # as a kill during a save leaves
    r = run('simmim.py', *flags, '--output-dir', out, '--resume')
    assert r.returncode == 0, r.stderr
    a, b = params(tmp_path / 'a' / 'checkpoint.pth'), params(f'{out}/checkpoint.pth')
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [f for f in os.listdir(out) if '.tmp' in f]
    steps = [json.loads(line)['step'] for line in open(f'{out}/log.jsonl') if '"step"' in line]
    assert steps == list(range(1, 49))  # the rows after the checkpoint, written before the kill, are not repeated


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pth')
    common.save_checkpoint({'step': 1, 'w': torch.ones(3)}, path)

    def torn_save(obj, f):  # writes part of the file, then dies as a killed process would
        f.write(b'PK\x03\x04 half a zip file')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', torn_save)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint({'step': 2, 'w': torch.zeros(3)}, path)
    ckpt = common.read_checkpoint(path)
    assert ckpt['step'] == 1 and torch.equal(ckpt['w'], torch.ones(3))


def test_sigterm_saves_checkpoint_and_exits_zero(tmp_path):
    out = str(tmp_path)
    proc = start(*ARGS, '--epochs', '500', '--output-dir', out)
    wait_for(lambda: steps_logged(out) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert 'stopped by signal' in stderr and '--resume' in stderr
    step = common.read_checkpoint(f'{out}/checkpoint.pth')['step']
    assert 3 <= step < 2000


@pytest.fixture
def bad_folder(tmp_path):
    root = tmp_path / 'data'
    rng = np.random.default_rng(0)
    for c in ['cat', 'dog']:
        os.makedirs(root / c)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f'{i}.jpg')
    data = open(root / 'cat' / '0.jpg', 'rb').read()
    open(root / 'cat' / '0.jpg', 'wb').write(data[:len(data) // 2])  # truncated JPEG
    open(root / 'dog' / 'empty.png', 'wb').close()  # zero-byte PNG
    (root / 'dog' / 'readme.txt').write_text('not an image')
    os.makedirs(root / 'empty_class')
    return root


def test_bad_data_is_skipped_with_warnings(bad_folder, tmp_path):
    r = run('simmim.py', *ARGS, '--data', bad_folder, '--output-dir', tmp_path / 'o', '--batch-size', '13')  # every file once
    assert r.returncode == 0, r.stderr
    assert r.stderr.count('1 non-image files and 1 empty class folders') == 1
    assert r.stderr.count('warning: unreadable image') == 2  # the truncated JPEG and the empty PNG, once each


def test_nan_stops_and_keeps_previous_checkpoint(tmp_path):
    r = run('simmim.py', *ARGS, '--output-dir', tmp_path / 'fresh', '--lr', '1e30', '--epochs', '2')
    assert r.returncode == 3 and 'no checkpoint was written' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert run('simmim.py', *ARGS, '--output-dir', tmp_path).returncode == 0
    before = params(tmp_path / 'checkpoint.pth')
    r = run('simmim.py', *ARGS, '--output-dir', tmp_path, '--resume', '--epochs', '3', '--lr', '1e30')
    assert r.returncode == 3 and 'keeps the last good state' in r.stderr and 'Traceback' not in r.stderr
    after = params(tmp_path / 'checkpoint.pth')
    assert all(torch.equal(before[k], after[k]) for k in before)
    # skipping non-finite steps never saves non-finite weights either: here the huge lr makes them so
    r = run('simmim.py', *ARGS, '--output-dir', tmp_path, '--resume', '--epochs', '2', '--lr', '1e30', '--skip-nonfinite')
    assert 'update skipped' in r.stdout and r.returncode in (0, 3) and 'Traceback' not in r.stderr
    assert all(v.isfinite().all() for v in params(tmp_path / 'checkpoint.pth').values())


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    os.makedirs(tmp_path / 'c')
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(tmp_path / 'c' / 'gray16.png')  # 46% gray
    img = common.ImageFolder(str(tmp_path), None).load(0)
    assert img.convert('RGB').getpixel((0, 0)) == (117, 117, 117)  # 30000 / 256, not clipped to 255


@pytest.fixture(scope='module')
def bad_input_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('bad_input')
    (tmp / 'text').mkdir()
    (tmp / 'text' / 'checkpoint.pth').write_text('hello')
    assert run('simmim.py', *ARGS, '--output-dir', tmp / 'other', '--model', 'vit_tiny').returncode == 0
    assert run('simmim.py', *ARGS, '--output-dir', tmp / 'base').returncode == 0  # 4 steps
    (tmp / 'empty' / 'cls').mkdir(parents=True)
    (tmp / 'file').write_text('not a directory')
    return tmp


def read_only(path):
    """Make `path` a directory nobody may write to: chmod, or for root (whom chmod does not stop) a
    read-only bind mount. Returns the command that undoes it."""
    os.makedirs(path)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return ['chmod', '755', path]
    if subprocess.run(['mount', '--bind', '-o', 'ro', path, path], capture_output=True).returncode:
        pytest.skip('running as root without the right to mount: cannot make a read-only directory')
    return ['umount', path]


def disk_full():
    # files this process writes stop at 1 MB: the kernel fails the write (EFBIG) as a full disk would (ENOSPC)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))


# every bad input: exit code, one line on stderr that says what to do, no traceback, nothing lost
@pytest.mark.parametrize('script, flags, code, words', [
    ('simmim.py', ['--log-every', '0'], 2, '--log-every 0: must be at least 1'),
    ('simmim.py', ['--accum-iter', '0'], 2, '--accum-iter 0: must be at least 1'),
    ('simmim.py', ['--patch-size', '0'], 2, '--patch-size 0: must be at least 1'),
    ('simmim.py', ['--img-size', '0'], 2, '--img-size 0: must be at least 1'),
    ('simmim.py', ['--img-size', '30'], 2, 'image size 30 is not divisible by patch size 4'),
    ('simmim.py', ['--save-every', '0'], 2, '--save-every 0: must be at least 1'),
    ('simmim.py', ['--num-workers', '-1'], 2, '--num-workers -1: must be 0'),
    ('simmim.py', ['--blr', 'nan'], 2, '--blr nan: must be a positive number'),
    ('simmim.py', ['--blr', 'abc'], 2, "argument --blr: invalid float value: 'abc'"),
    ('simmim.py', ['--epochs', '0'], 2, '--epochs 0: must be at least 1'),
    ('simmim.py', ['--epochs', '-1'], 2, '--epochs -1: must be at least 1'),
    ('simmim.py', ['--warmup-epochs', '-1'], 2, '--warmup-epochs -1.0: must be a number >= 0'),
    ('simmim.py', ['--batch-size', '0'], 2, '--batch-size 0: must be at least 1'),
    ('simmim.py', ['--mask-ratio', '1.5'], 2, '--mask-ratio 1.5: must be in (0, 1)'),
    ('deepmim.py', ['--mask-ratio', '1.5'], 2, '--mask-ratio 1.5: must be in (0, 1)'),
    ('deepmim.py', ['--mask-ratio', '-0.5'], 2, '--mask-ratio -0.5: must be in (0, 1)'),
    ('simmim.py', ['--data', 'TMP/empty'], 2, 'no images'),
    ('simmim.py', ['--synthetic-size', '4'], 2, 'no full step'),
    ('simmim.py', ['--output-dir', 'TMP/file'], 2, 'cannot write there (a file)'),
    ('simmim.py', ['--output-dir', 'TMP/file/sub'], 2, 'cannot write there (Not a directory)'),
    ('simmim.py', ['--output-dir', 'READONLY'], 2, 'cannot write there'),
    ('simmim.py', ['--output-dir', 'FULL'], 2, 'checkpoint.pth (File too large): it is left as it was'),
    ('simmim.py', ['--output-dir', 'TMP/text', '--resume'], 2, 'not a checkpoint'),
    ('simmim.py', ['--output-dir', 'TMP/other', '--resume'], 2, 'another model'),
    ('simmim.py', ['--output-dir', 'TMP/other'], 2, 'pass --resume'),
    ('simmim.py', ['--output-dir', 'NEW', '--resume'], 0, 'no checkpoint in'),  # a job script's first launch
    ('simmim.py', ['--output-dir', 'COPY', '--resume', '--epochs', '2'], 0, 'with changed flags: --epochs 1 -> 2'),
])
def test_bad_input_table(bad_input_dirs, tmp_path, script, flags, code, words):
    tmp, undo, limit, full = bad_input_dirs, None, None, 'FULL' in flags
    out = {'NEW': tmp_path / 'new', 'COPY': tmp_path / 'copy', 'READONLY': tmp_path / 'ro', 'FULL': tmp_path / 'full'}
    if 'COPY' in flags:
        shutil.copytree(tmp / 'base', out['COPY'])
    if 'READONLY' in flags:
        undo = read_only(str(out['READONLY']))
    if 'FULL' in flags:
        limit = disk_full
    flags = [str(out.get(f, f)).replace('TMP', str(tmp)) for f in flags]
    if '--output-dir' not in flags:
        flags += ['--output-dir', str(tmp_path / 'fresh')]
    args = ARGS if script == 'simmim.py' else ['--data', 'synthetic', '--device', 'cpu']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    try:
        r = subprocess.run([sys.executable, script, *map(str, args), *flags], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300, preexec_fn=limit)
    finally:
        if undo:
            subprocess.run(undo)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and words in lines[0] and 'Traceback' not in r.stderr, r.stderr
    if full:  # nothing half-written is left behind
        assert not [f for f in os.listdir(out['FULL']) if 'checkpoint' in f]


def test_uneven_dataset_under_ddp_does_not_hang(tmp_path):
    r = run('simmim.py', *ARGS, '--synthetic-size', '37', '--output-dir', tmp_path, nproc=2, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert common.read_checkpoint(str(tmp_path / 'checkpoint.pth'))['step'] == 2  # 18 per rank -> 2 batches of 8
