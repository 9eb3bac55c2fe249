//! Same-switch peers: packets to a configured peer leave by the peer's interface to the
//! peer's own MAC, resolved by the kernel's neighbour subsystem (bpf_redirect_neigh with the
//! peer as next hop), never through a gateway. Userspace watches the neighbour entry and
//! flips a peer to fallback (normal routing) while it does not answer.

use aya_ebpf::{
    bindings::{TC_ACT_OK, bpf_redir_neigh},
    helpers::bpf_redirect_neigh,
    programs::TcContext,
};
use forwarder_common::{FAMILY_V4, GLOBAL_HAS_PEERS, PEER_DIRECT, PEER_PROBE_MARK, PeerKey, PeerValue, Reason};

use crate::{
    ctx::Packet,
    global,
    maps::{FWD_PEER_STATS, FWD_PEERS},
    parse::{self, IPV4_TTL_OFF, L3Dst},
};

/// skb->tc_index of a packet we redirected to a peer: the egress hook of the peer's device
/// sees it again and must leave it alone. tc_index has no other user on modern kernels
/// (its only consumer, the dsmark qdisc, is gone).
const DELIVERED: u32 = 0x4657;

#[inline(always)]
pub fn already_delivered(ctx: &TcContext) -> bool {
    // SAFETY: reading a context field.
    unsafe { (*ctx.skb.skb).tc_index == DELIVERED }
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Whether any peer is configured: without one, no packet pays a peer lookup.
#[inline(always)]
pub fn enabled() -> bool {
    global::flags() & GLOBAL_HAS_PEERS != 0
}

/// Whether the packet is addressed to a peer.
#[inline(always)]
pub fn addressed_to_peer<P: Packet>(pkt: &P) -> bool {
    enabled() && parse::parse_l3_dst(pkt).ok().and_then(|d| lookup(&d)).is_some()
}

#[inline(always)]
pub fn lookup(dst: &L3Dst) -> Option<&'static PeerValue> {
    let key = PeerKey { addr: dst.addr, family: dst.family, _pad: [0; 3] };
    // SAFETY: map value reference valid for this program run.
    unsafe { FWD_PEERS.get(&key) }
}

#[inline(always)]
fn count(peer: &PeerValue, direct: bool, bytes: u16) {
    if let Some(s) = FWD_PEER_STATS.get_ptr_mut(peer.peer_id) {
        // SAFETY: per-CPU slot.
        unsafe {
            if direct {
                (*s).direct_packets += 1;
                (*s).direct_bytes += bytes as u64;
            } else {
                (*s).fallback_packets += 1;
                (*s).fallback_bytes += bytes as u64;
            }
        }
    }
}

/// Sends the packet straight to `peer` when it is reachable (or the packet is a probe);
/// otherwise counts a fallback and lets normal routing have it. `forwarding` packets get
/// their TTL / hop limit decremented as a router would.
#[inline(always)]
pub fn deliver(ctx: &TcContext, dst: &L3Dst, peer: &PeerValue, forwarding: bool) -> Result<(i32, Reason), Reason> {
    // SAFETY: reading a context field.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if peer.state != PEER_DIRECT && mark != PEER_PROBE_MARK {
        count(peer, false, dst.len);
        return Ok((TC_ACT_OK, Reason::PeerFallback));
    }
    if forwarding {
        if dst.ttl <= 1 {
            return Ok((TC_ACT_OK, Reason::TtlToStack));
        }
        decrement_ttl(ctx, dst)?;
    }
    // SAFETY: plain C struct; the union member matching nh_family is written.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    if dst.family == FAMILY_V4 {
        nh.nh_family = AF_INET;
        nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes([dst.addr[0], dst.addr[1], dst.addr[2], dst.addr[3]]);
    } else {
        nh.nh_family = AF_INET6;
        let a = dst.addr;
        nh.__bindgen_anon_1.ipv6_nh = [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ];
    }
    count(peer, true, dst.len);
    // SAFETY: tc_index is writable from TC; see `already_delivered`.
    unsafe { (*ctx.skb.skb).tc_index = DELIVERED };
    // SAFETY: nh is a valid bpf_redir_neigh of the size passed.
    let action =
        unsafe { bpf_redirect_neigh(peer.ifindex, &mut nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0) } as i32;
    Ok((action, Reason::PeerDirect))
}

#[inline(always)]
fn decrement_ttl(ctx: &TcContext, dst: &L3Dst) -> Result<(), Reason> {
    let v6 = dst.family != FAMILY_V4;
    // The IPv4 header checksum covers TTL and protocol as one word.
    let proto: u8 = if v6 { 0 } else { ctx.load(IPV4_TTL_OFF + 1).map_err(|_| Reason::Malformed)? };
    crate::nat::decrement_ttl_tc(ctx, v6, dst.ttl, proto)
}
