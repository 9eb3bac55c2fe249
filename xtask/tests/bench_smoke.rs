//! CI smoke test of `cargo xtask bench --quick` with one repetition: every contender must
//! produce its figures. Speed itself is never asserted (ratios only mean something within one
//! run on one machine). Needs root, like the other namespace tests.

use std::process::Command;

#[test]
fn quick_bench_gives_every_contender_its_figures() {
    let out_dir = std::env::temp_dir().join(format!("forwarder-bench-smoke-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bench", "--quick", "--reps", "1", "--out"])
        .arg(&out_dir)
        .spawn()
        .expect("run xtask");
    let status = child.wait().expect("wait for xtask");
    // Every sandbox of the run is gone (forwarder_tests names them fwt-{pid % 100000}x{n}-…;
    // other tests' namespaces may exist meanwhile).
    let ours = format!("fwt-{}x", child.id() % 100_000);
    let list = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let left: Vec<_> =
        String::from_utf8_lossy(&list.stdout).lines().filter(|l| l.starts_with(&ours)).map(str::to_string).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(status.success(), "cargo xtask bench --quick failed");
    let json = std::fs::read_to_string(out_dir.join("results.json")).expect("results.json");
    let results: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    for file in ["results.md", "chart.svg"] {
        assert!(out_dir.join(file).exists(), "{file} missing");
    }
    let contenders = results["contenders"].as_array().expect("contenders");
    assert_eq!(contenders.len(), 10, "every contender ran");
    for c in contenders {
        let figures = c["figures"].as_object().expect("figures");
        // The ceiling only redirects: it has the packet-rate figures, and says why not more.
        let expected: &[&str] = if c["limitation"].is_null() {
            &[
                "udp_one_flow_pps",
                "udp_many_flows_pps",
                "cpu_ns_per_packet_one_flow",
                "tcp_bits_per_second",
                "tcp_veth_defaults_bits_per_second",
                "latency_p99_us",
                "connections_per_second",
                "connections_failed",
                "churn_requests_per_second",
                "churn_min_window_requests_per_second",
                "churn_failed_connections",
            ]
        } else {
            &["udp_one_flow_pps", "udp_many_flows_pps", "cpu_ns_per_packet_one_flow"]
        };
        // New flows: every contender but socat (whose kernel answers the SYNs itself).
        let new_flows: &[&str] = if c["id"] == "socat" {
            &[]
        } else {
            &[
                "new_flows_per_second",
                "new_flows_offered_per_second",
                "cpu_ns_per_new_flow",
                "new_flows_dropped",
                "new_flows_refused_at_ring",
            ]
        };
        for f in expected.iter().chain(new_flows) {
            let median = figures.get(*f).and_then(|s| s["median"].as_f64());
            assert!(median.is_some(), "{}: no {f} ({:?})", c["id"], c["errors"]);
        }
        if !new_flows.is_empty() {
            let delivered = figures["new_flows_per_second"]["median"].as_f64().unwrap();
            assert!(delivered > 0.0, "{}: no SYN delivered", c["id"]);
            // What the router veth's ring refused is part of what did not arrive.
            let samples = |f: &str| {
                figures[f]["samples"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>()
            };
            for (refused, dropped) in samples("new_flows_refused_at_ring").iter().zip(samples("new_flows_dropped")) {
                assert!(*refused <= dropped, "{}: {refused} refused at the ring, {dropped} dropped", c["id"]);
            }
        }
        assert!(figures["udp_one_flow_pps"]["median"].as_f64().unwrap() > 0.0, "{}: nothing delivered", c["id"]);
        // Connection churn: every window counted and every failure reported (a count, zero
        // or more: forwarder may run out of SNAT ports, which must show, not fail the run).
        let churn = c["churn"].as_array().expect("churn runs");
        if c["limitation"].is_null() {
            assert_eq!(churn.len(), 1, "{}: one churn run per repetition ({:?})", c["id"], c["errors"]);
            let run = &churn[0];
            let windows = run["windows"].as_array().expect("windows");
            assert!(windows.len() >= 2, "{}: churn windows {windows:?}", c["id"]);
            assert!(windows.iter().all(|w| w["requests_per_second"].as_f64().is_some()), "{windows:?}");
            let failed = run["failed"].as_u64().expect("a failure count");
            let by_kind: u64 =
                run["failures"].as_object().expect("failures by kind").values().filter_map(|v| v.as_u64()).sum();
            assert_eq!(failed, by_kind, "{}: every failure has a kind", c["id"]);
            assert!(run["completed"].as_u64().is_some_and(|n| n > 0), "{}: no churn connection completed", c["id"]);
            assert!(run["cpu_us_per_connection"].as_f64().is_some_and(|us| us > 0.0), "{}: CPU/connection", c["id"]);
        } else {
            assert!(churn.is_empty(), "{}: no TCP, no churn", c["id"]);
        }
    }
    let md = std::fs::read_to_string(out_dir.join("results.md")).expect("results.md");
    assert!(md.contains("## Connection churn"), "results.md has the churn section");
    assert!(md.contains("## New flows"), "results.md has the new-flows section");
    assert!(results["connection_tables"]["forwarder_entries"].as_u64().is_some(), "connection-table limits");
    // forwarder's counters say how its UDP packets left: with XDP native and one flow,
    // nearly all from the flow cache (the first through the full path, then one entry hit
    // per CPU the flow meets).
    let native = contenders.iter().find(|c| c["id"] == "forwarder-xdp-native").expect("XDP native ran");
    let one_flow = native["reasons"]["1 flow"].as_object().expect("reason counts of the one-flow workload");
    let total: u64 = one_flow.values().filter_map(|v| v.as_u64()).sum();
    let from_cache = one_flow.get("redirect_xdp_flow_cache").and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(total > 0 && from_cache * 10 > total * 9, "{one_flow:?}");
    // And how the packets of the TCP figure with the veth defaults and of the new flows left,
    // whatever the reasons' names.
    for c in contenders.iter().filter(|c| c["id"].as_str().is_some_and(|id| id.starts_with("forwarder-"))) {
        for workload in ["TCP, veth defaults", "new flows"] {
            let counts = c["reasons"][workload].as_object();
            assert!(counts.is_some_and(|m| !m.is_empty()), "{}: reasons of {workload}: {counts:?}", c["id"]);
        }
        // The new flows came in rounds (3 in quick mode), each of at most 30,000 SYNs (the
        // generator's budget), the connection table emptied between them: more SYNs than
        // one round holds, each new to the router (a flush that failed fails the figure).
        let syns: u64 = c["reasons"]["new flows"].as_object().unwrap().values().filter_map(|v| v.as_u64()).sum();
        assert!(syns > 30_000, "{}: {syns} SYNs, not several rounds", c["id"]);
    }
    // The many-backends workload: the UDP forward over 16 backends through every contender
    // that spreads one forward over several, with its many-flows figures; forwarder's flows
    // reached every backend (the flows are the same every run, and so is their hashing).
    let many = &results["many_backends"];
    assert_eq!(many["backends"], 16);
    let many_contenders = many["contenders"].as_array().expect("many-backends contenders");
    let ids: Vec<_> = many_contenders.iter().map(|c| c["id"].as_str().unwrap_or_default()).collect();
    assert_eq!(ids, ["iptables", "forwarder-tc", "forwarder-xdp-native"]);
    for c in many_contenders {
        for f in ["udp_many_flows_pps", "cpu_ns_per_packet_many_flows"] {
            let median = c["figures"][f]["median"].as_f64();
            assert!(median.is_some_and(|v| v > 0.0), "{} with 16 backends: no {f} ({:?})", c["id"], c["errors"]);
        }
        if c["id"] != "iptables" {
            let flows = c["flows_per_backend"][0].as_array().expect("flows per backend");
            assert_eq!(flows.len(), 16, "{}: {flows:?}", c["id"]);
            assert!(flows.iter().all(|n| n.as_u64().is_some_and(|n| n > 0)), "{}: {flows:?}", c["id"]);
        }
    }
    assert!(md.contains("## Many backends"), "results.md has the many-backends section");
    let scaling = &results["scaling"];
    let apply = scaling["apply"].as_array().expect("rule scaling timed");
    assert!(!apply.is_empty(), "rule scaling timed");
    for a in apply {
        for f in ["forwarder_backends_seconds", "iptables_restore_backends_seconds"] {
            assert!(a[f].as_f64().is_some(), "{f} of {} forwards: {:?}", a["forwards"], scaling["errors"]);
        }
    }
    assert!(results["testrun"].as_array().is_some_and(|t| t.len() >= 11), "every BPF_PROG_TEST_RUN path timed");
    // The warm rows time the paths they name: the identity forward's packets are redirected,
    // and the lookup programs found the key the bench inserted.
    let row = |program: &str, path: &str| {
        results["testrun"].as_array().unwrap().iter().find(|t| t["program"] == program && t["path"] == path).cloned()
    };
    for (program, path, verdict) in [
        ("xdp", "established, warm", 4),
        ("xdp", "reverse, warm", 4),
        ("tc", "established, warm", 7),
        ("xdp", "new connection (TCP SYN)", 4),
        ("tc", "new connection (TCP SYN)", 7),
        ("lookup + redirect", "40-byte key, warm", 4),
        ("lookup + redirect", "16-byte key, warm", 4),
    ] {
        let t = row(program, path).unwrap_or_else(|| panic!("{program} {path} timed"));
        assert_eq!(t["verdict"], verdict, "{program} {path}: {t}");
        assert!(t["ns_per_packet"].as_f64().is_some_and(|ns| ns > 0.0), "{t}");
    }
    let _ = std::fs::remove_dir_all(out_dir);
}
