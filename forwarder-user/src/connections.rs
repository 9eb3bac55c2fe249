//! `forwarder conntrack list|flush`: the connection table as conntrack-tools shows
//! netfilter's — each connection's original tuple (client → listen address), its reply
//! tuple (backend → the SNAT address and port it answers to), state, age and idle time —
//! read in batches, so 100k entries take a few syscalls.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use forwarder_common::{
    CT_DIR_REPLY, CtKey, CtValue, FAMILY_V6, PROTO_TCP,
    conntrack::{CT_ASSURED, CT_HOST_BACKEND, TCP_STATE_NAMES, UDP_REPLIED},
};
use serde::Serialize;

use crate::{error::Result, state::State};

/// One connection (both of its entries).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Connection {
    pub forward: String,
    pub protocol: &'static str,
    /// netfilter's name of the state: `ESTABLISHED`, `TIME_WAIT`, ... (UDP: `UNREPLIED`,
    /// `REPLIED`).
    pub state: &'static str,
    pub assured: bool,
    /// The backend is on this host (the client's address is kept).
    pub host_backend: bool,
    /// As the client sent it: client → listen address.
    pub original: Tuple,
    /// As the backend answers: backend → the address and port it sees the client as.
    pub reply: Tuple,
    /// Seconds since the connection was made (None: carried over from a table without it).
    pub age_s: Option<u64>,
    /// Seconds since the last packet in either direction.
    pub idle_s: u64,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

fn addr(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V6 { IpAddr::V6(Ipv6Addr::from(*a)) } else { IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])) }
}

fn sock(family: u8, a: &[u8; 16], port_be: u16) -> SocketAddr {
    SocketAddr::new(addr(family, a), u16::from_be(port_be))
}

fn state_name(proto: u8, state: u8) -> &'static str {
    if proto == PROTO_TCP {
        TCP_STATE_NAMES.get(state as usize).copied().unwrap_or("?")
    } else if state == UDP_REPLIED {
        "REPLIED"
    } else {
        "UNREPLIED"
    }
}

/// Pairs the table's entries into connections (`now_ns`: CLOCK_MONOTONIC, the clock of
/// bpf_ktime_get_ns). An original entry whose reply entry is missing is still shown.
pub fn assemble(entries: &[(CtKey, CtValue)], names: &HashMap<u32, String>, now_ns: u64) -> Vec<Connection> {
    let replies: HashMap<CtKey, &CtValue> =
        entries.iter().filter(|(_, v)| v.direction == CT_DIR_REPLY).map(|(k, v)| (*k, v)).collect();
    let mut out: Vec<Connection> = crate::state::connections(entries)
        .into_iter()
        .map(|(k, (v, reply_key))| {
            let reply = replies.get(&reply_key);
            let last = reply.map_or(v.last_seen_ns, |r| r.last_seen_ns.max(v.last_seen_ns));
            Connection {
                forward: names.get(&v.forward_id).cloned().unwrap_or_else(|| format!("#{}", v.forward_id)),
                protocol: if k.proto == PROTO_TCP { "tcp" } else { "udp" },
                state: state_name(k.proto, v.state),
                assured: v.flags & CT_ASSURED != 0,
                host_backend: v.flags & CT_HOST_BACKEND != 0,
                original: Tuple {
                    src: sock(k.family, &k.src_addr, k.src_port_be),
                    dst: sock(k.family, &k.dst_addr, k.dst_port_be),
                },
                reply: Tuple {
                    src: sock(k.family, &reply_key.src_addr, reply_key.src_port_be),
                    dst: sock(k.family, &reply_key.dst_addr, reply_key.dst_port_be),
                },
                age_s: (v.created_ns != 0).then(|| now_ns.saturating_sub(v.created_ns) / 1_000_000_000),
                idle_s: now_ns.saturating_sub(last) / 1_000_000_000,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.forward, a.original.src, a.original.dst).cmp(&(&b.forward, b.original.src, b.original.dst)));
    out
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn forward_names(state: &State) -> Result<HashMap<u32, String>> {
    Ok(state.forwards()?.into_iter().map(|(id, f)| (id, f.name)).collect())
}

/// The running instance's connections, of one forward when named.
pub fn list(pin: &Path, forward: Option<&str>) -> Result<Vec<Connection>> {
    let state = State::open(pin)?;
    let names = forward_names(&state)?;
    let all = assemble(&state.conntrack()?, &names, monotonic_ns());
    Ok(all.into_iter().filter(|c| forward.is_none_or(|f| c.forward == f)).collect())
}

/// Deletes the connections (both entries) of one forward, or all; returns how many. A
/// flushed connection's next packet is a new flow: TCP's is not a SYN, so it is refused
/// (`tcp_not_syn`) and the client sees its connection end, as with `conntrack -F`.
pub fn flush(pin: &Path, forward: Option<&str>) -> Result<usize> {
    let state = State::open(pin)?;
    let names = forward_names(&state)?;
    let ids: Vec<u32> = match forward {
        Some(f) => {
            let ids: Vec<u32> = names.iter().filter(|(_, n)| n.as_str() == f).map(|(id, _)| *id).collect();
            if ids.is_empty() {
                return Err(crate::error::Error::Invalid(format!("no forward named {f:?}")));
            }
            ids
        }
        None => {
            let mut ids: Vec<u32> = state.conntrack()?.iter().map(|(_, v)| v.forward_id).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        }
    };
    state.flush_connections_of(&ids)
}

fn fmt_age(s: Option<u64>) -> String {
    s.map_or_else(|| "-".to_string(), |s| s.to_string())
}

pub fn render(conns: &[Connection]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<5} {:<12} {:<47} {:<47} {:>8} {:>8}",
        "FORWARD",
        "PROTO",
        "STATE",
        "ORIGINAL (client -> listen)",
        "REPLY (backend -> client as seen)",
        "AGE_S",
        "IDLE_S"
    );
    for c in conns {
        let state = if c.assured { format!("{} [A]", c.state) } else { c.state.to_string() };
        let _ = writeln!(
            out,
            "{:<16} {:<5} {:<12} {:<47} {:<47} {:>8} {:>8}",
            c.forward,
            c.protocol,
            state,
            format!("{} -> {}", c.original.src, c.original.dst),
            format!("{} -> {}", c.reply.src, c.reply.dst),
            fmt_age(c.age_s),
            c.idle_s
        );
    }
    let _ = writeln!(out, "{} connections", conns.len());
    out
}

