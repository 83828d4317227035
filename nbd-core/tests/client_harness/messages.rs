//! Server message builders (big-endian, written out by hand, not with the
//! core's encoders). Shared by the client tests (through `client_harness`)
//! and the `client_fuzz_driver`'s fuzzed server.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub fn greeting(flags: u16) -> Vec<u8> {
    let mut out = NBDMAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = REPLY_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

pub fn ack(option: u32) -> Vec<u8> {
    option_reply(option, 1, &[])
}

pub fn info_export(option: u32, size: u64, flags: u16) -> Vec<u8> {
    let mut data = 0u16.to_be_bytes().to_vec();
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    option_reply(option, 3, &data)
}

pub fn info_block_size(option: u32, minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut data = 3u16.to_be_bytes().to_vec();
    for v in [minimum, preferred, maximum] {
        data.extend_from_slice(&v.to_be_bytes());
    }
    option_reply(option, 3, &data)
}

pub fn meta_context(option: u32, id: u32, name: &[u8]) -> Vec<u8> {
    let mut data = id.to_be_bytes().to_vec();
    data.extend_from_slice(name);
    option_reply(option, 4, &data)
}

pub fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut out = 0x6744_6698u32.to_be_bytes().to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk (compact header).
pub fn chunk(flags: u16, chunk_type: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = 0x668e_33efu32.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk_type.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An extended reply chunk.
pub fn ext_chunk(flags: u16, chunk_type: u16, cookie: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = 0x6e8a_278cu32.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk_type.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub const DONE: u16 = 1;
pub const NONE: u16 = 0;
pub const OFFSET_DATA: u16 = 1;
pub const OFFSET_HOLE: u16 = 2;
pub const BLOCK_STATUS: u16 = 5;
pub const BLOCK_STATUS_EXT: u16 = 6;
pub const ERROR: u16 = 0x8001;
pub const ERROR_OFFSET: u16 = 0x8002;

pub fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = offset.to_be_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

pub fn hole_payload(offset: u64, size: u32) -> Vec<u8> {
    let mut out = offset.to_be_bytes().to_vec();
    out.extend_from_slice(&size.to_be_bytes());
    out
}

pub fn error_payload(error: u32, message: &[u8]) -> Vec<u8> {
    let mut out = error.to_be_bytes().to_vec();
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    out
}

pub fn error_offset_payload(error: u32, message: &[u8], offset: u64) -> Vec<u8> {
    let mut out = error_payload(error, message);
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

pub fn status_payload(context_id: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let mut out = context_id.to_be_bytes().to_vec();
    for (length, status) in descriptors {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&status.to_be_bytes());
    }
    out
}

pub fn status_ext_payload(context_id: u32, descriptors: &[(u64, u64)]) -> Vec<u8> {
    let mut out = context_id.to_be_bytes().to_vec();
    out.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
    for (length, status) in descriptors {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&status.to_be_bytes());
    }
    out
}
