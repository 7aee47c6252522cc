#!/usr/bin/env bash
# Download the Python wheels that the GPU machines lack into .whl/ (git-ignored), for machines
# with Python 3.12 and torch/triton/numpy already installed but no package registry.
#
#   bash scripts/gpu_wheels.sh [DEST]        # default DEST=.whl
#
# There: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl and
# PYTHONPATH=/tmp/site (scripts/gpu_round.sh does this). Only what the image lacks is listed:
# ai2-olmo-core and the closure of its requirements, omegaconf, wandb and its requirements,
# liger-kernel. Each version is the one this project runs with on CPU, except where noted.
# After a change: check every wheel's Requires-Dist against the image's packages (see
# benchmarks/README.md, "GPU round") and keep the total under the 64 MiB carry limit with the
# working tree and data/sample/tokens.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=${1:-.whl}

WHEELS=(
  # Trainer, checkpointing, data loading.
  ai2-olmo-core==3.0.0
  dataclass-extensions==0.5.0
  importlib-resources==7.1.0
  bettermap==1.3.1
  dill==0.3.8
  # olmo_core.io imports cached_path, whose schemes import boto3 and google-cloud-storage at
  # import time. boto3/botocore: a release that accepts the urllib3 2.x of current images.
  cached-path==1.8.10
  boto3==1.44.5
  botocore==1.44.5
  s3transfer==0.19.3
  jmespath==1.1.0
  google-cloud-storage==3.17.1
  google-cloud-core==2.8.0
  google-api-core==2.44.0
  # google-auth: the last releases before it required cryptography (not in the image).
  google-auth==2.45.0
  cachetools==6.2.6
  google-resumable-media==2.11.0
  google-crc32c==1.9.0
  googleapis-common-protos==1.76.0
  proto-plus==1.29.0
  # google-api-core and googleapis-common-protos need protobuf >= 6.33.5 (their generated code
  # refuses an older runtime at import): the version this project runs with on CPU, shadowing
  # the image's.
  protobuf==7.36.2
  pyasn1==0.6.5
  pyasn1-modules==0.4.2
  rsa==4.9.1
  # Config: YAML + dotlist overrides.
  omegaconf==2.4.0
  # W&B (olmo-core's callback breaks on wandb >= 0.29) and its requirements.
  wandb==0.28.2
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  # pydantic 2.14 needs typing-extensions >= 4.16 (newer than many images ship).
  typing-extensions==4.16.0
  sentry-sdk==2.75.0
  opentelemetry-api==1.45.2
  platformdirs==4.14.8
  # Liger-Kernel's PolyNorm, the public fused kernel benchmarked against ours.
  liger-kernel==0.8.5
)

mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
