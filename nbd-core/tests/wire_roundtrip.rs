//! Wire layer round trips: every message encodes, parses back equal, and
//! consumes exactly its encoded length; every strict prefix of a streaming
//! message is `Incomplete`; no input makes a parser panic; and a few fixed
//! encodings are checked byte for byte against the spec's constants.

use core::fmt::Debug;

use nbd_core::wire::{
    BlockSizeConstraints, BlockStatusPayload, Chunk, ChunkHeader, ChunkPrefix, ChunkType,
    ClientFlags, Command, CommandFlags, Descriptor, ERROR_OFFSET_TRAILER_LEN, ExportNameReply,
    ExtDescriptor, Greeting, HELLO_MAGICS_LEN, HandshakeFlags, HeaderStyle, HelloStyle, Info,
    InfoRequest, InfoType, MetaContextRequest, OldstyleGreeting, OptionCode, OptionHeader,
    OptionReply, OptionReplyHeader, OptionReplyType, OptionRequest, REPLY_MAGIC_LEN, ReplyFlags,
    ReplyHeader, ReplyKind, RequestHeader, STATUS_CONTEXT_ID_LEN, STATUS_EFFECT_LEN, ServerHello,
    SimpleReply, TransmissionFlags, WireError, WireList,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Bytes appended after an encoding to check that parsers stop at its end.
const TRAILER: &[u8] = b"\xde\xad\xbe";

/// Encodes with `encode` into an exactly sized buffer, checks the length it
/// reports and that a buffer one byte short is refused with the right
/// `needed`, and returns the encoding followed by [`TRAILER`].
fn encode_checked(
    encoded_len: usize,
    encode: impl Fn(&mut [u8]) -> Result<usize, WireError>,
) -> Vec<u8> {
    let mut buf = vec![0xa5; encoded_len + 7];
    assert_eq!(
        encode(&mut buf),
        Ok(encoded_len),
        "encode into a larger buffer"
    );
    let mut exact = vec![0x5a; encoded_len];
    assert_eq!(
        encode(&mut exact),
        Ok(encoded_len),
        "encode into an exact buffer"
    );
    assert_eq!(
        &buf[..encoded_len],
        &exact[..],
        "encoding depends on the buffer"
    );
    if encoded_len > 0 {
        let mut short = vec![0; encoded_len - 1];
        assert_eq!(
            encode(&mut short),
            Err(WireError::BufferTooSmall {
                needed: encoded_len
            }),
            "encode into a short buffer"
        );
    }
    exact.extend_from_slice(TRAILER);
    exact
}

/// Checks a streaming parser on `buf` (an encoding of `len` bytes followed
/// by [`TRAILER`]): it parses `expected`, leaves the trailer, and every
/// strict prefix is `Incomplete` with a plausible (or, when `exact_needed`,
/// exact) count of missing bytes.
fn check_stream<'b, T: PartialEq + Debug>(
    buf: &'b [u8],
    len: usize,
    expected: &T,
    exact_needed: bool,
    parse: impl Fn(&'b [u8]) -> Result<(&'b [u8], T), WireError>,
) {
    let (rest, value) = parse(buf).expect("parse with trailer");
    assert_eq!(&value, expected);
    assert_eq!(
        rest, TRAILER,
        "parser consumed other than encoded_len bytes"
    );
    let (rest, value) = parse(&buf[..len]).expect("parse exact");
    assert_eq!(&value, expected);
    assert!(rest.is_empty());
    for cut in 0..len {
        match parse(&buf[..cut]) {
            Err(WireError::Incomplete { needed }) => {
                assert!(
                    needed >= 1 && needed <= len - cut,
                    "needed {needed} at {cut}/{len}"
                );
                if exact_needed {
                    assert_eq!(needed, len - cut, "needed at {cut}/{len}");
                }
            }
            other => panic!("prefix {cut}/{len} gave {other:?}, not Incomplete"),
        }
    }
}

/// Checks a payload parser on `data`: it parses `expected`. When the
/// payload's layout fixes its own length (`self_delimited`), every strict
/// prefix is an error; otherwise a prefix may parse, but only to a value
/// that re-encodes to exactly that prefix (never a wrong value).
fn check_payload<'b, T: PartialEq + Debug>(
    data: &'b [u8],
    expected: &T,
    self_delimited: bool,
    parse: impl Fn(&'b [u8]) -> Result<T, WireError>,
    reencode: impl Fn(&T) -> Vec<u8>,
) {
    assert_eq!(parse(data).as_ref(), Ok(expected));
    for cut in 0..data.len() {
        match parse(&data[..cut]) {
            Err(_) => {}
            Ok(value) if !self_delimited => {
                assert_eq!(
                    reencode(&value),
                    &data[..cut],
                    "prefix {cut} parsed to {value:?}"
                );
            }
            Ok(value) => panic!("prefix {cut}/{} parsed to {value:?}", data.len()),
        }
    }
}

fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| {
            u8::from_str_radix(core::str::from_utf8(pair).expect("ascii"), 16).expect("hex")
        })
        .collect()
}

fn encode_to_vec(len: usize, encode: impl Fn(&mut [u8]) -> Result<usize, WireError>) -> Vec<u8> {
    let mut buf = vec![0; len];
    let written = encode(&mut buf).expect("encode");
    buf.truncate(written);
    buf
}

fn option_request_bytes(request: &OptionRequest<'_>) -> Vec<u8> {
    encode_to_vec(request.encoded_len(), |out| request.encode(out))
}

fn option_payload_bytes(request: &OptionRequest<'_>) -> Vec<u8> {
    option_request_bytes(request)[16..].to_vec()
}

fn option_reply_payload_bytes(reply: &OptionReply<'_>) -> Vec<u8> {
    encode_to_vec(reply.encoded_len(), |out| reply.encode(OptionCode::Go, out))[20..].to_vec()
}

fn info_bytes(info: &Info<'_>) -> Vec<u8> {
    encode_to_vec(info.encoded_len(), |out| info.encode(out))
}

fn chunk_bytes(chunk: &Chunk<'_>) -> Vec<u8> {
    encode_to_vec(chunk.payload_len(), |out| chunk.encode(out))
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=max)
}

fn nonempty_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..=max)
}

fn style() -> impl Strategy<Value = HeaderStyle> {
    prop_oneof![Just(HeaderStyle::Compact), Just(HeaderStyle::Extended)]
}

/// Option codes that parse as `OptionRequest::Unknown`.
fn unknown_option_code() -> impl Strategy<Value = OptionCode> {
    prop_oneof![Just(4u32), 12u32.., Just(0u32)].prop_map(OptionCode::from_wire)
}

/// Everything needed to build any option request; built in the test body
/// because requests borrow their strings.
#[derive(Clone, Debug)]
struct OptionParts {
    kind: u8,
    name: Vec<u8>,
    info_requests: Vec<u16>,
    queries: Vec<Vec<u8>>,
    unknown_code: OptionCode,
}

fn option_parts() -> impl Strategy<Value = OptionParts> {
    (
        0u8..11,
        bytes(300),
        prop::collection::vec(any::<u16>(), 0..24),
        prop::collection::vec(bytes(80), 0..6),
        unknown_option_code(),
    )
        .prop_map(
            |(kind, name, info_requests, queries, unknown_code)| OptionParts {
                kind,
                name,
                info_requests,
                queries,
                unknown_code,
            },
        )
}

