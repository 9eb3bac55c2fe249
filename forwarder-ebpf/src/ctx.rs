//! The one place where raw packet pointers are made: every access is bounds-checked right
//! before it, against the context's `data_end`.
//!
//! Packet bytes are loaded and stored in words. LLVM's BPF backend splits any load or store
//! it cannot prove aligned into single bytes (a 4-byte field became four loads, three
//! shifts and three ORs; an IPv6 address sixteen of each), so [`read`] and [`write`] access
//! an N-byte field as 4-byte words when N is a multiple of 4, 2-byte words when it is even.
//! The packet need not be aligned for that: the verifier checks packet alignment only on
//! kernels without efficient unaligned access (CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS, which
//! x86-64 and arm64 have) or for programs loaded with BPF_F_STRICT_ALIGNMENT, which the
//! loader does not ask for; on such a kernel some of these loads (the IPv4 header's TTL
//! word, the MAC addresses) would be refused at load time, never run misaligned. Nothing
//! computes with a packet pointer's alignment, so claiming it costs nothing else. (LLVM's
//! `allows-misaligned-mem-access` would do the same for all memory, but also for the stack,
//! where the verifier always wants aligned access.)

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

/// Mutable variant of [`ptr_at`], for direct writes (XDP; TC when the skb's checksums were
/// verified, else TC writes through helpers). A TC program that writes directly gets the
/// verifier's prologue, which unclones a cloned skb first.
#[inline(always)]
pub fn ptr_at_mut<T, P: Packet>(pkt: &P, offset: usize) -> Result<*mut T, Reason> {
    ptr_at::<T, P>(pkt, offset).map(|p| p as *mut T)
}

/// Copy of `N` packet bytes at `offset`, loaded in words (see the module's note).
#[inline(always)]
pub fn read<const N: usize, P: Packet>(pkt: &P, offset: usize) -> Result<[u8; N], Reason> {
    let p = ptr_at::<[u8; N], P>(pkt, offset)?;
    let mut bytes = [0u8; N];
    // SAFETY: bounds checked by ptr_at; the word loads stay inside the N bytes (N is a
    // multiple of the word size), alignment as the module's note says.
    unsafe {
        if N % 4 == 0 {
            let (from, to) = (p as *const u32, bytes.as_mut_ptr() as *mut u32);
            for i in 0..N / 4 {
                to.add(i).write_unaligned(from.add(i).read());
            }
        } else if N % 2 == 0 {
            let (from, to) = (p as *const u16, bytes.as_mut_ptr() as *mut u16);
            for i in 0..N / 2 {
                to.add(i).write_unaligned(from.add(i).read());
            }
        } else {
            bytes = core::ptr::read_unaligned(p);
        }
    }
    Ok(bytes)
}

/// `N` words of packet bytes at `offset`, each the native-endian word of its four bytes
/// (how the fast paths hold addresses), loaded straight into them: built from [`read`]'s
/// bytes, LLVM went through the stack and back.
#[inline(always)]
pub fn read_words<const N: usize, P: Packet>(pkt: &P, offset: usize) -> Result<[u32; N], Reason> {
    let p = ptr_at::<[u32; N], P>(pkt, offset)?;
    // SAFETY: bounds checked by ptr_at; alignment as the module's note says.
    Ok(unsafe { core::ptr::read(p) })
}

/// Overwrites `N` packet bytes at `offset` (see [`ptr_at_mut`]), stored in words as
/// [`read`] loads them.
#[inline(always)]
pub fn write<const N: usize, P: Packet>(pkt: &P, offset: usize, bytes: [u8; N]) -> Result<(), Reason> {
    let p = ptr_at_mut::<[u8; N], P>(pkt, offset)?;
    // SAFETY: bounds checked by ptr_at_mut; as in `read`.
    unsafe {
        if N % 4 == 0 {
            let (from, to) = (bytes.as_ptr() as *const u32, p as *mut u32);
            for i in 0..N / 4 {
                to.add(i).write(from.add(i).read_unaligned());
            }
        } else if N % 2 == 0 {
            let (from, to) = (bytes.as_ptr() as *const u16, p as *mut u16);
            for i in 0..N / 2 {
                to.add(i).write(from.add(i).read_unaligned());
            }
        } else {
            core::ptr::write_unaligned(p, bytes);
        }
    }
    Ok(())
}
