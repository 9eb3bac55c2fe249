//! Checksum decisions and sums on the packet path; the arithmetic lives in
//! forwarder_common::csum.

use forwarder_common::{
    PROTO_UDP,
    csum::{fold, sum4},
};

use crate::parse::{FRAG_NONE, Flow};

/// One's-complement sum of an address as the pseudo header carries it (4 or 16 bytes).
#[inline(always)]
pub fn sum_addr(a: &[u8; 16], v6: bool) -> u32 {
    let mut s = sum4([a[0], a[1], a[2], a[3]]);
    if v6 {
        s += sum4([a[4], a[5], a[6], a[7]]) + sum4([a[8], a[9], a[10], a[11]]) + sum4([a[12], a[13], a[14], a[15]]);
    }
    s
}

/// True when the L4 checksum field holds a CHECKSUM_PARTIAL seed (the pseudo-header sum
/// that checksum offload completes later) instead of a full checksum. XDP cannot see the
/// skb's checksum state, and a seed would be corrupted by a full-checksum update and
/// lost by XDP_REDIRECT, so such packets go to TC, whose helpers know the state. A full
/// checksum that happens to equal the seed (1 in 65536) also goes to TC, which is correct
/// either way. Fragments never carry a seed: the sender completes the checksum before it
/// fragments.
#[inline(always)]
pub fn looks_partial(flow: &Flow) -> bool {
    if flow.proto == PROTO_UDP && flow.l4_check == 0 || flow.frag != FRAG_NONE {
        return false;
    }
    let v6 = flow.is_v6();
    let seed = fold(sum_addr(&flow.src, v6) + sum_addr(&flow.dst, v6) + flow.proto as u32 + flow.l4_len() as u32);
    flow.l4_check == seed
}
