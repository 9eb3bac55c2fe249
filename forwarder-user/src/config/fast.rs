//! A fast path for configs written in the plain form (`[[forward]]` tables of `key = "string"`
//! lines), which is what large generated configs look like: parsing 100k forwards with the
//! `toml` crate takes most of the time of applying them.
//!
//! It is only ever a shortcut, never a second dialect: it accepts a strict subset of TOML
//! (bare keys; basic strings without escapes, decimal integers and booleans on one line;
//! the headers `[[interface]]`, `[[forward]]`, `[[peer]]`, `[conntrack]` and `[limits]`;
//! comments and blank lines), and gives up (`None`) on anything else, including every
//! mistake: unknown or repeated keys, repeated tables, missing fields, wrong types, unknown
//! enum values, `[node.NAME]` sections, CRLF line ends. The caller then parses with `toml`,
//! which produces the same value or the usual error message. Values carry the same spans
//! (`line N` in validation errors) as with `toml`.

use std::ops::Range;

use toml::Spanned;

use super::{
    OnForwardRemoved, Protocol, RawConfig, RawConntrack, RawForward, RawInterface, RawLimits, RawPeer, RedirectMode,
    XdpMode, default_xdp,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Top,
    Interface,
    Forward,
    Peer,
    Conntrack,
    Limits,
}

enum Kind<'a> {
    Str(&'a str),
    /// Decimal digits, no sign, no leading zero.
    Int(&'a str),
    Bool(bool),
}

struct Value<'a> {
    span: Range<usize>,
    kind: Kind<'a>,
}

impl<'a> Value<'a> {
    fn string(&self) -> Option<Spanned<String>> {
        match self.kind {
            Kind::Str(s) => Some(Spanned::new(self.span.clone(), s.to_string())),
            _ => None,
        }
    }

    fn str(&self) -> Option<&'a str> {
        match self.kind {
            Kind::Str(s) => Some(s),
            _ => None,
        }
    }

    /// TOML integers are i64; anything the target type cannot hold is left to `toml`.
    fn int<T: TryFrom<i64>>(&self) -> Option<Spanned<T>> {
        match self.kind {
            Kind::Int(s) => Some(Spanned::new(self.span.clone(), T::try_from(s.parse::<i64>().ok()?).ok()?)),
            _ => None,
        }
    }

    fn bool(&self) -> Option<bool> {
        match self.kind {
            Kind::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// The fields of the table being read, in order (a table has a handful).
type Fields<'a> = Vec<(&'a str, Value<'a>)>;

/// The config, if `text` is in the plain form and deserialises without error.
pub(super) fn parse(text: &str) -> Option<RawConfig> {
    // TOML refuses control characters other than tab in comments and strings; CR (CRLF
    // files) is left to `toml` too.
    if text.bytes().any(|b| (b < 0x20 && b != b'\t' && b != b'\n') || b == 0x7f) {
        return None;
    }
    let mut raw = RawConfig {
        interface: Vec::new(),
        forward: Vec::new(),
        peer: Vec::new(),
        conntrack: None,
        limits: None,
        node: Default::default(),
    };
    let mut table = Table::Top;
    let mut fields: Fields = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let line_start = offset;
        offset += line.len();
        let body = line.strip_suffix('\n').unwrap_or(line);
        let trimmed = body.trim_start_matches([' ', '\t']);
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if trimmed.starts_with('[') {
            let header = trimmed.split('#').next().unwrap_or("").trim_end_matches([' ', '\t']);
            let next = match header {
                "[[interface]]" => Table::Interface,
                "[[forward]]" => Table::Forward,
                "[[peer]]" => Table::Peer,
                "[conntrack]" => Table::Conntrack,
                "[limits]" => Table::Limits,
                _ => return None,
            };
            finish(&mut raw, table, std::mem::take(&mut fields))?;
            // A table defined twice is an error: leave it to `toml`.
            if (next == Table::Conntrack && raw.conntrack.is_some()) || (next == Table::Limits && raw.limits.is_some())
            {
                return None;
            }
            table = next;
            continue;
        }
        let (key, value) = key_value(trimmed, line_start + (body.len() - trimmed.len()))?;
        if table == Table::Top || fields.iter().any(|(k, _)| *k == key) {
            return None;
        }
        fields.push((key, value));
    }
    finish(&mut raw, table, fields)?;
    Some(raw)
}

/// `key = value` with optional blanks and an optional trailing comment; `at` is the offset
/// of `s` in the text.
fn key_value(s: &str, at: usize) -> Option<(&str, Value<'_>)> {
    let key_len = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))?;
    let (key, rest) = s.split_at(key_len);
    if key.is_empty() {
        return None;
    }
    let rest = rest.trim_start_matches([' ', '\t']).strip_prefix('=')?;
    let v = rest.trim_start_matches([' ', '\t']);
    let v_at = at + (s.len() - v.len());
    let (kind, len) = if let Some(inner) = v.strip_prefix('"') {
        let end = inner.find('"')?;
        let content = &inner[..end];
        if content.contains('\\') {
            return None;
        }
        (Kind::Str(content), end + 2)
    } else {
        // A comment must be set off by a blank here (conservative: `1024#x` is left to `toml`).
        let len = v.find([' ', '\t']).unwrap_or(v.len());
        let token = &v[..len];
        let kind = match token {
            "true" => Kind::Bool(true),
            "false" => Kind::Bool(false),
            t if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) && (t.len() == 1 || !t.starts_with('0')) => {
                Kind::Int(t)
            }
            _ => return None,
        };
        (kind, len)
    };
    let after = v[len..].trim_start_matches([' ', '\t']);
    if !(after.is_empty() || after.starts_with('#')) {
        return None;
    }
    Some((key, Value { span: v_at..v_at + len, kind }))
}

