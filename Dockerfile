# lb-agent: a drop-in replacement for the Go lb-agent image.
# Build:  docker build -t lb-agent .
# Config: mount a ConfigMap at /usr/local/services/ai-media/conf/config.yaml (the Go agent's path).
# Debug info for profiling (not in the image):
#         docker build --target debug-symbols --output type=local,dest=symbols .

FROM rust:1-bookworm AS build
# Pingora's bundled zlib-ng is built with CMake.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other member (fake pods, load generator, demo): cargo needs it to load the
# workspace, but `-p lb-agent` never builds it, and nothing of it reaches the image.
COPY testkit ./testkit
# The `dist` profile is release plus LTO and one codegen unit (Cargo.toml): slower to build,
# less CPU per request. It keeps release's line tables (`debug = 1`) for profiling, most of the
# binary's size. They go to lb-agent.debug; the image gets the binary without them. Its symbol
# table stays, so panics and `perf` still name functions; the debuglink lets gdb/perf find the
# line tables when lb-agent.debug is put beside the binary or under /usr/lib/debug.
RUN cargo build --profile dist --locked -p lb-agent --bin lb-agent \
 && mkdir -p /out \
 && objcopy --only-keep-debug target/dist/lb-agent /out/lb-agent.debug \
 && objcopy --strip-debug --add-gnu-debuglink=/out/lb-agent.debug target/dist/lb-agent /out/lb-agent

# Only built when asked for (--target debug-symbols): the debug info, exported as a file.
FROM scratch AS debug-symbols
COPY --from=build /out/lb-agent.debug /

FROM debian:bookworm-slim
# logs/ is mode 1777 (like /tmp): `docker run --read-only --tmpfs …/logs` mounts a tmpfs there
# that runc gives the directory's mode but not its owner (the tmpfs is root's), so an owner-only
# directory would leave uid 10001 unable to create ./logs/agent.log. Kubernetes' emptyDir is
# world-writable anyway.
RUN groupadd --system --gid 10001 lbagent \
 && useradd --system --uid 10001 --gid 10001 --no-create-home lbagent \
 && mkdir -p /usr/local/services/ai-media/conf \
 && install -d -o 10001 -g 10001 -m 1777 /usr/local/services/ai-media/logs
COPY --from=build /out/lb-agent /usr/local/bin/lb-agent
COPY conf/config.yaml /usr/local/services/ai-media/conf/config.yaml
# The Go agent ran from here, so its relative paths (conf/config.yaml, ./logs/agent.log) still work.
WORKDIR /usr/local/services/ai-media
USER 10001
# 8080: proxy (the Go agent's port); 9090: admin (/healthz /readyz /status /metrics) when
# admin_listen is set in the config.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/lb-agent"]
CMD ["-c", "/usr/local/services/ai-media/conf/config.yaml"]
