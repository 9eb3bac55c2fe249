//! The one place where a program's result becomes a verdict, and where every packet that
//! was not forwarded by the fast path is counted under its reason.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_xdp_adjust_meta,
    programs::XdpContext,
};
use forwarder_common::{Reason, XDP_META_SKIP};

use crate::stats::count_reason;

/// What a program decided: `Ok((action, how))` for packets it rewrote (counted under
/// `how`), `Err(reason)` for everything else.
pub type Outcome = Result<(i32, Reason), Reason>;

/// Packs an outcome into the 64 bits a BPF function may return: bit 63 set for `Ok`, the
/// reason code above bit 32, the action below.
#[inline(always)]
pub fn pack(o: Outcome) -> u64 {
    match o {
        Ok((action, reason)) => 1 << 63 | (reason as u64) << 32 | action as u32 as u64,
        Err(reason) => (reason as u64) << 32,
    }
}

#[inline(always)]
pub fn unpack(raw: u64) -> Outcome {
    let reason = Reason::from_code((raw >> 32) as u32 & 0x7fff_ffff).unwrap_or(Reason::RewriteFailed);
    if raw >> 63 == 1 { Ok((raw as u32 as i32, reason)) } else { Err(reason) }
}

#[inline(always)]
pub fn xdp(ctx: &XdpContext, outcome: Outcome) -> u32 {
    match outcome {
        Ok((action, how)) => {
            count_reason(how);
            action as u32
        }
        Err(reason) => {
            count_reason(reason);
            if reason.is_drop() {
                return xdp_action::XDP_DROP;
            }
            if reason != Reason::XdpToTc {
                mark_skip(ctx);
            }
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
pub fn tc(outcome: Outcome) -> i32 {
    match outcome {
        Ok((action, how)) => {
            count_reason(how);
            action
        }
        Err(reason) => {
            count_reason(reason);
            if reason.is_drop() { TC_ACT_SHOT } else { TC_ACT_OK }
        }
    }
}

/// Tells the TC ingress program (through frame metadata) that XDP has already counted this
/// packet as not ours. Best effort: without metadata support TC classifies it again.
#[inline(always)]
fn mark_skip(ctx: &XdpContext) {
    // SAFETY: helper call on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } != 0 {
        return;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + 4 > data {
        return;
    }
    // SAFETY: 4 bytes of metadata checked against data above.
    unsafe { core::ptr::write_unaligned(meta as *mut u32, XDP_META_SKIP) };
}
