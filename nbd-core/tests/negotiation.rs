//! Handshake and option haggling, byte for byte (spec: "Handshake",
//! "Fixed newstyle negotiation", "Option types", "Option reply types").

mod common;

use common::*;
use nbd_core::export::{Capabilities, Export};
use nbd_core::server::{CloseReason, Config, ProtocolError};
use nbd_core::wire::{
    BlockSizeConstraints, ClientFlags, Info, InfoType, OptionCode, OptionReply, OptionReplyType,
    TransmissionFlags,
};

type H = Harness;

const ACK: u32 = 1;
const SERVER: u32 = 2;
const INFO: u32 = 3;
const ERR_UNSUP: u32 = 0x8000_0001;
const ERR_INVALID: u32 = 0x8000_0003;
const ERR_UNKNOWN: u32 = 0x8000_0006;
const ERR_TOO_BIG: u32 = 0x8000_0009;

fn disk() -> Export<'static> {
    Export::new("disk", 1 << 20)
        .with_description("A test disk")
        .with_block_sizes(BlockSizeConstraints {
            minimum: 512,
            preferred: 8192,
            maximum: 1 << 20,
        })
        .with_capabilities(Capabilities {
            flush: true,
            trim: true,
            ..Capabilities::NONE
        })
}

fn two_exports() -> Vec<Export<'static>> {
    vec![
        disk(),
        Export::new("second", 4096).with_description("Another one"),
    ]
}

/// Error replies carry a message for humans; the spec leaves its text free.
fn assert_error_reply(replies: &[OptReply], option: OptionCode, reply_type: OptionReplyType) {
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].option, option);
    assert_eq!(replies[0].reply_type, reply_type, "{replies:?}");
    assert!(matches!(replies[0].parsed(), OptionReply::Error { .. }));
}

#[test]
fn greeting_is_eighteen_fixed_bytes() {
    let mut h = H::new(two_exports(), Config::default());
    let greeting = h.received();
    let expected: Vec<u8> = [
        0x4e42_444d_4147_4943u64.to_be_bytes(),
        0x4948_4156_454f_5054u64.to_be_bytes(),
    ]
    .concat()
    .into_iter()
    .chain([0x00, 0x03])
    .collect();
    assert_eq!(greeting, expected);
    assert_eq!(greeting, GREETING);
    // Nothing more until the client speaks.
    assert!(h.received().is_empty());
    assert!(h.take_events().is_empty());
}

#[test]
fn unknown_client_flags_close_the_connection() {
    for bits in [1u32 << 2, 1 << 31, 0xffff_fffc] {
        let mut h = H::new(two_exports(), Config::default());
        h.received();
        let error = h
            .try_send(&client_flags(ClientFlags(bits | 1)))
            .expect_err("unknown flags accepted");
        assert_eq!(error, ProtocolError::UnknownClientFlags(bits));
    }
}

#[test]
fn client_flags_split_across_inputs() {
    let mut h = H::new(two_exports(), Config::default());
    h.received();
    h.send_bytewise(&client_flags(MODERN));
    assert_eq!(h.pending_input(), 0);
    h.option_ack(&option(OptionCode::StructuredReply, &[]));
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let mut bytes = option(OptionCode::List, &[]);
    bytes[..8].copy_from_slice(b"IHAVEOPX");
    let error = h.try_send(&bytes).expect_err("bad magic accepted");
    assert_eq!(
        error,
        ProtocolError::BadMagic {
            found: u64::from_be_bytes(*b"IHAVEOPX")
        }
    );
}

#[test]
fn bad_option_magic_after_a_good_option() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    h.option_ack(&option(OptionCode::StructuredReply, &[]));
    let error = h.try_send(&[0u8; 16]).expect_err("zero magic accepted");
    assert_eq!(error, ProtocolError::BadMagic { found: 0 });
}

