//! Graceful shutdown and the completion API's guards against shell bugs
//! (spec: "Terminating the transmission phase", `NBD_ESHUTDOWN`).

mod common;

use common::*;
use nbd_core::export::Export;
use nbd_core::server::{
    CloseReason, CompletionError, Config, ProtocolError, ReadOutcome, Request, RequestId,
};
use nbd_core::wire::{Command, CommandFlags, ErrorCode, ExtDescriptor, OptionCode};

type H = Harness;

fn exports() -> Vec<Export<'static>> {
    vec![full_export("disk")]
}

fn held(structured: bool) -> H {
    let mut h = H::transmission(exports(), Config::default(), structured);
    h.auto_complete = false;
    h
}

fn held_request(h: &mut H, command: Command, cookie: u64, offset: u64, length: u64) -> RequestId {
    h.request(command, CommandFlags::empty(), cookie, offset, length);
    h.take_one_held().id()
}

// -- Shutdown ---------------------------------------------------------------

#[test]
fn shutdown_refuses_new_requests_then_closes_when_idle() {
    for structured in [false, true] {
        let mut h = held(structured);
        let read = held_request(&mut h, Command::Read, 1, 0, 512);
        h.conn.shutdown();
        // New requests are refused at once, storage is not asked.
        h.request(Command::Read, CommandFlags::empty(), 2, 0, 512);
        h.write(CommandFlags::empty(), 3, 0, &[5; 700]);
        h.request(Command::Flush, CommandFlags::empty(), 4, 0, 0);
        assert!(h.take_held().is_empty());
        assert_eq!(h.pending_input(), 0, "the write's payload was not consumed");
        let got = replies(&h.received(), &[]);
        assert_eq!(got.len(), 3);
        for (reply, cookie) in got.iter().zip([2, 3, 4]) {
            assert_error(reply, cookie, ErrorCode::Shutdown);
        }
        assert!(
            !h.events.contains(&Ev::Close(CloseReason::Shutdown)),
            "closed with a read in flight"
        );
        // The request in flight is still answered, then the session ends.
        h.complete(read, Ok(())).expect("complete");
        let got = replies(&h.received(), &[(1, 512)]);
        assert_read_data(&got, 1, 0, &h.disk()[..512]);
        h.pump();
        assert_eq!(h.events.last(), Some(&Ev::Close(CloseReason::Shutdown)));
        assert!(h.conn.is_closed());
    }
}

#[test]
fn shutdown_waits_for_the_last_reply_to_be_handed_out() {
    let mut h = held(true);
    h.auto_transmit = false;
    let read = held_request(&mut h, Command::Read, 1, 0, 512);
    h.conn.shutdown();
    h.complete(read, Ok(())).expect("complete");
    h.events.clear();
    h.pump();
    assert!(
        h.take_events().is_empty(),
        "closed before the reply went out"
    );
    assert_eq!(replies(&h.received(), &[])[0].cookie(), 1);
    h.pump();
    assert_eq!(h.take_events(), vec![Ev::Close(CloseReason::Shutdown)]);
}

#[test]
fn shutdown_when_idle_closes_on_the_next_call() {
    let mut h = held(false);
    h.conn.shutdown();
    h.conn.shutdown();
    h.pump();
    assert_eq!(h.take_events(), vec![Ev::Close(CloseReason::Shutdown)]);
    assert_eq!(h.try_send(&[0; 28]), Err(ProtocolError::Closed));
}

#[test]
fn shutdown_during_a_write_payload_waits_for_it() {
    let mut h = held(false);
    let bytes = write_request(h.style(), CommandFlags::empty(), 1, 0, &[8; 1000]);
    h.send(&bytes[..28 + 10]);
    let write = h.take_one_held();
    h.conn.shutdown();
    h.send(&bytes[28 + 10..]);
    h.complete(write.id(), Ok(())).expect("complete");
    let got = replies(&h.received(), &[]);
    assert_success(&got[0], 1);
    h.pump();
    assert_eq!(h.events.last(), Some(&Ev::Close(CloseReason::Shutdown)));
    assert!(h.disk()[..1000].iter().all(|&b| b == 8));
}

