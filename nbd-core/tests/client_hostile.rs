//! A server that breaks the protocol, byte by byte: each violation gives
//! the client its typed [`ProtocolError`], never a panic, and the
//! connection refuses further input.

mod client_harness;

use client_harness::messages::*;
use client_harness::*;
use nbd_core::client::{Config, Mode, ProtocolError, RequestId};
use nbd_core::wire::{
    BlockSizeConstraints, ChunkType, Command, CommandFlags, OptionCode, OptionReplyType,
    TransmissionFlags,
};

/// HAS_FLAGS, FLUSH, FUA, TRIM, WRITE_ZEROES, DF, CACHE, FAST_ZERO.
const FLAGS: u16 = 0x0ced;
const SIZE: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    Simple,
    Structured,
    Extended,
}

const STYLES: [Style; 3] = [Style::Simple, Style::Structured, Style::Extended];

fn config(style: Style) -> Config<'static> {
    match style {
        Style::Simple => Config::new("disk").simple(),
        Style::Structured => Config {
            extended_headers: false,
            ..Config::new("disk")
        },
        Style::Extended => Config::new("disk"),
    }
}

/// A client in transmission after a hand-written negotiation selecting
/// the metadata contexts `contexts`.
fn negotiate_with(style: Style, contexts: &[u32]) -> Script<8, 1024> {
    let mut s = Script::new(config(style));
    s.feed(&greeting(3)).expect("greeting");
    match style {
        Style::Simple => {}
        Style::Structured => s.feed(&ack(8)).expect("structured"),
        Style::Extended => s.feed(&ack(11)).expect("extended"),
    }
    if style != Style::Simple {
        let mut bytes = Vec::new();
        for id in contexts {
            bytes.extend(meta_context(10, *id, format!("x-test:{id}").as_bytes()));
        }
        bytes.extend(ack(10));
        s.feed(&bytes).expect("meta contexts");
    }
    let mut go = info_export(7, SIZE, FLAGS);
    go.extend(ack(7));
    s.feed(&go).expect("go");
    assert!(s.client.is_ready(), "{:?}", s.events);
    s.take_events();
    s
}

fn negotiate(style: Style) -> Script<8, 1024> {
    negotiate_with(style, &[1])
}

/// Feeds `bytes`, expects `error`, and checks the connection is dead.
fn expect<const R: usize, const B: usize>(
    s: &mut Script<R, B>,
    bytes: &[u8],
    error: ProtocolError,
) {
    assert_eq!(s.feed(bytes), Err(error));
    assert!(s.client.is_closed());
    assert_eq!(s.feed(&[0]), Err(ProtocolError::Closed));
    assert!(s.client.poll_transmit().is_none());
}

fn read(s: &mut Script<8, 1024>, offset: u64, length: u64, flags: CommandFlags) -> u64 {
    let id = s.client.read(offset, length, flags).expect("read");
    s.drain();
    id.cookie()
}

/// A reply chunk in the connection's style (structured or extended).
fn reply(style: Style, flags: u16, chunk_type: u16, cookie: u64, offset: u64, p: &[u8]) -> Vec<u8> {
    match style {
        Style::Extended => ext_chunk(flags, chunk_type, cookie, offset, p),
        _ => chunk(flags, chunk_type, cookie, p),
    }
}

// ---------------------------------------------------------------------------
// Handshake and negotiation
// ---------------------------------------------------------------------------

#[test]
fn oldstyle_and_non_fixed_servers_are_refused() {
    let mut oldstyle = NBDMAGIC.to_be_bytes().to_vec();
    oldstyle.extend_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
    oldstyle.extend_from_slice(&SIZE.to_be_bytes());
    oldstyle.extend_from_slice(&[0; 128]);
    let mut s = Script::<8, 1024>::new(Config::new("disk"));
    expect(&mut s, &oldstyle, ProtocolError::Oldstyle);

    for flags in [0u16, 2, 0xfffe] {
        let mut s = Script::<8, 1024>::new(Config::new("disk"));
        expect(&mut s, &greeting(flags), ProtocolError::NotFixedNewstyle);
    }
    // Unknown handshake flags are ignored.
    let mut s = Script::<8, 1024>::new(Config::new("disk"));
    s.feed(&greeting(0xfff1)).expect("unknown flags ignored");
    assert_eq!(s.events, [Ev::Greeted(0xfff1)]);
    // Client flags: FIXED_NEWSTYLE only (no NO_ZEROES unless offered).
    assert_eq!(s.sent[..4], [0, 0, 0, 1]);
}

