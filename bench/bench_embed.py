"""
Embedding throughput of build_db.py on the CPU, and what cheaper variants of the frozen embedder would buy.

    python bench/bench_embed.py            # 1,024 chunks of text.txt, MiniLM, batches of 64, 2 threads
    python bench/bench_embed.py --variants fp32,int8-rows,int8-tiled,int8-tiled-attention,int8-tiled-ffw

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

    python bench/bench_embed.py --ceiling  # how much faster any int8 path could be, at best, on this CPU

--ceiling profiles the fp32 embedding (the share of time in BERT's linear layers, and their GFLOP/s), times one
feed-forward-sized product in fp32 and in int8 (torch._int_mm), and prints the bound on the speed-up of an int8
path whose quantization costs nothing: 1 / (1 - f + f / s), f the linear layers' share, s the int8 speed-up.
"""

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_db  # noqa: E402


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


def recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def ceiling(texts: list, batch_size: int):
    e = build_db.Embedder(build_db.DEFAULT_BERT, "mean", "cpu")
    lengths = np.array([len(ids) for ids in e.tokenizer(texts)["input_ids"]])
    texts = [texts[i] for i in np.argsort(lengths, kind="stable")]            # as build_db.py batches them
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    e(batches[0])
    with torch.profiler.profile() as prof:
        t = time.perf_counter()
        for b in batches:
            e(b)
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=build_db.DBConfig.batch_size)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=build_db.DBConfig.k)
    p.add_argument("--variants", default="fp32,int8-dynamic,int8-rows,compiled")
    p.add_argument("--ceiling", action="store_true", help="the bound on any int8 path's speed-up (see above)")
    args = p.parse_args()
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
    knn = {n: build_db.exact_knn(e, e, args.k + 1)[:, 1:] for n, e in emb.items()}   # without the chunk itself
    base = n_chunks / statistics.median(times["fp32"]) if "fp32" in times else None
    print(f"| {n_chunks:,} chunks of {M} tokens, batches of {args.batch_size}, CPU, 2 threads | chunks/s | vs fp32 "
          f"| first round s | cosine to fp32 (median / min) | recall@{args.k} vs fp32 |")
    print("|---|---:|---:|---:|---|---:|")
    for n in names:
        rate = n_chunks / statistics.median(times[n])
        cos = (emb["fp32"] * emb[n]).sum(1) if "fp32" in emb else np.ones(1)
        print(f"| {n} | {rate:.1f} | {rate / base if base else 0:.2f} | {first[n]:.1f} | {np.median(cos):.4f} / "
              f"{cos.min():.4f} | {recall(knn['fp32'], knn[n]) if 'fp32' in knn else 0:.3f} |")


if __name__ == "__main__":
    main()
