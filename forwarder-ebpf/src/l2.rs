//! Layer 2: the Ethernet addresses of a frame we send ourselves.

use aya_ebpf::programs::{TcContext, XdpContext};
use forwarder_common::Reason;

use crate::ctx::write;

#[inline(always)]
fn macs(dmac: [u8; 6], smac: [u8; 6]) -> [u8; 12] {
    [dmac[0], dmac[1], dmac[2], dmac[3], dmac[4], dmac[5], smac[0], smac[1], smac[2], smac[3], smac[4], smac[5]]
}

#[inline(always)]
pub fn set_macs_xdp(ctx: &XdpContext, dmac: [u8; 6], smac: [u8; 6]) -> Result<(), Reason> {
    write(ctx, 0, macs(dmac, smac))
}

#[inline(always)]
pub fn set_macs_tc(ctx: &TcContext, dmac: [u8; 6], smac: [u8; 6]) -> Result<(), Reason> {
    ctx.store(0, &macs(dmac, smac), 0).map_err(|_| Reason::RewriteFailed)
}
