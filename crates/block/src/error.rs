//! Errors of the block layer: a stable kind, a human context, and an optional OS error as source.
//!
//! Library code returns `BlockError`; the boundaries present it once: QMP maps the kind to an
//! error class and writes `desc` from the display, NBD maps it to an errno with [`BlockError::errno`].

use std::fmt;
use std::io;

/// What went wrong, independent of where. Stable: boundaries map it to error classes and errnos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The OS returned an error (the source holds it).
    Io,
    /// The caller asked for something malformed (bad size, bad option, misaligned where not allowed).
    InvalidArgument,
    /// The request reaches past the end of the node.
    OutOfBounds,
    /// Write access to something opened read-only.
    ReadOnly,
    /// A valid request this driver or image does not support.
    Unsupported,
    /// On-disk metadata is inconsistent or points where it must not.
    Corrupt,
    /// No space left (on the host or in a format limit).
    NoSpace,
    /// A named thing does not exist.
    NotFound,
}

/// An error of the block layer. See the module docs.
#[derive(Debug)]
pub struct BlockError {
    kind: ErrorKind,
    context: String,
    source: Option<io::Error>,
}

impl Clone for BlockError {
    /// The same kind and context; the OS error is rebuilt from its number (or its text), for
    /// handing one failure to several waiters.
    fn clone(&self) -> Self {
        Self {
            kind: self.kind,
            context: self.context.clone(),
            source: self.source.as_ref().map(|e| match e.raw_os_error() {
                Some(n) => io::Error::from_raw_os_error(n),
                None => io::Error::new(e.kind(), e.to_string()),
            }),
        }
    }
}

/// Result alias used across the block layer and the drivers.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

impl BlockError {
    /// A new error of `kind` described by `context`.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An OS error met while doing `context`.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::ReadOnly,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        };
        Self {
            kind,
            context: context.into(),
            source: Some(source),
        }
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, context)
    }

    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, context)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, context)
    }

    /// Shorthand for [`ErrorKind::ReadOnly`].
    pub fn read_only(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::ReadOnly, context)
    }

    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The context text, without the source.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Prefixes the context with what the caller was doing.
    pub fn within(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }

    /// The errno an NBD server or a POSIX-like caller should see.
    pub fn errno(&self) -> i32 {
        if let Some(code) = self.source.as_ref().and_then(io::Error::raw_os_error) {
            return code;
        }
        match self.kind {
            ErrorKind::Io | ErrorKind::Corrupt => libc::EIO,
            ErrorKind::InvalidArgument | ErrorKind::OutOfBounds => libc::EINVAL,
            ErrorKind::ReadOnly => libc::EPERM,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::NotFound => libc::ENOENT,
        }
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {}", self.context, source),
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for BlockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Adds context to results, the way callers say what they were doing.
pub trait ResultExt<T> {
    /// Prefixes an error's context with `what`.
    fn within<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn within<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.within(what()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_prefers_the_os_error() {
        let e = BlockError::io("writing", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(BlockError::read_only("x").errno(), libc::EPERM);
    }

    #[test]
    fn within_prefixes_context() {
        let e = BlockError::corrupt("L1 entry 3 points past the end").within("opening a.qcow2");
        assert_eq!(
            e.to_string(),
            "opening a.qcow2: L1 entry 3 points past the end"
        );
    }
}
