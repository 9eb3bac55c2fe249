//! forwarder under a service manager (issue 18): the sd_notify readiness protocol of
//! systemd's `Type=notify` units. The daemon runs with NOTIFY_SOCKET naming a datagram
//! socket the test owns.

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use forwarder_tests::{
    Chain, Daemon,
    config::{forward, router_interfaces},
    sockets::serve_in,
    topo::{ROUTER_CLIENT_ADDR, SERVER_ADDR},
};

const LISTEN_PORT: u16 = 3306;
const BACKEND_PORT: u16 = 3197;
const STARTS: usize = 20;

fn config(xdp: &str) -> String {
    router_interfaces(xdp)
        + &forward("mysql", "tcp", format!("0.0.0.0:{LISTEN_PORT}"), format!("{SERVER_ADDR}:{BACKEND_PORT}"))
}

/// A backend that answers every connection with "backend".
fn backend(chain: &Chain) {
    serve_in(
        &chain.server,
        "backend",
        || TcpListener::bind((SERVER_ADDR, BACKEND_PORT)),
        |l| {
            for s in l.incoming().flatten() {
                let _ = std::io::Write::write_all(&mut &s, b"backend");
            }
        },
    )
    .unwrap();
}

fn through_forward(chain: &Chain) -> Result<String, String> {
    let to: SocketAddr = format!("{ROUTER_CLIENT_ADDR}:{LISTEN_PORT}").parse().unwrap();
    chain
        .client
        .run(move || {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut got = String::new();
            s.read_to_string(&mut got).map_err(|e| e.to_string())?;
            Ok(got)
        })
        .unwrap()
}

/// READY=1 comes only once the forward works: a client connecting the moment it arrives
/// gets through, every one of 20 starts (a fresh instance each time, nothing pinned before).
#[test]
fn ready_means_forwarding() {
    let chain = Chain::new().unwrap();
    backend(&chain);
    let mut failed = Vec::new();
    for i in 0..STARTS {
        let xdp = ["native", "off"][i % 2];
        let (daemon, _socket) =
            Daemon::start_notified(&chain.router, &format!("{}-{i}", chain.tag), &config(xdp)).unwrap();
        match through_forward(&chain) {
            Ok(got) if got == "backend" => {}
            other => failed.push(format!("start {i} ({xdp}): {other:?}")),
        }
        drop(daemon);
    }
    assert!(failed.is_empty(), "{} of {STARTS} starts not forwarding at READY=1: {failed:?}", failed.len());
}

/// A reload says RELOADING=1 (with the monotonic time systemd's notify-reload wants), then
/// READY=1 again: on SIGHUP, on a change of the file, and when the new file is refused (the
/// old config keeps running). SIGTERM says STOPPING=1.
#[test]
fn reload_and_stop_are_announced() {
    let chain = Chain::new().unwrap();
    backend(&chain);
    let (mut daemon, socket) = Daemon::start_notified(&chain.router, &chain.tag, &config("off")).unwrap();
    let steps: [(&str, Option<String>); 3] = [
        ("SIGHUP", None),
        ("changed file", Some(config("native"))),
        ("refused file", Some("[[forward]]\nname = 1\n".to_string())),
    ];
    for (what, text) in steps {
        match text {
            // The daemon watches its file: writing it is the reload.
            Some(text) => std::fs::write(&daemon.config_path, text).unwrap(),
            None => daemon.signal(nix::sys::signal::Signal::SIGHUP).unwrap(),
        }
        let reloading = Daemon::next_notification(&socket).unwrap();
        assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{what}: {reloading:?}");
        assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{what}: {reloading:?}");
        let ready = Daemon::next_notification(&socket).unwrap();
        assert!(ready.lines().any(|l| l == "READY=1"), "{what}: {ready:?}");
        assert_eq!(through_forward(&chain).as_deref(), Ok("backend"), "{what}: still forwarding");
    }
    daemon.stop().unwrap();
    let stopping = Daemon::next_notification(&socket).unwrap();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
}

/// `ip netns exec` remounts /sys in a private mount namespace: `run` says what to do
/// instead, and pins nothing (into a bpffs that would vanish with it, or anywhere).
#[test]
fn ip_netns_exec_is_refused_clearly() {
    let chain = Chain::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("forwarder.toml");
    std::fs::write(&config, config_text_without_interfaces()).unwrap();
    let pin = format!("/sys/fs/bpf/fwt-{}-netns-exec", chain.tag);
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &chain.router.name])
        .arg(forwarder_tests::daemon::forwarder_bin())
        .args(["run", "--metrics-addr", "off", "--pin-path", &pin, "--config"])
        .arg(&config)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {stderr}");
    assert!(
        stderr.contains("ip netns exec") && stderr.contains("nsenter --net=/run/netns/"),
        "says what to do: {stderr}"
    );
    assert!(!std::path::Path::new(&pin).exists(), "nothing pinned at {pin}");
    assert!(!forwarder::status::path_for(std::path::Path::new(&pin)).exists(), "no status file");
}

fn config_text_without_interfaces() -> String {
    format!(
        "[[forward]]\nname = \"mysql\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:{LISTEN_PORT}\"\nbackend = \"{SERVER_ADDR}:{BACKEND_PORT}\"\n"
    )
}
