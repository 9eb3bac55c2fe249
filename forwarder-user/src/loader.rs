//! Loading the embedded BPF object with its maps pinned, attaching the programs through
//! pinned bpf links, adopting what a previous process left pinned, and detaching.
//!
//! Everything an instance creates lives under its pin directory ([`crate::pins`]): the maps
//! (`FWD_*`) and the links (`link_*`). Pinned links keep the programs attached and pinned maps keep the state
//! when the process ends, even by SIGKILL; the next `forwarder run` with the same pin path
//! reuses the maps and swaps its freshly loaded programs into the existing links with
//! `BPF_LINK_UPDATE`, an atomic replacement, so traffic never sees a gap.

use std::{
    collections::BTreeSet,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode, links::FdLink, tc,
    },
};
use forwarder_common::{IFACE_TC_PEER, IFACE_XDP_EGRESS_OK, IFACE_XDP_GENERIC};
use tracing::{info, warn};

use crate::{
    config::{Config, Interface, RedirectMode, XdpMode},
    error::{Error, Result},
    pins::{self, PINNED_MAPS, mount_default_bpffs, unpin_link},
    state::State,
    sys::{link_ifindex, link_update, obj_get},
    system,
};

pub const XDP_PROGRAM: &str = "forwarder_xdp";
pub const TC_INGRESS_PROGRAM: &str = "forwarder_tc_ingress";
pub const TC_EGRESS_PROGRAM: &str = "forwarder_tc_egress";
/// cgroup socket-address hooks of local forwards.
pub const LOCAL_PROGRAMS: [&str; 8] = [
    "forwarder_connect4",
    "forwarder_connect6",
    "forwarder_getpeername4",
    "forwarder_getpeername6",
    "forwarder_sendmsg4",
    "forwarder_sendmsg6",
    "forwarder_recvmsg4",
    "forwarder_recvmsg6",
];

/// Map capacities and kernel-side log level, fixed when the maps are first created (an
/// adopted map keeps the size it was created with).
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub max_forwards: u32,
    /// Backends of all forwards together (`limits.max_backends`).
    pub max_backends: u32,
    pub ct_entries: u32,
    /// aya-log level for the kernel programs: 0 off (default), 5 debug.
    pub bpf_log_level: u8,
}

impl LoadOptions {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            max_forwards: cfg.max_forwards,
            max_backends: cfg.max_backends,
            ct_entries: cfg.conntrack.max_entries,
            bpf_log_level: 0,
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_forwards: forwarder_common::DEFAULT_MAX_FORWARDS,
            max_backends: forwarder_common::DEFAULT_MAX_BACKENDS,
            ct_entries: forwarder_common::DEFAULT_CT_ENTRIES,
            bpf_log_level: 0,
        }
    }
}

/// One attached interface.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attached {
    pub name: String,
    /// 0 while the device is gone (deleted, or moved to another namespace): it is
    /// attached again when a device of its name appears ([`Instance::follow_links`]).
    pub ifindex: u32,
    pub xdp: XdpMode,
    pub xdp_egress: bool,
    /// The config entry it was attached by.
    #[serde(skip)]
    pub config: Interface,
}

/// A loaded instance. Dropping it leaves the pinned state in place (that is what makes
/// restarts seamless); [`Instance::detach`] removes it.
pub struct Instance {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
    /// True when the maps were already pinned by an earlier process.
    pub adopted: bool,
    pub attached: Vec<Attached>,
    pub egress: BTreeSet<String>,
    /// Interfaces that should have the TC egress program (set by each apply): one that
    /// is missing gets it when it appears ([`Instance::follow_links`]).
    pub egress_wanted: BTreeSet<String>,
    /// cgroup the local-forward hooks are attached to.
    pub local_cgroup: Option<PathBuf>,
    detach_on_drop: bool,
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    move |source| Error::Program { name, source }
}

fn pin_err(path: &Path) -> impl FnOnce(String) -> Error + '_ {
    move |message| Error::PinPath { path: path.display().to_string(), message }
}

