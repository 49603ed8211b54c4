"""
An experiment that did not work: a null key in chunked cross-attention, to make the quick start's model read its
neighbours in every seed (README, "Does retrieval help?", the seeds).

    python bench/null_key.py --retrieval_texts none --dtype float32 --seed 2 --out_dir out/null_seed2
    # (train.py's flags, trained with the patch)

The idea: CCA starts as a copy head (deviation 8) and copies the token after the neighbour token that matches
its own, but in most chunks of the King James Bible no neighbour token is followed by what comes next, so the
copy is noise. With one more key per chunk, a zero key and a zero value whose score is a learned number per head
(initially 7, between a matching key's ~8 and a non-matching one's ~0 +- 1 at initialisation), a query that
matches nothing can attend to nothing and add nothing, and the copy would only be rewarded where it is right.
The patch wraps each CCA's attention with that key (lucidrains' RETRO has a learned null key and value too);
train.py runs as it is, so its probe ("does it read its neighbours?") says whether the model reads them.
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retro  # noqa: E402
import train  # noqa: E402

NULL_SCORE = 7.0
cca_init = retro.ChunkedCrossAttention.__init__


def cca_with_null_key(self, cfg):
    cca_init(self, cfg)
    self.null = nn.Parameter(torch.full((cfg.n_head,), NULL_SCORE))      # the null key's score, per head
    attend = self.attn.attend

    def attend_with_null(q, k, v, mask=None, is_causal=False):
        Bn, H, S, D = k.shape                                               # (B*n, H, K*R, D)
        k = torch.cat((k, k.new_zeros(Bn, H, 1, D)), 2)                     # (B*n, H, K*R + 1, D)
        v = torch.cat((v, v.new_zeros(Bn, H, 1, D)), 2)
        if mask.dtype == torch.bool:                                        # no position bias: -inf where masked
            mask = torch.where(mask, 0.0, float("-inf")).to(q.dtype)
        mask = mask.expand(Bn, H, q.size(2), S)
        null = self.null.to(q.dtype)[None, :, None, None].expand(Bn, H, q.size(2), 1)
        return attend(q, k, v, torch.cat((mask, null), -1), is_causal)
    self.attn.attend = attend_with_null


retro.ChunkedCrossAttention.__init__ = cca_with_null_key

if __name__ == "__main__":
    train.main(sys.argv[1:])
