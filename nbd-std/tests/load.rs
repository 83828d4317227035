//! Load: [`CLIENTS`] clients, each on its own connection, hammer one export
//! of `nbd-std serve` at once with random writes and reads for a bounded
//! time. Each client owns a disjoint region of [`REGION`] bytes and keeps a
//! model of it: every read is compared with the model, and at the end the
//! whole region is read back and compared. The test fails on any error,
//! any mismatch, or a client that made no progress, and prints throughput
//! (MiB/s and operations/s over all clients) and the server's peak
//! resident memory (`VmHWM` from `/proc/PID/status`). Run with
//! `--nocapture` to see the figures.
//!
//! Both a memory export and a file export (with an occasional flush) are
//! loaded, one after the other. `NBD_LOAD_SECONDS` sets the time per export
//! (default [`DEFAULT_SECONDS`]); build with `--release` for figures that
//! mean something (a debug build measures the debug build).

mod common;

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::{Random, Server, env_u64, proc_status_kib, runtime, temp_dir};
use nbd_std::client::Client;

const CLIENTS: usize = 200;
/// Bytes each client owns.
const REGION: u64 = 256 * 1024;
const SECTOR: u64 = 512;
/// Largest request, in sectors (32 KiB).
const MAX_REQUEST_SECTORS: u64 = 64;
/// Seconds of load per export in CI (overridden by `NBD_LOAD_SECONDS`).
const DEFAULT_SECONDS: u64 = 10;
/// A client must finish at least this many requests: proof that nobody
/// was starved.
const MIN_OPS_PER_CLIENT: u64 = 10;
/// How long the final read-back and disconnects may take.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);

/// The two tests run one at a time, so each one's figures are its own.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What one client did.
#[derive(Debug, Default)]
struct Stats {
    reads: u64,
    writes: u64,
    flushes: u64,
    bytes_read: u64,
    bytes_written: u64,
    errors: u64,
    mismatches: u64,
    /// The first error or mismatch, for the failure message.
    first_problem: Option<String>,
}

impl Stats {
    fn ops(&self) -> u64 {
        self.reads + self.writes + self.flushes
    }

    fn problem(&mut self, text: String) {
        if self.first_problem.is_none() {
            self.first_problem = Some(text);
        }
    }
}

/// First differing offset of two equal-length slices.
fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0)
}

/// One client: random verified reads and writes in its own region until
/// `deadline`, then a read-back of the whole region.
async fn client_run(uri: String, index: usize, deadline: Instant, flushes: bool) -> Stats {
    let mut stats = Stats::default();
    let client = match Client::connect(&uri).await {
        Ok(client) => client,
        Err(error) => {
            stats.errors += 1;
            stats.problem(format!("client {index}: connect: {error}"));
            return stats;
        }
    };
    let base = index as u64 * REGION;
    // The exports start zeroed (fresh memory, sparse file).
    let mut model = vec![0u8; REGION as usize];
    let mut random = Random::new(index as u64 + 1);
    let mut buf = Vec::with_capacity((MAX_REQUEST_SECTORS * SECTOR) as usize);
    while Instant::now() < deadline {
        let choice = random.next_u64() % 100;
        if flushes && choice == 0 {
            match client.flush().await {
                Ok(()) => stats.flushes += 1,
                Err(error) => {
                    stats.errors += 1;
                    stats.problem(format!("client {index}: flush: {error}"));
                    break;
                }
            }
            continue;
        }
        let sectors = 1 + random.next_u64() % MAX_REQUEST_SECTORS;
        let first = random.next_u64() % (REGION / SECTOR - sectors + 1);
        let (at, len) = ((first * SECTOR) as usize, (sectors * SECTOR) as usize);
        let offset = base + at as u64;
        buf.clear();
        buf.resize(len, 0);
        if choice < 50 {
            random.fill(&mut buf);
            match client.write_owned(std::mem::take(&mut buf), offset).await {
                Ok(back) => {
                    model[at..at + len].copy_from_slice(&back);
                    buf = back;
                    stats.writes += 1;
                    stats.bytes_written += len as u64;
                }
                Err(error) => {
                    stats.errors += 1;
                    stats.problem(format!("client {index}: write {len} at {offset}: {error}"));
                    break;
                }
            }
        } else {
            match client.read_owned(std::mem::take(&mut buf), offset).await {
                Ok(back) => {
                    stats.reads += 1;
                    stats.bytes_read += len as u64;
                    if back != model[at..at + len] {
                        stats.mismatches += 1;
                        let diff = first_difference(&back, &model[at..at + len]);
                        stats.problem(format!(
                            "client {index}: read {len} at {offset}: differs from what it wrote at offset {}",
                            offset + diff as u64
                        ));
                    }
                    buf = back;
                }
                Err(error) => {
                    stats.errors += 1;
                    stats.problem(format!("client {index}: read {len} at {offset}: {error}"));
                    break;
                }
            }
        }
    }
    if stats.errors == 0 {
        let mut whole = vec![0u8; REGION as usize];
        match client.read_at(&mut whole, base).await {
            Ok(()) if whole == model => {}
            Ok(()) => {
                stats.mismatches += 1;
                let diff = first_difference(&whole, &model);
                stats.problem(format!(
                    "client {index}: final read-back differs at offset {}",
                    base + diff as u64
                ));
            }
            Err(error) => {
                stats.errors += 1;
                stats.problem(format!("client {index}: final read-back: {error}"));
            }
        }
    }
    if let Err(error) = client.disconnect().await {
        stats.errors += 1;
        stats.problem(format!("client {index}: disconnect: {error}"));
    }
    stats
}

