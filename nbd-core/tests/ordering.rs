//! Out-of-order completion, flush and resize barriers, back-pressure
//! (spec: "Ordering of messages and writes", "NBD_CMD_FLUSH").

mod common;

use common::*;
use nbd_core::export::Export;
use nbd_core::server::{Config, Request};
use nbd_core::wire::{Command, CommandFlags};

type H = Harness;

fn exports() -> Vec<Export<'static>> {
    vec![full_export("disk")]
}

fn held(structured: bool, config: Config) -> H {
    let mut h = H::transmission(exports(), config, structured);
    h.auto_complete = false;
    h
}

#[test]
fn replies_come_in_completion_order() {
    for structured in [false, true] {
        let mut h = held(structured, Config::default());
        let style = h.style();
        let mut bytes = Vec::new();
        for (cookie, offset) in [(0xa, 0), (0xb, 4096), (0xc, 8192)] {
            bytes.extend(request(
                style,
                Command::Read,
                CommandFlags::empty(),
                cookie,
                offset,
                1024,
            ));
        }
        h.send(&bytes);
        let reads = h.take_held();
        assert_eq!(reads.len(), 3);
        assert!(h.received().is_empty());
        // Complete in reverse, polling after each.
        let mut order = Vec::new();
        for read in reads.iter().rev() {
            h.complete(read.id(), Ok(())).expect("complete");
            let simple = [(0xa, 1024), (0xb, 1024), (0xc, 1024)];
            let got = replies(&h.received(), &simple);
            let Request::Read { offset, .. } = *read else {
                panic!()
            };
            let cookie = got[0].cookie();
            assert_read_data(
                &got,
                cookie,
                offset,
                &h.disk()[offset as usize..offset as usize + 1024],
            );
            order.push(cookie);
        }
        assert_eq!(order, vec![0xc, 0xb, 0xa]);
    }
}

#[test]
fn replies_queued_together_keep_completion_order() {
    let mut h = held(true, Config::default());
    let style = h.style();
    let mut bytes = Vec::new();
    for cookie in 1..=4 {
        bytes.extend(request(
            style,
            Command::Read,
            CommandFlags::empty(),
            cookie,
            cookie * 512,
            512,
        ));
    }
    h.send(&bytes);
    let reads = h.take_held();
    for index in [2, 0, 3, 1] {
        h.complete(reads[index].id(), Ok(())).expect("complete");
    }
    let got = replies(&h.received(), &[]);
    let cookies: Vec<_> = got.iter().map(Reply::cookie).collect();
    assert_eq!(cookies, vec![3, 1, 4, 2]);
}

#[test]
fn flush_waits_for_earlier_writes() {
    for structured in [false, true] {
        let mut h = held(structured, Config::default());
        let style = h.style();
        let mut bytes = write_request(style, CommandFlags::empty(), 1, 0, &[1; 512]);
        bytes.extend(write_request(
            style,
            CommandFlags::empty(),
            2,
            512,
            &[2; 512],
        ));
        bytes.extend(request(
            style,
            Command::Read,
            CommandFlags::empty(),
            3,
            0,
            512,
        ));
        bytes.extend(request(
            style,
            Command::Flush,
            CommandFlags::empty(),
            4,
            0,
            0,
        ));
        h.send(&bytes);
        let requests = h.take_held();
        assert_eq!(requests.len(), 3, "the flush must wait: {requests:?}");
        assert!(matches!(requests[0], Request::Write { .. }));
        assert!(matches!(requests[1], Request::Write { .. }));
        assert!(matches!(requests[2], Request::Read { .. }));
        // The read does not hold the flush back; the writes do.
        h.complete(requests[1].id(), Ok(())).expect("complete");
        h.pump();
        assert!(
            h.take_held().is_empty(),
            "flush issued before the first write completed"
        );
        h.complete(requests[0].id(), Ok(())).expect("complete");
        h.pump();
        let flush = h.take_one_held();
        assert!(matches!(flush, Request::Flush { .. }), "{flush:?}");
        h.complete(flush.id(), Ok(())).expect("complete");
        let got = replies(&h.received(), &[]);
        let cookies: Vec<_> = got.iter().map(Reply::cookie).collect();
        assert_eq!(cookies, vec![2, 1, 4]);
        h.complete(requests[2].id(), Ok(())).expect("complete");
        assert_eq!(replies(&h.received(), &[(3, 512)])[0].cookie(), 3);
    }
}