fn build_option<'a>(parts: &'a OptionParts, queries: &'a [&'a [u8]]) -> OptionRequest<'a> {
    let info = InfoRequest {
        name: &parts.name,
        requests: WireList::Items(&parts.info_requests),
    };
    let meta = MetaContextRequest {
        export_name: &parts.name,
        queries: WireList::Items(queries),
    };
    match parts.kind {
        0 => OptionRequest::ExportName { name: &parts.name },
        1 => OptionRequest::Abort,
        2 => OptionRequest::List,
        3 => OptionRequest::StartTls,
        4 => OptionRequest::Info(info),
        5 => OptionRequest::Go(info),
        6 => OptionRequest::StructuredReply,
        7 => OptionRequest::ListMetaContext(meta),
        8 => OptionRequest::SetMetaContext(meta),
        9 => OptionRequest::ExtendedHeaders,
        _ => OptionRequest::Unknown {
            code: parts.unknown_code,
            data: &parts.name,
        },
    }
}

/// Whether an option's data fixes its own length (so a truncated payload
/// must be an error).
fn option_self_delimited(request: &OptionRequest<'_>) -> bool {
    matches!(
        request,
        OptionRequest::Info(_)
            | OptionRequest::Go(_)
            | OptionRequest::ListMetaContext(_)
            | OptionRequest::SetMetaContext(_)
    )
}

#[derive(Clone, Debug)]
enum InfoParts {
    Export(u64, u16),
    Name(Vec<u8>),
    Description(Vec<u8>),
    BlockSize(u32, u32, u32),
    Unknown(u16, Vec<u8>),
}

fn info_parts() -> impl Strategy<Value = InfoParts> {
    prop_oneof![
        (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| InfoParts::Export(size, flags)),
        bytes(300).prop_map(InfoParts::Name),
        bytes(300).prop_map(InfoParts::Description),
        (any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(a, b, c)| InfoParts::BlockSize(a, b, c)),
        (4u16.., bytes(100)).prop_map(|(t, data)| InfoParts::Unknown(t, data)),
    ]
}

fn build_info(parts: &InfoParts) -> Info<'_> {
    match parts {
        InfoParts::Export(size, flags) => Info::Export {
            size: *size,
            flags: TransmissionFlags(*flags),
        },
        InfoParts::Name(name) => Info::Name(name),
        InfoParts::Description(text) => Info::Description(text),
        InfoParts::BlockSize(minimum, preferred, maximum) => {
            Info::BlockSize(BlockSizeConstraints {
                minimum: *minimum,
                preferred: *preferred,
                maximum: *maximum,
            })
        }
        InfoParts::Unknown(info_type, data) => Info::Unknown {
            info_type: *info_type,
            data,
        },
    }
}

fn info_self_delimited(info: &Info<'_>) -> bool {
    matches!(info, Info::Export { .. } | Info::BlockSize(_))
}

#[derive(Clone, Debug)]
enum ReplyParts {
    Ack,
    Server(Vec<u8>, Vec<u8>),
    Info(InfoParts),
    MetaContext(u32, Vec<u8>),
    Error(u32, Vec<u8>),
    Unknown(u32, Vec<u8>),
}

fn reply_parts() -> impl Strategy<Value = ReplyParts> {
    prop_oneof![
        Just(ReplyParts::Ack),
        (bytes(200), bytes(200)).prop_map(|(name, details)| ReplyParts::Server(name, details)),
        info_parts().prop_map(ReplyParts::Info),
        (any::<u32>(), bytes(200)).prop_map(|(id, name)| ReplyParts::MetaContext(id, name)),
        (any::<u32>(), bytes(200))
            .prop_map(|(raw, message)| ReplyParts::Error(raw | 0x8000_0000, message)),
        (5u32..0x8000_0000, bytes(200)).prop_map(|(raw, data)| ReplyParts::Unknown(raw, data)),
        (0u32..1, bytes(200)).prop_map(|(raw, data)| ReplyParts::Unknown(raw, data)),
    ]
}

fn build_reply(parts: &ReplyParts) -> OptionReply<'_> {
    match parts {
        ReplyParts::Ack => OptionReply::Ack,
        ReplyParts::Server(name, details) => OptionReply::Server { name, details },
        ReplyParts::Info(info) => OptionReply::Info(build_info(info)),
        ReplyParts::MetaContext(id, name) => OptionReply::MetaContext { id: *id, name },
        ReplyParts::Error(raw, message) => OptionReply::Error {
            reply_type: OptionReplyType::from_wire(*raw),
            message,
        },
        ReplyParts::Unknown(raw, data) => OptionReply::Unknown {
            reply_type: *raw,
            data,
        },
    }
}

fn reply_self_delimited(reply: &OptionReply<'_>) -> bool {
    match reply {
        OptionReply::Ack => true,
        OptionReply::Info(info) => info_self_delimited(info),
        _ => false,
    }
}

#[derive(Clone, Debug)]
enum ChunkParts {
    None,
    OffsetData(u64, Vec<u8>),
    OffsetHole(u64, u32),
    BlockStatus(u32, Vec<Descriptor>),
    BlockStatusExt(u32, Vec<ExtDescriptor>),
    Error(u32, Vec<u8>),
    ErrorOffset(u32, Vec<u8>, u64),
    Unknown(ChunkType, Vec<u8>),
}

fn descriptor() -> impl Strategy<Value = Descriptor> {
    (any::<u32>(), any::<u32>()).prop_map(|(length, status)| Descriptor { length, status })
}

fn ext_descriptor() -> impl Strategy<Value = ExtDescriptor> {
    (any::<u64>(), any::<u64>()).prop_map(|(length, status)| ExtDescriptor { length, status })
}

fn unknown_chunk_type() -> impl Strategy<Value = ChunkType> {
    any::<u16>()
        .prop_map(ChunkType::from_wire)
        .prop_filter("unknown chunk type", |t| matches!(t, ChunkType::Unknown(_)))
}

fn chunk_parts() -> impl Strategy<Value = ChunkParts> {
    prop_oneof![
        Just(ChunkParts::None),
        (any::<u64>(), nonempty_bytes(300)).prop_map(|(o, d)| ChunkParts::OffsetData(o, d)),
        (any::<u64>(), 1u32..).prop_map(|(o, s)| ChunkParts::OffsetHole(o, s)),
        (any::<u32>(), prop::collection::vec(descriptor(), 1..20))
            .prop_map(|(id, d)| ChunkParts::BlockStatus(id, d)),
        (any::<u32>(), prop::collection::vec(ext_descriptor(), 1..20))
            .prop_map(|(id, d)| ChunkParts::BlockStatusExt(id, d)),
        (1u32.., bytes(300)).prop_map(|(e, m)| ChunkParts::Error(e, m)),
        (1u32.., bytes(300), any::<u64>()).prop_map(|(e, m, o)| ChunkParts::ErrorOffset(e, m, o)),
        (unknown_chunk_type(), bytes(300)).prop_map(|(t, d)| ChunkParts::Unknown(t, d)),
    ]
}

fn build_chunk(parts: &ChunkParts) -> Chunk<'_> {
    match parts {
        ChunkParts::None => Chunk::None,
        ChunkParts::OffsetData(offset, data) => Chunk::OffsetData {
            offset: *offset,
            data,
        },
        ChunkParts::OffsetHole(offset, size) => Chunk::OffsetHole {
            offset: *offset,
            size: *size,
        },
        ChunkParts::BlockStatus(context_id, descriptors) => Chunk::BlockStatus {
            context_id: *context_id,
            descriptors: WireList::Items(descriptors),
        },
        ChunkParts::BlockStatusExt(context_id, descriptors) => Chunk::BlockStatusExt {
            context_id: *context_id,
            descriptors: WireList::Items(descriptors),
        },
        ChunkParts::Error(error, message) => Chunk::Error {
            error: *error,
            message,
        },
        ChunkParts::ErrorOffset(error, message, offset) => Chunk::ErrorOffset {
            error: *error,
            message,
            offset: *offset,
        },
        ChunkParts::Unknown(chunk_type, data) => Chunk::Unknown {
            chunk_type: *chunk_type,
            data,
        },
    }
}

