//! `nbd_embedded::io::serve` over loopback TCP against an in-memory card,
//! with a hand-written client.

#![allow(clippy::unwrap_used)]

mod common;
mod wire;

use std::sync::atomic::Ordering;

use common::{MemCard, pattern_byte, spawn_server};
use nbd_core::server::CloseReason;
use wire::{CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, Client, FLAG_FUA, FLAG_SEND_TRIM};

const BLOCKS: usize = 16 * 1024; // 8 MiB

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(pattern_byte).collect()
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn unaligned_reads_and_writes_across_block_boundaries() {
    for structured in [false, true] {
        for buffer in [1, 7, 100, 512, 4096] {
            let card = MemCard::new(BLOCKS);
            let (port, server) = spawn_server(card.clone(), buffer, 1);
            let mut client = Client::connect(port, structured);
            assert_eq!(client.size, (BLOCKS * 512) as u64);
            for (offset, len) in [
                (0u64, 1u32),
                (511, 2),
                (1000, 3000),
                (4096, 512),
                (5, 70_000),
            ] {
                let reply = client.read(offset, len);
                assert_eq!(reply.error, 0);
                assert_eq!(reply.data, expected(offset, len as usize), "{offset}+{len}");
            }
            let mut model = card.bytes(0, 200_000);
            for (i, (offset, len)) in [
                (3u64, 10usize),
                (510, 4),
                (1023, 1026),
                (7000, 20_000),
                (65_536, 512),
            ]
            .into_iter()
            .enumerate()
            {
                let bytes = data(i as u8, len);
                assert_eq!(client.write(offset, &bytes, 0), 0);
                model[offset as usize..][..len].copy_from_slice(&bytes);
                let reply = client.read(offset.saturating_sub(7), len as u32 + 14);
                assert_eq!(
                    reply.data,
                    model[offset.saturating_sub(7) as usize..][..len + 14]
                );
            }
            assert_eq!(
                card.bytes(0, 200_000),
                model,
                "card contents, buffer {buffer}"
            );
            client.disconnect();
            let outcomes = server.join().unwrap();
            assert_eq!(outcomes, [Ok(Some(CloseReason::Disconnect))]);
        }
    }
}

#[test]
fn multi_mib_requests_stream_through_a_small_buffer() {
    let card = MemCard::new(BLOCKS);
    let (port, server) = spawn_server(card.clone(), 64, 1);
    let mut client = Client::connect(port, true);
    let len = 5 * 1024 * 1024 + 123;
    let bytes = data(9, len);
    assert_eq!(client.write(1001, &bytes, FLAG_FUA), 0);
    assert_eq!(card.bytes(1001, len), bytes);
    let reply = client.read(1001, len as u32);
    assert_eq!(reply.data, bytes);
    // 32 MiB, the largest request, on a simple-reply connection is covered
    // by the size of the card here: read it all.
    let reply = client.read(0, (BLOCKS * 512) as u32);
    assert_eq!(reply.data.len(), BLOCKS * 512);
    assert_eq!(&reply.data[1001..1001 + len], &bytes[..]);
    client.disconnect();
    assert_eq!(server.join().unwrap(), [Ok(Some(CloseReason::Disconnect))]);
}

#[test]
fn flush_write_zeroes_and_pipelined_requests() {
    let card = MemCard::new(BLOCKS);
    let (port, server) = spawn_server(card.clone(), 256, 1);
    let mut client = Client::connect(port, false);
    // Several requests in flight before any reply is read.
    let a = client.send(wire::CMD_WRITE, 0, 100, 1000, &data(1, 1000));
    let b = client.send(CMD_WRITE_ZEROES, 0, 600, 2000, &[]);
    let c = client.send(CMD_FLUSH, 0, 0, 0, &[]);
    for handle in [a, b, c] {
        assert_eq!(client.receive(handle, 0).error, 0);
    }
    let mut model = expected(0, 4096);
    model[100..1100].copy_from_slice(&data(1, 1000));
    model[600..2600].fill(0);
    assert_eq!(card.bytes(0, 4096), model);
    assert_eq!(client.read(0, 4096).data, model);
    client.disconnect();
    assert_eq!(server.join().unwrap(), [Ok(Some(CloseReason::Disconnect))]);
}

#[test]
fn card_errors() {
    // Structured replies: the read is padded and the error carries its offset.
    let card = MemCard::new(BLOCKS);
    card.fail_read.store(10, Ordering::SeqCst);
    let (port, server) = spawn_server(card.clone(), 512, 2);
    let mut client = Client::connect(port, true);
    let reply = client.read(4000, 2000);
    assert_eq!(reply.error, 5, "EIO");
    assert_eq!(reply.error_offset, Some(5120));
    // A read before the bad block still works, and so does the connection.
    assert_eq!(client.read(0, 5000).data, expected(0, 5000));
    // A write that needs the bad block (read-modify-write) fails with EIO.
    assert_eq!(client.write(5121, &[1, 2, 3], 0), 5);
    card.fail_read.store(u32::MAX, Ordering::SeqCst);
    card.fail_write.store(20, Ordering::SeqCst);
    assert_eq!(client.write(20 * 512 - 100, &data(3, 1000), 0), 5);
    card.fail_write.store(u32::MAX, Ordering::SeqCst);
    assert_eq!(client.write(20 * 512 - 100, &data(3, 1000), 0), 0);
    assert_eq!(client.read(20 * 512 - 100, 1000).data, data(3, 1000));
    client.disconnect();

    // Simple replies: the header promised data, so the connection closes.
    card.fail_read.store(10, Ordering::SeqCst);
    let mut client = Client::connect(port, false);
    let handle = client.send(wire::CMD_READ, 0, 4000, 2000, &[]);
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut client.stream, &mut rest);
    assert!(
        rest.len() < 16 + 2000,
        "got {} bytes for handle {handle}",
        rest.len()
    );
    let outcomes = server.join().unwrap();
    assert_eq!(outcomes[0], Ok(Some(CloseReason::Disconnect)));
    assert!(
        outcomes[1].as_ref().is_err_and(|e| e.contains("storage")),
        "{outcomes:?}"
    );
}

