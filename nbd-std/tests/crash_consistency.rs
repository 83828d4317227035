//! Crash consistency of the file backend: `nbd-std serve` is killed with
//! SIGKILL in the middle of a random write workload, restarted on the same
//! file, and the file must satisfy the durability contract of the NBD
//! protocol (`NBD_CMD_FLUSH`, `NBD_CMD_FLAG_FUA`).
//!
//! # What is tested, honestly
//!
//! SIGKILL ends the server process, not the machine: data the server handed
//! to the kernel (`pwrite`) stays in the page cache and reaches the file
//! whether or not anybody called `fdatasync`. So this test cannot catch a
//! server that forgets `fdatasync`; it catches a server that *acknowledges
//! too early*: a write replied to before its `pwrite` returned, a FUA write
//! or a flush replied to before the writes they cover were in the file, a
//! restart that loses or damages what was there. It is not a power-loss
//! test. The second test, [`flush_and_fua_replies_wait_for_fdatasync`],
//! covers the other half under `strace`: it delays `fdatasync` in the
//! running server and checks that FLUSH and FUA replies wait for it, then
//! makes `fdatasync` fail and checks that the client gets `EIO` for exactly
//! those requests.
//!
//! # The workload
//!
//! Per round: start the server on the file (one export, CAN_MULTI_CONN),
//! open [`CLIENTS`] clients of [`CONNECTIONS`] connections each, and let
//! [`WORKERS`] tasks issue writes of 1 to [`MAX_WRITE_SECTORS`] sectors at
//! random sector-aligned offsets, some with FUA, and flushes, so that
//! several requests are in flight on every connection. After a random delay
//! (up to [`MAX_KILL_DELAY`]) the test sends SIGKILL, waits for the
//! workers to see their requests fail, restarts the server on the same file
//! and reads the whole export back through it. The content read is the
//! starting point of the next round.
//!
//! # The model
//!
//! A logical clock ticks at every event the client sees: a request is
//! stamped `issued` just before it is handed to the client library, a reply
//! `acked` just after it arrives. Each write fills sector `s` with bytes
//! derived only from (write tag, `s`), so every sector of the file can be
//! attributed to exactly one write (or to the round's starting content).
//!
//! - A write is **durable** when its reply was received (success) and it
//!   had FUA, or a flush was *issued after* the write's reply arrived and
//!   that flush's reply arrived (success). A flush issued before the reply
//!   need not cover the write: the spec's flush covers the writes the server
//!   completed before it processed the flush. With several connections
//!   this relies on CAN_MULTI_CONN (asserted): a flush on any connection
//!   covers writes completed on all of them.
//! - Write `W` **certainly precedes** write `D` when `W` was acked before
//!   `D` was issued (the server replied to `W` before it could have seen
//!   `D`). Nothing else is ordered: requests in flight together may execute
//!   in any order.
//! - For a sector `s`, let `max_d` be the latest `issued` of the durable
//!   writes covering `s` (or 0 when none: the starting content counts as a
//!   durable write at time 0). The sector may hold the data of any write
//!   covering `s` that was *not* acked before `max_d` (everything else
//!   certainly precedes a durable write that is on disk), and the starting
//!   content when no durable write covers `s`. Writes never acked (in
//!   flight at the kill, or never sent) have `acked = ∞`: they may be there
//!   or not.
//! - Torn writes: a write in flight at the kill may have landed partly. The
//!   check is per 512-byte sector, so any mix of whole sectors from
//!   different candidates is accepted. Finer tearing cannot happen here:
//!   the kernel copies a `pwrite` into the page cache page by page (4 KiB,
//!   aligned, so whole sectors) and a fatal signal stops it only between
//!   pages. A sector matching no candidate (a mix within a sector, or data
//!   from nowhere) fails the test.
//!
//! The check runs twice: with the contract's durable set (FUA and flushed
//! writes; a failure is a durability bug), and with every acked write
//! counted durable, which is what SIGKILL with an intact page cache must
//! give this server (it replies only after `pwrite` returns; a failure
//! means a write was acknowledged before it reached the file).
//!
//! Rounds: [`DEFAULT_ROUNDS`] (bounded for CI), or `NBD_CRASH_ROUNDS=N`.
//! Each round's seed is printed; `NBD_CRASH_SEED=S` changes the base seed.
//!
//! # The same against an S3 export
//!
//! [`sigkill_s3_export_loses_no_acknowledged_flush_or_fua_write`] runs the
//! workload against an `s3://` export on a SeaweedFS the test starts. There
//! SIGKILL loses the write-back cache (nothing like a page cache survives
//! it), so only the contract model is checked: acknowledged FLUSH and FUA
//! writes must come back from the store after the restart. Rounds:
//! [`DEFAULT_S3_ROUNDS`], or `NBD_S3_CRASH_ROUNDS=N`.

