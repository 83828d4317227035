//! Structured replies, metadata contexts and block status (spec:
//! "NBD_OPT_STRUCTURED_REPLY", "NBD_OPT_LIST_META_CONTEXT",
//! "NBD_OPT_SET_META_CONTEXT", "Metadata querying", "NBD_CMD_BLOCK_STATUS").

mod common;

use common::*;
use nbd_core::export::{Capabilities, Export};
use nbd_core::server::{Config, Request, RequestId};
use nbd_core::wire::{
    Chunk, ChunkType, Command, CommandFlags, Descriptor, ErrorCode, OptionCode, OptionReply,
    OptionReplyType, ReplyFlags,
};

type H = Harness;

fn exports() -> Vec<Export<'static>> {
    vec![
        full_export("disk"),
        full_export("other"),
        Export::new("plain", 1 << 16),
    ]
}

fn negotiating() -> H {
    let mut h = H::new(exports(), Config::default());
    h.start(MODERN);
    h
}

/// The replies announcing `base:allocation` with `id`, then ACK.
fn base_allocation_then_ack(option: u32, id: u32) -> Vec<u8> {
    let mut data = id.to_be_bytes().to_vec();
    data.extend_from_slice(b"base:allocation");
    [
        expected_option_reply(option, 4, &data),
        expected_option_reply(option, 1, &[]),
    ]
    .concat()
}

#[test]
fn structured_reply_is_acknowledged() {
    let mut h = negotiating();
    h.send(&option(OptionCode::StructuredReply, &[]));
    assert_eq!(h.received(), expected_option_reply(8, 1, &[]));
    assert!(h.conn.features().structured_replies);
    // Asking twice is harmless.
    h.structured_replies();
}

#[test]
fn list_meta_context_queries() {
    let mut h = negotiating();
    h.structured_replies();
    // No query: every context of the export; the id is reserved (zero).
    for queries in [
        &[][..],
        &["base:"],
        &["base:allocation"],
        &["qemu:dirty-bitmap:x", "base:allocation"],
    ] {
        h.send(&list_meta("disk", queries));
        assert_eq!(
            h.received(),
            base_allocation_then_ack(9, 0),
            "queries {queries:?}"
        );
    }
    // A query in a namespace the server does not know is ignored.
    h.send(&list_meta("disk", &["qemu:dirty-bitmap:x"]));
    assert_eq!(h.received(), expected_option_reply(9, 1, &[]));
    // A leaf the server does not have in the base namespace: no match.
    h.send(&list_meta("disk", &["base:nothing"]));
    assert_eq!(h.received(), expected_option_reply(9, 1, &[]));
}

#[test]
fn list_meta_context_without_a_colon_is_invalid() {
    let mut h = negotiating();
    h.structured_replies();
    let replies = h.option(&list_meta("disk", &["base:allocation", "nocolon"]));
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].option, OptionCode::ListMetaContext);
    assert_eq!(replies[0].reply_type, OptionReplyType::ErrInvalid);
    // Negotiation goes on.
    h.send(&list_meta("disk", &[]));
    assert_eq!(h.received(), base_allocation_then_ack(9, 0));
}

#[test]
fn list_meta_context_with_truncated_query_is_invalid() {
    let mut h = negotiating();
    h.structured_replies();
    let mut bytes = list_meta("disk", &["base:allocation"]);
    // Claim two queries where there is one.
    let count_at = 16 + 4 + 4;
    bytes[count_at..count_at + 4].copy_from_slice(&2u32.to_be_bytes());
    let replies = h.option(&bytes);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].reply_type, OptionReplyType::ErrInvalid);
}

#[test]
fn list_meta_context_for_an_export_without_block_status() {
    let mut h = negotiating();
    h.structured_replies();
    h.send(&list_meta("plain", &[]));
    assert_eq!(h.received(), expected_option_reply(9, 1, &[]));
}

#[test]
fn list_meta_context_for_an_unknown_export() {
    let mut h = negotiating();
    h.structured_replies();
    let replies = h.option(&list_meta("nope", &[]));
    assert_eq!(replies.len(), 1);
    assert!(replies[0].reply_type.is_error());
}

