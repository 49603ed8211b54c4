"""
The retrieval server: a database folder over HTTP, for generation and evaluation in other processes or on other
machines; `RemoteRetriever(url)` is its client, with the same neighbours token for token as the folder's own
Retriever (extras/sample.py and extras/show.py take --db http://host:port).

    python extras/server.py data/text+web --port 8000       # the quick start's database; Ctrl-C stops
    curl -s localhost:8000/neighbours -d '{"texts": ["And God said, Let there be light"], "k": 2}'

GET /meta (meta.json and the server's limits), GET /tokenizer.json, POST /neighbours with {"chunks": [[ids]]} or
{"texts": [...]} and optionally "k" -> {"ids", "distances", "neighbours"}. Threads share one index: queries that
arrive while a search runs are answered together by the next one (Batcher). Bad requests get a 4xx with a
one-line JSON error, and the server serves on.
"""

import argparse
import contextlib
import json
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenizers import Tokenizer  # noqa: E402

from build_db import DBConfig, DBError, Retriever, db_dir, is_unicode, tokenizer_hash  # noqa: E402

MAX_BODY, MAX_CHUNKS = 1 << 20, 256     # bytes per request body, chunks (or texts) per request


class Batcher:
    """A Retriever shared by threads. One search uses every core, so they search one at a time; but the thread
    that runs answers every query that arrived while it waited, with one embedding call and one search:
    concurrent queries of a chunk each cost little more than one. Each query is checked first, alone."""

    def __init__(self, retriever: Retriever):
        self.retriever, self.waiting = retriever, []
        self.lock, self.waiting_lock = threading.Lock(), threading.Lock()

    def query(self, chunks=None, texts=None, k: int = None) -> dict:
        mine = self.check(chunks, texts, k)
        with self.waiting_lock:
            self.waiting.append(mine)
        with self.lock:
            if "ids" not in mine and "error" not in mine:       # no other thread answered it meanwhile
                with self.waiting_lock:
                    batch, self.waiting = self.waiting, []
                try:
                    found = self.retriever.query(texts=[t for q in batch for t in q["texts"]],
                                                 k=max(q["k"] for q in batch))
                    start = np.cumsum([0] + [len(q["texts"]) for q in batch])
                    for q, a, b in zip(batch, start, start[1:]):
                        q.update({name: v[a:b, :q["k"]] for name, v in found.items()})
                except Exception as e:                          # each waiting thread raises it too
                    for q in batch:
                        q["error"] = e
        if "error" in mine:
            raise mine["error"]
        return {name: mine[name] for name in ("ids", "distances", "neighbours")}

    def check(self, chunks, texts, k) -> dict:
        """query's arguments -> {"texts", "k"}, or a ValueError that says what is wrong with them."""
        r, k = self.retriever, self.retriever.k if k is None else k
        if not (isinstance(k, (int, np.integer)) and 1 <= k <= r.index.ntotal):
            raise ValueError(f"k must be an integer from 1 to {r.index.ntotal} (the chunks in the database), not {k!r}")
        if texts is None:
            chunks, V = np.asarray(chunks), r.meta["vocab_size"]
            if not (chunks.ndim == 2 and chunks.shape[1] == r.M and np.issubdtype(chunks.dtype, np.integer)
                    and (chunks.size == 0 or 0 <= chunks.min() and chunks.max() < V)):
                raise ValueError(f"chunks {chunks.shape} of {chunks.dtype}: expected (B, {r.M}) token ids "
                                 f"in 0..{V - 1}")
            texts = r.tokenizer.decode_batch(chunks.tolist(), skip_special_tokens=True)
        elif isinstance(texts, str) or not all(isinstance(t, str) and is_unicode(t) for t in texts):
            raise ValueError("texts must be a list of strings of valid Unicode (one per query)")
        return dict(texts=list(texts), k=int(k))


