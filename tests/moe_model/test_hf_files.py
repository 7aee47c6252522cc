"""moe_model/hf/files.py: the streaming safetensors writer against the safetensors library,
sharding, sources and atomic output directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_model.errors import ConversionError, OutputExistsError
from moe_model.hf.files import (
    DictSource,
    PlannedTensor,
    SafetensorsSource,
    atomic_output_dir,
    parse_size,
    plan_rename,
    write_safetensors,
    write_safetensors_shards,
)


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=gen),
        "b.bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c.i64": torch.arange(6).reshape(2, 3),
        "d.bool": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5),
        "f.f16": torch.randn(2, 2, 2, generator=gen).half(),
        "g.transposed": torch.randn(4, 6, generator=gen).T,  # not contiguous
    }


def test_streaming_writer_matches_safetensors_library(tmp_path):
    state = tensors()
    made = []
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype, lambda k=k, v=v: made.append(k) or v)
            for k, v in state.items()]
    write_safetensors(tmp_path / "ours.safetensors", plan, {"format": "pt", "note": "x"})
    assert made == list(state)  # each tensor made exactly once, in plan order
    ours = load_file(tmp_path / "ours.safetensors")
    assert ours.keys() == state.keys()
    for key, value in state.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    # The library's own file holds the same tensors, and our reader reads both alike.
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "lib.safetensors")
    for path in ("ours.safetensors", "lib.safetensors"):
        source = SafetensorsSource([tmp_path / path])
        assert sorted(source.keys()) == sorted(state)
        for key, value in state.items():
            assert source.meta(key).shape == value.shape and torch.equal(source.get(key), value)


def test_shards_split_at_the_size_limit(tmp_path):
    state = {f"t{i}": torch.full((250,), float(i)) for i in range(5)}  # 1000 bytes each
    names = write_safetensors_shards(tmp_path, plan_rename(DictSource(state), str), "2500B")
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5000
    assert index["weight_map"] == {"t0": names[0], "t1": names[0], "t2": names[1], "t3": names[1],
                                   "t4": names[2]}
    merged = {k: v for n in names for k, v in load_file(tmp_path / n).items()}
    assert all(torch.equal(merged[k], v) for k, v in state.items())
    (tmp_path / "one").mkdir()
    one = plan_rename(DictSource(state), str)
    assert write_safetensors_shards(tmp_path / "one", one, "1GB") == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()


def test_planned_shape_and_size_errors(tmp_path):
    bad = PlannedTensor("w", (2, 3), torch.float32, lambda: torch.zeros(3, 2))
    with pytest.raises(ConversionError, match=r"'w' came out with shape \(3, 2\); planned \(2, 3\)"):
        write_safetensors(tmp_path / "x.safetensors", [bad])
    assert parse_size("5GB") == 5 * 10**9 and parse_size("20KiB") == 20 * 1024
    with pytest.raises(ConversionError, match="max_shard_size='five'"):
        parse_size("five")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(ConversionError, match="not a safetensors file"):
        SafetensorsSource([tmp_path / "junk.safetensors"])


def test_truncated_or_inconsistent_safetensors_refused_on_opening(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"v": torch.ones(10), "w": torch.ones(100)}, path)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert len(data) == header_end + 440
    path.write_bytes(data[:-8])
    with pytest.raises(ConversionError) as err:
        SafetensorsSource([path])
    assert str(err.value) == (f"{str(path)!r} is truncated: {len(data) - 8} bytes, but its header "
                              f"places tensor data up to byte {len(data)}")
    # Cut after opening (a file replaced under a running conversion): the read says so.
    path.write_bytes(data)
    source = SafetensorsSource([path])
    path.write_bytes(data[:-8])
    assert torch.equal(source.get("v"), torch.ones(10))
    with pytest.raises(ConversionError, match="ends inside tensor 'w'"):
        source.get("w")
    # Header entries whose offsets or form contradict the tensor they describe.
    for entry, needle in [
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "byte range does not fit"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "byte range does not fit"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "bad header entry for 'x'"),
        ({"dtype": "F32", "shape": [2]}, "bad header entry for 'x'"),
        ({"dtype": "C64", "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype C64"),
    ]:
        raw = json.dumps({"x": entry}).encode()
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
        with pytest.raises(ConversionError, match=needle):
            SafetensorsSource([path])


def test_atomic_output_dir(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    with atomic_output_dir(tmp_path / "empty") as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (tmp_path / "empty" / "done.txt").read_text() == "ok"
    with pytest.raises(OutputExistsError, match="already exists and is not empty"):
        with atomic_output_dir(tmp_path / "empty"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_failed_output_removes_the_parents_it_made(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(tmp_path / "a" / "b" / "out") as tmp:
            assert tmp.parent == tmp_path / "a" / "b"
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # A parent that existed before stays; one that something else wrote into meanwhile too.
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(tmp_path / "kept" / "x" / "y" / "out"):
            (tmp_path / "kept" / "x" / "theirs.txt").write_text("theirs")
            raise RuntimeError("boom")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "kept", "kept/x", "kept/x/theirs.txt"]
    with atomic_output_dir(tmp_path / "c" / "d" / "out") as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (tmp_path / "c" / "d" / "out" / "done.txt").read_text() == "ok"
