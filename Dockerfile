# Builds the release binary, then copies it alone into a small non-root runtime image.
#   docker build -t leasehold .
#   docker run --rm -p 50051:50051 -e LEASEHOLD_LISTEN=0.0.0.0:50051 leasehold
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/lease_cycle.rs \
    && cargo build --release --locked --bin leasehold \
    && rm -rf src benches
COPY src src
COPY migrations migrations
COPY benches benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin leasehold

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/leasehold /usr/local/bin/leasehold
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/leasehold"]
CMD ["serve"]
