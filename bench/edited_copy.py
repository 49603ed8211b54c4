"""
Does a trained model read neighbours in text it never trained on? Take a text of another kind, hold out every
10th document as build_db.py does, put an edited copy of the held-out documents into a database (words changed,
words dropped, lines re-wrapped: related text, never the same tokens), and evaluate the model on the held-out
documents with that database and, as the control, with the same database without the copy.

    python bench/edited_copy.py --out_dir out --text bench/texts/control.txt

Both databases use the model's tokenizer and chunk length (build_db.py --tokenizer) and index the text's own
training documents too; the one with the copy reuses the other's embeddings. The edit: each word is dropped
with probability --drop, else replaced by a random word of the text with probability --change; then each
paragraph is re-wrapped at --width characters (the text's own line breaks are gone).
"""

import argparse
import re
import shutil
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import build_db  # noqa: E402
import train  # noqa: E402
from extras import evaluate as evaluate_tool  # noqa: E402


def edit(doc: str, words: list, rng, change: float, drop: float, width: int) -> str:
    """doc with words dropped and changed, each paragraph (text between blank lines, or a line of a text
    with one paragraph a line) re-wrapped at width."""
    paragraphs = re.split(r"\n\s*\n", doc) if re.search(r"\n\s*\n", doc) else doc.split("\n")
    out = []
    for p in paragraphs:
        kept = []
        for w in p.split():
            r = rng.random()
            if r < drop:
                continue
            kept.append(words[rng.integers(len(words))] if r < drop + change else w)
        if kept:
            out.append(textwrap.fill(" ".join(kept), width))
    return "\n\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="the trained model (its ckpt.pt)")
    p.add_argument("--text", default=str(Path(__file__).with_name("texts") / "control.txt"))
    p.add_argument("--work", default="data/edited_copy", help="where the copy and the two databases go")
    p.add_argument("--change", type=float, default=0.1)
    p.add_argument("--drop", type=float, default=0.1)
    p.add_argument("--width", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ckpt = train.load_checkpoint(Path(args.out_dir) / "ckpt.pt")
    tc, work = ckpt["train_config"], Path(args.work)
    trained = replace(train.TrainConfig(), data=tc["data"], db=tc["db"], retrieval_texts=tc["retrieval_texts"])
    model_db = build_db.db_dir(train.db_config(trained))
    docs = build_db.read_documents(args.text)
    held_out = build_db.split_documents(docs, build_db.DBConfig.val_every)[1]
    rng = np.random.default_rng(args.seed)
    words = sorted({w for d in docs for w in d.split()})
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "edited.txt"
    copy.write_text(f"\n{build_db.SEPARATOR}\n".join(edit(d, words, rng, args.change, args.drop, args.width)
                                                      for d in held_out))
    settings = dict(text=args.text, tokenizer=str(model_db), chunk_len=tc["chunk_len"], seq_len=tc["block_size"],
                    k=max(tc["n_neighbours"], 2))
    without, with_copy = work / "without", work / "with_copy"
    build_db.build(build_db.DBConfig(**settings, out=str(without), retrieval_texts="none"))
    if not (with_copy / "meta.json").exists():
        shutil.copytree(without, with_copy, dirs_exist_ok=True)       # only the copy is embedded again
    build_db.build(build_db.DBConfig(**settings, out=str(with_copy), retrieval_texts=str(copy)))
    rows = {}
    for name, db in (("without the copy", without), ("with the edited copy", with_copy)):
        r = evaluate_tool.main(["--out_dir", args.out_dir, "--db", str(db)])
        rows[name] = dict(bpb_on=r["on"][1], bpb_off=r["off"][1], overlap=build_db.load_meta(db)["overlap"],
                          oracle_fall=1 - r["probe"]["oracle"] / r["probe"]["none"])
    print(f"{args.out_dir} on {len(held_out)} held-out documents of {args.text} (edit: change {args.change}, drop "
          f"{args.drop}, width {args.width}):")
    for name, r in rows.items():
        print(f"  database {name:22s} overlap {r['overlap']:4.0%}  RETRO[ON] bpb {r['bpb_on']:.4f}  RETRO[OFF] "
              f"{r['bpb_off']:.4f}  ON vs OFF {r['bpb_on'] / r['bpb_off'] - 1:+.1%}")
    return rows


if __name__ == "__main__":
    main()