/// Runs the load against the export `name` of `server` and checks it.
fn run_load(server: &mut Server, name: &str, what: &str, flushes: bool) {
    let seconds = env_u64("NBD_LOAD_SECONDS", DEFAULT_SECONDS);
    let rt = runtime();
    let uri = server.uri_for(name);
    let idle_kib = proc_status_kib(server.pid(), "VmRSS");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let results: Vec<Stats> = rt.block_on(async {
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|i| tokio::spawn(client_run(uri.clone(), i, deadline, flushes)))
            .collect();
        let mut results = Vec::with_capacity(CLIENTS);
        for task in tasks {
            let left = (deadline + FINISH_TIMEOUT).saturating_duration_since(Instant::now());
            let stats = tokio::time::timeout(left, task)
                .await
                .expect("a client did not finish in time")
                .expect("client task");
            results.push(stats);
        }
        results
    });
    let elapsed = started.elapsed().as_secs_f64();
    server.assert_running();
    let peak_kib = proc_status_kib(server.pid(), "VmHWM");
    let rss_kib = proc_status_kib(server.pid(), "VmRSS");

    let total = |f: fn(&Stats) -> u64| results.iter().map(f).sum::<u64>();
    let ops = total(Stats::ops);
    let bytes = total(|s| s.bytes_read + s.bytes_written);
    let errors = total(|s| s.errors);
    let mismatches = total(|s| s.mismatches);
    let min_ops = results.iter().map(Stats::ops).min().unwrap_or(0);
    let max_ops = results.iter().map(Stats::ops).max().unwrap_or(0);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "load ({what}): {CLIENTS} clients, {elapsed:.1} s: {ops} requests ({:.0}/s: {} reads, {} writes, {} flushes), {:.1} MiB read + {:.1} MiB written = {:.1} MiB/s; \
         requests per client min {min_ops} max {max_ops}; {errors} errors, {mismatches} mismatches; \
         server memory: peak (VmHWM) {:.1} MiB, now (VmRSS) {:.1} MiB, before the load {:.1} MiB",
        ops as f64 / elapsed,
        total(|s| s.reads),
        total(|s| s.writes),
        total(|s| s.flushes),
        mib(total(|s| s.bytes_read)),
        mib(total(|s| s.bytes_written)),
        mib(bytes) / elapsed,
        peak_kib as f64 / 1024.0,
        rss_kib as f64 / 1024.0,
        idle_kib as f64 / 1024.0,
    );
    let problems: Vec<&str> = results
        .iter()
        .filter_map(|s| s.first_problem.as_deref())
        .take(10)
        .collect();
    assert!(
        errors == 0 && mismatches == 0,
        "{errors} errors and {mismatches} mismatches; first ones:\n{}",
        problems.join("\n")
    );
    assert!(
        min_ops >= MIN_OPS_PER_CLIENT,
        "a client finished only {min_ops} requests in {seconds} s (at least {MIN_OPS_PER_CLIENT} expected)"
    );
    server.stop();
}

#[test]
fn two_hundred_clients_on_a_memory_export() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let size = CLIENTS as u64 * REGION;
    let export = format!("load=memory:{size}");
    let mut server = Server::start(["--export", export.as_str()]);
    run_load(&mut server, "load", "memory export", false);
}

#[test]
fn two_hundred_clients_on_a_file_export() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = temp_dir();
    let path = dir.path().join("load.img");
    common::create_sparse_file(&path, CLIENTS as u64 * REGION);
    let export = format!("load=file:{}", path.display());
    let mut server = Server::start(["--export", export.as_str()]);
    run_load(&mut server, "load", "file export, 1% flushes", true);
}
