//! The checker's side of a connection: blocking sockets with a timeout on
//! every read and write, and the few message shapes the rules need, built
//! and parsed byte by byte so a rule can also send what a well-behaved
//! client never would (wrong lengths, unknown codes, misaligned requests).
//!
//! Magics and codes come from `nbd_core::wire`, so the checker and the
//! core agree on every number.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nbd_core::wire::{
    CHUNK_ERROR_BIT, ChunkType, ClientFlags, Command, CommandFlags, EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC, ErrorCode, HandshakeFlags, IHAVEOPT, InfoType, NBD_MAGIC,
    OPTION_REPLY_ERROR_BIT, OPTION_REPLY_MAGIC, OptionCode, OptionReplyType, REQUEST_MAGIC,
    ReplyFlags, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

use crate::client::{Endpoint, NbdUri};

/// Largest option reply or chunk payload the checker accepts (a reply to
/// a 64 KiB read plus headroom); anything longer is reported, not read.
const MAX_PAYLOAD: u64 = 64 << 20;
/// Most replies to one option before the checker gives up on a final one.
const MAX_OPTION_REPLIES: usize = 10_000;
/// Most chunks of one structured reply before the checker gives up.
const MAX_CHUNKS: usize = 100_000;

/// Why a check could not go on: the connection broke or the server sent
/// something the checker cannot parse. A rule that meets one fails with it.
#[derive(Debug)]
pub enum CheckError {
    /// A socket error (timeouts included).
    Io(io::Error),
    /// The server closed the connection when the rule expected more.
    Closed,
    /// The server sent bytes that break the protocol.
    Protocol(String),
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                write!(f, "no answer before the timeout")
            }
            Self::Io(error) => write!(f, "connection error: {error}"),
            Self::Closed => write!(f, "the server closed the connection"),
            Self::Protocol(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for CheckError {}

impl From<io::Error> for CheckError {
    fn from(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            Self::Closed
        } else {
            Self::Io(error)
        }
    }
}

/// Result of one step of a rule.
pub type Result<T> = std::result::Result<T, CheckError>;

/// Shorthand for a protocol error.
pub fn protocol<T>(message: impl Into<String>) -> Result<T> {
    Err(CheckError::Protocol(message.into()))
}

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One reply to an option.
#[derive(Clone, Debug)]
pub struct OptReply {
    /// The option code the reply names.
    pub option: u32,
    /// `NBD_REP_*`.
    pub kind: u32,
    /// Its payload.
    pub data: Vec<u8>,
}

impl OptReply {
    /// An error reply (bit 31 set).
    pub fn is_error(&self) -> bool {
        self.kind & OPTION_REPLY_ERROR_BIT != 0
    }
}

/// Name of an option reply type for messages.
pub fn rep_name(kind: u32) -> String {
    match OptionReplyType::from_wire(kind) {
        OptionReplyType::Ack => "NBD_REP_ACK".into(),
        OptionReplyType::Server => "NBD_REP_SERVER".into(),
        OptionReplyType::Info => "NBD_REP_INFO".into(),
        OptionReplyType::MetaContext => "NBD_REP_META_CONTEXT".into(),
        OptionReplyType::ErrUnsupported => "NBD_REP_ERR_UNSUP".into(),
        OptionReplyType::ErrPolicy => "NBD_REP_ERR_POLICY".into(),
        OptionReplyType::ErrInvalid => "NBD_REP_ERR_INVALID".into(),
        OptionReplyType::ErrPlatform => "NBD_REP_ERR_PLATFORM".into(),
        OptionReplyType::ErrTlsRequired => "NBD_REP_ERR_TLS_REQD".into(),
        OptionReplyType::ErrUnknownExport => "NBD_REP_ERR_UNKNOWN".into(),
        OptionReplyType::ErrShutdown => "NBD_REP_ERR_SHUTDOWN".into(),
        OptionReplyType::ErrBlockSizeRequired => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        OptionReplyType::ErrTooBig => "NBD_REP_ERR_TOO_BIG".into(),
        OptionReplyType::ErrExtendedHeaderRequired => "NBD_REP_ERR_EXT_HEADER_REQD".into(),
        _ => format!("reply type {kind:#x}"),
    }
}

