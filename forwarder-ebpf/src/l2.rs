//! Layer 2: VLAN tags, and the Ethernet addresses of a frame we send ourselves.

use aya_ebpf::{
    helpers::bpf_skb_vlan_pop,
    programs::{TcContext, XdpContext},
};
use forwarder_common::Reason;

use crate::ctx::{Packet, read, write};

const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];

/// VLAN policy at TC. By TC ingress the kernel has moved a frame's outer tag into
/// `skb->vlan_tci`, so the in-frame check of the parser no longer sees it: a tagged frame
/// belongs to the VLAN's device, not to this interface, and is passed untouched (`vlan`), as
/// an in-frame tag is. A priority tag (VLAN id 0) is what the stack treats as untagged: it
/// is removed, so a redirected frame does not carry it out.
#[inline(always)]
pub fn untagged_tc(ctx: &TcContext) -> Result<(), Reason> {
    // SAFETY: reading context fields.
    let (present, tci) = unsafe { ((*ctx.skb.skb).vlan_present, (*ctx.skb.skb).vlan_tci) };
    if present == 0 {
        return Ok(());
    }
    if tci & 0x0fff != 0 {
        return Err(Reason::Vlan);
    }
    // SAFETY: helper call on our own skb.
    if unsafe { bpf_skb_vlan_pop(ctx.skb.skb as *mut _) } != 0 {
        return Err(Reason::Vlan);
    }
    Ok(())
}

/// An in-frame 802.1Q priority tag (VLAN id 0): XDP leaves it to TC, which removes it
/// (untagged_tc) once the kernel has taken it out of the frame.
#[inline(always)]
pub fn priority_tagged<P: Packet>(pkt: &P) -> bool {
    match read::<4, P>(pkt, 12) {
        Ok(b) => [b[0], b[1]] == ETH_P_8021Q && u16::from_be_bytes([b[2], b[3]]) & 0x0fff == 0,
        Err(_) => false,
    }
}

#[inline(always)]
fn macs(dmac: [u8; 6], smac: [u8; 6]) -> [u8; 12] {
    [dmac[0], dmac[1], dmac[2], dmac[3], dmac[4], dmac[5], smac[0], smac[1], smac[2], smac[3], smac[4], smac[5]]
}

#[inline(always)]
pub fn set_macs_xdp(ctx: &XdpContext, dmac: [u8; 6], smac: [u8; 6]) -> Result<(), Reason> {
    write(ctx, 0, macs(dmac, smac))
}

/// A direct write, as XDP's: the Ethernet header is linear and in no checksum.
#[inline(always)]
pub fn set_macs_tc(ctx: &TcContext, dmac: [u8; 6], smac: [u8; 6]) -> Result<(), Reason> {
    write(ctx, 0, macs(dmac, smac))
}