#[test]
fn flush_after_completed_writes_is_issued_at_once() {
    let mut h = held(false, Config::default());
    h.write(CommandFlags::empty(), 1, 0, &[1; 512]);
    let write = h.take_one_held();
    h.complete(write.id(), Ok(())).expect("complete");
    // The write's reply is not even sent yet: it completed, that is enough.
    h.request(Command::Flush, CommandFlags::empty(), 2, 0, 0);
    assert!(matches!(h.take_one_held(), Request::Flush { .. }));
}

#[test]
fn flush_waits_for_trim_and_write_zeroes_too() {
    let mut h = held(true, Config::default());
    let style = h.style();
    let mut bytes = request(style, Command::Trim, CommandFlags::empty(), 1, 0, 4096);
    bytes.extend(request(
        style,
        Command::WriteZeroes,
        CommandFlags::empty(),
        2,
        4096,
        4096,
    ));
    bytes.extend(request(
        style,
        Command::Flush,
        CommandFlags::empty(),
        3,
        0,
        0,
    ));
    h.send(&bytes);
    let requests = h.take_held();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        h.complete(request.id(), Ok(())).expect("complete");
    }
    h.pump();
    assert!(matches!(h.take_one_held(), Request::Flush { .. }));
}

#[test]
fn a_failed_write_releases_the_flush() {
    let mut h = held(false, Config::default());
    let style = h.style();
    let mut bytes = write_request(style, CommandFlags::empty(), 1, 0, &[1; 512]);
    bytes.extend(request(
        style,
        Command::Flush,
        CommandFlags::empty(),
        2,
        0,
        0,
    ));
    h.send(&bytes);
    let write = h.take_one_held();
    h.complete(write.id(), Err(nbd_core::wire::ErrorCode::Io))
        .expect("complete");
    h.pump();
    assert!(matches!(h.take_one_held(), Request::Flush { .. }));
}

#[test]
fn back_pressure_at_max_in_flight() {
    let config = Config {
        max_in_flight: 2,
        ..Config::default()
    };
    let mut h = held(false, config);
    h.auto_transmit = false;
    let style = h.style();
    let mut bytes = Vec::new();
    for cookie in 1..=3 {
        bytes.extend(request(
            style,
            Command::Read,
            CommandFlags::empty(),
            cookie,
            0,
            512,
        ));
    }
    h.send(&bytes);
    let first = h.take_held();
    assert_eq!(first.len(), 2);
    assert_eq!(h.pending_input(), 28, "the third request stays unread");
    // Completing is not enough: the reply still holds its slot.
    h.complete(first[0].id(), Ok(())).expect("complete");
    h.pump();
    assert!(h.take_held().is_empty());
    assert_eq!(h.pending_input(), 28);
    // Once the reply is handed out, input resumes.
    let got = replies(&h.received(), &[(1, 512)]);
    assert_eq!(got[0].cookie(), 1);
    h.pump();
    let third = h.take_one_held();
    assert_eq!(h.pending_input(), 0);
    h.complete(first[1].id(), Ok(())).expect("complete");
    h.complete(third.id(), Ok(())).expect("complete");
    let cookies: Vec<_> = replies(&h.received(), &[(2, 512), (3, 512)])
        .iter()
        .map(Reply::cookie)
        .collect();
    assert_eq!(cookies, vec![2, 3]);
}

#[test]
fn back_pressure_at_the_table_size() {
    // 16 requests in flight fill the table; the 17th waits.
    let mut h = held(true, Config::default());
    h.auto_transmit = false;
    let style = h.style();
    let bytes: Vec<u8> = (0..17u64)
        .flat_map(|cookie| {
            request(
                style,
                Command::Read,
                CommandFlags::empty(),
                cookie,
                cookie * 512,
                512,
            )
        })
        .collect();
    h.send(&bytes);
    let reads = h.take_held();
    assert_eq!(reads.len(), 16);
    assert_eq!(h.pending_input(), 28);
    h.complete(reads[5].id(), Ok(())).expect("complete");
    assert_eq!(replies(&h.received(), &[])[0].cookie(), 5);
    h.pump();
    let last = h.take_one_held();
    assert!(
        matches!(last, Request::Read { offset: 8192, .. }),
        "{last:?}"
    );
}