impl Instance {
    /// Loads the embedded object with every map pinned under `pin_dir` (reusing maps already
    /// pinned there) and loads all programs into the kernel; nothing is attached yet.
    pub fn load(opts: &LoadOptions, pin_dir: &Path) -> Result<Self> {
        mount_default_bpffs(pin_dir);
        std::fs::create_dir_all(pin_dir).map_err(|e| pin_err(pin_dir)(e.to_string()))?;
        let adopted =
            [forwarder_common::FWD_RULES_V2, forwarder_common::FWD_RULES].iter().any(|n| pin_dir.join(n).exists());
        let paths: Vec<(&str, PathBuf)> = PINNED_MAPS.iter().map(|n| (*n, pin_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        sized(&mut loader, opts);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let loaded = loader.load(crate::EBPF_OBJECT).map_err(Error::from).and_then(|mut ebpf| {
            for name in PROGRAMS {
                load_program(&mut ebpf, name)?;
            }
            Ok(ebpf)
        });
        let mut ebpf = match loaded {
            Ok(ebpf) => ebpf,
            Err(e) => {
                // Maps are pinned as the object loads: a first start that fails (a program
                // the verifier refuses, say) leaves nothing behind. Adopted state stays.
                if !adopted {
                    pins::remove(pin_dir);
                }
                return Err(e);
            }
        };
        log_verifier_walks(&ebpf);
        if adopted {
            info!(pin_dir = %pin_dir.display(), "adopting pinned state of an earlier instance");
        }
        migrate_conntrack(&mut ebpf, pin_dir);
        migrate_local_udp(&mut ebpf, pin_dir);
        migrate_forwards(&mut ebpf, pin_dir);
        // The rules are rewritten from the forwards; an older layout's pin only goes.
        let _ = std::fs::remove_file(pin_dir.join(forwarder_common::FWD_RULES));
        // Settings are written whole at every start; an older layout's pin only goes.
        let _ = std::fs::remove_file(pin_dir.join(forwarder_common::FWD_GLOBAL));
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            adopted,
            attached: Vec::new(),
            egress: BTreeSet::new(),
            egress_wanted: BTreeSet::new(),
            local_cgroup: None,
            detach_on_drop: false,
        })
    }

    /// Makes dropping the instance detach everything and remove its pins (tests, and the
    /// default `run` exit).
    pub fn detach_on_drop(&mut self, yes: bool) {
        self.detach_on_drop = yes;
    }

    /// The pinned maps, for reading and writing state.
    pub fn state(&self) -> Result<State> {
        State::open(&self.pin_dir)
    }

    pub fn xdp(&self) -> &Xdp {
        self.ebpf.program(XDP_PROGRAM).expect("loaded").try_into().expect("XDP program")
    }

    pub fn tc_ingress(&self) -> &SchedClassifier {
        self.ebpf.program(TC_INGRESS_PROGRAM).expect("loaded").try_into().expect("TC program")
    }

    fn link_path(&self, kind: &str, target: &str) -> PathBuf {
        self.pin_dir.join(format!("link_{kind}_{}", target.replace('/', "_")))
    }

    /// Makes `prog_fd` the program of the pinned link at `path` if there is one (atomic swap);
    /// returns false when nothing is pinned there. A device's link (`ifindex` given) that
    /// is not on that device any more (the device was deleted, and perhaps created again
    /// under its name) is unpinned instead, and false returned: the kernel detached it
    /// with the old device and would refuse the swap (ENOLINK).
    fn update_pinned_link(path: &Path, prog_fd: std::os::fd::BorrowedFd<'_>, ifindex: Option<u32>) -> Result<bool> {
        if !path.exists() {
            return Ok(false);
        }
        let link = obj_get(path).map_err(|e| pin_err(path)(format!("BPF_OBJ_GET: {e}")))?;
        if let Some(want) = ifindex {
            let have = link_ifindex(link.as_fd()).map_err(|e| pin_err(path)(format!("BPF_OBJ_GET_INFO_BY_FD: {e}")))?;
            if let Some(have) = have
                && have != want
            {
                info!(path = %path.display(), was_on = have, now = want, "pinned link of a device that is gone: attaching anew");
                unpin_link(path);
                return Ok(false);
            }
        }
        link_update(link.as_fd(), prog_fd).map_err(|e| pin_err(path)(format!("BPF_LINK_UPDATE: {e}")))?;
        Ok(true)
    }

    /// Pins a fresh link so it outlives this process.
    fn pin_link(link: FdLink, path: &Path) -> Result<()> {
        let _ = std::fs::remove_file(path);
        link.pin(path).map_err(|e| pin_err(path)(e.to_string()))?;
        Ok(())
    }

