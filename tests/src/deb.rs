//! The Debian package of a router host (`cargo xtask deb`; tests/tests/package.rs builds it
//! from the debug binary). dpkg-deb builds it from a staged
//! tree: the binary, the systemd units, the conffile that forwards nothing until edited, man
//! pages and shell completions generated from the CLI's own definition (so they cannot
//! drift from it), and maintainer scripts.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};
use clap::CommandFactory as _;
use clap_complete::Shell;

const PACKAGE: &str = "forwarder";

/// Builds the package of `binary` in `out_dir`; returns the .deb's path.
pub fn build(binary: &Path, out_dir: &Path) -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stage = out_dir.join("stage");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let version = env!("CARGO_PKG_VERSION");
    let arch = deb_arch()?;

    let staged_bin = stage.join("usr/bin/forwarder");
    install(binary, &staged_bin, 0o755)?;
    // Stripped, as Debian's dh_strip does.
    let status = Command::new("strip").arg("--strip-unneeded").arg(&staged_bin).status().context("strip (binutils)")?;
    ensure!(status.success(), "strip {}", staged_bin.display());
    let packaging = root.join("packaging");
    for unit in ["forwarder.service", "forwarder@.service"] {
        install(&packaging.join(unit), &stage.join("lib/systemd/system").join(unit), 0o644)?;
    }
    install(&packaging.join("forwarder.toml"), &stage.join("etc/forwarder/forwarder.toml"), 0o644)?;
    man_pages(&stage.join("usr/share/man/man1"))?;
    completions(&stage)?;
    let doc = stage.join("usr/share/doc").join(PACKAGE);
    install(&root.join("README.md"), &doc.join("README.md"), 0o644)?;
    fs::write(doc.join("copyright"), copyright())?;

    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    let size_kib = du_kib(&stage)?;
    fs::write(debian.join("control"), control(version, &arch, size_kib))?;
    fs::write(debian.join("conffiles"), "/etc/forwarder/forwarder.toml\n")?;
    for (name, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        write_mode(&debian.join(name), text, 0o755)?;
    }

    let deb = out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb)
        .status()
        .context("dpkg-deb (package dpkg)")?;
    ensure!(status.success(), "dpkg-deb --build failed");
    Ok(deb)
}

fn deb_arch() -> Result<String> {
    let out = Command::new("dpkg").arg("--print-architecture").output().context("dpkg --print-architecture")?;
    ensure!(out.status.success(), "dpkg --print-architecture failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_mode(to, bytes, mode)
}

fn write_mode(to: &Path, bytes: impl AsRef<[u8]>, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// forwarder(1) and one page per verb and sub-verb (forwarder-run(1), forwarder-forward-add(1), ...).
fn man_pages(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let cmd = forwarder::cli::Cli::command();
    clap_mangen::generate_to(cmd, dir).context("man pages")?;
    // Compressed, as Debian policy asks.
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let status = Command::new("gzip").args(["-9n"]).arg(&path).status()?;
        ensure!(status.success(), "gzip {}", path.display());
    }
    Ok(())
}

fn completions(stage: &Path) -> Result<()> {
    for (shell, dir, name) in [
        (Shell::Bash, "usr/share/bash-completion/completions", "forwarder"),
        (Shell::Zsh, "usr/share/zsh/vendor-completions", "_forwarder"),
        (Shell::Fish, "usr/share/fish/vendor_completions.d", "forwarder.fish"),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut forwarder::cli::Cli::command(), "forwarder", &mut text);
        write_mode(&stage.join(dir).join(name), text, 0o644)?;
    }
    Ok(())
}

fn du_kib(dir: &Path) -> Result<u64> {
    fn walk(p: &Path) -> std::io::Result<u64> {
        let meta = fs::symlink_metadata(p)?;
        if meta.is_dir() { fs::read_dir(p)?.try_fold(0, |sum, e| Ok(sum + walk(&e?.path())?)) } else { Ok(meta.len()) }
    }
    Ok(walk(dir)?.div_ceil(1024))
}

fn control(version: &str, arch: &str, size_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: forwarder developers <forwarder@example.org>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6 (>= 2.34)\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://example.org/forwarder\n\
         Description: eBPF/XDP port forwarder (DNAT + SNAT + conntrack)\n \
         forwarder replaces iptables DNAT/REDIRECT/MASQUERADE port forwards with XDP and TC\n \
         programs: connections are tracked like netfilter's, replies are rewritten back,\n \
         packets go on by FIB lookup and redirect. Programs on the host reach forwards on\n \
         localhost too, and same-switch peers are reached straight at layer 2.\n"
    )
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: forwarder\n\n\
     Files: *\n\
     License: MIT or GPL-2.0\n"
        .to_string()
}

/// New units are picked up; an upgrade restarts a running instance, which adopts the
/// pinned state (the units use --on-exit keep), so no connection drops.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
    if [ "$1" = configure ] && [ -n "$2" ]; then
        systemctl try-restart forwarder.service >/dev/null || true
    fi
fi
"#;

/// Removal (not an upgrade) stops the service and takes the programs and pins away, which
/// the units' --on-exit keep leaves behind.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop forwarder.service >/dev/null 2>&1 || true
    fi
    /usr/bin/forwarder detach >/dev/null 2>&1 || true
fi
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
"#;
