//! Every command, with simple and with structured replies (spec: "Request
//! types", "Simple reply message", "Structured reply chunk message").

mod common;

use common::*;
use nbd_core::export::{Capabilities, Export};
use nbd_core::server::{
    CloseReason, CompletionError, Config, ProtocolError, ReadOutcome, Request, RequestId,
};
use nbd_core::wire::{Chunk, ChunkType, Command, CommandFlags, ErrorCode, ReplyFlags};

type H = Harness;

fn exports() -> Vec<Export<'static>> {
    vec![full_export("disk")]
}

fn connect(structured: bool) -> H {
    H::transmission(exports(), Config::default(), structured)
}

/// A simple reply header, written out by hand.
fn simple_bytes(error: u32, cookie: u64) -> Vec<u8> {
    let mut out = 0x6744_6698u32.to_be_bytes().to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured chunk header, written out by hand.
fn chunk_bytes(flags: u16, chunk_type: u16, cookie: u64, length: u32) -> Vec<u8> {
    let mut out = 0x668e_33efu32.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk_type.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

fn held_read(h: &mut H, cookie: u64, offset: u64, length: u64) -> RequestId {
    h.request(Command::Read, CommandFlags::empty(), cookie, offset, length);
    match h.take_one_held() {
        Request::Read {
            id,
            offset: o,
            length: l,
        } => {
            assert_eq!((o, l), (offset, length));
            id
        }
        other => panic!("expected a read, got {other:?}"),
    }
}

// -- READ -------------------------------------------------------------------

#[test]
fn read_with_simple_reply() {
    let mut h = connect(false);
    h.request(
        Command::Read,
        CommandFlags::empty(),
        0x0102_0304_0506_0708,
        1000,
        300,
    );
    let expected = [
        simple_bytes(0, 0x0102_0304_0506_0708),
        h.disk()[1000..1300].to_vec(),
    ]
    .concat();
    assert_eq!(h.received(), expected);
}

#[test]
fn read_with_structured_reply() {
    let mut h = connect(true);
    h.request(Command::Read, CommandFlags::empty(), 77, 1000, 300);
    let mut expected = chunk_bytes(1, 1, 77, 308);
    expected.extend_from_slice(&1000u64.to_be_bytes());
    expected.extend_from_slice(&h.disk()[1000..1300]);
    assert_eq!(h.received(), expected);
}

#[test]
fn read_with_df_is_one_chunk() {
    let mut h = connect(true);
    h.request(Command::Read, CommandFlags::DF, 1, 0, 65536);
    let got = replies(&h.received(), &[]);
    assert_read_data(&got, 1, 0, &h.disk()[..65536]);
    let content = got.iter().filter(|r| {
        matches!(
            r.chunk(),
            Chunk::OffsetData { .. } | Chunk::OffsetHole { .. }
        )
    });
    assert_eq!(content.count(), 1);
}

#[test]
fn read_of_zeroes() {
    // Structured: one hole chunk.
    let mut h = connect(true);
    h.auto_complete = false;
    let id = held_read(&mut h, 3, 4096, 8192);
    h.complete_read(id, ReadOutcome::Zeroes).expect("complete");
    let mut expected = chunk_bytes(1, 2, 3, 12);
    expected.extend_from_slice(&4096u64.to_be_bytes());
    expected.extend_from_slice(&8192u32.to_be_bytes());
    assert_eq!(h.received(), expected);
    // Simple: a header and zero bytes.
    let mut h = connect(false);
    h.auto_complete = false;
    let id = held_read(&mut h, 4, 4096, 8192);
    h.complete_read(id, ReadOutcome::Zeroes).expect("complete");
    assert_eq!(h.received(), [simple_bytes(0, 4), vec![0; 8192]].concat());
}

#[test]
fn read_error_then_a_good_read() {
    for structured in [false, true] {
        let mut h = connect(structured);
        h.auto_complete = false;
        let id = held_read(&mut h, 5, 0, 4096);
        h.complete_read(id, ReadOutcome::Error(ErrorCode::Io))
            .expect("complete");
        let bytes = h.received();
        if structured {
            let got = replies(&bytes, &[]);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].header().chunk_type, ChunkType::Error);
            assert_error(&got[0], 5, ErrorCode::Io);
        } else {
            // No data follows an error.
            assert_eq!(bytes, simple_bytes(5, 5));
        }
        h.auto_complete = true;
        h.read_ok(6, 0, 4096);
    }
}