mod common;

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::seaweed::{BUCKET, Seaweed};
use common::{
    Random, Server, env_u64, find_tool, missing, runtime, signal_child_and_wait, stop_child,
    temp_dir, wait_until,
};
use nbd_core::wire::ErrorCode;
use nbd_std::client::{Client, Error};

const SECTOR: u64 = 512;
/// Export size: small, so writes overlap often.
const DISK: u64 = 4 << 20;
const SECTORS: u64 = DISK / SECTOR;
/// Largest write, in sectors (64 KiB).
const MAX_WRITE_SECTORS: u64 = 128;
/// Clients per round, each with `CONNECTIONS` connections.
const CLIENTS: usize = 2;
const CONNECTIONS: usize = 2;
/// Tasks issuing requests; each has one request in flight at a time, so up
/// to `WORKERS` are in flight across the connections.
const WORKERS: usize = 12;
/// The kill comes after a delay drawn from `MIN_KILL_DELAY..MAX_KILL_DELAY`.
const MIN_KILL_DELAY: Duration = Duration::from_millis(5);
const MAX_KILL_DELAY: Duration = Duration::from_millis(400);
/// Rounds in CI (overridden by `NBD_CRASH_ROUNDS`).
const DEFAULT_ROUNDS: u64 = 30;
/// Rounds against the S3 export in CI (overridden by `NBD_S3_CRASH_ROUNDS`).
const DEFAULT_S3_ROUNDS: u64 = 30;
/// How long the store is given to finish the killed server's requests
/// before the next server opens the S3 export.
const STORE_SETTLE_AFTER_KILL: Duration = Duration::from_secs(1);
/// How long the workers may take to notice the dead server.
const WIND_DOWN: Duration = Duration::from_secs(20);
/// "Never acked".
const NEVER: u64 = u64::MAX;

/// The bytes write `tag` puts in sector `sector`: depend on both only, so
/// a sector identifies its write even when the write landed in part.
fn sector_data(tag: u64, sector: u64, out: &mut [u8]) {
    Random::new(tag.rotate_left(20) ^ sector.wrapping_mul(0x9E37_79B9_7F4A_7C15)).fill(out);
}

/// One write request as the client saw it.
#[derive(Clone, Copy, Debug)]
struct WriteRecord {
    tag: u64,
    first_sector: u64,
    sectors: u64,
    fua: bool,
    issued: u64,
    /// `NEVER` until a successful reply arrived.
    acked: u64,
}

/// Everything the workers saw in one round.
#[derive(Debug, Default)]
struct Log {
    writes: Vec<WriteRecord>,
    /// `issued` of each flush whose reply (success) arrived.
    flushes_done: Vec<u64>,
    flushes_issued: u64,
    /// Failures seen before the kill was sent: each one is a server bug.
    early_errors: Vec<String>,
}

/// State shared by the workers and the killer.
struct Shared {
    clock: AtomicU64,
    /// Clock value taken just before SIGKILL was sent (`NEVER` before).
    killed_at: AtomicU64,
    stop: AtomicBool,
    log: Mutex<Log>,
}

