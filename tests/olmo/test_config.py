"""TrainConfig: YAML + overrides, strict keys, validation, and every shipped config builds."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from moe_model.config import ConfigError
from moe_model.errors import DataError
from olmo.config import TrainConfig, load_config, parse_duration

from .helpers import REPO, run_train

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert any(p.name == "tiny.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_builds_on_meta(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    model = cfg.model.build(init_device="meta")
    assert sum(p.numel() for p in model.parameters()) == cfg.model.num_params()
    assert all(p.device == torch.device("meta") for p in model.parameters())


def test_overrides_apply_and_interpolate():
    cfg = load_config(REPO / "configs/tiny.yaml", ["--model.d_model=64", "run_name=abc",
                                                   "--optimizer.betas=[0.8,0.9]"])
    assert cfg.model.d_model == 64
    assert cfg.save_folder == "runs/abc"
    assert cfg.optimizer.betas == [0.8, 0.9]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.not_a_key=1"], "unknown config key 'model.not_a_key'"),
        (["--model.d_modle=256"], "unknown config key 'model.d_modle'; did you mean 'model.d_model'?"),
        (["--sav_folder=x"], "unknown config key 'sav_folder'; did you mean 'save_folder'?"),
        (["--nope=1"], "unknown config key 'nope'"),
        (["--model.d_model=abc"], "model.d_model"),
        (["--model.activation_type=tanh"], "tanh"),
        (["--model.moe_top_k=9", "--model.moe_num_experts=8"], "moe_top_k"),
        (["--model.n_heads=5"], "n_heads"),
        (["--global_train_batch_size=0"], "global_train_batch_size=0 must be > 0"),
        (["--max_duration=ten"], "max_duration='ten'"),
        (["--optimizer.learning_rate=-1"], "optimizer.learning_rate"),
        (["--wandb.mode=sometimes"], "wandb.mode"),
        (["d_model"], "override 'd_model' must look like --key=value"),
        (["--data.validation={val:[x.npy]}"],
         "override 'data.validation={val:[x.npy]}': the value is not valid YAML (line 1, column 5): "
         "found unexpected ':' (a mapping needs a space after each ':', e.g. {name: [a, b]})"),
        (["--parallel.expert_parallel_degree=0"], "parallel.expert_parallel_degree=0 must be > 0"),
        (["--parallel.expert_parallel_degree=3"],
         "parallel.expert_parallel_degree=3 must divide model.moe_num_experts=8"),
        (["--parallel.expert_parallel_degree=2", "--model.block_type=dense"],
         "parallel.expert_parallel_degree=2 needs MoE blocks; model.block_type='dense'"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/tiny.yaml", overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def _tiny_with(tmp_path: Path, old: str, new: str) -> tuple[Path, int]:
    """configs/tiny.yaml with one line changed; (its path, the 1-based number of that line)."""
    lines = (REPO / "configs/tiny.yaml").read_text().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines, 1) if line.strip() == old)
    lines[number - 1] = lines[number - 1].replace(old, new)
    path = tmp_path / "tiny.yaml"
    path.write_text("".join(lines))
    return path, number


def test_yaml_syntax_error_names_the_line_to_fix(tmp_path):
    # PyYAML notices the missing ']' at the next line's ':'; the line to fix is the one before.
    path, number = _tiny_with(tmp_path, "betas: [0.9, 0.95]", "betas: [0.9, 0.95")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(
        f"config file '{path}' is not valid YAML (line {number}, column 10): a flow sequence "
        f"started here is not closed (expected ',' or ']', but got ':' at line {number + 1})"
    )
    # An unclosed quote: the line where it opened, not the end of the file.
    path, number = _tiny_with(tmp_path, "name: cosine_with_warmup", 'name: "cosine_with_warmup')
    with pytest.raises(ConfigError, match=rf"\(line {number}, column 9\): a quoted scalar"):
        load_config(path)
    # Errors noticed where they are keep that line (here a bad indent).
    path, number = _tiny_with(tmp_path, "seed: 6198", " seed: 6198")
    with pytest.raises(ConfigError, match=rf"\(line {number}, column 6\): mapping values"):
        load_config(path)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("d_model: 128", "d_modle: 128",
         "unknown config key 'model.d_modle'; did you mean 'model.d_model'?"),
        ("d_model: 128", "d_model: wide", "bad value for 'model.d_model'"),
        ("betas: [0.9, 0.95]", "betas: [0.9, fast]", "bad value for 'optimizer.betas[1]'"),
        ("save_interval: 50", "save_intervall: 50",
         "unknown config key 'save_intervall'; did you mean 'save_interval'?"),
    ],
)
def test_a_typo_in_a_yaml_file_names_the_file_and_line(tmp_path, old, new, message):
    path, number = _tiny_with(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"config file '{path}', line {number}: {message}")
    assert "\n" not in str(info.value)


def test_a_typo_in_a_base_file_names_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("run_name: a\nmodel:\n  n_layers: 2\n  moe_topk: 2\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "top.yaml")
    assert str(info.value).startswith(
        f"config file '{tmp_path / 'base.yaml'}', line 4: unknown config key 'model.moe_topk'; "
        "did you mean 'model.moe_top_k'?"
    )


def test_base_file_is_loaded_first_and_overlaid(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text(
        "run_name: root\nseed: 1\nsave_folder: runs/${run_name}\n"
        "optimizer: {learning_rate: 1.0e-3, betas: [0.8, 0.9]}\n"
        "model: {d_model: 64, n_heads: 4}\n"
    )
    # A chain: the middle file's base is relative to the middle file, not to the working dir.
    (tmp_path / "sub" / "middle.yaml").write_text(
        "base: ../root.yaml\nseed: 2\nmodel: {n_layers: 3}\n"
    )
    (tmp_path / "top.yaml").write_text(
        "base: sub/middle.yaml\nrun_name: top\n"
        "optimizer: {betas: [0.9, 0.99]}\nmodel: {d_model: 32}\n"
    )
    cfg = load_config(tmp_path / "top.yaml", ["--seed=3"])
    assert (cfg.run_name, cfg.seed, cfg.save_folder) == ("top", 3, "runs/top")
    assert cfg.optimizer.learning_rate == 1.0e-3 and cfg.optimizer.betas == [0.9, 0.99]
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers) == (32, 4, 3)
    assert "base" not in cfg.to_dict() and "base:" not in cfg.to_yaml()
    # Every key the files did not set keeps the dataclass default.
    assert cfg.to_dict() == load_config(None, [
        "--run_name=top", "--seed=3", "--save_folder=runs/top",
        "--optimizer.learning_rate=1.0e-3", "--optimizer.betas=[0.9,0.99]",
        "--model.d_model=32", "--model.n_heads=4", "--model.n_layers=3",
    ]).to_dict()  # fmt: skip


BAD_BASES = {
    "missing": ({"a.yaml": "base: missing.yaml\n"},
                "'{d}/missing.yaml' (the base of '{d}/a.yaml') does not exist"),
    "not-mapping": ({"a.yaml": "base: b.yaml\n", "b.yaml": "- 1\n"},
                    "'{d}/b.yaml' (the base of '{d}/a.yaml') must hold a mapping"),
    "bad-yaml": ({"a.yaml": "base: b.yaml\n", "b.yaml": "x: [1\n"},
                 "'{d}/b.yaml' (the base of '{d}/a.yaml') is not valid YAML"),
    "self-cycle": ({"a.yaml": "base: a.yaml\n"},
                   "'{d}/a.yaml': base files form a cycle: {d}/a.yaml -> {d}/a.yaml"),
    "cycle": ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"},
              "'{d}/b.yaml': base files form a cycle: {d}/a.yaml -> {d}/b.yaml -> {d}/a.yaml"),
    "not-a-name": ({"a.yaml": "base: [b.yaml]\n"},
                   "'{d}/a.yaml': base=['b.yaml'] must be a YAML file name"),
    "unknown-key-in-base": ({"a.yaml": "base: b.yaml\n", "b.yaml": "modle: {d_model: 8}\n"},
                            "unknown config key 'modle'"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_BASES)
def test_bad_base_is_one_line_naming_the_file(tmp_path, case):
    files, message = BAD_BASES[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "a.yaml")
    assert message.format(d=tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


def test_base_is_not_a_command_line_key():
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        load_config(REPO / "configs/tiny.yaml", ["--base=other.yaml"])


def test_parse_duration():
    assert parse_duration("1000") == ("steps", 1000)
    assert parse_duration("2ep") == ("epochs", 2)
    assert parse_duration("2e9T") == ("tokens", 2_000_000_000)
    with pytest.raises(ConfigError):
        parse_duration("1.5")


def test_batch_size_divisibility():
    cfg = load_config(REPO / "configs/tiny.yaml", ["--global_train_batch_size=12",
                                                   "--device_train_microbatch_size=4"])
    cfg.validate_batch_sizes(1)
    with pytest.raises(ConfigError, match="divisible by the number of data-parallel"):
        cfg.validate_batch_sizes(5)
    with pytest.raises(ConfigError, match="device_train_microbatch_size=4"):
        cfg.validate_batch_sizes(2)


def test_dry_run_prints_config_and_counts():
    proc = run_train([str(REPO / "configs/tiny.yaml"), "--dry-run", "--model.d_model=64"])
    assert proc.returncode == 0, proc.stderr
    *config_lines, counts_line = proc.stdout.strip().splitlines()
    cfg = load_config(REPO / "configs/tiny.yaml", ["--model.d_model=64"])
    assert yaml.safe_load("\n".join(config_lines)) == cfg.to_dict()
    counts = json.loads(counts_line)
    model = cfg.model.build(init_device="meta")
    assert counts["total_params"] == sum(p.numel() for p in model.parameters())
    assert counts["active_params"] == cfg.model.num_active_params()
    assert counts["flops_per_token"] == cfg.model.num_flops_per_token(cfg.model.max_sequence_length)


def test_dry_run_prints_the_data_mixture(tmp_path, capsys):
    import numpy as np

    from olmo.launch import main

    for name, tokens in (("web.npy", 2_000), ("code.npy", 640)):
        np.memmap(tmp_path / name, dtype=np.uint16, mode="w+", shape=(tokens,)).flush()
    overrides = ["--data.paths=[]", f"--data.sources.web.paths=[{tmp_path}/web.npy]",
                 "--data.sources.web.fraction=0.8", f"--data.sources.code.paths=[{tmp_path}/code.npy]",
                 "--data.sources.code.fraction=0.2", "--data.sources.web.max_repetition=3",
                 "--data.sources.code.max_repetition=3", "--max_duration=2"]  # fmt: skip
    assert main([str(REPO / "configs/tiny.yaml"), "--dry-run", *overrides]) == 0
    table = capsys.readouterr().out.split('"flops_per_token"')[1].splitlines()[1:]
    # 2,000 // 128 = 15 web sequences, each up to 3 times, at 80%: 56 per pass -> 3 batches of
    # 16, split 38 / 10. The run's 2 steps are 32 sequences, 2/3 of a pass.
    assert table[0] == "data mixture: 2 sources, 48 sequences x 128 = 6,144 tokens per pass"
    assert table[1] == "run: 4,096 tokens = 0.667 passes over the mix"
    assert table[3].split() == ["web", "80.000%", "79.167%", "4,864", "1,920", "2.53x", "1", "1.69x", "3x"]
    assert table[4].split() == ["code", "20.000%", "20.833%", "1,280", "640", "2.00x", "1", "1.33x", "3x"]

    # At max_repetition 1 a pass is one batch, and tiny's own 150 steps are 150 passes: web
    # would be used 130 times. The table is printed, then the run is refused in one line.
    assert main([str(REPO / "configs/tiny.yaml"), "--dry-run", *overrides[:-3]]) == DataError.exit_code
    out, err = capsys.readouterr()
    assert "run: 307,200 tokens = 150.000 passes over the mix" in out
    assert err.strip().splitlines() == [
        "error: data.sources.web: a run of 307,200 tokens (150.00 passes over the mix) uses its "
        "1,920 tokens 130.00 times, more than max_repetition 1; expected a larger max_repetition, "
        "more data for 'web', a smaller fraction or a shorter max_duration"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.foo=1"], "unknown config key 'model.foo'"),
        # The same CLI path for other keys (slow: a process each; test_bad_values_name_the_key
        # and test_reliability.py's bad-input tests check their messages in one process).
        pytest.param(["--model.activation_type=tanh"], "tanh", marks=pytest.mark.slow),
        pytest.param(["--model.moe_top_k=99"], "moe_top_k", marks=pytest.mark.slow),
        pytest.param(["--data.paths=[/nonexistent/dir/*.npy]"], "/nonexistent/dir/*.npy",
                     marks=pytest.mark.slow),
    ],
)
def test_cli_errors_exit_nonzero_with_one_line(tmp_path, args, message):
    save = tmp_path / "run"
    proc = run_train([str(REPO / "configs/tiny.yaml"), f"--save_folder={save}", *args])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not save.exists(), "nothing may be written before the inputs are checked"


def test_routing_options_from_overrides():
    """The MoE routing options through YAML + overrides: null-able numbers from strings, one-line
    errors for bad values."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "--model.moe_router_score=sigmoid", "--model.moe_zloss_weight=0",
        "--model.moe_bias_update_rate=1e-3", "--model.moe_capacity_factor=1.25",
        "--model.moe_shared_experts=1", "--model.moe_first_dense_layers=1",
    ])  # fmt: skip
    m = cfg.model
    assert (m.moe_bias_update_rate, m.moe_capacity_factor) == (1e-3, 1.25)
    assert m.moe_layer_ids == [1, 2, 3]
    assert load_config(REPO / "configs" / "tiny.yaml").model.moe_capacity_factor is None
    with pytest.raises(ConfigError, match="model.moe_router_score='relu' must be one of"):
        load_config(REPO / "configs" / "tiny.yaml", ["--model.moe_router_score=relu"])


def test_expert_parallel_degree_must_divide_the_processes(tmp_path, monkeypatch, capsys):
    """Checked in preflight from WORLD_SIZE, before any process group exists; nothing written."""
    from olmo.launch import main

    monkeypatch.setenv("WORLD_SIZE", "6")
    save = tmp_path / "run"
    code = main([str(REPO / "configs/tiny.yaml"), f"--save_folder={save}",
                 "--global_train_batch_size=48", "--parallel.expert_parallel_degree=4"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == ["error: parallel.expert_parallel_degree=4 must divide the number of "
                     "processes (6)"], err
    assert not save.exists()
    assert not torch.distributed.is_initialized()


def test_training_config_refuses_forced_balance():
    with pytest.raises(ConfigError, match=r"^model.moe_force_balance=true is for benchmarks"):
        load_config(None, ["--model.moe_force_balance=true"])
