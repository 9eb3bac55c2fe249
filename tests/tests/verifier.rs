//! The programs' headroom under the verifier's budget on this kernel. The kernel refuses a
//! program whose verification walks more than a million instructions, and how far it walks
//! moves with the kernel version and the compiler's output as well as with our code: a
//! program that passed with little to spare on one machine was refused on the next kernel.
//! Each program must verify within half the budget.

use forwarder::loader::{LoadOptions, VERIFIER_LIMIT, verifier_costs};

#[test]
fn every_program_verifies_within_half_the_budget() {
    within_half_the_budget(&LoadOptions::default());
}

/// `run --bpf-debug` turns the kernel side's debug logs on: the verifier then walks their
/// code too (with logs off it knows the level and skips it).
#[test]
fn every_program_verifies_within_half_the_budget_with_debug_logs() {
    within_half_the_budget(&LoadOptions { bpf_log_level: 5, ..LoadOptions::default() });
}

fn within_half_the_budget(opts: &LoadOptions) {
    let costs = verifier_costs(opts).unwrap();
    for c in &costs {
        println!("{c}");
    }
    let refused: Vec<_> = costs.iter().filter(|c| c.walked.is_err()).map(|c| c.program).collect();
    assert!(refused.is_empty(), "refused by the verifier: {refused:?}");
    for c in &costs {
        let n = *c.walked.as_ref().unwrap();
        assert!(n <= VERIFIER_LIMIT / 2, "{}: {n} instructions walked, over half the verifier's budget", c.program);
    }
}

/// `forwarder check --programs`, for an operator trying a kernel before a rollout: the same
/// walk per program, in JSON, and a failing exit status when the kernel refuses one.
#[test]
fn check_programs_reports_the_walk_of_every_program() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("forwarder.toml");
    std::fs::write(
        &config,
        "[[interface]]\nname = \"rc\"\n\n[[forward]]\nname = \"mysql\"\nprotocol = \"tcp\"\n\
         listen = \"0.0.0.0:3306\"\nbackend = \"203.0.113.20:3197\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(forwarder_tests::daemon::forwarder_bin())
        .args(["check", "--json", "--programs", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verifier_limit"], VERIFIER_LIMIT);
    let listed: Vec<&str> =
        report["programs"].as_array().unwrap().iter().map(|p| p["program"].as_str().unwrap()).collect();
    assert_eq!(listed, forwarder::loader::PROGRAMS);
    for p in report["programs"].as_array().unwrap() {
        let n = p["instructions_walked"].as_u64().unwrap_or_else(|| panic!("no walk reported: {p}"));
        assert!(n > 0 && n <= VERIFIER_LIMIT as u64 / 2, "{p}");
    }
}
