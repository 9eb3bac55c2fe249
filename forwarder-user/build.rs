//! Builds the kernel-side object with Debian's rustc-web (linked as the rustup toolchain
//! `deb-rustc-web` by scripts/setup.sh), the only compiler here with std sources for
//! build-std, and embeds it in the `forwarder` binary.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // build-std needs unstable flags; rustc-web is a stable compiler.
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [Package { name: "forwarder-ebpf", root_dir: "../forwarder-ebpf", ..Default::default() }],
        Toolchain::Custom("deb-rustc-web"),
    )
}