#[test]
fn read_failed_through_complete() {
    let mut h = connect(true);
    h.auto_complete = false;
    let id = held_read(&mut h, 5, 0, 512);
    h.complete(id, Err(ErrorCode::Io)).expect("complete");
    let got = replies(&h.received(), &[]);
    assert_error(&got[0], 5, ErrorCode::Io);
}

#[test]
fn zero_length_read_does_not_disconnect() {
    for structured in [false, true] {
        let mut h = connect(structured);
        h.request(Command::Read, CommandFlags::empty(), 1, 0, 0);
        let got = replies(&h.received(), &[(1, 0)]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].cookie(), 1);
        assert!(got[0].is_final());
        assert_eq!(got[0].error(), 0);
        assert!(h.events.iter().all(|e| e.request().is_none()));
        h.read_ok(2, 0, 512);
    }
}

// -- Streamed reads ---------------------------------------------------------

#[test]
fn streamed_read_with_structured_replies() {
    let mut h = connect(true);
    h.auto_complete = false;
    let id = held_read(&mut h, 8, 512, 1024);
    h.complete_read(id, ReadOutcome::Streamed)
        .expect("complete");
    // The data chunk is open (no DONE) and the shell streams the data.
    let mut expected = chunk_bytes(0, 1, 8, 1032);
    expected.extend_from_slice(&512u64.to_be_bytes());
    expected.extend_from_slice(&h.disk()[512..1536]);
    assert_eq!(h.received(), expected);
    assert_eq!(h.conn.in_flight(), 1);
    h.conn.finish_streamed_read(id, Ok(())).expect("finish");
    assert_eq!(
        h.received(),
        chunk_bytes(1, 0, 8, 0),
        "a NONE chunk ends it"
    );
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn streamed_read_failing_midway_with_structured_replies() {
    let mut h = connect(true);
    h.auto_complete = false;
    let id = held_read(&mut h, 9, 512, 1024);
    h.complete_read(id, ReadOutcome::Streamed)
        .expect("complete");
    let got = replies(&h.received(), &[]);
    assert!(!got[0].is_final());
    h.conn
        .finish_streamed_read(id, Err((ErrorCode::Io, 1024)))
        .expect("finish");
    let mut expected = chunk_bytes(1, 0x8002, 9, 14);
    expected.extend_from_slice(&5u32.to_be_bytes());
    expected.extend_from_slice(&0u16.to_be_bytes());
    expected.extend_from_slice(&1024u64.to_be_bytes());
    let bytes = h.received();
    assert_eq!(bytes, expected);
    assert_eq!(
        replies(&bytes, &[])[0].chunk(),
        Chunk::ErrorOffset {
            error: 5,
            message: b"",
            offset: 1024
        }
    );
    h.auto_complete = true;
    h.read_ok(10, 0, 512);
}

#[test]
fn streamed_read_error_outside_the_request_is_refused() {
    let mut h = connect(true);
    h.auto_complete = false;
    let id = held_read(&mut h, 9, 512, 1024);
    h.complete_read(id, ReadOutcome::Streamed)
        .expect("complete");
    h.received();
    assert_eq!(
        h.conn.finish_streamed_read(id, Err((ErrorCode::Io, 4096))),
        Err(CompletionError::NotRepresentable)
    );
}

#[test]
fn streamed_read_with_simple_replies() {
    let mut h = connect(false);
    h.auto_complete = false;
    let id = held_read(&mut h, 11, 0, 100);
    h.complete_read(id, ReadOutcome::Streamed)
        .expect("complete");
    assert_eq!(
        h.received(),
        [simple_bytes(0, 11), h.disk()[..100].to_vec()].concat()
    );
    h.conn.finish_streamed_read(id, Ok(())).expect("finish");
    assert!(
        h.received().is_empty(),
        "nothing follows a simple reply's data"
    );
    assert_eq!(h.conn.in_flight(), 0);
    // An error after the header went out cannot be told: hard disconnect.
    let id = held_read(&mut h, 12, 0, 100);
    h.complete_read(id, ReadOutcome::Streamed)
        .expect("complete");
    h.received();
    assert_eq!(
        h.conn.finish_streamed_read(id, Err((ErrorCode::Io, 50))),
        Err(CompletionError::NotRepresentable)
    );
}

#[test]
fn finishing_a_streamed_read_before_its_header_went_out() {
    let mut h = connect(true);
    h.auto_complete = false;
    let id = held_read(&mut h, 1, 0, 100);
    h.complete_read(id, ReadOutcome::Streamed)
        .expect("complete");
    assert_eq!(
        h.conn.finish_streamed_read(id, Ok(())),
        Err(CompletionError::WrongKind)
    );
    h.received();
    h.conn.finish_streamed_read(id, Ok(())).expect("finish");
}

// -- WRITE ------------------------------------------------------------------

fn write_in_pieces(structured: bool) {
    let mut h = connect(structured);
    h.auto_complete = false;
    let payload: Vec<u8> = (0..2000u32).map(|i| (i * 31 % 256) as u8).collect();
    let style = h.style();
    h.send(&request(
        style,
        Command::Write,
        CommandFlags::empty(),
        42,
        6000,
        payload.len() as u64,
    ));
    let Request::Write {
        id,
        offset,
        length,
        fua,
    } = h.take_one_held()
    else {
        panic!("expected a write");
    };
    assert_eq!((offset, length, fua), (6000, 2000, false));
    // Completing before the payload is whole is refused.
    assert_eq!(
        h.conn.complete(id, Ok(())),
        Err(CompletionError::PayloadIncomplete)
    );
    let pieces = pieces(&payload, 0x5eed, 7);
    h.events.clear();
    for piece in &pieces {
        h.send(piece);
    }
    let data: Vec<_> = h
        .take_events()
        .into_iter()
        .map(|e| match e {
            Ev::WriteData {
                id: got,
                offset,
                data,
                remaining,
            } => {
                assert_eq!(got, id);
                (offset, data, remaining)
            }
            other => panic!("expected write data, got {other:?}"),
        })
        .collect();
    assert_eq!(data.len(), pieces.len(), "one slice per input");
    let mut at = 6000;
    let mut left = 2000;
    for ((offset, slice, remaining), piece) in data.iter().zip(&pieces) {
        assert_eq!(slice, piece, "the slice is the input piece");
        assert_eq!(*offset, at);
        left -= piece.len() as u64;
        assert_eq!(*remaining, left);
        at += piece.len() as u64;
    }
    assert_eq!(left, 0);
    assert!(h.received().is_empty(), "no reply before completion");
    h.complete(id, Ok(())).expect("complete");
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1);
    assert_success(&got[0], 42);
    assert_eq!(&h.disk()[6000..8000], &payload[..]);
    h.auto_complete = true;
    h.read_ok(43, 6000, 2000);
}

