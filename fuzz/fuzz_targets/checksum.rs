//! The packet path's checksum arithmetic (forwarder_common::csum, shared with the kernel
//! programs): for any IPv4 header and any address rewrite, the RFC 1624 incremental update
//! must equal a full recomputation.
#![no_main]
use forwarder_common::csum::{checksum, sum4, update};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: [u8; 28]| {
    let mut header = [0u8; 20];
    header.copy_from_slice(&data[..20]);
    header[0] = 0x45;
    header[10] = 0;
    header[11] = 0;
    let c = checksum(&header);
    header[10..12].copy_from_slice(&c.to_be_bytes());
    let old: [u8; 4] = header[12..16].try_into().unwrap();
    let new: [u8; 4] = data[20..24].try_into().unwrap();
    let old_d: [u8; 4] = header[16..20].try_into().unwrap();
    let new_d: [u8; 4] = data[24..28].try_into().unwrap();
    let inc = update(c, sum4(old) + sum4(old_d), sum4(new) + sum4(new_d));
    header[12..16].copy_from_slice(&new);
    header[16..20].copy_from_slice(&new_d);
    header[10] = 0;
    header[11] = 0;
    let full = checksum(&header);
    // 0x0000 and 0xffff are both zero in one's complement.
    assert!(inc == full || (inc ^ full) == 0xffff && (inc == 0 || inc == 0xffff), "{inc:#x} != {full:#x}");
});
