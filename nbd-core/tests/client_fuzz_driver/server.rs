//! The fuzzed server: messages shaped after what the client asked, mostly
//! well-formed answers (so conversations reach transmission and requests
//! finish) and sometimes near misses (wrong types, pieces out of range,
//! the other header style).

use super::messages::{chunk, ext_chunk, greeting, option_reply, simple_reply};
use super::{Bytes, Driver, TRACKED};
use nbd_core::client::RequestId;
use nbd_core::wire::{Command, CommandFlags};

/// Transmission flags of a generous export: every command and flag.
const ALL_FLAGS: u16 = 0x0fed;

impl<const R: usize, const B: usize> Driver<R, B> {
    /// Appends a server message shaped after the conversation so far.
    pub(super) fn generate(&mut self, bytes: &mut Bytes<'_>) {
        // The server answers what it received: the client first takes in
        // what came before, and sends what became due.
        let piece = usize::from(bytes.u8()).max(1);
        self.feed(usize::MAX, piece);
        self.drain();
        if self.client.is_closed() {
            return;
        }
        if !self.greeted {
            self.stream
                .extend_from_slice(&greeting(u16::from(bytes.u8() & 3 | 1)));
            return;
        }
        let kind = bytes.u8();
        let valid = kind < 240;
        let message = if self.client.export().is_none() {
            if valid {
                self.answer_option(bytes)
            } else {
                self.near_miss_option(bytes)
            }
        } else {
            let live: Vec<RequestId> = {
                let mut ids: Vec<_> = self
                    .issued
                    .iter()
                    .filter(|(_, r)| r.sent)
                    .map(|(id, _)| *id)
                    .collect();
                ids.sort();
                ids
            };
            let Some(&id) = live.get(usize::from(bytes.u8()) % live.len().max(1)) else {
                return;
            };
            if valid {
                self.answer_request(id, bytes)
            } else {
                self.near_miss_reply(id, bytes)
            }
        };
        self.stream.extend_from_slice(&message);
    }

