# syntax=docker/dockerfile:1
#
# pgfanout image: the chart in helm/pgfanout runs it (image.repository
# defaults to `pgfanout`, the tag to the chart's appVersion):
#
#   docker build -t pgfanout:0.1.0 .
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the crates.io downloads and the target directory
# between builds; the binary is copied out of the cached target because the
# mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pgfanout \
    && install -D -m 0755 target/release/pgfanout /out/pgfanout

# ---- run --------------------------------------------------------------------
# debian:bookworm-slim rather than distroless: the same glibc as the builder,
# CA certificates for TLS to Postgres and Redis, and /bin/sleep for the
# chart's preStop hook (with shutdown.preStopSleepAction=true the kubelet
# sleeps instead, and an image without sleep, such as distroless, would do).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pgfanout \
    && useradd --system --uid 10001 --gid pgfanout --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin pgfanout
COPY --from=builder /out/pgfanout /usr/local/bin/pgfanout
# Numeric, so that Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 10001:10001
ENV PGFANOUT_LISTEN=0.0.0.0:8000 \
    PGFANOUT_LOG_FORMAT=json
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/pgfanout"]