impl Shared {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a failed request: expected once the kill was sent, a bug
    /// before.
    fn failed(&self, what: String, error: &Error) {
        let now = self.tick();
        if now < self.killed_at.load(Ordering::SeqCst) {
            self.log().early_errors.push(format!("{what}: {error}"));
        }
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Issues random writes and flushes until a request fails or `stop`.
async fn worker(client: Client, shared: Arc<Shared>, seed: u64, tag_base: u64) {
    let mut random = Random::new(seed);
    let mut serial = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let choice = random.next_u64() % 100;
        if choice < 8 {
            let issued = {
                let mut log = shared.log();
                log.flushes_issued += 1;
                shared.tick()
            };
            match client.flush().await {
                Ok(()) => shared.log().flushes_done.push(issued),
                Err(error) => {
                    shared.failed("flush".to_owned(), &error);
                    return;
                }
            }
            continue;
        }
        let fua = choice < 28;
        let sectors = 1 + random.next_u64() % MAX_WRITE_SECTORS;
        let first_sector = random.next_u64() % (SECTORS - sectors + 1);
        let tag = tag_base + serial;
        serial += 1;
        let mut data = vec![0u8; (sectors * SECTOR) as usize];
        for (i, chunk) in data.chunks_exact_mut(SECTOR as usize).enumerate() {
            sector_data(tag, first_sector + i as u64, chunk);
        }
        // Stamped under the lock: the log is in `issued` order.
        let index = {
            let mut log = shared.log();
            let issued = shared.tick();
            log.writes.push(WriteRecord {
                tag,
                first_sector,
                sectors,
                fua,
                issued,
                acked: NEVER,
            });
            log.writes.len() - 1
        };
        let offset = first_sector * SECTOR;
        let result = if fua {
            client.write_fua(data, offset).await
        } else {
            client.write_owned(data, offset).await
        };
        match result {
            Ok(_) => {
                let acked = shared.tick();
                shared.log().writes[index].acked = acked;
            }
            Err(error) => {
                let what = format!(
                    "write{} of {} bytes at {offset}",
                    if fua { " (FUA)" } else { "" },
                    sectors * SECTOR
                );
                shared.failed(what, &error);
                return;
            }
        }
    }
}

/// What a round's check found, for the summary.
#[derive(Debug, Default)]
struct Tally {
    writes_issued: u64,
    writes_acked: u64,
    writes_fua_acked: u64,
    writes_durable: u64,
    writes_unacked: u64,
    flushes_issued: u64,
    flushes_done: u64,
    /// Sectors whose content the contract pinned to durable writes (the
    /// starting content was no longer allowed).
    sectors_pinned: u64,
    /// Sectors holding data of a write in flight at the kill.
    sectors_from_unacked: u64,
    /// Sectors holding an acked but not durable write (beyond the
    /// contract; SIGKILL keeps the page cache).
    sectors_beyond_contract: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.writes_issued += other.writes_issued;
        self.writes_acked += other.writes_acked;
        self.writes_fua_acked += other.writes_fua_acked;
        self.writes_durable += other.writes_durable;
        self.writes_unacked += other.writes_unacked;
        self.flushes_issued += other.flushes_issued;
        self.flushes_done += other.flushes_done;
        self.sectors_pinned += other.sectors_pinned;
        self.sectors_from_unacked += other.sectors_from_unacked;
        self.sectors_beyond_contract += other.sectors_beyond_contract;
    }
}

