#!/usr/bin/env bash
# Bounded cargo-fuzz runs (libFuzzer + ASan, rustup's nightly): the config parser and the
# checksum arithmetic the packet path shares. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
# The fuzzers link the userspace library only: skip building the kernel object.
export AYA_BUILD_SKIP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in config checksum; do
    echo "fuzz: $target for ${seconds}s"
    # Committed seeds (fuzz/seeds/TARGET) start the search from realistic inputs.
    corpus=("corpus/$target")
    mkdir -p "corpus/$target"
    if [ -d "seeds/$target" ]; then corpus+=("seeds/$target"); fi
    if ! cargo +nightly fuzz run "$target" "${corpus[@]}" -- -max_total_time="$seconds" >"$log" 2>&1; then
        cat "$log"
        echo "fuzz: $target failed"
        exit 1
    fi
    tail -n 1 "$log"
done
