//! The client against the core's own server, both sans-IO, wired together
//! in memory: negotiation in every mode, every command, simple, structured
//! and extended replies, errors, completion order, back-pressure.

mod client_harness;

use client_harness::{Ev, Pair, ReadStyle};
use nbd_core::client::{Config, Mode, TlsPolicy, UsageError};
use nbd_core::export::{Capabilities, Export, Features};
use nbd_core::server;
use nbd_core::wire::{
    BlockSizeConstraints, Command, CommandFlags, ErrorCode, HeaderStyle, OptionCode,
    OptionReplyType, TransmissionFlags,
};

/// The three reply styles a client can end up with.
fn styles() -> [(&'static str, Config<'static>); 3] {
    [
        ("simple", Config::new("disk").simple()),
        (
            "structured",
            Config {
                extended_headers: false,
                ..Config::new("disk")
            },
        ),
        ("extended", Config::new("disk")),
    ]
}

fn ready<const R: usize, const B: usize>(config: Config<'_>) -> Pair<R, B> {
    let mut pair = Pair::standard(config);
    pair.run();
    assert!(pair.client.is_ready(), "not ready: {:?}", pair.events);
    pair.take_events();
    pair
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) * 7 % 251) as u8 + 1)
        .collect()
}

#[test]
fn default_config_negotiates_extended_headers_and_base_allocation() {
    let mut pair: Pair<16, 4096> = Pair::standard(Config::new("disk"));
    pair.run();
    let events = pair.take_events();
    assert_eq!(events[0], Ev::Greeted(3));
    assert_eq!(
        events[1],
        Ev::MetaContext {
            id: 1,
            name: b"base:allocation".to_vec()
        }
    );
    assert!(matches!(events[2], Ev::InfoExport { size, .. } if size == 1 << 20));
    assert_eq!(events[3], Ev::InfoBlockSize(1, 4096, 32 << 20));
    let Ev::Export(info) = events[4] else {
        panic!("no export: {events:?}")
    };
    assert_eq!(events[5..], [Ev::Ready]);
    assert_eq!(info.size, 1 << 20);
    assert!(info.block_sizes_advertised);
    assert_eq!(
        info.features,
        Features {
            structured_replies: true,
            extended_headers: true
        }
    );
    let client = &pair.client;
    assert_eq!(client.header_style(), HeaderStyle::Extended);
    assert_eq!(client.meta_contexts(), &[1]);
    assert!(client.can_flush() && client.can_fua() && client.can_trim());
    assert!(client.can_write_zeroes() && client.can_fast_zero() && client.can_cache());
    assert!(client.can_resize() && client.can_df() && client.can_block_status());
    assert!(!client.is_read_only());
    assert!(
        info.flags
            .contains(TransmissionFlags::HAS_FLAGS | TransmissionFlags::CAN_MULTI_CONN)
    );
}

#[test]
fn each_style_negotiates_what_it_asked_for() {
    for (name, config) in styles() {
        let pair: Pair<16, 4096> = ready(config);
        let features = pair.client.features();
        assert_eq!(features.structured_replies, name != "simple", "{name}");
        assert_eq!(features.extended_headers, name == "extended", "{name}");
        assert_eq!(pair.client.can_block_status(), name != "simple", "{name}");
        assert_eq!(pair.client.can_df(), name != "simple", "{name}");
    }
}

#[test]
fn writes_and_reads_round_trip_in_every_style() {
    for (name, config) in styles() {
        for read_style in [ReadStyle::Data, ReadStyle::Holes] {
            let mut pair: Pair<16, 4096> = ready(config);
            pair.read_style = read_style;
            let chunks = [
                (0u64, 4096usize),
                (8192, 512),
                (65536, 100_000),
                (1_000_000, 48_576),
            ];
            let writes: Vec<_> = chunks
                .iter()
                .map(|&(offset, len)| pair.write(offset, &pattern(offset, len), false))
                .collect();
            pair.run();
            for id in writes {
                assert_eq!(pair.result(id), Some(Ok(())), "{name}");
            }
            for &(offset, len) in &chunks {
                assert_eq!(
                    pair.storage[offset as usize..][..len],
                    pattern(offset, len)[..]
                );
            }
            // A read spanning data and zeroes, and one of zeroes only.
            let mixed = pair
                .client
                .read(4096, 8192, CommandFlags::empty())
                .expect("read");
            let zeroes = pair
                .client
                .read(200_000, 4096, CommandFlags::empty())
                .expect("read");
            pair.run();
            assert_eq!(pair.result(mixed), Some(Ok(())));
            assert_eq!(pair.result(zeroes), Some(Ok(())));
            let data = pair.read_data(mixed, 4096, 8192);
            assert_eq!(data[..4096], [0; 4096][..]);
            assert_eq!(data[4096..4608], pattern(8192, 512)[..]);
            assert_eq!(pair.read_data(zeroes, 200_000, 4096), vec![0; 4096]);
            let holes = pair
                .events
                .iter()
                .filter(|e| matches!(e, Ev::ReadHole { .. }))
                .count();
            let expect_hole = read_style == ReadStyle::Holes && name != "simple";
            assert_eq!(holes > 0, expect_hole, "{name} {read_style:?}");
        }
    }
}