/// Checks `actual` (the whole export after the crash) against the round's
/// log and its starting content `base`. Returns the tally, or a
/// description of every sector (up to a few) that breaks the model.
/// `page_cache`: also check the stricter model (every acked write is
/// there), which holds for the file export only.
fn check_round(base: &[u8], actual: &[u8], log: &Log, page_cache: bool) -> Result<Tally, String> {
    let latest_flush = log.flushes_done.iter().copied().max().unwrap_or(0);
    let durable = |w: &WriteRecord| w.acked != NEVER && (w.fua || w.acked < latest_flush);
    let acked = |w: &WriteRecord| w.acked != NEVER;
    let mut by_sector: Vec<Vec<u32>> = vec![Vec::new(); SECTORS as usize];
    for (index, w) in log.writes.iter().enumerate() {
        for sector in w.first_sector..w.first_sector + w.sectors {
            by_sector[sector as usize].push(index as u32);
        }
    }
    let mut tally = Tally {
        writes_issued: log.writes.len() as u64,
        writes_acked: log.writes.iter().filter(|w| acked(w)).count() as u64,
        writes_fua_acked: log.writes.iter().filter(|w| acked(w) && w.fua).count() as u64,
        writes_durable: log.writes.iter().filter(|w| durable(w)).count() as u64,
        writes_unacked: log.writes.iter().filter(|w| !acked(w)).count() as u64,
        flushes_issued: log.flushes_issued,
        flushes_done: log.flushes_done.len() as u64,
        ..Tally::default()
    };
    let mut problems = String::new();
    let mut bad = 0usize;
    let mut expected = vec![0u8; SECTOR as usize];
    for sector in 0..SECTORS {
        let at = (sector * SECTOR) as usize;
        let got = &actual[at..at + SECTOR as usize];
        let covering: Vec<&WriteRecord> = by_sector[sector as usize]
            .iter()
            .map(|&i| &log.writes[i as usize])
            .collect();
        // Which candidate the sector holds: `None` for the starting content.
        let holder: Option<Option<&WriteRecord>> = if got == &base[at..at + SECTOR as usize] {
            Some(None)
        } else {
            covering
                .iter()
                .copied()
                .find(|w| {
                    sector_data(w.tag, sector, &mut expected);
                    expected == got
                })
                .map(Some)
        };
        let mut verdicts = Vec::new();
        let models = [
            ("contract", &durable as &dyn Fn(&WriteRecord) -> bool),
            ("page cache", &acked as &dyn Fn(&WriteRecord) -> bool),
        ];
        for (model, is_durable) in models.into_iter().take(if page_cache { 2 } else { 1 }) {
            let max_durable = covering
                .iter()
                .filter(|w| is_durable(w))
                .map(|w| w.issued)
                .max()
                .unwrap_or(0);
            let allowed = match holder {
                None => false,
                Some(None) => max_durable == 0,
                Some(Some(w)) => w.acked > max_durable,
            };
            if model == "contract" && max_durable > 0 {
                tally.sectors_pinned += 1;
            }
            verdicts.push((model, allowed, max_durable));
        }
        match holder {
            Some(Some(w)) if !acked(w) => tally.sectors_from_unacked += 1,
            Some(Some(w)) if !durable(w) => tally.sectors_beyond_contract += 1,
            _ => {}
        }
        if verdicts.iter().all(|(_, allowed, _)| *allowed) {
            continue;
        }
        bad += 1;
        if bad > 5 {
            continue;
        }
        let _ = writeln!(
            problems,
            "sector {sector} (offset {}): holds {}",
            sector * SECTOR,
            match holder {
                None if got.iter().all(|&b| b == 0) => {
                    "zeroes, from no write of this round and not the starting content".to_owned()
                }
                None => "data from no write of this round and not the starting content".to_owned(),
                Some(None) => "the starting content".to_owned(),
                Some(Some(w)) => format!("write {w:?}"),
            }
        );
        for (model, allowed, max_durable) in &verdicts {
            let _ = writeln!(
                problems,
                "  {model} model: {} (latest durable write covering it issued at {max_durable})",
                if *allowed { "allowed" } else { "NOT allowed" }
            );
        }
        for w in &covering {
            let _ = writeln!(
                problems,
                "  covering: {w:?} durable={} acked={}",
                durable(w),
                acked(w)
            );
        }
    }
    if bad > 0 {
        let _ = writeln!(
            problems,
            "{bad} sectors break the model; latest flush issued at {latest_flush}"
        );
        return Err(problems);
    }
    Ok(tally)
}

/// Reads the whole export through `server`.
fn read_export(rt: &tokio::runtime::Runtime, server: &Server) -> Vec<u8> {
    rt.block_on(async {
        let client = Client::connect(&server.uri_for("crash"))
            .await
            .expect("connect to the restarted server");
        assert_eq!(client.size(), DISK, "export size after restart");
        let mut whole = vec![0u8; DISK as usize];
        for (i, piece) in whole.chunks_mut(1 << 20).enumerate() {
            client
                .read_at(piece, (i as u64) << 20)
                .await
                .expect("read back after the crash");
        }
        let _ = client.disconnect().await;
        whole
    })
}

