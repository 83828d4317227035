//! Limits that keep a server bounded under abuse: how many clients at
//! once, and how long a client may take to negotiate. The per-connection
//! limits (requests in flight, option length) are the protocol core's
//! [`Config`](nbd_core::server::Config).

use std::fmt;
use std::time::Duration;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Default [`ServerLimits::max_clients`]. A client that has not answered
/// the greeting costs about 6 KB; one negotiating or idle in transmission
/// about 35 KiB (the core's 25 KiB state, boxed, and a 4 KiB input
/// buffer), so 1,024 idle clients stay under 40 MiB; busy ones grow their
/// input buffer up to 4 MiB each, within `--server-memory`. 1,024 is also the usual soft descriptor
/// limit, which the server raises at start when the hard limit allows.
pub const DEFAULT_MAX_CLIENTS: u32 = 1024;

/// Default [`ServerLimits::handshake_timeout`]: far more than a client
/// needs for a few round trips (TLS included), short enough that silent
/// connections do not pile up.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`ServerLimits::drain_timeout`]: requests in flight normally
/// finish in well under a second; a client's reconnect timeout (60 s by
/// default for `nbd-std` clients) leaves room for this and a restart.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Most requests in flight per connection the server can hold: the
/// `REQUESTS` of [`StdConnection`](nbd_core::server::StdConnection).
pub const MAX_IN_FLIGHT: u16 = 128;

/// Smallest `--max-option-length`: room for any option but a maximal
/// export name (4096 bytes); longer options close the connection.
pub const MIN_OPTION_LENGTH: u64 = 1024;

/// Descriptors kept for everything but clients: listener, logs, export
/// files, the runtime's own.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// Server-wide limits; see [`Server::with_limits`](super::Server::with_limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most clients connected at once. Beyond it a new connection is
    /// accepted and closed at once, so the client sees the connection
    /// closed (an error) rather than waiting in the listen backlog.
    pub max_clients: usize,
    /// Time a client has from connecting to reaching transmission
    /// (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` answered); after it the
    /// connection is dropped. `None`: no limit.
    pub handshake_timeout: Option<Duration>,
    /// Request payload bytes one connection may hold (write data not yet
    /// stored, read data not yet sent); past it the server stops reading
    /// from that client. A connection holding nothing may take one request
    /// larger than this.
    pub connection_memory: usize,
    /// Request payload bytes all connections together may hold; never
    /// exceeded. Must hold the largest request.
    pub server_memory: usize,
    /// Idle time before TCP keepalive probes start (then 5 probes 10 s
    /// apart); `None`: no keepalive, a peer gone without a FIN holds its
    /// connection until the server writes to it.
    pub keepalive: Option<Duration>,
    /// A client that sends nothing for this long while no request of it is
    /// in flight is disconnected (transmission phase). `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Time connections have, once the server is told to stop, to answer
    /// their requests in flight and close; those still open after it are
    /// dropped.
    pub drain_timeout: Duration,
    /// Congestion control of TCP connections from this same host when
    /// the system's is BBR.
    pub loopback_congestion: LoopbackCongestion,
}

/// Congestion control for a TCP connection whose two ends are on this
/// host (over the loopback device), when the system's paces segments
/// (BBR, `net.ipv4.tcp_congestion_control`); other algorithms are left
/// as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum LoopbackCongestion {
    /// cubic (reno, built into every kernel, where cubic is missing):
    /// over loopback BBR's window, about twice what it measured to be in
    /// flight, holds most of a large reply back until the client
    /// acknowledges the start, and the rest is then sent from the
    /// client's CPU while the server's sends more, so segments arrive out
    /// of order and some are sent twice (docs/BENCHMARKS.md).
    #[default]
    Cubic,
    /// Keep the system's algorithm.
    System,
}

/// Default [`ServerLimits::keepalive`]: a vanished peer is found within
/// 110 s (60 s idle, then 5 probes 10 s apart) instead of the kernel's
/// default 2 h 11 min.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);

/// Probes sent before a silent peer is declared gone.
pub const KEEPALIVE_PROBES: u32 = 5;

/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_clients: DEFAULT_MAX_CLIENTS as usize,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            connection_memory: super::budget::DEFAULT_CONNECTION_MEMORY,
            server_memory: super::budget::DEFAULT_SERVER_MEMORY,
            keepalive: Some(DEFAULT_KEEPALIVE),
            idle_timeout: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            loopback_congestion: LoopbackCongestion::Cubic,
        }
    }
}

impl ServerLimits {
    /// Refuses budgets that cannot work: a per-connection budget below two
    /// write pieces, or a server budget that cannot hold a request of
    /// `max_request` bytes next to one connection's input.
    pub fn check(&self, max_request: u64) -> Result<(), String> {
        let piece = super::budget::WRITE_PIECE;
        if self.connection_memory < 2 * piece {
            return Err(format!(
                "--connection-memory {} is below {} (two write pieces)",
                self.connection_memory,
                2 * piece
            ));
        }
        let needed = max_request.saturating_add(2 * piece as u64);
        if (self.server_memory as u64) < needed {
            return Err(format!(
                "--server-memory {} cannot hold the largest request ({max_request} bytes) and a write piece: use at least {needed}",
                self.server_memory
            ));
        }
        Ok(())
    }
}

