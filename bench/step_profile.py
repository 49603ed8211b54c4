"""
Where the time of a training step goes, fp32 against bf16 autocast, in train.py's own loop: its batches (fresh every
step, from the database), its model, loss, gradient clipping and AdamW, each phase timed on its own.

    python bench/step_profile.py --db data/text+web                # train.py's default model and batches
    python bench/step_profile.py --db data/text+web --fixed         # + one fixed random batch, as bench_dtype.py
    python bench/step_profile.py --db data/text+web --dtypes float32  # one format alone, no alternation

Each format trains its own copy of the model (the same initial weights) for --steps steps after --warmup, the
formats alternating step by step so that both see the same machine; medians per phase. With --fixed, two more
variants train on one random batch (uniform token ids, no padding), which is what bench_dtype.py times.
On a CPU with AMX an fp32 step right after a bf16 one runs ~17% slower than fp32 alone (bench/RESULTS.md): for
the ratio of the two formats, time each alone (--dtypes float32, then --dtypes bfloat16), one after the other.
"""

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import build_db  # noqa: E402
import train  # noqa: E402

PHASES = ("batch", "forward", "backward", "clip", "optimizer")


def step(model, optimizer, batch, ctx, clip: float) -> dict:
    """One step of train.py's loop (one micro-step), each phase timed."""
    t, times = time.perf_counter(), {}

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        times[name], t = now - t, now
    x, y, nb = batch()
    lap("batch")
    with ctx:
        loss = model(x, nb, y)[1]
        lap("forward")
        loss.backward()
    lap("backward")
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    lap("clip")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("optimizer")
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="data/text+web")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fixed", action="store_true", help="also time one fixed random batch")
    p.add_argument("--dtypes", default="float32,bfloat16", help="the formats, alternating step by step")
    p.add_argument("--flush_denormal", action="store_true", help="torch.set_flush_denormal(True) first")
    p.add_argument("--ops", type=int, default=0, help="then profile one step of each format: its N costliest ops")
    args = p.parse_args(argv)
    torch.set_flush_denormal(args.flush_denormal)
    cfg = train.TrainConfig()
    db = build_db.open_db(args.db)
    data = train.Data(db, cfg)
    g = torch.Generator().manual_seed(0)
    B, T, M, K, V = cfg.batch_size, cfg.block_size, cfg.chunk_len, cfg.n_neighbours, db.meta["vocab_size"]
    fixed = tuple(torch.randint(1, V, s, generator=g) for s in ((B, T), (B, T), (B, T // M, K, 2 * M)))
    variants = {}
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        for kind in ("real", "fixed") if args.fixed else ("real",):
            model, optimizer, _ = train.build_model(cfg, db, "cpu")
            steps = itertools.count(1)              # each format reads the same batches, as train.py's steps 1, 2, ...
            batch = (lambda c=steps: data.batch("train", next(c), 0, 0)) if kind == "real" else (lambda: fixed)
            variants[f"{str(dtype)[6:]} {kind}"] = (model, optimizer, batch, build_db.autocast("cpu", dtype))
    times = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for v, (model, optimizer, batch, ctx) in variants.items():
            t = step(model, optimizer, batch, ctx, cfg.grad_clip)
            if i >= args.warmup:
                times[v].append(t)
    print(f"{torch.get_num_threads()} threads, AMX {torch.cpu._is_amx_tile_supported()}; {B} x {T} tokens, K={K}; "
          f"median seconds of {args.steps} steps")
    print(f"{'':14s}" + "".join(f"{ph:>10s}" for ph in PHASES) + f"{'step':>10s}{'tokens/s':>10s}")
    for v, ts in times.items():
        med = {ph: statistics.median(t[ph] for t in ts) for ph in PHASES}
        total = statistics.median(sum(t.values()) for t in ts)
        print(f"{v:14s}" + "".join(f"{med[ph]:10.3f}" for ph in PHASES) + f"{total:10.3f}{B * T / total:10,.0f}")
    for v, (model, optimizer, batch, ctx) in variants.items() if args.ops else ():
        with torch.profiler.profile() as prof:
            step(model, optimizer, batch, ctx, cfg.grad_clip)
        print(f"\n{v}: the {args.ops} ops with the most time of their own in one step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops, max_name_column_width=40))


if __name__ == "__main__":
    main()
