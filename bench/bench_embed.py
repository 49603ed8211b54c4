"""
Embedding throughput of build_db.py on the CPU, and what cheaper variants of the frozen embedder would buy.

    python bench/bench_embed.py            # 1,024 chunks of text.txt, MiniLM, batches of 64, 2 threads

Each variant runs build_db.embed_chunks, everything the build does per chunk (decode the BPE tokens to text,
sort by length, BERT-tokenize, forward, pool, normalise, write the float16 memmap), the variants alternating,
--repeats times each after a warm-up round; the median is reported, with the cosine similarity of each chunk's
embedding to fp32's and recall@K of exact neighbours within the sample against fp32's. Variants:
    fp32          build_db.py as it is
    int8-dynamic  torch.ao.quantization.quantize_dynamic on BERT's nn.Linear layers (weights int8 per tensor,
                  activations scaled per batch, padding included: a chunk's embedding depends on its batch)
    int8-rows     a per-row int8 linear (torch._int_mm; weights per output row, activations per token)
    compiled      torch.compile(model, dynamic=True); compile time is reported apart
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
    elif name == "compiled":
        e.model = torch.compile(e.model, dynamic=True)
    return e


def recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=build_db.DBConfig.batch_size)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=build_db.DBConfig.k)
    p.add_argument("--variants", default="fp32,int8-dynamic,int8-rows,compiled")
    args = p.parse_args()
    torch.set_num_threads(2)
    M = build_db.DBConfig.chunk_len
    docs = build_db.read_documents(str(ROOT / "text.txt"))
    tok = build_db.train_tokenizer(docs, build_db.DBConfig.vocab_size)
    stream = build_db.token_stream(tok, docs, M)[:args.chunks * M]
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