/// Name of an NBD error value for messages (`EINVAL`, or `error N` for a
/// value the spec does not define).
pub fn errno_name(error: u32) -> String {
    match ErrorCode::from_wire(error) {
        None => "success".into(),
        // from_wire reads an undefined value as EINVAL; the checker says
        // what was sent.
        Some(code) if code.to_wire() == error => code.name().trim_start_matches("NBD_").into(),
        Some(_) => format!("error {error}"),
    }
}

/// `NBD_REP_*` values the rules compare with.
pub mod rep {
    use super::OptionReplyType as T;
    /// `NBD_REP_ACK`
    pub const ACK: u32 = T::Ack.to_wire();
    /// `NBD_REP_SERVER`
    pub const SERVER: u32 = T::Server.to_wire();
    /// `NBD_REP_INFO`
    pub const INFO: u32 = T::Info.to_wire();
    /// `NBD_REP_META_CONTEXT`
    pub const META_CONTEXT: u32 = T::MetaContext.to_wire();
    /// `NBD_REP_ERR_UNSUP`
    pub const ERR_UNSUP: u32 = T::ErrUnsupported.to_wire();
    /// `NBD_REP_ERR_POLICY`
    pub const ERR_POLICY: u32 = T::ErrPolicy.to_wire();
    /// `NBD_REP_ERR_INVALID`
    pub const ERR_INVALID: u32 = T::ErrInvalid.to_wire();
    /// `NBD_REP_ERR_TLS_REQD`
    pub const ERR_TLS_REQD: u32 = T::ErrTlsRequired.to_wire();
    /// `NBD_REP_ERR_UNKNOWN`
    pub const ERR_UNKNOWN: u32 = T::ErrUnknownExport.to_wire();
    /// `NBD_REP_ERR_EXT_HEADER_REQD`
    pub const ERR_EXT_HEADER_REQD: u32 = T::ErrExtendedHeaderRequired.to_wire();
}

/// `NBD_OPT_*` values.
pub mod opt {
    use super::OptionCode as O;
    /// `NBD_OPT_EXPORT_NAME`
    pub const EXPORT_NAME: u32 = O::ExportName.to_wire();
    /// `NBD_OPT_ABORT`
    pub const ABORT: u32 = O::Abort.to_wire();
    /// `NBD_OPT_LIST`
    pub const LIST: u32 = O::List.to_wire();
    /// `NBD_OPT_STARTTLS`
    pub const STARTTLS: u32 = O::StartTls.to_wire();
    /// `NBD_OPT_INFO`
    pub const INFO: u32 = O::Info.to_wire();
    /// `NBD_OPT_GO`
    pub const GO: u32 = O::Go.to_wire();
    /// `NBD_OPT_STRUCTURED_REPLY`
    pub const STRUCTURED_REPLY: u32 = O::StructuredReply.to_wire();
    /// `NBD_OPT_LIST_META_CONTEXT`
    pub const LIST_META_CONTEXT: u32 = O::ListMetaContext.to_wire();
    /// `NBD_OPT_SET_META_CONTEXT`
    pub const SET_META_CONTEXT: u32 = O::SetMetaContext.to_wire();
    /// `NBD_OPT_EXTENDED_HEADERS`
    pub const EXTENDED_HEADERS: u32 = O::ExtendedHeaders.to_wire();
}

/// `NBD_CMD_*` values.
pub mod cmd {
    use super::Command as C;
    /// `NBD_CMD_READ`
    pub const READ: u16 = C::Read.to_wire();
    /// `NBD_CMD_WRITE`
    pub const WRITE: u16 = C::Write.to_wire();
    /// `NBD_CMD_DISC`
    pub const DISC: u16 = C::Disconnect.to_wire();
    /// `NBD_CMD_FLUSH`
    pub const FLUSH: u16 = C::Flush.to_wire();
    /// `NBD_CMD_TRIM`
    pub const TRIM: u16 = C::Trim.to_wire();
    /// `NBD_CMD_CACHE`
    pub const CACHE: u16 = C::Cache.to_wire();
    /// `NBD_CMD_WRITE_ZEROES`
    pub const WRITE_ZEROES: u16 = C::WriteZeroes.to_wire();
    /// `NBD_CMD_BLOCK_STATUS`
    pub const BLOCK_STATUS: u16 = C::BlockStatus.to_wire();
}