#[test]
fn bad_greeting_magics() {
    let mut bad = greeting(3);
    bad[0] ^= 1;
    let found = u64::from_be_bytes(bad[..8].try_into().expect("8 bytes"));
    let mut s = Script::<8, 1024>::new(Config::new("disk"));
    expect(&mut s, &bad, ProtocolError::BadMagic { found });

    let mut bad = greeting(3);
    bad[15] ^= 1;
    let found = u64::from_be_bytes(bad[8..16].try_into().expect("8 bytes"));
    let mut s = Script::<8, 1024>::new(Config::new("disk"));
    // Split: the error comes as soon as the second magic is whole.
    assert_eq!(
        s.feed_split(&bad, 5),
        Err(ProtocolError::BadMagic { found })
    );
}

#[test]
fn option_reply_violations() {
    let start = || {
        let mut s = Script::<8, 1024>::new(Config::new("disk").simple());
        s.feed(&greeting(3)).expect("greeting");
        s
    };
    // Bad magic.
    let mut bad = ack(7);
    bad[7] ^= 0xff;
    let found = u64::from_be_bytes(bad[..8].try_into().expect("8 bytes"));
    expect(&mut start(), &bad, ProtocolError::BadMagic { found });
    // A reply to another option.
    expect(
        &mut start(),
        &ack(6),
        ProtocolError::UnexpectedOptionReply {
            option: OptionCode::Info,
        },
    );
    // A reply type GO does not allow, and an unknown one.
    for reply_type in [2u32, 4, 77] {
        let data: &[u8] = if reply_type == 77 {
            b""
        } else {
            b"\0\0\0\0xyz"
        };
        expect(
            &mut start(),
            &option_reply(7, reply_type, data),
            ProtocolError::UnexpectedReplyType {
                option: OptionCode::Go,
                reply_type: OptionReplyType::from_wire(reply_type),
            },
        );
    }
    // NBD_INFO_EXPORT of the wrong length; ACK with data.
    expect(
        &mut start(),
        &option_reply(7, 3, &[0; 11]),
        ProtocolError::BadOptionReply {
            option: OptionCode::Go,
        },
    );
    expect(
        &mut start(),
        &option_reply(7, 1, &[0; 2]),
        ProtocolError::BadOptionReply {
            option: OptionCode::Go,
        },
    );
    // GO acknowledged without NBD_INFO_EXPORT.
    expect(&mut start(), &ack(7), ProtocolError::MissingExportInfo);
    // Transmission flags without HAS_FLAGS.
    let mut go = info_export(7, SIZE, 0x0004);
    go.extend(ack(7));
    expect(
        &mut start(),
        &go,
        ProtocolError::BadTransmissionFlags(TransmissionFlags(4)),
    );
    // Block sizes the spec forbids.
    let mut go = info_export(7, SIZE, 1);
    go.extend(info_block_size(7, 3, 4096, 65536));
    go.extend(ack(7));
    expect(
        &mut start(),
        &go,
        ProtocolError::BadBlockSizes(BlockSizeConstraints {
            minimum: 3,
            preferred: 4096,
            maximum: 65536,
        }),
    );
}

#[test]
fn data_when_no_reply_is_due() {
    let mut s = Script::<8, 1024>::new(Config::new("disk").simple());
    let mut bytes = greeting(3);
    bytes.extend(ack(7));
    // The greeting is taken; GO has not been sent yet.
    let step = s.client.process(&bytes).expect("greeting");
    assert_eq!(step.consumed, 18);
    assert_eq!(
        s.client.process(&bytes[18..]).map(|s| s.consumed),
        Err(ProtocolError::UnsolicitedData)
    );
}

#[test]
fn meta_context_violations() {
    let start = || {
        let mut s = Script::<8, 1024>::new(Config {
            extended_headers: false,
            ..Config::new("disk")
        });
        s.feed(&greeting(3)).expect("greeting");
        s.feed(&ack(8)).expect("structured");
        s
    };
    let mut many = Vec::new();
    for id in 1..=9 {
        many.extend(meta_context(10, id, b"x-a:b"));
    }
    expect(&mut start(), &many, ProtocolError::TooManyMetaContexts);
    let mut twice = meta_context(10, 4, b"x-a:b");
    twice.extend(meta_context(10, 4, b"x-a:c"));
    expect(&mut start(), &twice, ProtocolError::DuplicateMetaContext(4));
    // An id without its 4 bytes.
    expect(
        &mut start(),
        &option_reply(10, 4, &[0, 0]),
        ProtocolError::BadOptionReply {
            option: OptionCode::SetMetaContext,
        },
    );
}

