//! Every `nbd_core::wire` parser over arbitrary bytes.
//!
//! Each input goes through all parsers, so one corpus (whole messages such
//! as a request header, an option with its data, a reply chunk with its
//! payload) serves them all. Besides "never panics", it checks the
//! contracts documented in `nbd-core/src/wire/mod.rs`:
//!
//! - streaming: `parse` consumes a prefix and returns the rest; every
//!   shorter prefix of what it accepted gives `Incomplete { needed }` with
//!   `needed` ≥ 1 and not beyond the accepted length;
//! - what parses encodes again (`encode` writes exactly `encoded_len`
//!   bytes), the encoding parses to the same value, and for messages that
//!   keep every bit it is byte for byte the input.
//!
//! Values that borrow from their input are compared through their `Debug`
//! text, which shows every field (slices included).
#![no_main]

use core::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use nbd_core::wire::{
    BlockStatusPayload, Chunk, ChunkHeader, ChunkType, ClientFlags, Command, ExportNameReply,
    HeaderStyle, Info, OptionCode, OptionHeader, OptionReply, OptionReplyHeader, OptionReplyType,
    OptionRequest, ReplyHeader, RequestHeader, ServerHello, SimpleReply, WireError,
};

/// What a parser produced, owned, so values borrowing different buffers
/// can be compared.
struct Parsed {
    /// Bytes consumed (streaming parsers) or the payload length.
    consumed: usize,
    /// `Debug` text of the value.
    debug: String,
    /// The value encoded again.
    encoded: Vec<u8>,
    /// Whether `encoded` must equal the consumed input byte for byte.
    byte_exact: bool,
}

/// Encodes `value` into a buffer of exactly `len` bytes and checks the
/// encoder's own bookkeeping.
fn encode_exact(
    what: &str,
    len: usize,
    encode: impl FnOnce(&mut [u8]) -> Result<usize, WireError>,
) -> Vec<u8> {
    assert!(
        len <= 1 << 20,
        "{what}: encoded_len {len} is absurd for a fuzz input"
    );
    let mut buf = vec![0u8; len];
    let written = match encode(&mut buf) {
        Ok(written) => written,
        Err(e) => panic!("{what}: a parsed value does not encode: {e:?}"),
    };
    assert_eq!(
        written, len,
        "{what}: encode wrote a length other than encoded_len"
    );
    buf
}

fn parsed<T: Debug>(
    what: &str,
    consumed: usize,
    value: &T,
    len: usize,
    byte_exact: bool,
    encode: impl FnOnce(&mut [u8]) -> Result<usize, WireError>,
) -> Parsed {
    Parsed {
        consumed,
        debug: format!("{value:?}"),
        encoded: encode_exact(what, len, encode),
        byte_exact,
    }
}

/// Consumed length of a streaming parse, checking that `rest` is the tail
/// of `input`.
fn consumed(what: &str, input: &[u8], rest: &[u8]) -> usize {
    assert!(rest.len() <= input.len(), "{what}: rest longer than input");
    let n = input.len() - rest.len();
    assert!(
        core::ptr::eq(rest.as_ptr(), input[n..].as_ptr()),
        "{what}: rest is not the tail of the input"
    );
    n
}

/// Runs a streaming parser (`parse(input) -> (rest, value)`) over `data`
/// and checks the streaming and round-trip contracts.
fn check_streaming(
    what: &str,
    data: &[u8],
    parse: impl Fn(&[u8]) -> Result<Parsed, WireError>,
) -> Option<Parsed> {
    let p = match parse(data) {
        Ok(p) => p,
        Err(WireError::Incomplete { needed }) => {
            assert!(needed >= 1, "{what}: Incomplete with needed = 0");
            return None;
        }
        Err(_) => return None,
    };
    let n = p.consumed;
    assert!(n >= 1, "{what}: accepted a message of zero bytes");

    // Every shorter prefix is incomplete, and says so without overshooting.
    // Long messages are sampled (start, end, and a stride) to keep runs fast.
    let stride = if n <= 256 { 1 } else { n / 64 };
    let prefixes = (0..n).step_by(stride).chain((n.saturating_sub(32))..n);
    for k in prefixes {
        match parse(&data[..k]) {
            Err(WireError::Incomplete { needed }) => {
                assert!(
                    needed >= 1,
                    "{what}: prefix {k}/{n}: Incomplete with needed = 0"
                );
                assert!(
                    k + needed <= n,
                    "{what}: prefix {k}/{n}: claims {needed} more bytes are needed"
                );
            }
            other => panic!(
                "{what}: prefix {k} of an accepted {n}-byte message is not Incomplete: {:?}",
                other.map(|p| p.debug)
            ),
        }
    }

    check_round_trip(what, &data[..n], &p, |bytes| parse(bytes));
    Some(p)
}

