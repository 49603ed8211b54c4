"""The extras' specification: the retrieval server (extras/server.py), sampling with the neighbours shown, chosen or
typed (extras/sample.py), evaluation with any database (extras/evaluate.py), a look inside a database
(extras/show.py) and a build in two processes (extras/build_parallel.py). `pytest` runs it with test_retro.py,
whose tiny databases, trained tiny model and helpers it imports: each is built once for both files. The slow tests,
runs under torchrun, say so in their docstrings.
"""

import ast
import contextlib
import http.client
import json
import math
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the repository root, as the extras do
import build_db  # noqa: E402
import train  # noqa: E402
from extras import evaluate as evaluate_tool  # noqa: E402
from extras import sample as sample_tool  # noqa: E402
from extras import server as retrieval_server  # noqa: E402
from extras import show as show_tool  # noqa: E402
from retro import RETRO, RetroConfig  # noqa: E402
from test_retro import (DB_M, DB_SEQ, TORCHRUNS, load, report_numbers, same_embeddings, train_error,  # noqa: E402
                        twin_share)
from test_retro import baseline, grown_db, m8_db, multi_db, other_db, torchruns, trained  # noqa: E402,F401 (fixtures)


def sample_error(capsys, *argv):
    """extras/sample.py's one line of error, as train_error gets train.py's."""
    return train_error(capsys, *argv, main=sample_tool.main, prog="sample.py")


def evaluate_error(capsys, *argv):
    return train_error(capsys, *argv, main=evaluate_tool.main, prog="evaluate.py")


# ---- the retrieval server ----

@contextlib.contextmanager
def serving(db):
    """python extras/server.py, in a thread of this process, on a free localhost port: its address."""
    server = retrieval_server.make_server(db, "127.0.0.1", 0, "cpu")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served(grown_db):
    """grown_db (training text and two retrieval-only texts) served, with a local Retriever of the same folder."""
    with serving(grown_db.out) as url:
        yield url, build_db.Retriever(grown_db.out, device="cpu")


def post(url, body, path="/neighbours", headers=None):
    """A raw request: (status, parsed JSON answer)."""
    host, port = url[len("http://"):].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request("POST" if body is not None else "GET", path, data if body is not None else None, headers or {})
    r = c.getresponse()
    answer = json.loads(r.read())
    c.close()
    return r.status, answer


def test_remote_retrieval_equals_local_neighbours_and_greedy_samples(trained, grown_db, served, capsys):
    url, local = served
    remote = retrieval_server.RemoteRetriever(url)
    assert remote.meta["tokenizer_sha256"] == local.meta["tokenizer_sha256"] and (remote.M, remote.k) == (DB_M, 2)
    stream = load(grown_db, "val_tokens").reshape(-1, DB_M)
    chunks = np.concatenate([stream[:5], np.random.default_rng(0).integers(0, 512, (3, DB_M))])
    want, got = local.query(chunks), remote.query(chunks)
    assert np.array_equal(want["ids"], got["ids"]) and np.array_equal(want["neighbours"], got["neighbours"])
    assert np.allclose(want["distances"], got["distances"], atol=1e-6)
    assert (want["ids"] >= build_db.load_meta(grown_db.out)["n_train_chunks"]).any()   # retrieval-only texts too
    texts = ["Obadiah saw a vision concerning Edom", "Grace be with you all"]
    assert np.array_equal(local.query(texts=texts)["ids"], remote.query(texts=texts)["ids"])
    assert np.array_equal(local.query(texts=texts)["ids"][:, :1], remote.query(texts=texts, k=1)["ids"])
    out, _ = trained
    greedy = ["--sample", "Obad1:1 The vision of Obadiah", "--out_dir", str(out), "--top_k", "1",
              "--max_new_tokens", "40", "--device", "cpu", "--show_neighbours"]
    samples = {}
    for db in (grown_db.out, url):
        samples[db] = sample_tool.main(greedy + ["--db", db]), capsys.readouterr().out
    assert samples[url] == samples[grown_db.out]                # the same text and the same neighbours shown
    assert len(re.findall(r"--- chunk \d+:", samples[url][1])) >= 2