#[test]
fn replies_longer_than_the_buffer() {
    // A list entry that cannot be held.
    let mut s = Script::<8, 128>::new(Config::new("").with_mode(Mode::List));
    s.feed(&greeting(3)).expect("greeting");
    let mut entry = 200u32.to_be_bytes().to_vec();
    entry.extend_from_slice(&[b'a'; 200]);
    expect(
        &mut s,
        &option_reply(3, 2, &entry),
        ProtocolError::ReplyTooLong { length: 204 },
    );
}

#[test]
fn go_unsupported_after_extended_headers() {
    let mut s = Script::<8, 1024>::new(Config::new("disk").with_meta_contexts(&[]));
    s.feed(&greeting(3)).expect("greeting");
    s.feed(&ack(11)).expect("extended");
    expect(
        &mut s,
        &option_reply(7, 0x8000_0001, b""),
        ProtocolError::GoUnsupported,
    );
}

#[test]
fn server_closing_early() {
    // Mid-negotiation.
    let mut s = Script::<8, 1024>::new(Config::new("disk"));
    s.feed(&greeting(3)).expect("greeting");
    assert_eq!(s.client.end_of_input(), Err(ProtocolError::UnexpectedEof));
    // Before the greeting.
    let mut s = Script::<8, 1024>::new(Config::new("disk"));
    assert_eq!(s.client.end_of_input(), Err(ProtocolError::UnexpectedEof));
    // After NBD_OPT_EXPORT_NAME: the export was refused.
    let mut s = Script::<8, 1024>::new(Config::new("nope").simple());
    s.feed(&greeting(3)).expect("greeting");
    s.feed(&option_reply(7, 0x8000_0001, b""))
        .expect("GO unsupported");
    assert_eq!(s.client.end_of_input(), Err(ProtocolError::ExportRefused));
    // With requests in flight.
    let mut s = negotiate(Style::Structured);
    read(&mut s, 0, 512, CommandFlags::empty());
    assert_eq!(s.client.end_of_input(), Err(ProtocolError::UnexpectedEof));
    assert_eq!(s.feed(&[0]), Err(ProtocolError::Closed));
}

// ---------------------------------------------------------------------------
// Transmission: headers and cookies
// ---------------------------------------------------------------------------

#[test]
fn bad_reply_magic() {
    for style in STYLES {
        let mut s = negotiate(style);
        read(&mut s, 0, 512, CommandFlags::empty());
        expect(
            &mut s,
            &[0xde, 0xad, 0xbe, 0xef, 0, 0],
            ProtocolError::BadMagic { found: 0xdead_beef },
        );
    }
}

#[test]
fn header_of_the_wrong_style() {
    for style in STYLES {
        let mut s = negotiate(style);
        let cookie = read(&mut s, 0, 512, CommandFlags::empty());
        let wrong = match style {
            Style::Simple => chunk(DONE, NONE, cookie, &[]),
            Style::Structured => ext_chunk(DONE, NONE, cookie, 0, &[]),
            Style::Extended => simple_reply(0, cookie),
        };
        expect(&mut s, &wrong, ProtocolError::WrongHeaderStyle);
    }
    let mut s = negotiate(Style::Simple);
    let cookie = read(&mut s, 0, 512, CommandFlags::empty());
    expect(
        &mut s,
        &ext_chunk(DONE, NONE, cookie, 0, &[]),
        ProtocolError::WrongHeaderStyle,
    );
    let mut s = negotiate(Style::Extended);
    let cookie = read(&mut s, 0, 512, CommandFlags::empty());
    expect(
        &mut s,
        &chunk(DONE, NONE, cookie, &[]),
        ProtocolError::WrongHeaderStyle,
    );
}