fn chunk_self_delimited(chunk: &Chunk<'_>) -> bool {
    !matches!(
        chunk,
        Chunk::OffsetData { .. } | Chunk::BlockStatus { .. } | Chunk::Unknown { .. }
    )
}

fn request_header(style: HeaderStyle) -> impl Strategy<Value = RequestHeader> {
    let length = match style {
        HeaderStyle::Compact => (0..=u64::from(u32::MAX)).boxed(),
        HeaderStyle::Extended => any::<u64>().boxed(),
    };
    (
        any::<u16>(),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        length,
    )
        .prop_map(|(flags, command, cookie, offset, length)| RequestHeader {
            flags: CommandFlags(flags),
            command: Command::from_wire(command),
            cookie,
            offset,
            length,
        })
}

fn chunk_header(style: HeaderStyle) -> impl Strategy<Value = ChunkHeader> {
    let (offset, length) = match style {
        HeaderStyle::Compact => (Just(0u64).boxed(), (0..=u64::from(u32::MAX)).boxed()),
        HeaderStyle::Extended => (any::<u64>().boxed(), any::<u64>().boxed()),
    };
    (any::<u16>(), any::<u16>(), any::<u64>(), offset, length).prop_map(
        |(flags, chunk_type, cookie, offset, length)| ChunkHeader {
            flags: ReplyFlags(flags),
            chunk_type: ChunkType::from_wire(chunk_type),
            cookie,
            offset,
            length,
        },
    )
}

fn styled_request_header() -> impl Strategy<Value = (HeaderStyle, RequestHeader)> {
    style().prop_flat_map(|style| request_header(style).prop_map(move |h| (style, h)))
}

fn styled_chunk_header() -> impl Strategy<Value = (HeaderStyle, ChunkHeader)> {
    style().prop_flat_map(|style| chunk_header(style).prop_map(move |h| (style, h)))
}

// ---------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn greeting_round_trips(flags in any::<u16>()) {
        let greeting = Greeting { flags: HandshakeFlags(flags) };
        let buf = encode_checked(greeting.encoded_len(), |out| greeting.encode(out));
        check_stream(&buf, 18, &greeting, true, Greeting::parse);
        let hello = ServerHello::Newstyle(greeting);
        prop_assert_eq!(hello.encoded_len(), 18);
        check_stream(&buf, 18, &hello, false, ServerHello::parse);
    }

    #[test]
    fn oldstyle_greeting_round_trips(size in any::<u64>(), flags in any::<u32>()) {
        let greeting = OldstyleGreeting { size, flags };
        let buf = encode_checked(greeting.encoded_len(), |out| greeting.encode(out));
        prop_assert!(buf[28..152].iter().all(|&b| b == 0));
        check_stream(&buf, 152, &greeting, true, OldstyleGreeting::parse);
        let hello = ServerHello::Oldstyle(greeting);
        let buf = encode_checked(hello.encoded_len(), |out| hello.encode(out));
        check_stream(&buf, 152, &hello, false, ServerHello::parse);
    }

    #[test]
    fn export_name_reply_round_trips(size in any::<u64>(), flags in any::<u16>(), zeroes in any::<bool>()) {
        let reply = ExportNameReply { size, flags: TransmissionFlags(flags), zeroes };
        let len = reply.encoded_len();
        prop_assert_eq!(len, if zeroes { 134 } else { 10 });
        let buf = encode_checked(len, |out| reply.encode(out));
        check_stream(&buf, len, &reply, true, |input| ExportNameReply::parse(input, zeroes));
    }

    #[test]
    fn client_flags_round_trip(bits in any::<u32>()) {
        let flags = ClientFlags(bits);
        let buf = encode_checked(flags.encoded_len(), |out| flags.encode(out));
        check_stream(&buf, 4, &flags, true, ClientFlags::parse);
    }

    #[test]
    fn option_header_round_trips(code in any::<u32>(), length in any::<u32>()) {
        let header = OptionHeader { code: OptionCode::from_wire(code), length };
        let buf = encode_checked(header.encoded_len(), |out| header.encode(out));
        check_stream(&buf, 16, &header, true, OptionHeader::parse);
    }

    #[test]
    fn option_request_round_trips(parts in option_parts()) {
        let queries: Vec<&[u8]> = parts.queries.iter().map(Vec::as_slice).collect();
        let request = build_option(&parts, &queries);
        let len = request.encoded_len();
        prop_assert_eq!(len, 16 + request.payload_len());
        let buf = encode_checked(len, |out| request.encode(out));

        let (_, header) = OptionHeader::parse(&buf).expect("header");
        prop_assert_eq!(header.code, request.code());
        prop_assert_eq!(header.length as usize, request.payload_len());

        check_stream(&buf, len, &request, false, OptionRequest::parse);
        check_payload(
            &buf[16..len],
            &request,
            option_self_delimited(&request),
            |data| OptionRequest::parse_payload(request.code(), data),
            option_payload_bytes,
        );
    }

    #[test]
    fn option_reply_header_round_trips(option in any::<u32>(), reply_type in any::<u32>(), length in any::<u32>()) {
        let header = OptionReplyHeader {
            option: OptionCode::from_wire(option),
            reply_type: OptionReplyType::from_wire(reply_type),
            length,
        };
        let buf = encode_checked(header.encoded_len(), |out| header.encode(out));
        check_stream(&buf, 20, &header, true, OptionReplyHeader::parse);
    }

    #[test]
    fn option_reply_round_trips(parts in reply_parts(), option in any::<u32>()) {
        let reply = build_reply(&parts);
        let option = OptionCode::from_wire(option);
        let len = reply.encoded_len();
        prop_assert_eq!(len, 20 + reply.payload_len());
        let buf = encode_checked(len, |out| reply.encode(option, out));

        let (_, header) = OptionReplyHeader::parse(&buf).expect("header");
        prop_assert_eq!(header.reply_type, reply.reply_type());
        prop_assert_eq!(header.length as usize, reply.payload_len());

        check_stream(&buf, len, &(option, reply), false, OptionReply::parse);
        check_payload(
            &buf[20..len],
            &reply,
            reply_self_delimited(&reply),
            |data| OptionReply::parse_payload(reply.reply_type(), data),
            option_reply_payload_bytes,
        );
    }

    #[test]
    fn info_round_trips(parts in info_parts()) {
        let info = build_info(&parts);
        let buf = encode_checked(info.encoded_len(), |out| info.encode(out));
        let data = &buf[..info.encoded_len()];
        prop_assert_eq!(InfoType::from_wire(u16::from_be_bytes([data[0], data[1]])), info.info_type());
        check_payload(data, &info, info_self_delimited(&info), Info::parse, info_bytes);
    }

    #[test]
    fn request_header_round_trips((style, header) in styled_request_header()) {
        let len = RequestHeader::encoded_len(style);
        prop_assert_eq!(len, match style { HeaderStyle::Compact => 28, HeaderStyle::Extended => 32 });
        let buf = encode_checked(len, |out| header.encode(style, out));
        check_stream(&buf, len, &header, true, |input| RequestHeader::parse(input, style));
        check_stream(&buf, len, &(style, header), false, RequestHeader::parse_any);
    }

    #[test]
    fn block_status_payload_round_trips(effect_length in any::<u64>(), ids in prop::collection::vec(any::<u32>(), 0..40)) {
        let payload = BlockStatusPayload { effect_length, context_ids: WireList::Items(&ids) };
        let len = payload.encoded_len();
        prop_assert_eq!(len, 8 + 4 * ids.len());
        let buf = encode_checked(len, |out| payload.encode(out));
        check_payload(&buf[..len], &payload, false, BlockStatusPayload::parse_payload, |p| {
            encode_to_vec(p.encoded_len(), |out| p.encode(out))
        });
    }

    #[test]
    fn simple_reply_round_trips(error in any::<u32>(), cookie in any::<u64>()) {
        let reply = SimpleReply { error, cookie };
        let buf = encode_checked(reply.encoded_len(), |out| reply.encode(out));
        check_stream(&buf, 16, &reply, true, SimpleReply::parse);
        let any = ReplyHeader::Simple(reply);
        check_stream(&buf, 16, &any, true, ReplyHeader::parse);
    }

    #[test]
    fn chunk_header_round_trips((style, header) in styled_chunk_header()) {
        let len = ChunkHeader::encoded_len(style);
        prop_assert_eq!(len, match style { HeaderStyle::Compact => 20, HeaderStyle::Extended => 32 });
        let buf = encode_checked(len, |out| header.encode(style, out));
        check_stream(&buf, len, &header, true, |input| ChunkHeader::parse(input, style));
        let any = match style {
            HeaderStyle::Compact => ReplyHeader::Structured(header),
            HeaderStyle::Extended => ReplyHeader::Extended(header),
        };
        prop_assert_eq!(any.encoded_len(), len);
        let buf = encode_checked(len, |out| any.encode(out));
        // Before the magic is in, only the shortest (simple) length is known.
        check_stream(&buf, len, &any, false, ReplyHeader::parse);
    }

    #[test]
    fn chunk_round_trips(parts in chunk_parts()) {
        let chunk = build_chunk(&parts);
        let len = chunk.payload_len();
        let buf = encode_checked(len, |out| chunk.encode(out));
        check_payload(
            &buf[..len],
            &chunk,
            chunk_self_delimited(&chunk),
            |data| Chunk::parse_payload(chunk.chunk_type(), data),
            chunk_bytes,
        );
    }

    #[test]
    fn chunk_with_header_round_trips(
        parts in chunk_parts(),
        style in style(),
        flags in any::<u16>(),
        cookie in any::<u64>(),
        offset in any::<u64>(),
    ) {
        let chunk = build_chunk(&parts);
        let flags = ReplyFlags(flags);
        let len = chunk.encoded_len_with_header(style);
        let buf = encode_checked(len, |out| chunk.encode_with_header(flags, cookie, offset, style, out));
        let expected_header = ChunkHeader {
            flags,
            chunk_type: chunk.chunk_type(),
            cookie,
            offset: match style { HeaderStyle::Compact => 0, HeaderStyle::Extended => offset },
            length: chunk.payload_len() as u64,
        };
        let (rest, header) = ChunkHeader::parse(&buf, style).expect("chunk header");
        prop_assert_eq!(header, expected_header);
        let payload = &rest[..chunk.payload_len()];
        prop_assert_eq!(&rest[chunk.payload_len()..], TRAILER);
        prop_assert_eq!(Chunk::parse_payload(header.chunk_type, payload), Ok(chunk));
    }
}