/// Where the crashing server keeps the export.
#[derive(Clone, Copy)]
enum Target<'a> {
    File(&'a Path),
    /// An `s3://` export on this store; `no-fencing`, since the killed
    /// server's lease would otherwise hold the next one off until it
    /// expires (fencing has its own test in `s3.rs`).
    S3(&'a Seaweed),
}

fn start(target: Target<'_>) -> Server {
    match target {
        Target::File(path) => {
            let export = format!("crash=file:{}", path.display());
            Server::start(["--export", export.as_str()])
        }
        Target::S3(store) => {
            let export =
                format!("crash=s3://{BUCKET}/crash,size={DISK},object-size=64K,no-fencing");
            let env = store.env();
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Server::start_with_env(&env, ["--export", export.as_str()])
        }
    }
}

/// Runs one round's workload against `server` and kills it. Returns the
/// log.
fn crash_round(rt: &tokio::runtime::Runtime, server: &mut Server, seed: u64) -> Log {
    let shared = Arc::new(Shared {
        clock: AtomicU64::new(0),
        killed_at: AtomicU64::new(NEVER),
        stop: AtomicBool::new(false),
        log: Mutex::new(Log::default()),
    });
    // The model needs requests in flight at the kill to fail, not to be
    // sent again to the next server.
    let uri = format!("{}?reconnect-timeout=0", server.uri_for("crash"));
    let clients: Vec<Client> = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let client = Client::connect_many(&uri, CONNECTIONS)
                .await
                .expect("connect to the export");
            assert!(
                client.info().export.can_multi_conn(),
                "the export must advertise CAN_MULTI_CONN (the model relies on it)"
            );
            assert_eq!(client.connections(), CONNECTIONS);
            clients.push(client);
        }
        clients
    });
    let mut random = Random::new(seed);
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let client = clients[i % CLIENTS].clone();
            let tag_base = (seed << 24) ^ ((i as u64) << 20);
            rt.spawn(worker(
                client,
                Arc::clone(&shared),
                random.next_u64(),
                tag_base,
            ))
        })
        .collect();
    let span = (MAX_KILL_DELAY - MIN_KILL_DELAY).as_micros() as u64;
    let delay = MIN_KILL_DELAY + Duration::from_micros(random.next_u64() % span);
    std::thread::sleep(delay);
    shared.killed_at.store(shared.tick(), Ordering::SeqCst);
    let status = server.signal_and_wait("KILL", Duration::from_secs(10));
    assert!(status.is_some(), "the server survived SIGKILL");
    shared.stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for worker in workers {
            tokio::time::timeout(WIND_DOWN, worker)
                .await
                .expect("a worker still waits for a reply from the killed server")
                .expect("worker task");
        }
    });
    drop(clients);
    let mut log = shared.log();
    std::mem::take(&mut *log)
}

#[test]
fn sigkill_loses_no_acknowledged_flush_or_fua_write() {
    let rounds = env_u64("NBD_CRASH_ROUNDS", DEFAULT_ROUNDS);
    let dir = temp_dir();
    let path = dir.path().join("disk.img");
    common::write_urandom_file(&path, DISK);
    File::open(&path)
        .and_then(|f| f.sync_all())
        .expect("sync the starting image");
    let last = crash_rounds(Target::File(&path), rounds, "file export");
    // Also straight from the file, bypassing the server: the same bytes.
    let on_disk = std::fs::read(&path).expect("read the image");
    assert!(
        on_disk == last,
        "the file differs from what the server reads from it"
    );
}

#[test]
fn sigkill_s3_export_loses_no_acknowledged_flush_or_fua_write() {
    let Some(store) = Seaweed::start() else {
        return;
    };
    let rounds = env_u64("NBD_S3_CRASH_ROUNDS", DEFAULT_S3_ROUNDS);
    crash_rounds(Target::S3(&store), rounds, "S3 export on SeaweedFS");
}

