//! Types shared by the kernel programs and the userspace loader: map names, map keys and
//! values, counter codes, and the pure logic (checksums) that both sides rely on.
//!
//! Every map type is `#[repr(C)]` with explicit padding and a compile-time size check, so
//! the kernel and userspace agree by construction. Addresses and ports are stored in
//! network byte order (`[u8; N]` and `*_be` fields). IPv4 addresses occupy the first four
//! bytes of a 16-byte address field, the rest zero, so IPv6 fits the same keys.
#![no_std]

// The Maglev table builder allocates; the kernel never enables `user`.
#[cfg(feature = "user")]
extern crate alloc;

pub mod conntrack;
pub mod csum;
pub mod maglev;
pub mod maps;
pub mod reason;

pub use maps::*;
pub use reason::*;