#[test]
fn replies_for_requests_not_in_flight() {
    for style in STYLES {
        let none = |_: &mut Script<8, 1024>, cookie| match style {
            Style::Simple => simple_reply(0, cookie),
            _ => reply(style, DONE, NONE, cookie, 0, &[]),
        };
        // Never issued.
        let mut s = negotiate(style);
        let bytes = none(&mut s, 12345);
        expect(
            &mut s,
            &bytes,
            ProtocolError::UnknownCookie { cookie: 12345 },
        );
        // Issued but its header not sent yet.
        let mut s = negotiate(style);
        let id = s.client.flush().expect("flush");
        let bytes = none(&mut s, id.cookie());
        expect(
            &mut s,
            &bytes,
            ProtocolError::UnknownCookie {
                cookie: id.cookie(),
            },
        );
        // Already answered.
        let mut s = negotiate(style);
        let id = s.client.flush().expect("flush");
        s.drain();
        let bytes = none(&mut s, id.cookie());
        s.feed(&bytes).expect("first reply");
        expect(
            &mut s,
            &bytes,
            ProtocolError::UnknownCookie {
                cookie: id.cookie(),
            },
        );
        // The reply to NBD_CMD_DISC, which has none.
        let mut s = negotiate(style);
        s.client.disconnect().expect("disconnect");
        let sent = s.drain();
        let disc = requests(&sent)[0];
        assert_eq!(disc.command, Command::Disconnect);
        let bytes = none(&mut s, disc.cookie);
        assert_eq!(s.feed(&bytes), Err(ProtocolError::Closed));
    }
}

#[test]
fn simple_reply_to_a_read_with_structured_replies() {
    let mut s = negotiate(Style::Structured);
    let cookie = read(&mut s, 0, 512, CommandFlags::empty());
    expect(
        &mut s,
        &simple_reply(0, cookie),
        ProtocolError::SimpleReplyToRead,
    );
    // Even an error: the spec forbids simple replies to reads.
    let mut s = negotiate(Style::Structured);
    let cookie = read(&mut s, 0, 512, CommandFlags::empty());
    expect(
        &mut s,
        &simple_reply(5, cookie),
        ProtocolError::SimpleReplyToRead,
    );
}

#[test]
fn data_after_an_error_in_a_simple_reply() {
    let mut s = negotiate(Style::Simple);
    let cookie = read(&mut s, 0, 8, CommandFlags::empty());
    let mut bytes = simple_reply(5, cookie);
    bytes.extend_from_slice(b"DATADATA");
    assert_eq!(
        s.feed(&bytes),
        Err(ProtocolError::BadMagic {
            found: u64::from(u32::from_be_bytes(*b"DATA"))
        })
    );
    assert!(
        s.events
            .iter()
            .any(|e| matches!(e, Ev::Done { result: Err(_), .. }))
    );
}

#[test]
fn extended_reply_must_echo_the_offset() {
    let mut s = negotiate(Style::Extended);
    let cookie = read(&mut s, 4096, 512, CommandFlags::empty());
    expect(
        &mut s,
        &ext_chunk(DONE, NONE, cookie, 0, &[]),
        ProtocolError::OffsetMismatch {
            expected: 4096,
            found: 0,
        },
    );
}

// ---------------------------------------------------------------------------
// Transmission: read chunks
// ---------------------------------------------------------------------------

fn data_chunk(style: Style, flags: u16, cookie: u64, request: u64, at: u64, len: usize) -> Vec<u8> {
    reply(
        style,
        flags,
        OFFSET_DATA,
        cookie,
        request,
        &data_payload(at, &vec![0xab; len]),
    )
}

#[test]
fn read_chunks_outside_the_request() {
    for style in [Style::Structured, Style::Extended] {
        for (at, len) in [(4095u64, 16usize), (4096 + 500, 13), (0, 1), (8192, 1)] {
            let mut s = negotiate(style);
            let cookie = read(&mut s, 4096, 512, CommandFlags::empty());
            let bytes = data_chunk(style, 0, cookie, 4096, at, len);
            expect(&mut s, &bytes, ProtocolError::ChunkOutOfRange);
        }
        // Longer than the request, whatever the offset.
        let mut s = negotiate(style);
        let cookie = read(&mut s, 0, 512, CommandFlags::empty());
        expect(
            &mut s,
            &data_chunk(style, 0, cookie, 0, 0, 513),
            ProtocolError::BadChunk {
                chunk_type: ChunkType::OffsetData,
            },
        );
        // A hole outside.
        let mut s = negotiate(style);
        let cookie = read(&mut s, 0, 512, CommandFlags::empty());
        expect(
            &mut s,
            &reply(style, 0, OFFSET_HOLE, cookie, 0, &hole_payload(256, 512)),
            ProtocolError::ChunkOutOfRange,
        );
    }
}