// ---------------------------------------------------------------------------
// Fixed prefixes: what the state machines encode into their scratch and
// parse as fields arrive, with the variable tails sent or read apart
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn option_request_prefix_and_tails_make_the_encoding(parts in option_parts()) {
        let queries: Vec<&[u8]> = parts.queries.iter().map(Vec::as_slice).collect();
        let request = build_option(&parts, &queries);
        let whole = encode_to_vec(request.encoded_len(), |out| request.encode(out));
        let prefix_len = request.prefix_len();
        let mut joined = encode_checked(prefix_len, |out| request.encode_prefix(out));
        joined.truncate(prefix_len);
        match request {
            OptionRequest::Info(info) | OptionRequest::Go(info) => {
                joined.extend_from_slice(info.name);
                let len = 2 + 2 * info.requests.len();
                joined.extend(encode_checked(len, |out| {
                    InfoRequest::encode_requests(info.requests.iter(), out)
                }).drain(..len));
            }
            OptionRequest::ListMetaContext(meta) | OptionRequest::SetMetaContext(meta) => {
                joined.extend_from_slice(meta.export_name);
                let len = MetaContextRequest::queries_len(meta.queries.iter());
                joined.extend(encode_checked(len, |out| {
                    MetaContextRequest::encode_queries(meta.queries.iter(), out)
                }).drain(..len));
            }
            OptionRequest::ExportName { name } | OptionRequest::Unknown { data: name, .. } => {
                joined.extend_from_slice(name);
            }
            _ => {}
        }
        prop_assert_eq!(joined, whole);
    }

    #[test]
    fn option_reply_prefix_and_tails_make_the_encoding(parts in reply_parts(), option in any::<u32>()) {
        let reply = build_reply(&parts);
        let option = OptionCode::from_wire(option);
        let whole = encode_to_vec(reply.encoded_len(), |out| reply.encode(option, out));
        let prefix_len = reply.prefix_len();
        let mut joined = encode_checked(prefix_len, |out| reply.encode_prefix(option, out));
        joined.truncate(prefix_len);
        for tail in reply.tails() {
            joined.extend_from_slice(tail);
        }
        prop_assert_eq!(joined, whole);
    }

    #[test]
    fn info_prefix_and_tail_make_the_encoding(parts in info_parts()) {
        let info = build_info(&parts);
        let prefix_len = info.prefix_len();
        let mut joined = encode_checked(prefix_len, |out| info.encode_prefix(out));
        joined.truncate(prefix_len);
        joined.extend_from_slice(info.tail());
        prop_assert_eq!(joined, info_bytes(&info));
    }

    #[test]
    fn chunk_prefix_round_trips(
        parts in chunk_parts(),
        style in style(),
        flags in any::<u16>(),
        cookie in any::<u64>(),
        offset in any::<u64>(),
    ) {
        let chunk = build_chunk(&parts);
        let Some(prefix) = chunk.prefix() else {
            // Unknown types have no known layout.
            let unknown = matches!(chunk, Chunk::Unknown { .. });
            prop_assert!(unknown);
            return Ok(());
        };
        prop_assert_eq!(prefix.chunk_type(), chunk.chunk_type());
        prop_assert_eq!(prefix.payload_len(), chunk.payload_len() as u64);
        let flags = ReplyFlags(flags);
        // The prefix with its header is how the whole chunk starts.
        let head_len = prefix.encoded_len_with_header(style);
        let head = encode_checked(head_len, |out| prefix.encode_with_header(flags, cookie, offset, style, out));
        let whole = encode_to_vec(chunk.encoded_len_with_header(style), |out| {
            chunk.encode_with_header(flags, cookie, offset, style, out)
        });
        prop_assert_eq!(&head[..head_len], &whole[..head_len]);
        // Parsed as fields arrive, from the payload's front.
        let payload = chunk_bytes(&chunk);
        let fixed = prefix.encoded_len();
        prop_assert_eq!(ChunkPrefix::fixed_len(chunk.chunk_type()), Some(fixed));
        prop_assert_eq!(ChunkPrefix::check_length(chunk.chunk_type(), prefix.payload_len()), Ok(()));
        let mut buf = payload[..fixed].to_vec();
        buf.extend_from_slice(TRAILER);
        check_stream(&buf, fixed, &prefix, true, |input| {
            ChunkPrefix::parse(chunk.chunk_type(), prefix.payload_len(), input)
        });
        if let Chunk::ErrorOffset { offset, message, .. } = chunk {
            let trailer = &payload[fixed + message.len()..];
            let mut buf = trailer.to_vec();
            buf.extend_from_slice(TRAILER);
            check_stream(&buf, ERROR_OFFSET_TRAILER_LEN, &offset, true, ChunkPrefix::parse_error_offset);
            let encoded = encode_checked(ERROR_OFFSET_TRAILER_LEN, |out| ChunkPrefix::encode_error_offset(offset, out));
            prop_assert_eq!(&encoded[..ERROR_OFFSET_TRAILER_LEN], trailer);
        }
        // A length one byte past what the fields announce is refused
        // (read data alone takes whatever length the header gives).
        if !matches!(prefix, ChunkPrefix::OffsetData { .. }) {
            let parsed = ChunkPrefix::parse(chunk.chunk_type(), prefix.payload_len() + 1, &payload);
            prop_assert!(parsed.is_err(), "{:?}", parsed);
        }
    }

    #[test]
    fn block_status_payload_fields_parse_as_they_arrive(effect_length in any::<u64>(), ids in prop::collection::vec(any::<u32>(), 0..8)) {
        let payload = BlockStatusPayload { effect_length, context_ids: WireList::Items(&ids) };
        let buf = encode_to_vec(payload.encoded_len(), |out| payload.encode(out));
        let mut field = buf[..STATUS_EFFECT_LEN].to_vec();
        field.extend_from_slice(TRAILER);
        check_stream(&field, STATUS_EFFECT_LEN, &effect_length, true, BlockStatusPayload::parse_effect_length);
        for (i, id) in ids.iter().enumerate() {
            let at = STATUS_EFFECT_LEN + i * STATUS_CONTEXT_ID_LEN;
            let mut field = buf[at..at + STATUS_CONTEXT_ID_LEN].to_vec();
            field.extend_from_slice(TRAILER);
            check_stream(&field, STATUS_CONTEXT_ID_LEN, id, true, BlockStatusPayload::parse_context_id);
        }
    }

    #[test]
    fn reply_kind_is_told_by_the_magic((style, header) in styled_chunk_header(), error in any::<u32>(), cookie in any::<u64>()) {
        let simple = SimpleReply { error, cookie };
        let chunk = match style {
            HeaderStyle::Compact => ReplyHeader::Structured(header),
            HeaderStyle::Extended => ReplyHeader::Extended(header),
        };
        for (any, kind) in [
            (ReplyHeader::Simple(simple), ReplyKind::Simple),
            (chunk, if style == HeaderStyle::Compact { ReplyKind::Structured } else { ReplyKind::Extended }),
        ] {
            let whole = encode_to_vec(any.encoded_len(), |out| any.encode(out));
            prop_assert_eq!(kind.header_len(), any.encoded_len());
            let mut buf = whole[..REPLY_MAGIC_LEN].to_vec();
            buf.extend_from_slice(TRAILER);
            check_stream(&buf, REPLY_MAGIC_LEN, &kind, true, ReplyHeader::parse_kind);
        }
    }
}

