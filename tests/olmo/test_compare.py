"""Activation comparison: interpolation and aggregation units, and a tiny sweep end to end with
resume (2 activations x 2 seeds, 4 steps each, on synthetic vocab-512 data)."""

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from olmo.compare import (
    RunSpec,
    _stack_common,
    aggregate,
    expected_final_step,
    plan_sweep,
    run_is_complete,
    smooth,
    tokens_to_reach,
    write_report,
)
from olmo.config import ConfigError, load_config

from .helpers import REPO, TEST_CONFIG, assert_png_drawn, make_data, read_metrics, tiny_overrides

TINY = str(REPO / "configs/tiny.yaml")
SCRIPT = REPO / "scripts" / "compare_activations.py"
STEPS = 4


def test_tokens_to_reach_interpolates_on_the_running_minimum():
    tokens = np.array([100.0, 200.0, 300.0, 400.0])
    loss = np.array([5.0, 4.0, 4.5, 3.0])
    assert tokens_to_reach(tokens, loss, 4.0) == pytest.approx(200.0)
    assert tokens_to_reach(tokens, loss, 4.5) == pytest.approx(150.0)
    # The bump at 300 is ignored: best-so-far stays 4.0 until 400.
    assert tokens_to_reach(tokens, loss, 3.5) == pytest.approx(300.0 + 100.0 * 0.5 / 1.0)
    assert tokens_to_reach(tokens, loss, 2.0) is None
    assert tokens_to_reach(tokens, loss, 9.0) == 100.0


def test_stack_common_and_smooth():
    grid, rows = _stack_common([(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])),
                                (np.array([2.0, 3.0]), np.array([5.0, 4.0]))])
    assert grid.tolist() == [2.0, 3.0]
    assert rows.tolist() == [[2.0, 1.0], [5.0, 4.0]]
    assert smooth(np.array([1.0, 3.0, 5.0]), 2).tolist() == [1.0, 2.0, 4.0]


def test_plan_uses_equal_parameter_hidden_sizes(tmp_path):
    plan = plan_sweep(TINY, activations=["swiglu", "polynorm", "gelu"], seeds=[0, 1],
                      out_dir=tmp_path / "sw", overrides=["--max_duration=30"])
    sizes = {r.activation: r.hidden_size for r in plan.runs}
    # tiny.yaml is polynorm at 384 = SwiGLU at 256.
    assert sizes == {"swiglu": 256, "polynorm": 384, "gelu": 384}
    assert len(plan.runs) == 6 and {r.final_step for r in plan.runs} == {30}
    run = next(r for r in plan.runs if r.activation == "swiglu" and r.seed == 1)
    cfg = load_config(TINY, run.overrides)
    assert cfg.model.activation_type == "swiglu" and cfg.seed == 1
    assert cfg.wandb.group == "sw"
    polynorm = load_config(TINY, plan.runs[2].overrides)
    assert polynorm.model.activation_type == "polynorm"
    # Equal expert weights; PolyNorm adds its 4 coefficients per layer (4 layers).
    assert cfg.model.num_params() == polynorm.model.num_params() - 4 * 4
    assert expected_final_step(load_config(TINY, ["max_duration=4096T", "stop_at=1"])) == 1


def test_plan_sizes_the_gated_poly_forms_like_swiglu(tmp_path):
    plan = plan_sweep(TINY, activations=["polynorm", "polynorm_glu", "polyrelu_glu"], seeds=[0],
                      out_dir=tmp_path / "g")
    # tiny.yaml is polynorm at 384: the gated forms' three matrices make it 256, as for SwiGLU.
    assert {r.activation: r.hidden_size for r in plan.runs} == {
        "polynorm": 384, "polynorm_glu": 256, "polyrelu_glu": 256,
    }
    models = {r.activation: load_config(TINY, r.overrides).model for r in plan.runs}
    assert models["polynorm_glu"].num_params() == models["polynorm"].num_params()
    assert models["polyrelu_glu"].num_params() == models["polynorm"].num_params()


