"""
The tables of the README's "Does retrieval help?" from what bench/retrieval_experiment.sh wrote.

    python bench/retrieval_table.py out/exp [out/exp_seed1 ...]

Every number is read from the models' log.jsonl (the final evaluation of training) and eval.jsonl (train.py
--eval_only with each database): held-out bits per byte with retrieval (RETRO[ON]) and without (RETRO[OFF]),
and the oracle check (held-out loss in nats where neighbours are visible: none, stored, shuffled, oracle).
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
        print()


if __name__ == "__main__":
    main(sys.argv[1:] or ["out/exp"])
