#!/usr/bin/env bash
# The experiment of bench/RESULTS.md's "Does retrieval help?": what a database that holds a second translation of
# the Bible buys a RETRO model trained on the King James Bible, against the controls that attribute a gain to
# retrieval (RETRO[OFF], the baseline, the baseline that trains on the second translation, an unrelated text in
# the database, and the oracle check). Each step is skipped when its output exists; about 100 minutes on 2 cores.
# Every model trains as the recorded runs did: fp32, no retrieval-only text unless --db says so, no edited copies
# (--synthetic auto would give the KJV-alone database some).
#   bash bench/retrieval_experiment.sh          # SEED=1 bash bench/retrieval_experiment.sh: another seed
#   python bench/retrieval_table.py out/exp --png bench/retrieval_experiment.png   # the tables and the figure
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-1337}
O=out/exp$([ "$SEED" = 1337 ] || echo "_seed$SEED")
WEB=bench/texts/web.txt
CONTROL=bench/texts/control.txt

# ---- databases: the KJV (the quick start's), grown by the WEB, by the unrelated control, by both ----
python build_db.py text.txt --retrieval_texts none --dtype float32 --out data/text
grow() {   # grow DB SOURCE_DB TEXT: a copy of SOURCE_DB with TEXT added; embeddings of any database are reused
    [ -f "data/$1/meta.json" ] && return
    rm -rf "data/$1" && cp -r "data/$2" "data/$1" && mkdir -p "data/$1/sources"
    cp -n data/*/sources/*.npy "data/$1/sources/" 2>/dev/null || true    # build_db.py keeps only what it uses
    python build_db.py --add "$3" --out "data/$1"
}
grow kjv_web text "$WEB"
# ---- models: the same decoder, the same seed, the same batches and steps ----
train() {
    [ -f "$1/ckpt.pt" ] ||
        python train.py --retrieval_texts none --dtype float32 --synthetic 0 --out_dir "$@" --seed "$SEED"
}
train "$O/retro_web" --db data/kjv_web
train "$O/baseline" --n_neighbours 0
train "$O/retro" --db data/text
grow kjv_control text "$CONTROL"
grow kjv_web_control kjv_web "$CONTROL"     # the control's embeddings come from data/kjv_control

# ---- evaluation: each RETRO model with every database, no retraining (RETRO[ON], RETRO[OFF], the oracle check) ----
for m in retro retro_web; do
    for db in text kjv_control kjv_web kjv_web_control; do
        grep -qs "\"db\": \"data/$db\"" "$O/$m/eval.jsonl" ||
            python extras/evaluate.py --dtype float32 --out_dir "$O/$m" --db "data/$db"
    done
done
# ---- the baseline that trains on the WEB as well: the KJV's 60 training books and all 66 WEB books as training
# documents, the same 6 held-out KJV books (every 22nd document of 132), its own tokenizer (bpb compares) ----
if [ ! -f data/kjv_plus_web/meta.json ]; then
    python - "$WEB" <<'EOF'
import sys
sep = "<|endoftext|>"
kjv = open("text.txt").read().split(f"\n{sep}\n")
web = open(sys.argv[1]).read().split(f"\n{sep}\n")
held_out = [d for i, d in enumerate(kjv) if i % 10 == 9]
train = [d for i, d in enumerate(kjv) if i % 10 != 9] + web
docs = []
for d in held_out:                  # positions 21, 43, ..., 131 (i % 22 == 21) are held out
    docs += train[:21] + [d]
    train = train[21:]
assert not train and len(docs) == 132
open("data/kjv_plus_web.txt", "w").write(f"\n{sep}\n".join(docs))
EOF
    python build_db.py data/kjv_plus_web.txt --val_every 22 --out data/kjv_plus_web
fi
train "$O/baseline_web" --n_neighbours 0 --data data/kjv_plus_web.txt --db data/kjv_plus_web

python bench/retrieval_table.py "$O"