def test_evaluation_through_a_server_retrieves_the_validation_neighbours_remotely(trained, grown_db, served, capsys):
    """evaluate.py --db http://...: the model's own held-out text, its neighbours found by the server; the same
    numbers as a local evaluation whose validation neighbours are retrieved the same way."""
    url, local = served
    out, _ = trained
    remote = evaluate_tool.main(["--out_dir", str(out), "--db", url, "--device", "cpu", "--dtype", "float32"])
    assert url in capsys.readouterr().out
    assert json.loads((out / "eval.jsonl").read_text().splitlines()[-1])["db"] == url
    cfg = train.TrainConfig(block_size=DB_SEQ, chunk_len=DB_M)
    data = train.Data(build_db.open_db(grown_db.out), cfg)
    stored = np.asarray(data.neighbours["val"])
    evaluate_tool.retrieve_val(data, local)
    assert (np.asarray(data.neighbours["val"]) == stored).all(-1).all(-1).mean() > 0.9   # fp16 embeddings: ~all equal
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    model = RETRO(RetroConfig(**ckpt["model_config"])).eval()
    model.load_state_dict(ckpt["model"])
    data.cfg = replace(cfg, **{k: ckpt["train_config"][k] for k in ("n_neighbours", "batch_size")})
    r = train.evaluate(model, data, contextlib.nullcontext(), "cpu")
    assert r["on"] == pytest.approx(remote["on"], rel=1e-5) and r["off"] == pytest.approx(remote["off"], rel=1e-5)


BAD_REQUESTS = [   # (body, path, status, words in the error)
    (b'{"chunks": [[1, 2', "/neighbours", 400, "not JSON"),
    (b"\xff\xfe", "/neighbours", 400, "not JSON"),
    ([[1] * DB_M], "/neighbours", 400, "JSON object"),
    ({"chunks": [[1] * DB_M], "texts": ["a"]}, "/neighbours", 400, "JSON object"),
    ({"texts": ["a"], "top_k": 1}, "/neighbours", 400, "not ['top_k']"),
    ({"chunks": "ruth"}, "/neighbours", 400, "list of 1 to"),
    ({"chunks": []}, "/neighbours", 400, "list of 1 to"),
    ({"chunks": [[1] * DB_M] * (retrieval_server.MAX_CHUNKS + 1)}, "/neighbours", 400, "list of 1 to"),
    ({"chunks": [[1] * (DB_M - 1)]}, "/neighbours", 400, f"list of {DB_M} integer"),
    ({"chunks": [[1.5] * DB_M]}, "/neighbours", 400, f"list of {DB_M} integer"),
    ({"chunks": [[True] * DB_M]}, "/neighbours", 400, f"list of {DB_M} integer"),
    ({"chunks": [[512] * DB_M]}, "/neighbours", 400, "outside 0..511"),
    ({"chunks": [[-1] * DB_M]}, "/neighbours", 400, "outside 0..511"),
    ({"texts": [3]}, "/neighbours", 400, "strings"),
    (b'{"texts": ["\\ud800"]}', "/neighbours", 400, "valid Unicode"),        # a lone surrogate: not encodable
    (b"[" * 100_000 + b"]" * 100_000, "/neighbours", 400, "not JSON"),       # nested past Python's recursion limit
    ({"texts": ["a"], "k": 3}, "/neighbours", 400, '"k" must be an integer from 1 to 2'),
    (b"x" * (retrieval_server.MAX_BODY + 1), "/neighbours", 413, "more than"),
    ({"texts": ["a"]}, "/search", 404, "POST /neighbours"),
    (None, "/index.faiss", 404, "GET /meta"),
    (None, "/meta.json", 404, "GET /meta"),                                 # nothing outside the database is served
    (None, "/../meta.json", 404, "GET /meta"),
    (None, "/%2e%2e/text.txt", 404, "GET /meta"),
    (None, "/train_tokens.npy", 404, "GET /meta"),
]


@pytest.mark.parametrize("body, path, status, words", BAD_REQUESTS, ids=[f"{i}-{b[3][:12]}" for i, b in
                                                                         enumerate(BAD_REQUESTS)])
def test_a_bad_request_gets_a_4xx_with_one_line_and_the_server_keeps_serving(served, grown_db, body, path, status,
                                                                             words):
    url, local = served
    code, answer = post(url, body, path)
    assert code == status and set(answer) == {"error"} and words in answer["error"] and "\n" not in answer["error"]
    chunks = load(grown_db, "val_tokens").reshape(-1, DB_M)[3:5]
    code, answer = post(url, {"chunks": chunks.tolist()})
    assert code == 200 and answer["ids"] == local.query(chunks)["ids"].tolist()