#[cfg(test)]
mod tests {
    use forwarder_common::{CT_DIR_ORIGINAL, conntrack::TCP_ESTABLISHED};

    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut x = [0u8; 16];
        x[..4].copy_from_slice(&a);
        x
    }

    #[test]
    fn a_connection_is_its_two_entries() {
        let (client, listen, snat, backend) =
            (v4([192, 0, 2, 2]), v4([192, 0, 2, 1]), v4([203, 0, 113, 1]), v4([203, 0, 113, 20]));
        let ok = CtKey {
            src_addr: client,
            dst_addr: listen,
            src_port_be: 40000u16.to_be(),
            dst_port_be: 3306u16.to_be(),
            proto: PROTO_TCP,
            family: 4,
            _pad: [0; 2],
        };
        let ov = CtValue {
            new_src_addr: snat,
            new_dst_addr: backend,
            new_src_port_be: 20001u16.to_be(),
            new_dst_port_be: 3197u16.to_be(),
            forward_id: 3,
            direction: CT_DIR_ORIGINAL,
            state: TCP_ESTABLISHED,
            flags: CT_ASSURED,
            last_seen_ns: 5_000_000_000,
            created_ns: 1_000_000_000,
            ..Default::default()
        };
        let rk = CtKey {
            src_addr: backend,
            dst_addr: snat,
            src_port_be: 3197u16.to_be(),
            dst_port_be: 20001u16.to_be(),
            ..ok
        };
        let rv = CtValue {
            new_src_addr: listen,
            new_dst_addr: client,
            new_src_port_be: 3306u16.to_be(),
            new_dst_port_be: 40000u16.to_be(),
            direction: CT_DIR_REPLY,
            last_seen_ns: 8_000_000_000,
            ..ov
        };
        let names = HashMap::from([(3, "mysql".to_string())]);
        let got = assemble(&[(ok, ov), (rk, rv)], &names, 10_000_000_000);
        assert_eq!(got.len(), 1);
        let c = &got[0];
        assert_eq!((c.forward.as_str(), c.protocol, c.state, c.assured), ("mysql", "tcp", "ESTABLISHED", true));
        assert_eq!(c.original.src.to_string(), "192.0.2.2:40000");
        assert_eq!(c.original.dst.to_string(), "192.0.2.1:3306");
        assert_eq!(c.reply.src.to_string(), "203.0.113.20:3197");
        assert_eq!(c.reply.dst.to_string(), "203.0.113.1:20001", "the SNAT port the backend sees");
        assert_eq!((c.age_s, c.idle_s), (Some(9), 2), "idle since the later of the two directions");
        let migrated = assemble(&[(ok, CtValue { created_ns: 0, ..ov })], &names, 10_000_000_000);
        assert_eq!(migrated[0].age_s, None);
        assert!(render(&got).contains("203.0.113.1:20001"));
    }
}
