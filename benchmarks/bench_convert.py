#!/usr/bin/env python
"""Time and peak host memory of HF export and import at OLMoE-1B-7B shapes.

For each layer count L: a training checkpoint of configs/olmoe-1b-7b-swiglu.yaml with
``n_layers=L`` (every other size as OLMoE-1B-7B: D 2048, 64 experts of H 1024, vocab 50304) is
written tensor by tensor from the meta-built model (seeded random values, bf16-representable so
the round trip can be checked bitwise); then, each in its own process (a process's peak RSS only
grows):

* ``make``: the fp32 model-only DCP checkpoint CKPT,
* ``export``: ``scripts/convert_to_hf.py CKPT HF --dtype bfloat16`` (AI2's dtype, native OLMoE);
  CKPT is deleted after it, so the disk holds at most CKPT + HF, then HF + IMP,
* ``import``: ``scripts/convert_from_hf.py HF IMP`` (fp32 model-only DCP, what training loads),
* ``check``: two tensors of IMP (the last layer's expert tensor, the embedding) equal the values
  ``make`` drew, redrawn from their seeds, bit for bit.

Peak RSS is the process's maximum resident set (``ru_maxrss``): it includes Python + torch
(reported separately as ``base``) and file pages mapped while reading, which the kernel can drop;
``peak anon`` (RssAnon, sampled every 10 ms) is the memory the conversion itself holds. The full
OLMoE-1B-7B (``--layers 16``: 27.7 GB fp32 checkpoint, 13.8 GB bf16 HF directory) needs about
42 GB of free disk under ``--work``; a run whose files would leave less than ``--min_free_gb``
free is refused before anything is written.

    python -m benchmarks.bench_convert [--layers 1,2,3] [--work /tmp/bench_convert]
    python -m benchmarks.bench_convert --quick   # smoke test: 1 and 2 layers of a tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks.bench_common import REPO, Benchmark, Run, repo_relative, run_benchmark

CONFIG = REPO / "configs" / "olmoe-1b-7b-swiglu.yaml"
QUICK_OVERRIDES = ["--model.d_model=64", "--model.n_heads=4", "--model.mlp_hidden_size=32",
                   "--model.moe_num_experts=4", "--model.moe_top_k=2", "--model.vocab_size=512",
                   "--model.embedding_size=512"]  # fmt: skip
GB = 1e9


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_config(layers: int, overrides: list[str]):
    from olmo.config import load_config

    return load_config(CONFIG, [*overrides, f"--model.n_layers={layers}"])


def _planned(layers: int, overrides: list[str]):
    """(train config, plan): every tensor drawn from its own seed when written."""
    from moe_model.hf.files import PlannedTensor

    cfg = _model_config(layers, overrides)
    plan = []
    for i, (name, meta) in enumerate(cfg.model.build("meta").state_dict().items()):
        def make(shape=tuple(meta.shape), seed=i):
            gen = torch.Generator().manual_seed(seed)
            # bf16-representable fp32 values: export to bf16 and import to fp32 are then exact.
            return torch.randn(shape, generator=gen, dtype=torch.bfloat16).float()
        plan.append(PlannedTensor(name, tuple(meta.shape), torch.float32, make))
    return cfg, plan


def _make_checkpoint(out: Path, layers: int, overrides: list[str]) -> dict:
    """A model-only training checkpoint, written one tensor at a time from seeded noise."""
    from olmo.checkpoint_io import save_model_dcp

    cfg, plan = _planned(layers, overrides)
    save_model_dcp(plan, cfg.to_yaml(), out)
    return {"params": cfg.model.num_params(),
            "largest_tensor_bytes": max(p.nbytes for p in plan),
            "fp32_bytes": sum(p.nbytes for p in plan)}


def _check(imported: Path, layers: int, overrides: list[str]) -> dict:
    from olmo.checkpoint_io import open_checkpoint

    _, plan = _planned(layers, overrides)
    drawn = {p.name: p for p in plan}
    source = open_checkpoint(imported)
    keys = [f"blocks.{layers - 1}.ffn.w_in_EDH", "embedding.weight"]
    return {"bitwise_equal": all(torch.equal(source.get(k), drawn[k].build()) for k in keys)}


class AnonPeak:
    """Largest anonymous resident memory (RssAnon) seen by a 10 ms sampler thread.

    ``ru_maxrss`` also counts file pages mapped while reading (page cache the kernel can drop),
    which grow with the file; RssAnon is the memory the conversion holds.
    """

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _anon() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._anon())

    def __enter__(self):
        self.peak = self._anon()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._anon())


def phase_main(argv: list[str]) -> int:
    """One phase in this process (started by ``measure``), its measurements as one JSON line."""
    name, layers, paths, overrides = argv[0], int(argv[1]), argv[2:4], argv[4:]
    # Peak so far: Python, torch and the project imported, nothing converted yet.
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with AnonPeak() as anon:
        start = time.perf_counter()
        if name == "make":
            extra = _make_checkpoint(Path(paths[0]), layers, overrides)
        elif name == "check":
            extra = _check(Path(paths[1]), layers, overrides)
        else:
            script, args = {
                "export": ("convert_to_hf", [*paths, "--dtype", "bfloat16", "--tokenizer", "none"]),
                "import": ("convert_from_hf", paths),
            }[name]
            rc = _load_script(script).main(args)
            if rc != 0:
                raise RuntimeError(f"{script} exited {rc}")
            extra = {}
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"phase": name, "seconds": seconds, "base_rss": base, "peak_rss": peak,
                      "peak_anon": anon.peak, **extra}))
    return 0


def _run_phase(name: str, layers: int, src: Path, dst: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", __spec__.name, "--phase", name, str(layers), str(src), str(dst), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {name} (L={layers}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _layer_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}; expected comma-separated layer counts >= 1")
    return counts


def add_arguments(p) -> None:
    p.add_argument("--layers", type=_layer_counts, default=[1, 2],
                   help="comma-separated layer counts (default 1,2; --quick: of a tiny model)")
    p.add_argument("--work", default="/tmp/bench_convert", help="scratch directory (deleted)")
    p.add_argument("--min_free_gb", type=float, default=8.0,
                   help="refuse a layer count whose files would leave less free disk than this")


def setup(run: Run) -> None:
    run.settings.update(layers=run.args.layers, config=repo_relative(CONFIG),
                        overrides=QUICK_OVERRIDES if run.quick else [],
                        work=str(run.args.work), min_free_gb=run.args.min_free_gb)


def measure(run: Run):
    overrides = run.settings["overrides"]
    for layers in run.settings["layers"]:
        work = Path(run.args.work) / f"L{layers}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cfg = _model_config(layers, overrides)
        fp32 = cfg.model.num_params() * 4
        # Disk at its fullest: the fp32 checkpoint and the bf16 export, or the export and the
        # fp32 import (the checkpoint is gone by then): fp32 + bf16 either way.
        need = fp32 + fp32 // 2
        free = shutil.disk_usage(work).free
        if free - need < run.args.min_free_gb * GB:
            shutil.rmtree(work)
            raise RuntimeError(f"L={layers} needs {need / GB:.1f} GB under {work}, which has "
                               f"{free / GB:.1f} GB free (--min_free_gb={run.args.min_free_gb})")
        ckpt, hf, imp = work / "ckpt", work / "hf", work / "imp"
        try:
            made = _run_phase("make", layers, ckpt, imp, overrides)
            export = _run_phase("export", layers, ckpt, hf, overrides)
            shutil.rmtree(ckpt)
            hf_bytes = _dir_bytes(hf)
            imported = _run_phase("import", layers, hf, imp, overrides)
            check = _run_phase("check", layers, ckpt, imp, overrides)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not check["bitwise_equal"]:
            run.fail(f"L={layers}: the imported tensors differ from the drawn ones")
        for step in (made, export, imported):
            yield {
                "layers": layers, "phase": step["phase"], "params": made["params"],
                "seconds": step["seconds"], "base_gb": step["base_rss"] / GB,
                "peak_gb": step["peak_rss"] / GB,
                "peak_minus_base_gb": (step["peak_rss"] - step["base_rss"]) / GB,
                "peak_anon_gb": step["peak_anon"] / GB,
                "fp32_model_gb": made["fp32_bytes"] / GB, "bf16_hf_gb": hf_bytes / GB,
                "largest_tensor_gb": made["largest_tensor_bytes"] / GB,
                "round_trip_bitwise": check["bitwise_equal"],
            }  # fmt: skip


BENCHMARK = Benchmark(
    name="convert_olmoe",
    result_name="convert_olmoe_cpu",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    progress=lambda r: f"L={r['layers']} {r['phase']}: {r['seconds']:.1f} s, peak RSS "
                       f"{r['peak_gb']:.2f} GB, peak anon {r['peak_anon_gb']:.2f} GB",
    columns=[
        ("layers", "L", ""), ("phase", "phase", ""), ("params", "params", ",d"),
        ("seconds", "time s", ".1f"), ("base_gb", "base RSS GB", ".2f"),
        ("peak_gb", "peak RSS GB", ".2f"), ("peak_minus_base_gb", "peak - base GB", ".2f"),
        ("peak_anon_gb", "peak anon GB", ".2f"),
        ("fp32_model_gb", "fp32 model GB", ".2f"), ("bf16_hf_gb", "HF dir GB", ".2f"),
        ("largest_tensor_gb", "largest fp32 tensor GB", ".2f"),
        ("round_trip_bitwise", "bitwise", ""),
    ],  # fmt: skip
    devices=("cpu",),
    timing=None,  # one conversion per phase and process: peak RSS only grows
)

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--phase"]:
        sys.exit(phase_main(argv[1:]))
    sys.exit(run_benchmark(BENCHMARK, argv))