/// The encoding of a parsed value parses back to the same value (and the
/// same bytes); for byte-exact messages it is the input itself.
fn check_round_trip(
    what: &str,
    input: &[u8],
    p: &Parsed,
    parse: impl Fn(&[u8]) -> Result<Parsed, WireError>,
) {
    if p.byte_exact {
        assert_eq!(
            p.encoded, input,
            "{what}: re-encoding differs from the input"
        );
    }
    let again = match parse(&p.encoded) {
        Ok(again) => again,
        Err(e) => panic!("{what}: the encoding of {} does not parse: {e:?}", p.debug),
    };
    assert_eq!(
        again.consumed,
        p.encoded.len(),
        "{what}: the re-encoding is not consumed whole"
    );
    assert_eq!(again.debug, p.debug, "{what}: round trip changed the value");
    assert_eq!(again.encoded, p.encoded, "{what}: encoding is not stable");
}

/// A payload parser (`parse_payload(data) -> value`) over `data`.
fn check_payload(what: &str, data: &[u8], parse: impl Fn(&[u8]) -> Result<Parsed, WireError>) {
    if let Ok(p) = parse(data) {
        check_round_trip(what, data, &p, parse);
    }
}

fn be_u32(data: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = data.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*head), rest))
}

fn be_u16(data: &[u8]) -> Option<(u16, &[u8])> {
    let (head, rest) = data.split_first_chunk::<2>()?;
    Some((u16::from_be_bytes(*head), rest))
}

// --- one closure per parser ------------------------------------------------

fn request_header(style: HeaderStyle) -> impl Fn(&[u8]) -> Result<Parsed, WireError> {
    move |input| {
        let (rest, h) = RequestHeader::parse(input, style)?;
        let n = consumed("RequestHeader", input, rest);
        Ok(parsed(
            "RequestHeader",
            n,
            &h,
            RequestHeader::encoded_len(style),
            true,
            |out| h.encode(style, out),
        ))
    }
}

fn request_header_any(input: &[u8]) -> Result<Parsed, WireError> {
    let (rest, (style, h)) = RequestHeader::parse_any(input)?;
    let n = consumed("RequestHeader::parse_any", input, rest);
    Ok(parsed(
        "RequestHeader::parse_any",
        n,
        &(style, h),
        RequestHeader::encoded_len(style),
        true,
        |out| h.encode(style, out),
    ))
}

fn block_status_payload(data: &[u8]) -> Result<Parsed, WireError> {
    let p = BlockStatusPayload::parse_payload(data)?;
    Ok(parsed(
        "BlockStatusPayload",
        data.len(),
        &p,
        p.encoded_len(),
        true,
        |out| p.encode(out),
    ))
}

fn option_header(input: &[u8]) -> Result<Parsed, WireError> {
    let (rest, h) = OptionHeader::parse(input)?;
    let n = consumed("OptionHeader", input, rest);
    Ok(parsed(
        "OptionHeader",
        n,
        &h,
        h.encoded_len(),
        true,
        |out| h.encode(out),
    ))
}

