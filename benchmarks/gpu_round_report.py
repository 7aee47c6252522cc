"""JSON records of the GPU round (scripts/gpu_round.sh) that no benchmark script writes.

    python -m benchmarks.gpu_round_report pretrain OUT.json RUN_DIR [RUN_DIR ...]
    python -m benchmarks.gpu_round_report summary OUT.json PARTS_TSV SETUP_LOG

``pretrain``: per run (one ``run_pretrain.sh`` run, its ``command.txt`` and ``metrics.jsonl``),
the loss curve, validation losses, median tokens/s and MFU over the timed steps, and the
final train loss (mean of the last 10 steps). ``summary``: each part's exit status and
duration, and the setup log (versions, ``pip check``). Both carry the environment header of
the benchmarks (device, torch/Triton versions, git revision, command, date).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.bench_common import environment, pick_device
from olmo import metric_names as names
from olmo.run_files import METRICS_FNAME

CE, TPS, MFU = names.CE_LOSS, names.TOKENS_PER_SECOND, names.MFU


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def pretrain_record(run_dir: Path) -> dict:
    lines = (run_dir / METRICS_FNAME).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    train = [r for r in records if CE in r]
    evals = {
        key: [(r["step"], r[key]) for r in records if key in r]
        for key in sorted({k for r in records for k in r if names.eval_loss_label(k) is not None})
    }
    last = [r[CE] for r in train[-10:]]
    command = run_dir / "command.txt"
    return {
        "run": run_dir.name,
        "command": command.read_text().strip() if command.is_file() else None,
        "steps": len(train),
        "tokens": train[-1]["tokens"] if train else None,
        "first_loss": train[0][CE] if train else None,
        "final_loss_last10": sum(last) / len(last) if last else None,
        "median_tokens_per_s": _median([r[TPS] for r in train if TPS in r]),
        "median_mfu_pct": _median([r[MFU] for r in train if MFU in r]),
        "eval": evals,
        "loss_curve": [(r["step"], r[CE]) for r in train],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    pre = sub.add_parser("pretrain")
    pre.add_argument("out", type=Path)
    pre.add_argument("runs", type=Path, nargs="+")
    summ = sub.add_parser("summary")
    summ.add_argument("out", type=Path)
    summ.add_argument("parts", type=Path, help="TSV: part, exit status, seconds, command")
    summ.add_argument("setup_log", type=Path)
    summ.add_argument("--round-command", default=None)
    args = p.parse_args(argv)

    payload: dict = {"env": environment(pick_device("auto"))}
    if args.what == "pretrain":
        payload["benchmark"] = "pretrain"
        payload["runs"] = [pretrain_record(run) for run in args.runs if (run / METRICS_FNAME).is_file()]
        payload["missing"] = [str(run) for run in args.runs if not (run / METRICS_FNAME).is_file()]
        for run in payload["runs"]:
            print(
                f"  {run['run']:24s} {run['steps']:4d} steps  loss {run['first_loss']} -> "
                f"{run['final_loss_last10']}  {run['median_tokens_per_s']} tok/s"
            )
    else:
        payload["benchmark"] = "gpu_round"
        payload["round_command"] = args.round_command
        payload["git_rev_given"] = os.environ.get("GIT_REV")
        payload["parts"] = [
            {"part": part, "exit_status": int(rc), "seconds": float(sec), "command": command}
            for part, rc, sec, command in (
                line.split("\t")
                for line in (args.parts.read_text() if args.parts.is_file() else "").splitlines()
            )
        ]
        payload["cuda_available"] = torch.cuda.is_available()
        payload["setup_log"] = args.setup_log.read_text() if args.setup_log.is_file() else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
