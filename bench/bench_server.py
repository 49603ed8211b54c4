"""
Load on the retrieval server: `python extras/server.py` in its own process, several client threads sending a
fixed number of /neighbours requests each, every answer compared with local retrieval (build_db.Retriever on
the same folder). Reports requests/s, chunks/s and latency (median, p99).

    python bench/bench_server.py --db data/text --clients 8 --requests 25 --chunks 1   # one chunk: a generator
    python bench/bench_server.py --db data/text --clients 4 --requests 10 --chunks 64  # batches: an evaluation
"""

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from build_db import Retriever  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="data/text")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="per client")
    p.add_argument("--chunks", type=int, default=1, help="per request")
    args = p.parse_args()
    # the queries: validation chunks (text the database does not hold), and what local retrieval finds for them
    local = Retriever(args.db, "cpu")
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


if __name__ == "__main__":
    main()