/// The data of INFO(EXPORT), INFO(NAME), INFO(DESCRIPTION), INFO(BLOCK_SIZE)
/// for [`disk`], written out by hand.
fn disk_info_replies(option: u32, flags: u16) -> Vec<u8> {
    let mut export = vec![0, 0];
    export.extend_from_slice(&(1u64 << 20).to_be_bytes());
    export.extend_from_slice(&flags.to_be_bytes());
    let name = [&[0u8, 1][..], b"disk"].concat();
    let description = [&[0u8, 2][..], b"A test disk"].concat();
    let mut block_size = vec![0, 3];
    for value in [512u32, 8192, 1 << 20] {
        block_size.extend_from_slice(&value.to_be_bytes());
    }
    [
        expected_option_reply(option, INFO, &export),
        expected_option_reply(option, INFO, &name),
        expected_option_reply(option, INFO, &description),
        expected_option_reply(option, INFO, &block_size),
        expected_option_reply(option, ACK, &[]),
    ]
    .concat()
}

#[test]
fn info_then_go_with_name_description_and_block_size() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let wanted = [InfoType::Name, InfoType::Description, InfoType::BlockSize];
    let flags = (TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_TRIM)
        .bits();
    assert_eq!(flags, 0x25);

    h.send(&info("disk", &wanted));
    assert_eq!(h.received(), disk_info_replies(6, flags));
    assert!(
        h.take_events().is_empty(),
        "INFO must not select the export"
    );
    assert_eq!(h.conn.selected_export(), None);

    h.send(&go("disk", &wanted));
    assert_eq!(
        h.received(),
        disk_info_replies(7, flags),
        "GO repeats INFO's replies"
    );
    assert_eq!(
        h.take_events(),
        vec![Ev::ExportSelected {
            index: 0,
            size: 1 << 20,
            flags,
            features: Features::default(),
        }]
    );
    // No padding after the final ACK: the next bytes are transmission.
    assert!(h.received().is_empty());
    h.read_ok(1, 0, 512);
}

#[test]
fn info_replies_parse_with_the_wire_parsers() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let replies = h.option(&info("second", &[InfoType::Name, InfoType::Description]));
    let parsed: Vec<_> = replies.iter().map(OptReply::parsed).collect();
    assert_eq!(
        parsed,
        vec![
            OptionReply::Info(Info::Export {
                size: 4096,
                flags: TransmissionFlags::HAS_FLAGS,
            }),
            OptionReply::Info(Info::Name(b"second")),
            OptionReply::Info(Info::Description(b"Another one")),
            OptionReply::Info(Info::BlockSize(nbd_core::export::DEFAULT_BLOCK_SIZES)),
            OptionReply::Ack,
        ]
    );
    assert!(replies.iter().all(|r| r.option == OptionCode::Info));
}

#[test]
fn go_sends_info_export_even_when_not_requested() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let replies = h.option(&go("disk", &[]));
    assert_eq!(
        replies[0].parsed(),
        OptionReply::Info(Info::Export {
            size: 1 << 20,
            flags: TransmissionFlags(0x25),
        })
    );
    assert_eq!(
        replies.last().map(|r| r.reply_type),
        Some(OptionReplyType::Ack)
    );
    // Name and description were not asked for.
    assert!(replies.iter().all(|r| !matches!(
        r.parsed(),
        OptionReply::Info(Info::Name(_) | Info::Description(_))
    )));
    assert!(matches!(
        h.take_events()[..],
        [Ev::ExportSelected { index: 0, .. }]
    ));
}

#[test]
fn unknown_info_requests_are_ignored() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let replies = h.option(&go("second", &[InfoType::Unknown(0x4242), InfoType::Name]));
    let types: Vec<_> = replies.iter().map(|r| r.parsed()).collect();
    assert_eq!(
        types.first().map(|r| r.reply_type()),
        Some(OptionReplyType::Info)
    );
    assert!(types.contains(&OptionReply::Info(Info::Name(b"second"))));
    assert!(
        !types
            .iter()
            .any(|r| matches!(r, OptionReply::Info(Info::Unknown { .. })))
    );
    assert_eq!(types.last(), Some(&OptionReply::Ack));
}

#[test]
fn go_with_empty_name_selects_the_default_export() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    h.go("");
    assert_eq!(h.conn.selected_export(), Some(0));
}

