//! The shape both state machines share: what `process` returns, what
//! `poll_transmit` hands out, the id of a request in flight and the TLS
//! policy. [`server`](crate::server) and [`client`](crate::client)
//! re-export them under the same names, so a shell written against one
//! side reads the same on the other.

/// The result of one `process` call: how much input was consumed and at
/// most one event. Dropping it loses `consumed`, which the shell must
/// drop from its input before the next call.
#[derive(Debug)]
#[must_use = "the shell must drop `consumed` bytes of its input and act on `event`"]
pub struct Step<E> {
    /// Bytes of the input consumed; the shell drops them.
    pub consumed: usize,
    /// What the shell must act on, if anything.
    pub event: Option<E>,
}

/// One message to send: `parts` in order (empty ones skipped), then the
/// shell-owned `payload`, if any. The core counts it as sent once
/// returned, so dropping it unsent breaks the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "the core counts the message as sent: the shell must send it"]
pub struct Transmit<'a, P> {
    /// Header bytes the core encoded, then strings borrowed from the
    /// catalog (server) or copied from the configuration (client).
    pub parts: [&'a [u8]; 3],
    /// What the shell appends after the parts.
    pub payload: Option<P>,
}

impl<P> Transmit<'_, P> {
    /// Total bytes of `parts`.
    pub fn parts_len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }
}

/// Identifies a request in flight on one connection. Ids are reused once a
/// request is answered; a stale id is refused, not misapplied. On the
/// client it is also the request's cookie on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RequestId(u32);

impl RequestId {
    pub(crate) fn new(index: usize, generation: u16) -> Self {
        // Tables hold at most u16::MAX slots (checked where they are built).
        Self((u32::from(generation) << 16) | (index as u32 & 0xffff))
    }

    /// The request's slot: dense, below the connection's `REQUESTS`
    /// parameter, and unique among the requests in flight, so a shell can
    /// keep per-request data in an array of `REQUESTS` entries instead of
    /// a map. A slot is reused once its request is answered.
    pub fn index(self) -> usize {
        (self.0 & 0xffff) as usize
    }

    pub(crate) fn generation(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// The cookie a client request carries on the wire: its id. (A
    /// server's replies carry the cookies its client chose, not this.)
    pub fn cookie(self) -> u64 {
        u64::from(self.0)
    }

    /// The id as a number, for shells that must pass it through a foreign
    /// interface (JavaScript, a queue).
    pub fn to_bits(self) -> u32 {
        self.0
    }

    /// An id from [`to_bits`](Self::to_bits).
    pub fn from_bits(bits: u32) -> Self {
        Self(bits)
    }
}

/// How a side handles TLS (spec: "TLS support").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TlsPolicy {
    /// No TLS. A server answers `NBD_OPT_STARTTLS` with
    /// `NBD_REP_ERR_POLICY` (NOTLS mode); a client never sends it.
    #[default]
    Disabled,
    /// TLS when the peer agrees. A server accepts `NBD_OPT_STARTTLS` on the
    /// client's request (SELECTIVETLS with no TLS-only export); a client
    /// sends it first and goes on in clear if the server refuses.
    Optional,
    /// TLS before anything else. A server answers other options with
    /// `NBD_REP_ERR_TLS_REQD` (FORCEDTLS mode); a client sends
    /// `NBD_OPT_STARTTLS` first and ends the session if the server refuses.
    Required,
}
