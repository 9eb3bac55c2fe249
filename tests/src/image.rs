//! The container image the DaemonSet runs, built here without any registry (`cargo xtask
//! image`; tests/tests/image.rs builds it from the debug binary): buildah, `FROM scratch`,
//! the binary and exactly the shared libraries it links, at the paths deploy/ names, written
//! as an OCI archive. buildah's storage lives in a directory of the caller's (nothing under
//! /var/lib/containers).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// Where the DaemonSet (deploy/base/daemonset.yaml) runs the binary from.
pub const BINARY_PATH: &str = "/usr/local/bin/forwarder";

/// What a build made.
pub struct Image {
    /// `localhost/forwarder:VERSION` in `storage`.
    pub reference: String,
    /// The OCI archive (`oci-archive:` transport), loadable by podman, skopeo, containerd.
    pub archive: PathBuf,
    /// Files put into the image, as (path in the image, source on this machine).
    pub files: Vec<(String, PathBuf)>,
}

/// buildah with its storage under `storage` (root and runroot), vfs driver.
pub fn buildah(storage: &Path) -> Command {
    let mut c = Command::new("buildah");
    c.arg("--root")
        .arg(storage.join("root"))
        .arg("--runroot")
        .arg(storage.join("run"))
        .args(["--storage-driver", "vfs"]);
    c
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The shared objects `binary` loads (its ELF interpreter included), from `ldd`.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let text = run(Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    ensure!(!libs.is_empty(), "ldd found no libraries for {}: {text}", binary.display());
    Ok(libs)
}

/// Builds the image of `binary` (stripped on the way in) into `storage` and writes its OCI
/// archive to `out_dir`.
pub fn build(binary: &Path, storage: &Path, out_dir: &Path) -> Result<Image> {
    std::fs::create_dir_all(out_dir)?;
    let version = env!("CARGO_PKG_VERSION");
    let stripped = out_dir.join("forwarder");
    std::fs::copy(binary, &stripped).with_context(|| format!("copying {}", binary.display()))?;
    run(Command::new("strip").arg("--strip-unneeded").arg(&stripped))?;

    let mut files = vec![(BINARY_PATH.to_string(), stripped.clone())];
    for lib in shared_libraries(&stripped)? {
        files.push((lib.display().to_string(), lib));
    }
    let ctr = run(buildah(storage).args(["from", "scratch"]))?;
    let result = (|| -> Result<Image> {
        for (to, from) in &files {
            // Real files, not symlinks (ldd names the links the loader follows).
            let source = std::fs::canonicalize(from)?;
            run(buildah(storage).args(["copy", "--chmod", "0755", &ctr]).arg(&source).arg(to))?;
        }
        let reference = format!("localhost/forwarder:{version}");
        run(buildah(storage).args([
            "config",
            "--entrypoint",
            &format!("[\"{BINARY_PATH}\"]"),
            "--cmd",
            "--help",
            "--label",
            "org.opencontainers.image.title=forwarder",
            "--label",
            &format!("org.opencontainers.image.version={version}"),
            "--label",
            "org.opencontainers.image.description=eBPF/XDP port forwarder (DNAT + SNAT + conntrack)",
            "--label",
            "org.opencontainers.image.licenses=MIT OR GPL-2.0",
            &ctr,
        ]))?;
        run(buildah(storage).args(["commit", "--quiet", "--rm", &ctr, &reference]))?;
        let archive = out_dir.join(format!("forwarder-{version}.oci.tar"));
        let _ = std::fs::remove_file(&archive);
        run(buildah(storage).args(["push", "--quiet", &reference]).arg(format!("oci-archive:{}", archive.display())))?;
        Ok(Image { reference, archive, files })
    })();
    if result.is_err() {
        let _ = run(buildah(storage).args(["rm", &ctr]));
    }
    result
}
