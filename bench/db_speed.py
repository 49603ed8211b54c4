"""
Speed of the database, the benchmarks of bench/RESULTS.md's "The database" and "The retrieval server under load":

    python bench/db_speed.py embed                    # build_db.py's embedding rate; int8 and compiled embedders
    python bench/db_speed.py index --n 1000000        # the index and the neighbour search at 1M synthetic chunks
    python bench/db_speed.py server --db data/text    # extras/server.py under concurrent clients

`python bench/db_speed.py COMMAND -h` says what each measures and how.
"""

import argparse
import functools
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_db  # noqa: E402


# ---- embed: the frozen embedder's rate, and cheaper variants -------------------------------------------------------

class Int8Rows(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.w_scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.w = (w / self.w_scale[:, None]).round().to(torch.int8).t().contiguous()
        self.bias = linear.bias.detach().float()

    def forward(self, x):
        rows = x.reshape(-1, x.size(-1)).float()
        scale = rows.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
        y = torch._int_mm((rows / scale).round().to(torch.int8), self.w).float().mul_(self.w_scale).mul_(scale)
        return y.add_(self.bias).view(*x.shape[:-1], -1)


class Int8Tiled(Int8Rows):
    """The same per-token int8 linear, a tile of rows at a time, so the rescaling passes over each int32 product
    (and the GELU after the feed-forward's first layer) run while it is still in cache."""

    def __init__(self, linear, act=None, tile: int = 1024):
        super().__init__(linear)
        self.act, self.tile = act, tile

    def forward(self, x):
        rows = x.reshape(-1, x.size(-1))
        out = torch.empty(len(rows), self.w.size(1))
        for i in range(0, len(rows), self.tile):
            r, o = rows[i:i + self.tile], out[i:i + self.tile]
            scale = torch.maximum(r.amax(1, keepdim=True), r.amin(1, keepdim=True).neg_()).clamp_(min=1e-12) / 127
            torch.mul(torch._int_mm(torch.div(r, scale).round_().to(torch.int8), self.w), self.w_scale, out=o)
            o.mul_(scale).add_(self.bias)
            if self.act is not None:
                torch.ops.aten.gelu_(o)
        return out.view(*x.shape[:-1], -1)


def variant(name: str) -> build_db.Embedder:
    e = build_db.Embedder(build_db.DEFAULT_BERT, "mean", "cpu")
    if name == "int8-dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e.model = torch.ao.quantization.quantize_dynamic(e.model, {torch.nn.Linear}, torch.qint8)
    elif name == "int8-rows":
        for parent in list(e.model.modules()):
            for n, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, n, Int8Rows(child))
    elif name.startswith("int8-tiled"):     # int8-tiled: every linear layer; -attention / -ffw: those only
        for layer in e.model.encoder.layer:
            if not name.endswith("-ffw"):
                for parent, n in ((layer.attention.self, "query"), (layer.attention.self, "key"),
                                  (layer.attention.self, "value"), (layer.attention.output, "dense")):
                    setattr(parent, n, Int8Tiled(getattr(parent, n)))
            if not name.endswith("-attention"):
                layer.intermediate.dense = Int8Tiled(layer.intermediate.dense, act="gelu")
                layer.intermediate.intermediate_act_fn = torch.nn.Identity()
                layer.output.dense = Int8Tiled(layer.output.dense)
    elif name == "compiled":
        e.model = torch.compile(e.model, dynamic=True)
    return e


