//! The core is sans-IO: input may arrive cut anywhere. Whole conversations
//! are fed in one piece, cut in two at every byte boundary, byte by byte
//! and in random small pieces; the server must send the same bytes, ask
//! storage for the same things and leave storage the same every time.

mod common;

use common::*;
use nbd_core::export::{Capabilities, Export};
use nbd_core::server::Config;
use nbd_core::wire::{Command, CommandFlags, HeaderStyle, InfoType, OptionCode};

type H = Harness;

fn small_export() -> Export<'static> {
    Export::new("small", 64 * 1024)
        .with_description("64 KiB")
        .with_capabilities(Capabilities {
            rotational: false,
            ..Capabilities::ALL
        })
}

fn check_all_splits(connect: &dyn Fn() -> H, conversation: &[u8]) {
    let whole = run_conversation(connect, conversation, &|h, bytes| h.send(bytes));
    for at in 0..=conversation.len() {
        let split = run_conversation(connect, conversation, &|h, bytes| {
            h.send(&bytes[..at]);
            h.send(&bytes[at..]);
        });
        assert!(split == whole, "different outcome when cut at byte {at}");
    }
    let bytewise = run_conversation(connect, conversation, &|h, bytes| h.send_bytewise(bytes));
    assert!(bytewise == whole, "different outcome byte by byte");
    for seed in 1..=16 {
        let pieces = run_conversation(connect, conversation, &|h, bytes| {
            h.send_in_pieces(bytes, seed, 33)
        });
        assert!(pieces == whole, "different outcome in pieces, seed {seed}");
    }
}

/// Requests exercising every path of the transmission input: headers,
/// write payloads, discarded payloads, refusals, block status.
fn transmission_requests(style: HeaderStyle) -> Vec<u8> {
    let payload: Vec<u8> = (0..700u32).map(|i| (i % 241) as u8).collect();
    let mut bytes = write_request(style, CommandFlags::FUA, 1, 1000, &payload);
    bytes.extend(request(
        style,
        Command::Read,
        CommandFlags::empty(),
        2,
        900,
        900,
    ));
    bytes.extend(request(
        style,
        Command::BlockStatus,
        CommandFlags::empty(),
        3,
        0,
        4096,
    ));
    bytes.extend(request(
        style,
        Command::Trim,
        CommandFlags::empty(),
        4,
        8192,
        4096,
    ));
    // Refused: past the end, its payload must be skipped.
    bytes.extend(write_request(
        style,
        CommandFlags::empty(),
        5,
        65000,
        &payload[..600],
    ));
    bytes.extend(request(
        style,
        Command::Unknown(99),
        CommandFlags::empty(),
        6,
        0,
        0,
    ));
    bytes.extend(request(
        style,
        Command::Flush,
        CommandFlags::empty(),
        7,
        0,
        0,
    ));
    bytes.extend(request(
        style,
        Command::WriteZeroes,
        CommandFlags::NO_HOLE,
        8,
        0,
        512,
    ));
    bytes.extend(request(style, Command::Read, CommandFlags::DF, 9, 0, 2048));
    bytes.extend(request(
        style,
        Command::Disconnect,
        CommandFlags::empty(),
        10,
        0,
        0,
    ));
    bytes
}

#[test]
fn simple_replies_at_every_split() {
    let connect = || H::transmission(vec![small_export()], Config::default(), false);
    check_all_splits(&connect, &transmission_requests(HeaderStyle::Compact));
}

#[test]
fn structured_replies_at_every_split() {
    let connect = || H::transmission(vec![small_export()], Config::default(), true);
    let conversation = transmission_requests(HeaderStyle::Compact);
    let whole = run_conversation(&connect, &conversation, &|h, bytes| h.send(bytes));
    // Sanity: ten requests, nine replies (none to DISC), writes stored.
    let got = replies(&whole.0, &[]);
    let finals: Vec<_> = got
        .iter()
        .filter(|r| r.is_final())
        .map(Reply::cookie)
        .collect();
    assert_eq!(finals, vec![1, 2, 3, 4, 5, 6, 7, 8, 9]);
    check_all_splits(&connect, &conversation);
}

#[test]
fn extended_headers_at_every_split() {
    let connect = || H::extended(vec![small_export()], Config::default());
    let mut conversation = transmission_requests(HeaderStyle::Extended);
    // A block status with a payload, before the final DISC.
    let disc = conversation.split_off(conversation.len() - 32);
    conversation.extend(request(
        HeaderStyle::Extended,
        Command::BlockStatus,
        CommandFlags::PAYLOAD_LEN,
        11,
        512,
        12,
    ));
    conversation.extend(1024u64.to_be_bytes());
    conversation.extend(1u32.to_be_bytes());
    conversation.extend(disc);
    check_all_splits(&connect, &conversation);
}

