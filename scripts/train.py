#!/usr/bin/env python
"""Train an OLMoE-style MoE: ``python scripts/train.py CONFIG [--key=value ...] [--dry-run]``.

Launch through ``run_pretrain.sh`` (torchrun) for several processes or nodes.
"""

import sys

from olmo.launch import main

if __name__ == "__main__":
    sys.exit(main())
