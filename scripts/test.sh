#!/usr/bin/env bash
# Every test, on a fresh machine: set-up, build, then unit tests, BPF_PROG_TEST_RUN packet
# fixtures and end-to-end tests in network namespaces (needs root). Exits non-zero on any
# failure.
set -euo pipefail
# rustup's cargo first: Debian's cargo-web (/usr/bin) is only for the kernel-side build.
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Bounded fuzzing of the config parser and checksum arithmetic (first, so that the test
# runner's summary closes the output).
bash scripts/fuzz.sh 20
# Every test binary of `cargo test --workspace --exclude forwarder-ebpf` (one build, which
# also makes the `forwarder` binary the end-to-end tests run): unit tests, the
# rate-comparing lifecycle tests alone, then the rest two binaries at a time (each binary's
# tests on parallel threads, as cargo runs them); arguments go to every test binary.
python3 scripts/run-tests.py -- "$@"