def test_a_request_without_a_length_is_refused(served):
    url, _ = served
    host, port = url[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /neighbours HTTP/1.0\r\n\r\n")
        assert s.makefile("rb").readline().split()[1] == b"411"


def test_a_slow_body_or_another_method_gets_a_json_error(grown_db):
    server = retrieval_server.make_server(grown_db.out, "127.0.0.1", 0, "cpu")
    server.RequestHandlerClass.timeout = 0.5                            # seconds a client may take; 60 by default
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for raw, status in [(b"POST /neighbours HTTP/1.0\r\nContent-Length: 100\r\n\r\n{}", b"408"),
                            (b"PUT /meta HTTP/1.0\r\n\r\n", b"501")]:
            with socket.create_connection(server.server_address[:2], timeout=30) as s:
                s.sendall(raw)
                head, _, body = s.makefile("rb").read().partition(b"\r\n\r\n")
            assert head.split()[1] == status and set(json.loads(body)) == {"error"}, head
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_under_concurrent_clients_answers_every_request_as_local_retrieval_does(served, grown_db):
    """8 clients, 12 requests each of 1 to 4 chunks: every answer equals local retrieval, none fails."""
    url, local = served
    chunks = load(grown_db, "train_tokens").reshape(-1, DB_M)[::7][:40]
    want = local.query(chunks)
    rng = np.random.default_rng(0)
    jobs = [rng.choice(len(chunks), rng.integers(1, 5), replace=False) for _ in range(96)]

    def ask(rows):
        return rows, post(url, {"chunks": chunks[rows].tolist()})
    with ThreadPoolExecutor(8) as pool:
        for rows, (code, answer) in pool.map(ask, jobs):
            assert code == 200 and answer["ids"] == want["ids"][rows].tolist()
            assert answer["neighbours"] == want["neighbours"][rows].tolist()


def test_concurrent_queries_share_embedding_calls_and_each_gets_its_own_answer_or_the_error(grown_db):
    """Threads that query while another embeds are answered together by the next one to run: fewer embedding
    calls than queries, each query's answer as if it ran alone; an error reaches every waiting query."""
    local = build_db.Retriever(grown_db.out, device="cpu")
    retriever = retrieval_server.Batcher(local)
    chunks = load(grown_db, "val_tokens").reshape(-1, DB_M)[:8].astype(np.int64)
    alone = [local.query(chunks[i:i + 1], k=1 + i % 2) for i in range(8)]
    embed, calls = local.embedder, []

    def slow(texts):                    # long enough that the other threads queue up behind the first
        calls.append(len(texts))
        time.sleep(0.2)
        return embed(texts)
    local.embedder = type("Slow", (), {"__call__": staticmethod(slow), "dim": embed.dim})()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: retriever.query(chunks[i:i + 1], k=1 + i % 2), range(8)))
    assert len(calls) < 8 and sum(calls) == 8
    for a, b in zip(alone, together):
        assert a["ids"].shape == b["ids"].shape and np.array_equal(a["ids"], b["ids"])
        assert np.array_equal(a["neighbours"], b["neighbours"])
        assert np.allclose(a["distances"], b["distances"], atol=1e-5)     # padded otherwise when batched: ~1e-6

    def broken(texts):
        time.sleep(0.2)
        raise RuntimeError("the embedder broke")
    local.embedder = type("Broken", (), {"__call__": staticmethod(broken), "dim": embed.dim})()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(retriever.query, chunks[i:i + 1]) for i in range(4)]
        for f in futures:
            with pytest.raises(RuntimeError, match="the embedder broke"):
                f.result(timeout=60)


def test_remote_queries_of_any_size_equal_local_ones(served, grown_db, monkeypatch):
    """More chunks than a request may hold go in several requests (to a server of at most 8 chunks a request here,
    256 by default), and no chunks in none."""
    _, local = served
    monkeypatch.setattr(retrieval_server, "MAX_CHUNKS", 8)
    with serving(grown_db.out) as url:
        remote = retrieval_server.RemoteRetriever(url)
        chunks = load(grown_db, "val_tokens").reshape(-1, DB_M)[:20].astype(np.int64)
        assert len(chunks) > remote.meta["server"]["max_chunks"] == 8          # more than one request holds
        for batch in (chunks, chunks[:0]):
            a, b = remote.query(batch), local.query(batch)
            assert all(a[n].shape == b[n].shape and np.array_equal(a[n], b[n]) for n in ("ids", "neighbours"))


