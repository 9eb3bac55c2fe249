//! Builds the kernel-side object with Debian's rustc-web (linked as the rustup toolchain
//! `deb-rustc-web` by scripts/setup.sh), the only compiler here with std sources for
//! build-std, and embeds it in the `forwarder` binary.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // Fuzzing and other host-only builds of the library skip the kernel side (aya-build's
    // own switch); an empty object stands in so the crate still compiles.
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        // One placeholder per kernel-side binary the library embeds.
        for name in ["forwarder", "forwarder-bench"] {
            let out = out_dir.join(name);
            if !out.exists() {
                std::fs::write(out, [])?;
            }
        }
        return Ok(());
    }
    // build-std needs unstable flags; rustc-web is a stable compiler.
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [Package { name: "forwarder-ebpf", root_dir: "../forwarder-ebpf", ..Default::default() }],
        Toolchain::Custom("deb-rustc-web"),
    )
}
