"""
An experiment on the exclusion rule: copy a database and re-pick every training chunk's neighbours so that
none of them (nor its continuation) comes from the chunk's own document, the paper's rule (section 2.3),
on top of build_db.py's own rule (no neighbour from a training sequence that can hold the chunk).

    python bench/exclude_documents.py data/text data/text_docx
    python train.py --retrofit out/baseline/ckpt.pt --db data/text_docx --max_iters 300 --warmup_iters 30 \\
        --eval_interval 100 --out_dir out/retrofit_docx

Why: with build_db.py's rule most training neighbours of text.txt come from the query's own book, while a
held-out chunk can only retrieve from other books; the paper's rule makes training look like evaluation.
Validation neighbours are unchanged.
"""

import shutil
import sys
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_db import exclude_own_sequences, load_meta, neighbour_tokens  # noqa: E402


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    meta = load_meta(src)
    M, k = meta["corpus"]["chunk_len"], meta["retrieval"]["k"]
    n = meta["retrieval"]["seq_len"] // M
    stream = np.load(src / "train_tokens.npy")
    emb = np.load(src / "train_emb.npy").astype(np.float32)
    doc = np.concatenate([[0], np.cumsum(stream == meta["eot_id"])[:-1]])   # document of each token
    first, last = doc[::M], doc[M - 1::M]                                    # of each chunk's first and last
    index = faiss.IndexFlatL2(emb.shape[1])
    index.add(emb)
    candidates = index.search(emb, 256)[1]                                   # enough to leave K after both rules
    c = np.arange(len(candidates))[:, None]
    cont = np.minimum(candidates + 1, len(first) - 1)
    same_doc = (last[cont] >= first[c]) & (first[candidates] <= last[c])     # [N, F] overlaps c's documents
    ids = exclude_own_sequences(np.where(same_doc, -1, candidates), k, n)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    np.save(dst / "train_neighbour_ids.npy", ids)
    np.save(dst / "train_neighbours.npy", neighbour_tokens(stream, ids, M, meta["pad_id"], meta["eot_id"]))
    print(f"{dst}: training neighbours from other documents only; {(ids < 0).mean():.2%} missing")


if __name__ == "__main__":
    main()
