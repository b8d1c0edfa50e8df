# Multi-stage build: compile in the Rust image, run in a slim Debian with only the binary.
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
# Stubs for every target the manifest names, so this layer builds the dependencies alone.
RUN mkdir src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/publish.rs && cp benches/publish.rs benches/worker.rs \
    && cargo build --release --locked --bin kobe && rm -rf src benches
COPY benches ./benches
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin kobe

FROM debian:bookworm-slim
# tini as PID 1 reaps what a command task's programs leave to it (a killed group's processes).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home kobe
COPY --from=build /src/target/release/kobe /usr/local/bin/kobe
USER kobe
ENV KOBE_HTTP_ADDR=0.0.0.0:8000 KOBE_LOG_FORMAT=json
EXPOSE 8000
ENTRYPOINT ["tini", "--", "kobe"]
CMD ["serve"]
