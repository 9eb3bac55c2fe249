//! Pieces of forwarder TOML configs for the test topologies: tests join the tables they
//! need (plus any lines of their own after a table, which belong to it).

use std::fmt::Display;

/// An `[[interface]]` table: `name` with `xdp` (native, generic or off).
pub fn interface(name: &str, xdp: &str) -> String {
    format!("\n[[interface]]\nname = \"{name}\"\nxdp = \"{xdp}\"\n")
}

/// Both router interfaces of [`crate::Chain`] (`rc` towards the client, `rs` towards the
/// server), each with `xdp`.
pub fn router_interfaces(xdp: &str) -> String {
    interface(crate::topo::ROUTER_CLIENT_DEV, xdp) + &interface(crate::topo::ROUTER_SERVER_DEV, xdp)
}

/// The router of [`crate::topo::Line`]: `rc` and `rm` with `xdp`, and a TCP and a UDP
/// forward per family to the server (tcp4/tcp6 :3306 → :3197, udp4/udp6 :5353 → :5353),
/// with the default SNAT.
pub fn line_config(xdp: &str) -> String {
    let mut c = interface("rc", xdp) + &interface("rm", xdp);
    for (name, protocol, listen, backend) in [
        ("tcp4", "tcp", "0.0.0.0:3306", "203.0.113.20:3197"),
        ("tcp6", "tcp", "[::]:3306", "[2001:db8:2::20]:3197"),
        ("udp4", "udp", "0.0.0.0:5353", "203.0.113.20:5353"),
        ("udp6", "udp", "[::]:5353", "[2001:db8:2::20]:5353"),
    ] {
        c += &forward(name, protocol, listen, backend);
    }
    c
}

/// A `[[forward]]` table: `protocol` (tcp or udp) from `listen` to `backend`, with the
/// default SNAT; append `snat = "..."` and the like for others.
pub fn forward(name: &str, protocol: &str, listen: impl Display, backend: impl Display) -> String {
    format!(
        "\n[[forward]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\nlisten = \"{listen}\"\nbackend = \"{backend}\"\n"
    )
}

/// A `[[forward]]` table with several `[[forward.backends]]`: (address, weight) each.
pub fn forward_to_backends(name: &str, protocol: &str, listen: impl Display, backends: &[(String, u32)]) -> String {
    let mut out = format!("\n[[forward]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\nlisten = \"{listen}\"\n");
    for (address, weight) in backends {
        out += &format!("\n[[forward.backends]]\naddress = \"{address}\"\nweight = {weight}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_make_a_valid_forwarder_config() {
        let text = router_interfaces("native")
            + &forward("db", "tcp", "0.0.0.0:3306", "203.0.113.20:3197")
            + "snat = \"auto\"\n"
            + &forward("dns", "udp", "0.0.0.0:5353", "203.0.113.20:5353");
        let c = forwarder::config::Config::parse(&text).unwrap();
        let names: Vec<&str> = c.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["rc", "rs"]);
        let forwards: Vec<(&str, String)> =
            c.forwards.iter().map(|f| (f.name.as_str(), f.backends[0].address.to_string())).collect();
        assert_eq!(forwards, [("db", "203.0.113.20:3197".to_string()), ("dns", "203.0.113.20:5353".to_string())]);
    }
}