    /// Attaches XDP (unless off) and the TC ingress program to an interface, or swaps the
    /// programs into the links an earlier instance pinned for it.
    pub fn attach(&mut self, iface: &Interface) -> Result<()> {
        let link = system::link(&iface.name)?;
        let (ifindex, is_veth, tc_peer) = (link.index, link.is_veth(), link.is_veth_to_elsewhere());
        let xdp_egress = match iface.redirect {
            RedirectMode::Xdp => true,
            RedirectMode::Tc => false,
            RedirectMode::Auto => !is_veth,
        };
        let ifname_err = |what: &str, e: &dyn std::fmt::Display| Error::Interface {
            name: iface.name.clone(),
            message: format!("{what}: {e}"),
        };
        // Native where the driver supports it, generic otherwise; `auto`: none on a veth.
        let mut mode = match iface.xdp {
            XdpMode::Auto if is_veth => XdpMode::Off,
            XdpMode::Auto => XdpMode::Native,
            m => m,
        };
        if mode != XdpMode::Off {
            let native_path = self.link_path("xdp_native", &iface.name);
            let generic_path = self.link_path("xdp_generic", &iface.name);
            let xdp: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?;
            let fd = xdp.fd().map_err(prog_err(XDP_PROGRAM))?.as_fd();
            if mode == XdpMode::Native
                && !native_path.exists()
                && Self::update_pinned_link(&generic_path, fd, Some(ifindex))?
            {
                mode = XdpMode::Generic; // an earlier instance fell back already
            } else if !Self::update_pinned_link(
                if mode == XdpMode::Native { &native_path } else { &generic_path },
                fd,
                Some(ifindex),
            )? {
                let attached = match xdp
                    .attach(&iface.name, if mode == XdpMode::Native { AyaXdpMode::Driver } else { AyaXdpMode::Skb })
                {
                    Err(e) if mode == XdpMode::Native => {
                        warn!(interface = %iface.name, "native XDP unavailable ({e}); using generic XDP");
                        mode = XdpMode::Generic;
                        xdp.attach(&iface.name, AyaXdpMode::Skb)
                    }
                    other => other,
                };
                let id = attached.map_err(|e| ifname_err(&format!("attaching XDP in {mode:?} mode"), &e))?;
                let link = xdp.take_link(id).map_err(prog_err(XDP_PROGRAM))?;
                let link: FdLink = link.try_into().map_err(|e| ifname_err("XDP link", &e))?;
                Self::pin_link(link, if mode == XdpMode::Native { &native_path } else { &generic_path })?;
            }
        }
        // An XDP link of another mode, pinned by an earlier config, goes.
        for other in [XdpMode::Native, XdpMode::Generic] {
            if other != mode {
                unpin_link(&self.link_path(&format!("xdp_{}", mode_name(other)), &iface.name));
            }
        }
        let flags = (if mode == XdpMode::Generic { IFACE_XDP_GENERIC } else { 0 })
            | (if xdp_egress { IFACE_XDP_EGRESS_OK } else { 0 })
            | (if tc_peer { IFACE_TC_PEER } else { 0 });
        self.state()?.set_egress(ifindex, flags)?;
        self.attach_tc(&iface.name, ifindex, TC_INGRESS_PROGRAM, TcAttachType::Ingress, "tcin")?;
        info!(interface = %iface.name, ifindex, xdp = ?mode, xdp_egress, veth = is_veth, tc_peer, "attached");
        self.attached.retain(|a| a.name != iface.name);
        self.attached.push(Attached {
            name: iface.name.clone(),
            ifindex,
            xdp: mode,
            xdp_egress,
            config: iface.clone(),
        });
        Ok(())
    }

    /// Records an optional interface whose device is missing: it is attached when the
    /// device appears ([`Instance::follow_links`]); `forwarder status` shows it with
    /// ifindex 0 meanwhile.
    pub fn defer(&mut self, iface: &Interface) {
        info!(interface = %iface.name, "optional interface not present: attached when it appears");
        self.attached.retain(|a| a.name != iface.name);
        self.attached.push(Attached {
            name: iface.name.clone(),
            ifindex: 0,
            xdp: iface.xdp,
            xdp_egress: false,
            config: iface.clone(),
        });
    }