fn option_request(input: &[u8]) -> Result<Parsed, WireError> {
    let (rest, o) = OptionRequest::parse(input)?;
    let n = consumed("OptionRequest", input, rest);
    // NBD_OPT_ABORT drops its data, so it re-encodes shorter.
    let exact = !matches!(o, OptionRequest::Abort);
    Ok(parsed(
        "OptionRequest",
        n,
        &o,
        o.encoded_len(),
        exact,
        |out| o.encode(out),
    ))
}

/// `OptionRequest::parse_payload` of `code`; the encoding (header and
/// data) is compared without its 16-byte header.
fn option_payload(code: OptionCode) -> impl Fn(&[u8]) -> Result<Parsed, WireError> {
    move |data| {
        let o = OptionRequest::parse_payload(code, data)?;
        let exact = !matches!(o, OptionRequest::Abort);
        let mut p = parsed(
            "OptionRequest::parse_payload",
            data.len(),
            &o,
            o.encoded_len(),
            exact,
            |out| o.encode(out),
        );
        let (payload, _) = OptionHeader::parse(&p.encoded).expect("encoded option header parses");
        p.encoded = payload.to_vec();
        Ok(p)
    }
}

fn option_reply_header(input: &[u8]) -> Result<Parsed, WireError> {
    let (rest, h) = OptionReplyHeader::parse(input)?;
    let n = consumed("OptionReplyHeader", input, rest);
    Ok(parsed(
        "OptionReplyHeader",
        n,
        &h,
        h.encoded_len(),
        true,
        |out| h.encode(out),
    ))
}

fn option_reply(input: &[u8]) -> Result<Parsed, WireError> {
    let (rest, (option, r)) = OptionReply::parse(input)?;
    let n = consumed("OptionReply", input, rest);
    Ok(parsed(
        "OptionReply",
        n,
        &(option, r),
        r.encoded_len(),
        true,
        |out| r.encode(option, out),
    ))
}

/// `OptionReply::parse_payload` of `reply_type`; compared without the
/// 20-byte header.
fn option_reply_payload(
    reply_type: OptionReplyType,
) -> impl Fn(&[u8]) -> Result<Parsed, WireError> {
    move |data| {
        let r = OptionReply::parse_payload(reply_type, data)?;
        let mut p = parsed(
            "OptionReply::parse_payload",
            data.len(),
            &r,
            r.encoded_len(),
            true,
            |out| r.encode(OptionCode::Go, out),
        );
        let (payload, _) =
            OptionReplyHeader::parse(&p.encoded).expect("encoded reply header parses");
        p.encoded = payload.to_vec();
        Ok(p)
    }
}

fn info(data: &[u8]) -> Result<Parsed, WireError> {
    let i = Info::parse(data)?;
    Ok(parsed(
        "Info",
        data.len(),
        &i,
        i.encoded_len(),
        true,
        |out| i.encode(out),
    ))
}

fn reply_header(input: &[u8]) -> Result<Parsed, WireError> {
    let (rest, h) = ReplyHeader::parse(input)?;
    let n = consumed("ReplyHeader", input, rest);
    Ok(parsed("ReplyHeader", n, &h, h.encoded_len(), true, |out| {
        h.encode(out)
    }))
}

fn simple_reply(input: &[u8]) -> Result<Parsed, WireError> {
    let (rest, r) = SimpleReply::parse(input)?;
    let n = consumed("SimpleReply", input, rest);
    Ok(parsed("SimpleReply", n, &r, r.encoded_len(), true, |out| {
        r.encode(out)
    }))
}

fn chunk_header(style: HeaderStyle) -> impl Fn(&[u8]) -> Result<Parsed, WireError> {
    move |input| {
        let (rest, h) = ChunkHeader::parse(input, style)?;
        let n = consumed("ChunkHeader", input, rest);
        Ok(parsed(
            "ChunkHeader",
            n,
            &h,
            ChunkHeader::encoded_len(style),
            true,
            |out| h.encode(style, out),
        ))
    }
}

