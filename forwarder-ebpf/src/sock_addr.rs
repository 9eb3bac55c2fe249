//! The cgroup socket-address programs of local forwards: entry points only, the work is
//! local.rs's.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::local;

/// Cgroup socket hooks return 1 ("allow"): forwarder rewrites, it never refuses a socket.
/// The exceptions (0: EPERM): a datagram sendmsg refuses (see `local::sendmsg`), and a
/// connection of a forward with no backend taking new ones (`local::connect`).
const SOCK_ALLOW: i32 = 1;
const SOCK_REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn forwarder_connect4(ctx: SockAddrContext) -> i32 {
    if local::connect(&ctx, false) { SOCK_ALLOW } else { SOCK_REFUSE }
}

#[cgroup_sock_addr(connect6)]
pub fn forwarder_connect6(ctx: SockAddrContext) -> i32 {
    if local::connect(&ctx, true) { SOCK_ALLOW } else { SOCK_REFUSE }
}

#[cgroup_sock_addr(getpeername4)]
pub fn forwarder_getpeername4(ctx: SockAddrContext) -> i32 {
    local::getpeername(&ctx, false);
    SOCK_ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn forwarder_getpeername6(ctx: SockAddrContext) -> i32 {
    local::getpeername(&ctx, true);
    SOCK_ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn forwarder_sendmsg4(ctx: SockAddrContext) -> i32 {
    if local::sendmsg(&ctx, false) { SOCK_ALLOW } else { SOCK_REFUSE }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn forwarder_sendmsg6(ctx: SockAddrContext) -> i32 {
    if local::sendmsg(&ctx, true) { SOCK_ALLOW } else { SOCK_REFUSE }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn forwarder_recvmsg4(ctx: SockAddrContext) -> i32 {
    local::recvmsg(&ctx, false);
    SOCK_ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn forwarder_recvmsg6(ctx: SockAddrContext) -> i32 {
    local::recvmsg(&ctx, true);
    SOCK_ALLOW
}
