"""
The paper's Figure 1 (middle) at our scale: one trained model, no retraining, held-out bits per byte against the
size of the database it retrieves from. The database grows from the training chunks by growing shares of a
related text (by default the World English Bible, in pieces of 16 chunks, about a chapter, in a fixed random
order, each share holding the last) and, at the same sizes, by an unrelated control text instead; RETRO[OFF]
(the same weights, no neighbours) and a baseline trained without retrieval are flat lines.

    python train.py && python train.py --n_neighbours 0 --out_dir out/baseline
    python bench/db_growth.py --out_dir out --baseline out/baseline --png bench/db_growth.png

Nothing is embedded twice: the related text's chunk embeddings come from the model's database (it holds the
text as retrieval-only; else it is embedded once), the control text's are embedded once into --cache. Each
point searches the held-out chunks exactly (faiss IndexFlatL2) among the training chunks and that share's
chunks, then runs the evaluation of train.py (every held-out sequence, ON and OFF). The table goes to stdout
and, with --json, to a file; the picture needs matplotlib (a benchmark-only dependency).
"""

import argparse
import functools
import json
import sys
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import build_db  # noqa: E402
from retro import RETRO, RetroConfig  # noqa: E402
import train  # noqa: E402
from train import Data, TrainConfig, evaluate, load_checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parent


def source_chunks(db: Path, meta: dict, text: str, cache: Path, embedder) -> tuple:
    """A text's token stream and chunk embeddings with the database's tokenizer and embedder: the database's
    own files if it holds the text, else embedded once into cache (by build_db's source key)."""
    docs = build_db.read_documents(text)
    key = build_db.source_key(docs, meta["tokenizer_sha256"], meta["corpus"])
    folder = db if key in {s["key"] for s in meta.get("sources", [])} else cache
    if folder == cache:
        tok = build_db.Tokenizer.from_file(str(db / "tokenizer.json"))
        build_db.prepare_source(cache, text, docs, tok, key, embedder, meta["corpus"]["chunk_len"],
                                build_db.DBConfig.batch_size)
    return (np.load(folder / "sources" / f"{key}_tokens.npy", mmap_mode="r"),
            np.load(folder / "sources" / f"{key}_emb.npy", mmap_mode="r"))


