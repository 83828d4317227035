//! Extended headers (spec extension `EXTENDED_HEADERS`): 32-byte requests
//! and replies, offsets echoed, 64-bit lengths, `BLOCK_STATUS_EXT`,
//! `NBD_CMD_FLAG_PAYLOAD_LEN`.

mod common;

use common::*;
use nbd_core::export::Export;
use nbd_core::server::{Config, ProtocolError, Request, RequestId};
use nbd_core::wire::{
    Chunk, ChunkType, Command, CommandFlags, ErrorCode, ExtDescriptor, HeaderStyle, OptionCode,
    OptionReplyType, ReplyFlags, TransmissionFlags,
};

type H = Harness;

fn exports() -> Vec<Export<'static>> {
    vec![full_export("disk")]
}

fn extended() -> H {
    H::extended(exports(), Config::default())
}

/// As [`extended`] (negotiation events kept), with the `base:allocation`
/// context id.
fn extended_with_context() -> (H, u32) {
    let mut h = H::new(exports(), Config::default());
    h.start(MODERN);
    h.extended_headers();
    let context = h.set_base_allocation("disk");
    h.go("disk");
    (h, context)
}

/// Asserts `reply` is an extended chunk for `cookie` echoing `offset`.
fn assert_extended(reply: &Reply, cookie: u64, offset: u64) {
    match reply {
        Reply::Chunk {
            extended, header, ..
        } => {
            assert!(*extended, "not an extended header: {reply:?}");
            assert_eq!(header.cookie, cookie);
            assert_eq!(header.offset, offset, "the request's offset is echoed");
        }
        Reply::Simple { .. } => panic!("simple reply with extended headers: {reply:?}"),
    }
}