class BadRequest(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def parse_query(body: bytes, meta: dict) -> dict:
    """A /neighbours request body -> Batcher.query's arguments, or BadRequest naming what is wrong."""
    M, V, K = meta["corpus"]["chunk_len"], meta["vocab_size"], meta["retrieval"]["k"]
    try:
        q = json.loads(body)
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError is a ValueError; RecursionError: deep nesting
        raise BadRequest(400, f"the body is not JSON: {e}") from None
    unknown = sorted(set(q) - {"chunks", "texts", "k"}) if isinstance(q, dict) else []
    if not isinstance(q, dict) or ("chunks" in q) == ("texts" in q) or unknown:
        raise BadRequest(400, 'the body must be a JSON object with "chunks" (lists of token ids) or "texts" '
                              '(strings), and optionally "k"' + (f", not {unknown}" if unknown else ""))
    k = q.get("k", K)
    if type(k) is not int or not 1 <= k <= K:
        raise BadRequest(400, f'"k" must be an integer from 1 to {K}, not {json.dumps(k)}')
    name = "chunks" if "chunks" in q else "texts"
    items = q[name]
    if not isinstance(items, list) or not items or len(items) > MAX_CHUNKS:
        raise BadRequest(400, f'"{name}" must be a list of 1 to {MAX_CHUNKS} {name}')
    if name == "texts":                 # Batcher.check checks them
        return dict(texts=items, k=k)
    for i, c in enumerate(items):
        if not isinstance(c, list) or len(c) != M or not all(type(t) is int for t in c):
            raise BadRequest(400, f"chunk {i} must be a list of {M} integer token ids (this database's chunk_len)")
        if not all(0 <= t < V for t in c):
            raise BadRequest(400, f"chunk {i} holds a token id outside 0..{V - 1} (this database's vocabulary)")
    return dict(chunks=np.array(items, dtype=np.int64), k=k)


def make_server(db, host: str = "127.0.0.1", port: int = 8000, device: str = "auto"):
    """A threaded HTTP server of the database folder db (port 0: a free one), which reads only that folder."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    retriever = Batcher(Retriever(db, device))
    meta = {**retriever.retriever.meta, "server": dict(max_body_bytes=MAX_BODY, max_chunks=MAX_CHUNKS)}
    served = {"/meta": meta, "/tokenizer.json": (Path(db) / "tokenizer.json").read_bytes()}      # what GET serves

    class Handler(BaseHTTPRequestHandler):
        timeout = 60                    # seconds a client may take to send its request

        def answer(self, code: int, body, kind: str = "application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path in served:
                self.answer(200, served[self.path])
            else:
                self.answer(404, {"error": f"no {self.path}: GET /meta, GET /tokenizer.json, POST /neighbours"})

        def do_POST(self):
            try:
                if self.path != "/neighbours":
                    raise BadRequest(404, f"no {self.path}: POST /neighbours")
                size = self.headers.get("Content-Length", "")
                if not size.isdigit():
                    raise BadRequest(411, "the request needs a Content-Length header")
                if int(size) > MAX_BODY:
                    left = int(size) if int(size) <= 64 * MAX_BODY else 0   # read a body up to 64 MiB, so that
                    while left > 0 and self.rfile.read(min(left, 1 << 16)):  # its sender gets this answer and
                        left -= 1 << 16                                     # not a broken pipe
                    self.close_connection = True
                    raise BadRequest(413, f"the body has {int(size):,} bytes, more than {MAX_BODY:,}: send fewer "
                                          f"chunks per request")
                try:
                    body = self.rfile.read(int(size))
                except TimeoutError:
                    self.close_connection = True
                    raise BadRequest(408, f"the body's {size} bytes did not arrive within {self.timeout} s") from None
                r = retriever.query(**parse_query(body, meta))
                self.answer(200, {name: v.tolist() for name, v in r.items()})
            except (BadRequest, ValueError) as e:      # ValueError: Batcher.check refused the arguments
                self.answer(getattr(e, "code", 400), {"error": str(e)})
            except Exception as e:                      # a bug, not the request's fault: say so, and serve on
                self.answer(500, {"error": f"{type(e).__name__}: {e}"})

        def send_error(self, code, message=None, explain=None):  # http.server's own errors (501, a bad request
            self.close_connection = True                         # line) in JSON too
            self.answer(code, {"error": message or str(code)})

        def log_request(self, code="-", size="-"):      # errors only: a generator sends one request per chunk
            if str(code)[0] != "2":
                super().log_request(code, size)

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise DBError(f"cannot listen on {host}:{port}: {e.strerror}: pass another --port (0: any free one)") from None
    server.daemon_threads = True
    return server


# ---- the client -------------------------------------------------------------------------------------------

class RemoteRetriever(Retriever):
    """The client: a Retriever whose database is served by this server at url (http://host:port): the
    same neighbours, token for token; the database's metadata and tokenizer come from the server too."""

    def __init__(self, url: str, timeout: float = 120):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.meta = meta = self.request("/meta")
        self.M, self.k = meta["corpus"]["chunk_len"], meta["retrieval"]["k"]
        text = self.request("/tokenizer.json")
        if tokenizer_hash(None, text) != meta["tokenizer_sha256"]:
            raise DBError(f"{self.url} sent a tokenizer that does not match its metadata: restart the server")
        self.tokenizer = Tokenizer.from_str(text)

    def request(self, path: str, body: dict = None):
        data = None if body is None else json.dumps(body).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, data, {
                    "Content-Type": "application/json"}), timeout=self.timeout) as r:
                answer = r.read().decode()
        except urllib.error.HTTPError as e:
            raise DBError(f"{self.url}{path} answered {e.code}: {e.read().decode(errors='replace').strip()}") from None
        except (urllib.error.URLError, OSError) as e:
            raise DBError(f"cannot reach a retrieval server at {self.url} ({getattr(e, 'reason', e)}): start one "
                          f"with python extras/server.py DB --port PORT") from None
        return answer if path == "/tokenizer.json" else json.loads(answer)

    def query(self, chunks=None, texts=None, k: int = None) -> dict:
        key, items = ("chunks", chunks.tolist()) if texts is None else ("texts", list(texts))
        k, most = self.k if k is None else k, self.meta["server"]["max_chunks"]
        out = dict(ids=np.zeros((0, k), np.int64), distances=np.zeros((0, k), np.float32),
                   neighbours=np.zeros((0, k, 2 * self.M), np.int64))
        for i in range(0, len(items), most):                    # as many requests as the server's limit needs
            r = self.request("/neighbours", {key: items[i:i + most], "k": k})
            out = {name: np.concatenate((a, np.array(r[name], a.dtype).reshape(-1, *a.shape[1:])))
                   for name, a in out.items()}
        return out


def is_server(db) -> bool:
    """Is db the address of a retrieval server (python extras/server.py) rather than a database folder?"""
    return str(db).startswith(("http://", "https://"))


def connect(db, device: str = "auto") -> Retriever:
    """A database folder, or the http://host:port address of a server: a Retriever either way."""
    return RemoteRetriever(str(db)) if is_server(db) else Retriever(db, device)


def main(argv=None):
    p = argparse.ArgumentParser(description="Serve a RETRO retrieval database over HTTP.")
    p.add_argument("db", nargs="?", default=str(db_dir(DBConfig())), help="the database folder (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="the port (0: any free one)")
    p.add_argument("--device", default="auto", help="the embedder's device")
    args = p.parse_args(argv)
    try:
        server = make_server(args.db, args.host, args.port, args.device)
    except DBError as e:
        sys.exit(f"server.py: error: {e}")
    host, port = server.server_address[:2]
    print(f"serving {args.db} at http://{host}:{port} (GET /meta, GET /tokenizer.json, POST /neighbours); "
          f"Ctrl-C stops", flush=True)
    with server, contextlib.suppress(KeyboardInterrupt):          # the server closes when it ends
        server.serve_forever()


if __name__ == "__main__":
    main()