#[test]
fn overlapping_read_chunks() {
    for style in [Style::Structured, Style::Extended] {
        let mut s = negotiate(style);
        let cookie = read(&mut s, 0, 4096, CommandFlags::empty());
        let mut bytes = data_chunk(style, 0, cookie, 0, 0, 2048);
        bytes.extend(reply(
            style,
            0,
            OFFSET_HOLE,
            cookie,
            0,
            &hole_payload(2047, 10),
        ));
        expect(&mut s, &bytes, ProtocolError::OverlappingChunks);
    }
}

#[test]
fn read_ending_before_its_range_is_covered() {
    for style in [Style::Structured, Style::Extended] {
        let mut s = negotiate(style);
        let cookie = read(&mut s, 0, 4096, CommandFlags::empty());
        let mut bytes = data_chunk(style, 0, cookie, 0, 0, 2048);
        bytes.extend(data_chunk(style, DONE, cookie, 0, 3072, 1024));
        expect(&mut s, &bytes, ProtocolError::IncompleteRead);
        // No content at all.
        let mut s = negotiate(style);
        let cookie = read(&mut s, 0, 4096, CommandFlags::empty());
        expect(
            &mut s,
            &reply(style, DONE, NONE, cookie, 0, &[]),
            ProtocolError::IncompleteRead,
        );
    }
}

#[test]
fn read_fragmented_beyond_the_bound() {
    let mut s = negotiate(Style::Structured);
    let cookie = read(&mut s, 0, 4096, CommandFlags::empty());
    let mut bytes = Vec::new();
    // Every other 256-byte piece: disjoint ranges pile up.
    for i in 0..5u64 {
        bytes.extend(data_chunk(Style::Structured, 0, cookie, 0, i * 512, 256));
    }
    expect(&mut s, &bytes, ProtocolError::TooFragmented);
}

#[test]
fn more_than_one_content_chunk_with_df() {
    let mut s = negotiate(Style::Structured);
    let cookie = read(&mut s, 0, 4096, CommandFlags::DF);
    let mut bytes = data_chunk(Style::Structured, 0, cookie, 0, 0, 2048);
    bytes.extend(data_chunk(Style::Structured, DONE, cookie, 0, 2048, 2048));
    expect(&mut s, &bytes, ProtocolError::Fragmented);
}

#[test]
fn malformed_chunks() {
    let bad = |chunk_type| ProtocolError::BadChunk { chunk_type };
    let cases: Vec<(u16, Vec<u8>, ProtocolError)> = vec![
        // No data byte after the offset.
        (0, data_payload(0, &[]), bad(ChunkType::OffsetData)),
        // Hole of size zero; hole of the wrong length.
        (0, hole_payload(0, 0), bad(ChunkType::OffsetHole)),
        (
            0,
            [hole_payload(0, 1), vec![0]].concat(),
            bad(ChunkType::OffsetHole),
        ),
        // NONE without DONE, or with a payload.
        (0, vec![], bad(ChunkType::None)),
        (1, vec![0], bad(ChunkType::None)),
        // Error value zero; message length not matching.
        (1, error_payload(0, b"x"), bad(ChunkType::Error)),
        (
            1,
            [error_payload(5, b"x"), vec![0]].concat(),
            bad(ChunkType::Error),
        ),
        (
            1,
            error_payload(5, b"xy")[..7].to_vec(),
            bad(ChunkType::Error),
        ),
        (
            1,
            error_offset_payload(5, b"x", 0)[..14].to_vec(),
            bad(ChunkType::ErrorOffset),
        ),
        (1, vec![0, 0, 0, 5, 0], bad(ChunkType::Error)),
    ];
    for (i, (flags, payload, error)) in cases.into_iter().enumerate() {
        let chunk_type = match error {
            ProtocolError::BadChunk { chunk_type } => chunk_type.to_wire(),
            _ => unreachable!(),
        };
        for style in [Style::Structured, Style::Extended] {
            let mut s = negotiate(style);
            let cookie = read(&mut s, 0, 512, CommandFlags::empty());
            let bytes = reply(style, flags, chunk_type, cookie, 0, &payload);
            assert_eq!(s.feed(&bytes), Err(error), "case {i} {style:?}");
        }
    }
}