#[test]
fn meta_context_options_need_structured_replies() {
    let mut h = negotiating();
    for bytes in [
        list_meta("disk", &[]),
        set_meta("disk", &["base:allocation"]),
    ] {
        let replies = h.option(&bytes);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0].reply_type, OptionReplyType::ErrInvalid);
    }
    h.structured_replies();
    h.send(&list_meta("disk", &[]));
    assert_eq!(h.received(), base_allocation_then_ack(9, 0));
}

#[test]
fn set_meta_context_selects_base_allocation_with_a_nonzero_id() {
    let mut h = negotiating();
    h.structured_replies();
    let replies = h.option(&set_meta("disk", &["base:allocation"]));
    assert_eq!(replies.len(), 2);
    let OptionReply::MetaContext { id, name } = replies[0].parsed() else {
        panic!("expected META_CONTEXT, got {replies:?}");
    };
    assert_ne!(id, 0);
    assert_eq!(name, b"base:allocation");
    assert_eq!(replies[1].parsed(), OptionReply::Ack);
    assert!(
        replies
            .iter()
            .all(|r| r.option == OptionCode::SetMetaContext)
    );
}

#[test]
fn set_meta_context_ignores_wildcards_and_unknown_namespaces() {
    let mut h = negotiating();
    h.structured_replies();
    for queries in [&["base:"][..], &["qemu:dirty-bitmap:x"], &[]] {
        h.send(&set_meta("disk", queries));
        assert_eq!(
            h.received(),
            expected_option_reply(10, 1, &[]),
            "{queries:?}"
        );
    }
}

/// A connection in transmission on "disk" with structured replies and,
/// if `select`, `base:allocation`; returns it and the context id.
fn transmission(select: bool) -> (H, u32) {
    let mut h = negotiating();
    h.structured_replies();
    let id = if select {
        h.set_base_allocation("disk")
    } else {
        0
    };
    h.go("disk");
    h.events.clear();
    (h, id)
}

fn block_status(
    h: &mut H,
    flags: CommandFlags,
    cookie: u64,
    offset: u64,
    length: u64,
) -> Vec<Reply> {
    h.request(Command::BlockStatus, flags, cookie, offset, length);
    let bytes = h.received();
    replies(&bytes, &[])
}

fn descriptors(reply: &Reply) -> (u32, Vec<Descriptor>) {
    match reply.chunk() {
        Chunk::BlockStatus {
            context_id,
            descriptors,
        } => (context_id, descriptors.iter().collect()),
        other => panic!("expected BLOCK_STATUS, got {other:?}"),
    }
}

#[test]
fn block_status_without_a_selected_context_is_einval() {
    let (mut h, _) = transmission(false);
    let got = block_status(&mut h, CommandFlags::empty(), 7, 0, 4096);
    assert_eq!(got.len(), 1);
    assert_error(&got[0], 7, ErrorCode::Invalid);
    assert!(
        matches!(got[0], Reply::Chunk { .. }),
        "structured replies are negotiated"
    );
    assert!(h.take_events().is_empty(), "storage is not asked");
    h.read_ok(8, 0, 512);
}

#[test]
fn block_status_reports_extents_in_one_chunk() {
    let (mut h, context) = transmission(true);
    // Data in [0, 4096), zeroes in [4096, 12288), data after.
    h.disk_mut()[4096..12288].fill(0);
    let got = block_status(&mut h, CommandFlags::empty(), 9, 0, 8192);
    assert_eq!(got.len(), 1, "one chunk per selected context");
    let header = got[0].header();
    assert_eq!(header.cookie, 9);
    assert_eq!(header.chunk_type, ChunkType::BlockStatus);
    assert!(header.flags.contains(ReplyFlags::DONE));
    let (id, list) = descriptors(&got[0]);
    assert_eq!(id, context);
    assert_eq!(
        list[0],
        Descriptor {
            length: 4096,
            status: 0
        }
    );
    assert_eq!(list[1].status, 3, "HOLE | ZERO");
    // Descriptors are nonzero; none starts past the request's end (the
    // last may run past it, which the spec allows).
    assert!(list.iter().all(|d| d.length > 0));
    let starts: Vec<u64> = list
        .iter()
        .scan(0u64, |at, d| {
            let start = *at;
            *at += u64::from(d.length);
            Some(start)
        })
        .collect();
    assert!(starts.iter().all(|&s| s < 8192), "{list:?}");
    let requests = h.anonymous_requests();
    assert_eq!(
        requests,
        vec![Request::BlockStatus {
            id: RequestId::from_bits(0),
            offset: 0,
            length: 8192,
            req_one: false,
        }]
    );
}