#[test]
fn resize_waits_until_it_is_alone_and_blocks_later_requests() {
    let mut h = held(true, Config::default());
    h.auto_transmit = false;
    let style = h.style();
    let mut bytes = request(style, Command::Read, CommandFlags::empty(), 1, 0, 512);
    bytes.extend(request(
        style,
        Command::Resize,
        CommandFlags::empty(),
        2,
        2 << 20,
        0,
    ));
    bytes.extend(request(
        style,
        Command::Read,
        CommandFlags::empty(),
        3,
        (1 << 20) + 512,
        512,
    ));
    h.send(&bytes);
    let read = h.take_one_held();
    assert!(matches!(read, Request::Read { .. }));
    assert_eq!(h.pending_input(), 28, "nothing is read past a resize");
    h.complete(read.id(), Ok(())).expect("complete");
    h.pump();
    assert!(
        h.take_held().is_empty(),
        "resize issued while a reply is pending"
    );
    assert_eq!(replies(&h.received(), &[])[0].cookie(), 1);
    h.pump();
    let resize = h.take_one_held();
    assert!(
        matches!(resize, Request::Resize { size: 2097152, .. }),
        "{resize:?}"
    );
    assert_eq!(h.pending_input(), 28);
    h.disk_mut().resize(2 << 20, 0);
    h.complete(resize.id(), Ok(())).expect("complete");
    h.pump();
    // The read past the old end is valid now.
    let read = h.take_one_held();
    assert!(
        matches!(
            read,
            Request::Read {
                offset: 1049088,
                ..
            }
        ),
        "{read:?}"
    );
    h.complete(read.id(), Ok(())).expect("complete");
    let got = replies(&h.received(), &[]);
    let cookies: Vec<_> = got.iter().map(Reply::cookie).collect();
    assert_eq!(cookies, vec![2, 3]);
    assert_eq!(got[1].error(), 0);
}

#[test]
fn write_payloads_interleave_with_completions() {
    // A write's payload arrives while an earlier read completes; the read's
    // reply goes out before the write's.
    let mut h = held(true, Config::default());
    let style = h.style();
    h.send(&request(
        style,
        Command::Read,
        CommandFlags::empty(),
        1,
        0,
        512,
    ));
    let read = h.take_one_held();
    let data = vec![7u8; 1000];
    let bytes = write_request(style, CommandFlags::empty(), 2, 4096, &data);
    h.send(&bytes[..28 + 500]);
    let write = h.take_one_held();
    h.complete(read.id(), Ok(())).expect("complete");
    assert_eq!(replies(&h.received(), &[])[0].cookie(), 1);
    h.send(&bytes[28 + 500..]);
    h.complete(write.id(), Ok(())).expect("complete");
    let got = replies(&h.received(), &[]);
    assert_success(&got[0], 2);
    assert_eq!(&h.disk()[4096..5096], &data[..]);
}

