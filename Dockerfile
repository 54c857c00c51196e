# syntax=docker/dockerfile:1.7
#
# One image, two commands (house style 13): the default CMD serves the webhook; the worker
# Deployment runs the same image as `smartcar-ingest worker`, migrations as `smartcar-ingest db upgrade`.
#
#   make image                      # docker build -t smartcar-ingest:dev . (needs a Docker/BuildKit engine)
#   docker run --rm -p 8000:8000 -e SMARTCAR_MANAGEMENT_TOKEN=... -e REDIS_URL=... smartcar-ingest:dev
#
# Builder and runtime share one base so the virtualenv's interpreter path (/usr/local/bin) matches.
ARG PYTHON_IMAGE=python:3.11-slim-trixie

# uv ships as a static binary in its official image; pinned to the version that wrote uv.lock.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# Bytecode is compiled here because the runtime filesystem is read-only; copy (not hardlink)
# out of the cache mount; never download a Python, use the base image's.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src

# Dependency layer: changes only when the lock file does, so source edits rebuild in seconds.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --no-install-project

# Source layer: the project is installed into the virtualenv as a wheel (--no-editable), migrations
# included, so the runtime needs the virtualenv alone and no source tree. The wheel leaves out the
# Smartcar emulator and the tests (pyproject.toml), so neither is in the image.
COPY . /src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/app/.venv/bin:$PATH
# A numeric user: Kubernetes can only prove runAsNonRoot for a numeric USER.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin app
# Owned by root and read-only to the app: the process cannot modify its own code.
COPY --from=build /app/.venv /app/.venv
WORKDIR /app
USER 10001:10001
# 8000: web, public (webhooks, Connect, /healthz); 9000: web, admin (/readyz, /metrics; ADMIN_PORT);
# 9100: worker metrics (METRICS_PORT).
EXPOSE 8000 9000 9100
CMD ["smartcar-ingest", "web", "--host", "0.0.0.0", "--port", "8000"]