#[test]
fn extended_headers_then_structured_reply_is_refused() {
    let mut h = H::new(exports(), Config::default());
    h.start(MODERN);
    h.send(&option(OptionCode::ExtendedHeaders, &[]));
    assert_eq!(h.received(), expected_option_reply(11, 1, &[]));
    assert!(h.conn.features().extended_headers);
    assert!(h.conn.features().structured_replies);
    let replies = h.option(&option(OptionCode::StructuredReply, &[]));
    assert_eq!(replies.len(), 1);
    assert_eq!(
        replies[0].reply_type,
        OptionReplyType::ErrExtendedHeaderRequired
    );
    assert_eq!(replies[0].reply_type.to_wire(), 0x8000_000a);
    // Still extended.
    let flags = h.go("disk");
    assert!(
        TransmissionFlags(flags)
            .contains(TransmissionFlags::SEND_DF | TransmissionFlags::BLOCK_STATUS_PAYLOAD)
    );
    assert_eq!(h.style(), HeaderStyle::Extended);
    match h.events.last() {
        Some(Ev::ExportSelected { features, .. }) => assert_eq!(
            *features,
            Features {
                structured_replies: true,
                extended_headers: true
            }
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn structured_reply_then_extended_headers() {
    let mut h = H::new(exports(), Config::default());
    h.start(MODERN);
    h.structured_replies();
    h.extended_headers();
    h.go("disk");
    let got = h.read(1, 512, 512);
    assert_extended(&got[0], 1, 512);
}

#[test]
fn extended_headers_with_data_is_invalid() {
    let mut h = H::new(exports(), Config::default());
    h.start(MODERN);
    let replies = h.option(&option(OptionCode::ExtendedHeaders, &[0]));
    assert_eq!(replies[0].reply_type, OptionReplyType::ErrInvalid);
    assert!(!h.conn.features().extended_headers);
}

#[test]
fn export_name_after_extended_headers_closes() {
    let mut h = H::new(exports(), Config::default());
    h.start(MODERN);
    h.extended_headers();
    let error = h
        .try_send(&export_name("disk"))
        .expect_err("EXPORT_NAME accepted");
    assert_eq!(error, ProtocolError::ExportNameWithExtendedHeaders);
}

#[test]
fn read_gets_an_extended_offset_data_chunk() {
    let mut h = extended();
    h.request(Command::Read, CommandFlags::empty(), 0xfeed, 4096, 1000);
    let bytes = h.received();
    // 32-byte header written out by hand: magic, DONE, OFFSET_DATA,
    // cookie, offset, length 8 + 1000; then offset and data.
    let mut expected = 0x6e8a_278cu32.to_be_bytes().to_vec();
    expected.extend_from_slice(&1u16.to_be_bytes());
    expected.extend_from_slice(&1u16.to_be_bytes());
    expected.extend_from_slice(&0xfeedu64.to_be_bytes());
    expected.extend_from_slice(&4096u64.to_be_bytes());
    expected.extend_from_slice(&1008u64.to_be_bytes());
    expected.extend_from_slice(&4096u64.to_be_bytes());
    expected.extend_from_slice(&h.disk()[4096..5096]);
    assert_eq!(bytes, expected);
}

#[test]
fn write_with_payload_len_gets_a_none_chunk() {
    let mut h = extended();
    let data = vec![0x42; 3000];
    h.write(CommandFlags::empty(), 2, 8192, &data);
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1);
    assert_extended(&got[0], 2, 8192);
    assert_success(&got[0], 2);
    let header = got[0].header();
    assert_eq!(header.chunk_type, ChunkType::None);
    assert_eq!(header.length, 0);
    assert_eq!(&h.disk()[8192..11192], &data[..]);
    let requests = h.anonymous_requests();
    assert_eq!(
        requests,
        vec![Request::Write {
            id: RequestId::from_bits(0),
            offset: 8192,
            length: 3000,
            fua: false,
        }]
    );
    h.read_ok(3, 8192, 3000);
}

#[test]
fn every_command_gets_extended_replies() {
    let mut h = extended();
    let commands = [
        (Command::Flush, CommandFlags::empty(), 0, 0),
        (Command::Trim, CommandFlags::FUA, 4096, 4096),
        (Command::Cache, CommandFlags::empty(), 0, 65536),
        (Command::WriteZeroes, CommandFlags::NO_HOLE, 512, 1024),
        (Command::WriteZeroes, CommandFlags::FAST_ZERO, 2048, 512),
    ];
    for (cookie, (command, flags, offset, length)) in commands.into_iter().enumerate() {
        let cookie = cookie as u64 + 100;
        h.request(command, flags, cookie, offset, length);
        let got = replies(&h.received(), &[]);
        assert_eq!(got.len(), 1, "{command:?}");
        assert_extended(&got[0], cookie, offset);
        assert_success(&got[0], cookie);
    }
}

#[test]
fn errors_get_extended_error_chunks() {
    let mut h = extended();
    h.request(Command::Read, CommandFlags::empty(), 5, 1 << 20, 512);
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1);
    assert_extended(&got[0], 5, 1 << 20);
    assert_error(&got[0], 5, ErrorCode::Invalid);
    // A storage error too.
    h.auto_complete = false;
    h.request(Command::Cache, CommandFlags::empty(), 6, 512, 512);
    let Request::Cache { id, .. } = h.take_one_held() else {
        panic!()
    };
    h.complete(id, Err(ErrorCode::Io)).expect("complete");
    let got = replies(&h.received(), &[]);
    assert_extended(&got[0], 6, 512);
    assert_error(&got[0], 6, ErrorCode::Io);
}

#[test]
fn effect_lengths_above_four_gib_are_checked() {
    let mut h = extended();
    // A 64-bit effect length: past the end.
    h.request(Command::Trim, CommandFlags::empty(), 1, 0, 1 << 33);
    let got = replies(&h.received(), &[]);
    assert_error(&got[0], 1, ErrorCode::Invalid);
    h.request(Command::WriteZeroes, CommandFlags::empty(), 2, 0, 1 << 33);
    let got = replies(&h.received(), &[]);
    assert_error(&got[0], 2, ErrorCode::NoSpace);
    h.read_ok(3, 0, 512);
}

#[test]
fn block_status_gives_block_status_ext() {
    let (mut h, context) = extended_with_context();
    h.disk_mut()[0..8192].fill(0);
    h.request(Command::BlockStatus, CommandFlags::empty(), 7, 4096, 8192);
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1);
    assert_extended(&got[0], 7, 4096);
    let header = got[0].header();
    assert_eq!(header.chunk_type, ChunkType::BlockStatusExt);
    assert!(header.flags.contains(ReplyFlags::DONE));
    let Chunk::BlockStatusExt {
        context_id,
        descriptors,
    } = got[0].chunk()
    else {
        panic!("expected BLOCK_STATUS_EXT");
    };
    assert_eq!(context_id, context);
    let list: Vec<_> = descriptors.iter().collect();
    assert_eq!(
        list[0],
        ExtDescriptor {
            length: 4096,
            status: 3
        }
    );
    assert_eq!(list[1].status, 0);
    // Payload: id, count, 16 bytes per descriptor.
    assert_eq!(header.length, 8 + 16 * list.len() as u64);
}

