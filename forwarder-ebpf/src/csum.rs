//! Checksum decisions on the packet path; the arithmetic lives in forwarder_common::csum.

use forwarder_common::{PROTO_UDP, csum::ipv4_pseudo_seed};

use crate::parse::{IPV4_LEN, Ipv4Flow};

/// True when the L4 checksum field holds a CHECKSUM_PARTIAL seed (the pseudo-header sum
/// that checksum offload completes later) instead of a full checksum. XDP cannot see the
/// skb's checksum state, and a seed would be corrupted by a full-checksum update and
/// lost by XDP_REDIRECT, so such packets go to TC, whose helpers know the state. A full
/// checksum that happens to equal the seed (1 in 65536) also goes to TC, which is correct
/// either way.
#[inline(always)]
pub fn looks_partial(flow: &Ipv4Flow) -> bool {
    if flow.proto == PROTO_UDP && flow.l4_check == 0 {
        return false;
    }
    flow.l4_check == ipv4_pseudo_seed(flow.src, flow.dst, flow.proto, flow.tot_len - IPV4_LEN as u16)
}
