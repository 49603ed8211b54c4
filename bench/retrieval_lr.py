"""
An experiment that did not work: a larger learning rate for the retrieval parameters (the neighbour encoder and
the CCA layers), to make the quick start's model read its neighbours in every seed (README, "Does retrieval
help?", the seeds).

    RETRIEVAL_LR_MULT=3 python bench/retrieval_lr.py --retrieval_texts none --dtype float32 --seed 2 --out_dir out/lr3_seed2

The idea: in the seeds that do not read their neighbours, the norm of CCA's output map grows half as much as in
the seed that does (README), as if CCA learnt too slowly to matter before the decoder had learnt without it.
Adam's step is proportional to the learning rate, so the retrieval parameters get RETRIEVAL_LR_MULT times the
schedule's rate; everything else is train.py as it is, so its probe says whether the model reads them.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retro  # noqa: E402
import train  # noqa: E402

MULT = float(os.environ.get("RETRIEVAL_LR_MULT", "3"))


class ScaledLR(dict):
    """A parameter group whose lr, whenever train.py sets it from the schedule, is scaled by its "mult"."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value * self.get("mult", 1.0) if key == "lr" else value)


def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cpu"):
    retrieval = {id(p) for n, p in self.named_parameters()
                 if n.startswith("encoder.") or ".cca." in n or ".ln_cca." in n}
    groups = []
    for decay in (True, False):
        for is_retrieval in (True, False):
            params = [p for p in self.parameters() if p.requires_grad and (p.dim() >= 2) == decay
                      and (id(p) in retrieval) == is_retrieval]
            groups.append(ScaledLR(params=params, weight_decay=weight_decay if decay else 0.0,
                                   mult=MULT if is_retrieval else 1.0))
    print(f"retrieval parameters at {MULT}x the learning rate: "
          f"{sum(p.numel() for g in groups if g['mult'] != 1 for p in g['params']):,}")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


if __name__ == "__main__":
    retro.RETRO.configure_optimizers = configure_optimizers
    train.main()
