# lidc-det on an NVIDIA NGC PyTorch base (what cloud GPU users of this field run).
# NOT BUILT OR RUN YET: the development machine has no image registry access (docs/install.md).
#
#   docker build -t lidc-det .
#   docker run --gpus all --rm -v $PWD/out:/out lidc-det lidc-det demo --out /out/demo --config benchmarks/demo_gpu.yaml
#
# The NGC base brings the CUDA user-space stack, NCCL and drivers' compatibility libraries.
# Its own torch is not used: lidc-det pins torch 2.14 / torchvision 0.29 (setup.cfg) and pylidc
# needs Python 3.11 (it does not load DICOM on 3.12, the NGC image's Python), so the install
# steps below are the README's quick start, run with Python 3.11 in a virtual environment.
FROM nvcr.io/nvidia/pytorch:25.01-py3

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common git \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lidc-det
COPY . .
# The README's install (Quick start), unchanged:
RUN python3.11 -m venv .venv && . .venv/bin/activate && pip install -e .
ENV PATH=/opt/lidc-det/.venv/bin:$PATH VIRTUAL_ENV=/opt/lidc-det/.venv
WORKDIR /work
CMD ["lidc-det", "--help"]
