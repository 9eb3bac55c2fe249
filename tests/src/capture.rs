//! Frames as a device in a test namespace received them, with the kernel's word on their
//! checksums: a packet socket with PACKET_AUXDATA. A receiving stack trusts what a veth
//! marks verified, so a checksum a router wrote wrongly can pass unnoticed end to end; the
//! capture lets a test check every frame on the wire itself.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result, bail};

use crate::Netns;

/// One received frame and its packet-socket status (`libc::TP_STATUS_*`).
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub status: u32,
}

impl Frame {
    /// The skb was CHECKSUM_PARTIAL: its L4 checksum field holds the pseudo-header seed,
    /// for the device (or software) to finish.
    pub fn checksum_partial(&self) -> bool {
        self.status & libc::TP_STATUS_CSUMNOTREADY != 0
    }

    /// The skb's checksums were marked verified (CHECKSUM_UNNECESSARY or equivalent).
    pub fn checksum_marked_valid(&self) -> bool {
        self.status & libc::TP_STATUS_CSUM_VALID != 0
    }
}

/// A capture of the frames `dev` receives (not those it sends), running until
/// [`Capture::stop`].
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<Frame>>>>,
}

/// How long a read waits before it looks at the stop flag again.
const POLL_MS: libc::suseconds_t = 50_000;

impl Capture {
    /// Starts capturing on `dev` in `ns`; returns once the socket is bound, so every frame
    /// after this call is seen.
    pub fn start(ns: &Netns, dev: &str) -> Result<Self> {
        let ifindex = ns.ifindex(dev)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = ns.spawn(move || {
            let fd = match open(ifindex) {
                Ok(fd) => {
                    let _ = ready_tx.send(Ok(()));
                    fd
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            let mut frames = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(f) = receive(&fd)? {
                    frames.push(f);
                }
            }
            // What arrived before the stop is queued: take it too.
            while let Some(f) = receive(&fd)? {
                frames.push(f);
            }
            Ok(frames)
        })?;
        ready
            .recv_timeout(std::time::Duration::from_secs(5))
            .context("capture did not start")?
            .map_err(|e| anyhow::anyhow!("capture on {dev}: {e}"))?;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Stops and returns every frame received, in order.
    pub fn stop(mut self) -> Result<Vec<Frame>> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("stopped once");
        t.join().map_err(|e| anyhow::anyhow!("capture thread panicked: {e:?}"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A packet socket for every protocol on `ifindex`, with auxiliary data, a read timeout and
/// a buffer large enough for a test's bursts.
fn open(ifindex: u32) -> Result<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
    // SAFETY: plain socket calls with valid arguments; the fd is owned from here on.
    unsafe {
        let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, all);
        check(raw, "packet socket")?;
        let fd = OwnedFd::from_raw_fd(raw);
        let on: libc::c_int = 1;
        let int_len = size_of::<libc::c_int>() as libc::socklen_t;
        check(
            libc::setsockopt(raw, libc::SOL_PACKET, libc::PACKET_AUXDATA, (&on as *const libc::c_int).cast(), int_len),
            "PACKET_AUXDATA",
        )?;
        let buf: libc::c_int = 16 << 20;
        check(
            libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&buf as *const libc::c_int).cast(), int_len),
            "SO_RCVBUFFORCE",
        )?;
        let tv = libc::timeval { tv_sec: 0, tv_usec: POLL_MS };
        check(
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            ),
            "SO_RCVTIMEO",
        )?;
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all as u16;
        addr.sll_ifindex = ifindex as i32;
        check(
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            ),
            "bind",
        )?;
        Ok(fd)
    }
}

/// The next received frame, `None` when the read timed out. Frames the device sent are
/// read and passed over.
fn receive(fd: &OwnedFd) -> Result<Option<Frame>> {
    loop {
        let mut bytes = vec![0u8; 65536 + 128];
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut control = [0u64; 16];
        let mut iov = libc::iovec { iov_base: bytes.as_mut_ptr().cast(), iov_len: bytes.len() };
        let mut status = 0;
        // SAFETY: a msghdr of buffers that outlive the call; control messages walked with
        // the CMSG macros within msg_controllen.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = size_of_val(&control);
            let n = libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC);
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while n >= 0 && !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                    let aux: libc::tpacket_auxdata = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    status = aux.tp_status;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            n
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => {
                    Ok(None)
                }
                _ => Err(e).context("recvmsg on the packet socket"),
            };
        }
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let len = n as usize;
        if len > bytes.len() {
            bail!("frame of {len} bytes, more than the capture's buffer");
        }
        bytes.truncate(len);
        return Ok(Some(Frame { bytes, status }));
    }
}
