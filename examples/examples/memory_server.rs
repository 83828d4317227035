//! The smallest real NBD server on the core: one thread per client, a RAM
//! disk shared by all, storage requests completed synchronously.
//!
//! ```text
//! cargo run -p nbd-examples --example memory_server -- [PORT] [SIZE_MIB]
//! nbdinfo nbd://127.0.0.1:10809/
//! ```
//!
//! It shows the whole driving loop a shell needs: feed input to `process`,
//! act on events, answer requests, send what `poll_transmit` returns.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use nbd_core::export::{Capabilities, Export};
use nbd_core::server::{Config, Event, Payload, ReadOutcome, Request, StdConnection};
use nbd_core::wire::{AllocationFlags, ErrorCode, ExtDescriptor};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(10809);
    let size_mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let disk = Arc::new(Mutex::new(vec![0u8; (size_mib << 20) as usize]));
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    eprintln!("serving {size_mib} MiB on 127.0.0.1:{port}");
    for stream in listener.incoming() {
        let stream = stream?;
        let disk = Arc::clone(&disk);
        std::thread::spawn(move || {
            if let Err(error) = serve(stream, &disk) {
                eprintln!("connection ended: {error}");
            }
        });
    }
    Ok(())
}

fn serve(mut stream: TcpStream, disk: &Mutex<Vec<u8>>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let size = disk
        .lock()
        .map_err(|_| std::io::Error::other("poisoned"))?
        .len() as u64;
    let exports = [Export::new("memory", size)
        .with_description("RAM disk of the memory_server example")
        .with_capabilities(Capabilities {
            resize: false,
            rotational: false,
            ..Capabilities::ALL
        })];
    let mut conn = StdConnection::new(&exports[..], Config::default());
    let mut input = vec![0u8; 1 << 20];
    let (mut start, mut end) = (0usize, 0usize);
    let mut output = Vec::new();
    let mut reads: HashMap<u32, Vec<u8>> = HashMap::new();
    loop {
        loop {
            let step = conn
                .process(&input[start..end])
                .map_err(std::io::Error::other)?;
            start += step.consumed;
            let Some(event) = step.event else { break };
            let mut disk = disk.lock().map_err(|_| std::io::Error::other("poisoned"))?;
            match event {
                Event::Request(request) => answer(&mut conn, &mut disk, &mut reads, request),
                Event::WriteData {
                    id,
                    offset,
                    data,
                    remaining,
                } => {
                    disk[offset as usize..offset as usize + data.len()].copy_from_slice(data);
                    if remaining == 0 {
                        conn.complete(id, Ok(())).map_err(std::io::Error::other)?;
                    }
                }
                Event::Closed(_) => {
                    drop(disk);
                    flush(&mut conn, &mut reads, &mut output);
                    return stream.write_all(&output);
                }
                _ => {}
            }
        }
        flush(&mut conn, &mut reads, &mut output);
        stream.write_all(&output)?;
        output.clear();
        if start == end {
            (start, end) = (0, 0);
        } else if end == input.len() {
            input.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        let n = stream.read(&mut input[end..])?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}

fn answer(
    conn: &mut StdConnection<&[Export<'_>]>,
    disk: &mut [u8],
    reads: &mut HashMap<u32, Vec<u8>>,
    request: Request,
) {
    let range = |offset: u64, length: u64| offset as usize..(offset + length) as usize;
    let result = match request {
        Request::Read { id, offset, length } => {
            reads.insert(id.to_bits(), disk[range(offset, length)].to_vec());
            conn.complete_read(id, ReadOutcome::Data)
        }
        Request::Write { .. } => return,
        Request::Trim {
            id, offset, length, ..
        }
        | Request::WriteZeroes {
            id, offset, length, ..
        } => {
            disk[range(offset, length)].fill(0);
            conn.complete(id, Ok(()))
        }
        Request::Flush { id } | Request::Cache { id, .. } => conn.complete(id, Ok(())),
        Request::BlockStatus {
            id, offset, length, ..
        } => {
            let zero = disk[range(offset, length)].iter().all(|&b| b == 0);
            let status = if zero {
                AllocationFlags::ZERO.bits()
            } else {
                0
            };
            conn.complete_block_status(
                id,
                &[ExtDescriptor {
                    length,
                    status: u64::from(status),
                }],
            )
        }
        Request::Resize { id, .. } => conn.complete(id, Err(ErrorCode::NotSupported)),
        _ => return,
    };
    if let Err(error) = result {
        eprintln!("completion refused: {error}");
    }
}

fn flush(
    conn: &mut StdConnection<&[Export<'_>]>,
    reads: &mut HashMap<u32, Vec<u8>>,
    output: &mut Vec<u8>,
) {
    while let Some(transmit) = conn.poll_transmit() {
        for part in transmit.parts {
            output.extend_from_slice(part);
        }
        match transmit.payload {
            Some(Payload::Data { id, .. }) => {
                output.extend(reads.remove(&id.to_bits()).unwrap_or_default())
            }
            Some(Payload::Zeroes { length }) => output.resize(output.len() + length as usize, 0),
            None => {}
        }
    }
}