    /// A complete, well-formed answer to the last option.
    fn answer_option(&self, bytes: &mut Bytes<'_>) -> Vec<u8> {
        let option = self.last_option;
        let refuse = bytes.u8() < 32;
        match option {
            1 => {
                let mut out = export_size(bytes).to_be_bytes().to_vec();
                out.extend_from_slice(&flags(bytes).to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0; 124]);
                }
                out
            }
            5 | 8 | 11 if refuse => option_reply(option, 0x8000_0001, b"unsupported"),
            3 => {
                let mut out = Vec::new();
                for i in 0..bytes.u8() % 3 {
                    let mut data = 5u32.to_be_bytes().to_vec();
                    data.extend_from_slice(format!("disk{i}described").as_bytes());
                    out.extend(option_reply(3, 2, &data));
                }
                out.extend(option_reply(3, 1, &[]));
                out
            }
            6 | 7 if refuse => {
                let reply_type = if bytes.u8() & 1 == 0 { 1 } else { 6 };
                option_reply(option, 0x8000_0000 | reply_type, b"refused")
            }
            6 | 7 => {
                let mut data = vec![0, 0];
                data.extend_from_slice(&export_size(bytes).to_be_bytes());
                data.extend_from_slice(&flags(bytes).to_be_bytes());
                let mut out = option_reply(option, 3, &data);
                if bytes.u8() & 1 == 0 {
                    let sizes: [[u32; 3]; 3] = [
                        [1, 4096, 1 << 25],
                        [512, 4096, 65536],
                        [4096, 4096, 1 << 20],
                    ];
                    let mut data = vec![0, 3];
                    for v in sizes[usize::from(bytes.u8() % 3)] {
                        data.extend_from_slice(&v.to_be_bytes());
                    }
                    out.extend(option_reply(option, 3, &data));
                }
                out.extend(option_reply(option, 3, b"\x00\x01disk"));
                out.extend(option_reply(option, 1, &[]));
                out
            }
            9 | 10 => {
                let mut out = Vec::new();
                for id in 1..=u32::from(bytes.u8() % 3) {
                    let mut data = if option == 10 { id } else { 0 }.to_be_bytes().to_vec();
                    data.extend_from_slice(b"base:allocation");
                    out.extend(option_reply(option, 4, &data));
                }
                out.extend(option_reply(option, 1, &[]));
                out
            }
            _ => option_reply(option, 1, &[]),
        }
    }

    /// An option reply that may be wrong in type, option or content.
    fn near_miss_option(&self, bytes: &mut Bytes<'_>) -> Vec<u8> {
        let option = if bytes.u8() & 1 == 0 {
            u32::from(bytes.u8() % 12)
        } else {
            self.last_option
        };
        match bytes.u8() % 6 {
            0 => {
                let mut data = vec![0, 0];
                data.extend_from_slice(&bytes.u64().to_be_bytes());
                data.extend_from_slice(&bytes.u16().to_be_bytes());
                option_reply(option, 3, &data)
            }
            1 => {
                let mut data = vec![0, 3];
                for _ in 0..3 {
                    data.extend_from_slice(&bytes.u32().to_be_bytes());
                }
                option_reply(option, 3, &data)
            }
            2 => {
                let mut data = u32::from(bytes.u8() % 4).to_be_bytes().to_vec();
                data.extend_from_slice(b"base:allocation");
                option_reply(option, 4, &data)
            }
            3 => {
                let len = usize::from(bytes.u8() % 32);
                let name_len = u32::from(bytes.u8() % 40);
                let mut data = name_len.to_be_bytes().to_vec();
                data.extend_from_slice(bytes.take(len));
                option_reply(option, 2, &data)
            }
            4 => option_reply(option, 0x8000_0000 | u32::from(bytes.u8() % 12), b"no"),
            _ => {
                let reply_type = bytes.u32();
                let len = usize::from(bytes.u8() % 32);
                option_reply(option, reply_type, bytes.take(len))
            }
        }
    }

    /// A complete, well-formed reply to request `id`.
    fn answer_request(&self, id: RequestId, bytes: &mut Bytes<'_>) -> Vec<u8> {
        let r = &self.issued[&id];
        let features = self.client.features();
        let cookie = id.cookie();
        let (offset, length) = (r.offset, r.length);
        let reply = |flags: u16, chunk_type: u16, payload: &[u8]| {
            if features.extended_headers {
                ext_chunk(flags, chunk_type, cookie, offset, payload)
            } else {
                chunk(flags, chunk_type, cookie, payload)
            }
        };
        let fail = bytes.u8() < 24;
        if !features.structured_replies {
            if fail || (r.command == Command::Read && length > TRACKED) {
                return simple_reply(5, cookie);
            }
            let mut out = simple_reply(0, cookie);
            if r.command == Command::Read {
                out.extend((0..length).map(|i| i as u8));
            }
            return out;
        }
        if fail {
            let mut payload = 5u32.to_be_bytes().to_vec();
            payload.extend_from_slice(&[0, 3, b'b', b'a', b'd']);
            return reply(1, 0x8001, &payload);
        }
        match r.command {
            Command::Read if length <= TRACKED => {
                // Up to three pieces, data or hole, in a rotated order.
                let cuts = if r.flags.contains(CommandFlags::DF) {
                    vec![0, length]
                } else {
                    let mut cuts = vec![0, length];
                    for _ in 0..bytes.u8() % 3 {
                        cuts.push(u64::from(bytes.u16()) % length);
                    }
                    cuts.sort();
                    cuts.dedup();
                    cuts
                };
                let mut pieces: Vec<Vec<u8>> = cuts
                    .windows(2)
                    .map(|w| {
                        let (start, end) = (offset + w[0], offset + w[1]);
                        let mut payload = start.to_be_bytes().to_vec();
                        if bytes.u8() & 1 == 0 || end - start > u64::from(u32::MAX) {
                            payload.extend((start..end).map(|i| i as u8));
                            reply(0, 1, &payload)
                        } else {
                            payload.extend_from_slice(&((end - start) as u32).to_be_bytes());
                            reply(0, 2, &payload)
                        }
                    })
                    .collect();
                let turn = usize::from(bytes.u8()) % pieces.len();
                pieces.rotate_left(turn);
                pieces.push(reply(1, 0, &[]));
                pieces.concat()
            }
            Command::BlockStatus => {
                let size = self.client.export_size().unwrap_or(0);
                let mut out = Vec::new();
                for (i, context) in self.contexts.iter().enumerate() {
                    let count = if r.flags.contains(CommandFlags::REQ_ONE) {
                        1
                    } else {
                        1 + bytes.u8() % 3
                    };
                    let mut at = offset;
                    let mut descriptors = Vec::new();
                    for _ in 0..count {
                        let room = size.saturating_sub(at);
                        let mut len = (u64::from(bytes.u8() % 16) + 1) * 512;
                        if r.flags.contains(CommandFlags::REQ_ONE) {
                            len = len.min(length);
                        }
                        let len = len.min(room).min(u64::from(u32::MAX));
                        if len == 0 {
                            break;
                        }
                        descriptors.push((len, u64::from(bytes.u8() % 4)));
                        at += len;
                    }
                    let mut payload = context.to_be_bytes().to_vec();
                    if features.extended_headers {
                        payload.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
                    }
                    for (len, status) in &descriptors {
                        if features.extended_headers {
                            payload.extend_from_slice(&len.to_be_bytes());
                            payload.extend_from_slice(&status.to_be_bytes());
                        } else {
                            payload.extend_from_slice(&(*len as u32).to_be_bytes());
                            payload.extend_from_slice(&(*status as u32).to_be_bytes());
                        }
                    }
                    let last = u16::from(i + 1 == self.contexts.len());
                    let chunk_type = if features.extended_headers { 6 } else { 5 };
                    out.extend(reply(last, chunk_type, &payload));
                }
                if out.is_empty() {
                    out = reply(1, 0, &[]);
                }
                out
            }
            // Too long to track: refused with NBD_EOVERFLOW.
            Command::Read => reply(1, 0x8001, &[0, 0, 0, 75, 0, 0]),
            _ if bytes.u8() & 1 == 0 && !features.extended_headers => simple_reply(0, cookie),
            _ => reply(1, 0, &[]),
        }
    }

    /// A reply to request `id` that may break a rule: a piece out of range,
    /// a final chunk too early, the other header style, a wrong type.
    fn near_miss_reply(&self, id: RequestId, bytes: &mut Bytes<'_>) -> Vec<u8> {
        let r = &self.issued[&id];
        let cookie = id.cookie();
        let (offset, length) = (r.offset, r.length);
        let kind = bytes.u8();
        let extended = self.client.features().extended_headers ^ (kind & 0x80 != 0);
        let done = u16::from(kind & 0x40 != 0);
        let reply = |flags: u16, chunk_type: u16, payload: &[u8]| {
            if extended {
                ext_chunk(flags, chunk_type, cookie, offset, payload)
            } else {
                chunk(flags, chunk_type, cookie, payload)
            }
        };
        // A piece near the request's range, sometimes outside it.
        let piece = |bytes: &mut Bytes<'_>| {
            let span = length.max(1);
            let start = u64::from(bytes.u16()) % (span + 2);
            let len = (u64::from(bytes.u16()) % span).max(1);
            (offset.wrapping_add(start).wrapping_sub(1), len.min(4096))
        };
        match kind % 7 {
            0 => simple_reply(if kind & 8 == 0 { 0 } else { 5 }, cookie),
            1 => reply(done, 0, &[]),
            2 => {
                let (at, len) = piece(bytes);
                let mut payload = at.to_be_bytes().to_vec();
                payload.extend((0..len).map(|i| i as u8));
                reply(done, 1, &payload)
            }
            3 => {
                let (at, len) = piece(bytes);
                let mut payload = at.to_be_bytes().to_vec();
                payload.extend_from_slice(&(len as u32).to_be_bytes());
                reply(done, 2, &payload)
            }
            4 => {
                let (at, _) = piece(bytes);
                let mut payload = u32::from(bytes.u8()).to_be_bytes().to_vec();
                payload.extend_from_slice(&[0, 0]);
                payload.extend_from_slice(&at.to_be_bytes());
                reply(done, 0x8002, &payload)
            }
            5 => {
                let context = u32::from(bytes.u8() % 4);
                let mut payload = context.to_be_bytes().to_vec();
                let count = bytes.u8() % 3;
                if extended {
                    payload.extend_from_slice(&u32::from(count).to_be_bytes());
                }
                for _ in 0..count {
                    let len = u64::from(bytes.u16()) * 512;
                    if extended {
                        payload.extend_from_slice(&len.to_be_bytes());
                        payload.extend_from_slice(&0u64.to_be_bytes());
                    } else {
                        payload.extend_from_slice(&(len as u32).to_be_bytes());
                        payload.extend_from_slice(&0u32.to_be_bytes());
                    }
                }
                reply(done, if extended { 6 } else { 5 }, &payload)
            }
            _ => {
                let chunk_type = bytes.u16();
                let len = usize::from(bytes.u8() % 24);
                reply(done, chunk_type, bytes.take(len))
            }
        }
    }
}

fn export_size(bytes: &mut Bytes<'_>) -> u64 {
    match bytes.u8() % 8 {
        0 => 0,
        1 => 4096,
        2 => 1000,
        3 => bytes.u64(),
        _ => 1 << 20,
    }
}

fn flags(bytes: &mut Bytes<'_>) -> u16 {
    if bytes.u8() < 192 {
        ALL_FLAGS
    } else {
        bytes.u16() | 1
    }
}