    /// Follows the attached interfaces' devices: one that is gone (deleted, or moved to
    /// another namespace) loses its `FWD_IFACES` entry, as its programs went with it; a
    /// device that appears under an attached interface's name (a container's veth created
    /// again, say) is attached as its config entry says, egress included. Returns how many
    /// interfaces changed; run on link events (see `reconcile::routes`). An interface that
    /// cannot be attached is reported after the others were tried.
    pub fn follow_links(&mut self) -> Result<usize> {
        let mut changed = 0;
        let mut failed = None;
        for a in self.attached.clone() {
            let now = match crate::netlink::link(&a.name) {
                Ok(link) if link.index == a.ifindex => continue,
                Ok(link) => Some(link.index),
                Err(crate::netlink::Error::NoSuchLink(_)) if a.ifindex == 0 => continue,
                Err(crate::netlink::Error::NoSuchLink(_)) => None,
                Err(e) => return Err(e.into()),
            };
            changed += 1;
            if a.ifindex != 0 {
                self.state()?.remove_iface(a.ifindex)?;
            }
            let Some(ifindex) = now else {
                warn!(interface = %a.name, was = a.ifindex, "interface gone: attached again when it appears");
                self.egress.remove(&a.name);
                if let Some(entry) = self.attached.iter_mut().find(|e| e.name == a.name) {
                    entry.ifindex = 0;
                }
                continue;
            };
            info!(interface = %a.name, was = a.ifindex, ifindex, "interface appeared again: attaching");
            let attached = self
                .attach(&a.config)
                .and_then(|()| if self.egress_wanted.contains(&a.name) { self.attach_egress(&a.name) } else { Ok(()) });
            if let Err(e) = attached {
                warn!(interface = %a.name, "attaching again: {e}");
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }

    /// Brings each attached interface's `IFACE_TC_PEER` in line with where its veth's far
    /// end is now: the flag is computed at [`Instance::attach`], and a container's veth end
    /// is often moved into its namespace (or taken out, or deleted with it) after that. A
    /// stale flag on a veth whose far end is back in this namespace would make the kernel
    /// drop every packet TC sends into it. Other flag bits are kept. Returns how many
    /// interfaces changed; run on link events (see `reconcile::routes`).
    pub fn refresh_tc_peers(&self) -> Result<usize> {
        let state = self.state()?;
        let mut changed = 0;
        for a in self.attached.iter().filter(|a| a.ifindex != 0) {
            let tc_peer = match crate::netlink::link_by_index(a.ifindex) {
                Ok(link) => link.is_veth_to_elsewhere(),
                // Gone (deleted, or moved away itself): nothing is sent into it any more.
                Err(crate::netlink::Error::NoSuchLink(_)) => false,
                Err(e) => return Err(e.into()),
            };
            let Some(flags) = state.iface_flags(a.ifindex)? else { continue };
            let want = if tc_peer { flags | IFACE_TC_PEER } else { flags & !IFACE_TC_PEER };
            if want != flags {
                state.set_iface_flags(a.ifindex, want)?;
                changed += 1;
                let how = if tc_peer {
                    "veth's far end now in another namespace: TC sends into its ingress (bpf_redirect_peer)"
                } else {
                    "veth's far end no longer in another namespace: TC sends out of the device (bpf_redirect)"
                };
                info!(interface = %a.name, ifindex = a.ifindex, tc_peer, "{how}");
            }
        }
        Ok(changed)
    }

    fn attach_tc(
        &mut self,
        ifname: &str,
        ifindex: u32,
        prog: &'static str,
        dir: TcAttachType,
        kind: &str,
    ) -> Result<()> {
        let path = self.link_path(kind, ifname);
        let p: &mut SchedClassifier = program(&mut self.ebpf, prog)?;
        let fd = p.fd().map_err(prog_err(prog))?.as_fd();
        if Self::update_pinned_link(&path, fd, Some(ifindex))? {
            return Ok(());
        }
        // Only needed on kernels without tcx; harmless otherwise.
        let _ = tc::qdisc_add_clsact(ifname);
        let err = |e: &dyn std::fmt::Display| Error::Interface {
            name: ifname.to_string(),
            message: format!("attaching {prog}: {e}"),
        };
        let id = p.attach(ifname, dir).map_err(|e| err(&e))?;
        let link = p.take_link(id).map_err(prog_err(prog))?;
        let link: FdLink = link.try_into().map_err(|e| err(&e))?;
        Self::pin_link(link, &path)
    }

    /// Detaches from an interface that left the config (its `FWD_IFACES` entry goes in
    /// [`crate::reconcile::apply`], which keeps the entries of attached interfaces only).
    pub fn detach_interface(&mut self, ifname: &str) {
        for kind in ["xdp_native", "xdp_generic", "tcin"] {
            unpin_link(&self.link_path(kind, ifname));
        }
        self.attached.retain(|a| a.name != ifname);
        info!(interface = ifname, "detached");
    }

    /// Attaches the TC egress program (host traffic to peers, replies of backends on this
    /// host) to an interface.
    pub fn attach_egress(&mut self, ifname: &str) -> Result<()> {
        self.attach_tc(ifname, system::ifindex(ifname)?, TC_EGRESS_PROGRAM, TcAttachType::Egress, "tceg")?;
        if self.egress.insert(ifname.to_string()) {
            info!(interface = ifname, "egress attached");
        }
        Ok(())
    }

    pub fn detach_egress(&mut self, ifname: &str) {
        unpin_link(&self.link_path("tceg", ifname));
        self.egress.remove(ifname);
    }

    /// Names of interfaces with pinned links (attached by this or an earlier instance).
    pub fn pinned_interfaces(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for e in std::fs::read_dir(&self.pin_dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            for prefix in ["link_xdp_native_", "link_xdp_generic_", "link_tcin_"] {
                if let Some(ifname) = name.strip_prefix(prefix) {
                    out.insert(ifname.to_string());
                }
            }
        }
        out
    }

    /// Attaches the local-forward socket hooks to a cgroup v2 directory (they then apply to
    /// every process in it and below). bpf links stack, so instances and other tools coexist.
    pub fn attach_local(&mut self, cgroup: &Path) -> Result<()> {
        let file = std::fs::File::open(cgroup).map_err(|e| Error::Interface {
            name: cgroup.display().to_string(),
            message: format!("opening the cgroup: {e}"),
        })?;
        for name in LOCAL_PROGRAMS {
            let path = self.link_path("cg", name);
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let fd = p.fd().map_err(prog_err(name))?.as_fd();
            if Self::update_pinned_link(&path, fd, None)? {
                continue;
            }
            let err = |e: &dyn std::fmt::Display| Error::Interface {
                name: cgroup.display().to_string(),
                message: format!("attaching {name}: {e}"),
            };
            // Through a bpf link the attachment is multi by nature and the kernel refuses
            // link flags, so the mode must be the default.
            let id = p.attach(&file, CgroupAttachMode::Single).map_err(|e| err(&e))?;
            let link = p.take_link(id).map_err(prog_err(name))?;
            let link: FdLink = link.try_into().map_err(|e| err(&e))?;
            Self::pin_link(link, &path)?;
        }
        info!(cgroup = %cgroup.display(), "local forwards attached");
        self.local_cgroup = Some(cgroup.to_path_buf());
        Ok(())
    }

    pub fn detach_local(&mut self) {
        for name in LOCAL_PROGRAMS {
            unpin_link(&self.link_path("cg", name));
        }
        self.local_cgroup = None;
    }

    /// Removes every link and map this instance (or an earlier one) pinned: programs are
    /// detached as the last references go.
    pub fn detach(mut self) {
        self.detach_on_drop = true;
    }

    /// Ids of the loaded programs (for `forwarder status`).
    pub fn program_ids(&self) -> Vec<(String, u32)> {
        self.ebpf.programs().filter_map(|(name, p)| p.info().ok().map(|i| (name.to_string(), i.id()))).collect()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.detach_on_drop {
            restore_sysctls(&self.pin_dir);
            pins::remove(&self.pin_dir);
        }
    }
}

/// Undoes what an instance changed in its namespace's settings (`net.ipv4.conf.lo.accept_local`,
/// see `reconcile::apply`), before its pinned state goes. Only from the instance's own
/// namespace (its cookie in `FWD_GLOBAL_V2`): a clean-up run from elsewhere leaves every
/// other namespace's settings alone.
pub fn restore_sysctls(pin_dir: &Path) {
    use forwarder_common::GLOBAL_LO_ACCEPT_LOCAL;
    let Ok(global) = State::open(pin_dir).and_then(|s| s.global()) else { return };
    if global.flags & GLOBAL_LO_ACCEPT_LOCAL == 0 || system::netns_cookie().ok() != Some(global.netns_cookie) {
        return;
    }
    match system::set_lo_accept_local(false) {
        Ok(()) => info!("net.ipv4.conf.lo.accept_local turned off again"),
        Err(e) => warn!("net.ipv4.conf.lo.accept_local left on: {e}"),
    }
}

fn mode_name(m: XdpMode) -> &'static str {
    match m {
        XdpMode::Auto => "auto",
        XdpMode::Native => "native",
        XdpMode::Generic => "generic",
        XdpMode::Off => "off",
    }
}

/// Every program of the object, in the order they are loaded.
pub const PROGRAMS: [&str; 11] = [
    XDP_PROGRAM,
    TC_INGRESS_PROGRAM,
    TC_EGRESS_PROGRAM,
    LOCAL_PROGRAMS[0],
    LOCAL_PROGRAMS[1],
    LOCAL_PROGRAMS[2],
    LOCAL_PROGRAMS[3],
    LOCAL_PROGRAMS[4],
    LOCAL_PROGRAMS[5],
    LOCAL_PROGRAMS[6],
    LOCAL_PROGRAMS[7],
];

/// The kernel refuses a program whose verification walks more instructions than this
/// (E2BIG, "BPF program is too large").
pub const VERIFIER_LIMIT: u32 = 1_000_000;

/// The map capacities of `opts` and the kernel-side log level.
fn sized<'a>(loader: &mut EbpfLoader<'a>, opts: &'a LoadOptions) {
    loader
        .map_max_entries(forwarder_common::FWD_RULES_V2, opts.max_forwards.max(1))
        .map_max_entries(forwarder_common::FWD_PORT_RANGES, opts.max_forwards.max(1))
        .map_max_entries(forwarder_common::FWD_FWD_STATS, opts.max_forwards + 1)
        .map_max_entries(forwarder_common::FWD_FWD_DENIED, opts.max_forwards + 1)
        .map_max_entries(forwarder_common::FWD_META_V2, opts.max_forwards + 1)
        .map_max_entries(forwarder_common::FWD_MAGLEV, opts.max_forwards.max(1))
        .map_max_entries(forwarder_common::FWD_BACKENDS, opts.max_backends.max(1))
        .map_max_entries(forwarder_common::FWD_BE_STATS, opts.max_backends + 1)
        .map_max_entries(forwarder_common::FWD_CT_V4, opts.ct_entries)
        .override_global(aya_log::LEVEL, &opts.bpf_log_level, true);
}

