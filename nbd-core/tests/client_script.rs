//! Conversations the core's server never produces, written out by hand:
//! fallbacks to older options, fragmented and out-of-order reads, error
//! chunks, split input, the exact bytes the client sends.

mod client_harness;

use client_harness::messages::*;
use client_harness::*;
use nbd_core::client::{Config, Mode, TlsPolicy, UsageError};
use nbd_core::wire::{
    Command, CommandFlags, ErrorCode, HeaderStyle, OptionCode, OptionReplyType, RequestHeader,
};

const SIZE: u64 = 1 << 20;
/// HAS_FLAGS, FLUSH, FUA, TRIM, WRITE_ZEROES, DF, RESIZE, CACHE, FAST_ZERO.
const FLAGS: u16 = 0x0eed;

/// The option code of the option request at the front of `bytes`.
fn option_code(bytes: &[u8]) -> u32 {
    assert_eq!(bytes[..8], IHAVEOPT.to_be_bytes());
    u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"))
}

fn go(size: u64, flags: u16) -> Vec<u8> {
    [info_export(7, size, flags), ack(7)].concat()
}

fn structured(contexts: &[u32]) -> Script<8, 1024> {
    let mut s = Script::new(Config {
        extended_headers: false,
        ..Config::new("disk")
    });
    s.feed(&greeting(3)).expect("greeting");
    s.feed(&ack(8)).expect("structured");
    let mut bytes = Vec::new();
    for id in contexts {
        bytes.extend(meta_context(10, *id, b"base:allocation"));
    }
    bytes.extend(ack(10));
    s.feed(&bytes).expect("contexts");
    s.feed(&go(SIZE, FLAGS)).expect("go");
    assert!(s.client.is_ready());
    s.take_events();
    s
}

fn extended() -> Script<8, 1024> {
    let mut s = Script::new(Config::new("disk"));
    s.feed(&greeting(3)).expect("greeting");
    s.feed(&ack(11)).expect("extended");
    s.feed(&[meta_context(10, 7, b"base:allocation"), ack(10)].concat())
        .expect("contexts");
    s.feed(&go(SIZE, FLAGS)).expect("go");
    assert!(s.client.is_ready());
    s.take_events();
    s
}