/// Runs `rounds` crash rounds against `target`, checking each; returns the
/// export's content after the last.
fn crash_rounds(target: Target<'_>, rounds: u64, what: &str) -> Vec<u8> {
    let base_seed = env_u64("NBD_CRASH_SEED", 0x5eed);
    let page_cache = matches!(target, Target::File(_));
    let rt = runtime();
    let started = Instant::now();
    let mut total = Tally::default();
    let mut server = start(target);
    let mut base = read_export(&rt, &server);
    for round in 0..rounds {
        let seed = base_seed.wrapping_mul(1_000_003).wrapping_add(round);
        let log = crash_round(&rt, &mut server, seed);
        assert!(
            log.early_errors.is_empty(),
            "{what}, round {round} (seed {seed}): requests failed before the kill:\n{}",
            log.early_errors.join("\n")
        );
        drop(server);
        if matches!(target, Target::S3(_)) {
            // PUTs the killed server had sent are still applied by the
            // store for a while after it died; landing after the next
            // server read the disk, they would change it under that
            // server. In service the lease keeps a successor out that long
            // (`no-fencing` skips it here), so wait as it would.
            std::thread::sleep(STORE_SETTLE_AFTER_KILL);
        }
        server = start(target);
        let actual = read_export(&rt, &server);
        match check_round(&base, &actual, &log, page_cache) {
            Ok(tally) => total.add(&tally),
            Err(problems) => panic!(
                "{what}, round {round} (seed {seed}, NBD_CRASH_SEED={base_seed}): the export after SIGKILL breaks the durability model:\n{problems}"
            ),
        }
        base = actual;
    }
    server.stop();
    assert!(
        total.writes_durable > 0,
        "no write became durable: the test proved nothing"
    );
    assert!(
        total.sectors_pinned > 0,
        "no sector was pinned by a durable write"
    );
    eprintln!(
        "crash consistency ({what}): {rounds} rounds survived in {:.1} s; writes: {} issued, {} acked ({} FUA), {} durable by contract, {} in flight at a kill; flushes: {} issued, {} replied; sectors pinned by durable writes: {}, holding in-flight writes: {}, holding acked unflushed writes: {}",
        started.elapsed().as_secs_f64(),
        total.writes_issued,
        total.writes_acked,
        total.writes_fua_acked,
        total.writes_durable,
        total.writes_unacked,
        total.flushes_issued,
        total.flushes_done,
        total.sectors_pinned,
        total.sectors_from_unacked,
        total.sectors_beyond_contract,
    );
    base
}

/// How long `strace` holds each `fdatasync` in the delay phase.
const SYNC_DELAY: Duration = Duration::from_millis(300);

/// `strace` attached to the running server (all its threads, and those it
/// starts), tampering with `fdatasync` as `inject` says; detached on drop.
struct Tracer {
    child: std::process::Child,
    log: PathBuf,
}

impl Tracer {
    /// Attaches and waits until strace reports the process attached.
    /// `None` when attaching is not permitted here (ptrace restrictions).
    fn attach(strace: &Path, pid: u32, inject: &str, dir: &Path, name: &str) -> Option<Tracer> {
        let log = dir.join(format!("{name}.trace"));
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = File::create(&stderr_path).expect("create strace stderr");
        let child = Command::new(strace)
            .args(["-f", "-e", "trace=fdatasync,fsync", "-e"])
            .arg(format!("inject=fdatasync:{inject}"))
            .arg("-o")
            .arg(&log)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start strace");
        let mut tracer = Tracer { child, log };
        let read_stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let attached = wait_until(Duration::from_secs(10), || {
            read_stderr().contains("attached") || matches!(tracer.child.try_wait(), Ok(Some(_)))
        });
        let text = read_stderr();
        if !attached || !text.contains("attached") || text.contains("Operation not permitted") {
            eprintln!("strace could not attach: {text}");
            return None;
        }
        // strace prints "attached with N threads" once it holds every
        // thread (new ones are followed by -f); the pause is a margin for
        // it to start waiting on them.
        std::thread::sleep(Duration::from_millis(300));
        Some(tracer)
    }