/// Loads one program of the object into the kernel (the verifier checks it here).
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<()> {
    match name {
        XDP_PROGRAM => program::<Xdp>(ebpf, name)?.load(),
        TC_INGRESS_PROGRAM | TC_EGRESS_PROGRAM => program::<SchedClassifier>(ebpf, name)?.load(),
        _ => program::<CgroupSockAddr>(ebpf, name)?.load(),
    }
    .map_err(prog_err(name))
}

/// Logs how far the verifier walked the two packet programs (`verified_insns`), against its
/// budget: the headroom on this kernel, at every start.
fn log_verifier_walks(ebpf: &Ebpf) {
    let walked = |name| walk_of(ebpf, name).unwrap_or(0);
    info!(
        xdp = walked(XDP_PROGRAM),
        tc_ingress = walked(TC_INGRESS_PROGRAM),
        budget = VERIFIER_LIMIT,
        "programs loaded (instructions the verifier walked)"
    );
}

/// The instructions the verifier walked for a loaded program (`verified_insns`).
fn walk_of(ebpf: &Ebpf, name: &str) -> std::result::Result<u32, String> {
    let info = ebpf.program(name).expect("the object has every program").info();
    info.map_err(|e| e.to_string())?
        .verified_instruction_count()
        .ok_or_else(|| "the kernel does not report the instructions walked".to_string())
}

