//! The daemon's HTTP endpoints as a test reads them: `/metrics`, `/healthz`, `/readyz` on
//! the default metrics address in the daemon's namespace.

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use crate::netns::Netns;

/// GET `path` from the daemon's metrics server in `ns`: (status code, body).
pub fn http_get(ns: &Netns, path: &'static str) -> (u16, String) {
    ns.run(move || {
        let mut s = TcpStream::connect("127.0.0.1:9464").unwrap();
        // Read to the end: ask the server (keep-alive by default) to close after answering.
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        let code = r.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = r.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
    })
    .unwrap()
}

/// One `/metrics` scrape, parsed.
pub struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    pub fn of(ns: &Netns) -> Self {
        let (code, body) = http_get(ns, "/metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        Scrape(prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text"))
    }

    /// The value of the sample of `metric` whose labels include `labels`.
    pub fn value(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{metric} {labels:?} missing"))
    }
}