#[test]
fn go_for_the_second_export() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let flags = h.go("second");
    assert_eq!(flags, TransmissionFlags::HAS_FLAGS.bits());
    assert_eq!(h.selected(), 1);
    h.read_ok(9, 4000, 96);
}

#[test]
fn go_for_an_unknown_export_is_refused_and_negotiation_continues() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let replies = h.option(&go("nope", &[InfoType::Name]));
    assert_error_reply(&replies, OptionCode::Go, OptionReplyType::ErrUnknownExport);
    assert_eq!(replies[0].reply_type.to_wire(), ERR_UNKNOWN);
    assert!(h.take_events().is_empty());
    let replies = h.option(&info("nope", &[]));
    assert_error_reply(
        &replies,
        OptionCode::Info,
        OptionReplyType::ErrUnknownExport,
    );
    h.go("disk");
    h.read_ok(1, 512, 512);
}

#[test]
fn go_with_a_name_longer_than_its_data_is_invalid() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    // Name length 100, but only "disk" and a zero count follow.
    let mut data = 100u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"disk");
    data.extend_from_slice(&0u16.to_be_bytes());
    let replies = h.option(&option(OptionCode::Go, &data));
    assert_error_reply(&replies, OptionCode::Go, OptionReplyType::ErrInvalid);
    assert_eq!(replies[0].reply_type.to_wire(), ERR_INVALID);
    assert!(h.take_events().is_empty());
    // A count announcing more info requests than present is invalid too.
    let mut data = 4u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"disk");
    data.extend_from_slice(&3u16.to_be_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    let replies = h.option(&option(OptionCode::Go, &data));
    assert_error_reply(&replies, OptionCode::Go, OptionReplyType::ErrInvalid);
    h.go("disk");
}

#[test]
fn list_sends_one_server_reply_per_export_then_ack() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    h.send(&option(OptionCode::List, &[]));
    let server = |name: &str, description: &str| {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(description.as_bytes());
        expected_option_reply(3, SERVER, &data)
    };
    let expected = [
        server("disk", "A test disk"),
        server("second", "Another one"),
        expected_option_reply(3, ACK, &[]),
    ]
    .concat();
    assert_eq!(h.received(), expected);
    // And through the parsers.
    let replies = option_replies(&expected);
    assert_eq!(
        replies[1].parsed(),
        OptionReply::Server {
            name: b"second",
            details: b"Another one",
        }
    );
}

#[test]
fn list_with_data_is_invalid_and_negotiation_continues() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let replies = h.option(&option(OptionCode::List, b"junk"));
    assert_error_reply(&replies, OptionCode::List, OptionReplyType::ErrInvalid);
    let replies = h.option(&option(OptionCode::List, &[]));
    assert_eq!(replies.len(), 3);
}

#[test]
fn export_name_with_no_zeroes_sends_ten_bytes() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    h.send(&export_name("disk"));
    let reply = h.received();
    let mut expected = (1u64 << 20).to_be_bytes().to_vec();
    expected.extend_from_slice(&0x25u16.to_be_bytes());
    assert_eq!(reply, expected);
    assert_eq!(reply.len(), 10);
    assert_eq!(
        h.take_events(),
        vec![Ev::ExportSelected {
            index: 0,
            size: 1 << 20,
            flags: 0x25,
            features: Features::default(),
        }]
    );
    h.read_ok(5, 1024, 1024);
}

#[test]
fn export_name_without_no_zeroes_sends_134_bytes() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(ClientFlags::FIXED_NEWSTYLE);
    h.send(&export_name("second"));
    let reply = h.received();
    assert_eq!(reply.len(), 134);
    assert_eq!(reply[..8], 4096u64.to_be_bytes());
    assert_eq!(reply[8..10], [0x00, 0x01]);
    assert!(reply[10..].iter().all(|&b| b == 0));
    assert_eq!(h.selected(), 1);
    h.read_ok(5, 0, 4096);
}

#[test]
fn export_name_with_empty_name_selects_the_default() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    h.send(&export_name(""));
    assert_eq!(h.received().len(), 10);
    assert_eq!(h.selected(), 0);
}

