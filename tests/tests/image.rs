//! The container image (issue 18), built here with buildah and no registry from the debug
//! binary, as `cargo xtask image` builds it from a release one: its config (entrypoint,
//! labels), its files (the binary and exactly the libraries it links, nothing else), its
//! size, the DaemonSet's command path, and the entrypoint run from the image's own root
//! with the DaemonSet's capabilities only.

use std::{path::Path, process::Command};

use forwarder_tests::{daemon::forwarder_bin, image, netns::run_ok};

/// The image's root, mounted by buildah, unmounted and removed on drop.
struct Mounted {
    storage: std::path::PathBuf,
    container: String,
    root: std::path::PathBuf,
}

impl Mounted {
    fn new(storage: &Path, reference: &str) -> Self {
        let container = run_ok(image::buildah(storage).args(["from", "--quiet", "--pull-never", reference])).unwrap();
        let container = container.trim().to_string();
        let root = run_ok(image::buildah(storage).args(["mount", &container])).unwrap();
        Self { storage: storage.to_path_buf(), container, root: root.trim().into() }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = run_ok(image::buildah(&self.storage).args(["umount", &self.container]));
        let _ = run_ok(image::buildah(&self.storage).args(["rm", &self.container]));
    }
}

fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else {
                out.push(format!("/{}", p.strip_prefix(root).unwrap().display()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn container_image_from_scratch() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let built = image::build(&forwarder_bin(), &storage, work.path()).unwrap();
    assert_eq!(built.reference, format!("localhost/forwarder:{}", env!("CARGO_PKG_VERSION")));

    // Config: entrypoint at the DaemonSet's command path, labels.
    let inspect: serde_json::Value = serde_json::from_str(
        &run_ok(image::buildah(&storage).args(["inspect", "--type", "image", &built.reference])).unwrap(),
    )
    .unwrap();
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["Entrypoint"], serde_json::json!([image::BINARY_PATH]), "{config}");
    assert_eq!(config["Labels"]["org.opencontainers.image.title"], "forwarder");
    assert_eq!(config["Labels"]["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"));
    let daemonset =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/daemonset.yaml")).unwrap();
    assert!(daemonset.contains(&format!("- {}", image::BINARY_PATH)), "the DaemonSet runs the image's binary path");
    let layers = inspect["OCIv1"]["rootfs"]["diff_ids"].as_array().unwrap().len();
    assert_eq!(layers, 1, "one layer of our files, no base image's");

    // Files: the binary and its libraries, nothing else (FROM scratch).
    let mounted = Mounted::new(&storage, &built.reference);
    let mut want: Vec<String> = built.files.iter().map(|(to, _)| to.clone()).collect();
    want.sort();
    assert_eq!(files_under(&mounted.root), want);
    assert!(want.iter().any(|f| f.contains("libc.so")), "libc is in: {want:?}");
    let size: u64 =
        files_under(&mounted.root).iter().map(|f| std::fs::metadata(mounted.root.join(&f[1..])).unwrap().len()).sum();
    println!(
        "image files {:.1} MiB, archive {:.1} MiB",
        size as f64 / 1048576.0,
        std::fs::metadata(&built.archive).unwrap().len() as f64 / 1048576.0
    );
    assert!(size < 64 << 20, "the image stays small: {size} bytes");
    assert!(std::fs::metadata(&built.archive).unwrap().len() > 1 << 20, "the OCI archive holds the layers");

    // The entrypoint, from the image's own root, with only the DaemonSet's capabilities
    // (BPF, NET_ADMIN, PERFMON; chroot needs SYS_CHROOT to get there).
    let config_dir = mounted.root.join("etc/forwarder");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("forwarder.toml"),
        "[[forward]]\nname = \"mysql\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:3306\"\nbackend = \"203.0.113.20:3197\"\n",
    )
    .unwrap();
    let in_image = |args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--bounding-set=-all,+bpf,+net_admin,+perfmon,+sys_chroot", "--inh-caps=-all", "chroot"])
            .arg(&mounted.root)
            .arg(image::BINARY_PATH)
            .args(args);
        run_ok(&mut c).unwrap()
    };
    assert_eq!(in_image(&["--version"]).trim(), format!("forwarder {}", env!("CARGO_PKG_VERSION")));
    let check = in_image(&["check", "--config", "/etc/forwarder/forwarder.toml"]);
    assert!(check.contains("1 forwards"), "{check}");
}
