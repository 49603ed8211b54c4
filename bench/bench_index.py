"""
The database's index and neighbour search at a size this corpus does not reach: N synthetic chunk embeddings
through build_db.py's own code path (build_index: IVF k-means training, adding, nprobe tuning; search with the
leak rule), timing each step and its peak RSS, and the recall of the stored neighbours against exact search.

The synthetic embeddings are unit vectors of a 20-dimensional Gaussian projected to 384 dimensions: on
data/kjv_web's 36,846 real chunks forced onto IVF, build_index needs nprobe 128 of 767 cells (recall@19
0.974) and the median nearest-neighbour distance is 0.436; on 36,846 synthetic ones, nprobe 128 (0.983) and
0.440 (`--calibrate` prints both). Copies of real embeddings plus noise are too easy: their nearest
neighbours are each other, and nprobe 1 finds 98.6% of them.

    python bench/bench_index.py --n 1000000        # about 8 minutes on 2 cores; --search 0: every chunk
    python bench/bench_index.py --calibrate        # real against synthetic, at the real database's size
"""

import argparse
import functools
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import build_db  # noqa: E402


def peak_rss_gib(reset: bool = False) -> float:
    """Peak resident memory since the last reset (Linux: /proc/self/clear_refs), GiB."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 2 ** 20


def synthetic(n: int, dim: int, intrinsic: int, rng) -> np.ndarray:
    """n unit vectors of dim dimensions, from a Gaussian of `intrinsic` dimensions (the same projection always)."""
    projection = np.random.default_rng(12345).normal(size=(intrinsic, dim)).astype(np.float32)
    x = rng.normal(size=(n, intrinsic)).astype(np.float32) @ projection
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="chunks")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension (all-MiniLM-L6-v2: 384)")
    p.add_argument("--intrinsic", type=int, default=20, help="dimension of the Gaussian the vectors come from")
    p.add_argument("--calibrate", action="store_true", help="compare with --db's real embeddings, and stop")
    p.add_argument("--db", default="data/kjv_web")
    p.add_argument("--search", type=int, default=32768, help="chunks whose neighbours are searched (0: all)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--chunk_len", type=int, default=64)
    args = p.parse_args()
    steps = {}

    def step(name, t, rss):
        steps[name] = (time.perf_counter() - t, rss)
        print(f"{name}: {steps[name][0]:.1f} s, peak RSS {rss:.2f} GiB", flush=True)

    rng = np.random.default_rng(0)
    if args.calibrate:
        try:
            meta = build_db.load_meta(args.db)
        except build_db.DBError as e:
            sys.exit(f"bench_index.py: {e} (--db: a database folder, e.g. data/text)")
        real = build_db.load_streams(args.db, meta, "emb")[np.arange(meta["n_chunks"])].astype(np.float32)
        for name, e in (("real", real), ("synthetic", synthetic(len(real), real.shape[1], args.intrinsic, rng))):
            queries = e[np.sort(rng.choice(len(e), 1000, replace=False))]
            why = build_db.build_index(e, 1000, queries, 19)[1]
            nn = np.median(build_db.faiss.knn(queries, e, 2)[0][:, 1])
            print(f"{name}, {len(e):,} chunks: {why}; median nearest-neighbour distance {nn:.3f}")
        return
    # synthetic embeddings, float16 on disk like train_emb.npy
    tmp = Path(tempfile.mkdtemp(dir="."))
    emb = np.lib.format.open_memmap(tmp / "emb.npy", mode="w+", dtype=np.float16, shape=(args.n, args.dim))
    t = time.perf_counter()
    for i in range(0, args.n, 65536):
        x = synthetic(min(65536, args.n - i), args.dim, args.intrinsic, np.random.default_rng([0, i]))
        emb[i:i + len(x)] = x
    emb.flush()
    emb = np.load(tmp / "emb.npy", mmap_mode="r")
    print(f"{args.n:,} synthetic embeddings ({emb.nbytes / 2 ** 30:.2f} GiB float16) in "
          f"{time.perf_counter() - t:.0f} s")

    # build_index as a build calls it, its inner steps timed by wrapping build_db's own functions
    n_seq = args.seq_len // args.chunk_len
    m = args.k + 2 * n_seq + 1
    queries = np.asarray(emb[np.sort(rng.choice(args.n, 1000, replace=False))], dtype=np.float32)
    timed = {}
    for name in ("add", "tune_nprobe"):
        real = getattr(build_db, name)

        @functools.wraps(real)
        def wrapper(*a, _real=real, _name=name, **kw):
            t0 = time.perf_counter()
            out = _real(*a, **kw)
            timed[_name] = time.perf_counter() - t0, peak_rss_gib()
            return out
        setattr(build_db, name, wrapper)
    peak_rss_gib(reset=True)
    t = time.perf_counter()
    index, why = build_db.build_index(emb, 0, queries, m)           # IVF at any --n, as a build above 100,000
    total = time.perf_counter() - t
    steps["train (k-means)"] = total - timed["add"][0] - timed["tune_nprobe"][0], None
    steps["add"], steps["tune nprobe"] = timed["add"], timed["tune_nprobe"]
    print(f"index: {why}; {total:.1f} s in all (train {steps['train (k-means)'][0]:.1f} s, add "
          f"{timed['add'][0]:.1f} s, tune {timed['tune_nprobe'][0]:.1f} s), peak RSS {peak_rss_gib():.2f} GiB")
    index_bytes = build_db.faiss.serialize_index(index).nbytes

    # the chunks' neighbours, with the leak rule, as a build searches them: the first --search chunks
    searched = min(args.search or args.n, args.n)
    peak_rss_gib(reset=True)
    t = time.perf_counter()
    ids = build_db.search(index, emb, m, "search", lambda found, rows: build_db.exclude_own_sequences(
        found, args.k, n_seq, args.n, None, rows), range(searched))
    step(f"search {searched:,} chunks", t, peak_rss_gib())
    print(f"{searched / steps[f'search {searched:,} chunks'][0]:.0f} chunks/s: all {args.n:,} chunks in "
          f"{args.n / searched * steps[f'search {searched:,} chunks'][0] / 60:.1f} min")

    # recall of the stored neighbours against exact search with the same rule, on 1,000 searched chunks
    sample = np.sort(rng.choice(searched, min(1000, searched), replace=False))
    exact = build_db.exact_knn(np.asarray(emb[sample], dtype=np.float32), emb, m)
    truth = build_db.exclude_own_sequences(exact, args.k, n_seq, args.n, None, sample)
    recall = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(ids[sample], truth)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"recall@{args.k} of the stored neighbours against exact search: {recall:.3f}; index "
          f"{index_bytes / 2 ** 30:.2f} GiB in memory; peak RSS of the process {peak:.2f} GiB")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
