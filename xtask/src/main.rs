//! Project tasks: `cargo xtask demo` (the README's main job), `cargo xtask bench` and
//! `cargo xtask deb`.

mod bench;
mod demo;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build, create a namespace sandbox, run forwarder with the classic forward
    /// (tcp :3306 → backend :3197), drive traffic, show live counters, remove the sandbox.
    Demo {
        /// Client connections to make.
        #[arg(long, default_value_t = 20)]
        connections: usize,
    },
    /// Measure forwarder beside plain routing, iptables, nftables, socat and a redirect-only
    /// XDP ceiling on the same namespace topology; write docs/bench/ and the README table.
    Bench {
        /// Short run (about 2.5 minutes): shorter figures, rule scaling to 1k forwards.
        #[arg(long)]
        quick: bool,
        /// Repetitions (default: 2 quick, 5 full).
        #[arg(long)]
        reps: Option<usize>,
        /// Only these contenders (comma-separated ids, e.g. iptables,forwarder-xdp-native).
        #[arg(long, value_delimiter = ',')]
        contenders: Vec<String>,
        /// Skip the rule-scaling figures.
        #[arg(long)]
        no_scaling: bool,
        /// Only these parts (comma-separated: figures, many-backends, scaling, testrun;
        /// default all). The many-backends ratios to one backend need `figures` of the same
        /// contenders in the run.
        #[arg(long, value_enum, value_delimiter = ',')]
        parts: Vec<bench::Part>,
        /// Only these workloads of the figures part (comma-separated: udp, ipv6, tcp,
        /// new-flows, veth-defaults; default all).
        #[arg(long, value_enum, value_delimiter = ',')]
        workloads: Vec<bench::Workload>,
        /// Rule scaling at these numbers of forwards only (comma-separated; default 1,1000
        /// quick, 1,1000,10000,100000 full).
        #[arg(long, value_delimiter = ',')]
        scaling_sizes: Vec<usize>,
        /// Output directory (default: docs/bench and the README table for a full run,
        /// target/bench-quick for --quick or --parts).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Build the container image the DaemonSet runs (buildah, FROM scratch: the binary and
    /// the shared libraries it links) as target/image/forwarder-VERSION.oci.tar, with no
    /// registry; buildah's storage stays under target/image.
    Image {
        /// Package this binary instead of a fresh release build.
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
    },
    /// Build the Debian package (binary, systemd units, conffile, man pages, completions)
    /// into target/debian/forwarder_VERSION_ARCH.deb.
    Deb {
        /// Package this binary instead of a fresh release build.
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
        /// Output directory (default: target/debian).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo { connections } => demo::run(connections),
        Task::Image { binary } => {
            let binary = binary.map_or_else(release_binary, Ok)?;
            let dir = target_dir().join("image");
            let image = forwarder_tests::image::build(&binary, &dir.join("storage"), &dir)?;
            println!("{} (in buildah storage {})", image.reference, dir.join("storage").display());
            println!("{}", image.archive.display());
            Ok(())
        }
        Task::Deb { binary, out } => {
            let binary = binary.map_or_else(release_binary, Ok)?;
            let deb = forwarder_tests::deb::build(&binary, &out.unwrap_or_else(|| target_dir().join("debian")))?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Bench { quick, reps, contenders, no_scaling, parts, workloads, scaling_sizes, out } => {
            let mut plan = if quick { bench::Plan::quick(reps) } else { bench::Plan::full(reps) };
            // A run of chosen parts, workloads or sizes is never the project's record.
            let partial = !parts.is_empty() || !workloads.is_empty() || !scaling_sizes.is_empty();
            let workloads =
                if workloads.is_empty() { bench::Workload::ALL.into() } else { workloads.into_iter().collect() };
            if !scaling_sizes.is_empty() {
                plan.scaling_sizes = scaling_sizes;
            }
            build_forwarder()?;
            if plan.forwarder_release {
                let status = std::process::Command::new(env!("CARGO"))
                    .args(["build", "--quiet", "--release", "--package", "forwarder-user"])
                    .status()?;
                anyhow::ensure!(status.success(), "building forwarder (release) failed");
                let bin = target_dir().join("release/forwarder");
                // SAFETY: no other thread exists yet.
                unsafe { std::env::set_var("FORWARDER_BIN", bin) };
            }
            let contenders = if contenders.is_empty() {
                bench::contenders::Contender::ALL.to_vec()
            } else {
                contenders
                    .iter()
                    .map(|id| {
                        bench::contenders::Contender::from_id(id)
                            .ok_or_else(|| anyhow::anyhow!("unknown contender {id:?}"))
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            let all_parts =
                [bench::Part::Figures, bench::Part::ManyBackends, bench::Part::Scaling, bench::Part::Testrun];
            let mut parts: std::collections::BTreeSet<_> =
                if parts.is_empty() { all_parts.into() } else { parts.into_iter().collect() };
            if no_scaling {
                parts.remove(&bench::Part::Scaling);
            }
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            // Only a full run is the project's record (docs/bench and the README table).
            let record = out.is_none() && !quick && !partial;
            let update_readme = record.then(|| root.join("README.md"));
            let default_out = if quick || partial { root.join("target/bench-quick") } else { root.join("docs/bench") };
            let out_dir = out.unwrap_or(default_out);
            let results = bench::run(bench::Options {
                plan,
                contenders,
                parts,
                workloads,
                out_dir: out_dir.clone(),
                update_readme,
            })?;
            println!("{}", bench::report::headline_table(&results));
            println!("written: {}", out_dir.display());
            Ok(())
        }
    }
}

/// A fresh release build of the binary.
fn release_binary() -> anyhow::Result<std::path::PathBuf> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--release", "--package", "forwarder-user"])
        .status()?;
    anyhow::ensure!(status.success(), "building forwarder (release) failed");
    Ok(target_dir().join("release/forwarder"))
}

/// Cargo's target directory: $CARGO_TARGET_DIR (relative to the current directory, as cargo
/// reads it), else the workspace's `target`.
fn target_dir() -> std::path::PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::env::current_dir().unwrap_or_default().join(dir),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// Builds the `forwarder` binary (and its embedded kernel object) if anything changed, and
/// points $FORWARDER_BIN at it (in cargo's target directory, wherever that is) unless the
/// caller named a binary. Call before any thread exists.
pub fn build_forwarder() -> anyhow::Result<()> {
    let status =
        std::process::Command::new(env!("CARGO")).args(["build", "--quiet", "--package", "forwarder-user"]).status()?;
    anyhow::ensure!(status.success(), "building forwarder failed");
    if std::env::var_os("FORWARDER_BIN").is_none() {
        // SAFETY: the caller runs this before starting any thread.
        unsafe { std::env::set_var("FORWARDER_BIN", target_dir().join("debug/forwarder")) };
    }
    Ok(())
}
