//! Project tasks: `cargo xtask demo` (the README's main job).

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo { connections } => demo::run(connections),
    }
}

/// Builds the `forwarder` binary (and its embedded kernel object) if anything changed.
pub fn build_forwarder() -> anyhow::Result<()> {
    let status =
        std::process::Command::new(env!("CARGO")).args(["build", "--quiet", "--package", "forwarder-user"]).status()?;
    anyhow::ensure!(status.success(), "building forwarder failed");
    Ok(())
}