def nested_shares(stream: np.ndarray, M: int, eot: int, shares: list, block: int, seed: int = 0) -> list:
    """For each share s, the chunks of the first s of the text's pieces in a fixed random order, each share
    holding the one before it. A piece is `block` consecutive chunks of one document (about a chapter at 16),
    or a whole document (block 0): with few held-out documents, whole ones make a share hold all of a held-out
    document's twin or none of it, and the curve jumps."""
    doc = np.searchsorted(np.flatnonzero(stream == eot), np.arange(0, len(stream), M))  # (chunks,) first token's
    piece = doc if not block else np.cumsum(np.r_[1, (np.diff(doc) != 0) | (np.arange(1, len(doc)) % block == 0)]) - 1
    order = np.random.default_rng(seed).permutation(piece.max() + 1)
    return [np.flatnonzero(np.isin(piece, order[:round(s * len(order))])) for s in shares]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="the trained RETRO model (its ckpt.pt)")
    p.add_argument("--baseline", default="", help="a model trained with --n_neighbours 0: a flat line")
    p.add_argument("--db", default="", help="the database to grow from (default: the model's own)")
    p.add_argument("--related", default=str(HERE / "texts" / "web.txt"), help="the text that grows the database")
    p.add_argument("--control", default=str(HERE / "texts" / "control.txt"), help="the unrelated text, same sizes")
    p.add_argument("--shares", default="0,0.125,0.25,0.5,1", help="shares of the related text's pieces")
    p.add_argument("--block", type=int, default=16, help="chunks per piece of the related text (0: documents)")
    p.add_argument("--cache", default="data/db_growth", help="where the control's embeddings are kept")
    p.add_argument("--json", default="", help="write the table here as JSON")
    p.add_argument("--png", default="", help="draw the figure here (needs matplotlib)")
    p.add_argument("--dtype", default="auto", help="as train.py's --dtype")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(Path(args.out_dir) / "ckpt.pt")
    tc = ckpt["train_config"]
    trained = replace(TrainConfig(), data=tc["data"], db=tc["db"], retrieval_texts=tc["retrieval_texts"])
    db = Path(args.db or build_db.db_dir(train.db_config(trained)))
    meta = build_db.load_meta(db)
    load_checkpoint(Path(args.out_dir) / "ckpt.pt", meta, db, ckpt)
    cfg = TrainConfig(**{k: tc[k] for k in ("block_size", "chunk_len", "n_neighbours", "batch_size")})
    M, K, pad, eot = cfg.chunk_len, cfg.n_neighbours, meta["pad_id"], meta["eot_id"]
    device = build_db.resolve_device("auto")
    ctx = build_db.autocast(device, build_db.resolve_dtype(args.dtype, device)[0])
    embedder = functools.cache(lambda: build_db.Embedder(meta["corpus"]["bert"], meta["corpus"]["pooling"], device))
    (Path(args.cache) / "sources").mkdir(parents=True, exist_ok=True)
    related, control = (source_chunks(db, meta, t, Path(args.cache), embedder) for t in (args.related, args.control))
    train_tokens, train_emb = (np.load(db / f"train_{kind}.npy", mmap_mode="r") for kind in ("tokens", "emb"))
    val_emb = np.asarray(np.load(db / "val_emb.npy"), np.float32)
    stream = build_db.Concat([train_tokens, related[0], control[0]])     # chunk numbers: training, related, control
    offset = {"related": len(train_emb), "control": len(train_emb) + len(related[1])}

    data = Data(build_db.open_db(db), cfg)
    model = RETRO(RetroConfig(**ckpt["model_config"])).to(device).eval()
    model.load_state_dict(ckpt["model"])
    shares = [float(s) for s in args.shares.split(",")]
    rows = []
    for share, chosen in zip(shares, nested_shares(related[0], M, eot, shares, args.block)):
        control_rows = np.arange(min(len(chosen), len(control[1])))          # the same number of control chunks
        for kind, rows_of in (("related", chosen), ("control", control_rows)):
            if kind == "control" and share == 0:
                continue                                                      # the same database as related's 0
            emb = related[1] if kind == "related" else control[1]
            index = faiss.IndexFlatL2(train_emb.shape[1])
            build_db.add(index, train_emb)
            build_db.add(index, np.asarray(emb[rows_of]))
            number = np.concatenate([np.arange(len(train_emb)), offset[kind] + rows_of])  # index row -> chunk
            ids = number[index.search(val_emb, K)[1]]                         # (val chunks, K) chunk numbers
            data.neighbours["val"] = build_db.neighbour_tokens(stream, ids, M, pad, eot)
            r = evaluate(model, data, ctx, device, desc=f"{kind} {share:g}")
            rows.append(dict(text=kind, share=share, chunks=int(index.ntotal), bpb_on=r["on"][1], bpb_off=r["off"][1],
                             overlap=build_db.overlap(data.tokens["val"], data.neighbours["val"], M, pad)))
            print(f"{kind:8s} share {share:5.3f}: {index.ntotal:7,} chunks, RETRO[ON] bpb {r['on'][1]:.4f} "
                  f"(RETRO[OFF] {r['off'][1]:.4f}), overlap {rows[-1]['overlap']:.0%}", flush=True)
    result = dict(out_dir=args.out_dir, db=str(db), related=args.related, control=args.control, rows=rows)
    if args.baseline:
        b = load_checkpoint(Path(args.baseline) / "ckpt.pt", meta, db)
        base = RETRO(RetroConfig(**b["model_config"])).to(device).eval()
        base.load_state_dict(b["model"])
        result["baseline_bpb"] = evaluate(base, data, ctx, device, desc="baseline")["off"][1]   # it reads none
        print(f"baseline (no retrieval) bpb {result['baseline_bpb']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.png:
        plot(result, args.png)
    return result


def plot(result: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, style, label in (("related", "o-", "grown by the World English Bible"),
                               ("control", "s--", "grown by unrelated text (Austen)")):
        pts = sorted((r["chunks"], r["bpb_on"]) for r in result["rows"] if r["text"] == kind or r["share"] == 0)
        ax.plot(*zip(*pts), style, label=f"RETRO[ON], database {label}")
    off = result["rows"][0]["bpb_off"]
    ax.axhline(off, color="gray", ls=":", label="RETRO[OFF] (same weights, no neighbours)")
    if "baseline_bpb" in result:
        ax.axhline(result["baseline_bpb"], color="black", ls="-.", label="baseline (trained without retrieval)")
    top = max([off, result.get("baseline_bpb", off)] + [r["bpb_on"] for r in result["rows"]])
    ax.set_ylim(top=top + 0.04)                                          # the flat lines inside the frame
    ax.set_xlabel("database size (chunks of 64 tokens)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("One model, no retraining: a larger database, a better model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
