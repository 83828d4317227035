//! Requests the server must refuse, each followed by a good request to
//! show the stream stays in sync (spec: "Error values", "Block size
//! constraints", "Request types").

mod common;

use common::*;
use nbd_core::export::{Capabilities, Export};
use nbd_core::server::{Config, ProtocolError};
use nbd_core::wire::{
    Chunk, Command, CommandFlags, ErrorCode, HeaderStyle, InfoType, OptionReplyType,
};

type H = Harness;

const SIZE: u64 = 1 << 20;

fn connect(export: Export<'static>, structured: bool) -> H {
    H::transmission(vec![export], Config::default(), structured)
}

fn disk() -> Export<'static> {
    full_export("disk")
}

/// Sends `bytes` and expects exactly one reply, an error for `cookie`;
/// storage must not have been asked for anything.
fn expect_refusal(h: &mut H, bytes: &[u8], cookie: u64, error: ErrorCode) {
    h.events.clear();
    h.send(bytes);
    assert!(
        h.events
            .iter()
            .all(|e| e.request().is_none() && !matches!(e, Ev::WriteData { .. })),
        "storage was asked: {:?}",
        h.events
    );
    assert_eq!(h.pending_input(), 0, "payload not consumed");
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_error(&got[0], cookie, error);
}

fn refuse(
    h: &mut H,
    command: Command,
    flags: CommandFlags,
    cookie: u64,
    offset: u64,
    length: u64,
    error: ErrorCode,
) {
    let bytes = request(h.style(), command, flags, cookie, offset, length);
    expect_refusal(h, &bytes, cookie, error);
}

#[test]
fn reads_out_of_bounds_are_einval() {
    for structured in [false, true] {
        let mut h = connect(disk(), structured);
        let cases = [
            (SIZE - 512, 1024),
            (SIZE, 1),
            (SIZE + 4096, 512),
            (u64::MAX - 10, 100),
        ];
        for (cookie, (offset, length)) in cases.into_iter().enumerate() {
            refuse(
                &mut h,
                Command::Read,
                CommandFlags::empty(),
                cookie as u64,
                offset,
                length,
                ErrorCode::Invalid,
            );
            h.read_ok(100, SIZE - 512, 512);
        }
    }
}

