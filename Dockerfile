# syntax=docker/dockerfile:1
# The MNIST digit service. CPU-only PyTorch by default; for CUDA:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t mnist-serve:cuda .
# Serving only (no torchvision/matplotlib/tqdm): --build-arg EXTRAS=
# The same image trains: python -m training.train --data-dir /data --models-dir /app/models

# The base, pinned by digest with its tag beside it: a rebuild gets exactly these bytes until the
# pin is moved on purpose (docker buildx imagetools inspect python:3.11-slim-bookworm). Builders
# without registry access pass a local image: --build-arg BASE_IMAGE=python:3.11-slim-bookworm
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

# --- requirements: the dependency list, read from pyproject.toml ----------------------------------
FROM ${BASE_IMAGE} AS requirements
# Extras from pyproject.toml: "train" lets the image train too; --build-arg EXTRAS= serves only.
ARG EXTRAS=train
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
extras = [p['project']['optional-dependencies'][e] for e in sys.argv[1].split(',') if e]; \
open('/src/requirements.txt', 'w').write('\n'.join(p['project']['dependencies'] + sum(extras, [])))" \
    "${EXTRAS}"

# --- deps: a virtual environment holding the dependencies alone ---------------------------------
FROM ${BASE_IMAGE} AS deps
# PyTorch's wheel index beside PyPI: its "+cpu" (or "+cu126") builds rank above PyPI's CUDA ones.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# Keyed on the list itself, not on pyproject.toml: this slow layer (and the runtime's copy of
# it) is rebuilt only when the dependencies, the extras or TORCH_INDEX change; a new dev tool,
# a version bump or a code change leaves it cached.
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN pip install --extra-index-url "${TORCH_INDEX}" -r /tmp/requirements.txt

# --- build: the project as a wheel (its build backend lives only in pip's isolated build env) ----
FROM deps AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY app/ app/
COPY training/ training/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime: the environment, the project, the bundled model, a non-root user -------------------
FROM ${BASE_IMAGE} AS runtime
ARG EXTRAS=train
# XDG_CACHE_HOME and MPLCONFIGDIR: the root filesystem is read-only in production and the home
# folder is not writable, so caches (the trainer's copy of a read-only MNIST mount) go to /tmp.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    MNIST_HOST=0.0.0.0 \
    MNIST_PORT=8000 \
    MNIST_WORKERS=2 \
    MNIST_LOG_LEVEL=info \
    MNIST_MODEL_DIR=/app/models \
    MNIST_DATA_DIR=/data \
    MNIST_RELOAD_INTERVAL=1.0 \
    MNIST_GRACEFUL_TIMEOUT=20
# uid/gid 10001: above any host account, and what the Kubernetes securityContext names.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
    && install -d -o app -g app /app/models /data
COPY --from=deps /opt/venv /opt/venv
# The project from its wheel, then pip and setuptools leave: nothing in the running image can
# install or build packages. (COPY, not RUN --mount=from=build: Podman/Buildah reuse a cached
# RUN layer even when the mounted wheel changed, and the image would ship stale code.)
COPY --from=build /wheels/ /tmp/wheels/
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 pip install --no-deps --no-index /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python -m pip uninstall --yes --quiet pip setuptools \
    && python -c "import app.main" \
    && case ",${EXTRAS}," in *,train,*) python -c "import training.train" ;; esac
WORKDIR /app
# The bundled model. A named volume mounted here starts as a copy of it (Docker and Podman copy an
# image folder into an empty named volume, ownership included), and the trainer publishes new
# versions into that volume for the service's pointer watch to pick up. Kubernetes has no such
# copy: deploy/k8s/deployment.yaml seeds an empty volume with an init container instead.
COPY --chown=app:app models/ /app/models/
VOLUME ["/app/models"]
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MNIST_PORT', '8000') + '/health/ready', timeout=4)"]
CMD ["python", "-m", "app"]