/// What the verifier made of one program: the instructions it walked, or why the kernel
/// refused the program.
#[derive(Debug)]
pub struct VerifierCost {
    pub program: &'static str,
    pub walked: std::result::Result<u32, String>,
}

/// One line: the program, and its walk against the budget or the kernel's refusal.
impl std::fmt::Display for VerifierCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.walked {
            Ok(n) => write!(
                f,
                "{:<24} {n:>9} instructions walked by the verifier ({:.0}% of its budget)",
                self.program,
                100.0 * *n as f64 / VERIFIER_LIMIT as f64
            ),
            Err(e) => write!(f, "{:<24} refused by the kernel: {e}", self.program),
        }
    }
}

/// Loads every program of the embedded object, each on its own and with maps of their own
/// (nothing pinned, nothing attached), and reports how far the verifier walked each: how
/// close the programs are to [`VERIFIER_LIMIT`] on this kernel. The walk depends on the
/// kernel's verifier and on the compiler's output, not only on the code.
pub fn verifier_costs(opts: &LoadOptions) -> Result<Vec<VerifierCost>> {
    let mut ebpf = {
        let mut loader = EbpfLoader::new();
        sized(&mut loader, opts);
        loader.load(crate::EBPF_OBJECT)?
    };
    let mut costs = Vec::new();
    for name in PROGRAMS {
        let walked =
            load_program(&mut ebpf, name).map_err(|e| refusal(&e.to_string())).and_then(|()| walk_of(&ebpf, name));
        costs.push(VerifierCost { program: name, walked });
    }
    Ok(costs)
}

/// A refused program's error, shortened to the verifier's verdict (what it refused, or that
/// the program is too large: the last line before its closing statistics) and its
/// "processed N insns" line; the full log runs to thousands of lines.
fn refusal(error: &str) -> String {
    let lines: Vec<&str> = error.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let Some(at) = lines.iter().rposition(|l| l.starts_with("processed ")) else {
        return error.chars().take(300).collect();
    };
    let statistics = |l: &&str| l.starts_with("verification time") || l.starts_with("stack depth");
    match lines[..at].iter().rev().find(|l| !statistics(l)) {
        Some(verdict) => format!("{verdict}; {}", lines[at]),
        None => lines[at].to_string(),
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name).expect("the object has every program").try_into().map_err(prog_err(name))
}

/// Carries the connections of a connection table pinned by an earlier version (`FWD_CT`,
/// 56-byte values without a next-hop cache, `FWD_CT_V2`, 80-byte values with state bits, or
/// `FWD_CT_V3`, 88-byte values without the creation time) into `FWD_CT_V4`, then removes the
/// old pin, so an upgrade in place keeps every tracked
/// connection. Each connection's state is derived from the bits of both its entries
/// ([`forwarder_common::CtValueV2::upgrade`]). Best effort: a table that cannot be read as
/// its layout is left where it is, with a warning.
fn migrate_conntrack(ebpf: &mut Ebpf, pin_dir: &Path) {
    use forwarder_common::{CtValueV1, CtValueV2, FWD_CT, FWD_CT_V2};
    migrate_conntrack_v3(ebpf, pin_dir);
    type Read = fn(&Path) -> std::result::Result<Vec<(forwarder_common::CtKey, CtValueV2)>, String>;
    let v1: Read = |p| Ok(read_pinned_table::<CtValueV1>(p)?.into_iter().map(|(k, v)| (k, v.into())).collect());
    for (name, read) in [(FWD_CT_V2, read_pinned_table::<CtValueV2> as Read), (FWD_CT, v1)] {
        let old_path = pin_dir.join(name);
        if !old_path.exists() {
            continue;
        }
        match read(&old_path).and_then(|old| insert_upgraded(ebpf, &old)) {
            Ok(moved) => {
                let _ = std::fs::remove_file(&old_path);
                info!(connections = moved, "connection table migrated from {name} to {}", forwarder_common::FWD_CT_V4);
            }
            Err(e) => warn!(path = %old_path.display(), "old connection table not migrated: {e}"),
        }
    }
}

