# One image for every Spool daemon and the CLI: `docker run spool run ingest`, `... spool ls /`.
# Built by compose.yaml (`docker compose up --build`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/spool/.venv/bin:$PATH \
    SPOOL_STATE_DIR=/var/lib/spool

# Same layout as a systemd host (/opt/spool/.venv), so docs and units name the same paths.
RUN python -m venv /opt/spool/.venv

WORKDIR /opt/spool/src
# Only what the package needs: keeps .venv/, var/ and tests out of the image.
COPY pyproject.toml README.md ./
COPY common ./common
COPY daemons ./daemons
RUN pip install . && cd / && rm -rf /opt/spool/src

# Non-root at run time. The state directory is created here, owned by spool, so a fresh named
# volume mounted on it inherits that ownership.
RUN groupadd --system --gid 10001 spool \
 && useradd --system --uid 10001 --gid spool --home-dir /var/lib/spool --shell /usr/sbin/nologin spool \
 && mkdir -p /var/lib/spool/landing /etc/spool \
 && chown -R spool:spool /var/lib/spool
COPY config/spool.toml /etc/spool/spool.toml
ENV SPOOL_CONFIG=/etc/spool/spool.toml

USER spool
WORKDIR /var/lib/spool

ENTRYPOINT ["spool"]
CMD ["run", "all"]
