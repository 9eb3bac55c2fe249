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
    /// A live edit (`forward add`, `peer del`, ...) refused: the flag it concerns, if one.
    #[error("{}{message}", field.map(|f| format!("--{f}: ")).unwrap_or_default())]
    Edit { field: Option<&'static str>, message: String },
    /// Nothing pinned at the pin path, or the daemon that pinned it is gone.
    #[error("pin path {path}: {message}")]
    NoInstance { path: String, message: String },
    #[error(transparent)]
    Netlink(#[from] crate::netlink::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<crate::config::FieldError> for Error {
    fn from(e: crate::config::FieldError) -> Self {
        match e.backend {
            Some(i) => {
                Error::Edit { field: Some("backend"), message: format!("backend {i}: {}: {}", e.field, e.message) }
            }
            None => Error::Edit { field: Some(e.field), message: e.message },
        }
    }
}

/// What a failed command reports: the class of failure (its exit code), the message and,
/// for config and edit errors, where.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// "usage" (exit 2), "config" or "edit" (exit 3), "no_instance" (exit 4), "error" (exit 1).
    pub kind: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Exit codes of the `forwarder` command (README, "Command line").
pub mod exit {
    pub const OK: u8 = 0;
    pub const OTHER: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const INVALID: u8 = 3;
    pub const NO_INSTANCE: u8 = 4;
}

impl Report {
    /// Classifies an error by the first [`Error`] or [`ConfigError`] in its chain.
    pub fn of(e: &anyhow::Error) -> Self {
        let message = format!("{e:#}");
        let mut r = Report { kind: "error", message, line: None, field: None };
        for cause in e.chain() {
            let config = cause.downcast_ref::<ConfigError>().or(match cause.downcast_ref::<Error>() {
                Some(Error::Config(c)) => Some(c),
                _ => None,
            });
            if let Some(c) = config {
                r.kind = "config";
                if let ConfigError::Invalid { line, field, .. } = c {
                    r.line = Some(*line);
                    r.field = Some(field.clone());
                }
                return r;
            }
            match cause.downcast_ref::<Error>() {
                Some(Error::Edit { field, .. }) => {
                    r.kind = "edit";
                    r.field = field.map(str::to_string);
                    return r;
                }
                Some(Error::NoInstance { .. }) => {
                    r.kind = "no_instance";
                    return r;
                }
                Some(_) => return r,
                None => {}
            }
        }
        r
    }

    pub fn exit_code(&self) -> u8 {
        match self.kind {
            "usage" => exit::USAGE,
            "config" | "edit" => exit::INVALID,
            "no_instance" => exit::NO_INSTANCE,
            _ => exit::OTHER,
        }
    }

    /// `{"error": {...}}`, the shape every `--json` verb prints on failure.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&serde_json::json!({ "error": self })).expect("serialisable")
    }
}