#[test]
fn hello_style_is_told_by_the_magics() {
    let newstyle = Greeting {
        flags: HandshakeFlags(3),
    };
    let oldstyle = OldstyleGreeting { size: 1, flags: 0 };
    let new = encode_to_vec(18, |out| newstyle.encode(out));
    let old = encode_to_vec(152, |out| oldstyle.encode(out));
    for (bytes, style) in [(&new, HelloStyle::Newstyle), (&old, HelloStyle::Oldstyle)] {
        let (rest, found) = ServerHello::parse_style(bytes).expect("style");
        assert_eq!(found, style);
        assert_eq!(rest, &bytes[HELLO_MAGICS_LEN..]);
        for cut in 0..HELLO_MAGICS_LEN {
            assert_eq!(
                ServerHello::parse_style(&bytes[..cut]),
                Err(WireError::Incomplete {
                    needed: HELLO_MAGICS_LEN - cut
                })
            );
        }
    }
    let mut other = new.clone();
    other[15] ^= 1;
    assert!(matches!(
        ServerHello::parse_style(&other),
        Err(WireError::BadMagic { .. })
    ));
    assert_eq!(
        ReplyHeader::parse_kind(&hex("25609513")),
        Err(WireError::BadMagic { found: 0x2560_9513 })
    );
}

// ---------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------

/// Feeds `input` to every parser. Canonical parsers (whose every accepted
/// input is the unique encoding of its value) must re-encode what they
/// accepted to the very bytes they consumed.
fn parse_everything(input: &[u8], code: u32, reply_type: u32, chunk_type: u16) {
    fn consumed<'a>(input: &'a [u8], rest: &'a [u8]) -> &'a [u8] {
        &input[..input.len() - rest.len()]
    }

    if let Ok((rest, v)) = Greeting::parse(input) {
        assert_eq!(
            encode_to_vec(v.encoded_len(), |o| v.encode(o)),
            consumed(input, rest)
        );
    }
    if let Ok((rest, _)) = OldstyleGreeting::parse(input) {
        assert_eq!(input.len() - rest.len(), 152);
    }
    let _ = ServerHello::parse(input);
    for zeroes in [false, true] {
        if let Ok((rest, v)) = ExportNameReply::parse(input, zeroes) {
            assert_eq!(input.len() - rest.len(), v.encoded_len());
        }
    }
    if let Ok((rest, v)) = ClientFlags::parse(input) {
        assert_eq!(encode_to_vec(4, |o| v.encode(o)), consumed(input, rest));
    }
    if let Ok((rest, v)) = OptionHeader::parse(input) {
        assert_eq!(encode_to_vec(16, |o| v.encode(o)), consumed(input, rest));
    }
    if let Ok((rest, v)) = OptionRequest::parse(input)
        && v != OptionRequest::Abort
    {
        assert_eq!(option_request_bytes(&v), consumed(input, rest));
    }
    if let Ok(v) = OptionRequest::parse_payload(OptionCode::from_wire(code), input)
        && v != OptionRequest::Abort
    {
        assert_eq!(option_payload_bytes(&v), input);
    }
    if let Ok((rest, v)) = OptionReplyHeader::parse(input) {
        assert_eq!(encode_to_vec(20, |o| v.encode(o)), consumed(input, rest));
    }
    if let Ok((rest, (option, v))) = OptionReply::parse(input) {
        assert_eq!(
            encode_to_vec(v.encoded_len(), |o| v.encode(option, o)),
            consumed(input, rest)
        );
    }
    if let Ok(v) = OptionReply::parse_payload(OptionReplyType::from_wire(reply_type), input) {
        assert_eq!(option_reply_payload_bytes(&v), input);
    }
    if let Ok(v) = Info::parse(input) {
        assert_eq!(info_bytes(&v), input);
    }
    for style in [HeaderStyle::Compact, HeaderStyle::Extended] {
        if let Ok((rest, v)) = RequestHeader::parse(input, style) {
            let len = RequestHeader::encoded_len(style);
            assert_eq!(
                encode_to_vec(len, |o| v.encode(style, o)),
                consumed(input, rest)
            );
        }
        if let Ok((rest, v)) = ChunkHeader::parse(input, style) {
            let len = ChunkHeader::encoded_len(style);
            assert_eq!(
                encode_to_vec(len, |o| v.encode(style, o)),
                consumed(input, rest)
            );
        }
    }
    if let Ok((rest, (style, v))) = RequestHeader::parse_any(input) {
        let len = RequestHeader::encoded_len(style);
        assert_eq!(
            encode_to_vec(len, |o| v.encode(style, o)),
            consumed(input, rest)
        );
    }
    if let Ok(v) = BlockStatusPayload::parse_payload(input) {
        assert_eq!(encode_to_vec(v.encoded_len(), |o| v.encode(o)), input);
    }
    if let Ok((rest, v)) = SimpleReply::parse(input) {
        assert_eq!(encode_to_vec(16, |o| v.encode(o)), consumed(input, rest));
    }
    if let Ok((rest, v)) = ReplyHeader::parse(input) {
        assert_eq!(
            encode_to_vec(v.encoded_len(), |o| v.encode(o)),
            consumed(input, rest)
        );
    }
    if let Ok(v) = Chunk::parse_payload(ChunkType::from_wire(chunk_type), input) {
        assert_eq!(chunk_bytes(&v), input);
    }
}