#[test]
fn block_status_with_req_one_gives_one_extent_within_the_request() {
    let (mut h, context) = transmission(true);
    h.disk_mut()[4096..65536].fill(0);
    for (offset, length, expected) in [
        (
            4096,
            1024,
            Descriptor {
                length: 1024,
                status: 3,
            },
        ),
        (
            0,
            65536,
            Descriptor {
                length: 4096,
                status: 0,
            },
        ),
        (
            8192,
            200_000,
            Descriptor {
                length: 65536 - 8192,
                status: 3,
            },
        ),
    ] {
        let got = block_status(&mut h, CommandFlags::REQ_ONE, 3, offset, length);
        assert_eq!(got.len(), 1);
        let (id, list) = descriptors(&got[0]);
        assert_eq!(id, context);
        assert_eq!(list, vec![expected], "offset {offset} length {length}");
        assert!(u64::from(list[0].length) <= length);
    }
}

#[test]
fn block_status_event_carries_the_request() {
    let (mut h, _) = transmission(true);
    h.auto_complete = false;
    h.request(Command::BlockStatus, CommandFlags::REQ_ONE, 4, 512, 1024);
    let request = h.take_one_held();
    let Request::BlockStatus {
        id,
        offset,
        length,
        req_one,
    } = request
    else {
        panic!("expected block status, got {request:?}");
    };
    assert_eq!((offset, length, req_one), (512, 1024, true));
    // Extents past the export's end are clipped to it.
    let extents = [nbd_core::wire::ExtDescriptor {
        length: 1 << 40,
        status: 0,
    }];
    h.conn
        .complete_block_status(id, &extents)
        .expect("complete");
    let got = replies(&h.received(), &[]);
    assert_eq!(
        descriptors(&got[0]).1,
        vec![Descriptor {
            length: 1024,
            status: 0
        }]
    );
}

#[test]
fn block_status_past_the_end_is_einval() {
    let (mut h, _) = transmission(true);
    let got = block_status(&mut h, CommandFlags::empty(), 5, (1 << 20) - 512, 1024);
    assert_error(&got[0], 5, ErrorCode::Invalid);
    let got = block_status(&mut h, CommandFlags::empty(), 6, 0, 0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].cookie(), 6);
    assert!(got[0].is_final());
    h.read_ok(8, 0, 512);
}

#[test]
fn context_selected_for_another_export_does_not_count() {
    let mut h = negotiating();
    h.structured_replies();
    h.set_base_allocation("other");
    h.go("disk");
    let got = block_status(&mut h, CommandFlags::empty(), 1, 0, 512);
    assert_error(&got[0], 1, ErrorCode::Invalid);
}

#[test]
fn a_failed_set_meta_context_clears_the_selection() {
    let mut h = negotiating();
    h.structured_replies();
    h.set_base_allocation("disk");
    let replies = h.option(&set_meta("disk", &["nocolon"]));
    assert_eq!(replies[0].reply_type, OptionReplyType::ErrInvalid);
    h.go("disk");
    let got = block_status(&mut h, CommandFlags::empty(), 1, 0, 512);
    assert_error(&got[0], 1, ErrorCode::Invalid);
}

#[test]
fn an_empty_set_meta_context_clears_the_selection() {
    let mut h = negotiating();
    h.structured_replies();
    h.set_base_allocation("disk");
    h.send(&set_meta("disk", &[]));
    assert_eq!(h.received(), expected_option_reply(10, 1, &[]));
    h.go("disk");
    let got = block_status(&mut h, CommandFlags::empty(), 1, 0, 512);
    assert_error(&got[0], 1, ErrorCode::Invalid);
}

