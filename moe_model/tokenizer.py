"""The OLMo tokenizer's facts, in one place: ids, sizes and where its file ships.

OLMoE (and this project) use ``allenai/gpt-neox-olmo-dolma-v1_5``: a 50280-token vocabulary
whose end-of-document token is ``<|endoftext|>`` = 50279 and padding ``<|padding|>`` = 1.
OLMoE's own configs say ``eos_token_id: 0``, but the tokenizer (and dolma's output) uses 50279.
The embedding has 50304 rows: the vocabulary padded to a multiple of 128 for matmul speed.
The tokenizer file ships inside the ``ai2-olmo-eval`` package, so it is available offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = [
    "EMBEDDING_SIZE",
    "EOS_TOKEN_ID",
    "PAD_TOKEN_ID",
    "TOKENIZER_NAME",
    "TOKENIZER_RESOURCE",
    "VOCAB_SIZE",
    "default_tokenizer_path",
]

TOKENIZER_NAME = "allenai/gpt-neox-olmo-dolma-v1_5"
VOCAB_SIZE = 50280
EMBEDDING_SIZE = 50304
EOS_TOKEN_ID = 50279
PAD_TOKEN_ID = 1
TOKENIZER_RESOURCE = "tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"
"""Path of the tokenizer.json inside the ``olmo_eval`` package."""


def default_tokenizer_path() -> Path | None:
    """The OLMo tokenizer.json shipped in ai2-olmo-eval, or None when it is not installed.

    Found with ``find_spec``, without importing ``olmo_eval`` (which imports torch).
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / TOKENIZER_RESOURCE
    return path if path.is_file() else None