#[test]
fn chunks_a_request_does_not_allow() {
    for style in [Style::Structured, Style::Extended] {
        let unexpected = |chunk_type: u16, command| ProtocolError::UnexpectedChunk {
            chunk_type: ChunkType::from_wire(chunk_type),
            command,
        };
        // Content for a write.
        let mut s = negotiate(style);
        let id = s.write(0, &[1; 512]);
        s.drain();
        let bytes = reply(
            style,
            0,
            OFFSET_DATA,
            id.cookie(),
            0,
            &data_payload(0, &[0; 512]),
        );
        expect(&mut s, &bytes, unexpected(OFFSET_DATA, Command::Write));
        // Block status for a read.
        let mut s = negotiate(style);
        let cookie = read(&mut s, 0, 512, CommandFlags::empty());
        let status_type = if style == Style::Extended {
            BLOCK_STATUS_EXT
        } else {
            BLOCK_STATUS
        };
        let bytes = reply(
            style,
            DONE,
            status_type,
            cookie,
            0,
            &status_payload(1, &[(512, 0)]),
        );
        expect(&mut s, &bytes, unexpected(status_type, Command::Read));
        // An unknown type that is not an error.
        let mut s = negotiate(style);
        let cookie = read(&mut s, 0, 512, CommandFlags::empty());
        let bytes = reply(style, DONE, 77, cookie, 0, &[0; 4]);
        expect(&mut s, &bytes, unexpected(77, Command::Read));
        // An error offset for a flush, which has no range.
        let mut s = negotiate(style);
        let id = s.client.flush().expect("flush");
        s.drain();
        let bytes = reply(
            style,
            DONE,
            ERROR_OFFSET,
            id.cookie(),
            0,
            &error_offset_payload(5, b"", 0),
        );
        expect(&mut s, &bytes, unexpected(ERROR_OFFSET, Command::Flush));
    }
    // The block status chunk of the other header style.
    let mut s = negotiate(Style::Extended);
    let id = s.client.block_status(0, 512, false).expect("status");
    s.drain();
    let bytes = ext_chunk(
        DONE,
        BLOCK_STATUS,
        id.cookie(),
        0,
        &status_payload(1, &[(512, 0)]),
    );
    expect(
        &mut s,
        &bytes,
        ProtocolError::UnexpectedChunk {
            chunk_type: ChunkType::BlockStatus,
            command: Command::BlockStatus,
        },
    );
    let mut s = negotiate(Style::Structured);
    let id = s.client.block_status(0, 512, false).expect("status");
    s.drain();
    let bytes = chunk(
        DONE,
        BLOCK_STATUS_EXT,
        id.cookie(),
        &status_ext_payload(1, &[(512, 0)]),
    );
    expect(
        &mut s,
        &bytes,
        ProtocolError::UnexpectedChunk {
            chunk_type: ChunkType::BlockStatusExt,
            command: Command::BlockStatus,
        },
    );
}

#[test]
fn error_offset_outside_the_request() {
    for style in [Style::Structured, Style::Extended] {
        let mut s = negotiate(style);
        let cookie = read(&mut s, 4096, 512, CommandFlags::empty());
        let bytes = reply(
            style,
            DONE,
            ERROR_OFFSET,
            cookie,
            4096,
            &error_offset_payload(5, b"bad", 4096 + 512),
        );
        expect(&mut s, &bytes, ProtocolError::ChunkOutOfRange);
    }
}

// ---------------------------------------------------------------------------
// Transmission: block status
// ---------------------------------------------------------------------------

fn status(style: Style, flags: u16, cookie: u64, context: u32, d: &[(u32, u32)]) -> Vec<u8> {
    match style {
        Style::Extended => {
            let wide: Vec<(u64, u64)> = d.iter().map(|&(l, s)| (l.into(), s.into())).collect();
            ext_chunk(
                flags,
                BLOCK_STATUS_EXT,
                cookie,
                0,
                &status_ext_payload(context, &wide),
            )
        }
        _ => chunk(flags, BLOCK_STATUS, cookie, &status_payload(context, d)),
    }
}

fn block_status(s: &mut Script<8, 1024>, length: u64, req_one: bool) -> RequestId {
    let id = s.client.block_status(0, length, req_one).expect("status");
    s.drain();
    id
}

