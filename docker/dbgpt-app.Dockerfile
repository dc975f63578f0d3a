# DB-GPT 0.8.2's app: webserver + web UI (knowledge base, Chat-DB, chat scenes), no model workers
# of its own (`light = true`), installed from the lock file the e2e suite uses (tests/interop/
# peers.py, DBGPT_APP; ~1.4 GB). Build context: the repository root.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY tests/interop/locks/dbgpt-app.txt /tmp/dbgpt-app.lock
RUN pip install -r /tmp/dbgpt-app.lock \
    && useradd --system --uid 10001 --create-home dbgpt

USER 10001
WORKDIR /home/dbgpt
# Metadata (SQLite), vector store and logs live under $DBGPT_HOME; mount a volume there to keep
# knowledge spaces and conversations across restarts. No telemetry leaves the container.
ENV DBGPT_HOME=/home/dbgpt/dbgpt-home \
    ANONYMIZED_TELEMETRY=False
EXPOSE 5670
