//! Maglev consistent hashing (Eisenbud et al., NSDI 2016; as Katran and Cilium use it):
//! picks one of a forward's weighted backends per new connection.
//!
//! Userspace fills a table of [`MAGLEV_TABLE_SIZE`] slots per forward, each naming one
//! backend (`maglev_table`, `user` feature); the kernel hashes a new connection's tuple
//! ([`tuple_hash`]) and reads slot [`maglev_slot`]. Every backend walks the slots in its own
//! order, derived from its identity (address and port), and the backends take turns
//! claiming the next free slot of their walk. So the table depends on which backends there
//! are, not on their order, and when one goes away only its slots (and few others) change
//! hands: connections to the other backends mostly keep theirs.
//!
//! What the kernel uses ([`tuple_hash`], [`maglev_slot`], the constants) is `core` only,
//! straight-line and panic-free, as the verifier wants.

/// Slots in a forward's table. A prime, so every skip from 1 to M - 1 walks all slots.
///
/// The table costs M × 4 bytes per forward: 4 KiB here, 412 MB for 100,000 forwards with
/// a table each (Cilium's default 16381 would be 6.5 GB; Katran's 65537 is meant for a few
/// hundred VIPs). Maglev wants M well above the number of backends N: a backend's share
/// is resolved to 1/M, and a change moves more than the minimum when M/N is small.
/// Measured at 1031: 16 equal backends get 64 or 65 slots each (weights 1 to 16: every
/// share within a slot of w/Σw); removing one of 4 (of 16) backends also moves 1.7% (3.1%)
/// of the other backends' slots on average, 2.2% (4.7%) at worst; a table takes ~10 µs to
/// build (release). 4099 would move ~1% less for 4 times the memory and build time.
pub const MAGLEV_TABLE_SIZE: u32 = 1031;

/// The table slot of a connection whose tuple hashes to `hash`.
#[inline(always)]
pub fn maglev_slot(hash: u32) -> u32 {
    hash % MAGLEV_TABLE_SIZE
}

/// Hash of a connection's tuple (addresses as stored in the maps, IPv4 in the first four
/// bytes; ports in network order as read from the packet), to pick its table slot.
///
/// MurmurHash3 (32-bit) over the tuple's ten words: every input bit reaches every output
/// bit, so consecutive client ports spread evenly. Straight-line word operations, no
/// loops; the words are read little-endian so the value does not depend on the host.
#[inline(always)]
pub fn tuple_hash(src: &[u8; 16], dst: &[u8; 16], src_port_be: u16, dst_port_be: u16, proto: u8) -> u32 {
    let mut h = 0;
    h = murmur3_address(h, src);
    h = murmur3_address(h, dst);
    h = murmur3_round(h, src_port_be as u32 | (dst_port_be as u32) << 16);
    h = murmur3_round(h, proto as u32);
    murmur3_finish(h, 40)
}

#[inline(always)]
fn murmur3_address(mut h: u32, address: &[u8; 16]) -> u32 {
    let word = |i: usize| u32::from_le_bytes([address[i], address[i + 1], address[i + 2], address[i + 3]]);
    h = murmur3_round(h, word(0));
    h = murmur3_round(h, word(4));
    h = murmur3_round(h, word(8));
    murmur3_round(h, word(12))
}

#[inline(always)]
fn murmur3_round(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn murmur3_finish(h: u32, length: u32) -> u32 {
    fmix32(h ^ length)
}

/// MurmurHash3's finaliser: every input bit reaches every output bit (the flow cache's
/// bucket, the SNAT port walk and [`tuple_hash`] all end with it).
#[inline(always)]
pub fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(feature = "user")]
pub use table::*;

/// The table builder, userspace only (it allocates).
#[cfg(feature = "user")]
mod table {
    use super::MAGLEV_TABLE_SIZE;
    use alloc::vec;
    use alloc::vec::Vec;

