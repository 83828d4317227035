//! What can go wrong talking to a server, in words a user can act on.

use std::io;
use std::sync::Arc;

use nbd_core::client::{ProtocolError, UsageError};
use nbd_core::wire::{ErrorCode, OptionCode, OptionReplyType};

use super::uri::UriError;

/// Result of the client's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a client operation failed. Cheap to clone: every request in flight
/// on a connection that breaks gets the same error.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URI could not be used.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The export name is longer than the protocol allows.
    #[error("export name of {0} bytes is longer than the protocol's limit of 4096")]
    NameTooLong(usize),
    /// The transport could not be opened.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// `host:port` or socket path.
        address: String,
        /// What the operating system said.
        #[source]
        source: Arc<io::Error>,
    },
    /// Connecting and negotiating took too long.
    #[error("timed out connecting to {address}")]
    Timeout {
        /// `host:port` or socket path.
        address: String,
    },
    /// Reading or writing the connection failed.
    #[error("connection to the server failed: {0}")]
    Io(#[source] Arc<io::Error>),
    /// The server broke the protocol; the connection was dropped.
    #[error("the server broke the NBD protocol: {0}")]
    Protocol(ProtocolError),
    /// The server has no export by that name.
    #[error("the server has no export named {name:?}{}", suffix(message))]
    NoSuchExport {
        /// The name asked for.
        name: String,
        /// The server's message, if any.
        message: String,
    },
    /// The server insists on TLS and the URI did not ask for it.
    #[error(
        "the server requires TLS: connect with an nbds:// or nbds+unix:// URI{}",
        suffix(message)
    )]
    TlsRequired {
        /// The server's message, if any.
        message: String,
    },
    /// The TLS settings could not be used (certificate files and the like).
    #[cfg(feature = "tls")]
    #[error("TLS setup: {0}")]
    TlsSetup(Arc<crate::tls::TlsError>),
    /// The TLS handshake failed (certificate not trusted, name mismatch,
    /// client certificate refused, …).
    #[error("TLS with {address} failed: {reason}")]
    TlsHandshake {
        /// `host:port` or socket path.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// The server refused an option negotiation cannot go on without.
    #[error("the server refused {}: {}{}", option_name(*option), reply_meaning(*reply), suffix(message))]
    OptionRefused {
        /// The option.
        option: OptionCode,
        /// The error reply.
        reply: OptionReplyType,
        /// The server's message, if any.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("{command} of {length} bytes at offset {offset} failed: the server replied {} ({})", code.name(), error_meaning(*code))]
    Server {
        /// `read`, `write`, …
        command: &'static str,
        /// Export offset of the request.
        offset: u64,
        /// Its length.
        length: u64,
        /// The server's error.
        code: ErrorCode,
    },
    /// The export does not offer the operation (its transmission flags or
    /// negotiated features lack it).
    #[error("the export does not support {0}")]
    Unsupported(&'static str),
    /// The export is read-only.
    #[error("the export is read-only: {0} refused")]
    ReadOnly(&'static str),
    /// The range does not lie inside the export.
    #[error(
        "{command} of {length} bytes at offset {offset} extends past the end of the export ({size} bytes)"
    )]
    OutOfRange {
        /// `read`, `write`, …
        command: &'static str,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// Offset or length not a multiple of the server's minimum block size.
    #[error(
        "{command} at offset {offset} of {length} bytes is not aligned to the server's minimum block size of {minimum} bytes"
    )]
    Misaligned {
        /// `read`, `write`, …
        command: &'static str,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        length: u64,
        /// The server's minimum block size.
        minimum: u32,
    },
    /// The protocol core refused the request before sending it.
    #[error("{command} not sent: {error}")]
    Usage {
        /// `read`, `write`, …
        command: &'static str,
        /// Why.
        error: UsageError,
    },
    /// The server closed the connection.
    #[error("the server closed the connection{}", because(reason))]
    Closed {
        /// Why, when known.
        reason: String,
    },
    /// The connection broke and no new one could be made within the
    /// URI's `reconnect-timeout`; requests in flight fail with this.
    #[error(
        "the connection to {address} broke ({cause}) and reconnecting failed for {seconds} s (last attempt: {last}); requests in flight were not done"
    )]
    ReconnectFailed {
        /// `host:port` or socket path.
        address: String,
        /// Why the connection broke.
        cause: Arc<Error>,
        /// How long reconnecting was tried.
        seconds: u64,
        /// Why the last attempt failed.
        last: Arc<Error>,
    },
    /// After a reconnection the export differs in a way requests depend
    /// on (size, read-only, a command no longer offered, …).
    #[error(
        "the export changed across a reconnection to {address}: {change}; requests in flight were not done"
    )]
    ExportChanged {
        /// `host:port` or socket path.
        address: String,
        /// What changed.
        change: String,
    },
    /// The connection was shut down by this client.
    #[error("the connection was closed by disconnect()")]
    Disconnected,
}