/// The descriptor limit could not be read or raised.
#[derive(Debug)]
pub enum DescriptorLimitError {
    /// The hard limit is below what is needed.
    TooLow {
        /// Descriptors wanted.
        wanted: u64,
        /// The hard limit.
        hard: u64,
    },
    /// `setrlimit` failed.
    Set(std::io::Error),
}

impl fmt::Display for DescriptorLimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLow { wanted, hard } => write!(
                f,
                "{wanted} file descriptors wanted but the hard limit (ulimit -Hn) is {hard}"
            ),
            Self::Set(error) => write!(f, "cannot raise the file descriptor limit: {error}"),
        }
    }
}

impl std::error::Error for DescriptorLimitError {}

/// Raises the soft `RLIMIT_NOFILE` to at least `wanted` (never lowers it).
/// Returns the soft limit now in force; on error the limit is unchanged.
pub fn raise_descriptor_limit(wanted: u64) -> Result<u64, DescriptorLimitError> {
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= wanted {
        return Ok(current);
    }
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if hard < wanted {
        return Err(DescriptorLimitError::TooLow { wanted, hard });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(wanted),
            maximum: limit.maximum,
        },
    )
    .map_err(|e| DescriptorLimitError::Set(e.into()))?;
    Ok(wanted)
}

/// A `--max-option-length` value: a size (bytes, or with K, M, G) from
/// [`MIN_OPTION_LENGTH`] to 4 GiB - 1.
pub fn parse_max_option_length(text: &str) -> Result<u32, OptionLengthError> {
    crate::size::parse_size(text)
        .ok()
        .filter(|&length| length >= MIN_OPTION_LENGTH)
        .and_then(|length| u32::try_from(length).ok())
        .ok_or_else(|| OptionLengthError(text.to_owned()))
}

/// A maximum option length out of range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionLengthError(String);

impl fmt::Display for OptionLengthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a size from {MIN_OPTION_LENGTH} bytes to 4294967295 (4G - 1)",
            self.0
        )
    }
}

impl std::error::Error for OptionLengthError {}

/// A `--max-request` value: a size from 1 MiB to 4 GiB - 1.
pub fn parse_max_request(text: &str) -> Result<u32, String> {
    crate::size::parse_size(text)
        .ok()
        .filter(|&length| length >= 1 << 20)
        .and_then(|length| u32::try_from(length).ok())
        .ok_or_else(|| format!("`{text}` is not a size from 1M to 4294967295 (4G - 1)"))
}

/// A memory budget: a size from 2 MiB up.
pub fn parse_memory(text: &str) -> Result<usize, String> {
    crate::size::parse_size(text)
        .ok()
        .filter(|&bytes| bytes >= 2 << 20)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| format!("`{text}` is not a size of at least 2M"))
}

/// A `--handshake-timeout` value: seconds (fractions allowed) from 0 to a
/// day; 0 means no limit.
pub fn parse_handshake_timeout(text: &str) -> Result<Duration, TimeoutError> {
    text.parse::<f64>()
        .ok()
        .filter(|seconds| (0.0..=86_400.0).contains(seconds))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| TimeoutError(text.to_owned()))
}

/// A handshake timeout that is not a number of seconds from 0 to 86400.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeoutError(String);

impl fmt::Display for TimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a number of seconds from 0 (no limit) to 86400",
            self.0
        )
    }
}

impl std::error::Error for TimeoutError {}

/// The soft `RLIMIT_NOFILE`.
pub fn descriptor_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_option_lengths() {
        assert_eq!(parse_max_option_length("1M"), Ok(1 << 20));
        assert_eq!(parse_max_option_length("1024"), Ok(1024));
        assert_eq!(parse_max_option_length("4294967295"), Ok(u32::MAX));
        for bad in ["1023", "4G", "0", "x"] {
            let error = parse_max_option_length(bad).expect_err(bad);
            assert!(error.to_string().contains("1024 bytes"), "{error}");
        }
    }

    #[test]
    fn parses_timeouts() {
        assert_eq!(parse_handshake_timeout("10"), Ok(Duration::from_secs(10)));
        assert_eq!(
            parse_handshake_timeout("0.5"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(parse_handshake_timeout("0"), Ok(Duration::ZERO));
        for bad in ["-1", "x", "", "1e9", "NaN"] {
            assert!(parse_handshake_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn raising_never_lowers() {
        let before = descriptor_limit();
        assert_eq!(raise_descriptor_limit(1).expect("no change"), before);
        assert_eq!(descriptor_limit(), before);
    }

    #[test]
    fn refuses_beyond_the_hard_limit() {
        let hard = getrlimit(Resource::Nofile).maximum;
        if let Some(hard) = hard.filter(|&h| h < u64::MAX) {
            let error = raise_descriptor_limit(hard + 1).expect_err("beyond hard");
            assert!(error.to_string().contains("hard limit"), "{error}");
        }
    }
}