    /// One of a forward's backends, as the table builder sees it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MaglevBackend {
        /// IPv4 in the first four bytes, the rest zero (as in the maps).
        pub addr: [u8; 16],
        pub port_be: u16,
        /// Relative share of new connections; 0 takes none (a drained backend).
        pub weight: u32,
    }

    impl MaglevBackend {
        /// What the backend's walk over the slots derives from: address and port.
        fn identity(&self) -> [u8; 18] {
            let mut identity = [0; 18];
            identity[..16].copy_from_slice(&self.addr);
            identity[16..].copy_from_slice(&self.port_be.to_ne_bytes());
            identity
        }
    }

    /// Why no table could be built.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum MaglevError {
        /// No backend, or all of weight 0: the forward has nowhere to send new connections.
        NoBackend,
        /// Two backends with the same address and port (their indices in the list).
        DuplicateBackend(usize, usize),
    }

    impl core::fmt::Display for MaglevError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                MaglevError::NoBackend => f.write_str("no backend with a weight above 0"),
                MaglevError::DuplicateBackend(a, b) => write!(f, "backends {a} and {b} have the same address and port"),
            }
        }
    }

    impl core::error::Error for MaglevError {}

    /// The forward's table: [`MAGLEV_TABLE_SIZE`] slots, each the index in `backends` of
    /// the backend that takes the connections hashing there. A backend of weight w gets
    /// about w/Σw of the slots, weight 0 none.
    pub fn maglev_table(backends: &[MaglevBackend]) -> Result<Vec<u32>, MaglevError> {
        populate(backends, MAGLEV_TABLE_SIZE)
    }

    /// A backend's walk over the slots and its progress in taking turns.
    struct Walk {
        index: u32,
        weight: u64,
        position: u32,
        skip: u32,
        /// Weight accumulated towards the next turn.
        credit: u64,
    }

    impl Walk {
        /// The next slot of this walk that is still free (one is, or the table is full).
        fn next_free(&mut self, table: &[u32], size: u32) -> usize {
            loop {
                let slot = self.position as usize;
                // Both below `size`: a subtraction does the modulo, at a fraction of its cost.
                self.position += self.skip;
                if self.position >= size {
                    self.position -= size;
                }
                if table[slot] == FREE {
                    return slot;
                }
            }
        }
    }

    const FREE: u32 = u32::MAX;

    /// Maglev population over a table of `size` slots (a prime), weighted as Katran does:
    /// each round every backend adds its weight to its credit and takes one slot when the
    /// credit reaches the largest weight, so the heaviest backend takes a slot every round
    /// and the others in proportion.
    pub(super) fn populate(backends: &[MaglevBackend], size: u32) -> Result<Vec<u32>, MaglevError> {
        let mut by_identity: Vec<(usize, [u8; 18])> =
            backends.iter().map(MaglevBackend::identity).enumerate().collect();
        // Turns go in identity order: two backends after the same slot in the same round
        // then settle it the same way whatever the caller's order.
        by_identity.sort_unstable_by_key(|(_, identity)| *identity);
        if let Some(pair) = by_identity.windows(2).find(|pair| pair[0].1 == pair[1].1) {
            let (a, b) = (pair[0].0.min(pair[1].0), pair[0].0.max(pair[1].0));
            return Err(MaglevError::DuplicateBackend(a, b));
        }
        let mut walks: Vec<Walk> = by_identity
            .iter()
            .filter(|(index, _)| backends[*index].weight > 0)
            .map(|(index, identity)| Walk {
                index: *index as u32,
                weight: backends[*index].weight as u64,
                // Two independent hashes, as in the paper: where the walk starts, and its
                // stride (never 0, so with a prime size it reaches every slot).
                position: (identity_hash(identity, 0) % size as u64) as u32,
                skip: (identity_hash(identity, 1) % (size as u64 - 1)) as u32 + 1,
                credit: 0,
            })
            .collect();
        let Some(max_weight) = walks.iter().map(|walk| walk.weight).max() else {
            return Err(MaglevError::NoBackend);
        };

        let mut table = vec![FREE; size as usize];
        let mut filled = 0;
        loop {
            for walk in &mut walks {
                walk.credit += walk.weight;
                if walk.credit < max_weight {
                    continue;
                }
                walk.credit -= max_weight;
                let slot = walk.next_free(&table, size);
                table[slot] = walk.index;
                filled += 1;
                if filled == size {
                    return Ok(table);
                }
            }
        }
    }

    /// A 64-bit hash of a backend's identity: FNV-1a with a seeded basis, then SplitMix64's
    /// finaliser (FNV alone barely mixes addresses that differ in their last byte). Our own,
    /// not std's, so tables stay the same across Rust versions and restarts.
    fn identity_hash(identity: &[u8], seed: u64) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for byte in identity {
            h = (h ^ *byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= h >> 30;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 27;
        h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connection `i` of a client 192.0.2.2 to 203.0.113.10:443 over TCP, from source port
    /// 30000 + i, as an end-to-end test opens them.
    fn client_tuple_hash(i: u16) -> u32 {
        let mut src = [0; 16];
        let mut dst = [0; 16];
        src[..4].copy_from_slice(&[192, 0, 2, 2]);
        dst[..4].copy_from_slice(&[203, 0, 113, 10]);
        tuple_hash(&src, &dst, (30_000 + i).to_be(), 443u16.to_be(), 6)
    }

    #[test]
    fn the_table_size_is_prime() {
        assert!(
            (2..MAGLEV_TABLE_SIZE)
                .take_while(|d| d * d <= MAGLEV_TABLE_SIZE)
                .all(|d| !MAGLEV_TABLE_SIZE.is_multiple_of(d))
        );
    }

    #[test]
    fn tuple_hash_is_deterministic_and_sees_every_field() {
        let (a, b) = ([1; 16], [2; 16]);
        let base = tuple_hash(&a, &b, 1000, 80, 6);
        assert_eq!(base, tuple_hash(&a, &b, 1000, 80, 6));
        let mut c = a;
        c[15] ^= 1;
        for other in [
            tuple_hash(&b, &a, 1000, 80, 6),
            tuple_hash(&c, &b, 1000, 80, 6),
            tuple_hash(&a, &c, 1000, 80, 6),
            tuple_hash(&a, &b, 1001, 80, 6),
            tuple_hash(&a, &b, 1000, 81, 6),
            tuple_hash(&a, &b, 80, 1000, 6),
            tuple_hash(&a, &b, 1000, 80, 17),
        ] {
            assert_ne!(base, other);
        }
    }

    /// Consecutive client ports fill the slots like a random function would.
    #[test]
    fn consecutive_ports_spread_over_the_slots() {
        let flows = 8 * MAGLEV_TABLE_SIZE;
        let mut per_slot = [0u32; MAGLEV_TABLE_SIZE as usize];
        for i in 0..flows {
            per_slot[maglev_slot(client_tuple_hash(i as u16)) as usize] += 1;
        }
        // Chi-square with M - 1 degrees of freedom: mean 1030, sd 45; 1250 is ~5 sd out.
        let expected = 8.0;
        let chi_square: f64 = per_slot.iter().map(|n| (*n as f64 - expected) * (*n as f64 - expected) / expected).sum();
        assert!(chi_square < 1250.0, "chi-square {chi_square}");
    }

    #[cfg(feature = "user")]
    mod table {
        use super::super::*;
        use super::client_tuple_hash;
        use alloc::vec::Vec;

        fn backend(last: u8, weight: u32) -> MaglevBackend {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&[198, 51, 100, last]);
            MaglevBackend { addr, port_be: 8080u16.to_be(), weight }
        }

        fn slots_per_backend(table: &[u32], backends: usize) -> Vec<u32> {
            let mut counts = alloc::vec![0; backends];
            table.iter().for_each(|index| counts[*index as usize] += 1);
            counts
        }

        /// The backend (by address) each of `flows` client connections goes to.
        fn picks(table: &[u32], backends: &[MaglevBackend], flows: u16) -> Vec<[u8; 16]> {
            (0..flows).map(|i| backends[table[maglev_slot(client_tuple_hash(i)) as usize] as usize].addr).collect()
        }

        #[test]
        fn weights_1_1_2_split_slots_and_connections_a_quarter_a_quarter_a_half() {
            let backends = [backend(1, 1), backend(2, 1), backend(3, 2)];
            let table = maglev_table(&backends).unwrap();
            assert_eq!(table.len(), MAGLEV_TABLE_SIZE as usize);
            let slots = slots_per_backend(&table, 3);
            for (count, share) in slots.iter().zip([0.25, 0.25, 0.5]) {
                let measured = *count as f64 / MAGLEV_TABLE_SIZE as f64;
                assert!((measured - share).abs() <= 0.02, "slots {slots:?}");
            }
            // The end-to-end figure: 800 connections within ±15% of 200/200/400.
            let mut connections = [0u32; 3];
            for i in 0..800 {
                connections[table[maglev_slot(client_tuple_hash(i)) as usize] as usize] += 1;
            }
            for (count, expected) in connections.iter().zip([200.0, 200.0, 400.0]) {
                assert!((*count as f64 - expected).abs() <= 0.15 * expected, "connections {connections:?}");
            }
        }

        #[test]
        fn removing_one_of_four_backends_moves_little_else() {
            let all = [backend(1, 1), backend(2, 1), backend(3, 1), backend(4, 1)];
            let before = maglev_table(&all).unwrap();
            let rest = [all[0], all[2], all[3]];
            let after = maglev_table(&rest).unwrap();

            let (old, new) = (picks(&before, &all, 1000), picks(&after, &rest, 1000));
            let removed = all[1].addr;
            let stayed = old.iter().filter(|addr| **addr != removed).count();
            let kept = old.iter().zip(&new).filter(|(old, new)| **old != removed && old == new).count();
            assert!(kept as f64 >= 0.9 * stayed as f64, "{kept} of {stayed} connections kept their backend");

            // The removed backend's slots go to all three others, about a third each.
            let mut inherited = [0u32; 3];
            before.iter().zip(&after).filter(|(old, _)| **old == 1).for_each(|(_, new)| inherited[*new as usize] += 1);
            let orphans: u32 = inherited.iter().sum();
            assert!(inherited.iter().all(|n| *n as f64 >= 0.2 * orphans as f64), "inherited {inherited:?}");
        }

        #[test]
        fn the_table_depends_on_the_backends_not_their_order() {
            let backends = [backend(1, 1), backend(2, 3), backend(3, 1), backend(4, 2), backend(5, 1)];
            let by_address = |table: Vec<u32>, order: &[MaglevBackend]| -> Vec<[u8; 16]> {
                table.iter().map(|index| order[*index as usize].addr).collect()
            };
            let reference = by_address(maglev_table(&backends).unwrap(), &backends);
            let mut reversed = backends;
            reversed.reverse();
            let mut rotated = backends;
            rotated.rotate_left(2);
            for order in [reversed, rotated] {
                assert_eq!(by_address(maglev_table(&order).unwrap(), &order), reference);
            }
            assert_eq!(maglev_table(&backends), maglev_table(&backends), "deterministic");
        }

        #[test]
        fn weight_0_gets_no_slot_and_no_backend_is_an_error() {
            let table = maglev_table(&[backend(1, 1), backend(2, 0), backend(3, 1)]).unwrap();
            let slots = slots_per_backend(&table, 3);
            assert_eq!(slots[1], 0);
            assert_eq!(slots[0] + slots[2], MAGLEV_TABLE_SIZE);
            assert_eq!(maglev_table(&[]), Err(MaglevError::NoBackend));
            assert_eq!(maglev_table(&[backend(1, 0), backend(2, 0)]), Err(MaglevError::NoBackend));
            let clash = maglev_table(&[backend(1, 1), backend(2, 1), backend(1, 2)]);
            assert_eq!(clash, Err(MaglevError::DuplicateBackend(0, 2)));
        }

        #[test]
        fn sixteen_backends_get_their_weighted_shares() {
            // Equal weights: Maglev's turns give every backend ⌊M/16⌋ or ⌈M/16⌉ slots.
            let equal: Vec<_> = (1..=16).map(|i| backend(i, 1)).collect();
            let slots = slots_per_backend(&maglev_table(&equal).unwrap(), 16);
            assert!(
                slots.iter().all(|n| *n == MAGLEV_TABLE_SIZE / 16 || *n == MAGLEV_TABLE_SIZE / 16 + 1),
                "{slots:?}"
            );

            // Weights 1 to 16: each backend within a slot or two of w/Σw.
            let weighted: Vec<_> = (1..=16).map(|i| backend(i, i as u32)).collect();
            let slots = slots_per_backend(&maglev_table(&weighted).unwrap(), 16);
            let total: u32 = (1..=16).sum();
            for (weight, count) in (1..=16).zip(&slots) {
                let target = MAGLEV_TABLE_SIZE as f64 * weight as f64 / total as f64;
                assert!((*count as f64 - target).abs() <= 2.0, "weight {weight}: {count} slots, {target:.1} due");
            }
        }
    }
}
