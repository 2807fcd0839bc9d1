# lb-agent: a drop-in replacement for the Go lb-agent image.
# Build:  docker build -t lb-agent .
# Config: mount a ConfigMap at /usr/local/services/ai-media/conf/config.yaml (the Go agent's path).

FROM rust:1-bookworm AS build
# Pingora's bundled zlib-ng is built with CMake.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin lb-agent

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home lbagent \
 && mkdir -p /usr/local/services/ai-media/conf /usr/local/services/ai-media/logs /usr/local/services/ai-media/log \
 && chown -R lbagent /usr/local/services/ai-media/logs /usr/local/services/ai-media/log
COPY --from=build /src/target/release/lb-agent /usr/local/bin/lb-agent
COPY conf/config.yaml /usr/local/services/ai-media/conf/config.yaml
# The Go agent ran from here, so its relative paths (conf/config.yaml, ./logs/agent.log) still work.
WORKDIR /usr/local/services/ai-media
USER 10001
# 8080: proxy (the Go agent's port); 9090: admin (/healthz /readyz /status /metrics) when
# admin_listen is set in the config.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/lb-agent"]
CMD ["-c", "/usr/local/services/ai-media/conf/config.yaml"]