def recall_against(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def exact_knn(queries: np.ndarray, emb: np.ndarray, k: int) -> np.ndarray:
    """Exact k nearest rows of emb, streamed in blocks (it may be a memmap larger than memory), as the build's
    tune_nprobe finds them."""
    heap = build_db.faiss.ResultHeap(len(queries), k)
    for i in range(0, len(emb), 65536):
        d, ids = build_db.faiss.knn(queries, np.asarray(emb[i:i + 65536], dtype=np.float32), k)
        heap.add_result(d, np.where(ids >= 0, ids + i, -1))
    heap.finalize()
    return heap.I


def ceiling(texts: list, batch_size: int):
    e = build_db.Embedder(build_db.DEFAULT_BERT, "mean", "cpu")
    lengths = np.array([len(ids) for ids in e.tokenizer(texts)["input_ids"]])
    texts = [texts[i] for i in np.argsort(lengths, kind="stable")]            # as build_db.py batches them
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    e(batches[0], batch_size)
    with torch.profiler.profile() as prof:
        t = time.perf_counter()
        for b in batches:
            e(b, batch_size)
        seconds = time.perf_counter() - t
    ops = prof.key_averages()
    total = sum(o.self_cpu_time_total for o in ops)
    linear = sum(o.self_cpu_time_total for o in ops if o.key in ("aten::addmm", "aten::mm"))
    params = sum(m.weight.numel() for m in e.model.encoder.modules() if isinstance(m, torch.nn.Linear))
    print(f"WordPieces per chunk (with [CLS] and [SEP]): mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"max {lengths.max()}; {len(texts) / seconds:.1f} chunks/s under the profiler")
    gflops = 2 * params * lengths.sum() / (linear / 1e6) / 1e9              # padding not counted
    print(f"linear layers: {linear / total:.0%} of the time, at {gflops:.0f} GFLOP/s; the top of the profile:")
    for o in sorted(ops, key=lambda o: -o.self_cpu_time_total)[:6]:
        print(f"    {o.key:60s} {o.self_cpu_time_total / total:6.1%}")
    rows, d, ff = batch_size * int(np.median(lengths)), e.model.config.hidden_size, e.model.config.intermediate_size
    x, w = torch.randn(rows, d), torch.randn(ff, d)
    xi, wi = torch.randint(-127, 128, (rows, d), dtype=torch.int8), torch.randint(-127, 128, (d, ff), dtype=torch.int8)
    rate = {}
    for name, f in (("fp32", lambda: x @ w.t()), ("int8", lambda: torch._int_mm(xi, wi))):
        f()
        t = time.perf_counter()
        for _ in range(20):
            f()
        rate[name] = 20 * 2 * rows * d * ff / (time.perf_counter() - t) / 1e9
    s, f = rate["int8"] / rate["fp32"], linear / total
    print(f"({rows} x {d}) @ ({d} x {ff}): fp32 {rate['fp32']:.0f} GFLOP/s, int8 {rate['int8']:.0f} GOP/s: {s:.2f}x")
    print(f"ceiling of an int8 path with free quantization: 1 / (1 - {f:.2f} + {f:.2f} / {s:.2f}) = "
          f"{1 / (1 - f + f / s):.2f}x")


def embed_arguments(p):
    p.add_argument("--chunks", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=build_db.DBConfig.batch_size)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=build_db.DBConfig.k)
    p.add_argument("--variants", default="fp32,int8-dynamic,int8-rows,compiled")
    p.add_argument("--ceiling", action="store_true", help="the bound on any int8 path's speed-up (see above)")


def cmd_embed(args):
    """
Embedding throughput of build_db.py on the CPU, and what cheaper variants of the frozen embedder would buy.

    python bench/db_speed.py embed            # 1,024 chunks of text.txt, MiniLM, batches of 64, 2 threads
    python bench/db_speed.py embed --variants fp32,int8-rows,int8-tiled,int8-tiled-attention,int8-tiled-ffw

Each variant runs build_db.embed_chunks, everything the build does per chunk (decode the BPE tokens to text,
sort by length, BERT-tokenize, forward, pool, normalise, write the float16 memmap), the variants alternating,
--repeats times each after a warm-up round; the median is reported, with the cosine similarity of each chunk's
embedding to fp32's and recall@K of exact neighbours within the sample against fp32's. Variants:
    fp32          build_db.py as it is
    int8-dynamic  torch.ao.quantization.quantize_dynamic on BERT's nn.Linear layers (weights int8 per tensor,
                  activations scaled per batch, padding included: a chunk's embedding depends on its batch)
    int8-rows     a per-row int8 linear (torch._int_mm; weights per output row, activations per token)
    int8-tiled    the same kernel a tile of 1,024 rows at a time, the rescaling (and the feed-forward's GELU) on
                  each tile while it is in cache; -attention / -ffw quantize only those linear layers
    compiled      torch.compile(model, dynamic=True); compile time is reported apart

    python bench/db_speed.py embed --ceiling  # how much faster any int8 path could be, at best, on this CPU

--ceiling profiles the fp32 embedding (the share of time in BERT's linear layers, and their GFLOP/s), times one
feed-forward-sized product in fp32 and in int8 (torch._int_mm), and prints the bound on the speed-up of an int8
path whose quantization costs nothing: 1 / (1 - f + f / s), f the linear layers' share, s the int8 speed-up.
"""
    torch.set_num_threads(2)
    M = build_db.DBConfig.chunk_len
    docs = build_db.read_documents(str(ROOT / "text.txt"))
    tok = build_db.train_tokenizer(docs, build_db.DBConfig.vocab_size)
    stream = build_db.token_stream(tok, docs, M)[:args.chunks * M]
    if args.ceiling:
        return ceiling(tok.decode_batch(stream.reshape(-1, M).tolist(), skip_special_tokens=True), args.batch_size)
    names = args.variants.split(",")
    embedders = {n: variant(n) for n in names}
    times, emb, first = {n: [] for n in names}, {}, {}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats + 1):                                   # round 0 warms up (and compiles)
            for n, e in embedders.items():                                  # alternating: same machine state
                t = time.perf_counter()
                build_db.embed_chunks(e, tok, stream, M, args.batch_size, Path(d) / f"{n}.npy", n)
                if r:
                    times[n].append(time.perf_counter() - t)
                else:
                    first[n] = time.perf_counter() - t
                emb[n] = np.load(Path(d) / f"{n}.npy").astype(np.float32)
    n_chunks = len(stream) // M
    knn = {n: exact_knn(e, e, args.k + 1)[:, 1:] for n, e in emb.items()}   # without the chunk itself
    base = n_chunks / statistics.median(times["fp32"]) if "fp32" in times else None
    print(f"| {n_chunks:,} chunks of {M} tokens, batches of {args.batch_size}, CPU, 2 threads | chunks/s | vs fp32 "
          f"| first round s | cosine to fp32 (median / min) | recall@{args.k} vs fp32 |")
    print("|---|---:|---:|---:|---|---:|")
    for n in names:
        rate = n_chunks / statistics.median(times[n])
        cos = (emb["fp32"] * emb[n]).sum(1) if "fp32" in emb else np.ones(1)
        print(f"| {n} | {rate:.1f} | {rate / base if base else 0:.2f} | {first[n]:.1f} | {np.median(cos):.4f} / "
              f"{cos.min():.4f} | {recall_against(knn['fp32'], knn[n]) if 'fp32' in knn else 0:.3f} |")


