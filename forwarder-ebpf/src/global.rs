//! The instance-wide settings userspace writes whole at every start (`FWD_GLOBAL_V2`):
//! here the flags that tell the packet programs which optional paths are in use.

use crate::maps::FWD_GLOBAL_V2;

/// `GLOBAL_HAS_*` bits; none before userspace has written the settings.
#[inline(always)]
pub fn flags() -> u32 {
    FWD_GLOBAL_V2.get(0).map(|g| g.flags).unwrap_or(0)
}