fn chunk(chunk_type: ChunkType) -> impl Fn(&[u8]) -> Result<Parsed, WireError> {
    move |data| {
        let c = Chunk::parse_payload(chunk_type, data)?;
        Ok(parsed(
            "Chunk",
            data.len(),
            &c,
            c.payload_len(),
            true,
            |out| c.encode(out),
        ))
    }
}

fn server_hello(input: &[u8]) -> Result<Parsed, WireError> {
    let (rest, h) = ServerHello::parse(input)?;
    let n = consumed("ServerHello", input, rest);
    // The oldstyle greeting's 124 trailing bytes are not checked, and
    // re-encode as zeroes.
    let exact = matches!(h, ServerHello::Newstyle(_));
    Ok(parsed(
        "ServerHello",
        n,
        &h,
        h.encoded_len(),
        exact,
        |out| h.encode(out),
    ))
}

fn export_name_reply(zeroes: bool) -> impl Fn(&[u8]) -> Result<Parsed, WireError> {
    move |input| {
        let (rest, r) = ExportNameReply::parse(input, zeroes)?;
        let n = consumed("ExportNameReply", input, rest);
        // The 124 zeroes are not checked on input.
        Ok(parsed(
            "ExportNameReply",
            n,
            &r,
            r.encoded_len(),
            !zeroes,
            |out| r.encode(out),
        ))
    }
}

fn client_flags(input: &[u8]) -> Result<Parsed, WireError> {
    let (rest, f) = ClientFlags::parse(input)?;
    let n = consumed("ClientFlags", input, rest);
    Ok(parsed("ClientFlags", n, &f, f.encoded_len(), true, |out| {
        f.encode(out)
    }))
}

fuzz_target!(|data: &[u8]| {
    // Transmission: requests, and the payload a header announces.
    for style in [HeaderStyle::Compact, HeaderStyle::Extended] {
        if let Ok((rest, h)) = RequestHeader::parse(data, style) {
            if h.command == Command::BlockStatus {
                if let Some(payload) = usize::try_from(h.length).ok().and_then(|l| rest.get(..l)) {
                    check_payload("BlockStatusPayload", payload, block_status_payload);
                }
            }
        }
        check_streaming("RequestHeader", data, request_header(style));
    }
    check_streaming("RequestHeader::parse_any", data, request_header_any);
    check_payload("BlockStatusPayload", data, block_status_payload);

    // Negotiation, client side: options, whole and as header + data.
    check_streaming("OptionHeader", data, option_header);
    check_streaming("OptionRequest", data, option_request);
    if let Some((code, payload)) = be_u32(data) {
        check_payload(
            "OptionRequest::parse_payload",
            payload,
            option_payload(OptionCode::from_wire(code)),
        );
    }

    // Negotiation, server side: option replies and their payloads.
    check_streaming("OptionReplyHeader", data, option_reply_header);
    check_streaming("OptionReply", data, option_reply);
    if let Some((reply_type, payload)) = be_u32(data) {
        check_payload(
            "OptionReply::parse_payload",
            payload,
            option_reply_payload(OptionReplyType::from_wire(reply_type)),
        );
    }
    check_payload("Info", data, info);

    // Transmission replies, and a chunk's payload after its header.
    check_streaming("ReplyHeader", data, reply_header);
    check_streaming("SimpleReply", data, simple_reply);
    for style in [HeaderStyle::Compact, HeaderStyle::Extended] {
        check_streaming("ChunkHeader", data, chunk_header(style));
        if let Ok((rest, h)) = ChunkHeader::parse(data, style) {
            if let Some(payload) = usize::try_from(h.length).ok().and_then(|l| rest.get(..l)) {
                check_payload("Chunk", payload, chunk(h.chunk_type));
            }
        }
    }
    if let Some((chunk_type, payload)) = be_u16(data) {
        check_payload("Chunk", payload, chunk(ChunkType::from_wire(chunk_type)));
    }

    // Handshake.
    check_streaming("ServerHello", data, server_hello);
    check_streaming("ExportNameReply", data, export_name_reply(true));
    check_streaming("ExportNameReply", data, export_name_reply(false));
    check_streaming("ClientFlags", data, client_flags);
});
