"""
build_db.py in several processes: the same database, file for file, with the two steps that grow with the corpus
(embedding every chunk, searching every chunk's neighbours) shared among N processes (one GPU each, or CPU cores).

    torchrun --nproc_per_node=4 extras/build_parallel.py big.jsonl --out data/big     # build_db.py's flags

Process 0 runs build_db.build as one process would. Its embed_chunks and find_neighbours are replaced by the
versions below, which hand the other processes a task (what to read and where to write: the token streams,
the embeddings and the index are files) and do their own share; the others wait for tasks until process 0 is
done. A share is every WORLD-th batch of embeddings, and a WORLD-th of the rows that build_db.search searches.
A process that fails a task names itself in process 0's one-line error, and nothing is half-written.
"""

import functools
import os
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import build_db  # noqa: E402

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
local_find_neighbours, local_search = build_db.find_neighbours, build_db.search     # replaced by main


@functools.lru_cache(maxsize=1)
def embedder(name, pooling, device, dtype):
    if build_db.resolve_device(device).startswith("cuda"):      # a GPU per process, shared if there are fewer
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return build_db.Embedder(name, pooling, device, dtype)


def part_file(out, split: str, rank: int) -> Path:
    """Where process rank leaves its share of split's neighbours: a temporary name, which build_db.clean removes."""
    return Path(out) / f".{split}_ids.part{rank}.tmp.npy"


def embed_share(task: dict):
    """build_db.embed_chunks's batches RANK, RANK + WORLD, ..., into the file process 0 made."""
    tok, B, desc = Tokenizer.from_str(task["tokenizer"]), task["batch_size"], task["desc"] if RANK == 0 else None
    e, emb = embedder(*task["embedder"]), np.lib.format.open_memmap(task["emb"], mode="r+")
    chunks = np.load(task["stream"], mmap_mode="r").reshape(-1, task["M"])
    lengths = np.fromiter((len(t) for i in range(0, len(chunks), 65536) for t in e.tokenizer(tok.decode_batch(
        chunks[i:i + 65536].tolist(), skip_special_tokens=True))["input_ids"]), np.int64, len(chunks))
    order = np.argsort(lengths, kind="stable")          # the order of build_db.embed_chunks, batch for batch
    with build_db.progress(len(chunks), desc) as bar:
        for i in range(RANK * B, len(chunks), WORLD * B):
            rows = order[i:i + B]
            emb[rows] = e(tok.decode_batch(chunks[rows].tolist(), skip_special_tokens=True), B)
            bar.update(len(rows) * WORLD)
    emb.flush()


def search_share(index, emb, k: int, desc: str, keep=None):
    """build_db.search on this process's share of the rows of emb (it replaces build_db.search in each process)."""
    a, b = len(emb) * RANK // WORLD, len(emb) * (RANK + 1) // WORLD
    return local_search(index, emb[a:b], k, desc if RANK == 0 else None,     # keep gets rows numbered in all emb
                        keep and (lambda found, rows: keep(found, rows + a)))


def run(task: dict):
    """Do this process's share of a task; every process then learns whether any failed."""
    error = None
    try:
        if task["kind"] == "embed":
            embed_share(task)
        else:
            out, meta = Path(task["out"]), task["meta"]
            for split, ids in local_find_neighbours(build_db.read_index(out, meta), out, meta).items():
                np.save(part_file(out, split, RANK), ids)
    except Exception as e:              # a KeyboardInterrupt still ends the process at once
        error = str(e) if isinstance(e, build_db.DBError) else f"{type(e).__name__}: {e}"
    errors = [None] * WORLD
    dist.all_gather_object(errors, error)
    if failed := [(r, e) for r, e in enumerate(errors) if e]:
        raise build_db.DBError(f"process {failed[0][0]} of {WORLD} failed {task['what']}: {failed[0][1]}")


def send(task: dict):
    """Process 0: hand a task to every process, and do its own share."""
    dist.broadcast_object_list([task])
    run(task)


def embed_chunks(embedder, tok, stream, M, batch_size, out_path, desc):
    with build_db.atomic(out_path) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(stream) // M, embedder.dim)).flush()
        send(dict(kind="embed", what=f"embedding {Path(out_path).name}", emb=tmp, stream=stream.filename, M=M,
                  batch_size=batch_size, desc=desc, tokenizer=tok.to_str(),
                  embedder=(embedder.name, embedder.pooling, embedder.device, str(embedder.dtype)[6:])))


def find_neighbours(index, out, meta) -> dict:
    send(dict(kind="search", what="searching neighbours", out=str(out), meta=meta))
    parts = {s: [part_file(out, s, r) for r in range(WORLD)] for s in ("train", "val")}
    try:
        return {s: np.concatenate([np.load(p) for p in files]) for s, files in parts.items()}
    finally:
        for p in sum(parts.values(), []):
            p.unlink(missing_ok=True)


def main(argv=None):
    cfg = build_db.cli(build_db.DBConfig, "build_parallel.py", "build_db.py in several processes (torchrun).", argv)
    dist.init_process_group("gloo", timeout=timedelta(hours=12))   # small objects only: arrays go through files
    build_db.search, failed = search_share, False          # each process searches its share of the rows
    try:
        if RANK == 0:
            build_db.embed_chunks, build_db.find_neighbours = embed_chunks, find_neighbours
            try:
                if (meta := build_db.build(cfg)).get("overlap") is not None:
                    print(f"retrieval outlook: {build_db.outlook(meta['overlap'])}")
            except build_db.DBError as e:
                print(f"build_parallel.py: error: {e}", file=sys.stderr)
                failed = True
            finally:
                dist.broadcast_object_list([None])                  # no more tasks
        else:
            while True:
                task = [None]
                dist.broadcast_object_list(task)
                if task[0] is None:
                    break
                try:
                    run(task[0])
                except build_db.DBError:                            # process 0 says what failed
                    pass
    finally:
        dist.barrier()                  # all leave together: a group torn down by one process alone can abort
        dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
