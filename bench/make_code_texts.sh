#!/usr/bin/env bash
# A second kind of training text, with a related text to grow its database later: source code, two versions apart.
#   data/texts/django32.txt  Django 3.2.25's Python files (BSD licence), one document a file ("# path" first), a line
#                            <|endoftext|> between files (641 documents): the training text.
#   data/texts/django42.txt  the files of Django 4.2.16 that differ from every 3.2 file (619 of 649: 4.0 reformatted
#                            the code base with black, and each version edits it): related text, never trained on,
#                            in which each held-out 3.2 file has its later, edited version.
# Not kept in the repository (BSD, not public domain, and made in a minute): pip fetches the two wheels.
#   bash bench/make_code_texts.sh && python train.py --data data/texts/django32.txt --synthetic 0.5 ...
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for v in 3.2.25 4.2.16; do pip download --quiet --no-deps -d "$tmp" "django==$v"; done
mkdir -p data/texts
python3 - "$tmp" data/texts <<'EOF'
import sys, zipfile
from pathlib import Path

tmp, out = (Path(a) for a in sys.argv[1:])


def files(wheel):                   # path -> source of every non-empty .py file, translations left out
    with zipfile.ZipFile(next(tmp.glob(wheel))) as z:
        return {n: z.read(n).decode("utf-8") for n in sorted(z.namelist())
                if n.endswith(".py") and "/locale/" not in n and z.read(n).strip()}


old, new = files("Django-3.2*.whl"), files("Django-4.2*.whl")
changed = {n: s for n, s in new.items() if s not in set(old.values())}
for name, docs in (("django32.txt", old), ("django42.txt", changed)):
    (out / name).write_text("\n<|endoftext|>\n".join(f"# {n}\n{s}" for n, s in docs.items()), encoding="utf-8")
    print(f"{out / name}: {len(docs)} files")
EOF