#[test]
fn reads_split_byte_by_byte() {
    for (name, config) in styles() {
        let mut pair: Pair<16, 4096> = Pair::standard(config);
        pair.client_piece = 1;
        pair.run();
        assert!(pair.client.is_ready(), "{name}: {:?}", pair.events);
        let w = pair.write(512, &pattern(512, 3000), true);
        let r = pair
            .client
            .read(0, 4096, CommandFlags::empty())
            .expect("read");
        pair.run();
        assert_eq!(pair.result(w), Some(Ok(())));
        assert_eq!(pair.result(r), Some(Ok(())));
        let data = pair.read_data(r, 0, 4096);
        assert_eq!(data[512..3512], pattern(512, 3000)[..], "{name}");
    }
}

#[test]
fn flush_trim_cache_write_zeroes_and_flags() {
    for (name, config) in styles() {
        let mut pair: Pair<16, 4096> = ready(config);
        let w = pair.write(0, &pattern(0, 16384), false);
        pair.run();
        assert_eq!(pair.result(w), Some(Ok(())));
        let ids = [
            pair.client.flush().expect("flush"),
            pair.client.trim(0, 4096, true).expect("trim"),
            pair.client.cache(4096, 4096).expect("cache"),
            pair.client
                .write_zeroes(8192, 4096, CommandFlags::NO_HOLE | CommandFlags::FUA)
                .expect("zeroes"),
            pair.client
                .write_zeroes(12288, 512, CommandFlags::FAST_ZERO)
                .expect("fast zeroes"),
        ];
        pair.run();
        for id in ids {
            assert_eq!(pair.result(id), Some(Ok(())), "{name}");
        }
        assert!(pair.storage[..4096].iter().all(|&b| b == 0));
        assert_eq!(pair.storage[4096..8192], pattern(4096, 4096)[..]);
        assert!(pair.storage[8192..12800].iter().all(|&b| b == 0));
        assert_eq!(pair.storage[12800..16384], pattern(12800, 3584)[..]);
    }
}

#[test]
fn block_status_reports_base_allocation() {
    for (name, config) in styles().into_iter().skip(1) {
        let mut pair: Pair<16, 4096> = ready(config);
        let w = pair.write(2048, &pattern(2048, 1024), false);
        pair.run();
        assert_eq!(pair.result(w), Some(Ok(())));
        let all = pair.client.block_status(0, 8192, false).expect("status");
        let one = pair.client.block_status(0, 1024, true).expect("status");
        pair.run();
        assert_eq!(pair.result(all), Some(Ok(())), "{name}");
        assert_eq!(pair.result(one), Some(Ok(())), "{name}");
        let descriptors: Vec<(u64, u64)> = pair
            .descriptors(all)
            .into_iter()
            .flat_map(|(context, _, d)| {
                assert_eq!(context, 1);
                d
            })
            .collect();
        assert_eq!(descriptors[..2], [(2048, 3), (1024, 0)], "{name}");
        assert_eq!(
            pair.descriptors(one),
            vec![(1, 0, vec![(1024, 3)])],
            "{name}"
        );
    }
    // Simple replies: no block status.
    let mut pair: Pair<16, 4096> = ready(Config::new("disk").simple());
    assert_eq!(
        pair.client.block_status(0, 512, false),
        Err(UsageError::NotAdvertised(Command::BlockStatus))
    );
}