#[test]
fn block_status_with_a_payload() {
    let (mut h, context) = extended_with_context();
    h.disk_mut()[0..4096].fill(0);
    // PAYLOAD_LEN: the length field is the payload's (12 bytes); the
    // payload holds the effect length and the context ids wanted.
    let mut bytes = request(
        HeaderStyle::Extended,
        Command::BlockStatus,
        CommandFlags::PAYLOAD_LEN | CommandFlags::REQ_ONE,
        8,
        0,
        12,
    );
    bytes.extend_from_slice(&2048u64.to_be_bytes());
    bytes.extend_from_slice(&context.to_be_bytes());
    // Then a read, to check the stream is in sync, all fed byte by byte.
    bytes.extend(request(
        HeaderStyle::Extended,
        Command::Read,
        CommandFlags::empty(),
        9,
        0,
        16,
    ));
    h.send_bytewise(&bytes);
    let requests = h.anonymous_requests();
    let zero = RequestId::from_bits(0);
    assert_eq!(
        requests,
        vec![
            Request::BlockStatus {
                id: zero,
                offset: 0,
                length: 2048,
                req_one: true,
            },
            Request::Read {
                id: zero,
                offset: 0,
                length: 16,
            }
        ]
    );
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 2);
    assert_extended(&got[0], 8, 0);
    let Chunk::BlockStatusExt {
        context_id,
        descriptors,
    } = got[0].chunk()
    else {
        panic!("expected BLOCK_STATUS_EXT, got {:?}", got[0]);
    };
    assert_eq!(context_id, context);
    assert_eq!(
        descriptors.iter().collect::<Vec<_>>(),
        vec![ExtDescriptor {
            length: 2048,
            status: 3
        }]
    );
    assert_extended(&got[1], 9, 0);
}

#[test]
fn block_status_payload_with_an_unknown_context_is_einval() {
    let (mut h, context) = extended_with_context();
    let mut bytes = request(
        HeaderStyle::Extended,
        Command::BlockStatus,
        CommandFlags::PAYLOAD_LEN,
        8,
        0,
        12,
    );
    bytes.extend_from_slice(&2048u64.to_be_bytes());
    bytes.extend_from_slice(&(context + 100).to_be_bytes());
    h.send(&bytes);
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1);
    assert_extended(&got[0], 8, 0);
    assert_error(&got[0], 8, ErrorCode::Invalid);
    assert!(h.events.iter().all(|e| e.request().is_none()));
    h.read_ok(9, 0, 512);
}

#[test]
fn block_status_payload_of_a_bad_length_is_consumed_and_refused() {
    let (mut h, _) = extended_with_context();
    // 10 bytes: not 8 plus a multiple of 4.
    let mut bytes = request(
        HeaderStyle::Extended,
        Command::BlockStatus,
        CommandFlags::PAYLOAD_LEN,
        8,
        0,
        10,
    );
    bytes.extend_from_slice(&[0; 10]);
    h.send(&bytes);
    let got = replies(&h.received(), &[]);
    assert_error(&got[0], 8, ErrorCode::Invalid);
    h.read_ok(9, 0, 512);
}

