"""``save_num_checkpoints_to_keep`` holds at the end of a run, the final checkpoint included.

olmo-core's CheckpointerCallback removes an old checkpoint one step *after* saving the next
(in the following step's ``post_train_batch``), so the checkpoints scheduled for removal at the
last save are never removed, and after a resume it does not know the checkpoints of earlier
sessions at all: a run with k=2 and saves at 50, 100, 150 ended with 3. This callback removes
the surplus once the final checkpoint is written, before the run summary lists them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from olmo_core.distributed.utils import get_fs_local_rank
from olmo_core.train.callbacks import Callback

from olmo.object_store import is_remote
from olmo.run_files import prune_checkpoints

log = logging.getLogger(__name__)


@dataclass
class CheckpointRetentionCallback(Callback):
    """Keeps the newest ``keep`` complete checkpoints in the save folder when training ends."""

    # After the checkpointer (priority 1) writes the final checkpoint; before the run summary
    # (-100) reports what is on disk.
    priority: ClassVar[int] = 0
    keep: int = 3

    def post_train(self):
        # A URL's keep-last-k is the remote checkpointer's (FinalCheckpointerCallback).
        if get_fs_local_rank() == 0 and not is_remote(self.trainer.save_folder):
            for path in prune_checkpoints(self.trainer.save_folder, self.keep):
                log.info(f"Removed old checkpoint {path} (save_num_checkpoints_to_keep={self.keep})")