#[test]
fn resize_changes_the_size_requests_are_checked_against() {
    let mut pair: Pair<16, 4096> = ready(Config::new("disk"));
    let grow = pair.client.resize(2 << 20).expect("resize");
    // Checked against the smaller size until the resize is done.
    assert_eq!(
        pair.client
            .read((1 << 20) - 512, 4096, CommandFlags::empty()),
        Err(UsageError::OutOfRange)
    );
    assert_eq!(pair.client.resize(4 << 20), Err(UsageError::ResizeInFlight));
    pair.run();
    assert_eq!(pair.result(grow), Some(Ok(())));
    assert_eq!(pair.client.export_size(), Some(2 << 20));
    let r = pair
        .client
        .read((2 << 20) - 4096, 4096, CommandFlags::empty())
        .expect("read in the grown range");
    pair.run();
    assert_eq!(pair.result(r), Some(Ok(())));
}

#[test]
fn info_mode_describes_the_export_and_aborts() {
    let config = Config {
        request_name: true,
        request_description: true,
        ..Config::new("disk")
            .with_mode(Mode::Info)
            .with_meta_contexts(&[])
    };
    let mut pair: Pair<16, 4096> = Pair::standard(config);
    pair.run();
    let events = pair.take_events();
    assert_eq!(events[0], Ev::Greeted(3));
    assert!(events.contains(&Ev::MetaContext {
        id: 0,
        name: b"base:allocation".to_vec()
    }));
    assert!(events.contains(&Ev::InfoName(b"disk".to_vec())));
    assert!(events.contains(&Ev::InfoDescription(b"a RAM disk".to_vec())));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Ev::Export(i) if i.size == 1 << 20))
    );
    assert_eq!(events.last(), Some(&Ev::Closed));
    assert!(!events.contains(&Ev::Ready));
    assert!(pair.client.is_closed());
    assert!(pair.server_closed);
    assert_eq!(pair.eof, Some(Ok(())));
    assert_eq!(pair.client.export_size(), Some(1 << 20));
}

#[test]
fn list_mode_lists_every_export() {
    let mut pair: Pair<16, 4096> = Pair::standard(Config::new("").with_mode(Mode::List));
    pair.run();
    assert_eq!(
        pair.take_events(),
        vec![
            Ev::Greeted(3),
            Ev::ListEntry {
                name: b"disk".to_vec(),
                description: b"a RAM disk".to_vec()
            },
            Ev::ListEntry {
                name: b"plain".to_vec(),
                description: vec![]
            },
            Ev::Closed,
        ]
    );
    assert_eq!(pair.eof, Some(Ok(())));
}

#[test]
fn unknown_export_is_refused_with_the_servers_message() {
    let mut pair: Pair<16, 4096> = Pair::standard(Config::new("nope"));
    pair.run();
    let events = pair.take_events();
    assert!(events.contains(&Ev::OptionRefused {
        option: OptionCode::Go,
        reply_type: OptionReplyType::ErrUnknownExport,
        message: b"no such export".to_vec(),
    }));
    assert_eq!(events.last(), Some(&Ev::Closed));
    assert_eq!(pair.eof, Some(Ok(())));
    assert_eq!(
        pair.client.read(0, 512, CommandFlags::empty()),
        Err(UsageError::Closing)
    );
}

#[test]
fn small_connection_negotiates_and_transfers() {
    let mut pair: Pair<16, 320> = Pair::standard(Config::new("disk"));
    pair.run();
    assert!(pair.client.is_ready(), "{:?}", pair.events);
    let w = pair.write(0, &pattern(0, 65536), false);
    let r = pair
        .client
        .read(0, 65536, CommandFlags::empty())
        .expect("read");
    pair.run();
    assert_eq!(pair.result(w), Some(Ok(())));
    assert_eq!(pair.read_data(r, 0, 65536), pattern(0, 65536));
}

#[test]
fn starttls_hands_over_and_negotiation_restarts() {
    let server_config = server::Config {
        tls: server::TlsPolicy::Required,
        ..server::Config::default()
    };
    let exports = vec![Export::new("disk", 1 << 20).with_capabilities(Capabilities::ALL)];
    let config = Config::new("disk").with_tls(TlsPolicy::Required);
    let mut pair: Pair<16, 4096> = Pair::new(exports, server_config, config);
    pair.run();
    let events = pair.take_events();
    assert_eq!(events[..2], [Ev::Greeted(3), Ev::StartTls]);
    assert_eq!(events.last(), Some(&Ev::Ready));
    assert!(pair.client.tls_active());
    assert!(pair.server.tls_active());
    assert!(pair.client.features().extended_headers);
    // STARTTLS went out first, then everything else.
    let sent = &pair.client_bytes;
    assert_eq!(&sent[4 + 8..4 + 12], &5u32.to_be_bytes());
}

