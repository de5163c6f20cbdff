//! QMP errors: QEMU's error classes and a description, presented once in the reply.

use std::fmt;

/// QEMU's error classes (qapi/error.json). Clients match on these; keep the spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Everything without a more specific class.
    GenericError,
    /// The command does not exist, or is not allowed in the current state (before negotiation).
    CommandNotFound,
    /// A device (for us: a node or export) named by the command does not exist.
    DeviceNotFound,
    /// The named device exists but has no active job (`block-job-*`).
    DeviceNotActive,
}

impl ErrorClass {
    /// The class as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

/// An error reply: class plus the human description (`desc`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The description shown to the user.
    pub desc: String,
}

impl QmpError {
    /// An error of `class`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// QEMU's reply to an unknown command.
    pub fn command_not_found(name: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}

/// Result of a command handler.
pub type QmpResult<T> = Result<T, QmpError>;
