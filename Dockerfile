# The mailpipe image: worker, scheduler, web app and metrics exporter (see docker-compose.yml).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    TZ=UTC \
    MAILPIPE_DATA_DIR=/var/lib/mailpipe

WORKDIR /app
COPY requirements.lock pyproject.toml README.md broker_config.py middleware.py ./
COPY mailpipe ./mailpipe
COPY worker ./worker
COPY actors ./actors
COPY metrics ./metrics
COPY web ./web
COPY cli ./cli
# The runtime dependencies only (not the test tools), at the versions of requirements.lock.
RUN pip install --no-cache-dir --constraint requirements.lock . \
    && useradd --system --uid 10001 --home-dir /var/lib/mailpipe mailpipe \
    && mkdir -p /var/lib/mailpipe/keys /run/mailpipe/metrics \
    && chown -R mailpipe /var/lib/mailpipe /run/mailpipe \
    && chmod 0700 /var/lib/mailpipe/keys

USER mailpipe
CMD ["mailpipe", "--help"]