#[test]
fn block_status_violations() {
    for style in [Style::Structured, Style::Extended] {
        let mut s = negotiate(style);
        let id = block_status(&mut s, 4096, false);
        let bytes = status(style, DONE, id.cookie(), 9, &[(512, 0)]);
        expect(&mut s, &bytes, ProtocolError::UnknownMetaContext(9));

        let mut s = negotiate(style);
        let id = block_status(&mut s, 4096, false);
        let mut bytes = status(style, 0, id.cookie(), 1, &[(512, 0)]);
        bytes.extend(status(style, DONE, id.cookie(), 1, &[(512, 0)]));
        expect(&mut s, &bytes, ProtocolError::DuplicateBlockStatus(1));

        let mut s = negotiate(style);
        let id = block_status(&mut s, 4096, false);
        let bytes = status(style, DONE, id.cookie(), 1, &[(512, 0), (0, 0)]);
        expect(&mut s, &bytes, ProtocolError::EmptyDescriptor);

        // Past the export's end.
        let mut s = negotiate(style);
        let id = block_status(&mut s, 4096, false);
        let bytes = status(style, DONE, id.cookie(), 1, &[(1 << 20, 0), (1, 0)]);
        expect(&mut s, &bytes, ProtocolError::ChunkOutOfRange);

        // REQ_ONE: one descriptor, within the request.
        let mut s = negotiate(style);
        let id = block_status(&mut s, 4096, true);
        let bytes = status(style, DONE, id.cookie(), 1, &[(512, 0), (512, 0)]);
        let chunk_type = if style == Style::Extended {
            ChunkType::BlockStatusExt
        } else {
            ChunkType::BlockStatus
        };
        expect(&mut s, &bytes, ProtocolError::BadChunk { chunk_type });
        let mut s = negotiate(style);
        let id = block_status(&mut s, 4096, true);
        let bytes = status(style, DONE, id.cookie(), 1, &[(8192, 0)]);
        expect(&mut s, &bytes, ProtocolError::ChunkOutOfRange);

        // A context left out.
        let mut s = negotiate_with(style, &[1, 2]);
        let id = block_status(&mut s, 4096, false);
        let bytes = status(style, DONE, id.cookie(), 2, &[(512, 0)]);
        expect(&mut s, &bytes, ProtocolError::MissingBlockStatus);

        // A simple success reply carries no status.
        if style == Style::Structured {
            let mut s = negotiate(style);
            let id = block_status(&mut s, 4096, false);
            expect(
                &mut s,
                &simple_reply(0, id.cookie()),
                ProtocolError::MissingBlockStatus,
            );
        }

        // A payload that is not whole descriptors.
        let mut s = negotiate(style);
        let id = block_status(&mut s, 4096, false);
        let mut bytes = status(style, DONE, id.cookie(), 1, &[(512, 0)]);
        // The low byte of the header's length field: two bytes more.
        let length_low = if style == Style::Extended { 31 } else { 19 };
        bytes[length_low] += 2;
        bytes.extend_from_slice(&[0, 0]);
        expect(&mut s, &bytes, ProtocolError::BadChunk { chunk_type });
    }
    // Extended: a descriptor count that does not match the length.
    let mut s = negotiate(Style::Extended);
    let id = block_status(&mut s, 4096, false);
    let mut payload = status_ext_payload(1, &[(512, 0)]);
    payload[7] = 2;
    let bytes = ext_chunk(DONE, BLOCK_STATUS_EXT, id.cookie(), 0, &payload);
    expect(
        &mut s,
        &bytes,
        ProtocolError::BadChunk {
            chunk_type: ChunkType::BlockStatusExt,
        },
    );
}

#[test]
fn every_violation_also_holds_byte_by_byte() {
    // A sample of the above, fed one byte at a time.
    let mut s = negotiate(Style::Structured);
    let cookie = read(&mut s, 0, 4096, CommandFlags::empty());
    let mut bytes = data_chunk(Style::Structured, 0, cookie, 0, 0, 2048);
    bytes.extend(data_chunk(Style::Structured, 0, cookie, 0, 1024, 2048));
    assert_eq!(
        s.feed_split(&bytes, 1),
        Err(ProtocolError::OverlappingChunks)
    );
    let mut s = negotiate(Style::Extended);
    let id = block_status(&mut s, 4096, false);
    let bytes = status(Style::Extended, DONE, id.cookie(), 1, &[(512, 0), (0, 0)]);
    assert_eq!(s.feed_split(&bytes, 1), Err(ProtocolError::EmptyDescriptor));
}