/// Magic numbers and type codes worth putting in front of random bytes so
/// fuzzing reaches past the first field.
fn interesting_prefix() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(hex("4e42444d41474943 49484156454f5054")),
        Just(hex("4e42444d41474943 0000420281861253")),
        Just(hex("49484156454f5054")),
        Just(hex("0003e889045565a9")),
        Just(hex("25609513")),
        Just(hex("21e41c71")),
        Just(hex("67446698")),
        Just(hex("668e33ef")),
        Just(hex("6e8a278c")),
        (0u32..16, 0u32..64).prop_map(|(code, len)| {
            let mut v = hex("49484156454f5054");
            v.extend_from_slice(&code.to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
            v
        }),
        (0u32..8, 0u32..64).prop_map(|(reply_type, len)| {
            let mut v = hex("0003e889045565a9 00000007");
            v.extend_from_slice(&(reply_type | (reply_type & 4) << 29).to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
            v
        }),
    ]
}

fn interesting_code() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..13, any::<u32>()]
}

fn interesting_reply_type() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..6, 0x8000_0000u32..0x8000_000c, any::<u32>()]
}

fn interesting_chunk_type() -> impl Strategy<Value = u16> {
    prop_oneof![0u16..8, 0x8000u16..0x8003, any::<u16>()]
}