#[test]
fn starttls_refusal_ends_or_continues_by_policy() {
    let mut pair: Pair<16, 4096> =
        Pair::standard(Config::new("disk").with_tls(TlsPolicy::Required));
    pair.run();
    let events = pair.take_events();
    assert!(events.contains(&Ev::OptionRefused {
        option: OptionCode::StartTls,
        reply_type: OptionReplyType::ErrPolicy,
        message: b"TLS is not available on this server".to_vec(),
    }));
    assert_eq!(events.last(), Some(&Ev::Closed));
    assert!(!pair.client.tls_active());

    let mut pair: Pair<16, 4096> = ready(Config::new("disk").with_tls(TlsPolicy::Optional));
    assert!(!pair.client.tls_active());
    assert!(pair.client.flush().is_ok());
}

#[test]
fn server_errors_surface_as_done_err_in_every_style() {
    for (name, config) in styles() {
        let mut pair: Pair<16, 4096> = ready(config);
        pair.fail_at = Some((4096, ErrorCode::Io));
        let r = pair
            .client
            .read(4096, 512, CommandFlags::empty())
            .expect("read");
        let w = pair.write(4096, &[1; 512], false);
        let t = pair.client.trim(4096, 512, false).expect("trim");
        let ok = pair
            .client
            .read(0, 512, CommandFlags::empty())
            .expect("read");
        pair.run();
        assert_eq!(pair.result(r), Some(Err(ErrorCode::Io)), "{name}");
        assert_eq!(pair.result(w), Some(Err(ErrorCode::Io)), "{name}");
        assert_eq!(pair.result(t), Some(Err(ErrorCode::Io)), "{name}");
        assert_eq!(pair.result(ok), Some(Ok(())), "{name}");
        assert!(
            pair.client_error.is_none() && pair.client.is_ready(),
            "{name}"
        );
    }
}

