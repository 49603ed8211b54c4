"""
Evaluate a trained model with any database: train.py's final evaluation (every held-out token once, with
retrieval and without, and the oracle check), then bits per byte by how much each held-out chunk overlaps the
database (the paper's section 2.6 and Figure 6), which tells how much of the gain is copying.

    python extras/evaluate.py                                   # out/ckpt.pt with the database it was trained with
    python extras/evaluate.py --out_dir out/kjv --db data/kjv_web   # another database: the model's tokenizer and M
    python extras/evaluate.py --db http://127.0.0.1:8000        # neighbours from a server (extras/server.py)

Every flag of train.py applies (`python extras/evaluate.py -h`): --out_dir names the model, --db the database,
which may have grown since training (build_db.py --add) or be built for the model (build_db.py --tokenizer).
The held-out text is the database's; with a server, the model's own database's. Results go to OUT_DIR/eval.jsonl.
"""

import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import build_db  # noqa: E402
import train  # noqa: E402
from build_db import DBError, Retriever, autocast, cli  # noqa: E402
from extras.server import RemoteRetriever, is_server  # noqa: E402
from retro import RETRO, RetroConfig  # noqa: E402

ALPHAS = (0, 0.125, 0.25, 0.5, 1)   # the overlaps at which bpb_by_overlap filters (paper, Figure 6)


def trained_model(cfg: train.TrainConfig, server: Retriever = None) -> tuple:
    """(out_dir's model, its checkpoint, cfg with its shapes, the database, the device). The database, which must
    fit the model: server (a served one) if given, else cfg's, which without --data or --db is the one the model
    was trained with, as it is now."""
    ckpt = train.load_checkpoint(path := Path(cfg.out_dir) / "ckpt.pt")
    tc, device = ckpt["train_config"], build_db.resolve_device(cfg.device)
    cfg = replace(cfg, **{k: tc[k] for k in ("block_size", "chunk_len", "n_neighbours", "batch_size")})
    if not cfg.db and cfg.data == train.TrainConfig.data:      # the database it was trained with, as it is now
        texts = tc["retrieval_texts"]                           # ("": with the texts it holds, grown or not)
        cfg = replace(cfg, data=tc["data"], db=tc["db"], retrieval_texts="" if texts == "none" else texts)
    db = server or train.prepare_db(cfg, training=False)
    train.load_checkpoint(path, db.meta, server.url if server else db.path, ckpt)
    model = RETRO(RetroConfig(**ckpt["model_config"])).to(device).eval()
    model.load_state_dict(ckpt["model"])
    return model, ckpt, cfg, db, device


def chunk_overlap(db: build_db.Database, k: int = 10) -> np.ndarray:
    """r(C) of each held-out chunk C (section 2.6): the longest run of C's tokens that one of its k nearest
    chunks [N, F] also holds, over M. The paper takes 10 neighbours from the training data; these come from the
    whole database (training and retrieval-only text: what retrieval reads)."""
    M, pad, eot = db.meta["corpus"]["chunk_len"], db.meta["pad_id"], db.meta["eot_id"]
    chunks = np.asarray(db.tokens["val"]).reshape(-1, M)
    ids = build_db.read_index(db.path, db.meta).search(np.load(db.path / "val_emb.npy").astype(np.float32), k)[1]
    nb = build_db.neighbour_tokens(db.chunks(), ids, M, pad, eot)                    # (chunks, k, 2M)
    return build_db.longest_shared_run(chunks, nb, pad) / M


def bpb_by_overlap(chunks: dict, overlap: np.ndarray, modes=("on", "off"), alphas=ALPHAS) -> list:
    """bpb(alpha) of the paper's equation 5 for each mode of train.evaluate's chunks: bits per byte over the
    held-out chunks whose overlap r(C) is at most alpha (alpha = 1: the whole set), and how many chunks that is."""
    rows, held = [], chunks["bytes"] > 0
    for a in alphas:
        sel = held & (overlap <= a + 1e-9)
        n_bytes = max(chunks["bytes"][sel].sum(), 1)
        rows.append(dict(alpha=a, chunks=int(sel.sum()), share=sel.sum() / held.sum(),
                         **{m: chunks[m][sel].sum() / math.log(2) / n_bytes for m in modes}))
    return rows


def retrieve_val(data: train.Data, retriever, batch: int = 256):
    """Validation neighbours found now by retriever (a server's), in place of the stored ones."""
    chunks = np.asarray(data.tokens["val"]).reshape(-1, data.M)
    data.neighbours["val"] = np.concatenate([retriever.query(chunks[i:i + batch])["neighbours"] for i in tqdm(
        range(0, len(chunks), batch), desc="retrieve val", leave=False, disable=None)])


def evaluate(cfg: train.TrainConfig) -> dict:
    """The whole held-out set with and without retrieval, the oracle check, and bits per byte by overlap."""
    server = RemoteRetriever(cfg.db) if is_server(cfg.db) else None
    # with a server, the held-out text (and the overlap) are those of the model's own database, mostly the same
    model, ckpt, cfg, db, device = trained_model(replace(cfg, db="", data=train.TrainConfig.data) if server else cfg)
    data, ctx = train.Data(db, cfg), autocast(device, build_db.resolve_dtype(cfg.dtype, device)[0])
    if server:                              # the server's database must fit the model, as the local one does
        train.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", server.meta, server.url, ckpt)
        retrieve_val(data, server)
    where = server.url if server else str(db.path)
    r = train.evaluate(model, data, ctx, device, desc="eval")
    r["probe"] = train.retrieval_probe(model, data, ctx=ctx, device=device,
                                        modes=("none", "stored", "shuffled", "oracle")) if cfg.n_neighbours else None
    r["by_overlap"] = bpb_by_overlap(r["chunks"], chunk_overlap(db)) if cfg.n_neighbours else None
    print(f"{Path(cfg.out_dir) / 'ckpt.pt'} (step {ckpt['iter']}) with {where}:")
    train.report(r, r["probe"], db.meta)
    if r["by_overlap"]:
        print("  by overlap r(C), the longest run a held-out chunk shares with its 10 nearest chunks over its length "
              "(paper, section 2.6):\n    r(C) <=   chunks          ON       OFF   ON vs OFF")
        for row in (row for row in r["by_overlap"] if row["chunks"]):      # no chunk at an alpha: no row
            print(f"    {row['alpha']:<8g}{row['chunks']:6,} ({row['share']:4.0%})  {row['on']:.4f}  {row['off']:.4f}"
                  f"   {row['on'] / row['off'] - 1:+.1%}")
    tc = ckpt["train_config"]
    train.log_eval(Path(cfg.out_dir) / "eval.jsonl", ckpt["iter"], r, tc["batch_size"] * tc["grad_accum"] *
                   tc["block_size"], final=True, db=where, probe=r["probe"], by_overlap=r["by_overlap"])
    return r


def main(argv=None):
    cfg = cli(train.TrainConfig, "evaluate.py", "Evaluate a trained RETRO model with its database, another, or a "
                                                "served one: bits per byte with and without retrieval, by overlap.",
              argv)
    try:
        return evaluate(cfg)
    except DBError as e:
        sys.exit(f"evaluate.py: error: {e}")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:       # what read the output has gone (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
