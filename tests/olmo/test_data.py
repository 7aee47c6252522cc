"""Tests for olmo/data/: dolma round trip, rank split, resume, mixtures, and each DataError."""

import csv
import gzip
import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_model.errors import ConfigError
from moe_model.tokenizer import default_tokenizer_path
from olmo.data import (
    DataConfig,
    DataError,
    SourceConfig,
    build_eval_loaders,
    build_train_loader,
    mixture_for,
    plan_mixture,
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



def test_batches_carry_each_tokens_document(tmp_path: Path):
    """Document boundaries come from the data layer: with document_ids the collator adds
    "doc_ids" (per row, the document of each token from 0; an EOS ends its document), in
    training and validation batches alike."""
    tokens = np.arange(16, dtype=np.uint16)
    tokens[[2, 7, 8, 12]] = EOS
    tokens.tofile(tmp_path / "doc.npy")
    want = {0: [0, 0, 0, 1, 1, 1, 1, 1], 1: [0, 1, 1, 1, 1, 2, 2, 2]}
    cfg = DataConfig(paths=[str(tmp_path / "doc.npy")], validation={"v": [str(tmp_path / "doc.npy")]})
    kw = dict(sequence_length=8, vocab_size=VOCAB, work_dir=tmp_path / "work", document_ids=True)
    (batch,) = all_rows(build_train_loader(cfg, global_batch_size=2, seed=0, **kw))
    assert {int(i): d.tolist() for i, d in zip(batch["index"], batch["doc_ids"])} == want
    # olmo-core's trainer runs a random batch first, not through the collator: marked too.
    mock = build_train_loader(cfg, global_batch_size=2, seed=0, **kw).get_mock_batch()
    assert mock["doc_ids"].shape == mock["input_ids"].shape == (2, 8)
    (val,) = all_rows(build_eval_loaders(cfg, batch_size=2, **kw)["v"])
    assert {int(i): d.tolist() for i, d in zip(val["index"], val["doc_ids"])} == want
    kw["document_ids"] = False
    (plain,) = all_rows(build_train_loader(cfg, global_batch_size=2, seed=0, **kw))
    assert "doc_ids" not in plain

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

    # Load every token through olmo/data's loaders: sequence_length 1 so no tail is dropped, and the
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


@pytest.mark.slow
def test_tokenize_script_output_is_reproducible(tmp_path: Path):
    """Two tokenizations of the same documents write identical token files. dolma's workers
    shuffle the documents they write with unseeded generators; scripts/dolma_tokens.py seeds
    each task, so a fresh machine reproduces the sample data, and the main job's batches."""
    doc_dir = tmp_path / "docs"
    doc_dir.mkdir()
    for f in range(2):
        with gzip.open(doc_dir / f"d{f}.jsonl.gz", "wt") as out:
            for i in range(40):
                text = f"Document {i} of file {f}: " + " ".join(["word"] * (i % 7 + 1))
                out.write(json.dumps({"id": f"{f}-{i}", "text": text, "source": "t"}) + "\n")
    env = {**os.environ, "PROCESSES": "2", "TOKENIZER": str(TOKENIZER)}
    outputs = []
    for run in ("a", "b"):
        cmd = ["bash", str(REPO / "scripts" / "tokenize.sh"), str(doc_dir / "*.jsonl.gz"),
               str(tmp_path / run)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).glob("*.npy"))})
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]


# --- data.paths stays as it was --------------------------------------------------------------


def test_paths_fingerprint_and_order_unchanged(tmp_path: Path, corpus: DataConfig):
    """The fingerprint and shuffled order of a `data.paths` corpus, as computed by the code before
    mixtures existed (main at 9ea8781): checkpoints of existing runs still resume."""
    loader = train_loader(corpus, tmp_path / "work")
    assert loader.dataset.fingerprint == (
        "3cc25987cc7a6555bf39ad61a9cb2dbcb2d8027c6096080dbb6a1a81427dc2b9"
    )
    order = torch.cat([b["index"] for b in all_rows(loader)]).tolist()
    assert order == [0, 16, 20, 9, 11, 7, 8, 13, 17, 10, 5, 22, 15, 1, 18, 19, 2, 6, 23, 4, 3,
                     12, 21, 14]  # fmt: skip
    assert "source" not in all_rows(loader)[0]


