//! The raw bpf(2) commands aya 0.14 does not offer, in one place (as Katran's BpfAdapter
//! keeps its syscalls): batched map reads, writes and deletes, opening a pinned object,
//! and swapping the program of a link.
//!
//! Batches (BPF_MAP_*_BATCH, Linux 5.6+) make one call per chunk of entries instead of one
//! per entry, which is what makes applying 100k forwards fast. Callers fall back to aya's
//! per-entry operations when a batch call fails (older kernels, map types without batch
//! support), so errors still surface the usual way.

use std::{
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per call: bounds the buffers and the time the kernel spends in one call.
const CHUNK: usize = 8192;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: attr is a complete `batch` member of bpf_attr whose pointers the callers keep
    // valid (and sized for `count` entries) for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Writes `keys[i] -> values[i]` (BPF_ANY) in chunks. On failure returns how many entries
/// are known to be written (a whole number of chunks) with the error; the caller writes the
/// rest one by one (rewriting an entry is harmless).
pub fn update_batch<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, std::io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    // SAFETY: Pod values are plain bytes, laid out back to back.
    let bytes = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) };
    update_batch_bytes(map, keys, bytes, std::mem::size_of::<V>())
}

/// [`update_batch`] with the values as bytes, `value_size` each: for per-CPU maps, whose
/// value is one per possible CPU, each rounded up to 8 bytes, back to back.
pub fn update_batch_bytes<K: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
    value_size: usize,
) -> Result<(), (usize, std::io::Error)> {
    assert_eq!(keys.len() * value_size, values.len(), "one value per key");
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(CHUNK);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done * value_size..].as_ptr() as u64,
            count: n as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr).map_err(|e| (done, e))?;
        done += n;
    }
    Ok(())
}

/// Deletes `keys` in chunks. On failure (a key already gone, say) returns how many are
/// known to be deleted, in order, with the error; the caller deletes the rest one by one.
pub fn delete_batch<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), (usize, std::io::Error)> {
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(CHUNK);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            count: n as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // On a missing key the kernel leaves in `count` how many of this chunk it deleted;
        // on any other error nothing is known (deleting again is harmless).
        bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr).map_err(|e| {
            let deleted = if e.raw_os_error() == Some(libc::ENOENT) { (attr.count as usize).min(n) } else { 0 };
            (done + deleted, e)
        })?;
        done += n;
    }
    Ok(())
}

/// Every entry of a hash or array map, in the kernel's iteration order.
pub fn lookup_all_batched<K: Pod, V: Pod>(map: BorrowedFd<'_>) -> std::io::Result<Vec<(K, V)>> {
    // SAFETY: Pod types are plain data for which all-zero bytes are a valid value.
    let (mut keys, mut values): (Vec<K>, Vec<V>) =
        unsafe { (vec![std::mem::zeroed(); CHUNK], vec![std::mem::zeroed(); CHUNK]) };
    // The position token: a u32 bucket for hash maps, a key for the others.
    let token_len = std::mem::size_of::<K>().max(8);
    let (mut token_in, mut token_out) = (vec![0u8; token_len], vec![0u8; token_len]);
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_mut_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let last = match bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => false,
            // The end of the map: `count` holds the entries of this last call.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let n = (attr.count as usize).min(CHUNK);
        if n == 0 && !last {
            return Err(std::io::Error::other("BPF_MAP_LOOKUP_BATCH made no progress"));
        }
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if last {
            return Ok(out);
        }
        token_in.copy_from_slice(&token_out);
        first = false;
    }
}

/// BPF_OBJ_GET: opens a pinned object (a link here; aya opens pinned maps itself).
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // union bpf_attr, obj member: pathname (u64), bpf_fd, file_flags, path_fd.
    let mut attr = [0u64; 16];
    attr[0] = cpath.as_ptr() as u64;
    // SAFETY: attr is a zeroed bpf_attr of the advertised size; cpath outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_UPDATE: atomically replaces the program of a link (XDP, tcx and cgroup links
/// support it). aya offers it per program type only; one raw call serves all three.
pub fn link_update(link: BorrowedFd<'_>, prog_fd: BorrowedFd<'_>) -> std::io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    // union bpf_attr, link_update member: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut attr = [0u32; 32];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = prog_fd.as_raw_fd() as u32;
    // SAFETY: attr is a zeroed bpf_attr of the advertised size with the link_update fields set.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// The device of an XDP or tcx link (BPF_OBJ_GET_INFO_BY_FD): `Some(0)` once the device
/// is gone (the kernel detaches such links but their pins live on), `None` for a link of
/// another kind.
pub fn link_ifindex(link: BorrowedFd<'_>) -> std::io::Result<Option<u32>> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    const BPF_LINK_TYPE_TCX: u32 = 11;
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose xdp and tcx
    // members start with the ifindex.
    let mut info = [0u32; 16];
    // union bpf_attr, info member.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
        rest: [u64; 6],
    }
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
        rest: [0; 6],
    };
    // SAFETY: attr is a zeroed bpf_attr with the info fields set; info outlives the call
    // and is as large as info_len says.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &mut attr as *mut InfoAttr, std::mem::size_of_val(&attr))
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(matches!(info[0], BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX).then_some(info[4]))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn failures_report_progress_for_the_fallback() {
        // Not a map: the first chunk fails, nothing is known to be written.
        let f = std::fs::File::open("/dev/null").unwrap();
        let keys: Vec<u32> = (0..10_000).collect();
        let (done, e) = update_batch(f.as_fd(), &keys, &keys).unwrap_err();
        assert_eq!(done, 0);
        assert!(e.raw_os_error().is_some(), "{e}");
        assert!(lookup_all_batched::<u32, u32>(f.as_fd()).is_err());
        assert_eq!(delete_batch(f.as_fd(), &keys).unwrap_err().0, 0);
        // Nothing to write: no call at all.
        assert!(update_batch::<u32, u32>(f.as_fd(), &[], &[]).is_ok());
    }
}
