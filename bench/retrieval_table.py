"""
The tables of the README's "Does retrieval help?" from what bench/retrieval_experiment.sh wrote.

    python bench/retrieval_table.py out/exp [out/exp_seed1 ...]

Every number is read from the models' log.jsonl (the final evaluation of training) and eval.jsonl (train.py
--eval_only with each database): held-out bits per byte with retrieval (RETRO[ON]) and without (RETRO[OFF]),
and the oracle check (held-out loss in nats where neighbours are visible: none, stored, shuffled, oracle);
and, from overlap.jsonl (bench/overlap_split.py), held-out bpb split by how much of each chunk its neighbours hold.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_db import load_meta  # noqa: E402

DATABASES = ["text", "kjv_control", "kjv_web", "kjv_web_control"]


def last(path: Path, **match):
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return rows[-1] if rows else None


def main(dirs):
    for d in map(Path, dirs):
        print(f"## {d}\n")
        print("| model | training database | bpb RETRO[ON] | bpb RETRO[OFF] | none | stored | shuffled | oracle |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for m, db in [("baseline", "-"), ("baseline_web", "- (WEB in its training text)"), ("retro", "data/text"),
                      ("retro_web", "data/kjv_web")]:
            r = last(d / m / "log.jsonl", final=True)
            if r is None:
                continue
            p = r.get("probe") or {}
            probe = " | ".join(f"{p[k]:.3f}" if k in p else "-" for k in ("none", "stored", "shuffled", "oracle"))
            print(f"| {m} | {db} | {r['bpb_on']:.4f} | {r['bpb_off']:.4f} | {probe} |")
        print("\nThe same trained models with other databases, no retraining (held-out bpb, RETRO[ON]; oracle check):\n")
        print("| database | indexed chunks | " + " | ".join(f"{m} bpb | {m} stored / oracle (nats)"
                                                        for m in ("retro", "retro_web")) + " |")
        print("|---|---:|" + "---:|---:|" * 2)
        for db in DATABASES:
            if not Path(f"data/{db}/meta.json").exists():
                continue
            meta = load_meta(f"data/{db}")
            n = meta.get("n_chunks", meta["n_train_chunks"])
            cells = []
            for m in ("retro", "retro_web"):
                r = last(d / m / "eval.jsonl", db=f"data/{db}")
                cells += [f"{r['bpb_on']:.4f}", f"{r['probe']['stored']:.3f} / {r['probe']['oracle']:.3f}"] if r \
                    else ["-", "-"]
            print(f"| {db} | {n:,} | " + " | ".join(cells) + " |")
        rows = [json.loads(line) for line in (d / "overlap.jsonl").read_text().splitlines()] \
            if (d / "overlap.jsonl").exists() else []
        if rows:
            print("\nHeld-out bpb RETRO[ON] / RETRO[OFF] by the longest run of a chunk's tokens found in its neighbours "
                  "(share of held-out tokens in brackets; bench/overlap_split.py):\n")
            buckets = [tuple(b["bucket"]) for b in rows[0]["rows"]]
            print("| model | database | " + " | ".join(f"{lo:.0%}-{hi:.0%}" for lo, hi in buckets) + " |")
            print("|---|---|" + "---:|" * len(buckets))
            for r in rows:
                by = {tuple(b["bucket"]): b for b in r["rows"]}
                print(f"| {Path(r['out_dir']).name} | {Path(r['db']).name} | " + " | ".join(
                    f"{by[b]['bpb_on']:.3f} / {by[b]['bpb_off']:.3f} ({by[b]['share']:.0%})" if b in by else "-"
                    for b in buckets) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:] or ["out/exp"])