# --- mixtures (data.sources) --------------------------------------------------------------------

# Each source's tokens lie in their own range (token // 10_000 is the source), and every token
# is its file offset plus its position, so a row says which source, file and sequence it is.
SOURCE_FILES = {  # source -> [(file, sequences, extra tail tokens, first token)]
    "web": [("web-0.npy", 40, 0, 0), ("web-1.npy", 25, 3, 1_000)],
    "code": [("code.npy", 6, 5, 10_000)],
    "paper": [("paper.npy", 9, 0, 20_000)],
}


@pytest.fixture
def mix(tmp_path: Path) -> DataConfig:
    for files in SOURCE_FILES.values():
        for name, seqs, tail, first in files:
            write_tokens(tmp_path / "mix" / name, 16 * seqs + tail, offset=first)
    return DataConfig(sources={
        "web": SourceConfig(paths=[str(tmp_path / "mix" / "web-*.npy")], fraction=0.6),
        "code": SourceConfig(paths=[str(tmp_path / "mix" / "code.npy")], fraction=0.25,
                             max_repetition=3),
        "paper": SourceConfig(paths=[str(tmp_path / "mix" / "paper.npy")], fraction=0.15),
    })  # fmt: skip


def source_sequence(row: torch.Tensor) -> tuple[str, str, int]:
    """(source, file, sequence index in the file) of a row, from its tokens."""
    first = int(row[0])
    for source, files in SOURCE_FILES.items():
        for name, seqs, _, start in files:
            if start <= first < start + 16 * seqs:
                assert (first - start) % 16 == 0, f"row starts mid-sequence: {first}"
                assert row.tolist() == list(range(first, first + 16)), "row spans files"
                return source, name, (first - start) // 16
    raise AssertionError(f"row {row.tolist()} is from no file")


def test_mixture_meets_the_fractions_and_repetition_limits(tmp_path: Path, mix: DataConfig):
    # Sequences per pass, largest the sources allow: paper binds (9 sequences, 15%) -> 60, a
    # multiple of the 4-sequence batch; largest remainders of 60 x (0.6, 0.25, 0.15).
    plan = mixture_for(mix, sequence_length=16, vocab_size=VOCAB, global_batch_size=4)
    assert {s.name: s.selected for s in plan.sources} == {"web": 36, "code": 15, "paper": 9}

    loader = train_loader(mix, tmp_path / "work")
    batches = all_rows(loader)
    assert len(batches) == 15
    seen: dict[str, list[tuple[str, int]]] = {"web": [], "code": [], "paper": []}
    names = list(mix.sources)
    for batch in batches:
        for row, source in zip(batch["input_ids"], batch["source"].tolist()):
            name, file, seq = source_sequence(row)
            assert names[source] == name, "the row's source tag names another source"
            seen[name].append((file, seq))
    # web: 36 distinct of its 65 sequences, spread over both files.
    assert len(set(seen["web"])) == 36 and {f for f, _ in seen["web"]} == {"web-0.npy", "web-1.npy"}
    # code, upsampled 2.5x: every sequence 2 or 3 times, 15 in all.
    counts = [seen["code"].count(("code.npy", i)) for i in range(6)]
    assert sum(counts) == 15 and set(counts) == {2, 3}
    # paper, at its limit: each of its 9 sequences exactly once.
    assert sorted(seen["paper"]) == [("paper.npy", i) for i in range(9)]
    assert loader.state_dict()["mixture"]["code"] == {
        "fraction": 0.25, "realised_fraction": 0.25, "sequences": 15, "tokens": 240,
        "available_tokens": 96, "repetition": 2.5, "files": 1,
    }  # fmt: skip


def test_mix_tokens_sizes_the_pass_and_rejects_too_much_repetition(tmp_path: Path, mix: DataConfig):
    # 1,275 tokens round up to 20 batches of 4 x 16 tokens: 80 sequences, of which code's 25% is
    # 20 of its 6 (3.33 passes, limit 3) and paper's 15% is 12 of its 9 (1.33 passes, limit 1).
    mix.mix_tokens = 1_275
    with pytest.raises(
        DataError,
        match=r"^data\.sources\.code: its share of 1,280 mix tokens is 320 tokens, 3\.33 passes over "
        r"its 96, more than max_repetition 3; expected a larger max_repetition",
    ):
        check(mix, global_batch_size=4)
    mix.sources["code"].max_repetition = 4
    with pytest.raises(DataError, match=r"^data\.sources\.paper: .* 1\.33 passes over its 144, more "
                                        r"than max_repetition 1;"):
        check(mix, global_batch_size=4)
    mix.sources["paper"].max_repetition = 1.5
    check(mix, global_batch_size=4)
    loader = train_loader(mix, tmp_path / "work")
    assert len(loader.dataset) == 80
    assert torch.bincount(torch.cat([b["source"] for b in all_rows(loader)])).tolist() == [48, 20, 12]