#[test]
fn disconnect_releases_a_deferred_flush_before_closing() {
    let mut h = held(false, Config::default());
    let style = h.style();
    let mut bytes = write_request(style, CommandFlags::empty(), 1, 0, &[1; 512]);
    bytes.extend(request(
        style,
        Command::Flush,
        CommandFlags::empty(),
        2,
        0,
        0,
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
    let write = h.take_one_held();
    h.complete(write.id(), Ok(())).expect("complete");
    h.pump();
    let flush = h.take_one_held();
    assert!(matches!(flush, Request::Flush { .. }));
    assert!(
        !h.events
            .contains(&Ev::Close(nbd_core::server::CloseReason::Disconnect))
    );
    h.complete(flush.id(), Ok(())).expect("complete");
    h.pump();
    let cookies: Vec<_> = replies(&h.received(), &[])
        .iter()
        .map(Reply::cookie)
        .collect();
    assert_eq!(cookies, vec![1, 2]);
    assert_eq!(
        h.events.last(),
        Some(&Ev::Close(nbd_core::server::CloseReason::Disconnect))
    );
}

#[test]
fn block_status_replies_wait_for_buffer_room() {
    let exports = vec![full_export("disk")];
    let mut h = SmallHarness::new(exports, Config::default());
    h.start(MODERN);
    h.structured_replies();
    h.set_base_allocation("disk");
    h.go("disk");
    h.auto_complete = false;
    h.auto_transmit = false;
    let style = h.style();
    let mut bytes = request(
        style,
        Command::BlockStatus,
        CommandFlags::empty(),
        1,
        0,
        1 << 20,
    );
    bytes.extend(request(
        style,
        Command::BlockStatus,
        CommandFlags::empty(),
        2,
        0,
        1 << 20,
    ));
    h.send(&bytes);
    let held = h.take_held();
    assert_eq!(held.len(), 2);
    // 40 extents fill the 320-byte buffer.
    let extents: Vec<_> = (0..64)
        .map(|i| nbd_core::wire::ExtDescriptor {
            length: 512,
            status: i % 2,
        })
        .collect();
    h.conn
        .complete_block_status(held[0].id(), &extents)
        .expect("first");
    assert_eq!(
        h.conn.complete_block_status(held[1].id(), &extents),
        Err(nbd_core::server::CompletionError::Busy)
    );
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1);
    let count = match got[0].chunk() {
        nbd_core::wire::Chunk::BlockStatus { descriptors, .. } => descriptors.len(),
        other => panic!("{other:?}"),
    };
    assert_eq!(count, 40);
    // Once the first reply went out there is room again.
    h.conn
        .complete_block_status(held[1].id(), &extents)
        .expect("second");
    let got = replies(&h.received(), &[]);
    assert_eq!(got[0].cookie(), 2);
}

#[test]
fn block_status_replies_share_the_buffer_in_order() {
    let exports = vec![full_export("disk")];
    let mut h = SmallHarness::new(exports, Config::default());
    h.start(MODERN);
    h.structured_replies();
    h.set_base_allocation("disk");
    h.go("disk");
    h.auto_complete = false;
    let style = h.style();
    let bytes: Vec<u8> = (1..=3u64)
        .flat_map(|cookie| {
            request(
                style,
                Command::BlockStatus,
                CommandFlags::empty(),
                cookie,
                0,
                1 << 20,
            )
        })
        .collect();
    h.send(&bytes);
    let held = h.take_held();
    let extents = |status: u64, n: u64| -> Vec<nbd_core::wire::ExtDescriptor> {
        (0..n)
            .map(|i| nbd_core::wire::ExtDescriptor {
                length: 512,
                status: (status << 4) | i,
            })
            .collect()
    };
    // 20 + 20 extents fill the buffer; the third waits until the first
    // went out, then the second is moved to the front to make room.
    h.conn
        .complete_block_status(held[0].id(), &extents(1, 20))
        .expect("first");
    h.conn
        .complete_block_status(held[1].id(), &extents(2, 20))
        .expect("second");
    assert_eq!(
        h.conn.complete_block_status(held[2].id(), &extents(3, 20)),
        Err(nbd_core::server::CompletionError::Busy)
    );
    let first = h
        .conn
        .poll_transmit()
        .map(|t| t.parts.concat())
        .expect("first reply");
    h.conn
        .complete_block_status(held[2].id(), &extents(3, 20))
        .expect("third");
    let mut rest = Vec::new();
    while let Some(t) = h.conn.poll_transmit() {
        rest.extend(t.parts.concat());
    }
    let got = replies(&[first, rest].concat(), &[]);
    assert_eq!(got.len(), 3);
    for (reply, context) in got.iter().zip(1u32..) {
        let nbd_core::wire::Chunk::BlockStatus { descriptors, .. } = reply.chunk() else {
            panic!("{reply:?}");
        };
        let list: Vec<_> = descriptors.iter().collect();
        assert_eq!(list.len(), 20, "reply {}", reply.cookie());
        for (i, d) in list.iter().enumerate() {
            assert_eq!(
                d.status,
                (context << 4) | i as u32,
                "reply {} descriptor {i}",
                reply.cookie()
            );
        }
    }
}
