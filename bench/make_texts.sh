#!/usr/bin/env bash
# Makes the extra texts of the experiments.
#
#   bash bench/make_texts.sh           (as root) the two extra corpora of the retrieval experiment, from Debian
#                                      packages only; idempotent: each run writes the same bytes (checked against
#                                      the sha256 sums below) and replaces the files whole:
#   bench/texts/web.txt      the World English Bible (public domain), KJV canon and order, formatted like text.txt:
#                            one verse a line as "Ge1:1 text", a line <|endoftext|> between books (66 documents),
#                            so that book i of web.txt is book i of text.txt: a related text (the same verses,
#                            another translation) for retrieval.
#   bench/texts/control.txt  Jane Austen's six novels (public domain), one paragraph a line, a line <|endoftext|>
#                            between chapters (269 documents): an unrelated text of about the same size.
#
#   bash bench/make_texts.sh django    a second kind of training text, with a related text to grow its database
#                                      later: source code, two versions apart. Not kept in the repository (BSD,
#                                      not public domain, and made in a minute): pip fetches the two wheels.
#   data/texts/django32.txt  Django 3.2.25's Python files (BSD licence), one document a file ("# path" first), a line
#                            <|endoftext|> between files (641 documents): the training text.
#   data/texts/django42.txt  the files of Django 4.2.16 that differ from every 3.2 file (619 of 649: 4.0 reformatted
#                            the code base with black, and each version edits it): related text, never trained on,
#                            in which each held-out 3.2 file has its later, edited version.
#   then: python train.py --data data/texts/django32.txt (bench/RESULTS.md, "Teaching a model to read ...")
set -euo pipefail
if [ $# -gt 1 ] || { [ $# = 1 ] && [ "$1" != django ]; }; then
    echo "usage: bash bench/make_texts.sh [django]" >&2
    exit 2
fi
cd "$(dirname "$0")"
export LC_ALL=C.UTF-8

# ---- django32.txt and django42.txt ---------------------------------------------------------------------------------
if [ "${1:-}" = django ]; then
    cd ..
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
    exit
fi

# diatheke prints SWORD modules; sword-text-web is the WEB module (engWEB2015eb, "World English Bible with
# Deuterocanon", WEB 2020 stable text); r-cran-janeaustenr holds the novels as R character vectors (one element
# a line of the Project Gutenberg text), read with Rscript from r-base-core. No recommends: R alone is enough.
PKGS="diatheke sword-text-web r-cran-janeaustenr"
if [ "$(dpkg-query -W -f='${Status}\n' $PKGS 2>/dev/null | grep -c 'install ok installed')" != 3 ]; then
    apt-get update
    apt-get install -y --no-install-recommends $PKGS
fi
dpkg-query -W $PKGS r-base-core    # made with 1.9.0+dfsg-4+b4, 426.0-1, 1.0.0-1

mkdir -p texts
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- web.txt ------------------------------------------------------------------------------------------------------
# "-f internal" prints the module's own OSIS markup, one verse a line after "Book C:V: ". The plain format is not
# used: it glues words that the markup leaves unspaced (e.g. "Godcreated") and repeats stale headings.
diatheke -b engWEB2015eb -f internal -k "Genesis 1:1-Revelation 22:21" > "$tmp/web.osis"
python3 - "$tmp/web.osis" ../text.txt "$tmp/web.txt" <<'EOF'
import re, sys

src, kjv, dst = sys.argv[1:]
# the 66 books of the KJV canon in the KJV's order, as diatheke names them (the deuterocanon is left out)
WEB = ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "I Samuel",
       "II Samuel", "I Kings", "II Kings", "I Chronicles", "II Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
       "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
       "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
       "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "I Corinthians",
       "II Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "I Thessalonians",
       "II Thessalonians", "I Timothy", "II Timothy", "Titus", "Philemon", "Hebrews", "James", "I Peter", "II Peter",
       "I John", "II John", "III John", "Jude", "Revelation of John"]
# text.txt's abbreviation of each book ("Ge", "1Sm", "Mat", ...): the first reference of each of its documents
abbr, new_doc = [], True
for line in open(kjv, encoding="utf-8"):
    if line.strip() == "<|endoftext|>":
        new_doc = True
    elif new_doc:
        abbr.append(re.match(r"(.+?)\d+:\d+ ", line).group(1))
        new_doc = False
assert len(abbr) == len(WEB) == 66, len(abbr)
ABBR = dict(zip(WEB, abbr))

