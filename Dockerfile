# The project's own image: the squall CLI (and, as they land, the chatstream binaries),
# built in a Rust image and copied into a slim runtime. Used by docker-compose.yml.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p squall

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libcurl4 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/squall /usr/local/bin/squall
ENTRYPOINT []
CMD ["squall", "--help"]