def test_run_is_complete_reads_the_final_step(tmp_path):
    spec = RunSpec("gelu", 0, 8, "r", tmp_path, [], final_step=3)
    assert not run_is_complete(spec)
    lines = [{"step": s, "tokens": s, "train/CrossEntropyLoss": 1.0} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "{torn")
    assert not run_is_complete(spec)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write("\n" + json.dumps({"step": 3, "tokens": 3, "train/CrossEntropyLoss": 1.0}) + "\n")
    assert run_is_complete(spec)


@pytest.mark.parametrize("vocab, token_dtype", [(512, np.uint16), (100_000, np.uint32)])
def test_expected_final_step_of_epochs_reads_the_token_width(tmp_path, vocab, token_dtype):
    """Regression: olmo/compare counted 2-byte tokens, where olmo/data stores a vocabulary
    above 65,536 ids as uint32; the epoch length it expected was then twice the real one and
    no run of a large-vocabulary sweep ever counted as complete."""
    seq, batch, epochs = 32, 8, 2
    tokens = 3 * seq * batch + seq + 5  # 3 whole batches, a part batch, a part sequence
    (np.arange(tokens) % vocab).astype(token_dtype).tofile(tmp_path / "train-0.npy")
    cfg = load_config(TEST_CONFIG, [
        f"--data.paths=[{tmp_path}/train-*.npy]", f"--model.vocab_size={vocab}",
        f"--model.embedding_size={vocab}", f"--model.max_sequence_length={seq}",
        f"--global_train_batch_size={batch}", f"--max_duration={epochs}ep",
    ])  # fmt: skip
    assert cfg.data.dtype is None  # the width follows the vocabulary, as in training
    assert expected_final_step(cfg) == epochs * (tokens // seq // batch) == 6



def test_a_mixture_run_in_epochs_can_be_complete(tmp_path):
    """Regression: expected_final_step globbed data.paths only (non-recursively), so a mixture
    (data.sources) run had no final step and run_is_complete never held."""
    seq, batch = 32, 8
    for name, files in (("web", 6), ("code", 2)):
        for i in range(files):  # one directory deeper than the glob's root: needs '**'
            path = tmp_path / name / f"shard{i}" / "part-0.npy"
            path.parent.mkdir(parents=True)
            (np.arange(3 * seq + 7) % 512).astype(np.uint16).tofile(path)
    cfg = load_config(TEST_CONFIG, [
        f"--data.sources.web.paths=[{tmp_path}/web/**/*.npy]", "--data.sources.web.fraction=0.75",
        f"--data.sources.code.paths=[{tmp_path}/code/**/*.npy]", "--data.sources.code.fraction=0.25",
        "--model.vocab_size=512", "--model.embedding_size=512", f"--model.max_sequence_length={seq}",
        f"--global_train_batch_size={batch}", "--max_duration=1ep",
    ])  # fmt: skip
    # One pass: web's 18 sequences at 75% (and code's 6 at 25%) -> 24 = 3 whole batches of 8.
    assert expected_final_step(cfg) == 3
    spec = RunSpec("gelu", 0, 8, "r", tmp_path / "run", [], expected_final_step(cfg))
    spec.save_folder.mkdir()
    lines = [{"step": s, "tokens": s, "train/CrossEntropyLoss": 1.0} for s in range(1, 4)]
    (spec.save_folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert run_is_complete(spec)

def _compare(tmp_path, out, data, *extra):
    overrides = [o for o in tiny_overrides(tmp_path / "unused", data, max_duration=STEPS,
                                           eval_interval=2, save_interval=2)
                 if not o.startswith("--save_folder")]
    cmd = [sys.executable, str(SCRIPT), TEST_CONFIG, "--out", str(out), "--activations",
           "swiglu,polynorm", "--seeds", "0,1", "--wandb-mode", "disabled", *overrides, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_sweep_end_to_end_and_resume(tmp_path):
    data = make_data(tmp_path)
    out = tmp_path / "sweep"
    stdout = _compare(tmp_path, out, data)
    assert stdout.count(": training") == 4

    assert_png_drawn(out / "compare_activations.png")
    svg = ET.parse(out / "compare_activations.svg").getroot()
    assert svg.tag.endswith("svg") and len(list(svg.iter("{http://www.w3.org/2000/svg}path"))) > 10
    rows = list(csv.DictReader((out / "compare_activations.csv").open()))
    assert [r["activation"] for r in rows] == ["swiglu", "polynorm"]
    # Every number recomputed here from the runs' own metrics.jsonl.
    final_val, val_curve = {}, {}
    for r in rows:
        act = r["activation"]
        runs = [read_metrics(out / "runs" / f"{act}-s{seed}") for seed in (0, 1)]
        val = [[m["eval/val/CrossEntropyLoss"] for m in recs if "eval/val/CrossEntropyLoss" in m]
               for recs in runs]
        assert [len(v) for v in val] == [2, 2]  # evaluated at steps 2 and 4
        final_val[act] = [v[-1] for v in val]
        val_curve[act] = [(a + b) / 2 for a, b in zip(*val)]
        tps = [statistics.median(m["throughput/device/TPS"] for m in recs
                                 if "throughput/device/TPS" in m and m["step"] > 1) for recs in runs]
        assert r["seeds"] == "2"
        assert int(r["tokens"]) == STEPS * 8 * 32
        assert float(r["val_loss_mean"]) == pytest.approx(statistics.mean(final_val[act]), rel=1e-9)
        assert float(r["val_loss_std"]) == pytest.approx(statistics.stdev(final_val[act]), rel=1e-6)
        assert float(r["val_loss_min"]) == pytest.approx(min(final_val[act]), rel=1e-9)
        assert float(r["val_loss_max"]) == pytest.approx(max(final_val[act]), rel=1e-9)
        assert float(r["tokens_per_s"]) == pytest.approx(statistics.mean(tps), rel=1e-9)
    assert float(rows[0]["token_efficiency_vs_swiglu"]) == pytest.approx(1.0)
    # PolyNorm's efficiency: the tokens SwiGLU's mean validation curve (best so far, linear
    # between the evaluations at 2 and 4 steps) needs to reach PolyNorm's final mean loss,
    # over PolyNorm's tokens; when it never gets there, a lower bound of 1.
    target = statistics.mean(final_val["polynorm"])
    (t0, t1), (l0, l1) = (2 * 8 * 32, 4 * 8 * 32), val_curve["swiglu"]
    l1 = min(l0, l1)
    if l0 <= target:
        needed, bound = t0, "<" if l0 < target else ""
    elif l1 <= target:
        needed, bound = t0 + (l0 - target) / (l0 - l1) * (t1 - t0), ""
    else:
        needed, bound = t1, ">"
    assert rows[1]["efficiency_bound"] == bound
    assert float(rows[1]["token_efficiency_vs_swiglu"]) == pytest.approx(needed / t1, rel=1e-9)
    md = (out / "compare_activations.md").read_text()
    assert "| swiglu | 32 | 2 |" in md and "| polynorm | 48 | 2 |" in md

    # Interrupt: one run lost everything after its step-2 checkpoint, another never started.
    runs = out / "runs"
    partial = runs / "polynorm-s1"
    shutil.rmtree(partial / "step4")
    lines = (partial / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    shutil.rmtree(runs / "swiglu-s1")
    finished = [runs / "swiglu-s0", runs / "polynorm-s0"]
    before = {p: (p / "metrics.jsonl").stat().st_mtime_ns for p in finished}

    stdout = _compare(tmp_path, out, data)
    assert stdout.count("skipped") == 2
    assert "polynorm-s1: resuming" in stdout and "swiglu-s1: training" in stdout
    assert {p: (p / "metrics.jsonl").stat().st_mtime_ns for p in finished} == before
    records = [json.loads(x) for x in (partial / "metrics.jsonl").read_text().splitlines()]
    # Resumed from step 2: each step's training loss once, up to the final step.
    assert [r["step"] for r in records if "train/CrossEntropyLoss" in r] == [1, 2, 3, 4]
    rows = list(csv.DictReader((out / "compare_activations.csv").open()))
    assert [r["seeds"] for r in rows] == ["2", "2"]


# ---- variants ------------------------------------------------------------------------------------

DEEPSEEK = ["model.moe_router_score=sigmoid", "model.moe_zloss_weight=0",
            "model.moe_bias_update_rate=1e-3", "model.moe_shared_experts=1",
            "model.moe_shared_hidden_size=192", "model.moe_first_dense_layers=1",
            "model.moe_first_dense_hidden_size=768"]


def test_plan_variants_equal_parameters_per_cell(tmp_path):
    """tiny.yaml is PolyNorm at 384; the 'deepseek' variant adds a shared expert and a dense
    first block sized for PolyNorm too (192 and 768), and 'wide' changes the routed size. Each cell converts its own variant's sizes, and within a variant
    SwiGLU and PolyNorm have equal parameters (up to PolyNorm's 4 coefficients per FFN)."""
    plan = plan_sweep(TINY, activations=["swiglu", "polynorm"], seeds=[0], out_dir=tmp_path / "v",
                      overrides=["--max_duration=30"],
                      variants={"deepseek": DEEPSEEK, "wide": ["model.mlp_hidden_size=768"]})
    cells = {(r.variant, r.activation): r for r in plan.runs}
    assert len(plan.runs) == 4 and plan.variants() == ["deepseek", "wide"]
    assert cells["deepseek", "swiglu"].hidden_size == 256 and cells["wide", "swiglu"].hidden_size == 512
    swiglu = load_config(TINY, cells["deepseek", "swiglu"].overrides).model
    assert (swiglu.moe_shared_hidden_size, swiglu.moe_first_dense_hidden_size) == (128, 512)
    polynorm = load_config(TINY, cells["deepseek", "polynorm"].overrides).model
    assert polynorm.moe_router_score == swiglu.moe_router_score == "sigmoid"
    # FFNs with coefficients: 3 routed layers x 1 set, 3 shared experts, 1 dense block.
    assert swiglu.num_params() == polynorm.num_params() - 4 * (3 + 3 + 1)
    assert cells["wide", "polynorm"].save_folder == tmp_path / "v" / "runs" / "wide" / "polynorm-s0"
    assert cells["wide", "polynorm"].run_name == "v-wide-polynorm-s0"


def test_plan_variant_without_an_equal_parameter_size_fails():
    with pytest.raises(ConfigError, match="model.moe_shared_hidden_size=100 .*no exact"):
        plan_sweep(TINY, activations=["swiglu"], out_dir="unused",
                   variants={"odd": ["model.moe_shared_experts=1",
                                     "model.moe_shared_hidden_size=100"]})


def _fake_run(folder, losses, tokens_per_step=100):
    folder.mkdir(parents=True)
    lines = [{"step": i + 1, "tokens": (i + 1) * tokens_per_step, "train/CrossEntropyLoss": loss,
              "eval/val/CrossEntropyLoss": loss + 0.1} for i, loss in enumerate(losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_variants_aggregate_and_compare_within_each_variant(tmp_path):
    plan = plan_sweep(TINY, activations=["swiglu", "polynorm"], seeds=[0, 1],
                      out_dir=tmp_path / "v", overrides=["--max_duration=3"],
                      variants={"a": [], "b": ["model.moe_shared_experts=1"]})
    # Variant a: PolyNorm reaches SwiGLU's final loss; variant b: PolyNorm is worse.
    curves = {("a", "swiglu"): [4.0, 3.0, 2.0], ("a", "polynorm"): [3.5, 2.5, 2.0],
              ("b", "swiglu"): [4.0, 3.0, 1.0], ("b", "polynorm"): [4.0, 3.5, 3.0]}
    for spec in plan.runs:
        _fake_run(spec.save_folder, curves[spec.variant, spec.activation])
    result = aggregate(plan)
    rows = {(s.variant, s.activation): s.row() for s in result.summaries}
    assert rows["a", "polynorm"]["val_loss_mean"] == pytest.approx(2.1)
    assert rows["a", "polynorm"]["token_efficiency_vs_swiglu"] == pytest.approx(1.0)
    # Validation losses are the training ones + 0.1: variant b's SwiGLU reaches PolyNorm's
    # final 3.1 at its second evaluation, 200 of PolyNorm's 300 tokens.
    assert rows["b", "polynorm"]["token_efficiency_vs_swiglu"] == pytest.approx(200 / 300)
    paths = write_report(result, tmp_path / "report")
    md = paths["md"].read_text()
    assert "| variant | activation |" in md and "| b | polynorm |" in md
    assert [r["variant"] for r in csv.DictReader(paths["csv"].open())] == ["a", "a", "b", "b"]
    assert_png_drawn(paths["png"])


@pytest.mark.slow
def test_variant_cli_errors_are_one_line():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), TINY, "--out", "unused", "--variant", "a", "model.x"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --variant a: 'model.x' must look like KEY=VALUE")


@pytest.mark.slow
def test_report_without_complete_runs_is_one_error_line(tmp_path):
    out = tmp_path / "empty"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), TINY, "--out", str(out), "--activations", "swiglu,polynorm",
         "--seeds", "0", "--report-only", "--wandb-mode", "disabled"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: --out {str(out)!r}: no complete runs to report (2 planned, none has finished)"]


def test_optimizer_2x2_report_under_its_own_stem(tmp_path):
    """The AdamW x Muon sweep's report goes to --report-dir under --report-stem, beside (not over)
    another sweep's compare_activations.* there, with one row per (optimizer, activation)."""
    out, docs = tmp_path / "2x2", tmp_path / "docs"
    variants = {"adamw": ["optimizer.name=adamw"], "muon": ["optimizer.name=muon"]}
    plan = plan_sweep(TINY, activations=["swiglu", "polynorm"], seeds=[0, 1], out_dir=out,
                      overrides=["--max_duration=3"], variants=variants)
    assert {load_config(TINY, r.overrides).optimizer.name for r in plan.runs if r.variant == "muon"} == {"muon"}
    curves = {("adamw", "swiglu"): [4.0, 3.0, 2.0], ("adamw", "polynorm"): [3.5, 2.5, 2.0],
              ("muon", "swiglu"): [3.0, 2.0, 1.0], ("muon", "polynorm"): [3.0, 2.5, 2.0]}
    for spec in plan.runs:
        _fake_run(spec.save_folder, curves[spec.variant, spec.activation])
    docs.mkdir()
    (docs / "compare_activations.png").write_bytes(b"the README's figure")
    cmd = [sys.executable, str(SCRIPT), TINY, "--out", str(out), "--activations", "swiglu,polynorm",
           "--seeds", "0,1", "--report-only", "--wandb-mode", "disabled", "--report-dir", str(docs),
           "--variant", "adamw", "optimizer.name=adamw", "--variant", "muon", "optimizer.name=muon",
           "--max_duration=3"]
    proc = subprocess.run([*cmd, "--report-stem", "compare_2x2"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in docs.iterdir()) == [
        "compare_2x2.csv", "compare_2x2.md", "compare_2x2.png", "compare_2x2.svg",
        "compare_activations.png"]
    assert (docs / "compare_activations.png").read_bytes() == b"the README's figure"
    assert_png_drawn(docs / "compare_2x2.png")
    rows = {(r["variant"], r["activation"]): r for r in csv.DictReader((docs / "compare_2x2.csv").open())}
    assert list(rows) == [("adamw", "swiglu"), ("adamw", "polynorm"), ("muon", "swiglu"), ("muon", "polynorm")]
    # Final validation loss = last training loss + 0.1, the same for both seeds.
    assert [float(r["val_loss_mean"]) for r in rows.values()] == pytest.approx([2.1, 2.1, 1.1, 2.1])
    # Against SwiGLU of the same optimizer: Muon's SwiGLU reaches PolyNorm's 2.1 at 200 of 300 tokens.
    assert float(rows["adamw", "polynorm"]["token_efficiency_vs_swiglu"]) == pytest.approx(1.0)
    assert float(rows["muon", "polynorm"]["token_efficiency_vs_swiglu"]) == pytest.approx(200 / 300)

    bad = subprocess.run([*cmd, "--report-stem", "docs/x"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --report-stem 'docs/x': expected a file name without a directory or suffix, e.g. compare_2x2"]
