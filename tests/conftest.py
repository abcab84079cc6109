import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get('PYTEST_XDIST_WORKER'):  # one thread per test process: `-n 2` on two cores, not four threads
    import torch
    torch.set_num_threads(1)