#[test]
fn export_name_for_an_unknown_export_closes() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let error = h
        .try_send(&export_name("nope"))
        .expect_err("unknown export accepted");
    assert_eq!(error, ProtocolError::UnknownExport);
    assert!(h.received().is_empty());
}

#[test]
fn abort_is_acknowledged_then_closes() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    h.auto_transmit = false;
    h.send(&option(OptionCode::Abort, &[]));
    assert!(h.take_events().is_empty(), "close before the ACK was sent");
    let ack = h.received();
    let expected: Vec<u8> = [
        &[0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9][..],
        &[0, 0, 0, 2],
        &[0, 0, 0, 1],
        &[0, 0, 0, 0],
    ]
    .concat();
    assert_eq!(ack, expected);
    h.pump();
    assert_eq!(h.take_events(), vec![Ev::Close(CloseReason::Abort)]);
    assert!(h.conn.is_closed());
    assert_eq!(h.try_send(&[0]), Err(ProtocolError::Closed));
}

#[test]
fn abort_with_data_is_still_acknowledged() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    h.send(&option(OptionCode::Abort, b"bye"));
    assert_eq!(h.received(), expected_option_reply(2, ACK, &[]));
    assert_eq!(h.take_events(), vec![Ev::Close(CloseReason::Abort)]);
}

#[test]
fn unknown_option_is_unsupported_and_its_data_skipped() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    // The unknown option and the next one in a single input: the stream
    // stays in sync only if exactly 100 bytes are skipped.
    let mut bytes = option(OptionCode::Unknown(0x1234), &[0xab; 100]);
    bytes.extend_from_slice(&option(OptionCode::List, &[]));
    h.send(&bytes);
    let replies = option_replies(&h.received());
    assert_eq!(replies.len(), 4, "{replies:?}");
    assert_eq!(replies[0].option, OptionCode::Unknown(0x1234));
    assert_eq!(replies[0].reply_type.to_wire(), ERR_UNSUP);
    assert!(replies[1..].iter().all(|r| r.option == OptionCode::List));
    assert_eq!(replies[3].reply_type, OptionReplyType::Ack);
}

#[test]
fn peek_export_is_unsupported() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let replies = h.option(&option(OptionCode::PeekExport, b"disk"));
    assert_error_reply(
        &replies,
        OptionCode::PeekExport,
        OptionReplyType::ErrUnsupported,
    );
    h.go("disk");
}

#[test]
fn option_longer_than_the_buffer_is_too_big_without_buffering() {
    let mut h = SmallHarness::new(two_exports(), Config::default());
    h.start(MODERN);
    let long_name = "x".repeat(400);
    let bytes = go(&long_name, &[]);
    assert!(bytes.len() - 16 > 320);
    // Byte by byte: the data is skipped as it comes.
    h.send_bytewise(&bytes);
    let replies = option_replies(&h.received());
    assert_error_reply(&replies, OptionCode::Go, OptionReplyType::ErrTooBig);
    assert_eq!(replies[0].reply_type.to_wire(), ERR_TOO_BIG);
    assert_eq!(h.pending_input(), 0);
    // An unknown option longer than the buffer is still unsupported.
    let replies = h.option(&option(OptionCode::Unknown(99), &[7; 1000]));
    assert_error_reply(
        &replies,
        OptionCode::Unknown(99),
        OptionReplyType::ErrUnsupported,
    );
    h.go("disk");
    h.read_ok(1, 0, 4096);
}

#[test]
fn option_longer_than_max_option_length_closes() {
    let config = Config {
        max_option_length: 1000,
        ..Config::default()
    };
    let mut h = H::new(two_exports(), config);
    h.start(MODERN);
    h.option_ack(&option(OptionCode::StructuredReply, &[]));
    // Just the header: the length alone condemns it.
    let bytes = option(OptionCode::Unknown(0x1234), &[0; 1001]);
    let error = h.try_send(&bytes[..16]).expect_err("huge option accepted");
    assert_eq!(error, ProtocolError::OptionTooLong { length: 1001 });
}