#[test]
fn requests_complete_in_any_order() {
    for (name, config) in styles() {
        let mut pair: Pair<16, 4096> = ready(config);
        pair.hold = true;
        let writes: Vec<_> = (0..6u64)
            .map(|i| pair.write(i * 4096, &pattern(i * 4096, 4096), false))
            .collect();
        pair.run();
        assert_eq!(pair.held.len(), 6);
        for index in [5, 0, 3, 1, 1, 0] {
            pair.complete_held(index);
            pair.run();
        }
        for id in &writes {
            assert_eq!(pair.result(*id), Some(Ok(())), "{name}");
        }
        let reads: Vec<_> = (0..6u64)
            .map(|i| {
                pair.client
                    .read(i * 4096, 4096, CommandFlags::empty())
                    .expect("read")
            })
            .collect();
        pair.run();
        for index in [2, 4, 0, 2, 1, 0] {
            pair.complete_held(index);
            pair.run();
        }
        let done: Vec<_> = pair
            .events
            .iter()
            .filter_map(|e| match e {
                Ev::Done { id, .. } if reads.contains(id) => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(
            done,
            [reads[2], reads[5], reads[0], reads[4], reads[3], reads[1]],
            "{name}"
        );
        for (i, id) in reads.iter().enumerate() {
            let offset = i as u64 * 4096;
            assert_eq!(pair.read_data(*id, offset, 4096), pattern(offset, 4096));
        }
    }
}

#[test]
fn the_table_bounds_requests_in_flight() {
    let mut pair: Pair<64, 4096> = ready(Config::new("disk"));
    pair.hold = true;
    let ids: Vec<_> = (0..64u64)
        .map(|i| {
            pair.client
                .read(i * 512, 512, CommandFlags::empty())
                .expect("read")
        })
        .collect();
    assert_eq!(pair.client.in_flight(), 64);
    assert_eq!(
        pair.client.read(0, 512, CommandFlags::empty()),
        Err(UsageError::Full)
    );
    pair.run();
    while !pair.held.is_empty() {
        let index = pair.held.len() / 2;
        pair.complete_held(index);
        pair.run();
    }
    assert!(ids.iter().all(|id| pair.result(*id) == Some(Ok(()))));
    assert_eq!(pair.client.in_flight(), 0);
    // Ids are reused, with a fresh generation.
    let again = pair
        .client
        .read(0, 512, CommandFlags::empty())
        .expect("read");
    assert!(!ids.contains(&again));
}

#[test]
fn usage_errors_are_refused_locally() {
    let exports = vec![
        Export::new("aligned", 1 << 20)
            .with_block_sizes(BlockSizeConstraints {
                minimum: 512,
                preferred: 4096,
                maximum: 65536,
            })
            .with_capabilities(Capabilities::ALL),
        Export::new("plain", 1 << 20),
        Export::new("ro", 1 << 20)
            .with_read_only(true)
            .with_capabilities(Capabilities::ALL),
        Export::new("odd", 1000).with_block_sizes(BlockSizeConstraints {
            minimum: 512,
            preferred: 4096,
            maximum: 65536,
        }),
    ];
    let connect = |name: &'static str, config: Config<'static>| {
        let mut pair: Pair<4, 4096> = Pair::new(
            exports.clone(),
            server::Config::default(),
            Config {
                export_name: name,
                ..config
            },
        );
        assert_eq!(
            pair.client.read(0, 512, CommandFlags::empty()),
            Err(UsageError::NotReady)
        );
        pair.run();
        assert!(pair.client.is_ready(), "{name}: {:?}", pair.events);
        pair
    };
    let none = CommandFlags::empty();
    let mut pair = connect("aligned", Config::new(""));
    let c = &mut pair.client;
    assert_eq!(c.block_sizes().map(|b| b.minimum), Some(512));
    assert_eq!(c.read(0, 0, none), Err(UsageError::ZeroLength));
    assert_eq!(
        c.read((1 << 20) - 512, 1024, none),
        Err(UsageError::OutOfRange)
    );
    assert_eq!(
        c.read(u64::MAX - 511, 512, none),
        Err(UsageError::OutOfRange)
    );
    assert_eq!(
        c.read(100, 512, none),
        Err(UsageError::Misaligned { minimum: 512 })
    );
    assert_eq!(
        c.write(0, 100, false),
        Err(UsageError::Misaligned { minimum: 512 })
    );
    assert_eq!(
        c.read(0, 131072, none),
        Err(UsageError::TooLarge { maximum: 65536 })
    );
    assert_eq!(
        c.cache(0, 131072),
        Err(UsageError::TooLarge { maximum: 65536 })
    );
    assert!(c.trim(0, 131072, false).is_ok(), "trim is not capped");
    assert!(
        c.write_zeroes(0, 131072, none).is_ok(),
        "zeroing is not capped either, FAST_ZERO or not"
    );
    assert_eq!(
        c.read(0, 512, CommandFlags::REQ_ONE),
        Err(UsageError::InvalidFlags(CommandFlags::REQ_ONE))
    );
    assert_eq!(
        c.write_zeroes(0, 512, CommandFlags::DF),
        Err(UsageError::InvalidFlags(CommandFlags::DF))
    );
    assert_eq!(c.resize(1000), Err(UsageError::Misaligned { minimum: 512 }));
    assert!(c.read(0, 512, CommandFlags::DF | CommandFlags::FUA).is_ok());
    assert!(c.flush().is_ok());
    assert_eq!(c.flush(), Err(UsageError::Full));
    pair.run();

    let mut pair = connect("plain", Config::new(""));
    let c = &mut pair.client;
    for (result, command) in [
        (c.flush(), Command::Flush),
        (c.trim(0, 512, false), Command::Trim),
        (c.cache(0, 512), Command::Cache),
        (c.write_zeroes(0, 512, none), Command::WriteZeroes),
        (c.resize(4096), Command::Resize),
        (c.block_status(0, 512, false), Command::BlockStatus),
    ] {
        assert_eq!(result, Err(UsageError::NotAdvertised(command)));
    }
    assert_eq!(
        c.write(0, 512, true),
        Err(UsageError::FlagNotAdvertised(CommandFlags::FUA))
    );
    assert!(c.write(0, 512, false).is_ok());

    let mut pair = connect("ro", Config::new(""));
    let c = &mut pair.client;
    assert!(c.is_read_only());
    assert_eq!(c.write(0, 512, false), Err(UsageError::ReadOnly));
    assert_eq!(
        c.trim(0, 512, false),
        Err(UsageError::NotAdvertised(Command::Trim))
    );
    assert!(c.read(0, 512, none).is_ok());
    assert!(c.flush().is_ok());

    // DF needs structured replies.
    let mut pair = connect("aligned", Config::new("").simple());
    assert_eq!(
        pair.client.read(0, 512, CommandFlags::DF),
        Err(UsageError::FlagNotAdvertised(CommandFlags::DF))
    );

    // A final partial block may be addressed.
    let mut pair = connect("odd", Config::new(""));
    let r = pair.client.read(512, 488, none).expect("tail read");
    assert_eq!(
        pair.client.read(0, 488, none),
        Err(UsageError::Misaligned { minimum: 512 })
    );
    pair.run();
    assert_eq!(pair.result(r), Some(Ok(())));

    // Compact headers carry 32-bit lengths.
    let mut pair = connect("aligned", Config::new("").simple());
    assert_eq!(
        pair.client.trim(0, 1 << 32, false),
        Err(UsageError::OutOfRange)
    );
}

#[test]
fn disconnect_waits_for_requests_in_flight() {
    let mut pair: Pair<16, 4096> = ready(Config::new("disk"));
    pair.hold = true;
    let r = pair
        .client
        .read(0, 4096, CommandFlags::empty())
        .expect("read");
    pair.run();
    pair.client.disconnect().expect("disconnect");
    assert_eq!(pair.client.flush(), Err(UsageError::Closing));
    pair.run();
    // NBD_CMD_DISC not sent yet: the server still waits for requests.
    assert!(!pair.server_closed);
    pair.complete_held(0);
    pair.run();
    assert_eq!(pair.result(r), Some(Ok(())));
    assert_eq!(pair.events.last(), Some(&Ev::Closed));
    assert!(pair.client.is_closed() && pair.server_closed);
    assert_eq!(pair.eof, Some(Ok(())));
}

#[test]
fn shutdown_stops_a_client_as_it_stops_a_server() {
    // In transmission: the graceful disconnect, after the reply due.
    let mut pair: Pair<16, 4096> = ready(Config::new("disk"));
    pair.hold = true;
    let r = pair
        .client
        .read(0, 4096, CommandFlags::empty())
        .expect("read");
    pair.run();
    pair.client.shutdown();
    assert_eq!(pair.client.flush(), Err(UsageError::Closing));
    pair.complete_held(0);
    pair.run();
    assert_eq!(pair.result(r), Some(Ok(())));
    assert_eq!(pair.events.last(), Some(&Ev::Closed));
    assert_eq!(pair.eof, Some(Ok(())));
    // Once over, a second call changes nothing.
    pair.client.shutdown();
    assert!(pair.client.is_closed());
    // During negotiation: NBD_OPT_ABORT.
    let mut pair: Pair<16, 4096> = Pair::standard(Config::new("disk"));
    pair.client.shutdown();
    pair.run();
    assert_eq!(pair.take_events(), vec![Ev::Greeted(3), Ev::Closed]);
    assert!(pair.server_closed);
}

#[test]
fn abort_sends_disc_at_once_and_still_takes_replies() {
    let mut pair: Pair<16, 4096> = ready(Config::new("disk"));
    pair.hold = true;
    let r = pair
        .client
        .read(0, 4096, CommandFlags::empty())
        .expect("read");
    pair.client.abort().expect("abort");
    pair.run();
    assert_eq!(pair.held.len(), 1);
    assert!(!pair.client.is_closed());
    pair.complete_held(0);
    pair.run();
    assert_eq!(pair.result(r), Some(Ok(())));
    assert_eq!(pair.events.last(), Some(&Ev::Closed));
    assert_eq!(pair.eof, Some(Ok(())));
}

#[test]
fn abort_during_negotiation_sends_nbd_opt_abort() {
    let mut pair: Pair<16, 4096> = Pair::standard(Config::new("disk"));
    pair.client.abort().expect("abort");
    pair.run();
    assert_eq!(pair.take_events(), vec![Ev::Greeted(3), Ev::Closed]);
    assert_eq!(pair.eof, Some(Ok(())));
    assert!(pair.server_closed);
}

#[test]
fn eshutdown_makes_the_client_disconnect() {
    let mut pair: Pair<16, 4096> = ready(Config::new("disk"));
    pair.hold = true;
    let first = pair
        .client
        .read(0, 512, CommandFlags::empty())
        .expect("read");
    pair.run();
    pair.server.shutdown();
    let second = pair
        .client
        .read(512, 512, CommandFlags::empty())
        .expect("read");
    pair.run();
    assert_eq!(pair.result(second), Some(Err(ErrorCode::Shutdown)));
    assert_eq!(pair.client.flush(), Err(UsageError::Closing));
    pair.complete_held(0);
    pair.run();
    assert_eq!(pair.result(first), Some(Ok(())));
    assert!(pair.client.is_closed());
    assert_eq!(pair.eof, Some(Ok(())));
}
