//! The `forwarder` binary's check, run and stats verbs as users script them.

use std::process::Command;

use forwarder_tests::{Chain, Daemon, daemon::forwarder_bin, unique_tag};

fn write_config(text: &str) -> (tempdir::Dir, std::path::PathBuf) {
    let dir = tempdir::Dir::new();
    let p = dir.0.join("forwarder.toml");
    std::fs::write(&p, text).unwrap();
    (dir, p)
}

/// `forwarder run` in the router namespace with `config` and `pin`, for starts that must
/// fail: its output once it has exited.
fn run_once(chain: &Chain, config: &str, pin: &str) -> std::process::Output {
    let (_dir, p) = write_config(config);
    chain
        .router
        .cmd(forwarder_bin().to_str().unwrap())
        .args(["run", "--config"])
        .arg(&p)
        .args(["--pin-path", pin])
        .output()
        .unwrap()
}

mod tempdir {
    /// A directory under the system temp dir, removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!("forwarder-cli-{}", super::unique_tag()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

const GOOD: &str = r#"
[[interface]]
name = "rc"
xdp = "native"

[[forward]]
name = "mysql"
protocol = "tcp"
listen = "0.0.0.0:3306"
backend = "203.0.113.20:3197"
snat = "auto"
"#;

#[test]
fn check_accepts_a_good_config() {
    let (_d, p) = write_config(GOOD);
    let out = Command::new(forwarder_bin()).args(["check", "--config"]).arg(&p).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 forwards"));
}

#[test]
fn check_names_line_and_field_of_an_error() {
    let (_d, p) = write_config(&GOOD.replace("203.0.113.20:3197", "203.0.113.20:99999"));
    let out = Command::new(forwarder_bin()).args(["check", "--config"]).arg(&p).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 10") && err.contains("forward[0].backend"), "{err}");
}

#[test]
fn run_refuses_a_bad_config_and_applies_nothing() {
    let chain = Chain::new().unwrap();
    let pin = format!("/sys/fs/bpf/fwt-{}", unique_tag());
    let out = run_once(&chain, &GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""), &pin);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 8") && err.contains("protocol") && err.contains("sctp"), "{err}");
    assert!(!std::path::Path::new(&pin).exists(), "nothing pinned");
    let link = chain.router.ip(&["-d", "link", "show", "dev", "rc"]).unwrap();
    assert!(!link.contains("xdp"), "nothing attached: {link}");
}

#[test]
fn run_refuses_a_missing_interface_and_cleans_up() {
    let chain = Chain::new().unwrap();
    let pin = format!("/sys/fs/bpf/fwt-{}", unique_tag());
    let out = run_once(&chain, &GOOD.replace("name = \"rc\"", "name = \"nosuch0\""), &pin);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch0"));
    assert!(!std::path::Path::new(&pin).exists(), "nothing left pinned");
}

#[test]
fn stats_table_and_json_and_a_second_instance_on_the_same_pin_path_is_refused() {
    let chain = Chain::new().unwrap();
    let daemon = Daemon::start(&chain.router, &chain.tag, GOOD).unwrap();
    let table = daemon.cli(&["stats"]).unwrap();
    assert!(table.contains("mysql") && table.contains("203.0.113.20:3197") && table.contains("no_rule"), "{table}");
    let json = daemon.stats().unwrap();
    assert_eq!(json["forwards"][0]["name"], "mysql");
    assert_eq!(json["forwards"][0]["listen"], "0.0.0.0:3306");
    assert!(json["reasons"].as_array().unwrap().len() >= 18);
    // Each reason's kind as README tells operators to read it.
    let kind = |name: &str| {
        json["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == name).unwrap()["kind"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (name, want) in [
        ("redirect_xdp_flow_cache", "forwarded"),
        ("no_rule", "passed"),
        ("tcp_not_syn", "passed"),
        ("host_socket", "passed"),
        ("ports_exhausted", "dropped"),
        ("ct_invalid", "dropped"),
        ("rst_out_of_window", "dropped"),
        ("peer_direct", "peer"),
        ("peer_fallback", "peer"),
        ("icmp_translated", "icmp"),
        ("icmp_time_exceeded", "icmp"),
        ("icmp_too_big", "icmp"),
        ("icmp_unreachable", "icmp"),
        ("early_drop", "event"),
        ("local_udp_ambiguous", "dropped"),
    ] {
        assert_eq!(kind(name), want, "{name}");
    }

    let out = run_once(&chain, GOOD, daemon.pin_path.to_str().unwrap());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another forwarder instance"));
    assert!(daemon.pin_path.exists(), "the running instance keeps its pins");
}

/// `xdp = "native"` on a device whose driver has no native XDP (a bridge) falls back
/// to generic XDP, and `status` says so.
#[test]
fn native_xdp_falls_back_to_generic_where_the_driver_lacks_it() {
    let chain = Chain::new().unwrap();
    chain.router.ip(&["link", "add", "d0", "type", "bridge"]).unwrap();
    chain.router.ip(&["link", "set", "d0", "up"]).unwrap();
    let cfg = GOOD.replace("name = \"rc\"", "name = \"d0\"");
    let d = Daemon::start(&chain.router, &chain.tag, &cfg).unwrap();
    let status: serde_json::Value = serde_json::from_str(&d.cli(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(status["daemon"]["interfaces"][0]["xdp"], "generic", "{status}");
    assert!(d.log().contains("native XDP unavailable"));
    let link = chain.router.ip(&["-d", "link", "show", "dev", "d0"]).unwrap();
    assert!(link.contains("xdpgeneric"), "{link}");
}

/// `stats --watch` redraws a table of per-second rates in place.
#[test]
fn stats_watch_shows_rates() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, GOOD).unwrap();
    let mut child = chain
        .router
        .cmd(forwarder_bin().to_str().unwrap())
        .args(["stats", "--watch", "--pin-path"])
        .arg(&d.pin_path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\x1b[2J\x1b[H"), "clears and redraws in place");
    assert!(text.contains("PACKETS/s") && text.contains("mysql"), "{text}");
}