#[test]
fn option_at_max_option_length_is_answered() {
    let config = Config {
        max_option_length: 1000,
        ..Config::default()
    };
    let mut h = H::new(two_exports(), config);
    h.start(MODERN);
    let replies = h.option(&option(OptionCode::Unknown(0x1234), &[0; 1000]));
    assert_error_reply(
        &replies,
        OptionCode::Unknown(0x1234),
        OptionReplyType::ErrUnsupported,
    );
}

#[test]
fn structured_reply_with_data_is_invalid() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let replies = h.option(&option(OptionCode::StructuredReply, b"x"));
    assert_error_reply(
        &replies,
        OptionCode::StructuredReply,
        OptionReplyType::ErrInvalid,
    );
    h.go("disk");
    // Not negotiated: a read gets a simple reply.
    assert!(matches!(h.read(1, 0, 512)[0], Reply::Simple { .. }));
}

#[test]
fn options_after_the_greeting_without_fixed_newstyle() {
    // A client without FIXED_NEWSTYLE may still use EXPORT_NAME.
    let mut h = H::new(two_exports(), Config::default());
    h.start(ClientFlags::empty());
    h.send(&export_name("disk"));
    assert_eq!(h.received().len(), 134);
    assert_eq!(h.selected(), 0);
}

/// The whole negotiation and some transmission, in one input, then byte by
/// byte, then in random pieces: the same bytes come out, the same requests
/// are made, and storage ends the same.
#[test]
fn a_whole_conversation_streams_at_every_split() {
    let mut conversation = client_flags(MODERN);
    conversation.extend(option(OptionCode::Unknown(77), &[1; 33]));
    conversation.extend(option(OptionCode::List, &[]));
    conversation.extend(info("disk", &[InfoType::Name]));
    conversation.extend(option(OptionCode::StructuredReply, &[]));
    conversation.extend(go("disk", &[InfoType::BlockSize, InfoType::Description]));
    let style = nbd_core::wire::HeaderStyle::Compact;
    let payload: Vec<u8> = (0..1536u32).map(|i| (i % 13) as u8).collect();
    conversation.extend(write_request(style, Default::default(), 1, 512, &payload));
    conversation.extend(request(
        style,
        nbd_core::wire::Command::Read,
        Default::default(),
        2,
        0,
        4096,
    ));
    conversation.extend(request(
        style,
        nbd_core::wire::Command::Flush,
        Default::default(),
        3,
        0,
        0,
    ));
    conversation.extend(request(
        style,
        nbd_core::wire::Command::Trim,
        Default::default(),
        4,
        2048,
        1024,
    ));
    conversation.extend(request(
        style,
        nbd_core::wire::Command::Read,
        Default::default(),
        5,
        1024,
        2048,
    ));
    conversation.extend(request(
        style,
        nbd_core::wire::Command::Disconnect,
        Default::default(),
        6,
        0,
        0,
    ));

    let connect = || H::new(two_exports(), Config::default());
    let run = |feed: &dyn Fn(&mut H, &[u8])| run_conversation(&connect, &conversation, feed);
    let whole = run(&|h, bytes| h.send(bytes));
    assert_eq!(whole.2, payload);
    let bytewise = run(&|h, bytes| h.send_bytewise(bytes));
    assert_eq!(whole, bytewise);
    for seed in 1..20 {
        let pieces = run(&|h, bytes| h.send_in_pieces(bytes, seed, 40));
        assert_eq!(whole, pieces, "seed {seed}");
    }
}

/// Spec: `NBD_OPT_EXPORT_NAME` has no error reply; a server that will not
/// serve the name closes the connection. An option reply here would be
/// read by the client as the export's size and flags.
#[test]
fn export_name_longer_than_the_buffer_closes_without_an_option_reply() {
    let mut h = SmallHarness::new(two_exports(), Config::default());
    h.start(MODERN);
    let long_name = "x".repeat(400);
    let result = h.try_send(&export_name(&long_name));
    let sent = h.received();
    assert!(
        sent.is_empty(),
        "EXPORT_NAME answered with {} bytes of option reply",
        sent.len()
    );
    assert!(
        result.is_err(),
        "EXPORT_NAME with a 400-byte name left the connection open"
    );
}