/// `NBD_CMD_FLAG_*` values.
pub mod cflag {
    use super::CommandFlags as F;
    /// `NBD_CMD_FLAG_FUA`
    pub const FUA: u16 = F::FUA.bits();
    /// `NBD_CMD_FLAG_NO_HOLE`
    pub const NO_HOLE: u16 = F::NO_HOLE.bits();
    /// `NBD_CMD_FLAG_DF`
    pub const DF: u16 = F::DF.bits();
    /// `NBD_CMD_FLAG_REQ_ONE`
    pub const REQ_ONE: u16 = F::REQ_ONE.bits();
    /// `NBD_CMD_FLAG_FAST_ZERO`
    pub const FAST_ZERO: u16 = F::FAST_ZERO.bits();
}

/// `NBD_REPLY_TYPE_*` values.
pub mod chunk {
    use super::ChunkType as T;
    /// `NBD_REPLY_TYPE_NONE`
    pub const NONE: u16 = T::None.to_wire();
    /// `NBD_REPLY_TYPE_OFFSET_DATA`
    pub const OFFSET_DATA: u16 = T::OffsetData.to_wire();
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`
    pub const OFFSET_HOLE: u16 = T::OffsetHole.to_wire();
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`
    pub const BLOCK_STATUS: u16 = T::BlockStatus.to_wire();
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`
    pub const BLOCK_STATUS_EXT: u16 = T::BlockStatusExt.to_wire();
    /// `NBD_REPLY_TYPE_ERROR`
    pub const ERROR: u16 = T::Error.to_wire();
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`
    pub const ERROR_OFFSET: u16 = T::ErrorOffset.to_wire();
}

/// `NBD_INFO_*` values.
pub mod info {
    use super::InfoType as I;
    /// `NBD_INFO_EXPORT`
    pub const EXPORT: u16 = I::Export.to_wire();
    /// `NBD_INFO_NAME`
    pub const NAME: u16 = I::Name.to_wire();
    /// `NBD_INFO_DESCRIPTION`
    pub const DESCRIPTION: u16 = I::Description.to_wire();
    /// `NBD_INFO_BLOCK_SIZE`
    pub const BLOCK_SIZE: u16 = I::BlockSize.to_wire();
}

/// `NBD_REPLY_FLAG_DONE`
pub const DONE: u16 = ReplyFlags::DONE.bits();
/// `NBD_FLAG_FIXED_NEWSTYLE` (handshake)
pub const FIXED_NEWSTYLE: u16 = HandshakeFlags::FIXED_NEWSTYLE.bits();
/// `NBD_FLAG_NO_ZEROES` (handshake)
pub const NO_ZEROES: u16 = HandshakeFlags::NO_ZEROES.bits();
/// `NBD_FLAG_C_FIXED_NEWSTYLE`
pub const C_FIXED_NEWSTYLE: u32 = ClientFlags::FIXED_NEWSTYLE.bits();
/// `NBD_FLAG_C_NO_ZEROES`
pub const C_NO_ZEROES: u32 = ClientFlags::NO_ZEROES.bits();

/// Which reply headers the server sends in transmission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Style {
    /// Simple replies only.
    #[default]
    Simple,
    /// Structured replies negotiated.
    Structured,
    /// Extended headers negotiated.
    Extended,
}

/// One reply message in transmission: a simple reply or one chunk.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The magic it came with.
    pub magic: u32,
    /// Chunk flags (0 for a simple reply).
    pub flags: u16,
    /// Chunk type (0 for a simple reply).
    pub kind: u16,
    /// Error of a simple reply (0 for chunks).
    pub error: u32,
    /// The cookie.
    pub cookie: u64,
    /// Offset field of an extended reply (0 otherwise).
    pub offset: u64,
    /// Payload: chunk payload, or the data of a successful simple read.
    pub payload: Vec<u8>,
}

impl Reply {
    /// A simple reply.
    pub fn is_simple(&self) -> bool {
        self.magic == SIMPLE_REPLY_MAGIC
    }

