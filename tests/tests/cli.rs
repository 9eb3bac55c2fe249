//! The `forwarder` binary's check, run and stats verbs as users script them.

use std::process::Command;

use forwarder_tests::{Chain, Daemon, daemon::forwarder_bin, unique_tag};

fn write_config(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::Builder::new().prefix("forwarder-cli-").tempdir().unwrap();
    let p = dir.path().join("forwarder.toml");
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
    // Every start logs how far the verifier walked the packet programs.
    let log = d.log();
    let loaded = log.lines().find(|l| l.contains("programs loaded")).unwrap_or_else(|| panic!("{log}"));
    for field in ["xdp=", "tc_ingress="] {
        let walked: u64 = loaded
            .split(field)
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{field} in {loaded}"));
        assert!(walked > 0 && walked <= 500_000, "{loaded}");
    }
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
    let mut stdout = child.stdout.take().unwrap();
    let (chunk_tx, chunks) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
            if chunk_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // Until the table has been drawn twice (a redraw), or the deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut text = String::new();
    while text.matches("PACKETS/s").count() < 2 {
        match chunks.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(chunk) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Err(_) => break,
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(text.contains("\x1b[2J\x1b[H"), "clears and redraws in place");
    assert!(text.contains("PACKETS/s") && text.contains("mysql"), "{text}");
}

/// `forwarder ARGS...` in `ns`: exit code, stdout, stderr.
fn forwarder_in(ns: &forwarder_tests::Netns, args: &[&str]) -> (i32, String, String) {
    let out = ns.cmd(forwarder_bin().to_str().unwrap()).args(args).output().unwrap();
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`forwarder_in`] with `--json --pin-path` of `d`: exit code and the parsed stdout.
fn json_of(ns: &forwarder_tests::Netns, d: &Daemon, args: &[&str]) -> (i32, serde_json::Value) {
    let mut argv = args.to_vec();
    let pin = d.pin_path.to_str().unwrap();
    argv.extend(["--json", "--pin-path", pin]);
    let (code, out, err) = forwarder_in(ns, &argv);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out:?} {err}"));
    (code, v)
}

/// The keys of a JSON object, sorted.
fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap_or_else(|| panic!("not an object: {v}")).keys().cloned().collect();
    k.sort();
    k
}

const FORWARD_KEYS: [&str; 9] =
    ["backend", "backend_states", "backends", "id", "listen", "local", "name", "protocol", "snat"];
const PEER_KEYS: [&str; 6] = ["address", "direct", "id", "ifindex", "interface", "state"];

