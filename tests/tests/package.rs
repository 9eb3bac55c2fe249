//! The Debian package (issue 18): built from the debug binary as `cargo xtask deb` builds it
//! from a release one, inspected with dpkg-deb, installed into a throwaway root with
//! `dpkg -x`, its units checked by `systemd-analyze verify`, its man pages rendered and its
//! completions loaded, and the binary run from there.

use std::{path::Path, process::Command};

use forwarder_tests::{daemon::forwarder_bin, netns::run_ok};

fn output(cmd: &mut Command) -> String {
    run_ok(cmd).unwrap()
}

#[test]
fn debian_package() {
    let out = tempfile::tempdir().unwrap();
    let deb = forwarder_tests::deb::build(&forwarder_bin(), out.path()).unwrap();
    let name = deb.file_name().unwrap().to_string_lossy().to_string();
    let arch = output(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(name, format!("forwarder_{}_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim()));

    let info = output(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in ["Package: forwarder", "Depends: libc6", "Section: net", "Installed-Size:"] {
        assert!(info.contains(field), "control has {field:?}:\n{info}");
    }
    let ctrl = tempfile::tempdir().unwrap();
    output(Command::new("dpkg-deb").arg("--control").arg(&deb).arg(ctrl.path()));
    let conffiles = std::fs::read_to_string(ctrl.path().join("conffiles")).unwrap();
    assert_eq!(conffiles, "/etc/forwarder/forwarder.toml\n");
    for script in ["postinst", "prerm", "postrm"] {
        output(Command::new("sh").arg("-n").arg(ctrl.path().join(script)));
    }
    let contents = output(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let pages = [
        "forwarder",
        "forwarder-run",
        "forwarder-check",
        "forwarder-stats",
        "forwarder-status",
        "forwarder-detach",
        "forwarder-forward-add",
        "forwarder-peer-add",
    ];
    let mut want: Vec<String> = vec![
        "./usr/bin/forwarder".into(),
        "./lib/systemd/system/forwarder.service".into(),
        "./lib/systemd/system/forwarder@.service".into(),
        "./etc/forwarder/forwarder.toml".into(),
        "./usr/share/bash-completion/completions/forwarder".into(),
        "./usr/share/zsh/vendor-completions/_forwarder".into(),
        "./usr/share/fish/vendor_completions.d/forwarder.fish".into(),
    ];
    want.extend(pages.iter().map(|p| format!("./usr/share/man/man1/{p}.1.gz")));
    for path in &want {
        assert!(contents.lines().any(|l| l.ends_with(path.as_str())), "{path} in the package:\n{contents}");
    }
    assert!(contents.lines().all(|l| l.contains("root/root")), "files owned by root:\n{contents}");

    // Installed into a throwaway root.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    output(Command::new("dpkg").arg("-x").arg(&deb).arg(r));
    let bin = r.join("usr/bin/forwarder");
    let version = output(Command::new(&bin).arg("--version"));
    assert_eq!(version.trim(), format!("forwarder {}", env!("CARGO_PKG_VERSION")));
    let check = output(Command::new(&bin).arg("check").arg("--config").arg(r.join("etc/forwarder/forwarder.toml")));
    assert!(check.contains("0 interfaces, 0 forwards, 0 peers"), "the conffile forwards nothing: {check}");

    verify_units(r);
    for page in pages {
        let text = output(
            Command::new("man").arg("-l").arg(r.join(format!("usr/share/man/man1/{page}.1.gz"))).env("MANWIDTH", "100"),
        );
        assert!(text.contains("NAME") && text.contains(page), "man -l {page}:\n{text}");
    }
    let run_page = output(Command::new("man").arg("-l").arg(r.join("usr/share/man/man1/forwarder-run.1.gz")));
    assert!(run_page.contains("--on-exit"), "forwarder-run(1) documents the flags");

    let completion = r.join("usr/share/bash-completion/completions/forwarder");
    let script = format!(
        "source {}; COMP_WORDS=(forwarder st); COMP_CWORD=1; _forwarder forwarder st forwarder; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        completion.display()
    );
    let words = output(Command::new("bash").args(["-c", &script]));
    assert!(
        words.lines().any(|w| w == "stats") && words.lines().any(|w| w == "status"),
        "bash completes st*: {words:?}"
    );
}

/// systemd-analyze verify against the installed root: the units' commands must exist there,
/// and the targets they name come from this machine's systemd (copied into the root).
fn verify_units(r: &Path) {
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    std::fs::create_dir_all(r.join("bin")).unwrap();
    output(Command::new("cp").arg("-r").arg("/usr/lib/systemd/system").arg(r.join("usr/lib/systemd/")));
    std::fs::copy("/bin/kill", r.join("bin/kill")).unwrap();
    let units = r.join("lib/systemd/system");
    // A template is verified through an instance of it.
    std::fs::copy(units.join("forwarder@.service"), units.join("forwarder@edge.service")).unwrap();
    for unit in ["forwarder.service", "forwarder@edge.service"] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", r.display()))
            .arg("--man=no")
            .arg(units.join(unit))
            .output()
            .unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {unit}:\n{said}");
    }
    let unit = std::fs::read_to_string(units.join("forwarder.service")).unwrap();
    for line in ["Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "--on-exit keep"] {
        assert!(unit.contains(line), "forwarder.service has {line:?}");
    }
}
