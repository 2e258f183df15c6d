# Builds the release binary, then copies it alone into a small non-root runtime image.
#   docker build -t leasehold .
#   docker run --rm -p 50051:50051 -e DATABASE_URL=postgres://... leasehold
#   docker run --rm -p 50051:50051 leasehold serve --listen 0.0.0.0:50051 --store memory
# The build stage's toolchain is the crate's rust-version, and the build uses Cargo.lock
# (--locked). tests/it/deploy.rs checks both, and that every COPY source exists.
FROM rust:1.94-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them. Cargo reads every target the
# manifest names, so the test target gets a placeholder too.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir -p src tests/it && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && touch tests/it/main.rs \
    && cargo build --release --locked --bin leasehold \
    && rm -rf src
COPY src src
COPY migrations migrations
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin leasehold

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/leasehold /usr/local/bin/leasehold
USER 65532:65532
EXPOSE 50051 8081 9090
ENTRYPOINT ["/usr/local/bin/leasehold"]
# Without DATABASE_URL this refuses to start (spec §11) rather than serve a throwaway store.
CMD ["serve", "--listen", "0.0.0.0:50051"]
