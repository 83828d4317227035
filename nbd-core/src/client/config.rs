//! What the client asks for: the [`Config`] a shell chooses, and the
//! settings kept from it for the whole negotiation.

use super::{BASE_ALLOCATION, TlsPolicy};

/// What the negotiation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Mode {
    /// Select the export with `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`) and
    /// enter transmission.
    #[default]
    Go,
    /// Describe the export with `NBD_OPT_INFO` (and its metadata contexts
    /// with `NBD_OPT_LIST_META_CONTEXT`), then end with `NBD_OPT_ABORT`.
    Info,
    /// List the exports with `NBD_OPT_LIST`, then end with `NBD_OPT_ABORT`.
    List,
}

/// What the client asks for during negotiation. Strings are copied into
/// the connection by [`Connection::new`](super::Connection::new), so a
/// `Config` may borrow short-lived data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config<'a> {
    /// Export to select or describe; empty for the server's default export.
    pub export_name: &'a str,
    /// What the negotiation is for.
    pub mode: Mode,
    /// TLS.
    pub tls: TlsPolicy,
    /// Ask for structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    pub structured_replies: bool,
    /// Ask for extended headers first (`NBD_OPT_EXTENDED_HEADERS`); if the
    /// server refuses, structured replies are asked for instead.
    pub extended_headers: bool,
    /// Metadata context queries for `NBD_OPT_SET_META_CONTEXT` (in
    /// [`Mode::Go`], when structured replies were negotiated; none sends no
    /// option) or `NBD_OPT_LIST_META_CONTEXT` (in [`Mode::Info`]; none asks
    /// for every context).
    pub meta_contexts: &'a [&'a str],
    /// Ask for `NBD_INFO_NAME` with `NBD_OPT_GO`/`NBD_OPT_INFO`.
    pub request_name: bool,
    /// Ask for `NBD_INFO_DESCRIPTION`.
    pub request_description: bool,
    /// Ask for `NBD_INFO_BLOCK_SIZE`, promising to honour the constraints
    /// (the client honours whatever the server sends, asked for or not).
    pub request_block_size: bool,
}

impl<'a> Config<'a> {
    /// Selects `export_name` with every feature the client supports:
    /// extended headers (or structured replies), `base:allocation`, block
    /// sizes; no TLS.
    pub const fn new(export_name: &'a str) -> Self {
        Self {
            export_name,
            mode: Mode::Go,
            tls: TlsPolicy::Disabled,
            structured_replies: true,
            extended_headers: true,
            meta_contexts: &[BASE_ALLOCATION],
            request_name: false,
            request_description: false,
            request_block_size: true,
        }
    }

    /// Plain simple replies: no structured replies, no extended headers, no
    /// metadata contexts.
    #[must_use]
    pub const fn simple(mut self) -> Self {
        self.structured_replies = false;
        self.extended_headers = false;
        self.meta_contexts = &[];
        self
    }

    /// With another mode.
    #[must_use]
    pub const fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// With a TLS policy.
    #[must_use]
    pub const fn with_tls(mut self, tls: TlsPolicy) -> Self {
        self.tls = tls;
        self
    }

    /// With these metadata context queries.
    #[must_use]
    pub const fn with_meta_contexts(mut self, queries: &'a [&'a str]) -> Self {
        self.meta_contexts = queries;
        self
    }
}

impl Default for Config<'_> {
    fn default() -> Self {
        Self::new("")
    }
}

/// Why [`Connection::new`](super::Connection::new) refused a [`Config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ConfigError {
    /// A name or query is longer than the spec's 4096 bytes.
    StringTooLong,
    /// The export name and queries leave less than [`MIN_REPLY_SPACE`](super::MIN_REPLY_SPACE)
    /// bytes of `BUFFER`; `needed` is the smallest `BUFFER` that works.
    BufferTooSmall {
        /// Smallest buffer for this configuration.
        needed: usize,
    },
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::StringTooLong => f.write_str("export name or query longer than 4096 bytes"),
            Self::BufferTooSmall { needed } => {
                write!(f, "connection buffer too small: {needed} bytes needed")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ConfigError {}

/// What the [`Config`] asks for, kept for the whole negotiation. The export
/// name is `buffer[..name_len]`; the query count and queries, in wire form,
/// `buffer[name_len..queries_end]`; option replies go after them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Settings {
    pub(super) mode: Mode,
    pub(super) tls: TlsPolicy,
    pub(super) structured: bool,
    pub(super) extended: bool,
    pub(super) request_name: bool,
    pub(super) request_description: bool,
    pub(super) request_block_size: bool,
    pub(super) name_len: usize,
    pub(super) queries_end: usize,
    pub(super) query_count: usize,
}

impl Settings {
    pub(super) fn new(config: &Config<'_>, name_len: usize, queries_end: usize) -> Self {
        Self {
            mode: config.mode,
            tls: config.tls,
            structured: config.structured_replies,
            extended: config.extended_headers,
            request_name: config.request_name,
            request_description: config.request_description,
            request_block_size: config.request_block_size,
            name_len,
            queries_end,
            query_count: config.meta_contexts.len(),
        }
    }
}
