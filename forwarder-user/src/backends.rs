//! A forward's backends as the maps hold them (pure; `state` reads and writes the maps):
//! stable slots and counter indices, and how new connections choose among them — the one
//! backend in the rule, a shared Maglev table, or none.

use std::collections::{HashMap, HashSet};

use forwarder_common::{
    BACKEND_DOWN, BACKEND_PORT_OFFSET, BackendKey, BackendValue, FWD_FLAG_MAGLEV, FWD_FLAG_NO_BACKEND,
    FWD_FLAG_PORT_OFFSET, FwdValue, MAX_BACKEND_INDEX, MaglevTable,
    maglev::{MaglevBackend, maglev_table},
};

use crate::{
    config::{Backend, Forward, SocketRange},
    maps::addr_bytes,
};

/// The backends stored per forward id: (slot, value), in slot order.
pub type Stored = HashMap<u32, Vec<(u32, BackendValue)>>;

/// Groups the entries of `FWD_BACKENDS` by forward.
pub fn stored_of(entries: Vec<(BackendKey, BackendValue)>) -> Stored {
    let mut out: Stored = HashMap::new();
    for (k, v) in entries {
        out.entry(k.forward_id).or_default().push((k.slot, v));
    }
    for list in out.values_mut() {
        list.sort_unstable_by_key(|(slot, _)| *slot);
    }
    out
}

/// The config form of a stored backend of a forward whose listen range has `listen_span`
/// ports after its first.
pub fn backend_of(v: &BackendValue, listen_span: u16) -> Backend {
    let ip = crate::maps::addr_from_bytes(&v.addr, v.family);
    let span = if v.state & BACKEND_PORT_OFFSET != 0 { listen_span } else { 0 };
    Backend {
        address: SocketRange { addr: std::net::SocketAddr::new(ip, u16::from_be(v.port_be)), span },
        weight: v.weight,
    }
}

/// Backends placed for one forward: slot and value each.
pub type Placed = Vec<(u32, BackendValue)>;

/// Where every desired forward's backends go. A backend that stays in its forward (same id,
/// same address) keeps its slot, counter index and health state, so connections keep
/// hashing to it and its counters go on (its health state too, while the forward has
/// checks); a new one takes its forward's lowest free slot
/// and the lowest counter index no backend holds (its counters start at zero: the indices
/// are returned in `fresh`). `capacity`: counter indices available (1 to capacity).
pub fn place(desired: &[(u32, Forward)], stored: &Stored, capacity: u32) -> Result<(Vec<Placed>, Vec<u32>), String> {
    let mut kept: Vec<Vec<Option<(u32, BackendValue)>>> = Vec::with_capacity(desired.len());
    let mut used_indices: HashSet<u32> = HashSet::new();
    for (id, f) in desired {
        let current = stored.get(id).map(Vec::as_slice).unwrap_or_default();
        let list: Vec<Option<(u32, BackendValue)>> = f
            .backends
            .iter()
            .map(|b| {
                let (addr, family) = addr_bytes(b.address.ip());
                current
                    .iter()
                    .find(|(_, v)| v.addr == addr && v.family == family && v.port_be == b.address.port().to_be())
                    .copied()
            })
            .collect();
        used_indices.extend(list.iter().flatten().map(|(_, v)| v.index));
        kept.push(list);
    }
    let limit = capacity.min(MAX_BACKEND_INDEX);
    let mut free_indices = (1..=limit).filter(|i| !used_indices.contains(i));
    let mut fresh = Vec::new();
    let mut placed = Vec::with_capacity(desired.len());
    for ((_, f), list) in desired.iter().zip(kept) {
        let used_slots: HashSet<u32> = list.iter().flatten().map(|(slot, _)| *slot).collect();
        let mut free_slots = (0..).filter(|s| !used_slots.contains(s));
        let mut out = Vec::with_capacity(f.backends.len());
        for (b, k) in f.backends.iter().zip(list) {
            let (addr, family) = addr_bytes(b.address.ip());
            let (slot, index, state) = match k {
                // Without health checks every backend is up.
                Some((slot, v)) => (slot, v.index, if f.health.is_some() { v.state & BACKEND_DOWN } else { 0 }),
                None => {
                    let index = free_indices.next().ok_or_else(|| {
                        format!("no free backend index: more than {limit} backends (raise limits.max_backends)")
                    })?;
                    fresh.push(index);
                    (free_slots.next().expect("unbounded"), index, 0)
                }
            };
            let state = state | if b.address.is_range() { BACKEND_PORT_OFFSET } else { 0 };
            out.push((
                slot,
                BackendValue { addr, port_be: b.address.port().to_be(), family, state, index, weight: b.weight },
            ));
        }
        placed.push(out);
    }
    Ok((placed, fresh))
}

