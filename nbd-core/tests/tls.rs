//! `NBD_OPT_STARTTLS` under each TLS policy (spec: "TLS support",
//! "NBD_OPT_STARTTLS"). The core only hands over to the shell's TLS; the
//! bytes after the hand-over stand for decrypted bytes.

mod common;

use common::*;
use nbd_core::export::Export;
use nbd_core::server::{CloseReason, Config, ProtocolError, TlsPolicy};
use nbd_core::wire::{ClientFlags, Command, CommandFlags, ErrorCode, OptionCode, OptionReplyType};

type H = Harness;

fn exports() -> Vec<Export<'static>> {
    vec![full_export("disk")]
}

fn with_policy(tls: TlsPolicy) -> H {
    let mut h = H::new(
        exports(),
        Config {
            tls,
            ..Config::default()
        },
    );
    h.start(MODERN);
    h
}

fn starttls() -> Vec<u8> {
    option(OptionCode::StartTls, &[])
}

fn assert_refused(replies: &[OptReply], option: OptionCode, reply_type: OptionReplyType) {
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].option, option);
    assert_eq!(replies[0].reply_type, reply_type, "{replies:?}");
}

#[test]
fn disabled_tls_refuses_starttls_with_policy() {
    let mut h = with_policy(TlsPolicy::Disabled);
    let replies = h.option(&starttls());
    assert_refused(&replies, OptionCode::StartTls, OptionReplyType::ErrPolicy);
    assert_eq!(replies[0].reply_type.to_wire(), 0x8000_0002);
    assert!(h.take_events().is_empty());
    assert!(!h.conn.tls_active());
    h.go("disk");
}

#[test]
fn optional_tls_hands_over_after_the_ack_is_sent() {
    let mut h = with_policy(TlsPolicy::Optional);
    h.auto_transmit = false;
    h.send(&starttls());
    assert!(
        h.take_events().is_empty(),
        "hand-over before the ACK went out"
    );
    assert_eq!(h.received(), expected_option_reply(5, 1, &[]));
    h.pump();
    assert_eq!(h.take_events(), vec![Ev::StartTls]);
    assert!(h.conn.tls_active());
    // Negotiation continues (over TLS).
    h.auto_transmit = true;
    h.go("disk");
    h.read_ok(1, 0, 512);
}

#[test]
fn starttls_forgets_structured_replies() {
    let mut h = with_policy(TlsPolicy::Optional);
    h.structured_replies();
    h.set_base_allocation("disk");
    h.send(&starttls());
    assert_eq!(h.received(), expected_option_reply(5, 1, &[]));
    assert_eq!(h.take_events(), vec![Ev::StartTls]);
    assert_eq!(h.conn.features(), Features::default());
    h.go("disk");
    match h.events.last() {
        Some(Ev::ExportSelected { features, .. }) => assert_eq!(*features, Features::default()),
        other => panic!("{other:?}"),
    }
    // A read gets a simple reply now.
    let got = h.read(1, 0, 512);
    assert!(matches!(got[0], Reply::Simple { error: 0, .. }), "{got:?}");
    assert_read_data(&got, 1, 0, &h.disk()[..512]);
    // And block status is not available: the context was forgotten.
    h.request(Command::BlockStatus, CommandFlags::empty(), 2, 0, 512);
    let got = replies(&h.received(), &[]);
    assert_error(&got[0], 2, ErrorCode::Invalid);
}

#[test]
fn starttls_then_renegotiated_structured_replies() {
    let mut h = with_policy(TlsPolicy::Optional);
    h.structured_replies();
    h.send(&starttls());
    h.received();
    h.structured_replies();
    let context = h.set_base_allocation("disk");
    assert_ne!(context, 0);
    h.go("disk");
    let got = h.read(1, 0, 512);
    assert!(matches!(got[0], Reply::Chunk { .. }), "{got:?}");
    h.request(Command::BlockStatus, CommandFlags::empty(), 2, 0, 512);
    let got = replies(&h.received(), &[]);
    assert_eq!(got[0].error(), 0);
}

#[test]
fn starttls_forgets_extended_headers() {
    let mut h = with_policy(TlsPolicy::Optional);
    h.extended_headers();
    h.send(&starttls());
    h.received();
    assert!(!h.conn.features().extended_headers);
    // EXPORT_NAME is allowed again.
    h.send(&export_name("disk"));
    assert_eq!(h.received().len(), 10);
    let got = h.read(1, 0, 512);
    assert!(matches!(got[0], Reply::Simple { .. }));
}

#[test]
fn starttls_twice_is_invalid() {
    let mut h = with_policy(TlsPolicy::Optional);
    h.send(&starttls());
    h.received();
    assert_eq!(h.take_events(), vec![Ev::StartTls]);
    let replies = h.option(&starttls());
    assert_refused(&replies, OptionCode::StartTls, OptionReplyType::ErrInvalid);
    assert!(h.take_events().is_empty());
}

