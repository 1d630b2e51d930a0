"""Two gloo ranks (spawned processes on CPU) on a corpus with a stored tokenizer: no rank reads
a Parquet file or builds a vocabulary for the tokenizer (so none waits on another's file work),
both train through all three stages under DDP without ``find_unused_parameters``."""

from __future__ import annotations

import json
import os
import shutil
import socket

import torch.multiprocessing as mp

from model.checkpoint import load_checkpoint
from model.trainlog import read_log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, corpus: str, preset: str, run: str, out: str) -> None:
    import pyarrow.parquet as pq
    import torch

    from model import tokenizer as store
    from model import train as train_mod

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    state = {"in_tokenizer": False, "reads": [], "built": 0}
    real_table, real_group = pq.read_table, pq.ParquetFile.read_row_group

    def table(path, *a, columns=None, **k):
        if state["in_tokenizer"]:
            state["reads"].append(columns)
        return real_table(path, *a, columns=columns, **k)

    def group(self, i, columns=None, **k):
        if state["in_tokenizer"]:
            state["reads"].append(columns)
        return real_group(self, i, columns=columns, **k)

    def built(*a, **k):
        state["built"] += 1
        raise AssertionError("tokenizer built although one is stored")

    real_tok = train_mod.run_tokenizer

    def tokenizer_step(*a, **k):
        state["in_tokenizer"] = True
        try:
            return real_tok(*a, **k)
        finally:
            state["in_tokenizer"] = False

    pq.read_table, pq.ParquetFile.read_row_group = table, group
    store.build_in_memory, train_mod.run_tokenizer = built, tokenizer_step
    from pathlib import Path

    summary = train_mod.train(train_mod.TrainOptions(
        corpus=Path(corpus), out=Path(run), preset=preset, steps=4, dist_timeout_s=120))
    Path(out).write_text(json.dumps({"reads": state["reads"], "built": state["built"],
                                     "steps": summary["steps"]}))
    torch.distributed.destroy_process_group()


def test_two_ranks_with_a_stored_tokenizer(tiny_corpus, micro_preset, tmp_path):
    from model.config import load_preset
    from model.tokenizer import build_stored

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    folder, _ = build_stored(corpus, load_preset(str(micro_preset)).text.vocab_size)
    run, world, port = tmp_path / "run", 2, _free_port()
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(corpus), str(micro_preset),
                                             str(run), str(outs[r]))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]
    for o in outs:
        got = json.loads(o.read_text())
        assert got == {"reads": [], "built": 0, "steps": 4}  # no file read for the tokenizer
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == \
        (folder / "tokenizer.json").read_bytes()
    rows = [r for r in read_log(run / "log.jsonl") if r.get("split") != "val"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and {r["stage"] for r in rows} == {1, 2, 3}
    ck = load_checkpoint(run)
    assert ck["step"] == 4 and set(ck["data"]) == {0, 1}
