"""simmim.py whose loss turns NaN on rank 1 only, after NAN_AFTER training steps: run under torchrun
by tests/test_cluster.py to check that the ranks agree on the failure."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import simmim  # noqa: E402


class NaNOnRank1(simmim.SimMIM):
    calls = -1  # the first forward is common.train_flops's count, before the first training step

    def forward(self, batch):
        loss, logs = super().forward(batch)
        self.calls += 1
        if os.environ['RANK'] == '1' and self.calls > int(os.environ['NAN_AFTER']):
            loss = loss * float('nan')
        return loss, logs


simmim.SimMIM = NaNOnRank1  # simmim.main builds its model by this name
common.run(simmim.main)