    /// The last message of its request: a simple reply or a DONE chunk.
    pub fn is_final(&self) -> bool {
        self.is_simple() || self.flags & DONE != 0
    }

    /// The error this message reports: a simple reply's error, or the
    /// error field of an error chunk.
    pub fn error_value(&self) -> Option<u32> {
        if self.is_simple() {
            return (self.error != 0).then_some(self.error);
        }
        if self.kind & CHUNK_ERROR_BIT != 0 && self.payload.len() >= 4 {
            return Some(be32(&self.payload[0..4]));
        }
        None
    }
}

/// Big-endian u16 from 2 bytes.
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
/// Big-endian u32 from 4 bytes.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
/// Big-endian u64 from 8 bytes.
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The payload of `NBD_OPT_INFO`/`NBD_OPT_GO`: name length, name, count,
/// requests.
pub fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        data.extend_from_slice(&r.to_be_bytes());
    }
    data
}

/// The payload of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q.as_bytes());
    }
    data
}

/// A connection to the server under test.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
    /// Handshake flags of the greeting.
    pub handshake_flags: u16,
    /// Reply headers in use once in transmission.
    pub style: Style,
}

impl Conn {
    /// Connects, with `timeout` on connect and on every read and write.
    /// Reads nothing.
    pub fn connect_raw(uri: &NbdUri, timeout: Duration) -> Result<Conn> {
        let stream = match &uri.endpoint {
            Endpoint::Tcp { host, port } => {
                let mut last = None;
                let mut found = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = match found {
                    Some(s) => s,
                    None => {
                        return Err(CheckError::Io(last.unwrap_or_else(|| {
                            io::Error::new(io::ErrorKind::NotFound, "no address for the host")
                        })));
                    }
                };
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Stream::Tcp(s)
            }
            Endpoint::Unix(path) => {
                let s = connect_unix(path)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Stream::Unix(s)
            }
        };
        Ok(Conn {
            stream,
            handshake_flags: 0,
            style: Style::Simple,
        })
    }

    /// Connects and reads the newstyle greeting; fails on anything else.
    pub fn connect(uri: &NbdUri, timeout: Duration) -> Result<Conn> {
        let mut conn = Self::connect_raw(uri, timeout)?;
        let greeting = conn.read_exact(18)?;
        if be64(&greeting[0..8]) != NBD_MAGIC {
            return protocol("the greeting does not start with NBDMAGIC");
        }
        if be64(&greeting[8..16]) != IHAVEOPT {
            return protocol(format!(
                "the greeting's second magic is {:#x}, not IHAVEOPT (oldstyle server?)",
                be64(&greeting[8..16])
            ));
        }
        conn.handshake_flags = be16(&greeting[16..18]);
        Ok(conn)
    }

    /// Connects, reads the greeting and answers with fixed newstyle (and
    /// no-zeroes when offered): ready for options.
    pub fn open(uri: &NbdUri, timeout: Duration) -> Result<Conn> {
        let mut conn = Self::connect(uri, timeout)?;
        let mut flags = C_FIXED_NEWSTYLE;
        if conn.handshake_flags & NO_ZEROES != 0 {
            flags |= C_NO_ZEROES;
        }
        conn.send(&flags.to_be_bytes())?;
        Ok(conn)
    }