def test_a_bad_query_fails_alone_with_what_is_wrong(grown_db):
    """Queries are checked before they join a batch: a bad one raises in its own thread only, and says why."""
    retriever = retrieval_server.Batcher(build_db.Retriever(grown_db.out, device="cpu"))
    chunks = load(grown_db, "val_tokens").reshape(-1, DB_M)[:4].astype(np.int64)
    V, n = retriever.retriever.meta["vocab_size"], retriever.retriever.index.ntotal
    for kw, words in [(dict(chunks=chunks, k=0), "k must be"), (dict(chunks=chunks, k=n + 1), "k must be"),
                      (dict(chunks=chunks, k=-1), "k must be"), (dict(chunks=chunks[:, 1:]), "expected"),
                      (dict(chunks=chunks + V), "token ids in"), (dict(texts="one string"), "list of strings"),
                      (dict(texts=[None]), "list of strings")]:
        with pytest.raises(ValueError, match=words):
            retriever.query(**kw)
    alone = retriever.query(chunks)["ids"]
    with ThreadPoolExecutor(5) as pool:
        good = [pool.submit(retriever.query, chunks) for _ in range(4)]
        bad = pool.submit(retriever.query, texts=[None])
        assert all(np.array_equal(f.result(timeout=60)["ids"], alone) for f in good)
        with pytest.raises(ValueError):
            bad.result(timeout=60)


def test_a_server_whose_database_does_not_fit_the_model_is_refused_in_one_line(trained, other_db, m8_db, capsys):
    """Another text, so another tokenizer: refused before any retrieval; the same tokenizer and chunks of 8 tokens:
    the line a database folder gets (test_retro.py); a server that is not there: one line."""
    out, _ = trained
    h = build_db.load_meta(m8_db.out)["tokenizer_sha256"][:8]
    with serving(m8_db.out) as url:
        msg = sample_error(capsys, "--sample", "x", "--out_dir", str(out), "--db", url)
        assert f"chunk_len {DB_M}; {url} has tokenizer {h} and chunk_len 8" in msg
    with serving(other_db.out) as url:
        assert "was trained with tokenizer" in sample_error(capsys, "--sample", "x", "--out_dir", str(out), "--db", url)
        assert "was trained with tokenizer" in evaluate_error(capsys, "--out_dir", str(out), "--db", url)
    assert "cannot reach a retrieval server" in sample_error(capsys, "--sample", "x", "--out_dir", str(out),
                                                             "--db", url)
    for mode in ([], ["--resume"]):                                     # train.py reads database folders only
        assert "extras/sample.py (or evaluate.py) --db URL" in train_error(capsys, "--db", url, "--out_dir", str(out),
                                                                         *mode)


def test_a_busy_port_is_one_clear_error(multi_db):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(build_db.DBError, match="cannot listen on .*: pass another --port"):
            retrieval_server.make_server(multi_db.out, port=busy.getsockname()[1], device="cpu")


# ---- sampling with the neighbours shown, chosen or typed (extras/sample.py) ----

def test_sampling_from_the_checkpoint_shows_each_chunks_neighbours(trained, multi_db, capsys):
    out, _ = trained
    text = sample_tool.main(["--sample", "Ruth1:1 Now it came to pass", "--show_neighbours", "--out_dir", str(out),
                             "--db", multi_db.out, "--device", "cpu"])
    assert text.startswith("Ruth1:1 Now it came to pass") and len(text) > len("Ruth1:1 Now it came to pass")
    printed = capsys.readouterr().out
    assert len(re.findall(r"--- chunk \d+:", printed)) >= 2 and "neighbour 1:" in printed and "--- sample:" in printed


def neighbours_seen(printed, K=2):
    """--show_neighbours' output -> for each chunk, the K neighbour texts (N + continuation) it printed."""
    pairs = re.findall(r"neighbour \d+: (.*)\n +continues: (.*)", printed)
    return [[ast.literal_eval(n) + ast.literal_eval(f) for n, f in pairs[u:u + K]] for u in range(0, len(pairs), K)]