#[test]
fn negotiation_at_every_split() {
    let exports = || vec![small_export(), Export::new("other", 4096)];
    let connect = || H::new(exports(), Config::default());
    let mut conversation = client_flags(MODERN);
    conversation.extend(option(OptionCode::Unknown(0x4242), &[9; 40]));
    conversation.extend(option(OptionCode::List, &[]));
    conversation.extend(info("other", &[InfoType::Name, InfoType::Description]));
    conversation.extend(go("missing", &[]));
    conversation.extend(option(OptionCode::StructuredReply, &[]));
    conversation.extend(list_meta("small", &["base:"]));
    conversation.extend(set_meta("small", &["base:allocation"]));
    conversation.extend(go("small", &[InfoType::BlockSize]));
    conversation.extend(request(
        HeaderStyle::Compact,
        Command::BlockStatus,
        CommandFlags::REQ_ONE,
        1,
        0,
        100,
    ));
    conversation.extend(request(
        HeaderStyle::Compact,
        Command::Disconnect,
        CommandFlags::empty(),
        2,
        0,
        0,
    ));
    check_all_splits(&connect, &conversation);
}

#[test]
fn pipelined_before_the_greeting_is_read() {
    // A client may send everything before reading a byte; the server
    // answers in order once its output is taken.
    let mut h = H::new(vec![small_export()], Config::default());
    let mut conversation = client_flags(MODERN);
    conversation.extend(go("small", &[]));
    conversation.extend(request(
        HeaderStyle::Compact,
        Command::Read,
        CommandFlags::empty(),
        1,
        0,
        16,
    ));
    h.send(&conversation);
    let bytes = h.received();
    assert_eq!(bytes[..18], GREETING);
    let rest = &bytes[18..];
    let info_export_and_block_size = 2 * 20 + 12 + 14;
    let options = option_replies(&rest[..info_export_and_block_size + 20]);
    assert_eq!(options.last().map(|r| r.option), Some(OptionCode::Go));
    let got = replies(&rest[info_export_and_block_size + 20..], &[(1, 16)]);
    assert_read_data(&got, 1, 0, &h.disk()[..16]);
}

/// A shell may store a write's payload straight from its transport (a
/// socket spliced into a file): the core names the payload, counts what
/// the shell took, and reads the rest itself as usual.
#[test]
fn payload_taken_by_the_shell_ends_like_one_passed_through() {
    let connect = || H::transmission(vec![small_export()], Config::default(), true);
    let payload: Vec<u8> = (0..700u32).map(|i| (i % 241) as u8 + 3).collect();
    let write = write_request(
        HeaderStyle::Compact,
        CommandFlags::empty(),
        1,
        1000,
        &payload,
    );
    let header = &write[..write.len() - payload.len()];

    let mut passed = connect();
    passed.send(&write);
    let reply = passed.received();
    assert!(!reply.is_empty(), "the write was answered");

    let mut h = connect();
    assert_eq!(h.conn.payload_wanted(), None, "no payload before a header");
    h.send(header);
    let wanted = h
        .conn
        .payload_wanted()
        .expect("the write's payload is wanted");
    assert_eq!((wanted.offset, wanted.remaining), (1000, 700));
    assert!(h.conn.payload_taken(701).is_err(), "more than remains");
    assert!(h.conn.payload_taken(0).is_err(), "nothing taken");
    // The shell stores 300 bytes itself, then passes the rest through.
    h.disk_mut()[1000..1300].copy_from_slice(&payload[..300]);
    h.conn.payload_taken(300).expect("taken");
    let wanted = h.conn.payload_wanted().expect("the rest is wanted");
    assert_eq!((wanted.offset, wanted.remaining), (1300, 400));
    h.send(&payload[300..]);
    assert_eq!(h.conn.payload_wanted(), None, "the payload is whole");
    assert_eq!(h.disk(), passed.disk());
    assert_eq!(h.received(), reply, "the same reply");

    // All of it taken: the shell completes the write itself.
    let mut h = connect();
    h.send(header);
    let id = h.conn.payload_wanted().expect("wanted").id;
    h.disk_mut()[1000..1700].copy_from_slice(&payload);
    h.conn.payload_taken(700).expect("taken");
    assert_eq!(h.conn.payload_wanted(), None);
    h.conn.complete(id, Ok(())).expect("complete the write");
    assert_eq!(h.disk(), passed.disk());
    assert_eq!(h.received(), reply, "the same reply");
}

/// A payload the core drops (its write refused) is not the shell's to store.
#[test]
fn a_refused_writes_payload_is_not_wanted() {
    let mut h = H::transmission(vec![small_export()], Config::default(), true);
    let payload = [1u8; 600];
    let write = write_request(
        HeaderStyle::Compact,
        CommandFlags::empty(),
        5,
        65000,
        &payload,
    );
    h.send(&write[..write.len() - payload.len()]);
    assert_eq!(h.conn.payload_wanted(), None);
    assert!(h.conn.payload_taken(1).is_err());
    h.send(&payload);
}
