"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2``:
trains two small models data-parallel (gloo, CPU) and saves each rank's final
state, so the test can compare ranks and a single-process run."""
import os
import sys
from pathlib import Path

import torch

from advtrain.distributed import init_distributed, rank, shutdown_distributed
from advtrain.training import ATTATrainer, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import bn_model, dataset, plain_model, settings  # noqa: E402


def main(out: Path) -> None:
    assert init_distributed("gloo"), "expected WORLD_SIZE=2 from torchrun"
    r = rank()
    # Equivalence with one process: no BatchNorm, deterministic ATTA (sharded stores, zero
    # init: each rank's random draws differ from one process's).
    trainer = ATTATrainer(plain_model(), batch_size=8, init="zero", run_dir=out / "atta", **settings())
    trainer.fit(dataset())
    print(f"rank {r}: atta trained", flush=True)
    torch.save({"model": trainer.model.state_dict(), "store": trainer.policy.store.data}, out / f"atta{r}.pt")
    # BatchNorm statistics, also the weight average's, must end identical on both ranks.
    trainer = Trainer(bn_model(), batch_size=8, weight_average=0.9, **settings())
    trainer.fit(dataset())
    torch.save({"model": trainer.model.state_dict(), "average": trainer.weight_average.module.state_dict()},
               out / f"bn{r}.pt")
    print(f"rank {r}: bn trained", flush=True)
    shutdown_distributed()
    print(f"rank {r}: shut down", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # results are saved: skip interpreter teardown of gloo's threads
