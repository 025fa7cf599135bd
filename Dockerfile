# syntax=docker/dockerfile:1
# The MNIST digit service. CPU-only PyTorch by default; for CUDA:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t mnist-serve:cuda .
# The same image trains: python -m training.train --data-dir /data --models-dir /app/models
ARG PYTHON_VERSION=3.11

# --- build: a virtual environment holding the dependencies, then the project -------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
# PyTorch's wheel index beside PyPI: its "+cpu" (or "+cu126") builds rank above PyPI's CUDA ones.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Extras from pyproject.toml: "train" lets the image train too; --build-arg EXTRAS= serves only.
ARG EXTRAS=train
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, read from pyproject.toml alone: this layer is rebuilt only when it changes.
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
extras = [p['project']['optional-dependencies'][e] for e in sys.argv[1].split(',') if e]; \
open('/tmp/requirements.txt', 'w').write('\n'.join(p['build-system']['requires'] + p['project']['dependencies'] + sum(extras, [])))" \
    "${EXTRAS}" \
    && pip install --extra-index-url "${TORCH_INDEX}" -r /tmp/requirements.txt
# Then the project itself, from the same pyproject.toml (dependencies already in place).
COPY README.md LICENSE ./
COPY app/ app/
COPY training/ training/
RUN pip install --no-deps --no-build-isolation . \
    && python -c "import app.main" \
    && case ",${EXTRAS}," in *,train,*) python -c "import training.train" ;; esac

# --- runtime: the environment, the bundled model, a non-root user -------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
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
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The bundled model. A named volume mounted here starts as a copy of it (owned by app), and the
# trainer publishes new versions into that volume for the service's pointer watch to pick up.
COPY --chown=app:app models/ /app/models/
VOLUME ["/app/models"]
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MNIST_PORT', '8000') + '/health/ready', timeout=4)"]
CMD ["python", "-m", "app"]