#[test]
fn go_refused_until_block_sizes_are_requested() {
    let config = Config {
        require_block_size_request: true,
        ..Config::default()
    };
    let mut h = H::new(two_exports(), config);
    h.start(MODERN);
    let replies = h.option(&go("disk", &[InfoType::Name]));
    let last = replies.last().expect("replies");
    assert_eq!(last.reply_type, OptionReplyType::ErrBlockSizeRequired);
    // The constraints were sent first, to save a round trip.
    assert!(
        replies
            .iter()
            .any(|r| matches!(r.parsed(), OptionReply::Info(Info::BlockSize(_))))
    );
    assert!(h.take_events().is_empty());
    // An export with default block sizes needs no request.
    let replies = h.option(&info("second", &[]));
    assert_eq!(
        replies.last().map(|r| r.reply_type),
        Some(OptionReplyType::Ack)
    );
    // Asking for them is enough.
    let replies = h.option(&go("disk", &[InfoType::BlockSize]));
    assert_eq!(
        replies.last().map(|r| r.reply_type),
        Some(OptionReplyType::Ack)
    );
    assert!(matches!(
        h.take_events()[..],
        [Ev::ExportSelected { index: 0, .. }]
    ));
}

/// A catalog that hides its list and has no default export.
#[derive(Debug)]
struct Private([Export<'static>; 1]);

impl nbd_core::export::Catalog for Private {
    fn len(&self) -> usize {
        1
    }
    fn get(&self, index: usize) -> Option<Export<'_>> {
        <[Export<'static>]>::get(&self.0, index).copied()
    }
    fn default_index(&self) -> Option<usize> {
        None
    }
    fn listable(&self) -> bool {
        false
    }
}

#[test]
fn unlisted_catalog_without_default_export() {
    use nbd_core::server::{Connection, Payload};
    let mut conn: Connection<Private, 4, 512> =
        Connection::new(Private([Export::new("secret", 512)]), Config::default());
    let mut sent = Vec::new();
    let mut drive =
        |conn: &mut Connection<Private, 4, 512>, input: &[u8]| -> Result<Vec<u8>, ProtocolError> {
            let mut at = 0;
            loop {
                let step = conn.process(&input[at..])?;
                at += step.consumed;
                assert!(step.event.is_none() || at == input.len());
                let mut out = Vec::new();
                while let Some(t) = conn.poll_transmit() {
                    out.extend(t.parts.concat());
                    assert_eq!(t.payload, None::<Payload>);
                }
                if out.is_empty() && step.consumed == 0 {
                    return Ok(std::mem::take(&mut sent));
                }
                sent.extend(out);
            }
        };
    assert_eq!(drive(&mut conn, &[]).expect("greeting"), GREETING);
    drive(&mut conn, &client_flags(MODERN)).expect("flags");
    let replies = option_replies(&drive(&mut conn, &option(OptionCode::List, &[])).expect("list"));
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].reply_type, OptionReplyType::ErrPolicy);
    let replies = option_replies(&drive(&mut conn, &go("", &[])).expect("go"));
    assert_eq!(replies[0].reply_type, OptionReplyType::ErrUnknownExport);
    assert_eq!(
        drive(&mut conn, &export_name("")),
        Err(ProtocolError::UnknownExport)
    );
}

#[test]
fn repeated_info_requests_give_each_info_once() {
    let mut h = H::new(two_exports(), Config::default());
    h.start(MODERN);
    let wanted = [
        InfoType::Export,
        InfoType::Name,
        InfoType::Name,
        InfoType::BlockSize,
        InfoType::Export,
    ];
    let replies = h.option(&info("disk", &wanted));
    let types: Vec<_> = replies
        .iter()
        .map(|r| match r.parsed() {
            OptionReply::Info(info) => Some(info.info_type()),
            _ => None,
        })
        .collect();
    assert_eq!(
        types,
        vec![
            Some(InfoType::Export),
            Some(InfoType::Name),
            Some(InfoType::BlockSize),
            None
        ]
    );
}
