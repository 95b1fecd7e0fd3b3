# syntax=docker/dockerfile:1
#
# rtchat node image.
#   docker build -t rtchat .
#   docker run --rm -p 8888:8888 rtchat                       # single node, memory broker
#   docker run --rm -p 8888:8888 -e RTCHAT_BROKER__BACKEND=redis \
#       -e RTCHAT_BROKER__REDIS__MASTER=redis://redis:6379/0 rtchat
# The config is /etc/rtchat/rtchat.yaml (conf/rtchat.yaml: every key, with its
# default); RTCHAT_<SECTION>__<KEY> environment variables override it. Mount
# your own file over it, or check one: docker run --rm rtchat check-config PATH
#
# Stages: `requirements` extracts the runtime dependencies from pyproject.toml;
# `build` makes wheels of them (a layer that changes only when that list does)
# and then of rtchat itself; the final stage installs the dependency wheels
# first and rtchat last, so a source change rebuilds and ships only the small
# last layers. Needs BuildKit (the default builder) for RUN --mount.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

FROM base AS requirements
WORKDIR /src
COPY pyproject.toml ./
# The runtime dependencies plus the "fast" extra (uvloop), nothing else:
# editing the rest of pyproject.toml (version, lint or test settings) leaves
# requirements.txt, and so the dependency layers below, cached.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['fast']))" > /requirements.txt

FROM base AS build
WORKDIR /src
COPY --from=requirements /requirements.txt /requirements.txt
RUN pip wheel --no-cache-dir --wheel-dir /wheels/deps -r /requirements.txt
COPY pyproject.toml setup.cfg README.md ./
COPY rtchat ./rtchat
COPY templates ./templates
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/app .

FROM base
# A fixed, unprivileged uid: files mounted into the container can be granted
# to it, and nothing in the image runs as root.
RUN groupadd --system --gid 10001 rtchat \
    && useradd --system --uid 10001 --gid rtchat --no-create-home --shell /usr/sbin/nologin rtchat
# The wheels are bind-mounted from the build stage, never copied into a layer.
RUN --mount=type=bind,from=requirements,source=/requirements.txt,target=/tmp/requirements.txt \
    --mount=type=bind,from=build,source=/wheels/deps,target=/wheels/deps \
    pip install --no-cache-dir --no-index --find-links /wheels/deps -r /tmp/requirements.txt
RUN --mount=type=bind,from=build,source=/wheels/app,target=/wheels/app \
    pip install --no-cache-dir --no-index --no-deps /wheels/app/*.whl
COPY conf/rtchat.yaml /etc/rtchat/rtchat.yaml

USER 10001:10001
EXPOSE 8888
# Liveness without curl: GET /healthz on this node's port (RTCHAT_HTTP__PORT
# when set), ignoring any HTTP proxy settings; a non-200 or no answer exits 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('RTCHAT_HTTP__PORT', '8888'), timeout=2); sys.exit(0 if r.status == 200 else 1)"]

# Exec form: rtchat is PID 1 and receives SIGTERM itself, drains its streams
# over shutdown.drain_seconds and exits 0. Give `docker stop -t` (compose:
# stop_grace_period) more than that. Arguments replace CMD:
#   docker run rtchat --config /etc/rtchat/other.yaml
# Change the port with -e RTCHAT_HTTP__PORT=N (not --port): HEALTHCHECK reads it.
ENTRYPOINT ["rtchat"]
CMD ["--config", "/etc/rtchat/rtchat.yaml"]