#[test]
fn set_meta_context_on_an_export_without_block_status_selects_nothing() {
    let mut h = negotiating();
    h.structured_replies();
    h.send(&set_meta("plain", &["base:allocation"]));
    assert_eq!(h.received(), expected_option_reply(10, 1, &[]));
    h.go("plain");
    let got = block_status(&mut h, CommandFlags::empty(), 1, 0, 512);
    assert_error(&got[0], 1, ErrorCode::Invalid);
}

#[test]
fn block_status_without_structured_replies_is_a_simple_einval() {
    let mut h = H::transmission(exports(), Config::default(), false);
    let got = block_status(&mut h, CommandFlags::empty(), 1, 0, 512);
    assert_eq!(
        got,
        vec![Reply::Simple {
            error: 22,
            cookie: 1,
            data: vec![]
        }]
    );
}

#[test]
fn many_extents_fit_the_small_buffer() {
    let exports = vec![
        Export::new("disk", 1 << 20).with_capabilities(Capabilities {
            block_status: true,
            ..Capabilities::NONE
        }),
    ];
    let mut h = SmallHarness::new(exports, Config::default());
    h.start(MODERN);
    h.structured_replies();
    let context = h.set_base_allocation("disk");
    h.go("disk");
    // Alternate data and zero blocks: 2048 extents, more than 320 bytes hold.
    for block in (0..2048).step_by(2) {
        h.disk_mut()[block * 512..(block + 1) * 512].fill(0);
    }
    h.request(Command::BlockStatus, CommandFlags::empty(), 1, 0, 1 << 20);
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1);
    let (id, list) = descriptors(&got[0]);
    assert_eq!(id, context);
    assert!(
        !list.is_empty() && list.len() <= 320 / 8,
        "{} descriptors",
        list.len()
    );
    assert!(list.iter().all(|d| d.length == 512));
    assert_eq!(list[0].status, 3);
    // The connection carries on.
    h.read_ok(2, 512, 512);
}

/// Spec (`NBD_OPT_SET_META_CONTEXT`): "Issuing this command replaces all
/// previously-set metadata contexts (including when this command fails)".
/// Here it fails with `NBD_REP_ERR_TOO_BIG` without being buffered.
#[test]
fn a_set_meta_context_too_big_to_buffer_clears_the_selection() {
    let mut h = SmallHarness::new(exports(), Config::default());
    h.start(MODERN);
    h.structured_replies();
    h.set_base_allocation("disk");
    let long_query = format!("qemu:{}", "y".repeat(400));
    let refusal = h.option(&set_meta("disk", &[long_query.as_str()]));
    assert_eq!(refusal.len(), 1);
    assert_eq!(refusal[0].reply_type, OptionReplyType::ErrTooBig);
    h.go("disk");
    h.request(Command::BlockStatus, CommandFlags::empty(), 1, 0, 512);
    let got = replies(&h.received(), &[]);
    assert_eq!(got.len(), 1);
    assert_error(&got[0], 1, ErrorCode::Invalid);
}

#[test]
fn repeated_queries_give_each_context_once() {
    let mut h = negotiating();
    h.structured_replies();
    h.send(&list_meta(
        "disk",
        &["base:allocation", "base:", "base:allocation"],
    ));
    assert_eq!(h.received(), base_allocation_then_ack(9, 0));
    let replies = h.option(&set_meta("", &["base:allocation", "base:allocation"]));
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0].reply_type, OptionReplyType::MetaContext);
    assert_eq!(replies[1].reply_type, OptionReplyType::Ack);
    // "" names the default export, which is "disk".
    h.go("disk");
    h.request(Command::BlockStatus, CommandFlags::empty(), 1, 0, 512);
    let got = replies_of(&mut h);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].error(), 0);
}

fn replies_of(h: &mut H) -> Vec<Reply> {
    replies(&h.received(), &[])
}