#[test]
fn starttls_with_data_is_invalid() {
    let mut h = with_policy(TlsPolicy::Optional);
    let replies = h.option(&option(OptionCode::StartTls, b"x"));
    assert_refused(&replies, OptionCode::StartTls, OptionReplyType::ErrInvalid);
    assert!(h.take_events().is_empty());
    assert!(!h.conn.tls_active());
}

#[test]
fn required_tls_refuses_other_options() {
    let mut h = with_policy(TlsPolicy::Required);
    for (code, bytes) in [
        (OptionCode::List, option(OptionCode::List, &[])),
        (OptionCode::Go, go("disk", &[])),
        (OptionCode::Info, info("disk", &[])),
        (
            OptionCode::StructuredReply,
            option(OptionCode::StructuredReply, &[]),
        ),
        (
            OptionCode::ExtendedHeaders,
            option(OptionCode::ExtendedHeaders, &[]),
        ),
        (OptionCode::ListMetaContext, list_meta("disk", &[])),
    ] {
        let replies = h.option(&bytes);
        assert_refused(&replies, code, OptionReplyType::ErrTlsRequired);
        assert_eq!(replies[0].reply_type.to_wire(), 0x8000_0005);
    }
    assert!(h.take_events().is_empty());
    assert_eq!(h.conn.features(), Features::default());
    // STARTTLS works, and then so does everything else.
    h.send(&starttls());
    assert_eq!(h.received(), expected_option_reply(5, 1, &[]));
    assert_eq!(h.take_events(), vec![Ev::StartTls]);
    let replies = h.option(&option(OptionCode::List, &[]));
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[1].reply_type, OptionReplyType::Ack);
    h.structured_replies();
    h.go("disk");
    h.read_ok(1, 0, 512);
}

#[test]
fn required_tls_refuses_unknown_options_and_keeps_in_sync() {
    let mut h = with_policy(TlsPolicy::Required);
    let mut bytes = option(OptionCode::Unknown(0x99), &[1; 50]);
    bytes.extend(option(OptionCode::List, b"data"));
    h.send(&bytes);
    let replies = option_replies(&h.received());
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert!(replies.iter().all(|r| r.reply_type.is_error()));
    assert_eq!(replies[1].reply_type, OptionReplyType::ErrTlsRequired);
    h.send(&starttls());
    h.received();
    assert_eq!(h.take_events(), vec![Ev::StartTls]);
}

#[test]
fn required_tls_closes_on_export_name() {
    let mut h = with_policy(TlsPolicy::Required);
    let error = h
        .try_send(&export_name("disk"))
        .expect_err("EXPORT_NAME without TLS");
    assert_eq!(error, ProtocolError::TlsRequired);
}

#[test]
fn required_tls_allows_export_name_after_starttls() {
    let mut h = with_policy(TlsPolicy::Required);
    h.send(&starttls());
    h.received();
    h.send(&export_name("disk"));
    assert_eq!(h.received().len(), 10);
    assert_eq!(h.selected(), 0);
}

#[test]
fn required_tls_still_honours_abort() {
    let mut h = with_policy(TlsPolicy::Required);
    h.send(&option(OptionCode::Abort, &[]));
    assert_eq!(h.received(), expected_option_reply(2, 1, &[]));
    assert_eq!(h.take_events(), vec![Ev::Close(CloseReason::Abort)]);
}

#[test]
fn required_tls_needs_fixed_newstyle() {
    let mut h = H::new(
        exports(),
        Config {
            tls: TlsPolicy::Required,
            ..Config::default()
        },
    );
    h.received();
    let error = h
        .try_send(&client_flags(ClientFlags::NO_ZEROES))
        .expect_err("no fixed newstyle");
    assert_eq!(error, ProtocolError::TlsRequired);
}

#[test]
fn starttls_without_fixed_newstyle_is_refused() {
    let mut h = H::new(
        exports(),
        Config {
            tls: TlsPolicy::Optional,
            ..Config::default()
        },
    );
    h.start(ClientFlags::empty());
    let replies = h.option(&starttls());
    assert_eq!(replies.len(), 1);
    assert!(replies[0].reply_type.is_error());
    assert!(h.take_events().is_empty());
}

#[test]
fn bytes_after_starttls_are_left_for_the_tls_layer() {
    let mut h = with_policy(TlsPolicy::Optional);
    h.auto_transmit = false;
    // A client hello pipelined right behind the option.
    let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    h.send(&[starttls(), hello.to_vec()].concat());
    assert_eq!(
        h.pending_input(),
        hello.len(),
        "TLS bytes consumed as options"
    );
    assert_eq!(h.received(), expected_option_reply(5, 1, &[]));
    // The shell asks again with the same bytes: the hand-over comes first
    // and nothing is consumed, so the bytes go to the TLS library.
    let step = h.conn.process(&hello).expect("process");
    assert_eq!(step.consumed, 0);
    assert_eq!(step.event, Some(nbd_core::server::Event::StartTls));
}
