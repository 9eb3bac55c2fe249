//! A forward's source allow/deny lists (LPM tries keyed by forward id, family and
//! address): checked once per new connection, never for established ones.

use aya_ebpf::maps::lpm_trie::Key;
use forwarder_common::{FWD_FLAG_ALLOW, FWD_FLAG_DENY, FwdValue, SourceKey, source_prefix_len};

use crate::maps::{FWD_ALLOW, FWD_DENY};

/// True when `fwd`'s lists let a new connection from `src` (of `family`) in: it matches
/// the allow list if the forward has one, and not the deny list if it has one (deny wins).
#[inline(always)]
pub fn admits(fwd: &FwdValue, family: u8, src: &[u8; 16]) -> bool {
    if fwd.flags & (FWD_FLAG_ALLOW | FWD_FLAG_DENY) == 0 {
        return true;
    }
    // Every address bit: an IPv4 address's unused bytes are zero, and its entries shorter.
    let key = Key::new(source_prefix_len(128), SourceKey::new(fwd.forward_id, family, *src));
    if fwd.flags & FWD_FLAG_ALLOW != 0 && FWD_ALLOW.get(&key).is_none() {
        return false;
    }
    fwd.flags & FWD_FLAG_DENY == 0 || FWD_DENY.get(&key).is_none()
}
