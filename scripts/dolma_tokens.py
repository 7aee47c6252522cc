"""`dolma tokens` with reproducible output: the same documents give the same token files.

Run with dolma's own environment (scripts/tokenize.sh does):
    .venv-dolma/bin/python scripts/dolma_tokens.py tokens --documents ... --seed 0

dolma 1.2.1's `--seed` seeds only the parent process, and after it has shuffled the input files.
Its workers are spawned processes whose `random` and `numpy.random` start from OS entropy, and
each worker shuffles the documents it writes (`MemMapParallelWriter.process_single`: a ring of
open files sampled with numpy, then `random.shuffle` of each batch of rows). So two runs on the
same files write the same documents in a different order, and a training run on them sees other
batches. Here each worker task seeds both generators from (seed, its file group) before dolma's
own code runs, and the parent is seeded before it shuffles the files: the output depends only
on the inputs, the seed and the number of processes, and tokenization stays parallel.
"""

from __future__ import annotations

import hashlib
import random
import sys

import numpy as np
from dolma.cli.__main__ import main
from dolma.tokenizer import executor


def seed_from_argv(argv: list[str]) -> int:
    """The value of `--seed` (dolma's default, 3920, where it is not given)."""
    for i, arg in enumerate(argv):
        if arg == "--seed" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--seed="):
            return int(arg.split("=", 1)[1])
    return 3920


def seed_generators(seed: int, key: str) -> None:
    digest = int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:4], "little")
    random.seed(digest)
    np.random.seed(digest)


class SeededMemMapParallelWriter(executor.MemMapParallelWriter):
    """dolma's writer with each task's generators seeded from its file group."""

    @classmethod
    def process_single(cls, source_path, destination_path, queue, **kwargs):
        # source_path is the index of this task's group of input files: a stable key per task,
        # whichever pool worker runs it. A spawned worker gets the parent's sys.argv.
        seed_generators(seed_from_argv(sys.argv), str(source_path))
        return super().process_single(source_path, destination_path, queue, **kwargs)


if __name__ == "__main__":
    seed_generators(seed_from_argv(sys.argv), "parent")
    executor.MemMapParallelWriter = SeededMemMapParallelWriter
    sys.argv[0] = "dolma"
    sys.exit(main())
