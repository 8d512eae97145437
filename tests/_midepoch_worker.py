"""Run by tests/test_midepoch.py under ``torchrun --nproc_per_node=2``: an
ATTA run (sharded per-example store) killed after a mid-epoch checkpoint and
resumed, next to an uninterrupted one; saves each rank's results."""
import os
import sys
from pathlib import Path

import torch

from advtrain.distributed import init_distributed, rank, shutdown_distributed
from advtrain.training import ATTATrainer

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import dataset, plain_model, settings  # noqa: E402


def make(run_dir: Path) -> ATTATrainer:
    return ATTATrainer(plain_model(), batch_size=8, init="zero", run_dir=run_dir, checkpoint_every_steps=3,
                       **settings())


def main(out: Path) -> None:
    assert init_distributed("gloo"), "expected WORLD_SIZE=2 from torchrun"
    r = rank()
    reference = make(out / "reference")
    reference.fit(dataset())
    killed = make(out / "killed")
    train_step = killed.train_step

    def kill_after_step_4(batch):  # the checkpoint of step 3 is batch 3 of epoch 1 (5 batches per epoch)
        if killed.global_step == 4:
            raise KeyboardInterrupt
        return train_step(batch)

    killed.train_step = kill_after_step_4
    try:
        killed.fit(dataset())
    except KeyboardInterrupt:
        pass
    resumed = make(out / "killed")
    resumed.fit(dataset(), resume=True)
    torch.save({"note": killed.checkpoint_note(), "records": [resumed.history.records, reference.history.records],
                "models": [resumed.model.state_dict(), reference.model.state_dict()],
                "stores": [resumed.policy.store.data, reference.policy.store.data]}, out / f"rank{r}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # results are saved: skip interpreter teardown of gloo's threads