impl Error {
    pub(crate) fn io(error: io::Error) -> Self {
        Self::Io(Arc::new(error))
    }

    /// The server's NBD error, when the server answered with one.
    pub fn nbd_error(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// ` (reason)`, or nothing.
fn because(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

fn suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" (server says: {message})")
    }
}

/// The spec's name of an option.
pub(crate) fn option_name(option: OptionCode) -> String {
    let name = match option {
        OptionCode::ExportName => "NBD_OPT_EXPORT_NAME",
        OptionCode::Abort => "NBD_OPT_ABORT",
        OptionCode::List => "NBD_OPT_LIST",
        OptionCode::PeekExport => "NBD_OPT_PEEK_EXPORT",
        OptionCode::StartTls => "NBD_OPT_STARTTLS",
        OptionCode::Info => "NBD_OPT_INFO",
        OptionCode::Go => "NBD_OPT_GO",
        OptionCode::StructuredReply => "NBD_OPT_STRUCTURED_REPLY",
        OptionCode::ListMetaContext => "NBD_OPT_LIST_META_CONTEXT",
        OptionCode::SetMetaContext => "NBD_OPT_SET_META_CONTEXT",
        OptionCode::ExtendedHeaders => "NBD_OPT_EXTENDED_HEADERS",
        other => return format!("option {}", other.to_wire()),
    };
    name.to_owned()
}

/// The spec's name of an option error reply and what it means.
pub(crate) fn reply_meaning(reply: OptionReplyType) -> String {
    let text = match reply {
        OptionReplyType::ErrUnsupported => "NBD_REP_ERR_UNSUP (not supported)",
        OptionReplyType::ErrPolicy => "NBD_REP_ERR_POLICY (forbidden by the server's policy)",
        OptionReplyType::ErrInvalid => "NBD_REP_ERR_INVALID (invalid request)",
        OptionReplyType::ErrPlatform => "NBD_REP_ERR_PLATFORM (not supported on this platform)",
        OptionReplyType::ErrTlsRequired => "NBD_REP_ERR_TLS_REQD (TLS required)",
        OptionReplyType::ErrUnknownExport => "NBD_REP_ERR_UNKNOWN (no such export)",
        OptionReplyType::ErrShutdown => "NBD_REP_ERR_SHUTDOWN (the server is shutting down)",
        OptionReplyType::ErrBlockSizeRequired => {
            "NBD_REP_ERR_BLOCK_SIZE_REQD (block sizes must be negotiated)"
        }
        OptionReplyType::ErrTooBig => "NBD_REP_ERR_TOO_BIG (request too big)",
        OptionReplyType::ErrExtendedHeaderRequired => {
            "NBD_REP_ERR_EXT_HEADER_REQD (extended headers required)"
        }
        other => return format!("error reply {:#x}", other.to_wire()),
    };
    text.to_owned()
}

/// What an NBD error means, for people.
pub fn error_meaning(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Perm => "operation not permitted",
        ErrorCode::Io => "input/output error",
        ErrorCode::NoMemory => "out of memory",
        ErrorCode::Invalid => "invalid argument",
        ErrorCode::NoSpace => "no space left",
        ErrorCode::Overflow => "value too large",
        ErrorCode::NotSupported => "operation not supported",
        ErrorCode::Shutdown => "the server is shutting down",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_nbd_error() {
        let error = Error::Server {
            command: "write",
            offset: 4096,
            length: 512,
            code: ErrorCode::NoSpace,
        };
        assert_eq!(
            error.to_string(),
            "write of 512 bytes at offset 4096 failed: the server replied NBD_ENOSPC (no space left)"
        );
        assert_eq!(error.nbd_error(), Some(ErrorCode::NoSpace));
        let refused = Error::OptionRefused {
            option: OptionCode::Go,
            reply: OptionReplyType::ErrPolicy,
            message: "go away".into(),
        };
        assert_eq!(
            refused.to_string(),
            "the server refused NBD_OPT_GO: NBD_REP_ERR_POLICY (forbidden by the server's policy) (server says: go away)"
        );
    }
}