/// How a forward's new connections choose, given its placed backends: among those with a
/// weight above 0 that are not down, none, one, or several by a Maglev table (the
/// table's slots name backend slots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    None,
    One(BackendValue),
    Table(Vec<u8>),
}

pub fn choice(placed: &[(u32, BackendValue)]) -> Choice {
    let active: Vec<&(u32, BackendValue)> =
        placed.iter().filter(|(_, v)| v.weight > 0 && v.state & BACKEND_DOWN == 0).collect();
    match active.as_slice() {
        [] => Choice::None,
        [(_, v)] => Choice::One(*v),
        several => {
            // A backend's walk derives from its slot, not its address: forwards whose
            // backends have the same slots and weights share one table.
            let members: Vec<MaglevBackend> = several
                .iter()
                .map(|(slot, v)| {
                    let mut identity = [0u8; 16];
                    identity[..4].copy_from_slice(&slot.to_be_bytes());
                    MaglevBackend { addr: identity, port_be: 0, weight: v.weight }
                })
                .collect();
            let table = maglev_table(&members).expect("distinct slots, a weight above 0");
            Choice::Table(table.iter().map(|i| several[*i as usize].0 as u8).collect())
        }
    }
}

/// [`choice`] for many forwards: a table is built once per shape (the slots and weights of
/// the backends taking new connections), not once per forward.
#[derive(Default)]
pub struct Choices {
    tables: HashMap<Vec<(u32, u32)>, Vec<u8>>,
}

impl Choices {
    pub fn of(&mut self, placed: &[(u32, BackendValue)]) -> Choice {
        let shape: Vec<(u32, u32)> = placed
            .iter()
            .filter(|(_, v)| v.weight > 0 && v.state & BACKEND_DOWN == 0)
            .map(|(s, v)| (*s, v.weight))
            .collect();
        if shape.len() < 2 {
            return choice(placed);
        }
        Choice::Table(
            self.tables
                .entry(shape)
                .or_insert_with(|| match choice(placed) {
                    Choice::Table(t) => t,
                    _ => unreachable!("two or more backends take connections"),
                })
                .clone(),
        )
    }
}

/// The Maglev tables in `FWD_MAGLEV`, by content: forwards of one shape share a table.
#[derive(Default)]
pub struct Tables {
    by_content: HashMap<Vec<u8>, u32>,
    /// Tables to write (new ids).
    pub new: Vec<(u32, Vec<u8>)>,
    /// Ids referenced by the rules being written.
    pub referenced: HashSet<u32>,
}

impl Tables {
    pub fn of(existing: Vec<(u32, MaglevTable)>) -> Self {
        let by_content = existing.into_iter().map(|(id, t)| (t.slots.to_vec(), id)).collect();
        Tables { by_content, ..Default::default() }
    }

    /// The id of a table with this content, a new one if none has it yet.
    pub fn id_for(&mut self, content: Vec<u8>) -> u32 {
        let id = match self.by_content.get(&content) {
            Some(id) => *id,
            None => {
                let taken: HashSet<u32> = self.by_content.values().copied().collect();
                let id = (1..).find(|i| !taken.contains(i)).expect("unbounded");
                self.by_content.insert(content.clone(), id);
                self.new.push((id, content));
                id
            }
        };
        self.referenced.insert(id);
        id
    }

    /// Ids of existing tables no rule refers to any more.
    pub fn unreferenced(&self) -> Vec<u32> {
        self.by_content.values().filter(|id| !self.referenced.contains(id)).copied().collect()
    }
}

pub fn table_value(content: &[u8]) -> MaglevTable {
    let mut t = MaglevTable::default();
    t.slots.copy_from_slice(content);
    t
}