#[test]
fn shutdown_during_negotiation_ends_the_session() {
    let mut h = H::new(exports(), Config::default());
    h.start(MODERN);
    h.option_ack(&option(OptionCode::StructuredReply, &[]));
    h.conn.shutdown();
    h.send(&option(OptionCode::List, &[]));
    // The connection ends cleanly; whether the option got
    // NBD_REP_ERR_SHUTDOWN first is the server's choice.
    assert_eq!(h.events.last(), Some(&Ev::Close(CloseReason::Shutdown)));
    for reply in option_replies(&h.received()) {
        assert_eq!(
            reply.reply_type,
            nbd_core::wire::OptionReplyType::ErrShutdown
        );
    }
}

#[test]
fn shutdown_lets_pending_option_replies_out_first() {
    let mut h = H::new(exports(), Config::default());
    h.start(MODERN);
    h.auto_transmit = false;
    h.send(&option(OptionCode::List, &[]));
    h.conn.shutdown();
    h.pump();
    assert!(h.take_events().is_empty());
    let replies = option_replies(&h.received());
    assert_eq!(replies.len(), 2, "LIST's replies were cut short");
    h.pump();
    assert_eq!(h.take_events(), vec![Ev::Close(CloseReason::Shutdown)]);
}

// -- Completion guards ------------------------------------------------------

#[test]
fn completing_an_answered_request_is_refused() {
    let mut h = held(false);
    let read = held_request(&mut h, Command::Read, 1, 0, 512);
    h.complete(read, Ok(())).expect("complete");
    // Twice before the reply went out: busy.
    assert_eq!(h.conn.complete(read, Ok(())), Err(CompletionError::Busy));
    assert_eq!(
        h.conn.complete_read(read, ReadOutcome::Zeroes),
        Err(CompletionError::Busy)
    );
    h.received();
    // After: unknown.
    assert_eq!(
        h.conn.complete(read, Ok(())),
        Err(CompletionError::UnknownRequest)
    );
    assert_eq!(
        h.conn.complete_read(read, ReadOutcome::Data),
        Err(CompletionError::UnknownRequest)
    );
    assert!(
        h.received().is_empty(),
        "a stale completion produced a reply"
    );
}

#[test]
fn a_stale_id_does_not_complete_the_request_reusing_its_slot() {
    let mut h = held(false);
    let first = held_request(&mut h, Command::Read, 1, 0, 512);
    h.complete(first, Ok(())).expect("complete");
    h.received();
    let second = held_request(&mut h, Command::Read, 2, 512, 512);
    assert_ne!(first, second);
    assert_eq!(
        h.conn.complete(first, Ok(())),
        Err(CompletionError::UnknownRequest)
    );
    assert!(h.received().is_empty());
    h.complete(second, Ok(())).expect("complete");
    assert_eq!(replies(&h.received(), &[(2, 512)])[0].cookie(), 2);
}

#[test]
fn ids_never_issued_are_unknown() {
    let mut h = held(true);
    for bits in [0, 1, 0xffff_ffff, 0x0001_0005] {
        let id = RequestId::from_bits(bits);
        assert_eq!(
            h.conn.complete(id, Ok(())),
            Err(CompletionError::UnknownRequest)
        );
        assert_eq!(
            h.conn.complete_block_status(id, &[]),
            Err(CompletionError::UnknownRequest)
        );
        assert_eq!(
            h.conn.finish_streamed_read(id, Ok(())),
            Err(CompletionError::UnknownRequest)
        );
    }
    assert!(h.received().is_empty());
}

#[test]
fn a_write_cannot_succeed_before_its_payload() {
    let mut h = held(true);
    let bytes = write_request(h.style(), CommandFlags::empty(), 1, 0, &[3; 100]);
    h.send(&bytes[..28]);
    let write = h.take_one_held().id();
    assert_eq!(
        h.conn.complete(write, Ok(())),
        Err(CompletionError::PayloadIncomplete)
    );
    h.send(&bytes[28..60]);
    assert_eq!(
        h.conn.complete(write, Ok(())),
        Err(CompletionError::PayloadIncomplete)
    );
    h.send(&bytes[60..]);
    h.complete(write, Ok(())).expect("complete");
    assert_success(&replies(&h.received(), &[])[0], 1);
}

