//! A hand-written NBD client: fixed newstyle, `NBD_OPT_EXPORT_NAME`,
//! optionally structured replies.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_FLAG_SEND_TRIM` in the transmission flags.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_FUA: u16 = 1;

pub struct Client {
    pub stream: TcpStream,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    handle: u64,
    read_base: Option<u64>,
}

/// One reply: error code and, for reads, the data (holes filled with
/// zeroes) and the offset of a structured error.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub error: u32,
    pub data: Vec<u8>,
    pub error_offset: Option<u64>,
}

impl Client {
    pub fn connect(port: u16, structured: bool) -> Self {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        // FIXED_NEWSTYLE | NO_ZEROES
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        if structured {
            option(&mut stream, 8, b"");
            let mut reply = [0u8; 20];
            stream.read_exact(&mut reply).unwrap();
            assert_eq!(u32::from_be_bytes(reply[12..16].try_into().unwrap()), 1);
        }
        option(&mut stream, 1, b"card");
        let mut info = [0u8; 10];
        stream.read_exact(&mut info).unwrap();
        Self {
            stream,
            size: u64::from_be_bytes(info[..8].try_into().unwrap()),
            flags: u16::from_be_bytes(info[8..].try_into().unwrap()),
            structured,
            handle: 0,
            read_base: None,
        }
    }

    /// Sends a request; returns its handle.
    pub fn send(&mut self, command: u16, flags: u16, offset: u64, length: u32, data: &[u8]) -> u64 {
        self.handle += 1;
        let header = crate::common::request_header(flags, command, self.handle, offset, length);
        self.stream.write_all(&header).unwrap();
        self.stream.write_all(data).unwrap();
        self.handle
    }

    /// Receives the reply to `handle` (replies come in order here), with
    /// `read_len` bytes of data for a read.
    pub fn receive(&mut self, handle: u64, read_len: usize) -> Reply {
        let mut magic = [0u8; 4];
        self.stream.read_exact(&mut magic).unwrap();
        if u32::from_be_bytes(magic) == SIMPLE_MAGIC {
            let mut header = [0u8; 12];
            self.stream.read_exact(&mut header).unwrap();
            let error = u32::from_be_bytes(header[..4].try_into().unwrap());
            assert_eq!(u64::from_be_bytes(header[4..].try_into().unwrap()), handle);
            let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
            self.stream.read_exact(&mut data).unwrap();
            return Reply {
                error,
                data,
                error_offset: None,
            };
        }
        assert!(self.structured, "structured reply on a simple connection");
        let mut reply = Reply {
            error: 0,
            data: vec![0u8; read_len],
            error_offset: None,
        };
        let base = self.read_base.take();
        let mut first = true;
        loop {
            let mut header = [0u8; 20];
            if first {
                header[..4].copy_from_slice(&magic);
                self.stream.read_exact(&mut header[4..]).unwrap();
                first = false;
            } else {
                self.stream.read_exact(&mut header).unwrap();
            }
            assert_eq!(
                u32::from_be_bytes(header[..4].try_into().unwrap()),
                STRUCTURED_MAGIC
            );
            let flags = u16::from_be_bytes(header[4..6].try_into().unwrap());
            let kind = u16::from_be_bytes(header[6..8].try_into().unwrap());
            assert_eq!(
                u64::from_be_bytes(header[8..16].try_into().unwrap()),
                handle
            );
            let len = u32::from_be_bytes(header[16..].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; len];
            self.stream.read_exact(&mut payload).unwrap();
            match kind {
                0 => {}
                1 => {
                    let offset = u64::from_be_bytes(payload[..8].try_into().unwrap());
                    let at = (offset - base.unwrap()) as usize;
                    reply.data[at..at + len - 8].copy_from_slice(&payload[8..]);
                }
                2 => {}
                0x8001 | 0x8002 => {
                    reply.error = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    if kind == 0x8002 {
                        let msg = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
                        reply.error_offset = Some(u64::from_be_bytes(
                            payload[6 + msg..14 + msg].try_into().unwrap(),
                        ));
                    }
                }
                other => panic!("unexpected chunk type {other}"),
            }
            if flags & 1 != 0 {
                break;
            }
        }
        if reply.error != 0 {
            reply.data.clear();
        }
        reply
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Reply {
        let handle = self.send(CMD_READ, 0, offset, len, &[]);
        self.read_base = Some(offset);
        self.receive(handle, len as usize)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        let handle = self.send(CMD_WRITE, flags, offset, data.len() as u32, data);
        self.receive(handle, 0).error
    }

    pub fn command(&mut self, command: u16, offset: u64, len: u32) -> u32 {
        let handle = self.send(command, 0, offset, len, &[]);
        self.receive(handle, 0).error
    }

    pub fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0, &[]);
        let mut rest = Vec::new();
        let _ = self.stream.read_to_end(&mut rest);
        assert!(rest.is_empty(), "bytes after disconnect: {rest:?}");
    }
}

fn option(stream: &mut TcpStream, code: u32, data: &[u8]) {
    let mut bytes = Vec::new();
    bytes.extend(IHAVEOPT.to_be_bytes());
    bytes.extend(code.to_be_bytes());
    bytes.extend((data.len() as u32).to_be_bytes());
    bytes.extend(data);
    stream.write_all(&bytes).unwrap();
}