#[test]
fn go_falls_back_to_export_name() {
    for (handshake, zeroes) in [(3u16, 0usize), (1, 124)] {
        for piece in [usize::MAX, 1] {
            let mut s = Script::<8, 1024>::new(Config::new("disk").simple());
            s.feed(&greeting(handshake)).expect("greeting");
            s.take_events();
            let sent = std::mem::take(&mut s.sent);
            // Client flags: NO_ZEROES only when offered.
            assert_eq!(sent[..4], [0, 0, 0, handshake as u8]);
            assert_eq!(option_code(&sent[4..]), 7);
            s.feed(&option_reply(7, 0x8000_0001, b"unknown option"))
                .expect("GO refused");
            let sent = std::mem::take(&mut s.sent);
            assert_eq!(option_code(&sent), 1);
            assert_eq!(&sent[12..16], &4u32.to_be_bytes());
            assert_eq!(&sent[16..], b"disk");
            let mut reply = SIZE.to_be_bytes().to_vec();
            reply.extend_from_slice(&0x0003u16.to_be_bytes());
            reply.extend(std::iter::repeat_n(0, zeroes));
            s.feed_split(&reply, piece).expect("export name reply");
            let events = s.take_events();
            let [Ev::Export(info), Ev::Ready] = events[..] else {
                panic!("{events:?}")
            };
            assert_eq!(info.size, SIZE);
            assert!(!info.block_sizes_advertised);
            assert_eq!(info.block_sizes.maximum, 32 << 20);
            assert!(s.client.is_ready() && s.client.is_read_only());
            // Transmission works: a simple read.
            let id = s.client.read(0, 4, CommandFlags::empty()).expect("read");
            s.drain();
            let mut bytes = simple_reply(0, id.cookie());
            bytes.extend_from_slice(b"abcd");
            s.feed_split(&bytes, piece).expect("read reply");
            let data: Vec<u8> = s
                .take_events()
                .into_iter()
                .flat_map(|e| match e {
                    Ev::ReadData { data, .. } => data,
                    Ev::Done { result, .. } => {
                        assert_eq!(result, Ok(()));
                        vec![]
                    }
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(data, b"abcd");
        }
    }
}

#[test]
fn refused_features_fall_back() {
    let mut s = Script::<8, 1024>::new(Config::new("disk"));
    s.feed(&greeting(3)).expect("greeting");
    assert_eq!(option_code(&s.sent[4..]), 11);
    s.sent.clear();
    s.feed(&option_reply(11, 0x8000_0001, b""))
        .expect("no extended");
    assert_eq!(option_code(&s.sent), 8);
    s.sent.clear();
    s.feed(&option_reply(8, 0x8000_0001, b""))
        .expect("no structured");
    // No metadata contexts without structured replies: straight to GO.
    assert_eq!(option_code(&s.sent), 7);
    s.feed(&go(SIZE, FLAGS)).expect("go");
    assert_eq!(s.client.header_style(), HeaderStyle::Compact);
    assert!(!s.client.features().structured_replies);
    assert!(!s.client.can_df());

    // Structured, but SET_META_CONTEXT refused: no block status.
    let mut s = Script::<8, 1024>::new(Config::new("disk"));
    s.feed(&greeting(3)).expect("greeting");
    s.feed(&ack(11)).expect("extended");
    s.feed(&option_reply(10, 0x8000_0003, b"no"))
        .expect("meta refused");
    s.feed(&go(SIZE, FLAGS)).expect("go");
    assert!(s.client.features().extended_headers);
    assert_eq!(
        s.client.block_status(0, 512, false),
        Err(UsageError::NotAdvertised(Command::BlockStatus))
    );
}

#[test]
fn starttls_hands_over_at_the_acknowledgement() {
    let mut s = Script::<8, 1024>::new(Config::new("disk").with_tls(TlsPolicy::Required));
    s.feed(&greeting(3)).expect("greeting");
    assert_eq!(option_code(&s.sent[4..]), 5);
    // TLS records follow the ACK at once: they are not consumed.
    let mut bytes = ack(5);
    bytes.extend_from_slice(&[0x16, 0x03, 0x03]);
    let step = s.client.process(&bytes).expect("ack");
    assert_eq!(step.consumed, 20);
    assert_eq!(step.event.map(Ev::from_event), Some(Ev::StartTls));
    assert!(s.client.tls_active());
    // Negotiation starts afresh, now over TLS.
    s.sent.clear();
    s.drain();
    assert_eq!(option_code(&s.sent), 11);

    // Optional: a refusal goes on in clear.
    let mut s = Script::<8, 1024>::new(Config::new("disk").with_tls(TlsPolicy::Optional));
    s.feed(&greeting(3)).expect("greeting");
    s.sent.clear();
    s.feed(&option_reply(5, 0x8000_0002, b"no TLS"))
        .expect("refused");
    assert_eq!(option_code(&s.sent), 11);
    assert!(
        s.events
            .iter()
            .all(|e| !matches!(e, Ev::OptionRefused { .. }))
    );
}

#[test]
fn fatal_refusals_end_with_abort() {
    // ESHUTDOWN on any option; TLS required on GO.
    for (option, reply_type, feed_first) in [
        (11u32, 0x8000_0007u32, false),
        (7, 0x8000_0005, true),
        (7, 0x8000_0008, true),
    ] {
        let mut s = Script::<8, 1024>::new(Config::new("disk").with_meta_contexts(&[]));
        s.feed(&greeting(3)).expect("greeting");
        s.take_events();
        if feed_first {
            s.feed(&ack(11)).expect("extended");
        }
        s.sent.clear();
        let message = vec![b'm'; 2000];
        s.feed(&option_reply(option, reply_type, &message))
            .expect("refusal");
        assert_eq!(
            s.take_events(),
            vec![Ev::OptionRefused {
                option: OptionCode::from_wire(option),
                reply_type: OptionReplyType::from_wire(reply_type),
                // Longer than the buffer: dropped.
                message: vec![],
            }]
        );
        assert_eq!(option_code(&s.sent), 2);
        // The server may close instead of acknowledging.
        assert_eq!(s.client.end_of_input(), Ok(()));
    }
}

#[test]
fn list_then_abort() {
    let mut s = Script::<8, 1024>::new(Config::new("").with_mode(Mode::List));
    s.feed(&greeting(3)).expect("greeting");
    s.take_events();
    assert_eq!(option_code(&s.sent[4..]), 3);
    let mut entry = 4u32.to_be_bytes().to_vec();
    entry.extend_from_slice(b"diskthe disk");
    let mut bytes = option_reply(3, 2, &entry);
    bytes.extend(option_reply(3, 2, &0u32.to_be_bytes()));
    bytes.extend(ack(3));
    s.sent.clear();
    s.feed_split(&bytes, 7).expect("list");
    assert_eq!(option_code(&s.sent), 2);
    s.feed(&ack(2)).expect("abort");
    assert_eq!(
        s.take_events(),
        vec![
            Ev::ListEntry {
                name: b"disk".to_vec(),
                description: b"the disk".to_vec()
            },
            Ev::ListEntry {
                name: vec![],
                description: vec![]
            },
            Ev::Closed,
        ]
    );
    assert!(s.client.is_closed());
    assert_eq!(s.client.end_of_input(), Ok(()));
}

#[test]
fn info_replies_in_any_form() {
    let config = Config {
        request_description: true,
        request_block_size: false,
        ..Config::new("disk").simple().with_mode(Mode::Info)
    };
    let mut s = Script::<8, 160>::new(config);
    s.feed(&greeting(3)).expect("greeting");
    s.take_events();
    // INFO asks for the description only.
    let sent = std::mem::take(&mut s.sent);
    assert_eq!(option_code(&sent[4..]), 6);
    assert_eq!(
        sent[4 + 16..],
        [0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 1, 0, 2]
    );
    let mut long = 2u16.to_be_bytes().to_vec();
    long.extend_from_slice(&[b'x'; 500]);
    let bytes = [
        option_reply(6, 3, &long),
        option_reply(6, 3, &[0, 9, 1, 2, 3]),
        info_block_size(6, 512, 4096, 1 << 20),
        info_export(6, SIZE, FLAGS),
        ack(6),
    ]
    .concat();
    s.feed(&bytes).expect("info");
    let events = s.take_events();
    assert_eq!(events[0], Ev::InfoUnknown(9, vec![1, 2, 3]));
    assert_eq!(events[1], Ev::InfoBlockSize(512, 4096, 1 << 20));
    let Ev::Export(info) = events[3] else {
        panic!("{events:?}")
    };
    // Not asked for, still honoured.
    assert!(info.block_sizes_advertised);
    assert_eq!(info.block_sizes.minimum, 512);
    assert_eq!(option_code(&s.sent), 2);
}

/// A read's events sorted out: data pieces, holes, everything else.
struct ReadEvents {
    data: Vec<(u64, Vec<u8>)>,
    holes: Vec<(u64, u64)>,
    rest: Vec<Ev>,
}

fn read_events(events: &[Ev]) -> ReadEvents {
    let mut data = Vec::new();
    let mut holes = Vec::new();
    let mut rest = Vec::new();
    for e in events {
        match e {
            Ev::ReadData {
                offset, data: d, ..
            } => data.push((*offset, d.clone())),
            Ev::ReadHole { offset, length, .. } => holes.push((*offset, *length)),
            other => rest.push(other.clone()),
        }
    }
    ReadEvents { data, holes, rest }
}

#[test]
fn fragmented_reads_reassemble_in_any_order() {
    for piece in [usize::MAX, 1, 13] {
        let mut s = structured(&[1]);
        let id = s
            .client
            .read(8192, 4096, CommandFlags::empty())
            .expect("read");
        s.drain();
        let c = id.cookie();
        let bytes = [
            chunk(0, OFFSET_DATA, c, &data_payload(8192 + 3072, &[3; 1024])),
            chunk(0, OFFSET_HOLE, c, &hole_payload(8192 + 1024, 1024)),
            chunk(0, OFFSET_DATA, c, &data_payload(8192, &[1; 1024])),
            chunk(0, OFFSET_DATA, c, &data_payload(8192 + 2048, &[2; 1024])),
            chunk(DONE, NONE, c, &[]),
        ]
        .concat();
        s.feed_split(&bytes, piece).expect("read");
        let ReadEvents { data, holes, rest } = read_events(&s.take_events());
        assert_eq!(holes, [(9216, 1024)]);
        assert_eq!(rest, [Ev::Done { id, result: Ok(()) }]);
        let mut image = vec![0u8; 4096];
        for (offset, d) in data {
            image[(offset - 8192) as usize..][..d.len()].copy_from_slice(&d);
        }
        assert!(image[..1024].iter().all(|&b| b == 1));
        assert!(image[2048..3072].iter().all(|&b| b == 2));
        assert!(image[3072..].iter().all(|&b| b == 3));
    }
}

#[test]
fn final_content_chunk_carries_done() {
    let mut s = extended();
    let id = s.client.read(0, 8, CommandFlags::DF).expect("read");
    s.drain();
    let bytes = ext_chunk(
        DONE,
        OFFSET_DATA,
        id.cookie(),
        0,
        &data_payload(0, b"12345678"),
    );
    s.feed(&bytes).expect("read");
    assert_eq!(
        s.take_events(),
        [
            Ev::ReadData {
                id,
                offset: 0,
                data: b"12345678".to_vec()
            },
            Ev::Done { id, result: Ok(()) }
        ]
    );
}

#[test]
fn error_chunks_fail_the_request_and_the_connection_goes_on() {
    let mut s = structured(&[1]);
    let read = s.client.read(0, 4096, CommandFlags::empty()).expect("read");
    let write = s.write(0, &[5; 512]);
    let flush = s.client.flush().expect("flush");
    s.drain();
    let bytes = [
        chunk(0, OFFSET_DATA, read.cookie(), &data_payload(0, &[1; 1024])),
        chunk(
            0,
            ERROR_OFFSET,
            read.cookie(),
            &error_offset_payload(5, b"bad sector", 512),
        ),
        // More content after an error is allowed.
        chunk(
            0,
            OFFSET_DATA,
            read.cookie(),
            &data_payload(1024, &[1; 1024]),
        ),
        chunk(DONE, NONE, read.cookie(), &[]),
        // An error type this client does not know: the request fails.
        chunk(
            DONE,
            0x8003,
            write.cookie(),
            &[error_payload(28, b"full"), vec![9; 4]].concat(),
        ),
        // A simple error reply (allowed for non-reads).
        simple_reply(1, flush.cookie()),
    ]
    .concat();
    s.feed_split(&bytes, 5).expect("replies");
    let rest = read_events(&s.take_events()).rest;
    assert_eq!(
        rest,
        [
            Ev::Done {
                id: read,
                result: Err(ErrorCode::Io)
            },
            Ev::Done {
                id: write,
                result: Err(ErrorCode::NoSpace)
            },
            Ev::Done {
                id: flush,
                result: Err(ErrorCode::Perm)
            },
        ]
    );
    // Unknown error values read as EINVAL, and the connection still works.
    let id = s.client.flush().expect("flush");
    s.drain();
    s.feed(&chunk(DONE, ERROR, id.cookie(), &error_payload(9999, b"")))
        .expect("error");
    assert_eq!(
        s.take_events(),
        [Ev::Done {
            id,
            result: Err(ErrorCode::Invalid)
        }]
    );
    assert!(s.client.is_ready());
}

#[test]
fn block_status_split_across_inputs() {
    for piece in [usize::MAX, 1, 11] {
        let mut s = structured(&[1, 2]);
        let id = s.client.block_status(4096, 8192, false).expect("status");
        s.drain();
        let c = id.cookie();
        let bytes = [
            chunk(
                0,
                BLOCK_STATUS,
                c,
                &status_payload(2, &[(4096, 1), (4096, 0), (512, 3)]),
            ),
            chunk(DONE, BLOCK_STATUS, c, &status_payload(1, &[(65536, 3)])),
        ]
        .concat();
        s.feed_split(&bytes, piece).expect("status");
        let events = s.take_events();
        assert_eq!(events.last(), Some(&Ev::Done { id, result: Ok(()) }));
        let mut by_context: Vec<(u32, u64, u64, u64)> = Vec::new();
        for e in &events {
            if let Ev::BlockStatus {
                context_id,
                offset,
                descriptors,
                ..
            } = e
            {
                let mut at = *offset;
                for (length, status) in descriptors {
                    by_context.push((*context_id, at, *length, *status));
                    at += length;
                }
            }
        }
        assert_eq!(
            by_context,
            [
                (2, 4096, 4096, 1),
                (2, 8192, 4096, 0),
                (2, 12288, 512, 3),
                (1, 4096, 65536, 3),
            ],
            "piece {piece}"
        );
    }
    // Extended descriptors, REQ_ONE.
    let mut s = extended();
    let id = s.client.block_status(0, 4096, true).expect("status");
    s.drain();
    let bytes = ext_chunk(
        DONE,
        BLOCK_STATUS_EXT,
        id.cookie(),
        0,
        &status_ext_payload(7, &[(4096, 2)]),
    );
    s.feed_split(&bytes, 3).expect("status");
    assert!(s.events.contains(&Ev::BlockStatus {
        id,
        context_id: 7,
        offset: 0,
        descriptors: vec![(4096, 2)]
    }));
}

#[test]
fn request_headers_carry_what_the_caller_asked() {
    for (style, mut s) in [("compact", structured(&[1])), ("extended", extended())] {
        let ids = [
            s.client
                .read(512, 1024, CommandFlags::DF | CommandFlags::FUA)
                .expect("read"),
            s.write(4096, &[7; 512]),
            s.client.flush().expect("flush"),
            s.client.trim(0, 4096, true).expect("trim"),
            s.client.cache(0, 8192).expect("cache"),
            s.client
                .write_zeroes(0, 512, CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO)
                .expect("zeroes"),
            s.client.block_status(0, 4096, true).expect("status"),
            s.client.resize(2 << 20).expect("resize"),
        ];
        let sent = s.drain();
        let header_len = if style == "extended" { 32 } else { 28 };
        // The write's payload follows its header.
        assert_eq!(sent[2 * header_len..2 * header_len + 512], [7; 512]);
        let mut headers: Vec<RequestHeader> = requests(&sent[..2 * header_len]);
        headers.extend(requests(&sent[2 * header_len + 512..]));
        let payload_len = if style == "extended" {
            CommandFlags::PAYLOAD_LEN
        } else {
            CommandFlags::empty()
        };
        let expected = [
            (
                Command::Read,
                CommandFlags::DF | CommandFlags::FUA,
                512,
                1024,
            ),
            (Command::Write, payload_len, 4096, 512),
            (Command::Flush, CommandFlags::empty(), 0, 0),
            (Command::Trim, CommandFlags::FUA, 0, 4096),
            (Command::Cache, CommandFlags::empty(), 0, 8192),
            (
                Command::WriteZeroes,
                CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
                0,
                512,
            ),
            (Command::BlockStatus, CommandFlags::REQ_ONE, 0, 4096),
            (Command::Resize, CommandFlags::empty(), 2 << 20, 0),
        ];
        assert_eq!(headers.len(), expected.len(), "{style}");
        for ((header, id), (command, flags, offset, length)) in
            headers.iter().zip(ids).zip(expected)
        {
            assert_eq!(header.command, command, "{style}");
            assert_eq!(header.flags, flags, "{style} {command:?}");
            assert_eq!(header.cookie, id.cookie());
            assert_eq!((header.offset, header.length), (offset, length), "{style}");
        }
    }
}

#[test]
fn eshutdown_in_a_simple_reply_disconnects_once_drained() {
    let mut s = Script::<8, 1024>::new(Config::new("disk").simple());
    s.feed(&greeting(3)).expect("greeting");
    s.feed(&go(SIZE, FLAGS)).expect("go");
    let a = s.client.flush().expect("flush");
    let b = s.client.flush().expect("flush");
    s.drain();
    s.sent.clear();
    s.feed(&simple_reply(108, a.cookie())).expect("shutdown");
    assert_eq!(s.client.flush(), Err(UsageError::Closing));
    assert!(s.sent.is_empty(), "DISC waits for the other request");
    s.feed(&simple_reply(0, b.cookie())).expect("done");
    assert_eq!(requests(&s.sent)[0].command, Command::Disconnect);
    assert_eq!(s.events.last(), Some(&Ev::Closed));
    assert_eq!(s.client.end_of_input(), Ok(()));
}

#[test]
fn simple_read_data_comes_as_it_arrives() {
    let mut s = Script::<8, 1024>::new(Config::new("disk").simple());
    s.feed(&greeting(3)).expect("greeting");
    s.feed(&go(SIZE, FLAGS)).expect("go");
    s.take_events();
    let id = s.client.read(0, 10, CommandFlags::empty()).expect("read");
    s.drain();
    let mut bytes = simple_reply(0, id.cookie());
    bytes.extend_from_slice(b"0123456789");
    s.feed_split(&bytes, 20).expect("read");
    assert_eq!(
        s.take_events(),
        [
            Ev::ReadData {
                id,
                offset: 0,
                data: b"0123".to_vec()
            },
            Ev::ReadData {
                id,
                offset: 4,
                data: b"456789".to_vec()
            },
            Ev::Done { id, result: Ok(()) }
        ]
    );
}

#[test]
fn configurations_that_do_not_fit_are_refused() {
    use nbd_core::client::{ConfigError, Connection, MIN_REPLY_SPACE};
    let long = "x".repeat(4097);
    assert_eq!(
        Connection::<4, 8192>::new(Config::new(&long)).err(),
        Some(ConfigError::StringTooLong)
    );
    let queries = [long.as_str()];
    assert_eq!(
        Connection::<4, 8192>::new(Config::new("").with_meta_contexts(&queries)).err(),
        Some(ConfigError::StringTooLong)
    );
    // Name, query count, one query of 15 bytes, and room for replies.
    let needed = 4 + 4 + 4 + 15 + MIN_REPLY_SPACE;
    assert_eq!(
        Connection::<4, 64>::new(Config::new("disk")).err(),
        Some(ConfigError::BufferTooSmall { needed })
    );
    assert!(Connection::<4, 91>::new(Config::new("disk")).is_ok());
}
