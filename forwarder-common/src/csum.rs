//! Internet checksum arithmetic (RFC 1071) and incremental update (RFC 1624, eqn. 3).
//!
//! Sums are kept unfolded in a `u32`/`u64` and folded at the end. All functions are
//! `#[inline(always)]` and panic-free so the BPF verifier accepts them.

/// Folds a 32-bit one's-complement sum into 16 bits (not inverted).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// One's-complement sum of a 4-byte field taken as two 16-bit words (network order).
#[inline(always)]
pub fn sum4(bytes: [u8; 4]) -> u32 {
    u16::from_be_bytes([bytes[0], bytes[1]]) as u32 + u16::from_be_bytes([bytes[2], bytes[3]]) as u32
}

/// RFC 1624 incremental update of a checksum field `check` (as stored, network order
/// value) when 16-bit words summing to `old_sum` are replaced by words summing to `new_sum`.
/// `old_sum`/`new_sum` are unfolded sums of the changed words.
#[inline(always)]
pub fn update(check: u16, old_sum: u32, new_sum: u32) -> u16 {
    // HC' = ~(~HC + ~m + m'): subtracting old words is adding their complement.
    let old = fold(old_sum);
    let new = fold(new_sum);
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// The constant part of an RFC 1624 update: replacing words summing to `old_sum` by words
/// summing to `new_sum` adds `delta(old_sum, new_sum)` to any checksum over them (see
/// [`apply_delta`]). A connection's rewrite changes the same words of every packet, so
/// its delta is computed once and kept with it.
#[inline(always)]
pub fn delta(old_sum: u32, new_sum: u32) -> u16 {
    fold((!fold(old_sum)) as u32 + fold(new_sum) as u32)
}

/// [`update`] with a precomputed [`delta`]: `apply_delta(c, delta(o, n)) == update(c, o, n)`.
#[inline(always)]
pub fn apply_delta(check: u16, delta: u16) -> u16 {
    !fold((!check) as u32 + delta as u32)
}

/// Delta of an IPv4 TTL decrement for the header checksum: the word (TTL, protocol) loses
/// 0x0100 whatever the TTL (as long as it is at least 1).
pub const TTL_DECREMENT_DELTA: u16 = !0x0100;

/// Sum of two deltas (both changes applied).
#[inline(always)]
pub fn add_deltas(a: u16, b: u16) -> u16 {
    fold(a as u32 + b as u32)
}

/// Update of a checksum field that holds a CHECKSUM_PARTIAL seed: the non-inverted folded
/// sum of the pseudo header, which the NIC (or the kernel) completes over the payload later.
/// Only pseudo-header words may change, and the seed moves the other way from a full sum.
#[inline(always)]
pub fn update_partial_seed(seed: u16, old_sum: u32, new_sum: u32) -> u16 {
    !update(!seed, old_sum, new_sum)
}

/// Non-inverted folded sum of the IPv4 pseudo header (source, destination, protocol,
/// L4 length). For a CHECKSUM_PARTIAL packet the L4 checksum field holds exactly this.
#[inline(always)]
pub fn ipv4_pseudo_seed(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u16 {
    fold(sum4(src) + sum4(dst) + proto as u32 + l4_len as u32)
}

/// [`fold`] of an IPv6 pseudo header (RFC 8200 8.1) from addresses given as the
/// native-endian words of their bytes, as the fast path reads them, and the result in the
/// same form: the native-endian `u16` of the two bytes a checksum field holding the sum
/// would have. A one's-complement sum comes out as the same bytes whatever the byte order
/// it is computed in (RFC 1071 2(B)), so eight word additions and a fold replace sixteen
/// byte-swapped halves.
#[inline(always)]
pub fn ipv6_pseudo_sum_ne(src: &[u32; 4], dst: &[u32; 4], proto: u8, l4_len: u32) -> u16 {
    let mut sum = u32::from_ne_bytes(l4_len.to_be_bytes()) as u64 + u32::from_ne_bytes([0, 0, 0, proto]) as u64;
    let mut i = 0;
    while i < 4 {
        sum += src[i] as u64 + dst[i] as u64;
        i += 1;
    }
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    fold(sum as u32)
}

/// Full RFC 1071 checksum over a byte slice (host-side helper for tests and tools).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u16::from_be_bytes([c[0], c[1]]) as u32);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add((*last as u32) << 8);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-wise IPv6 pseudo-header sum is the byte-wise one, as the field's bytes.
    #[test]
    fn ipv6_pseudo_sum_of_words_matches_the_bytewise_sum() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u32
        };
        for i in 0..10_000u32 {
            // Extremes too: all ones (carries everywhere) and all zeros.
            let word = |n: u32| match i % 3 {
                0 => u32::MAX,
                1 => n,
                _ => n & 0x00ff_00ff,
            };
            let src = [word(next()), word(next()), word(next()), word(next())];
            let dst = [word(next()), word(next()), word(next()), word(next())];
            let (proto, len) = (if i % 2 == 0 { 6 } else { 17 }, next() % 70_000);
            let mut bytewise = proto as u32 + (len >> 16) + (len & 0xffff);
            for w in src.iter().chain(&dst) {
                bytewise += sum4(w.to_ne_bytes());
            }
            let field = fold(bytewise).to_be_bytes();
            assert_eq!(ipv6_pseudo_sum_ne(&src, &dst, proto, len), u16::from_ne_bytes(field), "{src:x?} {dst:x?}");
        }
    }

    /// An IPv4 header from RFC 1071 style examples: recompute after a change and compare
    /// with the incremental result.
    fn header(src: [u8; 4], dst: [u8; 4], ttl: u8) -> [u8; 20] {
        let mut h = [0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, ttl, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn precomputed_delta_equals_incremental_update_and_recompute() {
        let mut seed = 0x9e37_79b9u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            seed
        };
        for i in 0..20_000 {
            // Corner cases first: unchanged words, all-zero and all-ones words.
            let (a, b) = match i {
                0 => ([0, 0, 0, 0], [0, 0, 0, 0]),
                1 => ([0xff; 4], [0, 0, 0, 0]),
                2 => ([0, 0, 0, 0], [0xff; 4]),
                3 => ([192, 0, 2, 1], [192, 0, 2, 1]),
                _ => (next().to_be_bytes(), next().to_be_bytes()),
            };
            let ttl = (next() % 255) as u8 + 1;
            let before = header([203, 0, 113, 9], a, ttl);
            let after = header([203, 0, 113, 9], b, ttl - 1);
            let check = u16::from_be_bytes([before[10], before[11]]);
            let d = add_deltas(delta(sum4(a), sum4(b)), TTL_DECREMENT_DELTA);
            assert_eq!(apply_delta(check, delta(sum4(a), sum4(b))), update(check, sum4(a), sum4(b)));
            let mut h = before;
            h[8] = ttl - 1;
            h[16..20].copy_from_slice(&b);
            h[10..12].copy_from_slice(&apply_delta(check, d).to_be_bytes());
            assert_eq!(checksum(&h), 0, "{a:?} -> {b:?}, ttl {ttl}");
            assert_eq!(h[..10], after[..10]);
        }
    }

    #[test]
    fn full_checksum_of_valid_header_is_zero() {
        let h = header([192, 0, 2, 1], [198, 51, 100, 7], 64);
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn incremental_matches_recompute_for_many_addresses() {
        let mut seed = 0x1234_5678u32;
        for _ in 0..10_000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let a = seed.to_be_bytes();
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let b = seed.to_be_bytes();
            let before = header([192, 0, 2, 1], a, 64);
            let after = header([192, 0, 2, 1], b, 64);
            let old_check = u16::from_be_bytes([before[10], before[11]]);
            let new_check = update(old_check, sum4(a), sum4(b));
            let want = u16::from_be_bytes([after[10], after[11]]);
            // 0x0000 and 0xffff are the same value in one's complement.
            assert!(
                new_check == want || (new_check ^ want) == 0xffff && (want == 0 || want == 0xffff),
                "{a:?}->{b:?}: {new_check:#x} != {want:#x}"
            );
        }
    }

    #[test]
    fn partial_seed_follows_pseudo_header() {
        let (s, d1, d2) = ([192, 0, 2, 10], [192, 0, 2, 1], [203, 0, 113, 20]);
        let seed = ipv4_pseudo_seed(s, d1, 6, 40);
        let updated = update_partial_seed(seed, sum4(d1), sum4(d2));
        assert_eq!(updated, ipv4_pseudo_seed(s, d2, 6, 40));
    }
}
