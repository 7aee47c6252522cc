"""Dolma-tokenized token files in, deterministic resumable batches out.

Input: the `.npy` files that `dolma tokens` writes (see scripts/tokenize.sh). They are raw,
headerless little-endian memmaps (`np.load` cannot read them), with EOS after every document.
olmo-core's `NumpyFSLDataset` reads exactly that: it chunks each file into fixed-length
sequences (a file's tail shorter than one sequence is dropped) and its `NumpyFSLDataLoader`
shuffles them globally from the seed, splits each global batch over data-parallel ranks and
keeps its position in `state_dict()`. This package configures those two, checks the files
before training, and turns the mistakes a user can make into one-line `DataError`s.

Modules, each with one job (everything public is importable from `olmo.data`):
`config.py` the `data:` section; `files.py` globs and object URLs resolved, token dtype, cheap
file checks; `mixture.py` a mixture's per-pass plan and a duration's length in sequences;
`plan.py` the run's `DataPlan` (made once, checked by `validate_data`); `loaders.py` datasets,
the collator and the train/eval loaders.

Batch contract (what the trainer receives): a dict with "input_ids" (LongTensor [B, S]) and
"index" (LongTensor [B], the global sequence index); for document masking also "doc_ids"
(LongTensor [B, S], each token's document, from the EOS the files were written with). Eval batches also carry "instance_mask"
(BoolTensor [B]): False marks the padding rows that fill the last batch, so that every
validation sequence is evaluated exactly once; `olmo_core.data.utils.get_labels` masks them.

Outside olmo-core's Trainer, follow its loader contract: `loader.reshuffle(epoch=e)` before
iterating an epoch, `loader.reset()` after it.

Mixtures (`data.sources`, instead of `data.paths`): named sources, each with its files, a target
fraction of the training tokens and a repetition limit. `plan_mixture` decides how many whole
sequences each source contributes to one pass over the mixture (an epoch), `Mixture.check_run`
holds the whole run to the repetition limits; `MixtureDataset` serves each pass's sequences (a
different part of a large source in each pass) and tags each with its source's index, so
mixture batches also carry "source" (LongTensor [B], index into `data.sources` in config order)
for per-source training loss.
"""

from moe_model.errors import DataError
from olmo.data.config import FRACTION_SUM_TOLERANCE, DataConfig, SourceConfig
from olmo.data.files import resolve_dtype, resolve_paths
from olmo.data.loaders import (
    REMOTE_READER_THREADS,
    BatchCollator,
    EvalDataLoader,
    FSLDataset,
    MixtureDataset,
    TrainDataLoader,
    build_eval_loaders,
    build_train_loader,
)
from olmo.data.mixture import Mixture, MixtureSource, plan_mixture, run_sequences
from olmo.data.plan import DataPlan, mixture_for, plan_data, validate_data

__all__ = [
    "FRACTION_SUM_TOLERANCE",
    "REMOTE_READER_THREADS",
    "BatchCollator",
    "DataConfig",
    "DataError",
    "DataPlan",
    "EvalDataLoader",
    "FSLDataset",
    "Mixture",
    "MixtureDataset",
    "MixtureSource",
    "SourceConfig",
    "TrainDataLoader",
    "build_eval_loaders",
    "build_train_loader",
    "mixture_for",
    "plan_data",
    "plan_mixture",
    "resolve_dtype",
    "resolve_paths",
    "run_sequences",
    "validate_data",
]
