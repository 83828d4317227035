//! Handshake messages (spec: "Handshake", "Newstyle negotiation",
//! "Oldstyle negotiation", `NBD_OPT_EXPORT_NAME` reply).

use super::{HandshakeFlags, TransmissionFlags};

/// Newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags the server offers.
    pub flags: HandshakeFlags,
}

/// Oldstyle greeting: `NBDMAGIC`, `cliserv_magic`, size, 32-bit flags,
/// 124 zeroes (152 bytes). Parsed so a client can refuse it by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OldstyleGreeting {
    /// Export size in bytes.
    pub size: u64,
    /// Handshake and transmission flags, concatenated.
    pub flags: u32,
}

/// What a server opens with: newstyle or oldstyle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerHello {
    /// Newstyle (fixed or not) negotiation follows.
    Newstyle(Greeting),
    /// Oldstyle: the server sent the export directly.
    Oldstyle(OldstyleGreeting),
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: size, transmission flags,
/// and 124 zero bytes unless both sides agreed on `NO_ZEROES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Whether the 124 zero bytes follow (false when `NO_ZEROES` was agreed).
    pub zeroes: bool,
}
