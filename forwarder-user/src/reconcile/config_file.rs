//! Noticing that the config file changed (kubelet swaps a symlink; an editor rewrites the
//! file; a generator replaces it): a cheap [`ConfigStamp`] every tick, the content compared
//! only when the stamp moved, and every [`FULL_CHECK_TICKS`] ticks regardless.

use std::path::{Path, PathBuf};

/// How often the daemon checks the config file.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Every this many checks the content is compared even with an unchanged stamp: two writes
/// of the same length within one tick of the file system's coarse clock can leave the
/// times as they were.
const FULL_CHECK_TICKS: u64 = 30;

/// The config file as last applied (or refused).
pub struct ConfigFile {
    path: PathBuf,
    stamp: Option<ConfigStamp>,
    text: Vec<u8>,
    checks: u64,
}

impl ConfigFile {
    /// The file as it is now, taken as applied.
    pub fn new(path: &Path) -> Self {
        let mut f = Self { path: path.to_path_buf(), stamp: None, text: Vec::new(), checks: 0 };
        f.taken();
        f
    }

    /// One check: true when the content differs from what was last taken. Reads the file
    /// only when its stamp moved (or at a full check), so an idle daemon with 100k forwards
    /// does not read megabytes a second.
    pub fn changed(&mut self) -> bool {
        let stamp = ConfigStamp::of(&self.path);
        self.checks += 1;
        (stamp != self.stamp || self.checks.is_multiple_of(FULL_CHECK_TICKS)) && {
            self.stamp = stamp;
            std::fs::read(&self.path).unwrap_or_default() != self.text
        }
    }

    /// Takes the file as it is now as the applied one (after a reload, applied or refused:
    /// a refused file is not tried again until it changes).
    pub fn taken(&mut self) {
        self.stamp = ConfigStamp::of(&self.path);
        self.text = std::fs::read(&self.path).unwrap_or_default();
    }
}

/// What changes whenever a file's content may have: which file (device, inode: a swapped
/// symlink or a replaced file), its length, and its modification and change times (ctime
/// moves on every write and cannot be set back, unlike mtime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ConfigStamp {
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{ConfigFile, ConfigStamp, FULL_CHECK_TICKS};

    #[test]
    fn a_config_file_is_changed_only_when_its_content_moved() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("forwarder.toml");
        std::fs::write(&path, "a = 1\n").unwrap();
        let mut file = ConfigFile::new(&path);
        assert!(!file.changed(), "as taken");
        // A new file with the same content (a swapped symlink, a rewrite): not a change.
        let other = tmp.path().join("other.toml");
        std::fs::write(&other, "a = 1\n").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(!file.changed(), "same content");
        std::fs::write(&other, "a = 2\n").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(file.changed(), "new content in a new file");
        file.taken();
        assert!(!file.changed(), "taken");
        // Same length, written within the clock's tick: found at the next full check.
        std::fs::write(&path, "a = 3\n").unwrap();
        let found = (0..FULL_CHECK_TICKS).any(|_| file.changed());
        assert!(found, "a same-length rewrite is found within {FULL_CHECK_TICKS} checks");
    }

    #[test]
    fn a_config_stamp_moves_with_the_content_and_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (path, other) = (dir.join("forwarder.toml"), dir.join("other.toml"));
        std::fs::write(&path, "a = 1\n").unwrap();
        let first = ConfigStamp::of(&path).unwrap();
        assert_eq!(ConfigStamp::of(&path), Some(first), "unchanged");
        std::thread::sleep(std::time::Duration::from_millis(20)); // past the coarse clock's tick
        std::fs::write(&path, "a = 2\n").unwrap();
        let rewritten = ConfigStamp::of(&path).unwrap();
        assert_ne!(rewritten, first, "same length, new content");
        std::fs::write(&other, "a = 2\n").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_ne!(ConfigStamp::of(&path).unwrap(), rewritten, "replaced by another file");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(ConfigStamp::of(&path), None, "gone");
    }
}
