//! The backend a new connection goes to: the forward's one backend, or the Maglev table's
//! choice among several (forwarder_common::maglev); established connections keep theirs
//! in their connection entries.

use forwarder_common::{
    BACKEND_PORT_OFFSET, BackendKey, FWD_FLAG_MAGLEV, FWD_FLAG_NO_BACKEND, FWD_FLAG_PORT_OFFSET, FwdValue, Reason,
    maglev::{maglev_slot, tuple_hash},
    offset_port,
};

use crate::maps::{FWD_BACKENDS, FWD_MAGLEV};

/// A chosen backend: its address and port (network order), and its counter index. The
/// address is a copy: a pointer into the rule or into `FWD_BACKENDS` would differ by map
/// between the two choices, and the verifier would walk everything after the choice that
/// moves the plan around (the commit, the port walk) once for each.
#[derive(Clone, Copy)]
pub struct Chosen {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub index: u32,
}

/// The backend of a new connection of `fwd` to port `dport_be`; `hash` gives its tuple's
/// hash (see [`hash_of`]), computed only for a Maglev table. `NoBackend` when none takes
/// new connections.
#[inline(always)]
pub fn choose(fwd: &'static FwdValue, hash: impl FnOnce() -> u32, dport_be: u16) -> Result<Chosen, Reason> {
    if fwd.flags & FWD_FLAG_NO_BACKEND != 0 {
        return Err(Reason::NoBackend);
    }
    // A backend range keeps the connection's offset into the listen range.
    let port = |first_be: u16, offset: bool| {
        if offset { offset_port(first_be, fwd.listen_port_be, dport_be) } else { first_be }
    };
    if fwd.flags & FWD_FLAG_MAGLEV == 0 {
        let port_be = port(fwd.backend_port_be, fwd.flags & FWD_FLAG_PORT_OFFSET != 0);
        return Ok(Chosen { addr: fwd.backend_addr, port_be, index: fwd.backend_index });
    }
    // SAFETY: map value references valid for this program run.
    let table = unsafe { FWD_MAGLEV.get(&fwd.table_id) }.ok_or(Reason::NoBackend)?;
    // The compiler knows the slot is below the table's size and drops a plain check, which
    // the verifier needs: read through memory, the bound is checked again.
    let at = maglev_slot(hash()) as usize;
    // SAFETY: a local's address.
    let at = unsafe { core::ptr::read_volatile(&at) };
    let slot = *table.slots.get(at).ok_or(Reason::NoBackend)?;
    let key = BackendKey { forward_id: fwd.forward_id, slot: slot as u32 };
    // SAFETY: as above.
    let b = unsafe { FWD_BACKENDS.get(&key) }.ok_or(Reason::NoBackend)?;
    Ok(Chosen { addr: b.addr, port_be: port(b.port_be, b.state & BACKEND_PORT_OFFSET != 0), index: b.index })
}

/// The hash a connection's tuple chooses by (as it arrives, before any rewrite). Out of
/// line: inlined, the compiler loads the addresses' 32 bytes ahead of the table lookup and
/// spills them, which takes the packet path's largest frame past the stack's 512 bytes.
#[inline(never)]
pub fn hash_of(src: &[u8; 16], dst: &[u8; 16], sport: [u8; 2], dport: [u8; 2], proto: u8) -> u32 {
    tuple_hash(src, dst, u16::from_ne_bytes(sport), u16::from_ne_bytes(dport), proto)
}