# ---- index: the index and the search at a size this corpus does not reach ------------------------------------------

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


def calibrate(db: str, intrinsic: int, rng):
    """The real embeddings of db against as many synthetic ones: the index build_index picks (nprobe for 95% of
    the 19 nearest of 1,000 sampled chunks) and the median nearest-neighbour distance."""
    try:
        meta = build_db.load_meta(db)
    except build_db.DBError as e:
        sys.exit(f"db_speed.py index: {e} (--db: a database folder, e.g. data/text)")
    real = build_db.Database(Path(db), meta).chunks("emb")[np.arange(meta["n_chunks"])].astype(np.float32)
    for name, e in (("real", real), ("synthetic", synthetic(len(real), real.shape[1], intrinsic, rng))):
        queries = e[np.sort(rng.choice(len(e), 1000, replace=False))]
        why = build_db.build_index(e, 1000, queries, 19)[1]
        nn = np.median(build_db.faiss.knn(queries, e, 2)[0][:, 1])
        print(f"{name}, {len(e):,} chunks: {why}; median nearest-neighbour distance {nn:.3f}")


def write_synthetic(path: Path, n: int, dim: int, intrinsic: int) -> np.ndarray:
    """n synthetic embeddings, float16 on disk like train_emb.npy, opened as a memmap."""
    emb = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    t = time.perf_counter()
    for i in range(0, n, 65536):
        x = synthetic(min(65536, n - i), dim, intrinsic, np.random.default_rng([0, i]))
        emb[i:i + len(x)] = x
    emb.flush()
    emb = np.load(path, mmap_mode="r")
    print(f"{n:,} synthetic embeddings ({emb.nbytes / 2 ** 30:.2f} GiB float16) in {time.perf_counter() - t:.0f} s")
    return emb


def index_arguments(p):
    p.add_argument("--n", type=int, default=1_000_000, help="chunks")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension (all-MiniLM-L6-v2: 384)")
    p.add_argument("--intrinsic", type=int, default=20, help="dimension of the Gaussian the vectors come from")
    p.add_argument("--calibrate", action="store_true", help="compare with --db's real embeddings, and stop")
    p.add_argument("--db", default="data/kjv_web")
    p.add_argument("--search", type=int, default=32768, help="chunks whose neighbours are searched (0: all)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--chunk_len", type=int, default=64)


