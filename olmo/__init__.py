"""The training stack (see README). Importing it quiets one olmo-core import-time message.

olmo-core's attention module logs ``transformer_engine unavailable, disabling TE attention`` at
import when TransformerEngine is not installed. This project never uses TE attention, and the
line (printed by logging's last-resort handler before any logging is set up) came before the
one-line error of every CLI failure that imports olmo-core, so it is dropped at its logger
before any module of this package imports olmo-core.
"""

import logging

TE_UNAVAILABLE_LOGGER = "olmo_core.nn.attention.te_attn_api"


def _not_te_unavailable(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("transformer_engine unavailable")


logging.getLogger(TE_UNAVAILABLE_LOGGER).addFilter(_not_te_unavailable)
