"""A minimal deterministic training run for crash tests: python crash_driver.py STORE STEPS.

Step s always trains on the same batch (derived from s), so a resumed run must end where an uninterrupted
one does."""
import sys

import torch

from offload_bitnet import AdamWConfig, open_for_training


def batch_for_step(step: int):
    generator = torch.Generator().manual_seed(1000 + step)
    return [(torch.randint(0, 256, (2, 24), generator=generator), None) for _ in range(2)]


def main(store_path: str, steps: int):
    torch.set_num_threads(1)
    engine = open_for_training(store_path, dropout=0.1, seed=7, optim=AdamWConfig(lr=3e-3, weight_decay=0.01),
                               activation_budget_bytes=16 << 10)
    try:
        while engine.step < steps:
            engine.train_step(batch_for_step(engine.step + 1), commit_extra={"driver": engine.step + 1})
    finally:
        engine.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