#[test]
fn payload_len_on_a_read_is_consumed_and_refused() {
    let mut h = extended();
    // Spec: a payload the command does not expect is consumed, then EINVAL.
    let mut bytes = request(
        HeaderStyle::Extended,
        Command::Read,
        CommandFlags::PAYLOAD_LEN,
        4,
        0,
        100,
    );
    bytes.extend_from_slice(&[0xee; 100]);
    h.send(&bytes);
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1);
    assert_error(&got[0], 4, ErrorCode::Invalid);
    h.read_ok(5, 0, 512);
}

#[test]
fn compact_requests_are_refused_with_extended_headers() {
    let mut h = extended();
    let bytes = request(
        HeaderStyle::Compact,
        Command::Read,
        CommandFlags::empty(),
        1,
        0,
        512,
    );
    let error = h
        .try_send(&[bytes, vec![0; 4]].concat())
        .expect_err("compact request accepted");
    assert!(matches!(error, ProtocolError::BadMagic { .. }), "{error:?}");
}

#[test]
fn extended_conversation_streams_byte_by_byte() {
    let data: Vec<u8> = (0..700u32).map(|i| (i % 97) as u8).collect();
    let mut bytes = write_request(HeaderStyle::Extended, CommandFlags::FUA, 1, 100, &data);
    bytes.extend(request(
        HeaderStyle::Extended,
        Command::Read,
        CommandFlags::DF,
        2,
        0,
        1000,
    ));
    bytes.extend(request(
        HeaderStyle::Extended,
        Command::Flush,
        CommandFlags::empty(),
        3,
        0,
        0,
    ));
    let mut whole = extended();
    whole.send(&bytes);
    let expected = whole.received();
    let mut split = extended();
    split.send_bytewise(&bytes);
    assert_eq!(split.received(), expected);
    let got = replies(&expected, &[]);
    assert_eq!(got.len(), 3);
    assert_extended(&got[0], 1, 100);
    assert_extended(&got[1], 2, 0);
    assert_extended(&got[2], 3, 0);
    assert_read_data(&got[1..2], 2, 0, &whole.disk()[..1000]);
    assert_eq!(&split.disk()[100..800], &data[..]);
}

#[test]
fn holes_and_streamed_reads_echo_the_offset() {
    use nbd_core::server::ReadOutcome;
    let mut h = extended();
    h.auto_complete = false;
    h.request(Command::Read, CommandFlags::empty(), 1, 2048, 1024);
    let hole = h.take_one_held().id();
    h.request(Command::Read, CommandFlags::empty(), 2, 8192, 512);
    let streamed = h.take_one_held().id();
    h.complete_read(hole, ReadOutcome::Zeroes).expect("hole");
    h.complete_read(streamed, ReadOutcome::Streamed)
        .expect("streamed");
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 2);
    assert_extended(&got[0], 1, 2048);
    assert_eq!(
        got[0].chunk(),
        Chunk::OffsetHole {
            offset: 2048,
            size: 1024
        }
    );
    assert!(got[0].is_final());
    assert_extended(&got[1], 2, 8192);
    assert!(
        !got[1].is_final(),
        "a streamed read's data chunk stays open"
    );
    assert!(matches!(
        got[1].chunk(),
        Chunk::OffsetData { offset: 8192, .. }
    ));
    h.conn
        .finish_streamed_read(streamed, Err((ErrorCode::Io, 8192 + 256)))
        .expect("finish");
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1);
    assert_extended(&got[0], 2, 8192);
    assert!(got[0].is_final());
    assert_eq!(
        got[0].chunk(),
        Chunk::ErrorOffset {
            error: 5,
            message: b"",
            offset: 8192 + 256
        }
    );
}

#[test]
fn zero_length_requests_get_a_none_chunk() {
    let mut h = extended();
    for (cookie, command) in [(1, Command::Read), (2, Command::Trim), (3, Command::Cache)] {
        h.request(command, CommandFlags::empty(), cookie, 512, 0);
        let got = replies(&h.received(), &[]);
        assert_eq!(got.len(), 1, "{command:?}");
        assert_extended(&got[0], cookie, 512);
        assert_success(&got[0], cookie);
    }
    h.write(CommandFlags::empty(), 4, 1024, &[]);
    let got = replies(&h.received(), &[]);
    assert_extended(&got[0], 4, 1024);
    assert_success(&got[0], 4);
}
