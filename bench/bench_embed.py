"""
Embedding throughput of build_db.py against the bare embedder forward pass on the same batches.

    python bench/bench_embed.py            # 2,048 chunks of text.txt, MiniLM, batches of 64, CPU

"pipeline" is build_db.embed_chunks, everything the build does per chunk: decode the BPE tokens to text,
sort by length, BERT-tokenize, forward, mean-pool, normalise, write into the float16 memmap.
"bare forward" is only model(**batch) on the very same batches, tokenized beforehand, untimed.
Each is run 3 times; the median is reported.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_db  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=build_db.DBConfig.batch_size)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    M = build_db.DBConfig.chunk_len
    docs = build_db.read_documents(str(ROOT / "text.txt"))
    tok = build_db.train_tokenizer(docs, build_db.DBConfig.vocab_size)
    stream = build_db.token_stream(tok, docs, M)[:args.chunks * M]
    embedder = build_db.Embedder(build_db.DEFAULT_BERT, "mean", "cpu")

    texts = tok.decode_batch(stream.reshape(-1, M).tolist(), skip_special_tokens=True)
    order = np.argsort([len(t) for t in texts], kind="stable")
    batches = [embedder.tokenizer([texts[r] for r in order[i:i + args.batch_size]], padding=True, truncation=True,
                                  max_length=embedder.max_len, return_tensors="pt")
               for i in range(0, len(texts), args.batch_size)]

    def bare():
        with torch.inference_mode():
            for b in batches:
                embedder.model(**b)

    def pipeline():
        with tempfile.TemporaryDirectory() as d:
            build_db.embed_chunks(embedder, tok, stream, M, args.batch_size, Path(d) / "emb.npy", "embed")

    bare()                                                                  # warm-up
    t_bare, t_pipe = [], []
    for _ in range(args.repeats):                                           # interleaved: same machine state
        t = time.perf_counter()
        bare()
        t_bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        pipeline()
        t_pipe.append(time.perf_counter() - t)
    n = len(texts)
    b, pl = n / statistics.median(t_bare), n / statistics.median(t_pipe)
    print(f"| embedding {n:,} chunks of {M} tokens, batches of {args.batch_size}, CPU | chunks/s |")
    print("|---|---|")
    print(f"| bare MiniLM forward on the same batches | {b:.1f} |")
    print(f"| build_db.py pipeline | {pl:.1f} ({pl / b:.0%} of bare) |")


if __name__ == "__main__":
    main()