#[test]
fn scratch_block_keeps_card_traffic_low() {
    let card = MemCard::new(BLOCKS);
    let (port, server) = spawn_server(card.clone(), 100, 1);
    let mut client = Client::connect(port, false);
    let (reads, writes) = (
        card.reads.load(Ordering::SeqCst),
        card.writes.load(Ordering::SeqCst),
    );
    // Blocks 1..=3, unaligned at both ends, arriving in 100-byte pieces:
    // two edge reads, three block writes.
    assert_eq!(client.write(600, &data(4, 1200), 0), 0);
    assert_eq!(card.reads.load(Ordering::SeqCst) - reads, 2);
    assert_eq!(card.writes.load(Ordering::SeqCst) - writes, 3);
    client.disconnect();
    server.join().unwrap();
}

#[test]
fn client_gone_mid_write_leaves_the_card_alone() {
    let card = MemCard::new(BLOCKS);
    let (port, server) = spawn_server(card.clone(), 64, 2);
    let mut client = Client::connect(port, false);
    // A 2000-byte write at 1000, cut off after 700 bytes of payload: the
    // block holding bytes 1024..1536 was half filled in the scratch.
    let mut header = Vec::new();
    header.extend(0x2560_9513u32.to_be_bytes());
    header.extend(0u16.to_be_bytes());
    header.extend(wire::CMD_WRITE.to_be_bytes());
    header.extend(1u64.to_be_bytes());
    header.extend(1000u64.to_be_bytes());
    header.extend(2000u32.to_be_bytes());
    header.extend(vec![0xee; 700]);
    std::io::Write::write_all(&mut client.stream, &header).unwrap();
    drop(client);
    // The next client works. The blocks completed before the cut were
    // written (1000..1536: the end of block 1 and all of block 2); the
    // half-filled block 3 (1536..1700) was dropped, not written.
    let mut client = Client::connect(port, false);
    assert_eq!(client.read(0, 100).data, expected(0, 100));
    client.disconnect();
    let outcomes = server.join().unwrap();
    assert_eq!(outcomes[0], Ok(None));
    let mut model = expected(0, 4096);
    model[1000..1536].fill(0xee);
    assert!(card.bytes(0, 4096) == model, "card contents");
}

#[test]
fn trim_erases_whole_blocks_only_on_a_card_that_can() {
    // A card that cannot erase: TRIM is not advertised.
    let card = MemCard::new(BLOCKS);
    let (port, server) = spawn_server(card.clone(), 512, 1);
    let client = Client::connect(port, false);
    assert_eq!(
        client.flags & FLAG_SEND_TRIM,
        0,
        "flags {:#x}",
        client.flags
    );
    client.disconnect();
    server.join().unwrap();

    let card = MemCard::new(BLOCKS);
    card.erasable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (port, server) = spawn_server(card.clone(), 512, 1);
    let mut client = Client::connect(port, false);
    assert_ne!(
        client.flags & FLAG_SEND_TRIM,
        0,
        "flags {:#x}",
        client.flags
    );
    // Bytes 1000..4000: blocks 2 to 6 are inside, 1 and 7 only in part.
    let before = card.bytes(0, 8192);
    // Block 3 passes through the scratch block first.
    assert_eq!(client.read(1536, 512).data, before[1536..2048]);
    assert_eq!(client.command(CMD_TRIM, 1000, 3000), 0);
    assert_eq!(*card.erases.lock().unwrap(), [(2, 5)]);
    let mut model = before;
    model[1024..3584].fill(0xFF);
    assert_eq!(card.bytes(0, 8192), model, "only whole blocks erased");
    // Inside one block: nothing to erase, still a success.
    assert_eq!(client.command(CMD_TRIM, 5000, 100), 0);
    // Past the end: refused.
    assert_ne!(
        client.command(CMD_TRIM, (BLOCKS * 512) as u64 - 512, 1024),
        0
    );
    assert_eq!(card.erases.lock().unwrap().len(), 1);
    // Write-zeroes writes zeroes, it does not erase.
    assert_eq!(client.command(CMD_WRITE_ZEROES, 1024, 1024), 0);
    assert_eq!(card.erases.lock().unwrap().len(), 1);
    assert_eq!(card.bytes(1024, 1024), vec![0; 1024]);
    // What the scratch block held before the erase is not served after it.
    assert_eq!(client.read(0, 8192).data, card.bytes(0, 8192));
    client.disconnect();
    assert_eq!(server.join().unwrap(), [Ok(Some(CloseReason::Disconnect))]);
}