def test_mixture_resumes_exactly(tmp_path: Path, mix: DataConfig):
    def loader(work, seed=3):
        return train_loader(mix, tmp_path / work, dp_rank=1, dp_world_size=2, seed=seed)

    expected = all_rows(loader("work"))
    resumed = loader("work")
    resumed.reshuffle(epoch=1)
    it = iter(resumed)
    for _ in range(5):
        next(it)
    state = resumed.state_dict()
    fresh = loader("work2", seed=99)
    fresh.load_state_dict(state)
    fresh.reshuffle(epoch=state["epoch"])
    rest = list(fresh)
    assert len(rest) == len(expected) - 5
    for got, want in zip(rest, expected[5:]):
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["source"], want["source"])


def test_passes_of_a_large_source_use_fresh_sequences_until_it_is_exhausted(tmp_path: Path, mix: DataConfig):
    # web: one file of 156 sequences. paper (9, limit 1) binds: 60 per pass, web's 60% is 36. So
    # passes 1-4 use 144 different web sequences, pass 5 the last 12 and 24 of the others again.
    write_tokens(tmp_path / "big" / "web.npy", 16 * 156, offset=30_000)
    mix.sources["web"].paths = [str(tmp_path / "big" / "web.npy")]

    def web_and_code(loader, epoch):
        web, code = [], []
        for batch in all_rows(loader, epoch):
            for row, source in zip(batch["input_ids"], batch["source"].tolist()):
                first = int(row[0])
                assert row.tolist() == list(range(first, first + 16)), "row is not one whole sequence"
                if source == 0:
                    assert (first - 30_000) % 16 == 0
                    web.append((first - 30_000) // 16)
                elif source == 1:
                    code.append(source_sequence(row)[2])
        return web, code

    loader = train_loader(mix, tmp_path / "work")
    passes = [web_and_code(loader, epoch) for epoch in range(1, 6)]
    web = [p[0] for p in passes]
    assert [len(w) for w in web] == [36] * 5
    assert len({seq for w in web[:4] for seq in w}) == 144
    assert {seq for w in web for seq in w} == set(range(156))
    counts = np.bincount([seq for w in web for seq in w], minlength=156)
    assert sorted(set(counts.tolist())) == [1, 2] and counts.sum() == 180
    # Every pass is spread over the whole file: each quarter of it contributes 7 to 11.
    for w in web:
        assert all(7 <= q <= 11 for q in np.bincount(np.array(w) // 39, minlength=4)), sorted(w)
    # code (6 sequences, 15 per pass): over two passes each sequence exactly 5 times.
    code = passes[0][1] + passes[1][1]
    assert np.bincount(code, minlength=6).tolist() == [5] * 6

    # Another data seed starts elsewhere; the same seed again gives the same passes.
    assert set(web_and_code(train_loader(mix, tmp_path / "w2", seed=4), 1)[0]) != set(web[0])
    assert web_and_code(train_loader(mix, tmp_path / "w3"), 2)[0] == web[1]
    # Worker processes get the loader's epoch and seed with it: the same second pass.
    mix.num_workers = 2
    assert web_and_code(train_loader(mix, tmp_path / "w4"), 2) == passes[1]


@pytest.mark.parametrize("paper, counts", [(0.1504, [34, 14, 8]), (0.1496, [36, 15, 9])])
def test_fractions_within_the_tolerance_are_normalised(paper: float, counts: list, mix: DataConfig):
    mix.sources["paper"].fraction = paper
    total = 0.6 + 0.25 + paper
    plan = mixture_for(mix, sequence_length=16, vocab_size=VOCAB, global_batch_size=4)
    want = [0.6 / total, 0.25 / total, paper / total]
    assert [s.fraction for s in plan.sources] == pytest.approx(want, rel=1e-12)
    assert math.fsum(s.fraction for s in plan.sources) == pytest.approx(1, abs=1e-12)
    # paper (9 sequences, limit 1) binds at its normalised share; largest remainders split the
    # whole batches.
    assert [s.selected for s in plan.sources] == counts
    assert sum(counts) == 4 * math.floor(9 / want[2] / 4)
    assert [row["fraction"] for row in plan.summary().values()] == pytest.approx(want, rel=1e-12)

    mix.sources["paper"].fraction = 0.1511
    with pytest.raises(ConfigError, match=r"data\.sources: fractions sum to 1\.001 "):
        DataConfig(sources=mix.sources)


def test_max_repetition_bounds_the_whole_run(tmp_path: Path, mix: DataConfig):
    # A pass of 960 tokens: 60 sequences, 15 steps of 4 (web 36, code 15 of its 6, paper 9).
    mix.mix_tokens = 960
    mix.sources["paper"].max_repetition = 2
    # 18 steps = 1.2 passes: code 15 x 1.2 / 6 = 3.0 times, exactly its limit.
    check(mix, global_batch_size=4, duration=("steps", 18))
    check(mix, global_batch_size=4, duration=("tokens", 18 * 64))
    message = (
        r"^data\.sources\.code: a run of 1,216 tokens \(1\.27 passes over the mix\) uses its 96 "
        r"tokens 3\.17 times, more than max_repetition 3; expected a larger max_repetition, more "
        r"data for 'code', a smaller fraction or a shorter max_duration$"
    )
    with pytest.raises(DataError, match=message):
        check(mix, global_batch_size=4, duration=("steps", 19))
    with pytest.raises(DataError, match=message):  # 18 steps and one token: a 19th step
        check(mix, global_batch_size=4, duration=("tokens", 18 * 64 + 1))
    # Two passes: web (36 of its 65 per pass) is the first source used more than once.
    with pytest.raises(DataError, match=r"^data\.sources\.web: a run of 1,920 tokens \(2\.00 passes "
                                        r"over the mix\) uses its 1,040 tokens 1\.11 times"):
        check(mix, global_batch_size=4, duration=("epochs", 2))
    with pytest.raises(DataError, match=message):
        train_loader(mix, tmp_path / "work", duration=("steps", 19))
    mix.sources["code"].max_repetition = 3.2
    check(mix, global_batch_size=4, duration=("steps", 19))


def test_mixture_fingerprint_covers_every_source(tmp_path: Path, mix: DataConfig):
    loader = train_loader(mix, tmp_path / "work")
    loader.reshuffle(epoch=1)
    next(iter(loader))
    state = loader.state_dict()

    write_tokens(tmp_path / "mix" / "code.npy", 16 * 7, offset=10_000)  # code grew
    with pytest.raises(
        DataError,
        match=r"data\.sources: the training data differs from the checkpoint's \(1 file\(s\) "
        r"resized \(e\.g\. code/code\.npy: 202 -> 224 bytes\)\)",
    ):
        train_loader(mix, tmp_path / "work").load_state_dict(state)
    write_tokens(tmp_path / "mix" / "code.npy", 16 * 6 + 5, offset=10_000)  # back as it was
    train_loader(mix, tmp_path / "work").load_state_dict(state)

    mix.sources["web"].fraction, mix.sources["code"].fraction = 0.5, 0.35
    # Now code binds (18 / 0.35 -> 48 sequences): every source's count changes.
    with pytest.raises(DataError, match=r"\(source 'web': 36 -> 24 sequences per pass; source "
                                        r"'code': 15 -> 17 sequences per pass; source 'paper': 9 -> 7"):
        train_loader(mix, tmp_path / "work").load_state_dict(state)


def test_source_validation_sets_are_evaluated_under_the_source_name(tmp_path: Path, mix: DataConfig):
    write_tokens(tmp_path / "held" / "code.npy", 16 * 3, offset=10_000)
    mix.sources["code"].validation = [str(tmp_path / "held" / "code.npy")]
    mix.validation = {"all": [str(tmp_path / "mix" / "paper.npy")]}
    check(mix, global_batch_size=4)
    loaders = build_eval_loaders(mix, sequence_length=16, vocab_size=VOCAB, batch_size=2,
                                 work_dir=tmp_path / "w")  # fmt: skip
    assert list(loaders) == ["all", "code"]
    rows = torch.cat([b["input_ids"][b["instance_mask"]] for b in all_rows(loaders["code"])])
    assert rows[:, 0].tolist() == [10_000, 10_016, 10_032]

    mix.sources["code"].validation = [str(tmp_path / "held" / "*.nope")]
    with pytest.raises(DataError, match=r"data\.sources\.code\.validation: .* matches no files"):
        check(mix, global_batch_size=4)


def test_mixture_errors_before_training(tmp_path: Path, mix: DataConfig):
    with pytest.raises(
        DataError,
        match=r"data\.sources: the mixture cannot fill one global batch of 64 sequences: source "
        r"'paper' has 9 sequences of 16 tokens, at most 9 with max_repetition 1, for 15\.000% of the mix",
    ):
        check(mix, global_batch_size=64)
    with pytest.raises(DataError, match="cannot fill one global batch"):
        train_loader(mix, tmp_path / "w", global_batch_size=64)

    mix.sources["code"].paths = [str(tmp_path / "mix" / "nothing-*.npy")]
    with pytest.raises(DataError, match=r"data\.sources\.code\.paths: '.*nothing-\*\.npy' matches no files"):
        check(mix)
    mix.sources["code"].paths = [str(tmp_path / "mix" / "paper.npy")]
    with pytest.raises(DataError, match=r"data\.sources\.paper\.paths: '.*paper\.npy' is also in "
                                        r"data\.sources\.code; expected each file in one source"):
        check(mix)
    write_tokens(tmp_path / "mix" / "tiny.npy", 10)
    mix.sources["code"].paths = [str(tmp_path / "mix" / "tiny.npy")]
    with pytest.raises(DataError, match=r"data\.sources\.code: 1 file\(s\) hold 10 tokens, expected "
                                        r"at least one whole sequence of 16 tokens"):
        check(mix)


@pytest.mark.parametrize("change, message", [
    (dict(fractions=(0.6, 0.3, 0.15)), r"data\.sources: fractions sum to 1\.05 \(web 0\.6 \+ code 0\.3 "
                                       r"\+ paper 0\.15\); expected 1 \(within 0\.001, then normalised\)"),
    (dict(paths=[]), r"data\.sources\.code\.paths is empty"),
    (dict(fraction=None), r"data\.sources\.code\.fraction is missing"),
    (dict(fraction=1.5), r"data\.sources\.code\.fraction is 1\.5; expected a share in \(0, 1\]"),
    (dict(max_repetition=0.5), r"data\.sources\.code\.max_repetition is 0\.5; expected >= 1"),
    (dict(also_paths=True), r"data\.paths and data\.sources are both set"),
])  # fmt: skip
def test_mixture_config_errors(tmp_path: Path, change: dict, message: str):
    fractions = change.get("fractions", (0.6, 0.25, 0.15))
    sources = {name: dict(paths=["x.npy"], fraction=f)
               for name, f in zip(("web", "code", "paper"), fractions)}  # fmt: skip
    for key in ("paths", "fraction", "max_repetition"):
        if key in change:
            sources["code"][key] = change[key]
    with pytest.raises(ConfigError, match=message):
        DataConfig(sources=sources, paths=["y.npy"] if change.get("also_paths") else [])


def test_mixture_config_errors_through_load_config():
    from olmo.config import load_config

    base = ["--data.paths=[]", "--data.sources.web.paths=[a.npy]", "--data.sources.web.fraction=1"]
    assert list(load_config(REPO / "configs/tiny.yaml", base).data.sources) == ["web"]
    with pytest.raises(ConfigError, match=r"^unknown config key 'data\.sources\.web\.fractoin'; did you mean "
                       r"'data\.sources\.web\.fraction'\?$"):
        load_config(REPO / "configs/tiny.yaml", [*base, "--data.sources.web.fractoin=1"])
    with pytest.raises(ConfigError, match=r"data\.mix_tokens is set but data\.sources is empty"):
        load_config(REPO / "configs/tiny.yaml", ["--data.mix_tokens=1000"])


# OLMoE-mix's token counts (allenai/OLMoE-mix-0924 dataset card, "Statistics"), in billions.
OLMOE_MIX_TOKENS_B = {
    "dclm": 3860, "starcoder": 101, "pes2o": 57.2, "arxiv": 21.1, "open-web-math": 12.7,
    "algebraic-stack": 12.6, "wiki": 3.69,
}  # fmt: skip


def test_olmoe_mix_recipe_builds_on_stand_in_files(tmp_path: Path):
    """configs/olmoe-mix.yaml: its fractions are the published token shares, and its data
    pipeline builds on small stand-in files (one directory per source, as the README says)."""
    from olmo.config import load_config

    total = sum(OLMOE_MIX_TOKENS_B.values())
    overrides = ["--model.max_sequence_length=16", "--global_train_batch_size=64"]
    for i, (name, tokens_b) in enumerate(OLMOE_MIX_TOKENS_B.items()):
        # wiki gets exactly one sequence, enough for 1,102 sequences at its 0.0907%.
        seqs = 1 if name == "wiki" else math.ceil(1_200 * tokens_b / total)
        write_tokens(tmp_path / name / "part-0-00000.npy", 16 * seqs, offset=1_000 * i)
        overrides.append(f"--data.sources.{name}.paths=[{tmp_path / name}/*.npy]")
    # An overlay of olmoe-1b-7b.yaml that changes only the run's name and its data.
    base, recipe = (load_config(REPO / f"configs/{n}.yaml").to_dict() for n in ("olmoe-1b-7b", "olmoe-mix"))
    assert {k for k in base if base[k] != recipe[k]} == {
        "run_name", "save_folder", "wandb", "data", "max_duration"
    }  # fmt: skip
    assert {k for k in base["wandb"] if base["wandb"][k] != recipe["wandb"][k]} == {"group"}

    cfg = load_config(REPO / "configs/olmoe-mix.yaml", overrides)
    assert list(cfg.data.sources) == list(OLMOE_MIX_TOKENS_B)
    for name, tokens_b in OLMOE_MIX_TOKENS_B.items():
        assert cfg.data.sources[name].fraction == pytest.approx(tokens_b / total, abs=5e-7), name
    assert cfg.model.vocab_size == 50_280 and cfg.data.eos_token_id == EOS

    kw = dict(sequence_length=16, vocab_size=cfg.model.vocab_size, global_batch_size=64)
    validate_data(cfg.data, **kw)
    plan = mixture_for(cfg.data, **kw)
    # wiki binds: floor(1 / 0.000907) = 1,102 sequences -> 17 batches of 64.
    assert plan.num_sequences == 1_088
    for src in plan.sources:
        assert abs(src.selected / 1_088 - src.fraction) <= 1 / 1_088, src.name
    loader = build_train_loader(cfg.data, seed=cfg.seed, work_dir=tmp_path / "work", **kw)
    batch = all_rows(loader)[0]
    assert batch["input_ids"].shape == (64, 16) and batch["source"].shape == (64,)


def test_olmoe_mix_recipe_allows_its_own_run_on_the_full_mix():
    """OLMoE's 5.133T tokens over the published 4.07T: each source 1.26 times, within the
    recipe's max_repetition 1.3 (files sized as the dataset card's counts, never read)."""
    from olmo.config import load_config, parse_duration

    cfg = load_config(REPO / "configs/olmoe-mix.yaml")
    seq, batch = cfg.model.max_sequence_length, cfg.global_train_batch_size
    files = {name: ([f"{name}.npy"], [round(b * 1e9) * 2]) for name, b in OLMOE_MIX_TOKENS_B.items()}

    def run_repetition():
        plan = plan_mixture(cfg.data, files, sequence_length=seq, itemsize=2, global_batch_size=batch)
        run = plan.run_sequences(parse_duration(cfg.max_duration), global_batch_size=batch)
        assert run * seq == pytest.approx(5.133e12, rel=1e-6)
        return plan, run

    plan, run = run_repetition()
    plan.check_run(run)
    total = sum(OLMOE_MIX_TOKENS_B.values()) * 1e9
    for name, rep in plan.run_repetition(run).items():
        assert rep == pytest.approx(5.133e12 / total, rel=2e-3), name
    for src in cfg.data.sources.values():
        src.max_repetition = 1.25
    plan, run = run_repetition()
    with pytest.raises(DataError, match=r"^data\.sources\.dclm: .* uses its .* tokens 1\.26 times, "
                                        r"more than max_repetition 1\.25;"):
        plan.check_run(run)