/// `FWD_CT_V3` (88-byte values, no creation time) into the current table: each entry as it
/// was, its age unknown.
fn migrate_conntrack_v3(ebpf: &mut Ebpf, pin_dir: &Path) {
    use aya::maps::HashMap;
    use forwarder_common::{CT_DIR_ORIGINAL, CtKey, CtValue, CtValueV3, FWD_CT_V3, FWD_CT_V4};
    let old_path = pin_dir.join(FWD_CT_V3);
    if !old_path.exists() {
        return;
    }
    let moved = (|| -> std::result::Result<usize, String> {
        let old = read_pinned_table::<CtValueV3>(&old_path)?;
        let new = ebpf.map_mut(FWD_CT_V4).ok_or("no connection table in the object")?;
        let mut new: HashMap<_, CtKey, CtValue> = HashMap::try_from(new).map_err(|e| e.to_string())?;
        for (k, v) in &old {
            new.insert(k, v.upgrade(), 0).map_err(|e| e.to_string())?;
        }
        Ok(old.iter().filter(|(_, v)| v.direction == CT_DIR_ORIGINAL).count())
    })();
    match moved {
        Ok(n) => {
            let _ = std::fs::remove_file(&old_path);
            info!(connections = n, "connection table migrated from {FWD_CT_V3} to {FWD_CT_V4}");
        }
        Err(e) => warn!(path = %old_path.display(), "old connection table not migrated: {e}"),
    }
}

