#!/usr/bin/env bash
# Idempotent set-up of everything forwarder needs on a fresh Debian 12 machine of this kind:
# Debian's rustc-web (1.96, with its std sources) for the kernel side, LLVM 22 and bpf-linker,
# and the tools the tests and benchmarks use. A second run skips what is already there.
set -euo pipefail
# rustup's cargo first: Debian's cargo-web (/usr/bin) is only for the kernel-side build.
export PATH="$HOME/.cargo/bin:$PATH"

need_pkgs=(rustc-web cargo-web rust-web-src llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
    iproute2 iputils-ping ethtool socat iperf3 iptables nftables conntrack bpftool tcpdump hping3
    binutils man-db systemd buildah python3)

missing=()
for p in "${need_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Debian's compiler as a rustup toolchain, so aya-build can build the kernel side with it
# (rustup cannot download rust-src here). Linking is local and needs no network.
if ! rustup toolchain list | grep -q '^deb-rustc-web'; then
    rustup toolchain link deb-rustc-web /usr
fi

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q '0.13'; then
    echo "setup: building bpf-linker against LLVM 22"
    PATH=/usr/lib/llvm-22/bin:$PATH LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
        cargo install --locked bpf-linker@0.13.0 --no-default-features --features llvm-22
fi
# cargo-fuzz drives libFuzzer on rustup's preinstalled nightly (no download needed).
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz"
    cargo install --locked cargo-fuzz@0.13.2
fi
echo "setup: done"