#[test]
fn a_write_failed_early_has_the_rest_of_its_payload_dropped() {
    let mut h = held(false);
    let style = h.style();
    let before = h.disk().to_vec();
    let mut bytes = write_request(style, CommandFlags::empty(), 1, 0, &[3; 100]);
    bytes.extend(request(
        style,
        Command::Read,
        CommandFlags::empty(),
        2,
        0,
        16,
    ));
    h.send(&bytes[..40]);
    let write = h.take_one_held().id();
    h.events.clear();
    h.complete(write, Err(ErrorCode::Io)).expect("complete");
    // No reply while the client is still sending the payload: libnbd 1.14
    // drops the connection on a reply to a request it is still writing.
    assert_eq!(replies(&h.received(), &[]), vec![]);
    assert_eq!(
        h.conn.complete(write, Err(ErrorCode::Io)),
        Err(CompletionError::Busy),
        "answered once"
    );
    h.send(&bytes[40..]);
    assert!(
        !h.events.iter().any(|e| matches!(e, Ev::WriteData { .. })),
        "payload of a failed write handed out"
    );
    assert_eq!(
        replies(&h.received(), &[]),
        vec![Reply::Simple {
            error: 5,
            cookie: 1,
            data: vec![]
        }]
    );
    let read = h.take_one_held();
    assert!(
        matches!(
            read,
            Request::Read {
                offset: 0,
                length: 16,
                ..
            }
        ),
        "{read:?}"
    );
    assert_eq!(
        &h.disk()[12..],
        &before[12..],
        "only the first 12 bytes were stored"
    );
}

#[test]
fn completions_of_the_wrong_kind_are_refused() {
    let mut h = held(true);
    let write = {
        h.write(CommandFlags::empty(), 1, 0, &[1; 16]);
        h.take_one_held().id()
    };
    let read = held_request(&mut h, Command::Read, 2, 0, 16);
    let status = held_request(&mut h, Command::BlockStatus, 3, 0, 16);
    let extent = [ExtDescriptor {
        length: 16,
        status: 0,
    }];
    assert_eq!(
        h.conn.complete_read(write, ReadOutcome::Data),
        Err(CompletionError::WrongKind)
    );
    assert_eq!(
        h.conn.complete_block_status(read, &extent),
        Err(CompletionError::WrongKind)
    );
    assert_eq!(
        h.conn.complete(status, Ok(())),
        Err(CompletionError::WrongKind)
    );
    assert_eq!(
        h.conn.finish_streamed_read(read, Ok(())),
        Err(CompletionError::WrongKind)
    );
    assert_eq!(
        h.conn.complete_block_status(
            status,
            &[ExtDescriptor {
                length: 0,
                status: 0
            }]
        ),
        Err(CompletionError::EmptyExtents)
    );
    assert!(h.received().is_empty());
    // The right calls still work.
    h.conn.complete(write, Ok(())).expect("write");
    h.complete(read, Ok(())).expect("read");
    h.conn
        .complete_block_status(status, &extent)
        .expect("status");
    let cookies: Vec<_> = replies(&h.received(), &[])
        .iter()
        .map(Reply::cookie)
        .collect();
    assert_eq!(cookies, vec![1, 2, 3]);
}

#[test]
fn in_flight_counts_requests_until_their_replies_go_out() {
    let mut h = held(false);
    assert_eq!(h.conn.in_flight(), 0);
    let a = held_request(&mut h, Command::Read, 1, 0, 16);
    let b = held_request(&mut h, Command::Cache, 2, 0, 16);
    assert_eq!(h.conn.in_flight(), 2);
    h.complete(a, Ok(())).expect("complete");
    h.conn.complete(b, Err(ErrorCode::Io)).expect("complete");
    assert_eq!(h.conn.in_flight(), 2);
    h.received();
    assert_eq!(h.conn.in_flight(), 0);
}
