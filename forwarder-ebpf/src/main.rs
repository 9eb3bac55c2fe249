//! forwarder's kernel programs: one module per hook holds its entry points (xdp.rs, tc.rs,
//! sock_addr.rs); the work is in one module per concern.
#![no_std]
#![no_main]

mod backend;
pub mod conntrack;
mod csum;
mod ctx;
mod fastpath;
mod fastpath6;
mod frag;
mod global;
mod host;
mod icmp;
mod icmp_reply;
mod l2;
mod local;
pub mod maps;
mod nat;
pub mod parse;
mod peer;
pub mod route;
mod rules;
mod sock;
mod sock_addr;
mod sources;
mod stats;
mod tc;
mod verdict;
mod work;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