def test_a_neighbours_file_gives_each_chunk_the_neighbours_it_says(trained, multi_db, tmp_path, capsys):
    """Chunk 0 retrieves (null), chunk 1 reads one text as both neighbours, chunk 2 two texts, chunk 3 none:
    the sample is the model's generation with exactly those tokens as neighbours, and not the retrieved one's."""
    out, _ = trained
    boaz = "And Boaz said unto Ruth, Hearest thou not, my daughter? Go not to glean in another field, " * 2
    entries = [None, boaz, ["Jonah rose up to flee unto Tarshish", "Grace be with you all. Amen."], ""]
    (tmp_path / "nb.json").write_text(json.dumps(entries))
    run = ["--sample", "Ruth1:1 Now it came to pass in the days when the judges ruled", "--out_dir", str(out),
           "--db", multi_db.out, "--device", "cpu", "--max_new_tokens", "56", "--show_neighbours"]
    sample_tool.main(run)
    shown = neighbours_seen(capsys.readouterr().out)
    chosen, shown_chosen = sample_tool.main(run + ["--neighbours_file", str(tmp_path / "nb.json")]), \
        neighbours_seen(capsys.readouterr().out)
    assert len(shown) == len(shown_chosen) >= 4 and shown_chosen[0] == shown[0]          # null: retrieved
    tok = Tokenizer.from_file(str(Path(multi_db.out) / "tokenizer.json"))
    R = 2 * DB_M
    as_tokens = lambda text: (tok.encode(text).ids + [0] * R)[:R]           # cut or padded to 2M tokens, pad = 0
    assert tok.encode(shown_chosen[1][0]).ids == as_tokens(boaz) and shown_chosen[1][0] == shown_chosen[1][1]
    assert [tok.decode(as_tokens(t)) for t in entries[2]] == shown_chosen[2] == entries[2]     # padding not shown
    assert shown_chosen[3] == ["", ""] and shown_chosen[1] != shown[1]
    (tmp_path / "long.json").write_text(json.dumps(entries + [None] * 20))    # more entries than chunks: said
    assert sample_tool.main(run + ["--neighbours_file", str(tmp_path / "long.json")]) == chosen
    assert re.search(r"note: --neighbours_file has 24 entries; .* were not used", capsys.readouterr().err)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    model = RETRO(RetroConfig(**ckpt["model_config"])).eval()
    model.load_state_dict(ckpt["model"])
    local, chunk_number = build_db.Retriever(multi_db.out, device="cpu"), iter(range(100))

    def retrieve(chunk):                                                    # what the file says, chunk by chunk
        e = entries[u] if (u := next(chunk_number)) < len(entries) else None
        e = [e] * 2 if isinstance(e, str) else e
        return local(chunk)[:, :2] if e is None else torch.tensor([[as_tokens(t) for t in e]])
    torch.manual_seed(1337)                                                 # train.py's seed, temperature, top_k
    expected = model.generate(torch.tensor([tok.encode(run[1]).ids]), 56, retrieve, 0.8, 50)
    assert chosen == tok.decode(expected[0].tolist(), skip_special_tokens=False)


def test_choosing_neighbours_at_the_keyboard_is_the_same_as_a_file_saying_it(trained, multi_db, tmp_path, capsys,
                                                                              monkeypatch):
    out, _ = trained
    boaz = "And Boaz said unto Ruth, Hearest thou not, my daughter? Go not to glean in another field"
    typed = iter(["", boaz, "-"])

    def keyboard(prompt):                               # then the end of input: the rest keep what was retrieved
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", keyboard)
    run = ["--sample", "Ruth1:1 Now it came to pass in the days when the judges ruled", "--out_dir", str(out),
           "--db", multi_db.out, "--device", "cpu", "--max_new_tokens", "56"]
    at_keyboard = sample_tool.main(run + ["--choose_neighbours"])
    printed = capsys.readouterr().out
    assert len(re.findall(r"--- chunk \d+:", printed)) >= 4 and boaz in printed     # shown, and echoed when piped
    (tmp_path / "nb.json").write_text(json.dumps([None, boaz, ""]))
    assert at_keyboard == sample_tool.main(run + ["--neighbours_file", str(tmp_path / "nb.json")])


