"""
A look inside a retrieval database: what retrieval finds for a text, or what was stored for a chunk.

    python extras/show.py "And God said"                       # each chunk's K nearest chunks in data/text+web
    python extras/show.py val:100 --db data/text+web           # the stored neighbours of validation chunk 100
    python extras/show.py "In the beginning" --db http://127.0.0.1:8000      # a served database (extras/server.py)

Each neighbour is printed with its chunk number, the text it comes from, its distance (squared L2 between unit
embeddings, 2 - 2 cos), its chunk N and its continuation F.
"""

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_db import DBConfig, DBError, db_dir, is_unicode, open_db, source_of  # noqa: E402
from extras.server import connect  # noqa: E402


def stored(db, split: str, c: int) -> tuple:
    """The neighbours stored for chunk c of split, as training and evaluation read them."""
    d = open_db(db)
    meta, M, n = d.meta, d.meta["corpus"]["chunk_len"], d.meta[f"n_{split}_chunks"]
    if not 0 <= c < n:
        raise DBError(f"{db} has {n:,} {split} chunks: pass {split}:0 to {split}:{n - 1}")
    chunks, ids = d.tokens[split][c * M:(c + 1) * M][None], d.neighbour_ids[split][c][None].astype(np.int64)
    query = np.load(d.path / f"{split}_emb.npy", mmap_mode="r")[c].astype(np.float32)
    dist = ((d.chunks("emb")[np.clip(ids[0], 0, None)].astype(np.float32) - query) ** 2).sum(-1)[None]
    print(f"{db}: the stored neighbours of {split} chunk {c} (what training and evaluation read)")
    return meta, d.tokenizer, chunks, dict(ids=ids, distances=dist, neighbours=d.neighbours[split][c][None]), \
        [f"{split} chunk {c}"]


def nearest(db, text: str, device: str) -> tuple:
    """Each chunk of M tokens of text, and its K nearest chunks in the database (a folder or a server)."""
    retriever = connect(db, device)
    meta, M, tok = retriever.meta, retriever.M, retriever.tokenizer
    ids = tok.encode(text).ids
    chunks = np.array([ids[i:i + M] + [meta["pad_id"]] * (M - len(ids[i:i + M])) for i in range(0, len(ids), M)])
    if not len(chunks):
        raise DBError("it needs some text, or train:N / val:N")
    print(f"{db}: the {retriever.k} nearest chunks of each chunk of {M} tokens of the text")
    return meta, tok, chunks, retriever.query(chunks), [f"chunk {b} of the text" for b in range(len(chunks))]


def show(what: str, db, device: str = "auto"):
    m = re.fullmatch(r"(train|val):\s*(-?\d+)", what.strip())
    meta, tok, chunks, r, names = stored(db, m[1], int(m[2])) if m else nearest(db, what, device)
    M = meta["corpus"]["chunk_len"]
    text = lambda t: repr(tok.decode(np.asarray(t).tolist(), skip_special_tokens=True))
    for b in range(len(chunks)):
        print(f"{names[b]}: {text(chunks[b])}")
        for j, (i, dist) in enumerate(zip(r["ids"][b], r["distances"][b])):
            source, at = source_of(meta, int(i))
            where = f"chunk {i} ({source}{'' if at == i else f', its chunk {at}'})" if source else \
                "none (padding)" if i < 0 else f"chunk {i} (not in this database)"
            print(f"  neighbour {j}: {where}, distance {dist:.3f}\n    N: {text(r['neighbours'][b][j][:M])}"
                  f"\n    F: {text(r['neighbours'][b][j][M:])}")


def main(argv=None):
    p = argparse.ArgumentParser("show.py", description="Print a text's nearest chunks in a retrieval database, or "
                                                       "the neighbours stored for its chunk train:N or val:N.")
    p.add_argument("what", help="a text, or train:N / val:N")
    p.add_argument("--db", default=str(db_dir(DBConfig())), help="a database folder or a server's http://host:port "
                                                                 "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="the embedder's device")
    args = p.parse_args(argv)
    if not is_unicode(args.what):
        p.error("the text is not valid UTF-8 (check the terminal's or the script's encoding)")
    try:
        show(args.what, args.db, args.device)
    except DBError as e:
        sys.exit(f"show.py: error: {e}")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:       # what read the output has gone (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
