#!/usr/bin/env bash
# The main job on a fresh machine: set-up, build, and the demo (a namespace sandbox with the
# classic tcp :3306 → backend :3197 forward, real traffic, live counters; sandbox removed).
set -euo pipefail
# rustup's cargo first: Debian's cargo-web (/usr/bin) is only for the kernel-side build.
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo xtask demo "$@"
