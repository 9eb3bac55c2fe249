use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config: {0}")]
    Syntax(String),
    #[error("config line {line}: {field}: {message}")]
    Invalid { line: usize, field: String, message: String },
}

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("BPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("interface {name}: {message}")]
    Interface { name: String, message: String },
    #[error("pin path {path}: {message}")]
    PinPath { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Netlink(#[from] crate::netlink::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
