//! Handshake messages (spec: "Handshake", "Newstyle negotiation",
//! "Oldstyle negotiation", `NBD_OPT_EXPORT_NAME` reply).

use super::cursor::{Reader, Writer};
use super::{
    ClientFlags, EXPORT_NAME_ZEROES, GREETING_LEN, HandshakeFlags, IHAVEOPT, NBD_MAGIC,
    OLDSTYLE_GREETING_LEN, OLDSTYLE_MAGIC, TransmissionFlags, WireError,
};

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

/// Zero bytes that end the oldstyle greeting.
const OLDSTYLE_ZEROES: usize = 124;
/// Size and transmission flags of the `NBD_OPT_EXPORT_NAME` reply.
const EXPORT_NAME_REPLY_LEN: usize = 10;

impl Greeting {
    /// Parses a newstyle greeting from the front of `input`.
    pub fn parse(input: &[u8]) -> Result<(&[u8], Self), WireError> {
        let mut r = Reader::streaming(input, GREETING_LEN);
        r.magic_u64(NBD_MAGIC)?;
        r.magic_u64(IHAVEOPT)?;
        let flags = HandshakeFlags(r.u16()?);
        Ok((r.rest(), Self { flags }))
    }

    /// Bytes the greeting takes: 18.
    pub fn encoded_len(&self) -> usize {
        GREETING_LEN
    }

    /// Writes the greeting to the front of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, GREETING_LEN)?;
        w.u64(NBD_MAGIC)?;
        w.u64(IHAVEOPT)?;
        w.u16(self.flags.bits())?;
        Ok(w.finish())
    }
}

impl OldstyleGreeting {
    /// Parses an oldstyle greeting from the front of `input`. The content
    /// of the trailing 124 bytes is not checked, but they must be present.
    pub fn parse(input: &[u8]) -> Result<(&[u8], Self), WireError> {
        let mut r = Reader::streaming(input, OLDSTYLE_GREETING_LEN);
        r.magic_u64(NBD_MAGIC)?;
        r.magic_u64(OLDSTYLE_MAGIC)?;
        let size = r.u64()?;
        let flags = r.u32()?;
        r.take(OLDSTYLE_ZEROES)?;
        Ok((r.rest(), Self { size, flags }))
    }

    /// Bytes the greeting takes: 152.
    pub fn encoded_len(&self) -> usize {
        OLDSTYLE_GREETING_LEN
    }

    /// Writes the greeting, zeroes included, to the front of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, OLDSTYLE_GREETING_LEN)?;
        w.u64(NBD_MAGIC)?;
        w.u64(OLDSTYLE_MAGIC)?;
        w.u64(self.size)?;
        w.u32(self.flags)?;
        w.zeroes(OLDSTYLE_ZEROES)?;
        Ok(w.finish())
    }
}

/// Which greeting a server opens with, known from its two magics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum HelloStyle {
    /// `NBDMAGIC`, `IHAVEOPT`: a newstyle [`Greeting`] follows.
    Newstyle,
    /// `NBDMAGIC`, `cliserv_magic`: an [`OldstyleGreeting`].
    Oldstyle,
}

/// Bytes of the two magics that open either greeting.
pub const HELLO_MAGICS_LEN: usize = 16;

impl ServerHello {
    /// Reads the two magics at the front of `input` (a streaming read of
    /// [`HELLO_MAGICS_LEN`] bytes), for a receiver that tells the styles
    /// apart before the rest arrives; any other magic is
    /// [`WireError::BadMagic`].
    pub fn parse_style(input: &[u8]) -> Result<(&[u8], HelloStyle), WireError> {
        let mut r = Reader::streaming(input, HELLO_MAGICS_LEN);
        r.magic_u64(NBD_MAGIC)?;
        let style = match r.u64()? {
            IHAVEOPT => HelloStyle::Newstyle,
            OLDSTYLE_MAGIC => HelloStyle::Oldstyle,
            found => return Err(WireError::BadMagic { found }),
        };
        Ok((r.rest(), style))
    }

    /// Parses whichever greeting the server opens with, told apart by the
    /// magic after `NBDMAGIC`; any other magic is [`WireError::BadMagic`].
    pub fn parse(input: &[u8]) -> Result<(&[u8], Self), WireError> {
        let mut r = Reader::streaming(input, 16);
        r.magic_u64(NBD_MAGIC)?;
        match r.u64()? {
            IHAVEOPT => {
                Greeting::parse(input).map(|(rest, greeting)| (rest, Self::Newstyle(greeting)))
            }
            OLDSTYLE_MAGIC => OldstyleGreeting::parse(input)
                .map(|(rest, greeting)| (rest, Self::Oldstyle(greeting))),
            found => Err(WireError::BadMagic { found }),
        }
    }

    /// Bytes the greeting takes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Newstyle(greeting) => greeting.encoded_len(),
            Self::Oldstyle(greeting) => greeting.encoded_len(),
        }
    }

    /// Writes the greeting to the front of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        match self {
            Self::Newstyle(greeting) => greeting.encode(out),
            Self::Oldstyle(greeting) => greeting.encode(out),
        }
    }
}

impl ExportNameReply {
    /// Parses the reply from the front of `input`; `zeroes` tells whether
    /// the 124 zero bytes follow (whose content is not checked).
    pub fn parse(input: &[u8], zeroes: bool) -> Result<(&[u8], Self), WireError> {
        let len = Self::len(zeroes);
        let mut r = Reader::streaming(input, len);
        let size = r.u64()?;
        let flags = TransmissionFlags(r.u16()?);
        if zeroes {
            r.take(EXPORT_NAME_ZEROES)?;
        }
        Ok((
            r.rest(),
            Self {
                size,
                flags,
                zeroes,
            },
        ))
    }

    const fn len(zeroes: bool) -> usize {
        if zeroes {
            EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZEROES
        } else {
            EXPORT_NAME_REPLY_LEN
        }
    }

    /// Bytes the reply takes: 10, or 134 with the zeroes.
    pub fn encoded_len(&self) -> usize {
        Self::len(self.zeroes)
    }

    /// Writes the reply to the front of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, self.encoded_len())?;
        w.u64(self.size)?;
        w.u16(self.flags.bits())?;
        if self.zeroes {
            w.zeroes(EXPORT_NAME_ZEROES)?;
        }
        Ok(w.finish())
    }
}

/// The client's flags (spec: "Client flags"), its 4-byte answer to the
/// newstyle greeting.
impl ClientFlags {
    /// Bytes the client flags take: 4.
    pub const ENCODED_LEN: usize = 4;

    /// Parses the client flags from the front of `input`.
    pub fn parse(input: &[u8]) -> Result<(&[u8], Self), WireError> {
        let mut r = Reader::streaming(input, Self::ENCODED_LEN);
        let flags = Self(r.u32()?);
        Ok((r.rest(), flags))
    }

    /// Bytes the client flags take: 4.
    pub fn encoded_len(self) -> usize {
        Self::ENCODED_LEN
    }

    /// Writes the client flags to the front of `out`.
    pub fn encode(self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, Self::ENCODED_LEN)?;
        w.u32(self.bits())?;
        Ok(w.finish())
    }
}