/// Carries the unconnected local UDP sockets of an earlier version's `FWD_LOCAL_UDP`
/// (values without the time of the last datagram) into the current map, as quiet
/// exchanges, and unpins it: programs keep seeing answers from the addresses they sent to.
fn migrate_local_udp(ebpf: &mut Ebpf, pin_dir: &Path) {
    use aya::maps::HashMap;
    use forwarder_common::{FWD_LOC_UDP_V2, FWD_LOCAL_UDP, LocalOrig, LocalUdpKey, LocalUdpOrig};
    let old_path = pin_dir.join(FWD_LOCAL_UDP);
    if !old_path.exists() {
        return;
    }
    let moved = (|| -> std::result::Result<usize, String> {
        let old = MapData::from_pin(&old_path).map_err(|e| e.to_string())?;
        let old: HashMap<_, LocalUdpKey, LocalOrig> =
            HashMap::try_from(aya::maps::Map::from_map_data(old).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        let entries: Vec<_> = old.iter().filter_map(|e| e.ok()).collect();
        let new = ebpf.map_mut(FWD_LOC_UDP_V2).ok_or("no local UDP map in the object")?;
        let mut new: HashMap<_, LocalUdpKey, LocalUdpOrig> = HashMap::try_from(new).map_err(|e| e.to_string())?;
        for (k, orig) in &entries {
            new.insert(k, LocalUdpOrig { orig: *orig, last_ns: 0 }, 0).map_err(|e| e.to_string())?;
        }
        Ok(entries.len())
    })();
    match moved {
        Ok(n) => {
            let _ = std::fs::remove_file(&old_path);
            info!(sockets = n, "local UDP sockets migrated from {FWD_LOCAL_UDP} to {FWD_LOC_UDP_V2}");
        }
        Err(e) => warn!(path = %old_path.display(), "old local UDP map not migrated: {e}"),
    }
}

/// Carries the forwards of a pinned `FWD_META` (one backend each, versions before several
/// backends) over into `FWD_META_V2` and `FWD_BACKENDS`, keeping their ids (so their
/// connections and CLI-added forwards stay theirs), and their rules into `FWD_RULES_V2` so
/// forwarding goes on until the config is applied. The backend's counter index is the
/// forward's id: unique, and within `limits.max_backends` as long as the forwards fit it.
fn migrate_forwards(ebpf: &mut Ebpf, pin_dir: &Path) {
    use aya::maps::{Array, HashMap};
    use forwarder_common::{
        BackendKey, BackendValue, FWD_BACKENDS, FWD_META, FWD_META_V2, FWD_RULES, FWD_RULES_V2, FwdKey, FwdMeta,
        FwdMetaV1, FwdValue, FwdValueV1,
    };
    let old_path = pin_dir.join(FWD_META);
    if !old_path.exists() {
        return;
    }
    let upgrade = |v: &FwdValueV1, listen_port_be: u16| FwdValue {
        backend_addr: v.backend_addr,
        snat_addr: v.snat_addr,
        backend_port_be: v.backend_port_be,
        family: v.family,
        snat_mode: v.snat_mode,
        forward_id: v.forward_id,
        flags: v.flags,
        backend_index: v.forward_id,
        table_id: 0,
        port_span: 0,
        listen_port_be,
    };
    let moved = (|| -> std::result::Result<usize, String> {
        let old = MapData::from_pin(&old_path).map_err(|e| e.to_string())?;
        let old: Array<_, FwdMetaV1> = Array::try_from(aya::maps::Map::from_map_data(old).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let metas: Vec<(u32, FwdMetaV1)> = (1..old.len())
            .filter_map(|id| old.get(&id, 0).ok().map(|m| (id, m)))
            .filter(|(_, m)| m.name[0] != 0)
            .collect();
        let mut meta: Array<_, FwdMeta> =
            Array::try_from(ebpf.map_mut(FWD_META_V2).ok_or("no FWD_META_V2")?).map_err(|e| e.to_string())?;
        for (id, m) in &metas {
            let value = upgrade(&m.value, m.key.port_be);
            let v2 = FwdMeta { name: m.name, key: m.key, value, health: Default::default() };
            meta.set(*id, v2, 0).map_err(|e| e.to_string())?;
        }
        let mut backends: HashMap<_, BackendKey, BackendValue> =
            HashMap::try_from(ebpf.map_mut(FWD_BACKENDS).ok_or("no FWD_BACKENDS")?).map_err(|e| e.to_string())?;
        for (id, m) in &metas {
            let v = &m.value;
            let b = BackendValue {
                addr: v.backend_addr,
                port_be: v.backend_port_be,
                family: v.family,
                state: 0,
                index: *id,
                weight: 1,
            };
            backends.insert(BackendKey { forward_id: *id, slot: 0 }, b, 0).map_err(|e| e.to_string())?;
        }
        if let Ok(old_rules) = MapData::from_pin(pin_dir.join(FWD_RULES)) {
            let old_rules: HashMap<_, FwdKey, FwdValueV1> =
                HashMap::try_from(aya::maps::Map::from_map_data(old_rules).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
            let mut rules: HashMap<_, FwdKey, FwdValue> =
                HashMap::try_from(ebpf.map_mut(FWD_RULES_V2).ok_or("no FWD_RULES_V2")?).map_err(|e| e.to_string())?;
            for (k, v) in old_rules.iter().filter_map(|e| e.ok()) {
                rules.insert(k, upgrade(&v, k.port_be), 0).map_err(|e| e.to_string())?;
            }
        }
        Ok(metas.len())
    })();
    match moved {
        Ok(n) => {
            let _ = std::fs::remove_file(&old_path);
            info!(forwards = n, "forwards migrated from {FWD_META} to {FWD_META_V2} and {FWD_BACKENDS}");
        }
        Err(e) => warn!(path = %old_path.display(), "old forwards not migrated: {e}"),
    }
}

fn read_pinned_table<V: aya::Pod>(path: &Path) -> std::result::Result<Vec<(forwarder_common::CtKey, V)>, String> {
    use aya::maps::HashMap;
    let old = MapData::from_pin(path).map_err(|e| e.to_string())?;
    let old: HashMap<_, forwarder_common::CtKey, V> =
        HashMap::try_from(aya::maps::Map::from_map_data(old).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    old.iter().map(|e| e.map_err(|e| e.to_string())).collect()
}

/// Inserts V2 entries as V3 ones; returns the connections moved.
fn insert_upgraded(
    ebpf: &mut Ebpf,
    old: &[(forwarder_common::CtKey, forwarder_common::CtValueV2)],
) -> std::result::Result<usize, String> {
    use aya::maps::HashMap;
    use forwarder_common::{CT_DIR_ORIGINAL, CtKey, CtValue, FWD_CT_V4, PROTO_TCP};
    let by_key: std::collections::HashMap<CtKey, u8> = old.iter().map(|(k, v)| (*k, v.state)).collect();
    let new = ebpf.map_mut(FWD_CT_V4).ok_or("no connection table in the object")?;
    let mut new: HashMap<_, CtKey, CtValue> = HashMap::try_from(new).map_err(|e| e.to_string())?;
    let mut moved = 0;
    for (k, v) in old {
        // The other entry of the connection: the rewritten tuple, reversed.
        let other = CtKey {
            src_addr: v.new_dst_addr,
            dst_addr: v.new_src_addr,
            src_port_be: v.new_dst_port_be,
            dst_port_be: v.new_src_port_be,
            ..*k
        };
        let bits = v.state | by_key.get(&other).copied().unwrap_or(0);
        new.insert(k, v.upgrade(k.proto == PROTO_TCP, bits).upgrade(), 0).map_err(|e| e.to_string())?;
        moved += (v.direction == CT_DIR_ORIGINAL) as usize;
    }
    Ok(moved)
}

pub fn warn_if_forwarding_disabled() {
    if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").map(|s| s.trim() == "0").unwrap_or(false) {
        warn!(
            "net.ipv4.ip_forward is 0 in this network namespace: forwarded packets will be dropped by the kernel (sysctl -w net.ipv4.ip_forward=1)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::refusal;

    #[test]
    fn a_refusal_is_the_verdict_and_the_walk() {
        let log = "BPF program forwarder_xdp: the BPF_PROG_LOAD syscall returned Argument list too long \
                   (os error 7). Verifier output: 0: R1=ctx() R10=fp0\n9095: (6b) *(u16 *)(r5 +72) = r3\n\
                   BPF program is too large. Processed 1000001 insn\nverification time 9038611 usec\n\
                   stack depth 8+0+216\nprocessed 1000001 insns (limit 1000000) max_states_per_insn 60\n";
        assert_eq!(
            refusal(log),
            "BPF program is too large. Processed 1000001 insn; \
             processed 1000001 insns (limit 1000000) max_states_per_insn 60"
        );
        let log = "...\n12: (61) r0 = *(u32 *)(r1 +0)\nR1 invalid mem access 'scalar'\n\
                   verification time 10 usec\nstack depth 8\nprocessed 13 insns (limit 1000000)\n";
        assert_eq!(refusal(log), "R1 invalid mem access 'scalar'; processed 13 insns (limit 1000000)");
        assert_eq!(refusal("map creation failed"), "map creation failed");
    }
}
