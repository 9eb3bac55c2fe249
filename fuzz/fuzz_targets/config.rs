//! The config parser on arbitrary input: it must return a config or an error naming a line,
//! never panic; and a config it accepts must be accepted again after a round trip through
//! `forward add`-style validation of each forward. The fast path for plain configs and the
//! `toml` crate must agree on every input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (fast, toml) = forwarder::config::fast_path_outcomes(text);
    assert_eq!(fast, toml, "fast path and toml disagree on {text:?}");
    for node in [None, Some("worker-1")] {
        match forwarder::config::Config::parse_for_node(text, node) {
            Ok(cfg) => {
                for f in &cfg.forwards {
                    assert!(!f.name.is_empty() && f.name.len() <= forwarder::config::MAX_NAME_LEN);
                    assert!(f.listen.port() != 0 && f.backends.iter().all(|b| b.address.port() != 0));
                }
                // Map entries can always be built from an accepted config.
                let with_ids: Vec<_> = cfg.forwards.iter().cloned().enumerate().map(|(i, f)| (i as u32 + 1, f)).collect();
                let _ = forwarder::maps::forward_entries(&with_ids, &["127.0.0.1".parse().unwrap()]);
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});