#[test]
fn write_payload_in_small_pieces_with_simple_replies() {
    write_in_pieces(false);
}

#[test]
fn write_payload_in_small_pieces_with_structured_replies() {
    write_in_pieces(true);
}

#[test]
fn write_with_fua_and_exact_reply() {
    let mut h = connect(false);
    h.write(CommandFlags::FUA, 9, 0, &[1, 2, 3, 4]);
    assert_eq!(h.received(), simple_bytes(0, 9));
    assert!(h.events.contains(&Ev::Request(Request::Write {
        id: match h.events[0] {
            Ev::Request(r) => r.id(),
            _ => panic!(),
        },
        offset: 0,
        length: 4,
        fua: true,
    })));
    assert_eq!(&h.disk()[..4], &[1, 2, 3, 4]);
}

#[test]
fn write_failed_by_storage() {
    for structured in [false, true] {
        let mut h = connect(structured);
        h.auto_complete = false;
        h.write(CommandFlags::empty(), 9, 0, &[7; 100]);
        let id = h.take_one_held().id();
        h.complete(id, Err(ErrorCode::Io)).expect("complete");
        let got = replies(&h.received(), &[]);
        assert_error(&got[0], 9, ErrorCode::Io);
    }
}

#[test]
fn zero_length_write_does_not_disconnect() {
    let mut h = connect(false);
    h.write(CommandFlags::empty(), 1, 0, &[]);
    assert_eq!(h.received(), simple_bytes(0, 1));
    h.read_ok(2, 0, 512);
}

// -- FLUSH, TRIM, CACHE, WRITE_ZEROES ---------------------------------------

