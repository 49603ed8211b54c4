"""
Generation speed: RETRO.generate with its cache (self-attention keys and values, each chunk's encoded
neighbours computed once) against recomputing the whole sequence for every new token, which is what the
other public RETRO implementations do. Both must give the same greedy tokens.

    python bench/bench_generate.py                 # matched config, batch 1, 64-token prompt, 512 new tokens

The retriever is a stand-in that returns the same neighbours for the same chunk (a seeded function of the
chunk's tokens), so the numbers measure the model; a real retrieval (MiniLM + faiss) costs extra per chunk,
reported once at the end when the database data/text exists.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retro import RETRO, RetroConfig  # noqa: E402


def fake_retriever(K, M, vocab):
    def retrieve(chunk):
        g = torch.Generator().manual_seed(int((chunk * torch.arange(1, M + 1)).sum()) % (2 ** 31))
        return torch.randint(1, vocab, (chunk.size(0), K, 2 * M), generator=g)
    return retrieve


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new_tokens", type=int, default=512)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs of each; the median is reported")
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = RetroConfig(vocab_size=30522, block_size=512, chunk_len=64, n_layer=6, n_head=4, n_embd=256,
                      cca_layers=(2, 5), enc_n_layer=2, enc_n_head=4, enc_n_embd=256)
    model = RETRO(cfg).eval()
    retrieve = fake_retriever(2, cfg.chunk_len, cfg.vocab_size)
    prompt = torch.randint(1, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    gen = lambda use_cache: model.generate(prompt, args.new_tokens, retrieve, top_k=1, use_cache=use_cache)
    gen(True)                                                               # warm-up
    t_cache, out_cache = timed(lambda: gen(True), args.repeats)
    t_full, out_full = timed(lambda: gen(False), args.repeats)
    assert torch.equal(out_cache, out_full), "cached and recomputed greedy outputs differ"
    n = args.new_tokens
    print(f"| generation, batch 1, {args.prompt}-token prompt, {n} new tokens | tokens/s | seconds |")
    print("|---|---|---|")
    print(f"| recompute everything per token (peers' method) | {n / t_full:.1f} | {t_full:.1f} |")
    print(f"| RETRO.generate, cached | {n / t_cache:.1f} | {t_cache:.2f} |")
    print(f"speed-up {t_full / t_cache:.1f}x, identical greedy output: yes (median of {args.repeats} runs each)")
    db = Path(__file__).resolve().parents[1] / "data" / "text"
    if (db / "meta.json").exists():
        from build_db import Retriever
        r = Retriever(db, "cpu")
        chunk = torch.as_tensor(r.stream[:64].astype("int64"))[None]
        r(chunk)
        t, _ = timed(lambda: r(chunk), 5)
        print(f"a real retrieval (MiniLM embedding + faiss search) of one chunk: {t * 1000:.0f} ms")


if __name__ == "__main__":
    main()
