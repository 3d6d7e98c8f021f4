# rotation-worker: a multi-stage build with the locked dependencies, run as
# a non-root user on a slim base.
FROM rust:1.95-slim-bookworm AS build
# make: jemalloc, the worker's allocator, is built from its C sources.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
COPY src ./src
COPY migrations ./migrations
COPY config ./config
RUN cargo build --release --locked --bin rotation-worker

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/rotation-worker --create-home rotation-worker
COPY --from=build /src/target/release/rotation-worker /usr/local/bin/rotation-worker
USER rotation-worker
WORKDIR /var/lib/rotation-worker
# /metrics, /healthz and /readyz.
ENV ROTATION_WORKER_TELEMETRY__HTTP_ADDR=0.0.0.0:9464
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9464/readyz || exit 1
ENTRYPOINT ["rotation-worker"]
CMD ["run"]
