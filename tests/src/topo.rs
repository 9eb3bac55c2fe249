//! client ─ veth ─ router ─ veth ─ server, with documentation addresses:
//!
//! ```text
//! client 192.0.2.2/24 ── c0 ═ rc ── router 192.0.2.1/24 | 203.0.113.1/24 ── rs ═ s0 ── server 203.0.113.20/24
//! ```
//! The client's default route points at the router. The server has no route back to the
//! client unless asked (`server_route_via_router`), so with SNAT off nothing comes back
//! unless it passes the router. The far ends (c0, s0) are left as a container's would be.

use anyhow::Result;

use crate::netns::{Netns, unique_tag};

pub const CLIENT_ADDR: &str = "192.0.2.2";
pub const ROUTER_CLIENT_ADDR: &str = "192.0.2.1";
pub const ROUTER_SERVER_ADDR: &str = "203.0.113.1";
pub const SERVER_ADDR: &str = "203.0.113.20";
/// Router-side device names (inside the router namespace).
pub const ROUTER_CLIENT_DEV: &str = "rc";
pub const ROUTER_SERVER_DEV: &str = "rs";

pub struct Chain {
    pub tag: String,
    // Field order is drop order: the router goes last, after the ends.
    pub client: Netns,
    pub server: Netns,
    pub router: Netns,
}

impl Chain {
    pub fn new() -> Result<Self> {
        let tag = unique_tag();
        let client = Netns::new(&format!("fwt-{tag}-c"))?;
        let server = Netns::new(&format!("fwt-{tag}-s"))?;
        let router = Netns::new(&format!("fwt-{tag}-r"))?;
        router.ip(&["link", "add", ROUTER_CLIENT_DEV, "type", "veth", "peer", "name", "c0", "netns", &client.name])?;
        router.ip(&["link", "add", ROUTER_SERVER_DEV, "type", "veth", "peer", "name", "s0", "netns", &server.name])?;
        router.ip(&["addr", "add", &format!("{ROUTER_CLIENT_ADDR}/24"), "dev", ROUTER_CLIENT_DEV])?;
        router.ip(&["addr", "add", &format!("{ROUTER_SERVER_ADDR}/24"), "dev", ROUTER_SERVER_DEV])?;
        router.ip(&["link", "set", ROUTER_CLIENT_DEV, "up"])?;
        router.ip(&["link", "set", ROUTER_SERVER_DEV, "up"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "c0"])?;
        client.ip(&["link", "set", "c0", "up"])?;
        client.ip(&["route", "add", "default", "via", ROUTER_CLIENT_ADDR])?;
        server.ip(&["addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "s0"])?;
        server.ip(&["link", "set", "s0", "up"])?;
        Ok(Self { tag, client, server, router })
    }

    /// Gives the server a route to the client network through the router (SNAT off).
    pub fn server_route_via_router(&self) -> Result<()> {
        self.server.ip(&["route", "add", "192.0.2.0/24", "via", ROUTER_SERVER_ADDR]).map(|_| ())
    }
}
