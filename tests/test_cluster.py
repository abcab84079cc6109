"""Under torchrun (CPU, gloo, 2 processes, a DataLoader worker each), as a cluster runs jobs: the
preemption signals that SLURM and torchrun send, and a non-finite loss on one rank only. Every
process exits, with the documented code, and the checkpoint on disk is the newest good one."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import common
from utils import ROOT, TINY, free_port, run

ARGS = TINY + ['--mask-patch-size', '8', '--num-workers', '1', '--log-every', '2']  # 32 images: 2 steps per epoch
SIGNALS = 'SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1'  # the README's launch line


def torchrun(out, *args, script='simmim.py', env=()):
    """torchrun as the README launches it, in a process group of its own, output to files in `out`."""
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(free_port()), '--signals-to-handle', SIGNALS, script, *map(str, args), '--output-dir', out]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **dict(env)),
                            stdout=open(f'{out}/stdout', 'w'), stderr=open(f'{out}/stderr', 'w'), start_new_session=True)


def output(out):
    return open(f'{out}/stdout').read() + open(f'{out}/stderr').read()


def group_members(pgid):
    """Live processes (zombies aside) of a process group: torchrun, the ranks, their DataLoader workers."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            state, _, group = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != 'Z':
            pids.append(int(pid))
    return pids


def logged_steps(out):
    path = f'{out}/log.jsonl'
    return [json.loads(line)['step'] for line in open(path) if '"step"' in line] if os.path.exists(path) else []


@pytest.mark.parametrize('how', ['SIGTERM to torchrun', 'SIGUSR1 to torchrun', 'SIGTERM to the process group'])
def test_preemption_saves_exits_and_resumes(tmp_path, how):
    out = str(tmp_path)
    proc = torchrun(out, *ARGS, '--epochs', '1000')
    t = time.time()
    while len(logged_steps(out)) < 2:  # step 4: the DataLoader workers run, the first epochs are behind
        assert proc.poll() is None and time.time() - t < 300, output(out)
        time.sleep(0.05)
    signalled, t = logged_steps(out)[-1], time.time()
    sig = signal.SIGUSR1 if 'USR1' in how else signal.SIGTERM
    os.killpg(proc.pid, sig) if 'group' in how else proc.send_signal(sig)
    proc.wait(timeout=120)
    took = time.time() - t
    while group_members(proc.pid) and time.time() - t < 30:  # orphaned DataLoader workers notice within seconds
        time.sleep(0.2)
    assert not group_members(proc.pid), output(out)
    text = output(out)
    assert 'stopped by signal' in text and 'common.py", line' not in text, text  # no rank's traceback
    assert 'exitcode' not in text, text  # no rank failed: each saved and exited 0 (torchrun itself exits 1, see README)
    assert took < 30, text  # well inside torchrun's 30 s before it kills
    ckpt = common.read_checkpoint(f'{out}/checkpoint.pth')
    assert ckpt['step'] >= signalled and os.path.getmtime(f'{out}/checkpoint.pth') >= t  # newer than the signal
    # --resume continues from there (fewer epochs: a short run; the changed flag is named)
    epochs = ckpt['step'] // 2 + 2
    r = run('simmim.py', *ARGS, '--epochs', epochs, '--output-dir', out, '--resume', nproc=2)
    assert r.returncode == 0 and 'changed flags: --epochs 1000 -> ' in r.stderr, r.stderr[-3000:]
    assert common.read_checkpoint(f'{out}/checkpoint.pth')['step'] == 2 * epochs
    assert logged_steps(out) == list(range(2, 2 * epochs + 1, 2))


@pytest.mark.parametrize('skip', [False, True])
def test_nan_on_one_rank_all_agree(tmp_path, skip):
    """Rank 1's loss turns NaN at step 5 (checkpoints every epoch of 2 steps): both ranks stop at the
    next check with exit code 3 and the step-4 checkpoint stays; with --skip-nonfinite both skip."""
    out = str(tmp_path)
    proc = torchrun(out, *ARGS, '--epochs', '4', '--save-every', '1', '--log-every', '4', *(['--skip-nonfinite'] if skip else []),
                    script='tests/rank1_nan.py', env={'NAN_AFTER': '5'})
    proc.wait(timeout=300)
    text = output(out)
    ckpt = common.read_checkpoint(f'{out}/checkpoint.pth')
    assert all(v.isfinite().all() for v in ckpt['model'].values())
    if skip:
        assert proc.returncode == 0 and ckpt['step'] == 8, text
        assert [line for line in text.splitlines() if 'update skipped' in line] == [
            f"step {s}: non-finite gradients, update skipped" for s in (5, 6, 7)]
    else:
        assert proc.returncode == 1 and ckpt['step'] == 4, text  # torchrun: 1 when a rank failed
        assert text.count('exitcode  : 3 ') == 2 and 'exitcode  : -' not in text, text  # both ranks exit 3, none killed
        assert text.count('error: loss became non-finite at step 5; ') == 1 and 'keeps the last good state' in text
