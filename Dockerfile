# syntax=docker/dockerfile:1
#
# account-worker container image: `docker build -t account-worker .`
# Build stage: the official Rust image. Runtime stage: Debian slim, non-root.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src

# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit. A stub crate stands in for src/.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin account-worker \
    && rm -rf src

# The real sources, and the defaults they embed (include_str! of config/default.toml).
# COPY keeps the files' own modification times, which may be older than the stub
# build: touch them and drop the stub's artefacts so cargo rebuilds this crate (and
# only this crate). The release profile keeps debug info (about 100 MB of it); the
# image drops it, keeping the symbols, so a backtrace still names its functions.
COPY config/default.toml ./config/default.toml
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && rm -rf target/release/account-worker target/release/deps/account_worker-* \
              target/release/deps/libaccount_worker-* target/release/.fingerprint/account-worker-* \
    && cargo build --release --locked --bin account-worker \
    && strip --strip-debug -o /account-worker target/release/account-worker \
    && /account-worker --version

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: vendor APIs over HTTPS. The worker's TLS (rustls) carries its own
# web PKI roots, but an operator may point it at a private CA through the system store.
# Unpinned on purpose: certificates and security fixes should follow the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --home-dir /data --no-create-home \
               --shell /usr/sbin/nologin worker \
    && mkdir -p /data \
    && chown worker:worker /data

COPY --from=build /account-worker /usr/local/bin/account-worker

# The embedded ledger lives in /data (one worker only; a fleet uses LEDGER_URL=redis://…).
# The metrics endpoint listens on every interface so Prometheus and orchestrators
# can reach it from outside the container.
ENV METRICS_ADDR=0.0.0.0:9090 \
    LEDGER_URL=file:/data/ledger \
    LOG_FORMAT=json \
    RUST_LOG=info
VOLUME ["/data"]
WORKDIR /data
# Numeric, so that orchestrators can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
EXPOSE 9090

# Liveness, not readiness: /healthz answers while the process is alive. /readyz
# turns 503 during a vendor outage or a broker reconnect by design, and a container
# marked unhealthy for that would be restarted by some orchestrators for nothing.
# The slim image has no curl; bash's /dev/tcp speaks the one HTTP request needed.
# Commands other than `run` (mock-vendor, publish) override or disable this check.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${METRICS_ADDR##*:} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

# SIGTERM (docker stop) lets in-flight jobs finish within SHUTDOWN_TIMEOUT (25s by
# default): give the container more than that, e.g. `docker stop -t 35`, or
# stop_grace_period in compose.
STOPSIGNAL SIGTERM
ENTRYPOINT ["account-worker"]
CMD ["run"]
