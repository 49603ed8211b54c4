"""
Held-out bits per byte of a trained model, split by how much of each chunk its neighbours hold (the paper's
section 2.6: the longest run of tokens of the chunk that also occurs in one of the neighbours it reads, as a
share of the chunk). With RETRO[ON] and RETRO[OFF] side by side, it shows where retrieval's gain comes from:
text the database nearly holds, or text it does not.

    python bench/overlap_split.py --out_dir out/exp/retro_web --db data/kjv_web

Every held-out sequence of the database (the evaluation of train.py --eval_only); the positions that read chunk
u's neighbours (from the last token of chunk u on) predict the tokens of chunk u+1, which are the ones
measured against those neighbours. The first M-1 positions of a sequence read nothing and are left out.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_db import load_meta, longest_shared_run, open_db  # noqa: E402
from retro import RETRO, RetroConfig  # noqa: E402
from train import Data, TrainConfig, load_checkpoint  # noqa: E402

BUCKETS = [(0.0, 0.125), (0.125, 0.25), (0.25, 0.5), (0.5, 1.01)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--json", default="", help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    ckpt_path, db = Path(args.out_dir) / "ckpt.pt", Path(args.db)
    meta = load_meta(db)
    ckpt = load_checkpoint(ckpt_path, meta, db, load_checkpoint(ckpt_path))
    tc = ckpt["train_config"]
    cfg = TrainConfig(**{k: tc[k] for k in ("block_size", "chunk_len", "n_neighbours", "batch_size")})
    data = Data(open_db(db), cfg)
    model = RETRO(RetroConfig(**ckpt["model_config"])).eval()
    model.load_state_dict(ckpt["model"])
    M, pad = cfg.chunk_len, meta["pad_id"]
    sums = {b: dict(on=0.0, off=0.0, bytes=0, tokens=0) for b in BUCKETS}
    with torch.no_grad():
        for starts in data.eval_batches():
            x, y, nb = data.sequences("val", starts)
            nll = {mode: F.cross_entropy(model(x, n)[0].flatten(0, 1), y.flatten(), ignore_index=-1,
                                         reduction="none").view(y.shape) for mode, n in (("on", nb), ("off", None))}
            nbytes = data.token_bytes[y.clamp(min=0)] * (y >= 0)
            L = x.size(1) // M
            for i in range(x.size(0)):
                # row u: the targets of the positions that read chunk u's neighbours (-2: none, matches nothing)
                targets = F.pad(y[i, M - 1:], (0, M - 1), value=-2).view(L, M).numpy()    # (L, M)
                runs = longest_shared_run(np.where(targets < 0, -2, targets), nb[i].numpy(), pad)   # (L,)
                for u in range(L):
                    pos = slice(u * M + M - 1, min((u + 1) * M + M - 1, x.size(1)))
                    n_valid = int((targets[u] >= 0).sum())
                    if n_valid == 0:
                        continue
                    b = next(b for b in BUCKETS if b[0] <= runs[u] / n_valid < b[1])
                    for mode in ("on", "off"):
                        sums[b][mode] += nll[mode][i, pos].sum().item()
                    sums[b]["bytes"] += nbytes[i, pos].sum().item()
                    sums[b]["tokens"] += n_valid
    total = sum(s["tokens"] for s in sums.values())
    print(f"{ckpt_path} with {db}: held-out bpb by the longest run of a chunk's tokens found in its neighbours")
    print("| longest run / chunk | held-out tokens | bpb RETRO[ON] | bpb RETRO[OFF] | ON vs OFF |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for (lo, hi), s in sums.items():
        if not s["tokens"]:
            continue
        on, off = (s[m] / math.log(2) / s["bytes"] for m in ("on", "off"))
        rows.append(dict(bucket=[lo, min(hi, 1.0)], share=s["tokens"] / total, bpb_on=on, bpb_off=off))
        print(f"| {lo:.0%}-{min(hi, 1.0):.0%} | {s['tokens'] / total:.1%} | {on:.4f} | {off:.4f} | {on / off - 1:+.1%} |")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(dict(out_dir=args.out_dir, db=args.db, rows=rows)) + "\n")
    return rows


if __name__ == "__main__":
    main()