fn one_request(
    h: &mut H,
    command: Command,
    flags: CommandFlags,
    cookie: u64,
    offset: u64,
    length: u64,
) -> (Request, Vec<Reply>) {
    h.events.clear();
    h.request(command, flags, cookie, offset, length);
    let requests: Vec<_> = h.events.iter().filter_map(Ev::request).collect();
    assert_eq!(requests.len(), 1, "{:?}", h.events);
    let got = replies(&h.received(), &[]);
    (requests[0], got)
}

#[test]
fn flush_trim_cache_and_write_zeroes() {
    for structured in [false, true] {
        let mut h = connect(structured);
        let (request, got) = one_request(&mut h, Command::Flush, CommandFlags::empty(), 1, 0, 0);
        assert!(matches!(request, Request::Flush { .. }));
        assert_success(&got[0], 1);

        let (request, got) = one_request(&mut h, Command::Trim, CommandFlags::FUA, 2, 4096, 8192);
        assert!(
            matches!(
                request,
                Request::Trim {
                    offset: 4096,
                    length: 8192,
                    fua: true,
                    ..
                }
            ),
            "{request:?}"
        );
        assert_success(&got[0], 2);
        assert!(h.disk()[4096..12288].iter().all(|&b| b == 0));

        let (request, got) =
            one_request(&mut h, Command::Cache, CommandFlags::empty(), 3, 0, 1 << 20);
        assert!(
            matches!(
                request,
                Request::Cache {
                    offset: 0,
                    length: 1048576,
                    ..
                }
            ),
            "{request:?}"
        );
        assert_success(&got[0], 3);

        let (request, got) = one_request(
            &mut h,
            Command::WriteZeroes,
            CommandFlags::NO_HOLE,
            4,
            0,
            1024,
        );
        assert!(
            matches!(
                request,
                Request::WriteZeroes {
                    offset: 0,
                    length: 1024,
                    no_hole: true,
                    fast: false,
                    fua: false,
                    ..
                }
            ),
            "{request:?}"
        );
        assert_success(&got[0], 4);

        let flags = CommandFlags::FAST_ZERO | CommandFlags::FUA;
        let (request, got) = one_request(&mut h, Command::WriteZeroes, flags, 5, 1024, 1024);
        assert!(
            matches!(
                request,
                Request::WriteZeroes {
                    offset: 1024,
                    length: 1024,
                    no_hole: false,
                    fast: true,
                    fua: true,
                    ..
                }
            ),
            "{request:?}"
        );
        assert_success(&got[0], 5);
        h.read_ok(6, 0, 2048);
        assert!(h.disk()[..2048].iter().all(|&b| b == 0));
    }
}

#[test]
fn fast_zero_that_would_be_slow_fails_with_enotsup() {
    let mut h = connect(true);
    h.auto_complete = false;
    h.request(Command::WriteZeroes, CommandFlags::FAST_ZERO, 1, 0, 4096);
    let id = h.take_one_held().id();
    h.complete(id, Err(ErrorCode::NotSupported))
        .expect("complete");
    let got = replies(&h.received(), &[]);
    assert_error(&got[0], 1, ErrorCode::NotSupported);
}

#[test]
fn trim_and_write_zeroes_may_exceed_the_maximum_block_size() {
    let exports = vec![full_export("disk").with_block_sizes(ALIGNED)];
    let mut h = H::transmission(exports, Config::default(), false);
    let (request, got) = one_request(&mut h, Command::Trim, CommandFlags::empty(), 1, 0, 1 << 19);
    assert!(matches!(request, Request::Trim { length: 524288, .. }));
    assert_success(&got[0], 1);
    let (_, got) = one_request(
        &mut h,
        Command::WriteZeroes,
        CommandFlags::FAST_ZERO,
        2,
        0,
        1 << 19,
    );
    assert_success(&got[0], 2);
    // Without FAST_ZERO too (spec: no payload either way, so the effect
    // length may exceed the maximum; nbdcopy zeroes big holes this way).
    for (handle, flags) in [(3, CommandFlags::empty()), (4, CommandFlags::NO_HOLE)] {
        let (request, got) = one_request(&mut h, Command::WriteZeroes, flags, handle, 0, 1 << 19);
        assert!(matches!(
            request,
            Request::WriteZeroes { length: 524288, .. }
        ));
        assert_success(&got[0], handle);
    }
}