/// Every verb's `--json`: a forward is one object in `forward add`, `forward list` and
/// `stats`, a peer one object in `peer add`, `peer list` and `stats`, snat a string,
/// status programs `{name, id}`.
#[test]
fn every_verb_speaks_json_with_one_shape_per_object() {
    let chain = Chain::new().unwrap();
    let mut d = Daemon::start(&chain.router, &chain.tag, GOOD).unwrap();
    let r = &chain.router;
    let (_cfg_dir, cfg) = write_config(GOOD);
    let (code, out, err) = forwarder_in(r, &["check", "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let check: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (check["forwards"].as_u64(), check["interfaces"].as_u64(), check["peers"].as_u64()),
        (Some(1), Some(1), Some(0))
    );

    let (code, added) = json_of(
        r,
        &d,
        &[
            "forward",
            "add",
            "--name",
            "fixed",
            "--protocol",
            "udp",
            "--listen",
            "0.0.0.0:5300",
            "--backend",
            "203.0.113.20:53",
            "--snat",
            "198.51.100.1",
            "--local",
            "false",
        ],
    );
    assert_eq!(code, 0, "{added}");
    assert_eq!(keys(&added["added"]), FORWARD_KEYS, "{added}");
    assert_eq!(added["added"]["snat"], "198.51.100.1");
    assert_eq!(added["added"]["protocol"], "udp");
    assert!(added["added"]["id"].as_u64() > Some(0));

    let (code, list) = json_of(r, &d, &["forward", "list"]);
    assert_eq!(code, 0);
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    for f in &list {
        assert_eq!(keys(f), FORWARD_KEYS, "{f}");
        assert!(f["snat"].is_string(), "{f}");
    }
    assert_eq!(list[0]["name"], "mysql");
    assert_eq!(list[0]["snat"], "auto");
    assert_eq!(list[1], added["added"], "forward add shows the forward as forward list does");

    let (code, peer) = json_of(r, &d, &["peer", "add", "--address", "203.0.113.20", "--interface", "rs"]);
    assert_eq!(code, 0, "{peer}");
    assert_eq!(keys(&peer["added"]), PEER_KEYS, "{peer}");
    let (code, peers) = json_of(r, &d, &["peer", "list"]);
    assert_eq!(code, 0);
    assert_eq!(keys(&peers[0]), PEER_KEYS, "{peers}");
    assert_eq!(peers[0]["interface"], "rs");

    let (code, stats) = json_of(r, &d, &["stats"]);
    assert_eq!(code, 0);
    for (s, f) in stats["forwards"].as_array().unwrap().iter().zip(&list) {
        for k in FORWARD_KEYS.iter().filter(|k| !k.starts_with("backend")) {
            assert_eq!(s[k], f[k], "stats' forward {k} as in forward list");
        }
        assert_eq!(s["backend"], f["backend"]);
        // stats' backends: the list's, each with its state and counters.
        for (i, b) in f["backends"].as_array().unwrap().iter().enumerate() {
            let sb = &s["backends"][i];
            assert_eq!((&sb["address"], &sb["weight"]), (&b["address"], &b["weight"]), "{s}");
            assert_eq!(sb["state"], f["backend_states"][i], "{s}");
        }
    }
    for k in PEER_KEYS {
        if k != "state" && k != "direct" {
            assert_eq!(stats["peers"][0][k], peers[0][k], "stats' peer {k} as in peer list");
        }
        assert!(stats["peers"][0].get(k).is_some(), "stats' peer has {k}");
    }

    let (code, status) = json_of(r, &d, &["status"]);
    assert_eq!(code, 0);
    assert_eq!(status["daemon_running"], true);
    let programs = status["daemon"]["programs"].as_array().unwrap();
    assert!(!programs.is_empty());
    for p in programs {
        assert_eq!(keys(p), ["id", "name"], "{p}");
    }
    assert_eq!(status["forwards"], 2);

    let (code, del) = json_of(r, &d, &["forward", "del", "fixed"]);
    assert_eq!(code, 0);
    assert_eq!(del["removed"], "fixed");
    assert!(del["flushed_connections"].is_u64(), "{del}");
    let (code, del) = json_of(r, &d, &["peer", "del", "203.0.113.20"]);
    assert_eq!(code, 0);
    assert_eq!(del["removed"], "203.0.113.20");

    // A running instance holds its pin path: detach refuses, as JSON, exit 1.
    let (code, refused) = json_of(r, &d, &["detach"]);
    assert_eq!((code, refused["error"]["kind"].as_str()), (1, Some("error")), "{refused}");
    d.kill().unwrap();
    let (code, detached) = json_of(r, &d, &["detach"]);
    assert_eq!(code, 0, "{detached}");
    assert_eq!(detached["detached"], d.pin_path.to_str().unwrap());
    assert!(!d.pin_path.exists());
}

/// Failures: `{"error": {kind, message, line?, field?}}` on stdout with `--json`, and the
/// exit codes of README: 2 usage, 3 invalid config or edit, 4 no running instance.
#[test]
fn errors_are_json_and_exit_codes_tell_them_apart() {
    let chain = Chain::new().unwrap();
    let r = &chain.router;
    let (_d1, bad) = write_config(&GOOD.replace("203.0.113.20:3197", "203.0.113.20:99999"));
    let (code, out, _) = forwarder_in(r, &["check", "--json", "--config", bad.to_str().unwrap()]);
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, 3, "{e}");
    assert_eq!(e["error"]["kind"], "config");
    assert_eq!(e["error"]["line"], 10);
    assert_eq!(e["error"]["field"], "forward[0].backend");
    assert!(e["error"]["message"].as_str().unwrap().contains("99999"), "{e}");
    // Text: the same exit code, the message on stderr.
    let (code, out, err) = forwarder_in(r, &["check", "--config", bad.to_str().unwrap()]);
    assert_eq!((code, out.as_str()), (3, ""));
    assert!(err.contains("line 10"), "{err}");

    // `run` reports a bad config the same way and starts nothing.
    let pin = format!("/sys/fs/bpf/fwt-{}", unique_tag());
    let (code, out, _) = forwarder_in(r, &["run", "--json", "--config", bad.to_str().unwrap(), "--pin-path", &pin]);
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((code, e["error"]["field"].as_str()), (3, Some("forward[0].backend")), "{e}");
    assert!(!std::path::Path::new(&pin).exists());

    // Usage errors are clap's: exit 2 (JSON when asked for).
    let (code, out, _) = forwarder_in(r, &["forward", "add", "--json", "--name", "x", "--protocol", "sctp"]);
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((code, e["error"]["kind"].as_str()), (2, Some("usage")), "{e}");
    let (code, _, err) = forwarder_in(r, &["stats", "--no-such-flag"]);
    assert_eq!(code, 2, "{err}");

    // Nothing pinned: 4, for every verb that needs an instance.
    for verb in [&["stats"][..], &["status"], &["forward", "list"], &["peer", "list"]] {
        let mut argv = verb.to_vec();
        argv.extend(["--json", "--pin-path", &pin]);
        let (code, out, _) = forwarder_in(r, &argv);
        let e: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!((code, e["error"]["kind"].as_str()), (4, Some("no_instance")), "{verb:?}: {e}");
    }

    // Edits: the flag at fault, in the config's words, not a TOML line.
    let d = Daemon::start(r, &chain.tag, GOOD).unwrap();
    let add = |extra: &[&str]| {
        let mut argv = vec!["forward", "add", "--name", "web", "--protocol", "tcp"];
        argv.extend(extra);
        json_of(r, &d, &argv)
    };
    let (code, e) = add(&["--listen", "0.0.0.0:80", "--backend", "203.0.113.20:0"]);
    assert_eq!(code, 3, "{e}");
    assert_eq!((e["error"]["kind"].as_str(), e["error"]["field"].as_str()), (Some("edit"), Some("backend")), "{e}");
    assert!(e["error"].get("line").is_none(), "{e}");
    assert!(!e["error"]["message"].as_str().unwrap().contains("line"), "{e}");
    let (code, e) = add(&["--listen", "0.0.0.0:80", "--backend", "203.0.113.20:80", "--snat", "2001:db8::1"]);
    assert_eq!((code, e["error"]["field"].as_str()), (3, Some("snat")), "{e}");
    let (code, e) = add(&["--listen", "0.0.0.0:3306", "--backend", "203.0.113.20:80"]);
    assert_eq!((code, e["error"]["field"].as_str()), (3, Some("listen")), "{e}");
    let (code, e) = json_of(r, &d, &["forward", "del", "nosuch"]);
    assert_eq!((code, e["error"]["field"].as_str()), (3, Some("name")), "{e}");
    let (code, e) = json_of(r, &d, &["peer", "add", "--address", "127.0.0.1", "--interface", "rs"]);
    assert_eq!((code, e["error"]["field"].as_str()), (3, Some("address")), "{e}");
    // Text errors name the flag too.
    let (code, _, err) = forwarder_in(
        r,
        &[
            "forward",
            "add",
            "--name",
            "web",
            "--protocol",
            "tcp",
            "--listen",
            "x",
            "--backend",
            "203.0.113.20:1",
            "--pin-path",
            d.pin_path.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 3);
    assert!(err.contains("--listen") && !err.contains("argument line"), "{err}");
    let (code, list) = json_of(r, &d, &["forward", "list"]);
    assert_eq!((code, list.as_array().unwrap().len()), (0, 1), "nothing was added");
}

/// `status` exits 4 once the daemon is gone, still showing what it left pinned.
#[test]
fn status_exits_4_when_the_daemon_is_gone() {
    let chain = Chain::new().unwrap();
    let mut d = Daemon::start(&chain.router, &chain.tag, GOOD).unwrap();
    let (code, status) = json_of(&chain.router, &d, &["status"]);
    assert_eq!((code, &status["daemon_running"]), (0, &serde_json::json!(true)));
    d.kill().unwrap();
    let (code, status) = json_of(&chain.router, &d, &["status"]);
    assert_eq!(code, 4, "{status}");
    assert_eq!(status["daemon_running"], false);
    assert_eq!(status["forwards"], 1, "the pinned state is still shown");
    let (code, text, _) = forwarder_in(&chain.router, &["status", "--pin-path", d.pin_path.to_str().unwrap()]);
    assert_eq!(code, 4);
    assert!(text.contains("not running") && text.contains("conntrack"), "{text}");
    // The pins are still there: the counters can be read (exit 0).
    let (code, stats) = json_of(&chain.router, &d, &["stats"]);
    assert_eq!((code, stats["daemon"].as_str()), (0, Some("not running")));
}