    /// Detaches (SIGINT makes strace let go of the process, which keeps
    /// running) and returns the number of `fdatasync` calls it saw.
    fn detach(mut self) -> usize {
        let done = signal_child_and_wait(&mut self.child, "INT", Duration::from_secs(10));
        assert!(done.is_some(), "strace did not detach within 10 s");
        let mut text = String::new();
        File::open(&self.log)
            .and_then(|mut f| f.read_to_string(&mut text))
            .expect("read the strace log");
        text.lines().filter(|l| l.contains("fdatasync(")).count()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        stop_child(&mut self.child, "INT", Duration::from_secs(5));
    }
}

fn is_eio(result: &Result<impl std::fmt::Debug, Error>) -> bool {
    matches!(
        result,
        Err(Error::Server {
            code: ErrorCode::Io,
            ..
        })
    )
}

/// The half of durability SIGKILL cannot show: FLUSH and FUA replies wait
/// for `fdatasync` to return (strace delays it; the replies must take at
/// least as long), and a failing `fdatasync` fails exactly those requests
/// with `EIO` while the connection keeps serving.
#[test]
fn flush_and_fua_replies_wait_for_fdatasync() {
    let Some(strace) = find_tool("strace") else {
        missing("tool strace");
        return;
    };
    let dir = temp_dir();
    let path = dir.path().join("disk.img");
    common::create_sparse_file(&path, 1 << 20);
    let mut server = start(Target::File(&path));
    let rt = runtime();
    let client = rt
        .block_on(Client::connect(&server.uri_for("crash")))
        .expect("connect");
    let data = vec![0xA5u8; 64 * 1024];

    let delay = format!("delay_exit={}", SYNC_DELAY.as_micros());
    let Some(tracer) = Tracer::attach(&strace, server.pid(), &delay, dir.path(), "delay") else {
        missing("permission to trace processes (strace -p)");
        return;
    };
    let (flush_took, fua_took) = rt.block_on(async {
        client.write_at(&data, 0).await.expect("plain write");
        let started = Instant::now();
        client.flush().await.expect("flush under a slow fdatasync");
        let flush_took = started.elapsed();
        let started = Instant::now();
        client
            .write_fua(data.clone(), 65536)
            .await
            .expect("FUA write under a slow fdatasync");
        (flush_took, started.elapsed())
    });
    let syncs = tracer.detach();
    eprintln!(
        "fdatasync held {SYNC_DELAY:?}: flush replied after {flush_took:?}, FUA write after {fua_took:?}; {syncs} fdatasync calls traced"
    );
    assert!(
        flush_took >= SYNC_DELAY,
        "the flush reply came after {flush_took:?}, before fdatasync (held {SYNC_DELAY:?}) returned"
    );
    assert!(
        fua_took >= SYNC_DELAY,
        "the FUA write's reply came after {fua_took:?}, before fdatasync (held {SYNC_DELAY:?}) returned"
    );
    assert!(
        syncs >= 2,
        "expected an fdatasync for the flush and one for the FUA write, traced {syncs}"
    );

    let Some(tracer) = Tracer::attach(&strace, server.pid(), "error=EIO", dir.path(), "fail")
    else {
        missing("permission to trace processes (strace -p)");
        return;
    };
    let (flush, fua, plain, read) = rt.block_on(async {
        let flush = client.flush().await;
        let fua = client.write_fua(data.clone(), 0).await;
        let plain = client.write_at(&data, 131072).await;
        let mut back = vec![0u8; data.len()];
        let read = client.read_at(&mut back, 131072).await.map(|()| back);
        (flush, fua, plain, read)
    });
    let syncs = tracer.detach();
    assert!(is_eio(&flush), "flush with a failing fdatasync: {flush:?}");
    assert!(
        is_eio(&fua),
        "FUA write with a failing fdatasync: {:?}",
        fua.map(|_| ())
    );
    plain.expect("a plain write after the failures (the connection must keep serving)");
    assert!(
        read.expect("read after the failures") == data,
        "read back after the failures"
    );
    assert!(
        syncs >= 2,
        "expected two failed fdatasync calls, traced {syncs}"
    );

    rt.block_on(client.flush())
        .expect("flush once fdatasync works again");
    server.assert_running();
    server.stop();
}
