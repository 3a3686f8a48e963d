# CPU image of MergeGate (docs/container.md). Build: docker build -t mergegate .   Run: docker compose up
# (or scripts/container-check, which builds, runs and checks it with docker or podman).
#
# BASE_IMAGE: any Debian-like image with Python 3.11+, or a bare Debian (bookworm: python3 3.11) where Python is
# installed below with apt. TORCH_INDEX_URL: where the CPU build of torch 2.13.0 comes from (PyTorch's CPU index
# by default; a mirror or a local simple index serving the +cpu wheel works too). A CUDA build is refused.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim

FROM ${BASE_IMAGE} AS base
# A bare Debian base has no Python: take bookworm's python3 (3.11). python:3.11-slim already has it.
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1 \
       || [ ! -f /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

FROM base AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip trusts the system's CA bundle (not only its own certifi), so a base that adds a CA (a TLS-inspecting proxy's,
# in /usr/local/share/ca-certificates) builds too.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
WORKDIR /src
RUN python3 -m venv /opt/venv
# torch alone first, without its dependencies, from the CPU index: the pin of constraints.txt then finds it installed,
# so nothing pulls a CUDA build. Its dependencies come from PyPI with the package below.
COPY constraints.txt ./
RUN /opt/venv/bin/pip install -q --no-deps --index-url "$TORCH_INDEX_URL" -c constraints.txt torch==2.13.0
COPY pyproject.toml README.md ./
COPY app ./app
COPY experts ./experts
COPY merging ./merging
RUN /opt/venv/bin/pip install -q -c constraints.txt . \
 && /opt/venv/bin/python -c 'import torch; v = torch.__version__; assert torch.version.cuda is None and v.startswith("2.13.0"), v; print("torch", v, "(CPU)")' \
 && ! /opt/venv/bin/pip list 2>/dev/null | grep -i '^nvidia-'

FROM base
RUN useradd --create-home --uid 10001 mergegate && mkdir /data && chown mergegate:mergegate /data
COPY --from=build /opt/venv /opt/venv
# Inside the container the gateway binds 0.0.0.0 (publish the port on 127.0.0.1 of the host, as docker-compose.yml
# does, or set MERGEGATE_API_KEYS before exposing it). The registry, artifacts and admin.key live on /data.
ENV PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    MERGEGATE_HOST=0.0.0.0 MERGEGATE_PORT=8000 MERGEGATE_DATA_DIR=/data
USER mergegate
WORKDIR /home/mergegate
VOLUME ["/data"]
EXPOSE 8000
# The demo answers /health at once (its experts are built by a background job), so a short start period suffices.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MERGEGATE_PORT', '8000'), timeout=4).status != 200)"
# `mergegate demo` serves the demo repository (built on the volume the first time); `mergegate demo --quick` builds
# tiny experts in seconds; `mergegate serve` serves only what is registered.
CMD ["mergegate", "demo"]
