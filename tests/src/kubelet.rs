//! A ConfigMap volume laid out as kubelet lays it out, and updated as kubelet updates it.
//!
//! kubelet's atomic writer keeps each version of the data in a timestamped directory,
//! points `..data` at the current one, and makes every key a symlink through `..data`:
//!
//! ```text
//! DIR/..2026_11_25_16_08_03.123456789/forwarder.toml
//! DIR/..data -> ..2026_11_25_16_08_03.123456789
//! DIR/forwarder.toml -> ..data/forwarder.toml
//! ```
//! An update writes a new timestamped directory, renames a fresh symlink onto `..data`
//! (one atomic swap for every key at once) and removes the old directory. The key's own
//! symlink never changes, so a reader that watches the path sees only the content change.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

pub struct ConfigMapVolume {
    pub dir: PathBuf,
}

impl ConfigMapVolume {
    /// Lays out `files` (key, content) in `dir`, which is created and removed on drop.
    pub fn new(dir: &Path, files: &[(&str, &str)]) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let volume = Self { dir: dir.to_path_buf() };
        volume.update(files)?;
        for (key, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(key), dir.join(key))?;
        }
        Ok(volume)
    }

    /// The path a container reads `key` at.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Replaces the content of every key in one atomic `..data` swap.
    pub fn update(&self, files: &[(&str, &str)]) -> Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let version = format!("..{}.{:09}", now.as_secs(), now.subsec_nanos());
        std::fs::create_dir(self.dir.join(&version))?;
        for (key, content) in files {
            std::fs::write(self.dir.join(&version).join(key), content)?;
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        std::os::unix::fs::symlink(&version, self.dir.join("..data_tmp"))?;
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data"))?;
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old))?;
        }
        Ok(())
    }
}

impl Drop for ConfigMapVolume {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
