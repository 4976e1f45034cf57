# syntax=docker/dockerfile:1
# Portcullis operator image: a static (musl, rustls) binary on distroless/static, run as 65532.
#   docker build -t <registry>/portcullis:0.1.0 .
# Expected size: ~15-25 MB (the stripped static binary) + ~2 MB (distroless/static).

FROM rust:1-bookworm AS builder
ARG TARGET=x86_64-unknown-linux-musl
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "${TARGET}"
# ring (rustls' crypto) and jemalloc (the allocator) compile C: use musl's compiler wrapper. Strip the release binary.
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
WORKDIR /src

# Dependency layer: the manifests with stub sources, so the dependencies are rebuilt only
# when Cargo.toml / Cargo.lock change. The emulator is a workspace member (and a
# dev-dependency), so its manifest must be present; it is never built here.
COPY Cargo.toml Cargo.lock ./
COPY emulator/Cargo.toml emulator/Cargo.toml
RUN mkdir -p src emulator/src emulator/benches \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && echo 'fn main() {}' > emulator/src/main.rs \
 && : > emulator/src/lib.rs \
 && echo 'fn main() {}' > emulator/benches/overhead.rs \
 && cargo build --release --locked --target "${TARGET}" -p portcullis --bin portcullis \
 && rm -rf src

# The operator itself. `touch` so Cargo does not take the stubs' build as up to date.
COPY src src
RUN touch src/lib.rs src/main.rs \
 && cargo build --release --locked --target "${TARGET}" -p portcullis --bin portcullis \
 && cp "target/${TARGET}/release/portcullis" /portcullis \
 && /portcullis --version

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="portcullis" \
      org.opencontainers.image.description="Just-in-time network access to Azure VMs: a Kubernetes operator managing NSG rules" \
      org.opencontainers.image.licenses="Apache-2.0"
# distroless/static carries the CA bundle (/etc/ssl/certs) and a nonroot user (65532).
COPY --from=builder /portcullis /portcullis
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/portcullis", "run"]
