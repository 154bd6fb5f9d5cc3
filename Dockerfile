# syntax=docker/dockerfile:1
# The one `tether` binary on a small runtime image, running as a non-root user.
# CI runs the same build command (`cargo build --locked --release`) on every submission.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# russh with a fix carried until upstream has it (vendor/README.md).
COPY vendor ./vendor
RUN cargo build --locked --release --bin tether && strip target/release/tether

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tether /usr/local/bin/tether
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tether"]
