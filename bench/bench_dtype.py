"""
fp32 against bf16 autocast on this machine, side by side in one process: a training step of train.py's default
model, the embedder's rate, and (given two databases of one text) how many stored neighbours bf16 keeps.

    python bench/bench_dtype.py                                         # training step and embedder
    python bench/bench_dtype.py --db32 data/text_fp32 --db16 data/text  # + neighbours kept (recall@2)

Training: one step = forward + loss + backward + AdamW on a batch of 8 x 512 random tokens with K = 2 random
neighbours (train.py's defaults, vocabulary 4,096), --steps timed steps after one warm-up, the two formats
alternating for --rounds rounds; tokens/s from the median step. Embedder: MiniLM on --chunks chunks of text.txt
(64 tokens of the GPT-style tokenizer of the database, or of a BPE trained here), in batches of 64, same rounds.
"""

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import build_db  # noqa: E402
from retro import RETRO, RetroConfig  # noqa: E402
from train import TrainConfig  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)


def train_step_seconds(model, optimizer, batch, dtype, backward_in_autocast: bool = False) -> float:
    t = time.perf_counter()
    with build_db.autocast("cpu", dtype):
        loss = model(*batch)[1]
        if backward_in_autocast:            # as train.py does: the backward pass's products under autocast too
            loss.backward()
    if not backward_in_autocast:
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def recall(db32: str, db16: str) -> dict:
    """Share of each chunk's stored neighbours (as sets) that the bf16 database keeps, per split."""
    out = {}
    for split in ("train", "val"):
        a, b = (np.load(Path(d) / f"{split}_neighbour_ids.npy") for d in (db32, db16))
        out[split] = float(np.mean([len(np.intersect1d(x, y)) / len(x) for x, y in zip(a, b)]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunks", type=int, default=512)
    p.add_argument("--db32", default="")
    p.add_argument("--db16", default="")
    args = p.parse_args(argv)
    print(f"CPU: AMX {torch.cpu._is_amx_tile_supported()}, AVX-512 bf16 {torch.cpu._is_avx512_bf16_supported()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; auto picks "
          f"{build_db.resolve_dtype('auto', 'cpu')[1]}")
    cfg, g = TrainConfig(), torch.Generator().manual_seed(0)
    mc = RetroConfig(**{k: v for k, v in asdict(cfg).items() if k in RetroConfig.__dataclass_fields__})
    B, T, M, K = cfg.batch_size, cfg.block_size, cfg.chunk_len, cfg.n_neighbours
    shapes = ((B, T), (B, T // M, K, 2 * M), (B, T))                       # tokens, neighbours, targets
    batch = tuple(torch.randint(1, mc.vocab_size, shape, generator=g) for shape in shapes)
    torch.manual_seed(0)
    model = RETRO(mc)
    optimizer = model.configure_optimizers(cfg.weight_decay, 1e-4)
    variants = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
                "bf16, backward under autocast": (torch.bfloat16, True)}
    times = {v: [] for v in variants}
    for d, inside in variants.values():
        train_step_seconds(model, optimizer, batch, d, inside)          # warm-up
    for _ in range(args.rounds):
        for v, (d, inside) in variants.items():
            times[v] += [train_step_seconds(model, optimizer, batch, d, inside) for _ in range(args.steps)]
    rate = {v: B * T / statistics.median(t) for v, t in times.items()}
    print("training step: " + ", ".join(f"{v} {r:,.0f} tokens/s ({r / rate['fp32']:.2f}x)" for v, r in rate.items()))

    docs = build_db.read_documents(str(build_db.DEFAULT_TEXT))
    tok = build_db.train_tokenizer(docs[:10], 4096)
    texts = tok.decode_batch(build_db.token_stream(tok, docs[:10], M).reshape(-1, M)[:args.chunks].tolist())
    embedders = {d: build_db.Embedder(build_db.DEFAULT_BERT, "mean", "cpu", str(d)[6:]) for d in DTYPES}
    etimes = {d: [] for d in DTYPES}
    for _ in range(args.rounds):
        for d, e in embedders.items():
            t = time.perf_counter()
            for i in range(0, len(texts), 64):
                e(texts[i:i + 64])
            etimes[d].append(time.perf_counter() - t)
    erate = {d: len(texts) / statistics.median(t) for d, t in etimes.items()}
    print(f"embedder: fp32 {erate[torch.float32]:.0f} chunks/s, bf16 {erate[torch.bfloat16]:.0f} chunks/s: "
          f"{erate[torch.bfloat16] / erate[torch.float32]:.2f}x")
    if args.db32 and args.db16:
        r = recall(args.db32, args.db16)
        print(f"stored neighbours kept by the bf16 database (recall@K): training {r['train']:.4f}, "
              f"validation {r['val']:.4f}")


if __name__ == "__main__":
    main()
