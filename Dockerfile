# fastchat-adapter: the sidecar image. Build: docker build -t fastchat-adapter .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/adapter-constraints.txt ./
COPY protocol ./protocol
COPY adapter ./adapter
# Pinned runtime dependencies (docker/adapter-constraints.txt): the versions the tests ran.
RUN pip install --constraint adapter-constraints.txt . \
    && rm -rf /src \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin adapter

USER 10001
WORKDIR /tmp

# The program binds 127.0.0.1 unless told otherwise; inside a container the port must be
# reachable from the other containers, so the image says otherwise. Every setting can be
# overridden with FASTCHAT_ADAPTER_<NAME> or a flag (see `fastchat-adapter serve --help`).
ENV FASTCHAT_ADAPTER_HOST=0.0.0.0 \
    FASTCHAT_ADAPTER_PORT=8100 \
    FASTCHAT_ADAPTER_LOG_FORMAT=json
EXPOSE 8100

# Ready = registered and at least one FastChat worker answers; 503 also once SIGTERM arrives.
# python:3.11-slim has no curl: urllib raises (exit 1) on any non-2xx answer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('FASTCHAT_ADAPTER_PORT', '8100'), timeout=2)"]

# SIGTERM: not ready, deregister from DB-GPT, drain streams (--shutdown-grace), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fastchat-adapter"]
CMD ["serve"]
