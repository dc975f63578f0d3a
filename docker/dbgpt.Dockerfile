# DB-GPT 0.8.2 model controller and apiserver (no torch, no web UI), installed from the lock
# file the interop suite uses (docs/peers.md §2.1). Build context: the repository root.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY tests/interop/locks/dbgpt.txt /tmp/dbgpt.lock
RUN pip install -r /tmp/dbgpt.lock \
    && useradd --system --uid 10001 --create-home dbgpt

USER 10001
WORKDIR /home/dbgpt
# Logs go to $DBGPT_HOME/workspace/logs.
ENV DBGPT_HOME=/home/dbgpt/dbgpt-home
