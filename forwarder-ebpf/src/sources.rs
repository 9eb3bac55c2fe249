//! A forward's source allow/deny lists (LPM tries keyed by forward id, family and
//! address): checked once per new connection, never for established ones.

use aya_ebpf::maps::lpm_trie::Key;
use forwarder_common::{FWD_FLAG_ALLOW, FWD_FLAG_DENY, FwdValue, SourceKey, source_prefix_len};

use crate::maps::{FWD_ALLOW, FWD_DENY};

/// Room for one lookup key: the packet path keeps it in its per-CPU working memory, as
/// its stack has no 28 bytes to spare.
#[repr(C)]
pub struct SourceLookup {
    prefix_len: u32,
    data: SourceKey,
}

/// True when `fwd`'s lists let a new connection from `src` (of `family`) in: it matches
/// the allow list if the forward has one, and not the deny list if it has one (deny wins).
/// `room` holds the lookup key. Out of line: inlined, the lookups' spills would grow the
/// packet path's largest frame past the 512 bytes the whole call chain may use.
#[inline(never)]
pub fn admits(fwd: &FwdValue, family: u8, src: &[u8; 16], room: &mut SourceLookup) -> bool {
    if fwd.flags & (FWD_FLAG_ALLOW | FWD_FLAG_DENY) == 0 {
        return true;
    }
    // Every address bit: an IPv4 address's unused bytes are zero, and its entries shorter.
    room.prefix_len = source_prefix_len(128);
    room.data.forward_id_be = fwd.forward_id.to_be_bytes();
    room.data.family = family;
    room.data.addr = *src;
    room.data._pad = [0; 3];
    // SAFETY: the same bytes as a Key<SourceKey> (a u32 prefix length, then the key's
    // 24 bytes of u8 fields, no padding between), which aya reads unaligned.
    let key = unsafe { &*(room as *const SourceLookup).cast::<Key<SourceKey>>() };
    if fwd.flags & FWD_FLAG_ALLOW != 0 && FWD_ALLOW.get(key).is_none() {
        return false;
    }
    fwd.flags & FWD_FLAG_DENY == 0 || FWD_DENY.get(key).is_none()
}

/// An empty [`SourceLookup`], for a program with stack to spare (the socket hooks).
#[inline(always)]
pub const fn lookup_room() -> SourceLookup {
    SourceLookup { prefix_len: 0, data: SourceKey { forward_id_be: [0; 4], family: 0, addr: [0; 16], _pad: [0; 3] } }
}