    /// Writes all of `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads exactly `n` bytes.
    pub fn read_exact(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Waits for the server to close the connection: `Ok(true)` on end of
    /// file or reset, `Ok(false)` if it sends bytes instead; an error when
    /// nothing happens before the timeout.
    pub fn closed(&mut self) -> Result<bool> {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                Ok(true)
            }
            Err(e) => Err(CheckError::Io(e)),
        }
    }

    /// Stops sending (half-close), so a server waiting for more input sees
    /// the end of it.
    pub fn shutdown_write(&mut self) {
        let _ = match &self.stream {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }

    /// Sends an option request with `data`.
    pub fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        self.send_option_len(option, data.len() as u32, data)
    }

    /// Sends an option header with a given length field and then `data`
    /// (which may disagree with it, on purpose).
    pub fn send_option_len(&mut self, option: u32, length: u32, data: &[u8]) -> Result<()> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&length.to_be_bytes());
        msg.extend_from_slice(data);
        self.send(&msg)
    }

    /// Reads one option reply, checking its magic.
    pub fn read_option_reply(&mut self) -> Result<OptReply> {
        let header = self.read_exact(20)?;
        let magic = be64(&header[0..8]);
        if magic != OPTION_REPLY_MAGIC {
            return protocol(format!(
                "option reply magic is {magic:#x}, not {OPTION_REPLY_MAGIC:#x}"
            ));
        }
        let length = be32(&header[16..20]);
        if u64::from(length) > MAX_PAYLOAD {
            return protocol(format!("option reply of {length} bytes"));
        }
        let data = self.read_exact(length as usize)?;
        Ok(OptReply {
            option: be32(&header[8..12]),
            kind: be32(&header[12..16]),
            data,
        })
    }

    /// Reads replies to `option` up to its final one (ACK or an error),
    /// checking that each names the option. The final reply is last.
    pub fn read_option_replies(&mut self, option: u32) -> Result<Vec<OptReply>> {
        let mut replies = Vec::new();
        for _ in 0..MAX_OPTION_REPLIES {
            let reply = self.read_option_reply()?;
            if reply.option != option {
                return protocol(format!(
                    "reply to option {option} names option {}",
                    reply.option
                ));
            }
            let last = reply.kind == rep::ACK || reply.is_error();
            replies.push(reply);
            if last {
                return Ok(replies);
            }
        }
        protocol(format!(
            "more than {MAX_OPTION_REPLIES} replies to option {option}"
        ))
    }

    /// Sends an option and reads all its replies.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Result<Vec<OptReply>> {
        self.send_option(option, data)?;
        self.read_option_replies(option)
    }

    /// Sends an option that takes a single reply and returns it.
    pub fn option_final(&mut self, option: u32, data: &[u8]) -> Result<OptReply> {
        let mut replies = self.option(option, data)?;
        match replies.pop() {
            Some(r) => Ok(r),
            None => protocol("no reply"),
        }
    }

    /// `NBD_OPT_LIST` answered by `NBD_REP_ACK`: the session still
    /// negotiates. Returns the final reply type on failure.
    pub fn still_negotiating(&mut self) -> Result<std::result::Result<(), String>> {
        let replies = match self.option(opt::LIST, &[]) {
            Ok(replies) => replies,
            Err(error) => {
                return Ok(Err(format!(
                    "an NBD_OPT_LIST sent next got no proper answer: {error}"
                )));
            }
        };
        match replies.last() {
            Some(r) if r.kind == rep::ACK => Ok(Ok(())),
            Some(r) => Ok(Err(format!(
                "NBD_OPT_LIST then got {} instead of NBD_REP_ACK",
                rep_name(r.kind)
            ))),
            None => protocol("no reply"),
        }
    }

    /// Sends a compact or extended request header (by `self.style`) and
    /// `payload`. `length` is the header's length field.
    pub fn request(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<()> {
        let msg = self.request_bytes(flags, command, cookie, offset, length, payload);
        self.send(&msg)
    }

    /// The bytes of a request, for rules that batch several in one write.
    pub fn request_bytes(
        &self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut msg = Vec::with_capacity(32 + payload.len());
        if self.style == Style::Extended {
            msg.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
            msg.extend_from_slice(&flags.to_be_bytes());
            msg.extend_from_slice(&command.to_be_bytes());
            msg.extend_from_slice(&cookie.to_be_bytes());
            msg.extend_from_slice(&offset.to_be_bytes());
            msg.extend_from_slice(&length.to_be_bytes());
        } else {
            msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            msg.extend_from_slice(&flags.to_be_bytes());
            msg.extend_from_slice(&command.to_be_bytes());
            msg.extend_from_slice(&cookie.to_be_bytes());
            msg.extend_from_slice(&offset.to_be_bytes());
            msg.extend_from_slice(&(length as u32).to_be_bytes());
        }
        msg.extend_from_slice(payload);
        msg
    }

    /// Reads one reply message. `read_len` is the data length a
    /// successful simple reply carries (the request was a read of that
    /// many bytes), 0 otherwise; the caller knows from the cookie.
    pub fn read_reply(&mut self, read_len: impl Fn(u64) -> usize) -> Result<Reply> {
        let head = self.read_exact(4)?;
        let magic = be32(&head);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let rest = self.read_exact(12)?;
                let error = be32(&rest[0..4]);
                let cookie = be64(&rest[4..12]);
                let payload = if error == 0 {
                    self.read_exact(read_len(cookie))?
                } else {
                    Vec::new()
                };
                Ok(Reply {
                    magic,
                    flags: 0,
                    kind: 0,
                    error,
                    cookie,
                    offset: 0,
                    payload,
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                let rest = self.read_exact(16)?;
                let length = u64::from(be32(&rest[12..16]));
                if length > MAX_PAYLOAD {
                    return protocol(format!("chunk of {length} bytes"));
                }
                let payload = self.read_exact(length as usize)?;
                Ok(Reply {
                    magic,
                    flags: be16(&rest[0..2]),
                    kind: be16(&rest[2..4]),
                    error: 0,
                    cookie: be64(&rest[4..12]),
                    offset: 0,
                    payload,
                })
            }
            EXTENDED_REPLY_MAGIC => {
                let rest = self.read_exact(28)?;
                let length = be64(&rest[20..28]);
                if length > MAX_PAYLOAD {
                    return protocol(format!("extended reply of {length} bytes"));
                }
                let payload = self.read_exact(length as usize)?;
                Ok(Reply {
                    magic,
                    flags: be16(&rest[0..2]),
                    kind: be16(&rest[2..4]),
                    error: 0,
                    cookie: be64(&rest[4..12]),
                    offset: be64(&rest[12..20]),
                    payload,
                })
            }
            other => protocol(format!("reply magic {other:#010x} is none of the three")),
        }
    }

    /// Reads every message of the reply to one request (a simple reply,
    /// or chunks up to DONE), checking they all carry `cookie`.
    pub fn read_full_reply(&mut self, cookie: u64, read_len: usize) -> Result<Vec<Reply>> {
        let mut messages = Vec::new();
        for _ in 0..MAX_CHUNKS {
            let reply = self.read_reply(|_| read_len)?;
            if reply.cookie != cookie {
                return protocol(format!(
                    "reply carries cookie {:#x}, the request {cookie:#x}",
                    reply.cookie
                ));
            }
            let last = reply.is_final();
            messages.push(reply);
            if last {
                return Ok(messages);
            }
        }
        protocol(format!("more than {MAX_CHUNKS} chunks in one reply"))
    }

    /// Sends one request and reads its whole reply.
    pub fn exchange(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<Vec<Reply>> {
        let cookie = 0x6e62_6463_6865_636b ^ (offset.rotate_left(17)) ^ u64::from(command);
        self.request(flags, command, cookie, offset, length, payload)?;
        let read_len = if command == cmd::READ {
            length as usize
        } else {
            0
        };
        self.read_full_reply(cookie, read_len)
    }

    /// Sends `NBD_CMD_DISC` (no reply).
    pub fn disconnect(&mut self) {
        let msg = self.request_bytes(0, cmd::DISC, 0, 0, 0, &[]);
        let _ = self.send(&msg);
    }
}

fn connect_unix(path: &std::path::Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if let Some(name) = bytes.strip_prefix(b"\0") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        return UnixStream::connect_addr(&addr);
    }
    UnixStream::connect(path)
}

/// The error a reply reports, if any (first error found).
pub fn reply_error(messages: &[Reply]) -> Option<u32> {
    messages.iter().find_map(Reply::error_value)
}

#[cfg(test)]
mod tests {
    use super::errno_name;

    #[test]
    fn error_values_are_named_as_sent() {
        assert_eq!(errno_name(0), "success");
        assert_eq!(errno_name(1), "EPERM");
        assert_eq!(errno_name(22), "EINVAL");
        assert_eq!(errno_name(108), "ESHUTDOWN");
        // Not defined by the spec: the number, not the EINVAL a client
        // would read it as.
        assert_eq!(errno_name(9), "error 9");
    }
}
