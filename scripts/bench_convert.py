#!/usr/bin/env python
"""Time and peak host memory of HF export and import at OLMoE-1B-7B shapes.

For each layer count L: a training checkpoint of configs/olmoe-1b-7b-swiglu.yaml with
``n_layers=L`` (every other size as OLMoE-1B-7B: D 2048, 64 experts of H 1024, vocab 50304) is
written tensor by tensor from the meta-built model (random values, bf16-representable so the
round trip can be checked bitwise); then, each in its own process (a process's peak RSS only
grows):

* ``export``: ``scripts/convert_to_hf.py CKPT HF --dtype bfloat16`` (AI2's dtype, native OLMoE),
* ``import``: ``scripts/convert_from_hf.py HF IMP`` (fp32 model-only DCP, what training loads),
* ``check``: two tensors of IMP equal CKPT's bit for bit (the biggest expert tensor, the embedding).

Peak RSS is the process's maximum resident set (``ru_maxrss``): it includes Python + torch
(reported separately as ``base``) and the file pages mapped while reading safetensors, which grow
with the file and which the kernel can drop; ``peak anon`` (RssAnon, sampled every 10 ms) is the
memory the conversion itself holds. A full OLMoE-1B-7B (16 layers, 13.8 GB in bf16,
27.7 GB in fp32) does not fit a 24 GiB machine shared with other jobs, so run fewer layers and
extrapolate: time is linear in L, peak memory of a streaming conversion is not.

    python scripts/bench_convert.py [--layers 1,2] [--work /tmp/bench_convert]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_common import REPO, environment, format_table, write_json  # noqa: E402

CONFIG = REPO / "configs" / "olmoe-1b-7b-swiglu.yaml"
GB = 1e9


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make_checkpoint(out: Path, layers: int) -> dict:
    """A model-only training checkpoint, written one tensor at a time from seeded noise."""
    from moe_model.hf.files import PlannedTensor
    from olmo.checkpoint_io import save_model_dcp
    from olmo.config import load_config

    cfg = load_config(CONFIG, [f"--model.n_layers={layers}"])
    plan = []
    for i, (name, meta) in enumerate(cfg.model.build("meta").state_dict().items()):
        def make(shape=tuple(meta.shape), seed=i):
            gen = torch.Generator().manual_seed(seed)
            # bf16-representable fp32 values: export to bf16 and import to fp32 are then exact.
            return torch.randn(shape, generator=gen, dtype=torch.bfloat16).float()
        plan.append(PlannedTensor(name, tuple(meta.shape), torch.float32, make))
    save_model_dcp(plan, cfg.to_yaml(), out)
    return {"params": cfg.model.num_params(),
            "largest_tensor_bytes": max(p.nbytes for p in plan),
            "fp32_bytes": sum(p.nbytes for p in plan)}


def _check(ckpt: Path, imported: Path, layers: int) -> dict:
    from olmo.checkpoint_io import open_checkpoint

    a, b = open_checkpoint(ckpt), open_checkpoint(imported)
    keys = [f"blocks.{layers - 1}.ffn.w_in_EDH", "embedding.weight"]
    return {"bitwise_equal": all(torch.equal(a.get(k), b.get(k)) for k in keys)}


class AnonPeak:
    """Largest anonymous resident memory (RssAnon) seen by a 10 ms sampler thread.

    ``ru_maxrss`` also counts file pages mapped while reading safetensors (page cache the
    kernel can drop), which grow with the file; RssAnon is the memory the conversion holds.
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
        return 0

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


def phase(name: str, args: list[str]) -> None:
    """Run one phase in this process and print its measurements as one JSON line."""
    # Peak so far: Python, torch and the project imported, nothing converted yet.
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with AnonPeak() as anon:
        start = time.perf_counter()
        if name == "make":
            extra = _make_checkpoint(Path(args[0]), int(args[1]))
        elif name == "check":
            extra = _check(Path(args[0]), Path(args[1]), int(args[2]))
        else:
            script = {"export": "convert_to_hf", "import": "convert_from_hf"}[name]
            rc = _load_script(script).main(args)
            assert rc == 0, rc
            extra = {}
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"phase": name, "seconds": seconds, "base_rss": base, "peak_rss": peak,
                      "peak_anon": anon.peak, **extra}))


def run_phase(name: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--phase", name, *args], env=env,
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,2", help="comma-separated layer counts")
    parser.add_argument("--work", default="/tmp/bench_convert", help="scratch directory (deleted)")
    parser.add_argument("--name", default="convert_olmoe_cpu", help="benchmarks/results/<name>.json")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.phase:
        phase(args.phase, rest)
        return 0

    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        work = Path(args.work) / f"L{layers}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        made = run_phase("make", str(work / "ckpt"), str(layers))
        export = run_phase("export", str(work / "ckpt"), str(work / "hf"), "--dtype", "bfloat16",
                           "--tokenizer", "none")
        hf_bytes = dir_bytes(work / "hf")
        imported = run_phase("import", str(work / "hf"), str(work / "imp"))
        check = run_phase("check", str(work / "ckpt"), str(work / "imp"), str(layers))
        shutil.rmtree(work)
        for step in (made, export, imported):
            rows.append({
                "layers": layers, "phase": step["phase"], "params": made["params"],
                "seconds": step["seconds"], "base_gb": step["base_rss"] / GB,
                "peak_gb": step["peak_rss"] / GB,
                "peak_minus_base_gb": (step["peak_rss"] - step["base_rss"]) / GB,
                "peak_anon_gb": step["peak_anon"] / GB,
                "fp32_model_gb": made["fp32_bytes"] / GB, "bf16_hf_gb": hf_bytes / GB,
                "largest_tensor_gb": made["largest_tensor_bytes"] / GB,
                "round_trip_bitwise": check["bitwise_equal"],
            })
    columns = [("layers", "L", ""), ("phase", "phase", ""), ("params", "params", ",d"),
               ("seconds", "time s", ".1f"), ("base_gb", "base RSS GB", ".2f"),
               ("peak_gb", "peak RSS GB", ".2f"), ("peak_minus_base_gb", "peak - base GB", ".2f"),
               ("peak_anon_gb", "peak anon GB", ".2f"),
               ("fp32_model_gb", "fp32 model GB", ".2f"), ("bf16_hf_gb", "HF dir GB", ".2f"),
               ("largest_tensor_gb", "largest fp32 tensor GB", ".2f"),
               ("round_trip_bitwise", "bitwise", "")]
    print(format_table(rows, columns))
    path = write_json(args.name, {"environment": environment(torch.device("cpu")),
                                  "config": str(CONFIG.relative_to(REPO)), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