/// `value` (a forward's rule) choosing as `choice` says.
pub fn apply_choice(value: &mut FwdValue, choice: Choice, tables: &mut Tables) {
    value.flags &= !(FWD_FLAG_MAGLEV | FWD_FLAG_NO_BACKEND | FWD_FLAG_PORT_OFFSET);
    value.table_id = 0;
    match choice {
        Choice::None => value.flags |= FWD_FLAG_NO_BACKEND,
        Choice::One(b) => {
            value.backend_addr = b.addr;
            value.backend_port_be = b.port_be;
            value.backend_index = b.index;
            if b.state & BACKEND_PORT_OFFSET != 0 {
                value.flags |= FWD_FLAG_PORT_OFFSET;
            }
        }
        Choice::Table(content) => {
            value.flags |= FWD_FLAG_MAGLEV;
            value.table_id = tables.id_for(content);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Forward, Protocol};

    fn forward(backends: &[(&str, u32)]) -> Forward {
        let bs = backends.iter().map(|(a, w)| Backend { address: a.parse().unwrap(), weight: *w }).collect();
        Forward::with_backends("web", Protocol::Tcp, "192.0.2.1:80", bs, None, true).unwrap()
    }

    #[test]
    fn backends_that_stay_keep_slot_index_and_state() {
        let before = forward(&[("203.0.113.1:80", 1), ("203.0.113.2:80", 1), ("203.0.113.3:80", 1)]);
        let (placed, fresh) = place(&[(7, before)], &Stored::new(), 100).unwrap();
        assert_eq!(fresh, vec![1, 2, 3]);
        let mut stored: Stored = HashMap::new();
        let mut list = placed[0].clone();
        list[1].1.state = BACKEND_DOWN;
        stored.insert(7, list);
        // The first goes, a new one comes: it takes the free slot 0 and the free index 1.
        let mut after = forward(&[("203.0.113.2:80", 1), ("203.0.113.3:80", 2), ("203.0.113.4:80", 1)]);
        after.health = crate::config::Health::new("tcp", None, None, None, None).unwrap();
        let (placed, fresh) = place(&[(7, after.clone())], &stored, 100).unwrap();
        let got: Vec<(u32, u32, u8, u32)> = placed[0].iter().map(|(s, v)| (*s, v.index, v.state, v.weight)).collect();
        assert_eq!(got, vec![(1, 2, BACKEND_DOWN, 1), (2, 3, 0, 2), (0, 1, 0, 1)]);
        assert_eq!(fresh, vec![1]);
        // Without health checks every backend is up.
        after.health = None;
        let (placed, _) = place(&[(7, after)], &stored, 100).unwrap();
        assert!(placed[0].iter().all(|(_, v)| v.state == 0));
        let e = place(&[(1, forward(&[("203.0.113.1:80", 1), ("203.0.113.2:80", 1)]))], &Stored::new(), 1);
        assert!(e.unwrap_err().contains("limits.max_backends"));
    }

    #[test]
    fn choice_skips_drained_and_down_backends_and_shares_tables_by_shape() {
        let f = forward(&[("203.0.113.1:80", 1), ("203.0.113.2:80", 0), ("203.0.113.3:80", 2)]);
        let (placed, _) = place(&[(1, f)], &Stored::new(), 100).unwrap();
        let Choice::Table(t) = choice(&placed[0]) else { panic!("two backends take connections") };
        let count = |slot| t.iter().filter(|s| **s == slot).count();
        assert_eq!((count(0), count(1), count(2)), (344, 0, 687));
        let mut one = placed[0].clone();
        one[2].1.state = BACKEND_DOWN;
        assert_eq!(choice(&one), Choice::One(one[0].1));
        one[0].1.weight = 0;
        assert_eq!(choice(&one), Choice::None);
        // Another forward of the same shape (other addresses) gets the same table.
        let g = forward(&[("198.51.100.1:80", 1), ("198.51.100.2:80", 0), ("198.51.100.3:80", 2)]);
        let (other, _) = place(&[(2, g)], &Stored::new(), 100).unwrap();
        let mut tables = Tables::default();
        let (mut a, mut b) = (FwdValue::default(), FwdValue::default());
        apply_choice(&mut a, choice(&placed[0]), &mut tables);
        apply_choice(&mut b, choice(&other[0]), &mut tables);
        assert_eq!((a.table_id, b.table_id, tables.new.len()), (1, 1, 1));
        assert_eq!(a.flags & FWD_FLAG_MAGLEV, FWD_FLAG_MAGLEV);
    }
}