#[test]
fn write_past_the_end_is_enospc_and_its_payload_consumed() {
    for structured in [false, true] {
        let mut h = connect(disk(), structured);
        let before = h.disk().to_vec();
        let payload = vec![0xee; 200];
        let bytes = write_request(h.style(), CommandFlags::empty(), 1, SIZE - 100, &payload);
        expect_refusal(&mut h, &bytes, 1, ErrorCode::NoSpace);
        assert_eq!(h.disk(), &before[..], "storage changed");
        // The same, with the next request in the same input and fed byte
        // by byte: the payload must not be taken for a header.
        let mut bytes = write_request(h.style(), CommandFlags::empty(), 2, SIZE, &payload);
        bytes.extend(request(
            h.style(),
            Command::Read,
            CommandFlags::empty(),
            3,
            0,
            64,
        ));
        h.send_bytewise(&bytes);
        let got = replies(&h.received(), &[(3, 64)]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_error(&got[0], 2, ErrorCode::NoSpace);
        assert_read_data(&got[1..], 3, 0, &before[..64]);
        // Write zeroes past the end too.
        refuse(
            &mut h,
            Command::WriteZeroes,
            CommandFlags::empty(),
            4,
            SIZE - 512,
            1024,
            ErrorCode::NoSpace,
        );
        h.read_ok(5, 0, 512);
    }
}

#[test]
fn a_refused_write_is_answered_only_after_its_payload() {
    // libnbd 1.14 drops the connection when a reply arrives for a write it
    // is still sending, so the refusal waits for the whole payload.
    for structured in [false, true] {
        let mut h = connect(disk(), structured);
        let payload = vec![0xee; 4096];
        let bytes = write_request(h.style(), CommandFlags::empty(), 1, SIZE, &payload);
        h.send(&bytes[..bytes.len() - 1]);
        assert_eq!(
            replies(&h.received(), &[]),
            vec![],
            "reply before the payload was read"
        );
        h.send(&bytes[bytes.len() - 1..]);
        let got = replies(&h.received(), &[]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_error(&got[0], 1, ErrorCode::NoSpace);
    }
}

#[test]
fn a_refused_write_ending_at_2_pow_64_keeps_the_stream_in_sync() {
    let mut h = connect(disk(), true);
    let payload = vec![0xee; 4096];
    let bytes = write_request(
        h.style(),
        CommandFlags::empty(),
        1,
        u64::MAX - 4095,
        &payload,
    );
    h.send(&bytes);
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_error(&got[0], 1, ErrorCode::NoSpace);
    h.read_ok(2, 0, 512);
}

#[test]
fn misaligned_requests_are_einval() {
    for structured in [false, true] {
        let mut h = connect(disk().with_block_sizes(ALIGNED), structured);
        refuse(
            &mut h,
            Command::Read,
            CommandFlags::empty(),
            1,
            100,
            512,
            ErrorCode::Invalid,
        );
        refuse(
            &mut h,
            Command::Read,
            CommandFlags::empty(),
            2,
            0,
            100,
            ErrorCode::Invalid,
        );
        refuse(
            &mut h,
            Command::Trim,
            CommandFlags::empty(),
            3,
            512,
            700,
            ErrorCode::Invalid,
        );
        let bytes = write_request(h.style(), CommandFlags::empty(), 4, 512, &[1; 100]);
        expect_refusal(&mut h, &bytes, 4, ErrorCode::Invalid);
        h.read_ok(5, 512, 512);
        h.write(CommandFlags::empty(), 6, 1024, &[3; 1024]);
        assert_success(&replies(&h.received(), &[])[0], 6);
    }
}

#[test]
fn reads_and_writes_over_the_maximum_block_size_are_einval() {
    for structured in [false, true] {
        let mut h = H::new(vec![disk().with_block_sizes(ALIGNED)], Config::default());
        h.start(MODERN);
        if structured {
            h.structured_replies();
        }
        // Asking for the constraints binds the client to the maximum.
        let replies = h.option(&go("disk", &[InfoType::BlockSize]));
        assert_eq!(
            replies.last().map(|r| r.reply_type),
            Some(OptionReplyType::Ack)
        );
        h.events.clear();
        refuse(
            &mut h,
            Command::Read,
            CommandFlags::empty(),
            1,
            0,
            128 * 1024,
            ErrorCode::Invalid,
        );
        refuse(
            &mut h,
            Command::Cache,
            CommandFlags::empty(),
            2,
            0,
            128 * 1024,
            ErrorCode::Invalid,
        );
        let bytes = write_request(h.style(), CommandFlags::empty(), 3, 0, &vec![5; 128 * 1024]);
        expect_refusal(&mut h, &bytes, 3, ErrorCode::Invalid);
        // The maximum itself is fine.
        h.read_ok(4, 0, 64 * 1024);
    }
}

#[test]
fn clients_that_asked_no_block_sizes_are_held_to_the_request_cap() {
    let config = Config {
        max_request_length: 256 * 1024,
        ..Config::default()
    };
    for structured in [false, true] {
        // `connect` sends NBD_OPT_GO without NBD_INFO_BLOCK_SIZE.
        let mut h = H::transmission(vec![disk().with_block_sizes(ALIGNED)], config, structured);
        h.read_ok(1, 0, 256 * 1024);
        let data = vec![7; 128 * 1024];
        let bytes = write_request(h.style(), CommandFlags::empty(), 2, 0, &data);
        h.send(&bytes);
        assert_eq!(
            &h.disk()[..data.len()],
            &data[..],
            "the write over the advertised maximum was not stored"
        );
        let got = replies(&h.received(), &[]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_success(&got[0], 2);
        refuse(
            &mut h,
            Command::Read,
            CommandFlags::empty(),
            3,
            0,
            512 * 1024,
            ErrorCode::Invalid,
        );
    }
}

#[test]
fn writes_to_a_read_only_export_are_eperm() {
    for structured in [false, true] {
        let mut h = connect(disk().with_read_only(true), structured);
        let before = h.disk().to_vec();
        let bytes = write_request(h.style(), CommandFlags::empty(), 1, 0, &[9; 4096]);
        expect_refusal(&mut h, &bytes, 1, ErrorCode::Perm);
        refuse(
            &mut h,
            Command::Trim,
            CommandFlags::empty(),
            2,
            0,
            4096,
            ErrorCode::Perm,
        );
        refuse(
            &mut h,
            Command::WriteZeroes,
            CommandFlags::empty(),
            3,
            0,
            4096,
            ErrorCode::Perm,
        );
        refuse(
            &mut h,
            Command::Resize,
            CommandFlags::empty(),
            4,
            2 * SIZE,
            0,
            ErrorCode::Perm,
        );
        assert_eq!(h.disk(), &before[..]);
        h.read_ok(5, 0, 4096);
    }
}

#[test]
fn unknown_commands_are_einval() {
    for structured in [false, true] {
        let mut h = connect(disk(), structured);
        for (cookie, code) in [(1, 9u16), (2, 42), (3, 0xffff)] {
            refuse(
                &mut h,
                Command::Unknown(code),
                CommandFlags::empty(),
                cookie,
                0,
                512,
                ErrorCode::Invalid,
            );
            h.read_ok(10, 0, 512);
        }
    }
}

#[test]
fn unknown_or_misplaced_flags_are_einval() {
    for structured in [false, true] {
        let mut h = connect(disk(), structured);
        let cases = [
            (Command::Read, CommandFlags(1 << 15)),
            (Command::Read, CommandFlags(1 << 6)),
            (Command::Read, CommandFlags::NO_HOLE),
            (Command::Read, CommandFlags::REQ_ONE),
            (Command::Read, CommandFlags::FAST_ZERO),
            // Compact headers never carry PAYLOAD_LEN.
            (Command::Read, CommandFlags::PAYLOAD_LEN),
            (Command::Trim, CommandFlags::NO_HOLE),
            (Command::Cache, CommandFlags::DF),
            (Command::Flush, CommandFlags::REQ_ONE),
        ];
        for (cookie, (command, flags)) in cases.into_iter().enumerate() {
            let length = if command == Command::Flush { 0 } else { 512 };
            refuse(
                &mut h,
                command,
                flags,
                cookie as u64,
                0,
                length,
                ErrorCode::Invalid,
            );
            h.read_ok(100, 0, 512);
        }
        // FUA is accepted on every command when advertised.
        for command in [Command::Read, Command::Cache, Command::Flush] {
            let length = if command == Command::Flush { 0 } else { 512 };
            h.request(command, CommandFlags::FUA, 200, 0, length);
            let reads: &[(u64, u64)] = if command == Command::Read {
                &[(200, 512)]
            } else {
                &[]
            };
            let got = replies(&h.received(), reads);
            assert_eq!(
                got.iter().map(Reply::error).collect::<Vec<_>>(),
                vec![0; got.len()],
                "{command:?}"
            );
        }
    }
}

#[test]
fn df_without_structured_replies_is_einval() {
    let mut h = connect(disk(), false);
    refuse(
        &mut h,
        Command::Read,
        CommandFlags::DF,
        1,
        0,
        512,
        ErrorCode::Invalid,
    );
    h.read_ok(2, 0, 512);
}

#[test]
fn commands_the_export_does_not_support_are_einval() {
    let bare = || Export::new("bare", SIZE);
    for structured in [false, true] {
        let mut h = connect(bare(), structured);
        refuse(
            &mut h,
            Command::Trim,
            CommandFlags::empty(),
            1,
            0,
            512,
            ErrorCode::Invalid,
        );
        refuse(
            &mut h,
            Command::WriteZeroes,
            CommandFlags::empty(),
            2,
            0,
            512,
            ErrorCode::Invalid,
        );
        refuse(
            &mut h,
            Command::Cache,
            CommandFlags::empty(),
            3,
            0,
            512,
            ErrorCode::Invalid,
        );
        refuse(
            &mut h,
            Command::Flush,
            CommandFlags::empty(),
            4,
            0,
            0,
            ErrorCode::Invalid,
        );
        refuse(
            &mut h,
            Command::Resize,
            CommandFlags::empty(),
            5,
            SIZE * 2,
            0,
            ErrorCode::Invalid,
        );
        // FUA is not advertised either.
        refuse(
            &mut h,
            Command::Read,
            CommandFlags::FUA,
            6,
            0,
            512,
            ErrorCode::Invalid,
        );
        h.read_ok(7, 0, 512);
    }
    // Write zeroes without fast zero: the FAST_ZERO flag is invalid.
    let exports = Export::new("zeroes", SIZE).with_capabilities(Capabilities {
        write_zeroes: true,
        ..Capabilities::NONE
    });
    let mut h = connect(exports, true);
    refuse(
        &mut h,
        Command::WriteZeroes,
        CommandFlags::FAST_ZERO,
        8,
        0,
        512,
        ErrorCode::Invalid,
    );
    h.request(Command::WriteZeroes, CommandFlags::NO_HOLE, 9, 0, 512);
    assert_success(&replies(&h.received(), &[])[0], 9);
}

#[test]
fn flush_with_a_range_is_einval() {
    let mut h = connect(disk(), false);
    refuse(
        &mut h,
        Command::Flush,
        CommandFlags::empty(),
        1,
        512,
        0,
        ErrorCode::Invalid,
    );
    refuse(
        &mut h,
        Command::Flush,
        CommandFlags::empty(),
        2,
        0,
        512,
        ErrorCode::Invalid,
    );
    h.read_ok(3, 0, 512);
}

#[test]
fn structured_errors_carry_a_readable_message() {
    let mut h = connect(disk(), true);
    h.request(Command::Read, CommandFlags::empty(), 1, SIZE, 512);
    let got = replies(&h.received(), &[]);
    let Chunk::Error { error, message } = got[0].chunk() else {
        panic!("expected an error chunk");
    };
    assert_eq!(error, 22);
    assert!(!message.is_empty());
    assert!(core::str::from_utf8(message).is_ok());
    assert_eq!(got[0].header().length, 6 + message.len() as u64);
}

#[test]
fn bad_request_magic_closes() {
    let mut h = connect(disk(), false);
    let mut bytes = request(
        HeaderStyle::Compact,
        Command::Read,
        CommandFlags::empty(),
        1,
        0,
        512,
    );
    bytes[0] ^= 0xff;
    let error = h.try_send(&bytes).expect_err("bad magic accepted");
    assert_eq!(
        error,
        ProtocolError::BadMagic {
            found: u64::from(0x2560_9513u32 ^ 0xff00_0000)
        }
    );
}

#[test]
fn a_rejected_payload_too_long_to_discard_closes() {
    let config = Config {
        max_discard: 4096,
        ..Config::default()
    };
    let mut h = H::transmission(vec![disk().with_read_only(true)], config, false);
    // Within the limit: consumed and refused.
    let bytes = write_request(h.style(), CommandFlags::empty(), 1, 0, &[0; 4096]);
    expect_refusal(&mut h, &bytes, 1, ErrorCode::Perm);
    let header = request(h.style(), Command::Write, CommandFlags::empty(), 2, 0, 4097);
    let error = h.try_send(&header).expect_err("long payload accepted");
    assert_eq!(error, ProtocolError::PayloadTooLong { length: 4097 });
}

#[test]
fn a_storm_of_bad_requests_fed_byte_by_byte() {
    let mut h = connect(disk().with_block_sizes(ALIGNED).with_read_only(true), true);
    let style = h.style();
    let mut bytes = Vec::new();
    bytes.extend(request(
        style,
        Command::Read,
        CommandFlags::empty(),
        1,
        SIZE,
        512,
    ));
    bytes.extend(write_request(style, CommandFlags::empty(), 2, 0, &[1; 512]));
    bytes.extend(request(
        style,
        Command::Unknown(77),
        CommandFlags::empty(),
        3,
        0,
        0,
    ));
    bytes.extend(request(
        style,
        Command::Read,
        CommandFlags(0x4000),
        4,
        0,
        512,
    ));
    bytes.extend(request(
        style,
        Command::Read,
        CommandFlags::empty(),
        5,
        3,
        512,
    ));
    bytes.extend(write_request(
        style,
        CommandFlags::empty(),
        6,
        SIZE,
        &[2; 1024],
    ));
    bytes.extend(request(
        style,
        Command::Read,
        CommandFlags::empty(),
        7,
        0,
        512,
    ));
    h.send_bytewise(&bytes);
    let got = replies(&h.received(), &[]);
    let summary: Vec<_> = got.iter().map(|r| (r.cookie(), r.error())).collect();
    assert_eq!(
        summary,
        vec![(1, 22), (2, 1), (3, 22), (4, 22), (5, 22), (6, 1), (7, 0)]
    );
    assert_read_data(&got[6..], 7, 0, &h.disk()[..512]);
}

/// Spec (`NBD_CMD_READ`, structured replies): "a request for more than
/// 2^32 - 8 bytes MUST be split into at least two chunks, so as not to
/// overflow the length field of a reply". An export without a maximum
/// block size (0xffffffff) lets a compact request ask for that much; the
/// server must split the reply or refuse the read, never send a chunk whose
/// length field cannot hold its payload.
#[test]
fn a_read_too_long_for_one_compact_chunk_is_split_or_refused() {
    use nbd_core::server::{Payload, ReadOutcome, Request};
    use nbd_core::wire::{BlockSizeConstraints, ChunkHeader, ReplyHeader};
    let unlimited = BlockSizeConstraints {
        minimum: 1,
        preferred: 4096,
        maximum: u32::MAX,
    };
    let export = Export::new("huge", 1 << 33).with_block_sizes(unlimited);
    assert_eq!(export.validate(), Ok(()));
    let mut h = H::transmission(vec![export], Config::default(), true);
    h.auto_complete = false;
    let length = u64::from(u32::MAX - 7);
    h.request(Command::Read, CommandFlags::empty(), 1, 0, length);
    let held = h.take_held();
    if held.is_empty() {
        // Refused up front: an error reply, and the stream goes on.
        let got = replies(&h.received(), &[]);
        assert_eq!(got.len(), 1);
        assert!(got[0].is_final() && got[0].error() != 0, "{got:?}");
        return;
    }
    let Request::Read { id, .. } = held[0] else {
        panic!("{held:?}")
    };
    h.conn
        .complete_read(id, ReadOutcome::Data)
        .expect("complete");
    // Every chunk's length field must match what follows it.
    let mut covered = 0u64;
    while let Some(transmit) = h.conn.poll_transmit() {
        let head: Vec<u8> = transmit.parts.concat();
        let (rest, header) = ReplyHeader::parse(&head).expect("chunk header");
        let ReplyHeader::Structured(ChunkHeader { length: field, .. }) = header else {
            panic!("{header:?}");
        };
        let payload = match transmit.payload {
            Some(Payload::Data { length, .. }) => length,
            _ => 0,
        };
        assert_eq!(field, rest.len() as u64 + payload, "chunk length field");
        covered += payload;
    }
    assert_eq!(covered, length);
}