/// Small lengths and counts are likelier to match the bytes around them.
fn small_field_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![3 => Just(0u8), 2 => 0u8..16, 5 => any::<u8>()],
        0..512,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        input in prop_oneof![bytes(511), small_field_bytes()],
        code in interesting_code(),
        reply_type in interesting_reply_type(),
        chunk_type in interesting_chunk_type(),
    ) {
        parse_everything(&input, code, reply_type, chunk_type);
    }

    #[test]
    fn prefixed_bytes_never_panic(
        prefix in interesting_prefix(),
        body in prop_oneof![bytes(400), small_field_bytes()],
        code in interesting_code(),
        reply_type in interesting_reply_type(),
        chunk_type in interesting_chunk_type(),
    ) {
        let mut input = prefix;
        input.extend_from_slice(&body);
        parse_everything(&input, code, reply_type, chunk_type);
    }

    #[test]
    fn corrupted_encodings_never_panic(
        parts in option_parts(),
        reply in reply_parts(),
        chunk in chunk_parts(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let queries: Vec<&[u8]> = parts.queries.iter().map(Vec::as_slice).collect();
        let request = build_option(&parts, &queries);
        let reply = build_reply(&reply);
        let chunk = build_chunk(&chunk);
        let encodings = [
            option_request_bytes(&request),
            encode_to_vec(reply.encoded_len(), |o| reply.encode(OptionCode::Go, o)),
            chunk_bytes(&chunk),
        ];
        for mut bytes in encodings {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            parse_everything(&bytes, request.code().to_wire(), reply.reply_type().to_wire(), chunk.chunk_type().to_wire());
            if bytes.len() > 16 {
                parse_everything(&bytes[16..], request.code().to_wire(), reply.reply_type().to_wire(), chunk.chunk_type().to_wire());
            }
            if bytes.len() > 20 {
                parse_everything(&bytes[20..], request.code().to_wire(), reply.reply_type().to_wire(), chunk.chunk_type().to_wire());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Fixed encodings against the spec's constants
// ---------------------------------------------------------------------------

#[test]
fn greeting_bytes() {
    let greeting = Greeting {
        flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
    };
    let bytes = encode_to_vec(18, |o| greeting.encode(o));
    assert_eq!(bytes, hex("4e42444d41474943 49484156454f5054 0003"));
}

#[test]
fn oldstyle_greeting_bytes() {
    let greeting = OldstyleGreeting {
        size: 0x1_0000_0000,
        flags: 0x0001_0003,
    };
    let bytes = encode_to_vec(152, |o| greeting.encode(o));
    assert_eq!(
        bytes[..28],
        hex("4e42444d41474943 0000420281861253 0000000100000000 00010003")[..]
    );
    assert_eq!(
        ServerHello::parse(&bytes),
        Ok((&[][..], ServerHello::Oldstyle(greeting)))
    );
}

#[test]
fn server_hello_refuses_other_magic() {
    let bytes = hex("4e42444d41474943 0123456789abcdef 0003");
    assert_eq!(
        ServerHello::parse(&bytes),
        Err(WireError::BadMagic {
            found: 0x0123_4567_89ab_cdef
        })
    );
    let bytes = hex("4e42444d41474945");
    assert_eq!(
        ServerHello::parse(&bytes),
        Err(WireError::BadMagic {
            found: 0x4e42_444d_4147_4945
        })
    );
    // A wrong first magic is refused as soon as it is all there.
    assert_eq!(
        Greeting::parse(&bytes),
        Err(WireError::BadMagic {
            found: 0x4e42_444d_4147_4945
        })
    );
}

#[test]
fn export_name_reply_bytes() {
    let reply = ExportNameReply {
        size: 0x4000_0000,
        flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH,
        zeroes: true,
    };
    let bytes = encode_to_vec(134, |o| reply.encode(o));
    assert_eq!(bytes[..10], hex("0000000040000000 0005")[..]);
    assert!(bytes[10..].iter().all(|&b| b == 0));
    assert_eq!(
        ExportNameReply::parse(&bytes[..10], true),
        Err(WireError::Incomplete { needed: 124 })
    );
}

#[test]
fn client_flags_bytes() {
    let flags = ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES;
    assert_eq!(encode_to_vec(4, |o| flags.encode(o)), hex("00000003"));
}

#[test]
fn compact_read_request_bytes() {
    let header = RequestHeader {
        flags: CommandFlags::FUA,
        command: Command::Read,
        cookie: 0x0102_0304_0506_0708,
        offset: 0x1000,
        length: 0x200,
    };
    let expected = hex("25609513 0001 0000 0102030405060708 0000000000001000 00000200");
    assert_eq!(
        encode_to_vec(28, |o| header.encode(HeaderStyle::Compact, o)),
        expected
    );
    assert_eq!(
        RequestHeader::parse_any(&expected),
        Ok((&[][..], (HeaderStyle::Compact, header)))
    );
    assert_eq!(
        RequestHeader::parse(&expected, HeaderStyle::Extended),
        Err(WireError::BadMagic { found: 0x2560_9513 })
    );
}

#[test]
fn extended_write_request_bytes() {
    let header = RequestHeader {
        flags: CommandFlags::PAYLOAD_LEN,
        command: Command::Write,
        cookie: 7,
        offset: 0x1_0000_0000,
        length: 0x1_0000_0000,
    };
    let expected = hex("21e41c71 0020 0001 0000000000000007 0000000100000000 0000000100000000");
    assert_eq!(
        encode_to_vec(32, |o| header.encode(HeaderStyle::Extended, o)),
        expected
    );
    assert_eq!(
        RequestHeader::parse_any(&expected),
        Ok((&[][..], (HeaderStyle::Extended, header)))
    );
    // A compact header cannot carry a 64-bit length.
    let mut buf = [0; 28];
    assert_eq!(
        header.encode(HeaderStyle::Compact, &mut buf),
        Err(WireError::InvalidValue("length"))
    );
}

#[test]
fn request_magic_is_checked() {
    assert_eq!(
        RequestHeader::parse_any(&hex("2560")),
        Err(WireError::Incomplete { needed: 26 })
    );
    assert_eq!(
        RequestHeader::parse_any(&hex("67446698 0000")),
        Err(WireError::BadMagic { found: 0x6744_6698 })
    );
}

#[test]
fn simple_reply_bytes() {
    let reply = SimpleReply {
        error: 28,
        cookie: 0xfeed,
    };
    let expected = hex("67446698 0000001c 000000000000feed");
    assert_eq!(encode_to_vec(16, |o| reply.encode(o)), expected);
    assert_eq!(
        ReplyHeader::parse(&expected),
        Ok((&[][..], ReplyHeader::Simple(reply)))
    );
}

#[test]
fn structured_reply_header_bytes() {
    let header = ChunkHeader {
        flags: ReplyFlags::DONE,
        chunk_type: ChunkType::Error,
        cookie: 3,
        offset: 0x999, // not sent in a structured header
        length: 10,
    };
    let expected = hex("668e33ef 0001 8001 0000000000000003 0000000a");
    assert_eq!(
        encode_to_vec(20, |o| header.encode(HeaderStyle::Compact, o)),
        expected
    );
    let parsed = ChunkHeader {
        offset: 0,
        ..header
    };
    assert_eq!(
        ReplyHeader::parse(&expected),
        Ok((&[][..], ReplyHeader::Structured(parsed)))
    );
}

#[test]
fn extended_reply_header_bytes() {
    let header = ChunkHeader {
        flags: ReplyFlags::DONE,
        chunk_type: ChunkType::OffsetData,
        cookie: 1,
        offset: 0x2000,
        length: 0x10,
    };
    let expected = hex("6e8a278c 0001 0001 0000000000000001 0000000000002000 0000000000000010");
    assert_eq!(
        encode_to_vec(32, |o| header.encode(HeaderStyle::Extended, o)),
        expected
    );
    assert_eq!(
        ReplyHeader::parse(&expected),
        Ok((&[][..], ReplyHeader::Extended(header)))
    );
}

#[test]
fn err_unsup_reply_bytes() {
    let reply = OptionReply::Error {
        reply_type: OptionReplyType::ErrUnsupported,
        message: b"",
    };
    let expected = hex("0003e889045565a9 0000002a 80000001 00000000");
    assert_eq!(
        encode_to_vec(20, |o| reply.encode(OptionCode::from_wire(42), o)),
        expected
    );
    assert_eq!(OptionReplyType::ErrUnsupported.to_wire(), 0x8000_0001);
    assert_eq!(
        OptionReply::parse(&expected),
        Ok((&[][..], (OptionCode::Unknown(42), reply)))
    );
    // An unknown error type is still an error, message kept.
    assert_eq!(
        OptionReply::parse_payload(OptionReplyType::from_wire(0x8000_00ff), b"why"),
        Ok(OptionReply::Error {
            reply_type: OptionReplyType::Unknown(0x8000_00ff),
            message: b"why"
        })
    );
    // The type of an `Error` must have bit 31 set.
    let bad = OptionReply::Error {
        reply_type: OptionReplyType::Ack,
        message: b"",
    };
    assert_eq!(
        bad.encode(OptionCode::Go, &mut [0; 20]),
        Err(WireError::InvalidValue("reply type"))
    );
}

#[test]
fn go_request_bytes() {
    let types = [InfoType::BlockSize.to_wire()];
    let request = OptionRequest::Go(InfoRequest {
        name: b"x",
        requests: WireList::Items(&types),
    });
    let expected = hex("49484156454f5054 00000007 00000009 00000001 78 0001 0003");
    assert_eq!(option_request_bytes(&request), expected);
    let (rest, parsed) = OptionRequest::parse(&expected).expect("go");
    assert!(rest.is_empty());
    let OptionRequest::Go(info) = parsed else {
        panic!("not GO: {parsed:?}")
    };
    assert_eq!(info.name, b"x");
    assert_eq!(info.info_types().collect::<Vec<_>>(), [InfoType::BlockSize]);
}

#[test]
fn info_reply_bytes() {
    let reply = OptionReply::Info(Info::Export {
        size: 0x10_0000,
        flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY,
    });
    let expected = hex("0003e889045565a9 00000007 00000003 0000000c 0000 0000000000100000 0003");
    assert_eq!(
        encode_to_vec(32, |o| reply.encode(OptionCode::Go, o)),
        expected
    );
    let block_size = Info::BlockSize(BlockSizeConstraints {
        minimum: 1,
        preferred: 4096,
        maximum: 0x200_0000,
    });
    assert_eq!(
        info_bytes(&block_size),
        hex("0003 00000001 00001000 02000000")
    );
    // Fixed-size info types must have exactly their length.
    assert_eq!(
        Info::parse(&hex("0000 0000000000100000 0003 00")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        Info::parse(&hex("0003 00000001 00001000 020000")),
        Err(WireError::BadLength)
    );
    assert_eq!(Info::parse(&hex("00")), Err(WireError::BadLength));
    assert_eq!(Info::parse(&hex("0001")), Ok(Info::Name(b"")));
}

#[test]
fn meta_context_request_bytes() {
    let queries: [&[u8]; 2] = [b"base:allocation", b"qemu:"];
    let request = OptionRequest::SetMetaContext(MetaContextRequest {
        export_name: b"disk",
        queries: WireList::Items(&queries),
    });
    let expected = hex("49484156454f5054 0000000a 00000028
         00000004 6469736b 00000002
         0000000f 626173653a616c6c6f636174696f6e
         00000005 71656d753a");
    assert_eq!(option_request_bytes(&request), expected);
    assert_eq!(OptionRequest::parse(&expected), Ok((&[][..], request)));
}

#[test]
fn option_data_lengths_are_enforced() {
    for code in [
        OptionCode::List,
        OptionCode::StartTls,
        OptionCode::StructuredReply,
        OptionCode::ExtendedHeaders,
    ] {
        assert_eq!(
            OptionRequest::parse_payload(code, b"x"),
            Err(WireError::BadLength),
            "{code:?}"
        );
    }
    assert_eq!(
        OptionRequest::parse_payload(OptionCode::Abort, b"ignored"),
        Ok(OptionRequest::Abort)
    );
    assert_eq!(
        OptionRequest::parse_payload(OptionCode::PeekExport, b"p"),
        Ok(OptionRequest::Unknown {
            code: OptionCode::PeekExport,
            data: b"p"
        })
    );
    // GO: the name length must leave room for the count.
    assert_eq!(
        OptionRequest::parse_payload(OptionCode::Go, &hex("00000001 78 00")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        OptionRequest::parse_payload(OptionCode::Go, &hex("ffffffff 78 0000")),
        Err(WireError::BadLength)
    );
    // GO: padding after the info types, or fewer types than counted.
    assert_eq!(
        OptionRequest::parse_payload(OptionCode::Go, &hex("00000000 0000 00")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        OptionRequest::parse_payload(OptionCode::Go, &hex("00000000 0002 0001")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        OptionRequest::parse_payload(OptionCode::Go, &hex("00000000 ffff")),
        Err(WireError::BadLength)
    );
    // Meta context: a huge query count is refused at once.
    assert_eq!(
        OptionRequest::parse_payload(
            OptionCode::ListMetaContext,
            &hex("00000000 ffffffff 00000000")
        ),
        Err(WireError::BadLength)
    );
    assert_eq!(
        OptionRequest::parse_payload(OptionCode::ListMetaContext, &hex("00000000 00000000")),
        Ok(OptionRequest::ListMetaContext(MetaContextRequest {
            export_name: b"",
            queries: WireList::Items(&[])
        }))
    );
    // A whole option waits for its data.
    assert_eq!(
        OptionRequest::parse(&hex("49484156454f5054 00000001 00000010 6162")),
        Err(WireError::Incomplete { needed: 14 })
    );
    assert_eq!(
        OptionHeader::parse(&hex("49484156454f5055")),
        Err(WireError::BadMagic {
            found: 0x4948_4156_454f_5055
        })
    );
}

#[test]
fn option_reply_data_lengths_are_enforced() {
    assert_eq!(
        OptionReply::parse_payload(OptionReplyType::Ack, b"x"),
        Err(WireError::BadLength)
    );
    assert_eq!(
        OptionReply::parse_payload(OptionReplyType::Server, &hex("000000")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        OptionReply::parse_payload(OptionReplyType::Server, &hex("00000002 61")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        OptionReply::parse_payload(OptionReplyType::Server, &hex("00000001 61 6262")),
        Ok(OptionReply::Server {
            name: b"a",
            details: b"bb"
        })
    );
    assert_eq!(
        OptionReply::parse_payload(OptionReplyType::MetaContext, &hex("000001")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        OptionReply::parse_payload(OptionReplyType::MetaContext, &hex("00000001 61")),
        Ok(OptionReply::MetaContext { id: 1, name: b"a" })
    );
}

#[test]
fn chunk_payload_rules() {
    use Chunk as C;
    use ChunkType as T;
    assert_eq!(C::parse_payload(T::None, b""), Ok(C::None));
    assert_eq!(C::parse_payload(T::None, b"x"), Err(WireError::BadLength));
    assert_eq!(
        C::parse_payload(T::OffsetData, &[0; 8]),
        Err(WireError::BadLength)
    );
    assert_eq!(
        C::parse_payload(T::OffsetHole, &hex("0000000000000000 00000000")),
        Err(WireError::InvalidValue("hole size"))
    );
    assert_eq!(
        C::parse_payload(T::OffsetHole, &hex("0000000000000000 00000001 00")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        C::parse_payload(T::BlockStatus, &hex("00000001")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        C::parse_payload(T::BlockStatus, &hex("00000001 00000200 00000000 00")),
        Err(WireError::BadLength)
    );
    let bytes = hex("00000001 00000200 00000003");
    let status = C::parse_payload(T::BlockStatus, &bytes).expect("block status");
    let C::BlockStatus {
        context_id: 1,
        descriptors,
    } = status
    else {
        panic!("{status:?}")
    };
    assert_eq!(
        descriptors.iter().collect::<Vec<_>>(),
        [Descriptor {
            length: 0x200,
            status: 3
        }]
    );
    assert_eq!(
        C::parse_payload(T::BlockStatusExt, &hex("00000001 00000000")),
        Err(WireError::InvalidValue("descriptor count"))
    );
    assert_eq!(
        C::parse_payload(
            T::BlockStatusExt,
            &hex("00000001 ffffffff 0000000000000200 0000000000000003")
        ),
        Err(WireError::BadLength)
    );
    assert_eq!(
        C::parse_payload(T::Error, &hex("00000000 0000")),
        Err(WireError::InvalidValue("error"))
    );
    assert_eq!(
        C::parse_payload(T::Error, &hex("00000005 0002 61")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        C::parse_payload(T::Error, &hex("00000005 0001 61 62")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        C::parse_payload(T::Error, &hex("00000005 0001 61")),
        Ok(C::Error {
            error: 5,
            message: b"a"
        })
    );
    assert_eq!(
        C::parse_payload(T::ErrorOffset, &hex("00000005 0001 61 0000000000001000")),
        Ok(C::ErrorOffset {
            error: 5,
            message: b"a",
            offset: 0x1000
        })
    );
    assert_eq!(
        C::parse_payload(T::ErrorOffset, &hex("00000005 0001 61 00000000000010")),
        Err(WireError::BadLength)
    );
    // Encoding refuses what parsing would.
    let mut buf = [0; 64];
    assert_eq!(
        C::OffsetHole { offset: 0, size: 0 }.encode(&mut buf),
        Err(WireError::InvalidValue("hole size"))
    );
    assert_eq!(
        C::OffsetData {
            offset: 0,
            data: b""
        }
        .encode(&mut buf),
        Err(WireError::InvalidValue("data"))
    );
    assert_eq!(
        C::Error {
            error: 0,
            message: b""
        }
        .encode(&mut buf),
        Err(WireError::InvalidValue("error"))
    );
    assert_eq!(
        C::BlockStatus {
            context_id: 1,
            descriptors: WireList::Items(&[])
        }
        .encode(&mut buf),
        Err(WireError::InvalidValue("descriptors"))
    );
}

#[test]
fn error_chunk_with_header_bytes() {
    let chunk = Chunk::Error {
        error: 22,
        message: b"no",
    };
    let mut buf = [0; 64];
    let len = chunk
        .encode_with_header(ReplyFlags::DONE, 9, 0x4000, HeaderStyle::Extended, &mut buf)
        .expect("encode");
    assert_eq!(
        buf[..len],
        hex(
            "6e8a278c 0001 8001 0000000000000009 0000000000004000 0000000000000008 00000016 0002 6e6f"
        )[..]
    );
    let len = chunk
        .encode_with_header(ReplyFlags::DONE, 9, 0x4000, HeaderStyle::Compact, &mut buf)
        .expect("encode");
    assert_eq!(
        buf[..len],
        hex("668e33ef 0001 8001 0000000000000009 00000008 00000016 0002 6e6f")[..]
    );
    assert_eq!(
        chunk.encode_with_header(ReplyFlags::DONE, 9, 0, HeaderStyle::Compact, &mut buf[..27]),
        Err(WireError::BufferTooSmall { needed: 28 })
    );
}

#[test]
fn block_status_payload_rules() {
    assert_eq!(
        BlockStatusPayload::parse_payload(&hex("00000000000010")),
        Err(WireError::BadLength)
    );
    assert_eq!(
        BlockStatusPayload::parse_payload(&hex("0000000000001000 000001")),
        Err(WireError::BadLength)
    );
    let bytes = hex("0000000000001000 00000001 00000002");
    let payload = BlockStatusPayload::parse_payload(&bytes).expect("payload");
    assert_eq!(payload.effect_length, 0x1000);
    assert_eq!(payload.context_ids.iter().collect::<Vec<_>>(), [1, 2]);
}
