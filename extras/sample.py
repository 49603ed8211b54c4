"""
Sample from a trained model, retrieving each time a chunk completes, with its neighbours in view or in your hands.

    python extras/sample.py --sample "Mat5:3 Blessed are"                    # generate from out/ckpt.pt
    python extras/sample.py --sample "Mat5:3 Blessed are" --show_neighbours   # print what each chunk retrieved
    python extras/sample.py --sample "And God said" --choose_neighbours      # keep each chunk's, or type others
    python extras/sample.py --sample "And God said" --neighbours_file nb.json  # the same, from a file
    python extras/sample.py --sample "And God said" --db http://127.0.0.1:8000   # retrieve from a server

Every flag of train.py applies (`python extras/sample.py -h`): --out_dir names the model, --db the database
(without --db: the one the model was trained with, as it is now); --max_new_tokens, --temperature, --top_k.
A neighbours file is a JSON list with an entry per chunk of the sequence (prompt and output, in order): null
retrieves as usual, a string is every neighbour's text, a list of K strings one text per neighbour. A typed or
given text is tokenized and cut or padded to 2M tokens: the neighbour chunk N, then its continuation F.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from build_db import PAD, DBError, Retriever, cli, is_unicode  # noqa: E402
from extras.evaluate import trained_model  # noqa: E402
from extras.server import RemoteRetriever, is_server  # noqa: E402


@dataclass
class SampleConfig(train.TrainConfig):
    sample: str = ""                # the prompt ("": a new document)
    show_neighbours: bool = False   # print what was retrieved for each chunk
    choose_neighbours: bool = False # show each chunk's neighbours, then keep them or type others
    neighbours_file: str = ""       # a JSON list of each chunk's neighbour texts (see above)


def read_neighbours_file(path: str, K: int) -> list:
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DBError(f"--neighbours_file {path}: {e}") from None
    for u, e in enumerate(entries if isinstance(entries, list) else [0]):
        if not (e is None or isinstance(e, str) and is_unicode(e) or isinstance(e, list) and len(e) == K
                and all(isinstance(t, str) and is_unicode(t) for t in e)):
            raise DBError(f"--neighbours_file {path}: entry {u} must be null, a string, or a list of {K} strings "
                          f"(the file is a JSON list with one entry per chunk)")
    return [[e] * K if isinstance(e, str) else e for e in entries]


class Neighbours:
    """RETRO.generate's retrieve, with you in the loop: each completed chunk's K neighbours come from the
    neighbours file, or from the retriever; --show_neighbours prints them, --choose_neighbours asks."""

    def __init__(self, retriever, tok, cfg: SampleConfig):
        self.retriever, self.tok, self.cfg, self.M, self.K = retriever, tok, cfg, cfg.chunk_len, cfg.n_neighbours
        self.pad, self.u = tok.token_to_id(PAD), -1         # u: the chunk that just completed, in order
        self.chosen = read_neighbours_file(cfg.neighbours_file, self.K) if cfg.neighbours_file else []

    def tokens(self, texts: list) -> torch.Tensor:         # K texts -> (1, K, 2M)
        return torch.tensor([[(self.tok.encode(t).ids + [self.pad] * 2 * self.M)[:2 * self.M] for t in texts]])

    def text(self, ids) -> str:
        return self.tok.decode(ids.tolist(), skip_special_tokens=False)

    def __call__(self, chunk):                              # (1, M) -> (1, K, 2M)
        self.u, M = self.u + 1, self.M
        if self.u < len(self.chosen) and self.chosen[self.u] is not None:
            nb = self.tokens(self.chosen[self.u])
        else:
            nb = torch.as_tensor(self.retriever.query(chunk.cpu(), k=self.K)["neighbours"], dtype=torch.long)
        if self.cfg.show_neighbours or self.cfg.choose_neighbours:
            print(f"--- chunk {self.u}: {self.text(chunk[0])!r}")
            for j in range(self.K):
                n, f = (t[t != self.pad] for t in (nb[0, j, :M], nb[0, j, M:]))     # padding not shown
                print(f"    neighbour {j}: {self.text(n)!r}\n      continues: {self.text(f)!r}")
        if self.cfg.choose_neighbours:
            try:
                typed = input("    Enter keeps them; or type the text every neighbour should hold (-: none): ").strip()
                typed = typed.encode(errors="replace").decode()     # bytes that are not UTF-8 become "?"
            except EOFError:                        # the end of piped input: keep them, from here on
                typed = ""
            if not sys.stdin.isatty():
                print(typed)                        # a transcript shows what was typed
            if typed:
                nb = self.tokens(["" if typed == "-" else typed] * self.K)
        return nb.to(chunk.device)


def sample(cfg: SampleConfig) -> str:
    """max_new_tokens generated after the prompt, retrieving from the database (or server) as each chunk completes."""
    server = RemoteRetriever(cfg.db) if is_server(cfg.db) else None
    model, _, cfg, db, device = trained_model(cfg, server)
    if not cfg.n_neighbours and (cfg.neighbours_file or cfg.choose_neighbours):
        raise DBError("this model was trained without retrieval (n_neighbours 0): it reads no neighbours")
    neighbours = Neighbours(server or Retriever(db.path, device), db.tokenizer, cfg) if cfg.n_neighbours else None
    text = train.generate(model, db.tokenizer, cfg.sample, cfg, device, neighbours)
    if neighbours and len(neighbours.chosen) > neighbours.u + 1:
        n, u = len(neighbours.chosen), neighbours.u + 1
        print(f"note: --neighbours_file has {n} entries; the sample completed {u} chunks, so the last {n - u} were "
              "not used", file=sys.stderr)
    print(("--- sample:\n" if cfg.show_neighbours or cfg.choose_neighbours else "") + text)
    return text


def main(argv=None):
    cfg = cli(SampleConfig, "sample.py", "Sample from a trained RETRO model, with its neighbours shown or chosen.",
              argv)
    try:
        return sample(cfg)
    except DBError as e:
        sys.exit(f"sample.py: error: {e}")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:       # what read the output has gone (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
