# syntax=docker/dockerfile:1
# voxconv: multi-stage build; the runtime image holds one static-ish binary, runs as a
# non-root user, serves gRPC on 50051 and Prometheus metrics on 9090, and loads models from
# /models (mount a model repository there; the built-in models are always present).

FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY benches ./benches
COPY examples ./examples
# The kernel crate (a workspace member) changes less often than the server: built with the deps.
COPY crates ./crates
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin voxconv \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin voxconv \
    && strip target/release/voxconv

FROM debian:bookworm-slim AS runtime
RUN groupadd --system --gid 10001 voxconv \
    && useradd --system --uid 10001 --gid voxconv --no-create-home --shell /usr/sbin/nologin voxconv \
    && mkdir -p /models \
    && chown voxconv:voxconv /models
COPY --from=build /src/target/release/voxconv /usr/local/bin/voxconv
USER 10001:10001
ENV VOXCONV_LISTEN=0.0.0.0:50051 \
    VOXCONV_METRICS_LISTEN=0.0.0.0:9090 \
    VOXCONV_MODEL_REPOSITORY=/models \
    VOXCONV_LOG_FORMAT=json \
    VOXCONV_SERVER=http://127.0.0.1:50051
EXPOSE 50051 9090
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["voxconv", "health"]
ENTRYPOINT ["voxconv"]
CMD ["serve"]