# name: (the checkpoint: of the trained run, or of the baseline trained without retrieval; the flags after
# --sample x --db (the test database); what the file {nb} holds; the words the one line must hold)
BAD_SAMPLES = {
    "a neighbours file that is not JSON": ("trained", ["--neighbours_file", "{nb}"], "{", "Expecting"),
    "a neighbours file that is not a list": ("trained", ["--neighbours_file", "{nb}"], '{"a": 1}', "JSON list"),
    "one text for two neighbours": ("trained", ["--neighbours_file", "{nb}"], '[["one"]]', "list of 2"),
    "an entry that is not a text": ("trained", ["--neighbours_file", "{nb}"], "[3]", "entry 0"),
    "neighbours to choose without retrieval": ("baseline", ["--choose_neighbours"], "", "trained without retrieval"),
    "a neighbours file without retrieval": ("baseline", ["--neighbours_file", "nb.json"], "",
                                            "trained without retrieval"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_a_bad_sample_fails_with_one_clear_line(case, trained, baseline, multi_db, tmp_path, capsys):
    run, flags, entries, words = BAD_SAMPLES[case]
    out, _ = trained if run == "trained" else baseline
    (tmp_path / "nb.json").write_text(entries)
    flags = [f.format(nb=tmp_path / "nb.json") for f in flags]
    assert words in sample_error(capsys, "--sample", "x", "--out_dir", str(out), "--db", multi_db.out, *flags)


# ---- a look inside a database (extras/show.py) ----

def test_the_look_inside_command_prints_a_chunks_stored_neighbours_and_a_texts_nearest_chunks(multi_db, capsys):
    tok = Tokenizer.from_file(str(Path(multi_db.out) / "tokenizer.json"))
    c = 5
    show_tool.main([f"train:{c}", "--db", multi_db.out])
    printed = capsys.readouterr().out
    ids, nb = load(multi_db, "train_neighbour_ids")[c], load(multi_db, "train_neighbours")[c]
    assert [int(i) for i in re.findall(r"neighbour \d: chunk (\d+) \(training text\)", printed)] == ids.tolist()
    for j in range(2):
        assert repr(tok.decode(nb[j, :DB_M].tolist())) in printed and repr(tok.decode(nb[j, DB_M:].tolist())) in printed
    text = tok.decode(load(multi_db, "train_tokens")[c * DB_M:(c + 1) * DB_M].tolist())
    show_tool.main([text, "--db", multi_db.out])
    assert re.search(rf"neighbour 0: chunk {c} \(training text\), distance 0\.000", capsys.readouterr().out)
    for bad in ("val:100000", "train:-1", "val: -2"):
        with pytest.raises(SystemExit) as e:
            show_tool.main([bad, "--db", multi_db.out])
        assert ":0 to " in str(e.value.code) and "\n" not in str(e.value.code), bad


def test_text_that_is_not_utf8_is_one_clear_error_of_the_look_inside_command(multi_db, capsys):
    with pytest.raises(SystemExit) as e:
        show_tool.main(["And\udcff", "--db", multi_db.out])                # how Python passes a byte 0xff
    assert e.value.code == 2 and "not valid UTF-8" in capsys.readouterr().err


# ---- a build in two processes (extras/build_parallel.py) ----

FAIL_IN_PROCESS_1 = ("real = build_db.Embedder.__init__\n"            # process 1 fails its first task, embedding
                     "def failing(self, *args, **kwargs):\n"
                     "    if os.environ['RANK'] == '1':\n"
                     "        raise RuntimeError('simulated failure')\n"
                     "    real(self, *args, **kwargs)\n"
                     "build_db.Embedder.__init__ = failing")


def build_parallel_script(before=""):
    """A script that runs extras/build_parallel.py on its arguments, after the code `before`."""
    return (f"import os, sys\nsys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\nimport build_db\n"
            f"from extras import build_parallel\n{before}\nbuild_parallel.main(sys.argv[1:])\n")


FLAGS = ["--chunk_len", str(DB_M), "--seq_len", str(DB_SEQ), "--vocab_size", "512"]
TORCHRUNS[__name__] = {                 # started with test_retro.py's, at the first request of the fixture torchruns
    "build": (build_parallel_script(), lambda fixture: [fixture("other_db").text, "--out", "{tmp}/two",
                                                        "--retrieval_texts", fixture("other_db").retrieval_texts,
                                                        "--k", "2", "--val_every", "3", "--dtype", "float32", *FLAGS]),
    "build fails": (build_parallel_script(FAIL_IN_PROCESS_1), lambda fixture: [fixture("other_db").text, "--out",
                                                                               "{tmp}/db", *FLAGS]),
}


def test_a_build_on_two_processes_is_the_single_process_build(other_db, torchruns):
    """Slow, end to end: torchrun --nproc_per_node=2 extras/build_parallel.py: training text and two retrieval-only
    texts, embedded and searched in two shares; the same files, tokens, neighbours and metadata, embeddings equal up
    to float16 rounding."""
    folder, r = torchruns["build"]
    assert r.returncode == 0, r.stderr[-20000:]
    a, b = Path(other_db.out), folder / "two"
    assert len(build_db.load_meta(a)["sources"]) == 2
    files = sorted(str(f.relative_to(a)) for f in a.rglob("*") if f.is_file())
    assert files == sorted(str(f.relative_to(b)) for f in b.rglob("*") if f.is_file())
    for f in files:
        if f.endswith("_emb.npy"):
            assert same_embeddings(np.load(a / f), np.load(b / f)), f
        elif f.endswith(".npy"):
            assert np.array_equal(np.load(a / f), np.load(b / f)), f
    assert build_db.load_meta(a) == build_db.load_meta(b)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert r.stdout.count("wrote ") == 1                # process 0 speaks for both


def test_a_process_that_fails_leaves_no_database_and_is_named(torchruns):
    """Slow, end to end: process 1 of a build under torchrun fails embedding."""
    folder, r = torchruns["build fails"]
    assert r.returncode != 0
    assert "build_parallel.py: error: process 1 of 2 failed embedding" in r.stderr and "simulated failure" in r.stderr
    assert not (folder / "db" / "meta.json").exists() and not list((folder / "db").glob("*_emb.npy"))


# ---- a trained model: sampling (extras/sample.py) and evaluation with any database (extras/evaluate.py) ----

def test_sampling_and_evaluation_without_data_or_db_use_the_database_the_model_was_trained_with(trained, tmp_path,
                                                                                                 monkeypatch):
    out, _ = trained
    monkeypatch.chdir(tmp_path)                         # no text.txt here: the default text's database cannot be built
    assert sample_tool.main(["--sample", "Ruth1:1", "--out_dir", str(out), "--device", "cpu"]).startswith("Ruth1:1")
    assert set(evaluate_tool.main(["--out_dir", str(out), "--device", "cpu"])) == {"on", "off", "probe", "chunks",
                                                                                   "by_overlap"}
    assert not (tmp_path / "data").exists()


def test_an_empty_prompt_samples_a_new_document(trained, multi_db):
    out, _ = trained
    text = sample_tool.main(["--sample", "", "--out_dir", str(out), "--db", multi_db.out, "--device", "cpu"])
    assert text.startswith("<|endoftext|>") and len(text) > len("<|endoftext|>")


def test_evaluation_repeats_the_evaluation_at_the_end_of_training(trained, multi_db):
    out, _ = trained                                    # trained with --batch_size 4 (the default is 8) in fp32
    r = evaluate_tool.main(["--out_dir", str(out), "--db", multi_db.out, "--device", "cpu", "--dtype", "float32"])
    final = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["step"] == 40 and r["on"][0] == pytest.approx(final["loss_on"], rel=1e-6)
    assert set(final["probe"]) == {"none", "oracle"}                   # what train.py's report reads
    assert {k: r["probe"][k] for k in final["probe"]} == pytest.approx(final["probe"], rel=1e-6)  # same batches


def test_evaluation_with_a_grown_database_retrieves_from_the_added_text(trained, multi_db, grown_db, capsys):
    """The model trained on multi_db, evaluated with multi_db grown by web.txt (which holds a twin of the
    held-out Obadiah): the neighbours change, so RETRO[ON] does; RETRO[OFF] reads no neighbours and does not."""
    out, history = trained
    assert twin_share(grown_db) > 0.8
    base = history["val"][40]                           # the final evaluation, on all of multi_db's validation set
    grown = evaluate_tool.main(["--out_dir", str(out), "--db", grown_db.out, "--device", "cpu", "--dtype", "float32"])
    assert all(math.isfinite(v) for mode in ("on", "off") for v in grown[mode]) and grown["on"] != base["on"]
    assert set(grown["probe"]) == {"none", "stored", "shuffled", "oracle"}
    assert grown["off"] == pytest.approx(base["off"], rel=1e-5)
    said = report_numbers(capsys.readouterr().out)     # the summary's numbers are the evaluation's
    assert said == (round(grown["on"][1], 4), round(grown["off"][1], 4),
                    round(100 * (1 - grown["probe"]["oracle"] / grown["probe"]["none"])))
    logged = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert logged["db"] == grown_db.out and logged["bpb_on"] == grown["on"][1]
    text = sample_tool.main(["--sample", "Obad1:1 The vision", "--out_dir", str(out), "--db", grown_db.out,
                             "--device", "cpu", "--max_new_tokens", "24"])
    assert text.startswith("Obad1:1 The vision")


# name: (flags after --out_dir, {out} the trained run, {tmp} an empty folder, {old} a checkpoint without the tokenizer
# hash, {m8}/{multi}/{other} databases: the same tokenizer with chunks of 8, the model's own, another text's), words
# the one line must hold (a server of a database that does not fit says the same: above)
REFUSED = {
    "no checkpoint": ("{tmp}", ["--db", "{multi}"], ("no checkpoint",)),
    "a file that is no checkpoint of train.py": ("{old}", ["--db", "{multi}"], ("is not a checkpoint of train.py",)),
    "another chunk length": ("{out}", ["--db", "{m8}"], ("trained with tokenizer {h} and chunk_len {M}; {m8} has "
                                                         "tokenizer {h} and chunk_len 8", "--tokenizer {multi}")),
    "another tokenizer": ("{out}", ["--db", "{other}"], ("was trained with tokenizer",)),
}


@pytest.mark.parametrize("tool", ["sample", "evaluate"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_a_checkpoint_or_a_database_that_does_not_fit_is_refused_in_one_line(case, tool, trained, multi_db, m8_db,
                                                                             other_db, tmp_path, capsys):
    out, _ = trained
    old = torch.load(out / "ckpt.pt", weights_only=True)
    del old["tokenizer_sha256"]
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "ckpt.pt")
    names = dict(out=str(out), tmp=str(tmp_path / "none"), old=str(tmp_path / "old"), m8=m8_db.out, M=DB_M,
                 multi=multi_db.out, other=other_db.out, h=build_db.load_meta(multi_db.out)["tokenizer_sha256"][:8])
    assert build_db.load_meta(m8_db.out)["tokenizer_sha256"][:8] == names["h"]
    out_dir, flags, words = REFUSED[case]
    argv = ["--out_dir", out_dir.format(**names), *(f.format(**names) for f in flags), "--device", "cpu"]
    msg = (sample_error(capsys, "--sample", "x", *argv) if tool == "sample" else evaluate_error(capsys, *argv))
    assert all(w.format(**names) in msg for w in words), msg


def test_bits_per_byte_by_overlap_at_alpha_1_is_the_whole_set_and_filters_by_overlap_at_most_alpha(trained, multi_db):
    out, history = trained
    r = history["val"][40]
    overlap = evaluate_tool.chunk_overlap(build_db.open_db(multi_db.out))
    assert overlap.shape == r["chunks"]["tokens"].shape and ((0 <= overlap) & (overlap <= 1)).all()
    rows = evaluate_tool.bpb_by_overlap(r["chunks"], overlap)
    assert [row["alpha"] for row in rows] == list(evaluate_tool.ALPHAS)
    assert rows[-1]["on"] == pytest.approx(r["on"][1]) and rows[-1]["off"] == pytest.approx(r["off"][1])
    assert rows[-1]["share"] == 1 and all(a["chunks"] <= b["chunks"] for a, b in zip(rows, rows[1:]))
    held = r["chunks"]["bytes"] > 0
    for row in rows:
        sel = held & (overlap <= row["alpha"])
        assert row["chunks"] == sel.sum()
        if sel.any():
            bits = r["chunks"]["on"][sel].sum() / math.log(2)
            assert row["on"] == pytest.approx(bits / r["chunks"]["bytes"][sel].sum())