// -- BLOCK_STATUS -----------------------------------------------------------

#[test]
fn block_status_with_structured_replies() {
    let mut h = connect(true);
    h.disk_mut()[..4096].fill(0);
    let (request, got) = one_request(
        &mut h,
        Command::BlockStatus,
        CommandFlags::REQ_ONE,
        1,
        0,
        1 << 20,
    );
    assert!(matches!(
        request,
        Request::BlockStatus {
            offset: 0,
            length: 1048576,
            req_one: true,
            ..
        }
    ));
    assert_eq!(got.len(), 1);
    assert!(got[0].header().flags.contains(ReplyFlags::DONE));
    match got[0].chunk() {
        Chunk::BlockStatus { descriptors, .. } => {
            let list: Vec<_> = descriptors.iter().collect();
            assert_eq!(list.len(), 1);
            assert_eq!((list[0].length, list[0].status), (4096, 3));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn block_status_completed_with_an_error() {
    let mut h = connect(true);
    h.auto_complete = false;
    h.request(Command::BlockStatus, CommandFlags::empty(), 1, 0, 4096);
    let id = h.take_one_held().id();
    assert_eq!(h.conn.complete(id, Ok(())), Err(CompletionError::WrongKind));
    assert_eq!(
        h.conn.complete_block_status(id, &[]),
        Err(CompletionError::EmptyExtents)
    );
    h.conn.complete(id, Err(ErrorCode::Io)).expect("complete");
    let got = replies(&h.received(), &[]);
    assert_error(&got[0], 1, ErrorCode::Io);
}

// -- RESIZE -----------------------------------------------------------------

#[test]
fn resize_changes_the_export_size_after_completion() {
    for structured in [false, true] {
        let mut h = connect(structured);
        h.auto_complete = false;
        // A read past the current end fails.
        h.request(Command::Read, CommandFlags::empty(), 1, 1 << 20, 512);
        assert_error(&replies(&h.received(), &[])[0], 1, ErrorCode::Invalid);
        h.request(Command::Resize, CommandFlags::empty(), 2, 2 << 20, 0);
        let request = h.take_one_held();
        let Request::Resize { id, size } = request else {
            panic!("{request:?}")
        };
        assert_eq!(size, 2 << 20);
        assert_eq!(h.conn.export_size(), Some(1 << 20), "not before completion");
        h.disk_mut().resize(2 << 20, 0xcc);
        h.complete(id, Ok(())).expect("complete");
        assert_eq!(h.conn.export_size(), Some(2 << 20));
        let got = replies(&h.received(), &[]);
        assert_success(&got[0], 2);
        h.auto_complete = true;
        h.read_ok(3, 1 << 20, 512);
        assert!(
            h.disk()[1 << 20..(1 << 20) + 512]
                .iter()
                .all(|&b| b == 0xcc)
        );
        // Shrink.
        h.request(Command::Resize, CommandFlags::empty(), 4, 4096, 0);
        assert_success(&replies(&h.received(), &[])[0], 4);
        assert_eq!(h.conn.export_size(), Some(4096));
        h.request(Command::Read, CommandFlags::empty(), 5, 4096, 1);
        assert_error(&replies(&h.received(), &[])[0], 5, ErrorCode::Invalid);
        h.read_ok(6, 4095, 1);
    }
}

#[test]
fn resize_refused_by_storage_keeps_the_size() {
    let mut h = connect(true);
    h.auto_complete = false;
    h.request(Command::Resize, CommandFlags::empty(), 2, 2 << 20, 0);
    let id = h.take_one_held().id();
    h.complete(id, Err(ErrorCode::NoSpace)).expect("complete");
    assert_error(&replies(&h.received(), &[])[0], 2, ErrorCode::NoSpace);
    assert_eq!(h.conn.export_size(), Some(1 << 20));
}

#[test]
fn resize_without_the_capability_is_einval() {
    let exports = vec![
        Export::new("disk", 1 << 20).with_capabilities(Capabilities {
            flush: true,
            ..Capabilities::NONE
        }),
    ];
    let mut h = H::transmission(exports, Config::default(), false);
    h.request(Command::Resize, CommandFlags::empty(), 2, 2 << 20, 0);
    assert_eq!(
        replies(&h.received(), &[]),
        vec![Reply::Simple {
            error: 22,
            cookie: 2,
            data: vec![]
        }]
    );
    assert!(h.events.iter().all(|e| e.request().is_none()));
}

// -- DISC -------------------------------------------------------------------

#[test]
fn disconnect_alone_closes_without_a_reply() {
    let mut h = connect(false);
    h.request(Command::Disconnect, CommandFlags::empty(), 1, 0, 0);
    assert!(h.received().is_empty(), "no reply to NBD_CMD_DISC");
    assert_eq!(h.take_events(), vec![Ev::Close(CloseReason::Disconnect)]);
    assert!(h.conn.is_closed());
}

#[test]
fn end_of_input_tells_a_finished_session_from_a_cut_one() {
    // Negotiation and transmission cut short by the client going away.
    let negotiating = H::new(exports(), Config::default());
    assert_eq!(
        negotiating.conn.end_of_input(),
        Err(ProtocolError::UnexpectedEof)
    );
    let mut h = connect(false);
    assert_eq!(h.conn.end_of_input(), Err(ProtocolError::UnexpectedEof));
    // Half a request header, then NBD_CMD_DISC after a whole one.
    let disc = request(
        h.style(),
        Command::Disconnect,
        CommandFlags::empty(),
        1,
        0,
        0,
    );
    h.send(&disc[..10]);
    assert_eq!(h.conn.end_of_input(), Err(ProtocolError::UnexpectedEof));
    h.send(&disc[10..]);
    assert_eq!(h.take_events(), vec![Ev::Close(CloseReason::Disconnect)]);
    assert_eq!(h.conn.end_of_input(), Ok(()));
}

#[test]
fn disconnect_waits_for_requests_in_flight_and_their_replies() {
    for structured in [false, true] {
        let mut h = connect(structured);
        h.auto_complete = false;
        h.auto_transmit = false;
        let style = h.style();
        let mut bytes = request(style, Command::Read, CommandFlags::empty(), 1, 0, 512);
        bytes.extend(write_request(
            style,
            CommandFlags::empty(),
            2,
            512,
            &[9; 512],
        ));
        bytes.extend(request(
            style,
            Command::Disconnect,
            CommandFlags::empty(),
            3,
            0,
            0,
        ));
        h.send(&bytes);
        let held = h.take_held();
        assert_eq!(held.len(), 2);
        assert!(!h.events.contains(&Ev::Close(CloseReason::Disconnect)));
        h.complete(held[1].id(), Ok(())).expect("complete write");
        h.pump();
        assert!(!h.events.contains(&Ev::Close(CloseReason::Disconnect)));
        h.complete(held[0].id(), Ok(())).expect("complete read");
        h.pump();
        assert!(
            !h.events.contains(&Ev::Close(CloseReason::Disconnect)),
            "closed before the replies were handed out"
        );
        let got = replies(&h.received(), &[(1, 512)]);
        assert_eq!(got.iter().filter(|r| r.is_final()).count(), 2, "{got:?}");
        assert!(got.iter().all(|r| r.cookie() != 3), "DISC got a reply");
        h.pump();
        assert_eq!(h.events.last(), Some(&Ev::Close(CloseReason::Disconnect)));
        assert!(h.received().is_empty());
    }
}

#[test]
fn disconnect_mid_stream_ignores_what_follows() {
    let mut h = connect(false);
    h.auto_complete = false;
    h.auto_transmit = false;
    let style = h.style();
    let mut bytes = request(style, Command::Read, CommandFlags::empty(), 1, 0, 512);
    bytes.extend(request(
        style,
        Command::Disconnect,
        CommandFlags::empty(),
        3,
        0,
        0,
    ));
    // A misbehaving client goes on after DISC.
    bytes.extend(request(
        style,
        Command::Read,
        CommandFlags::empty(),
        4,
        0,
        512,
    ));
    h.send(&bytes);
    let held = h.take_held();
    assert_eq!(held.len(), 1, "a request after DISC was issued");
    h.complete(held[0].id(), Ok(())).expect("complete");
    let got = replies(&h.received(), &[(1, 512)]);
    assert_eq!(got.len(), 1);
    h.pump();
    assert_eq!(h.events.last(), Some(&Ev::Close(CloseReason::Disconnect)));
}