def cmd_index(args):
    """
The database's index and neighbour search at a size this corpus does not reach: N synthetic chunk embeddings
through build_db.py's own code path (build_index: IVF k-means training, adding, nprobe tuning; search with the
leak rule), timing each step and its peak RSS, and the recall of the stored neighbours against exact search.

The synthetic embeddings are unit vectors of a 20-dimensional Gaussian projected to 384 dimensions: on
data/kjv_web's 36,846 real chunks forced onto IVF, build_index needs nprobe 128 of 767 cells (recall@19
0.974) and the median nearest-neighbour distance is 0.436; on 36,846 synthetic ones, nprobe 128 (0.983) and
0.440 (`--calibrate` prints both). Copies of real embeddings plus noise are too easy: their nearest
neighbours are each other, and nprobe 1 finds 98.6% of them.

    python bench/db_speed.py index --n 1000000        # about 8 minutes on 2 cores; --search 0: every chunk
    python bench/db_speed.py index --calibrate        # real against synthetic, at the real database's size
"""
    steps = {}

    def step(name, t, rss):
        steps[name] = (time.perf_counter() - t, rss)
        print(f"{name}: {steps[name][0]:.1f} s, peak RSS {rss:.2f} GiB", flush=True)

    rng = np.random.default_rng(0)
    if args.calibrate:
        return calibrate(args.db, args.intrinsic, rng)
    tmp = Path(tempfile.mkdtemp(dir="."))
    emb = write_synthetic(tmp / "emb.npy", args.n, args.dim, args.intrinsic)

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
    ids = build_db.search(index, emb[:searched], m, "search", lambda found, rows: build_db.exclude_own_sequences(
        found, args.k, n_seq, args.n, None, rows))
    step(f"search {searched:,} chunks", t, peak_rss_gib())
    print(f"{searched / steps[f'search {searched:,} chunks'][0]:.0f} chunks/s: all {args.n:,} chunks in "
          f"{args.n / searched * steps[f'search {searched:,} chunks'][0] / 60:.1f} min")

    # recall of the stored neighbours against exact search with the same rule, on 1,000 searched chunks
    sample = np.sort(rng.choice(searched, min(1000, searched), replace=False))
    exact = exact_knn(np.asarray(emb[sample], dtype=np.float32), emb, m)
    truth = build_db.exclude_own_sequences(exact, args.k, n_seq, args.n, None, sample)
    recall = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(ids[sample], truth)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"recall@{args.k} of the stored neighbours against exact search: {recall:.3f}; index "
          f"{index_bytes / 2 ** 30:.2f} GiB in memory; peak RSS of the process {peak:.2f} GiB")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


# ---- server: extras/server.py under load ---------------------------------------------------------------------------

def server_arguments(p):
    p.add_argument("--db", default="data/text")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="per client")
    p.add_argument("--chunks", type=int, default=1, help="per request")


def cmd_server(args):
    """
Load on the retrieval server: `python extras/server.py` in its own process, several client threads sending a
fixed number of /neighbours requests each, every answer compared with local retrieval (build_db.Retriever on
the same folder). Reports requests/s, chunks/s and latency (median, p99).

    python bench/db_speed.py server --db data/text --clients 8 --requests 25 --chunks 1   # one chunk: a generator
    python bench/db_speed.py server --db data/text --clients 4 --requests 10 --chunks 64  # batches: an evaluation
"""
    # the queries: validation chunks (text the database does not hold), and what local retrieval finds for them
    local = build_db.Retriever(args.db, "cpu")
    n = args.clients * args.requests * args.chunks
    chunks = np.load(Path(args.db) / "val_tokens.npy").reshape(-1, local.M)
    chunks = chunks[np.random.default_rng(0).choice(len(chunks), n, replace=len(chunks) < n)].astype(np.int64)
    t = time.perf_counter()
    want = local.query(chunks)
    local_s = time.perf_counter() - t
    del local
    server = subprocess.Popen([sys.executable, "extras/server.py", args.db, "--port", "0", "--device", "cpu"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"at (http://\S+)", server.stdout.readline())[1]

        def ask(i):                     # request i: chunks i*c .. (i+1)*c - 1
            rows = slice(i * args.chunks, (i + 1) * args.chunks)
            body = json.dumps({"chunks": chunks[rows].tolist()}).encode()
            t = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url + "/neighbours", body), timeout=300) as r:
                answer = json.loads(r.read())
            ok = all(answer[f] == want[f][rows].tolist() for f in ("ids", "neighbours"))
            return time.perf_counter() - t, ok
        ask(0)                          # warm-up
        t = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(ask, range(args.clients * args.requests)))
        wall = time.perf_counter() - t
    finally:
        server.terminate()
        server.wait()
    latency = np.array([r[0] for r in results]) * 1000
    wrong = sum(not r[1] for r in results)
    print(f"{args.db}: {args.clients} clients x {args.requests} requests x {args.chunks} chunk(s): "
          f"{len(results) / wall:.1f} requests/s, {len(results) * args.chunks / wall:.0f} chunks/s; latency median "
          f"{np.median(latency):.1f} ms, p99 {np.percentile(latency, 99):.1f} ms; {wrong} answers differ from local "
          f"retrieval, 0 errors (local retrieval of the same chunks in one batch: {n / local_s:.0f} chunks/s)")
    sys.exit(1 if wrong else 0)


# ---- the commands --------------------------------------------------------------------------------------------------

COMMANDS = {"embed": (cmd_embed, embed_arguments, "build_db.py's embedding rate, and int8 or compiled embedders"),
            "index": (cmd_index, index_arguments, "the index and neighbour search on N synthetic embeddings"),
            "server": (cmd_server, server_arguments, "the retrieval server under concurrent clients")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (run, add_arguments, summary) in COMMANDS.items():
        c = commands.add_parser(name, help=summary, description=run.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(c)
        c.set_defaults(run=run)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
