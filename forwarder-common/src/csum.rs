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

/// The one's-complement difference (a `__wsum`, as `bpf_l4_csum_replace` takes it with no
/// size and `bpf_csum_update` adds it) of replacing the words `old` by `new`, each word the
/// native-endian word of its four bytes in the packet.
#[inline(always)]
pub fn wsum_diff<const N: usize>(old: [u32; N], new: [u32; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < N {
        sum += (!old[i]) as u64 + new[i] as u64;
        i += 1;
    }
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    (sum & 0xffff_ffff) + (sum >> 32)
}

/// The one's-complement sum of two differences ([`wsum_diff`]'s), in 32 bits.
#[inline(always)]
pub fn add_wsum(a: u64, b: u64) -> u64 {
    let sum = a + b;
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    (sum & 0xffff_ffff) + (sum >> 32)
}

/// The difference of decrementing the IPv6 hop limit `old`: the last byte of the header's
/// second word (its first word starts the header, which a sum starts at).
#[inline(always)]
pub fn hop_limit_diff(old: u8) -> u64 {
    wsum_diff([u32::from_ne_bytes([0, 0, 0, old])], [u32::from_ne_bytes([0, 0, 0, old.wrapping_sub(1)])])
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
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// The kernel's `__wsum` arithmetic, as include/net/checksum.h has it: 32-bit sums with
    /// the carry added back, words as the CPU loads them.
    fn csum_add(a: u32, b: u32) -> u32 {
        let (sum, carry) = a.overflowing_add(b);
        sum + carry as u32
    }

    fn csum_fold(sum: u32) -> u16 {
        !fold(sum)
    }

    /// `csum_partial`: the sum of the bytes as native-endian 32-bit words.
    fn csum_partial(bytes: &[u8]) -> u32 {
        bytes.chunks(4).fold(0, |sum, c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            csum_add(sum, u32::from_ne_bytes(w))
        })
    }

    /// A folded sum with one's complement's two zeros made one.
    fn folded(sum: u32) -> u16 {
        match fold(sum) {
            0xffff => 0,
            f => f,
        }
    }

    /// `inet_proto_csum_replace_by_diff` on an skb that is not CHECKSUM_PARTIAL (what
    /// `bpf_l4_csum_replace` with no size does without BPF_F_IPV6): the L4 checksum field at
    /// `off` takes `diff`, and a CHECKSUM_COMPLETE sum loses it when `pseudohdr`.
    fn l4_csum_replace_by_diff(pkt: &mut [u8], off: usize, skb_csum: &mut u32, diff: u64, pseudohdr: bool) {
        let field = u16::from_ne_bytes([pkt[off], pkt[off + 1]]) as u32;
        let new = csum_fold(csum_add(diff as u32, !field));
        pkt[off..off + 2].copy_from_slice(&new.to_ne_bytes());
        if pseudohdr {
            *skb_csum = !csum_add(diff as u32, !*skb_csum);
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u8 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 as u8
        }
        fn fill(&mut self, b: &mut [u8]) {
            b.iter_mut().for_each(|x| *x = self.next());
        }
    }

    /// What both rewrites share: the UDP checksum at `check_at` set right (`udp_check` of the
    /// packet with a zero field), the CHECKSUM_COMPLETE sum of the packet taken, then the
    /// helpers' part of TC's rewrite to random addresses (in place of those at `addrs`) and
    /// ports (at `ports_at`): the checksum by the addresses' and the ports' differences.
    /// Returns the sum as the helpers left it, the addresses' difference, and the new
    /// addresses and ports, which the caller writes.
    fn sum_and_helpers(
        pkt: &mut [u8],
        rng: &mut Rng,
        addrs: core::ops::Range<usize>,
        ports_at: usize,
        check_at: usize,
        udp_check: impl Fn(&[u8]) -> u16,
    ) -> (u32, u64, Vec<u8>, [u8; 4]) {
        pkt[check_at..check_at + 2].copy_from_slice(&[0, 0]);
        let check = udp_check(pkt);
        pkt[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
        assert_eq!(udp_check(pkt), 0);
        let mut skb_csum = csum_partial(pkt);
        let mut new_addrs = vec![0u8; addrs.len()];
        rng.fill(&mut new_addrs);
        let mut new_ports = [0u8; 4];
        rng.fill(&mut new_ports);
        let word = |b: &[u8], i: usize| u32::from_ne_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
        let (old, new) = (&pkt[addrs.clone()], &new_addrs);
        let addrs_diff = (0..old.len() / 4).fold(0, |d, i| add_wsum(d, wsum_diff([word(old, i)], [word(new, i)])));
        let ports = wsum_diff([word(&pkt[ports_at..], 0)], [u32::from_ne_bytes(new_ports)]);
        l4_csum_replace_by_diff(pkt, check_at, &mut skb_csum, addrs_diff, true);
        l4_csum_replace_by_diff(pkt, check_at, &mut skb_csum, ports, false);
        (skb_csum, addrs_diff, new_addrs, new_ports)
    }

    /// TC's rewrite of a CHECKSUM_COMPLETE IPv6 UDP packet (nat::rewrite_tc, fastpath6):
    /// the L4 checksum by the helper's two differences, the rest by direct writes, and
    /// `bpf_csum_update` of the addresses' and hop limit's difference. skb->csum must then be
    /// the sum of the packet's bytes as they are, and the UDP checksum valid; without the
    /// update it is not (what Cilium met, kernel commit ead7f9b8de65).
    #[test]
    fn ipv6_rewrite_keeps_a_complete_sum_with_the_update() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for case in 0..2_000 {
            let payload_len = 1 + case % 40;
            let mut pkt = vec![0u8; 48 + payload_len];
            rng.fill(&mut pkt);
            pkt[0] = 0x60;
            pkt[4..6].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
            pkt[6] = 17;
            pkt[7] = 2 + rng.next() % 250;
            pkt[44..46].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
            let udp_check = |pkt: &[u8]| {
                let mut pseudo = pkt[8..40].to_vec();
                pseudo.extend_from_slice(&((pkt.len() - 40) as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 17]);
                pseudo.extend_from_slice(&pkt[40..]);
                checksum(&pseudo)
            };
            let hop = pkt[7];
            let (mut skb_csum, addrs, new_addrs, new_ports) =
                sum_and_helpers(&mut pkt, &mut rng, 8..40, 40, 46, udp_check);
            pkt[7] = hop - 1;
            pkt[8..40].copy_from_slice(&new_addrs);
            pkt[40..44].copy_from_slice(&new_ports);
            assert_eq!(udp_check(&pkt), 0, "case {case}: UDP checksum");

            let without = skb_csum;
            skb_csum = csum_add(skb_csum, add_wsum(addrs, hop_limit_diff(hop)) as u32);
            assert_eq!(folded(skb_csum), folded(csum_partial(&pkt)), "case {case}: skb->csum");
            if folded(addrs as u32) != 0 {
                assert_ne!(folded(without), folded(csum_partial(&pkt)), "case {case}: control");
            }
        }
    }

    /// The same for IPv4, whose header checksum balances the addresses and TTL: the helper's
    /// pseudo-header difference alone keeps skb->csum right (no update).
    #[test]
    fn ipv4_rewrite_keeps_a_complete_sum_without_an_update() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..2_000 {
            let payload_len = 1 + case % 40;
            let mut pkt = vec![0u8; 28 + payload_len];
            rng.fill(&mut pkt);
            pkt[0] = 0x45;
            pkt[2..4].copy_from_slice(&((28 + payload_len) as u16).to_be_bytes());
            pkt[8] = 2 + rng.next() % 250;
            pkt[9] = 17;
            pkt[10..12].copy_from_slice(&[0, 0]);
            let ip_check = checksum(&pkt[..20]);
            pkt[10..12].copy_from_slice(&ip_check.to_be_bytes());
            pkt[24..26].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
            let udp_check = |pkt: &[u8]| {
                let mut pseudo = pkt[12..20].to_vec();
                pseudo.extend_from_slice(&[0, 17]);
                pseudo.extend_from_slice(&((pkt.len() - 20) as u16).to_be_bytes());
                pseudo.extend_from_slice(&pkt[20..]);
                checksum(&pseudo)
            };
            let (old_addrs, ttl) = (pkt[12..20].to_vec(), pkt[8]);
            let (skb_csum, _, new_addrs, new_ports) = sum_and_helpers(&mut pkt, &mut rng, 12..20, 20, 26, udp_check);
            // The IPv4 header by direct writes, its checksum by RFC 1624 (nat::rewrite_tc).
            let old_sum = sum4([old_addrs[0], old_addrs[1], old_addrs[2], old_addrs[3]])
                + sum4([old_addrs[4], old_addrs[5], old_addrs[6], old_addrs[7]])
                + u16::from_be_bytes([ttl, 17]) as u32;
            let new_sum = sum4([new_addrs[0], new_addrs[1], new_addrs[2], new_addrs[3]])
                + sum4([new_addrs[4], new_addrs[5], new_addrs[6], new_addrs[7]])
                + u16::from_be_bytes([ttl - 1, 17]) as u32;
            let ip_check = update(u16::from_be_bytes([pkt[10], pkt[11]]), old_sum, new_sum);
            pkt[8] = ttl - 1;
            pkt[10..12].copy_from_slice(&ip_check.to_be_bytes());
            pkt[12..20].copy_from_slice(&new_addrs);
            pkt[20..24].copy_from_slice(&new_ports);
            assert_eq!(checksum(&pkt[..20]), 0, "case {case}: IPv4 header checksum");
            assert_eq!(udp_check(&pkt), 0, "case {case}: UDP checksum");
            assert_eq!(folded(skb_csum), folded(csum_partial(&pkt)), "case {case}: skb->csum");
        }
    }

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
