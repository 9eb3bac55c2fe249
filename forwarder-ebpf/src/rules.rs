//! The forward a destination belongs to: the rule of its exact port (one hash lookup, as
//! before ranges), else, only when some forward listens on a port range, the rule of the
//! range holding the port (`FWD_PORT_RANGES`, then the rule by the range's first port).

use forwarder_common::{FwdKey, FwdValue, GLOBAL_HAS_PORT_RANGES};

use crate::{
    global,
    maps::{FWD_PORT_RANGES, FWD_RULES_V2},
};

/// The rule of the destination in `key`. On a miss of the exact port, `key`'s port is
/// overwritten by the range lookups.
#[inline(always)]
pub fn lookup(key: &mut FwdKey) -> Option<&'static FwdValue> {
    // SAFETY: map value references valid for this program run.
    if let Some(rule) = unsafe { FWD_RULES_V2.get(&*key) } {
        return Some(rule);
    }
    if global::flags() & GLOBAL_HAS_PORT_RANGES == 0 {
        return None;
    }
    let port = u16::from_be(key.port_be);
    key.port_be = 0;
    // SAFETY: as above.
    let first = unsafe { FWD_PORT_RANGES.get(&*key) }?.find(port)?;
    key.port_be = first.to_be();
    // SAFETY: as above.
    unsafe { FWD_RULES_V2.get(&*key) }
}