fn finish(raw: &mut RawConfig, table: Table, fields: Fields) -> Option<()> {
    match table {
        Table::Top => (fields.is_empty()).then_some(()),
        Table::Interface => {
            let (mut name, mut xdp, mut redirect, mut optional) = (None, None, None, None);
            for (k, v) in &fields {
                match *k {
                    "name" => name = Some(v.string()?),
                    "xdp" => xdp = Some(xdp_mode(v.str()?)?),
                    "redirect" => redirect = Some(redirect_mode(v.str()?)?),
                    "optional" => optional = Some(v.bool()?),
                    _ => return None,
                }
            }
            raw.interface.push(RawInterface {
                name: name?,
                xdp: xdp.unwrap_or_else(default_xdp),
                redirect: redirect.unwrap_or_default(),
                optional: optional.unwrap_or_default(),
            });
            Some(())
        }
        Table::Forward => {
            let (mut name, mut protocol, mut listen, mut backend, mut snat, mut local) =
                (None, None, None, None, None, None);
            for (k, v) in &fields {
                match *k {
                    "name" => name = Some(v.string()?),
                    "protocol" => {
                        protocol = Some(match v.str()? {
                            "tcp" => Protocol::Tcp,
                            "udp" => Protocol::Udp,
                            _ => return None,
                        })
                    }
                    "listen" => listen = Some(v.string()?),
                    "backend" => backend = Some(v.string()?),
                    "snat" => snat = Some(v.string()?),
                    "local" => local = Some(v.bool()?),
                    _ => return None,
                }
            }
            raw.forward.push(RawForward {
                name: name?,
                protocol: protocol?,
                listen: listen?,
                backend: Some(backend?),
                backends: None,
                snat,
                local,
                allow: None,
                deny: None,
                health: None,
            });
            Some(())
        }
        Table::Peer => {
            let (mut address, mut interface) = (None, None);
            for (k, v) in &fields {
                match *k {
                    "address" => address = Some(v.string()?),
                    "interface" => interface = Some(v.string()?),
                    _ => return None,
                }
            }
            raw.peer.push(RawPeer { address: address?, interface: interface? });
            Some(())
        }
        Table::Conntrack => {
            let mut ct = RawConntrack {
                max_entries: None,
                snat_ports: None,
                on_forward_removed: None,
                snat_avoid_local_ports: None,
                tcp_handshake_timeout: None,
                tcp_established_timeout: None,
                tcp_closing_timeout: None,
                udp_timeout: None,
                tcp_syn_sent_timeout: None,
                tcp_syn_recv_timeout: None,
                tcp_fin_wait_timeout: None,
                tcp_close_wait_timeout: None,
                tcp_last_ack_timeout: None,
                tcp_time_wait_timeout: None,
                tcp_close_timeout: None,
                udp_unreplied_timeout: None,
                udp_replied_timeout: None,
                gc_interval: None,
            };
            for (k, v) in &fields {
                match *k {
                    "max_entries" => ct.max_entries = Some(v.int()?),
                    "snat_ports" => ct.snat_ports = Some(v.string()?),
                    "on_forward_removed" => {
                        ct.on_forward_removed = Some(match v.str()? {
                            "drain" => OnForwardRemoved::Drain,
                            "flush" => OnForwardRemoved::Flush,
                            _ => return None,
                        })
                    }
                    "tcp_handshake_timeout" => ct.tcp_handshake_timeout = Some(v.int()?),
                    "tcp_established_timeout" => ct.tcp_established_timeout = Some(v.int()?),
                    "tcp_closing_timeout" => ct.tcp_closing_timeout = Some(v.int()?),
                    "udp_timeout" => ct.udp_timeout = Some(v.int()?),
                    "gc_interval" => ct.gc_interval = Some(v.int()?),
                    _ => return None,
                }
            }
            raw.conntrack = Some(ct);
            Some(())
        }
        Table::Limits => {
            let mut limits = RawLimits { max_forwards: None, max_backends: None };
            for (k, v) in &fields {
                match *k {
                    "max_forwards" => limits.max_forwards = Some(v.int()?),
                    _ => return None,
                }
            }
            raw.limits = Some(limits);
            Some(())
        }
    }
}

fn xdp_mode(s: &str) -> Option<XdpMode> {
    Some(match s {
        "auto" => XdpMode::Auto,
        "native" => XdpMode::Native,
        "generic" => XdpMode::Generic,
        "off" => XdpMode::Off,
        _ => return None,
    })
}

fn redirect_mode(s: &str) -> Option<RedirectMode> {
    Some(match s {
        "auto" => RedirectMode::Auto,
        "xdp" => RedirectMode::Xdp,
        "tc" => RedirectMode::Tc,
        _ => return None,
    })
}