KEY = re.compile(r"(?:\s|<[^>]*>)*(.+?) (\d+):(\d+): ")
TAG = re.compile(r"<(/?)([a-zA-Z]+)[^>]*>")
INLINE = {"w", "q", "name", "seg"}                                  # dropped, their text kept
BREAK = {"l", "lg", "lb", "div", "chapter", "milestone", "list", "item"}   # become a space
books = {b: [] for b in WEB}
for line in open(src, encoding="utf-8"):
    line = line.rstrip("\n")
    if line == "(engWEB2015eb)" or not line:                      # diatheke's closing line
        continue
    line = re.sub(r"<title\b[^>]*>.*?</title>", " ", line)         # psalm titles (stale ones too)
    m = KEY.match(line)
    assert m, line[:200]
    book, ch, vs = m.group(1), m.group(2), m.group(3)
    if book not in books:                                         # deuterocanon
        continue
    body = line[m.end():]
    body = re.split(r'<div\b[^>]*type="book"/>', body)[0]         # the glossary follows Revelation's end
    body = re.sub(r"<speaker>.*?</speaker>", " ", body)           # Song of Solomon's speaker labels
    body = re.sub(r"<note\b.*?</note>", " ", body)                # footnotes (none in this module)
    out, pos = [], 0
    for t in TAG.finditer(body):
        out.append(body[pos:t.start()])
        pos = t.end()
        name = t.group(2)
        if name in BREAK:
            out.append(" ")
        elif name in INLINE:
            # the markup sometimes leaves no space between two words ("God</w><w>created", "Sheol,<w>and"):
            # a word or quotation that starts right after a letter or closing punctuation gets one
            prev = "".join(out)[-1:]
            if not t.group(1) and name in ("w", "q") and prev and not prev.isspace() and prev not in "“‘(—-[":
                out.append(" ")
        else:
            raise SystemExit(f"unknown tag {t.group(0)} in {book} {ch}:{vs}")
    out.append(body[pos:])
    text = " ".join("".join(out).split())
    text = re.sub(r" ([,;:.!?”])", r"\1", text)                  # a few stray spaces of the source ("coins ?")
    assert "<" not in text and ">" not in text, text
    if text:                                                      # versification slots with no text are left out
        books[book].append(f"{ABBR[book]}{ch}:{vs} {text}")
with open(dst, "w", encoding="utf-8", newline="\n") as f:
    f.write("\n<|endoftext|>\n".join("\n".join(books[b]) for b in WEB) + "\n")
EOF

# ---- control.txt --------------------------------------------------------------------------------------------------
# The novels in publication order, one document a chapter (50 + 61 + 48 + 55 + 31 + 24), one paragraph a line
# (wrapped lines joined). Left out: title pages and front matter, chapter and volume headings, section breaks,
# "THE END", transcribers' notes, Northanger Abbey's footnote and closing editor's note; _italics_ marks removed.
Rscript -e 'library(janeaustenr)
for (n in c("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"))
    writeLines(get(n), file.path(commandArgs(TRUE)[1], paste0(n, ".txt")), useBytes = TRUE)' "$tmp"
python3 - "$tmp" "$tmp/control.txt" <<'EOF'
import re, sys
from pathlib import Path

src, dst = Path(sys.argv[1]), sys.argv[2]
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
CHAPTER = re.compile(r"(Chapter|CHAPTER) +([0-9]+|[IVXLC]+)\.?")
docs = []
for n in NOVELS:
    text = (src / f"{n}.txt").read_text(encoding="utf-8")
    text = text.split("\nA NOTE ON THE TEXT\n")[0]                # Northanger Abbey: an editor's note at the end
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    chapters = None                                               # the title page before chapter 1 is left out
    for p in paras:
        if CHAPTER.fullmatch(p):
            chapters = chapters if chapters is not None else []
            chapters.append([])
            continue
        if (chapters is None or not p or re.fullmatch(r"VOLUME [IVX]+", p)        # volume headings
                or re.fullmatch(r"[* ]+", p)                                     # section breaks
                or p.upper() in ("THE END", "FINIS")
                or (p.startswith("[") and "edition" in p)                        # transcribers' notes
                or p.startswith("*")):                                           # a footnote
            continue
        p = p.replace("_", "")                                    # _italics_
        p = re.sub(r"(?<=\S)\*", "", p)                           # footnote mark
        chapters[-1].append(p)
    docs += ["\n".join(c) for c in chapters]
assert len(docs) == 269, len(docs)
with open(dst, "w", encoding="utf-8", newline="\n") as f:
    f.write("\n<|endoftext|>\n".join(docs) + "\n")
EOF

mv "$tmp/web.txt" texts/web.txt
mv "$tmp/control.txt" texts/control.txt
sha256sum texts/web.txt texts/control.txt
if sha256sum -c --quiet - <<'EOF'; then echo "make_texts.sh: both texts as expected"; else
4854507d092a534ac7bae314db1bc3c6a72e9c0b98916e8791b1a3ed03a861b4  texts/web.txt
e0d94136d1e7d03aea1fd7084b5d91921ac926f6e19ebd0afd7592d0de8ad469  texts/control.txt
EOF
    echo "make_texts.sh: the texts differ from the ones made with the package versions noted above" >&2; fi
