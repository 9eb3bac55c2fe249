//! The one place where raw packet pointers are made: every access is bounds-checked right
//! before it, against the context's `data_end`.

use aya_ebpf::programs::{TcContext, XdpContext};
use forwarder_common::Reason;

/// What the parsers need from a program context: the packet's linear bytes.
pub trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// Whole packet length; for an skb this includes non-linear (paged, GSO) data.
    fn len(&self) -> usize {
        self.end() - self.start()
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

/// A pointer to a `T` at `offset`, or `Malformed` when the packet is too short.
#[inline(always)]
pub fn ptr_at<T, P: Packet>(pkt: &P, offset: usize) -> Result<*const T, Reason> {
    let start = pkt.start();
    if start + offset + core::mem::size_of::<T>() > pkt.end() {
        return Err(Reason::Malformed);
    }
    Ok((start + offset) as *const T)
}

/// Mutable variant of [`ptr_at`], for direct writes (XDP only; TC writes through helpers).
#[inline(always)]
pub fn ptr_at_mut<T, P: Packet>(pkt: &P, offset: usize) -> Result<*mut T, Reason> {
    ptr_at::<T, P>(pkt, offset).map(|p| p as *mut T)
}

/// Copy of `N` packet bytes at `offset`.
#[inline(always)]
pub fn read<const N: usize, P: Packet>(pkt: &P, offset: usize) -> Result<[u8; N], Reason> {
    let p = ptr_at::<[u8; N], P>(pkt, offset)?;
    // SAFETY: bounds checked by ptr_at; packet bytes have no alignment requirement as [u8; N].
    Ok(unsafe { core::ptr::read_unaligned(p) })
}

/// Overwrites `N` packet bytes at `offset` (XDP).
#[inline(always)]
pub fn write<const N: usize, P: Packet>(pkt: &P, offset: usize, bytes: [u8; N]) -> Result<(), Reason> {
    let p = ptr_at_mut::<[u8; N], P>(pkt, offset)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { core::ptr::write_unaligned(p, bytes) };
    Ok(())
}
