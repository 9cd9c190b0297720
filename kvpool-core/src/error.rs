//! The one error type every backend returns.
//!
//! Modelled on OpenDAL's error: a [`ErrorKind`] a caller can branch on, a retry
//! status, the operation that failed, context pairs and the underlying source.
//! Backends keep private `thiserror` enums for their own failures and convert
//! them at the crate boundary, so callers never match on backend internals.

use std::fmt;

/// What went wrong, coarse enough to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration is malformed or names something that does not exist.
    ConfigInvalid,
    /// The caller passed something the contract forbids (a buffer of the wrong
    /// length, a malformed key, a batch over the backend's limit).
    InvalidArgument,
    /// The backend cannot be reached right now (server down, connection refused).
    Unavailable,
    /// The operation did not finish in time.
    Timeout,
    /// The backend is full and could not make room.
    NoSpace,
    /// Stored data failed an integrity check; it was not handed back.
    Corrupted,
    /// The backend does not implement this operation or option.
    Unsupported,
    /// The backend was closed; no further operation will succeed.
    Closed,
    /// Anything else: a bug or an error we did not expect.
    Unexpected,
}

impl ErrorKind {
    /// The stable, lower-case name used in logs, metrics labels and `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ConfigInvalid => "config_invalid",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Corrupted => "corrupted",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::Unexpected => "unexpected",
        }
    }

    /// Whether errors of this kind are worth retrying unless a backend says otherwise.
    fn default_temporary(self) -> bool {
        matches!(
            self,
            ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::NoSpace
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether retrying the same call can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStatus {
    /// Retrying will fail the same way until something changes.
    Permanent,
    /// Retrying may succeed (a server restart, eviction freeing space).
    Temporary,
}

/// The error of every kvpool operation.
pub struct Error {
    kind: ErrorKind,
    status: ErrorStatus,
    message: String,
    operation: &'static str,
    context: Vec<(&'static str, String)>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error; the status defaults from the kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            status: if kind.default_temporary() {
                ErrorStatus::Temporary
            } else {
                ErrorStatus::Permanent
            },
            message: message.into(),
            operation: "",
            context: Vec::new(),
            source: None,
        }
    }

    /// Names the operation that failed (`"put"`, `"open"`, ...).
    pub fn with_operation(mut self, operation: &'static str) -> Self {
        // The innermost operation is the most precise; keep it and record the
        // outer one as context so nothing is lost.
        if self.operation.is_empty() {
            self.operation = operation;
        } else if self.operation != operation {
            self.context.push(("called_from", operation.to_string()));
        }
        self
    }

    /// Adds one `key: value` pair of context.
    pub fn with_context(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    /// Attaches the underlying cause.
    pub fn set_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Marks the error as worth retrying.
    pub fn set_temporary(mut self) -> Self {
        self.status = ErrorStatus::Temporary;
        self
    }

    /// Marks the error as not worth retrying.
    pub fn set_permanent(mut self) -> Self {
        self.status = ErrorStatus::Permanent;
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The retry status.
    pub fn status(&self) -> ErrorStatus {
        self.status
    }

    /// Whether a retry may succeed.
    pub fn is_temporary(&self) -> bool {
        self.status == ErrorStatus::Temporary
    }

    /// The operation that failed, empty when unknown.
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// The human message, without kind or context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The context pairs, innermost first.
    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::ConfigInvalid`].
    pub fn config_invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::ConfigInvalid, message)
    }

    /// Shorthand for [`ErrorKind::Closed`].
    pub fn closed(scheme: &str) -> Self {
        Error::new(
            ErrorKind::Closed,
            format!("the {scheme} backend was closed; open a new one"),
        )
        .with_context("backend", scheme)
    }
}

impl fmt::Display for Error {
    /// One line a user can act on:
    /// `no_space (temporary) at put: <message> [backend=memory, key=...]: <source>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            ErrorStatus::Permanent => "permanent",
            ErrorStatus::Temporary => "temporary",
        };
        write!(f, "{} ({status})", self.kind)?;
        if !self.operation.is_empty() {
            write!(f, " at {}", self.operation)?;
        }
        write!(f, ": {}", self.message)?;
        if !self.context.is_empty() {
            f.write_str(" [")?;
            for (i, (k, v)) in self.context.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{k}={v}")?;
            }
            f.write_str("]")?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            f.debug_struct("Error")
                .field("kind", &self.kind)
                .field("status", &self.status)
                .field("operation", &self.operation)
                .field("message", &self.message)
                .field("context", &self.context)
                .field("source", &self.source)
                .finish()
        } else {
            fmt::Display::fmt(self, f)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_with_kind_status_operation_context_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::new(ErrorKind::Unavailable, "cannot reach the server")
            .with_operation("put")
            .with_context("backend", "redis")
            .with_context("endpoint", "127.0.0.1:6379")
            .set_source(io);
        assert_eq!(
            e.to_string(),
            "unavailable (temporary) at put: cannot reach the server \
             [backend=redis, endpoint=127.0.0.1:6379]: refused"
        );
        assert!(e.is_temporary());
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn status_defaults_from_kind_and_can_be_overridden() {
        assert!(!Error::invalid_argument("x").is_temporary());
        assert!(Error::new(ErrorKind::Timeout, "x").is_temporary());
        assert!(!Error::new(ErrorKind::Timeout, "x")
            .set_permanent()
            .is_temporary());
    }

    #[test]
    fn outer_operation_is_kept_as_context() {
        let e = Error::invalid_argument("bad")
            .with_operation("get_into")
            .with_operation("bench");
        assert_eq!(e.operation(), "get_into");
        assert_eq!(e.context(), &[("called_from", "bench".to_string())]);
    }
}
