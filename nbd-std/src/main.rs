//! `nbd-std`: the command-line tool of the std shell.
//!
//! `nbd-std serve` runs an NBD server; see `nbd-std serve --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nbd_std::export::{ExportSet, ExportSpec, StorageSpec};
use nbd_std::server::limits::{self, DEFAULT_MAX_CLIENTS};
use nbd_std::server::{
    DEFAULT_GATHER_WAIT_MICROS, DEFAULT_POLL_WINDOW_MICROS, Listener, Server, ServerLimits,
};
use nbd_std::size::parse_size;
use tracing::{error, info, warn};

/// Network Block Device tools over the nbd-core protocol core.
#[derive(Debug, Parser)]
#[command(name = "nbd-std", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve exports to NBD clients (nbdinfo, qemu, libnbd, nbd-client).
    Serve(Box<ServeArgs>),
    /// Describe an export (size, flags, block sizes, metadata contexts), as
    /// nbdinfo does.
    Info(InfoArgs),
    /// Copy between local files, standard input/output (-) and NBD exports,
    /// skipping holes.
    Cp(CpArgs),
    /// Mount an export as one regular file through FUSE, until SIGINT,
    /// SIGTERM or fusermount3 -u.
    Mount(MountArgs),
    /// Check a server against the MUST and SHOULD rules of the NBD spec.
    ///
    /// One line per rule (PASS, FAIL or SKIP, with its level and spec
    /// section) and a summary. Exit status 0 when nothing fails, 1 when a
    /// rule fails, 2 when the server cannot be checked. Point it at a test
    /// export: it writes to a scratch region at the end of the export (the
    /// last 8 KiB) and restores it; --no-write sends no writes at all.
    Check(CheckArgs),
    /// Pair NBD clients with browser-hosted exports that connect to the
    /// bridge over WebSocket (or through websockify over TCP).
    Bridge(BridgeArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or
    /// powershell (e.g. `nbd-std completions bash >
    /// /etc/bash_completion.d/nbd-std`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), of nbd-std or of one command
    /// (`nbd-std man serve | man -l -`).
    Man {
        /// The command whose page to print (nbd-std's own without).
        command: Option<String>,
    },
}

/// `nbd-std completions SHELL`.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory;
    // Into memory first: clap_complete panics when its writer fails (a
    // closed pipe), and nothing here may panic.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "nbd-std", &mut script);
    print_bytes("completions", &script)
}

/// Writes `bytes` to standard output; a failure is one line on stderr.
fn print_bytes(what: &str, bytes: &[u8]) -> ExitCode {
    match write_stdout(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nbd-std: {what}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `bytes` to standard output. Not `print!`, which panics when
/// the reader went away (`nbd-std info … | head`).
fn write_stdout(bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|error| format!("standard output: {error}"))
}

/// `nbd-std man [COMMAND]`: the page clap_mangen makes from the same
/// definitions as --help.
fn man(command: Option<String>) -> ExitCode {
    use clap::CommandFactory;
    let top = Cli::command();
    let page = match &command {
        None => top,
        Some(name) => match top.find_subcommand(name) {
            Some(sub) => sub
                .clone()
                .display_name(format!("nbd-std-{name}"))
                .bin_name(format!("nbd-std {name}"))
                .version(env!("CARGO_PKG_VERSION")),
            None => {
                eprintln!("nbd-std: man: no command `{name}`");
                return ExitCode::from(USAGE);
            }
        },
    };
    let mut out = Vec::new();
    if let Err(error) = clap_mangen::Man::new(page).render(&mut out) {
        eprintln!("nbd-std: man: {error}");
        return ExitCode::FAILURE;
    }
    print_bytes("man", &out)
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// NBD URI of the export to check: nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH.
    uri: String,
    /// Seconds each socket operation may take (each rule gets twice this).
    #[arg(long, default_value = "5", value_parser = parse_seconds, value_name = "SECONDS")]
    timeout: std::time::Duration,
    /// Send no writes at all (skips the rules that write to the scratch
    /// region at the end of the export, and restore it, and those that
    /// send writes the server must refuse).
    #[arg(long)]
    no_write: bool,
    /// Run only the rules whose id starts with PREFIX (repeatable).
    #[arg(long, value_name = "PREFIX")]
    only: Vec<String>,
    /// Print JSON instead of lines.
    #[arg(long)]
    json: bool,
}

fn check(args: CheckArgs) -> ExitCode {
    let options = nbd_std::check::Options {
        timeout: args.timeout,
        write: !args.no_write,
        only: args.only,
    };
    ExitCode::from(nbd_std::check::command(&args.uri, &options, args.json))
}

#[derive(Debug, clap::Args)]
struct BridgeArgs {
    /// Address NBD clients connect to.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    bind: String,
    /// TCP port NBD clients connect to.
    #[arg(long, default_value_t = nbd_std::DEFAULT_PORT)]
    port: u16,
    /// Where browsers connect over WebSocket (any path; binary messages).
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR:PORT")]
    ws: String,
    /// Where browsers connect over plain TCP, through websockify
    /// (`websockify 8080 127.0.0.1:10810`). Off unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    providers: Option<String>,
    /// Seconds a client waits for an idle browser session before it is
    /// closed.
    #[arg(long, default_value = "2", value_parser = parse_seconds, value_name = "SECONDS")]
    wait: std::time::Duration,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: String,
}

/// Whole seconds, 0 to a day.
fn parse_whole_seconds(text: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .ok()
        .filter(|&seconds| seconds <= 86_400)
        .ok_or_else(|| format!("`{text}` is not a whole number of seconds from 0 to 86400"))
}

/// A non-negative number of seconds, fractions allowed.
fn parse_seconds(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<f64>()
        .ok()
        .and_then(|seconds| std::time::Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("`{text}` is not a number of seconds (0 or more)"))
}

#[derive(Debug, clap::Args)]
struct MountArgs {
    /// NBD URI of the export.
    uri: String,
    /// The file to mount on (created if missing).
    file: PathBuf,
    /// Connections, used when the server allows multi-conn.
    #[arg(short = 'C', long, default_value_t = 4, value_name = "N")]
    connections: usize,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
    /// How long a broken connection is retried, requests in flight
    /// waiting, before they fail; 0: not at all. Overrides the URI's
    /// reconnect-timeout [default: 60].
    #[arg(long, value_parser = parse_seconds, value_name = "SECONDS")]
    reconnect_timeout: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
struct CpArgs {
    /// Source: a file or block device, - for standard input, or an NBD URI.
    source: String,
    /// Destination: a file (created or truncated) or block device, - for
    /// standard output, or an NBD URI.
    destination: String,
    /// Connections per NBD export, used when the server allows multi-conn.
    #[arg(short = 'C', long, default_value_t = 4, value_name = "N")]
    connections: usize,
    /// Requests in flight at once.
    #[arg(short = 'R', long, default_value_t = 32, value_name = "N")]
    requests: usize,
    /// Bytes per request: bytes, or with K, M (binary units).
    #[arg(long, default_value = "1M", value_parser = parse_size, value_name = "SIZE")]
    request_size: u64,
    /// Do not flush the destination at the end.
    #[arg(long)]
    no_flush: bool,
    /// No progress bar (it is only drawn when standard error is a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Print what was copied, transferred and skipped at the end.
    #[arg(short, long)]
    verbose: bool,
    /// How long a broken connection is retried, requests in flight
    /// waiting, before they fail; 0: not at all. Overrides the URI's
    /// reconnect-timeout [default: 60].
    #[arg(long, value_parser = parse_seconds, value_name = "SECONDS")]
    reconnect_timeout: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
struct InfoArgs {
    /// NBD URI: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
    uri: String,
    /// Describe every export the server lists.
    #[arg(short = 'L', long)]
    list: bool,
    /// Print JSON (the shape of nbdinfo --json).
    #[arg(long)]
    json: bool,
    /// Print the allocation map (block status of base:allocation): offset,
    /// length, type and description per extent, as nbdinfo --map.
    #[arg(long, value_name = "CONTEXT", num_args = 0..=1, require_equals = true,
          default_missing_value = nbd_std::tools::map::BASE_ALLOCATION,
          conflicts_with_all = ["list", "size", "can", "is"])]
    map: Option<String>,
    /// With --map: bytes of each type and their share instead.
    #[arg(long, requires = "map")]
    totals: bool,
    /// Print the export's size in bytes.
    #[arg(long, conflicts_with_all = ["list", "can", "is"])]
    size: bool,
    /// Exit 0 if the export can FLAG, 2 if not (1: error): connect, read,
    /// write, cache, df, fast-zero, flush, fua, multi-conn, trim, zero,
    /// structured-reply.
    #[arg(long, value_name = "FLAG", conflicts_with_all = ["list", "is"])]
    can: Option<String>,
    /// Exit 0 if the export is FLAG, 2 if not (1: error): read-only,
    /// rotational, tls.
    #[arg(long, value_name = "FLAG", conflicts_with = "list")]
    is: Option<String>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// TCP port to listen on [default: 10809].
    #[arg(long)]
    port: Option<u16>,
    /// Listen on this unix socket instead of TCP.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Run COMMAND (with /bin/sh) once the server listens, with $uri,
    /// $port, $unixsocket, $exportname and $tls set, as nbdkit --run does;
    /// the server stops when it exits and exits with its status. Without
    /// --unix or --port the server listens on a private unix socket.
    #[arg(long, value_name = "COMMAND")]
    run: Option<String>,
    /// Serve Prometheus metrics (OpenMetrics text) at
    /// http://ADDR:PORT/metrics: connections, requests, bytes, errors and
    /// latency per export and command, handshake failures, limit refusals.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,
    /// Write the server's process id to PATH once it listens (removed at
    /// exit).
    #[arg(long, value_name = "PATH")]
    pidfile: Option<PathBuf>,
    /// Size of the default in-memory export (used without --export):
    /// bytes, or with K, M, G, T (binary units, optional iB/B).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: String,
    /// Refuse writes on every export.
    #[arg(long)]
    read_only: bool,
    /// An export: NAME=memory:SIZE, NAME=file:PATH or NAME=null:SIZE
    /// (reads zeroes, drops writes: the server's own cost), then ,ro and
    /// ,desc=TEXT as wanted. Repeat for several; the first is the default.
    /// ,writers=exclusive: while one client has the export open for
    /// writing, other clients get it read-only; a client is an IP address
    /// (all unix-socket clients are one), so multi-conn from one client
    /// writes (default ,writers=shared: all clients write).
    /// Fault injection: ,fail=eio:RATE (probability 0 to 1 per request),
    /// ,fail=eio@START-END (requests touching those bytes),
    /// ,fail=enospc@START-END (writes only), each optionally ending in
    /// /read or /write, repeatable; ,fail-seed=N makes random faults
    /// reproducible. Faults hit reads, writes and write-zeroes; flush,
    /// trim, cache and block status always work.
    #[arg(long = "export", value_name = "NAME=SPEC", value_parser = ExportSpec::parse)]
    exports: Vec<ExportSpec>,
    /// Most clients at once; more are accepted and closed at once. Raises
    /// the descriptor limit (RLIMIT_NOFILE) to fit when allowed.
    #[arg(long, default_value_t = DEFAULT_MAX_CLIENTS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    max_clients: u32,
    /// Seconds a client has to select an export (negotiation, TLS
    /// included) before it is dropped; 0: no limit.
    #[arg(long, default_value = "10", value_name = "SECONDS",
          value_parser = limits::parse_handshake_timeout)]
    handshake_timeout: std::time::Duration,
    /// Seconds connections have, after SIGINT or SIGTERM, to answer the
    /// requests in flight and close before they are dropped.
    #[arg(long, default_value = "20", value_name = "SECONDS", value_parser = parse_seconds)]
    drain_timeout: std::time::Duration,
    /// Requests in flight per connection (1 to 128); beyond it the server
    /// reads no more requests from that client until one completes.
    #[arg(long, default_value_t = limits::MAX_IN_FLIGHT, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=i64::from(limits::MAX_IN_FLIGHT)))]
    max_in_flight: u16,
    /// Longest option a client may announce before the connection is
    /// closed (options over 16 KiB are refused politely below it): bytes
    /// or with K, M, G, from 1K to 4G - 1.
    #[arg(long, default_value = "64M", value_name = "BYTES",
          value_parser = limits::parse_max_option_length)]
    max_option_length: u32,
    /// Longest read or write accepted from clients that did not ask for
    /// the block size constraints (the advertised 32 MiB maximum binds
    /// those that did): bytes or with K, M, G. Memory is bounded by
    /// --connection-memory and --server-memory, not by this.
    #[arg(long, default_value = "64M", value_name = "BYTES",
          value_parser = limits::parse_max_request)]
    max_request: u32,
    /// Request payload bytes one client may have held in the server (write
    /// data not yet stored, read data not yet sent); past it the server
    /// reads nothing more from that client until some is freed. A client
    /// holding nothing may still send one larger request.
    #[arg(long, default_value = "16M", value_name = "BYTES",
          value_parser = limits::parse_memory)]
    connection_memory: usize,
    /// Request payload bytes all clients together may have held in the
    /// server; never exceeded (must hold --max-request plus 2 MiB).
    #[arg(long, default_value = "256M", value_name = "BYTES",
          value_parser = limits::parse_memory)]
    server_memory: usize,
    /// Seconds of silence before TCP keepalive probes a client (then 5
    /// probes 10 s apart), so clients gone without closing (power cut,
    /// lost network) are disconnected; 0: no keepalive.
    #[arg(long, default_value = "60", value_name = "SECONDS",
          value_parser = parse_whole_seconds)]
    keepalive: u64,
    /// Disconnect a client that sends nothing for this many seconds while
    /// none of its requests is in flight (after negotiation); 0: never.
    #[arg(long, default_value = "0", value_name = "SECONDS",
          value_parser = limits::parse_handshake_timeout)]
    idle_timeout: std::time::Duration,
    /// Congestion control of TCP connections from this same host when the
    /// system's is BBR: cubic (reno where cubic is missing), which does
    /// not hold large replies back over loopback, or the system's.
    #[arg(long, value_enum, default_value = "cubic", value_name = "ALGORITHM")]
    loopback_congestion: nbd_std::server::LoopbackCongestion,
    /// Threads serving connections, each with its own event loop (a
    /// connection stays on one); default: one per CPU. 0: connections
    /// are tasks of the shared work-stealing runtime.
    #[arg(long, value_name = "N")]
    io_threads: Option<usize>,
    /// Microseconds a connection alone on its I/O thread polls for the
    /// next request before the thread sleeps (one request at a time is
    /// then not slowed by a wake-up); shrinks to nothing for a client that
    /// pauses. 0: never poll.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = DEFAULT_POLL_WINDOW_MICROS,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    poll_window: u64,
    /// Microseconds replies held for a client keeping several requests in
    /// flight may wait for its next ones, so that more go out together;
    /// a connection alone on its I/O thread measures now and then whether
    /// waiting serves its client quicker or cheaper, and waits only if so.
    /// 0: never.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = DEFAULT_GATHER_WAIT_MICROS,
          value_parser = clap::value_parser!(u64).range(0..=1_000))]
    gather_wait: u64,
    /// TLS (NBD_OPT_STARTTLS): off; on (clients choose); require (every
    /// option but STARTTLS and ABORT refused until TLS is up).
    #[arg(long, value_enum, default_value_t = TlsMode::Off, value_name = "MODE")]
    tls: TlsMode,
    /// Server certificate chain, PEM (leaf first). Needed with --tls on/require.
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// CA certificate(s), PEM: clients must present a certificate this CA
    /// signed (mutual TLS).
    #[arg(long, value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
}

/// `serve --tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TlsMode {
    /// No TLS: STARTTLS is refused.
    Off,
    /// TLS when the client asks for it.
    On,
    /// TLS or nothing.
    Require,
}

impl TlsMode {
    fn offer(self) -> nbd_std::captive::TlsOffer {
        use nbd_std::captive::TlsOffer;
        match self {
            Self::Off => TlsOffer::Off,
            Self::On => TlsOffer::On,
            Self::Require => TlsOffer::Required,
        }
    }
}

/// The TLS credentials `args` name, checked before anything listens.
fn serve_tls(args: &ServeArgs) -> Result<Option<nbd_std::tls::ServerTls>, String> {
    let (cert, key) = match (args.tls, &args.tls_cert, &args.tls_key) {
        (TlsMode::Off, None, None) if args.tls_client_ca.is_none() => return Ok(None),
        (TlsMode::Off, ..) => {
            return Err(
                "--tls-cert, --tls-key and --tls-client-ca need --tls on or --tls require".into(),
            );
        }
        (_, Some(cert), Some(key)) => (cert, key),
        (_, None, _) => return Err("--tls on/require needs --tls-cert PEM".into()),
        (_, Some(_), None) => return Err("--tls on/require needs --tls-key PEM".into()),
    };
    nbd_std::tls::ServerTls::load(cert, key, args.tls_client_ca.as_deref())
        .map(Some)
        .map_err(|e| format!("--tls: {e}"))
}

/// The server-wide limits `args` ask for, the descriptor limit raised to
/// fit `--max-clients` (or `--max-clients` lowered, with a warning, when
/// the hard limit is too low).
fn serve_limits(args: &ServeArgs) -> ServerLimits {
    let wanted = u64::from(args.max_clients) + limits::RESERVED_DESCRIPTORS;
    let mut max_clients = args.max_clients as usize;
    if let Err(error) = limits::raise_descriptor_limit(wanted) {
        let fit = limits::descriptor_limit()
            .saturating_sub(limits::RESERVED_DESCRIPTORS)
            .max(1);
        max_clients = max_clients.min(usize::try_from(fit).unwrap_or(usize::MAX));
        warn!(
            "--max-clients {}: {error}; serving at most {max_clients} clients",
            args.max_clients
        );
    }
    ServerLimits {
        max_clients,
        handshake_timeout: Some(args.handshake_timeout).filter(|t| !t.is_zero()),
        connection_memory: args.connection_memory,
        server_memory: args.server_memory,
        keepalive: Some(std::time::Duration::from_secs(args.keepalive)).filter(|t| !t.is_zero()),
        idle_timeout: Some(args.idle_timeout).filter(|t| !t.is_zero()),
        drain_timeout: args.drain_timeout,
        loopback_congestion: args.loopback_congestion,
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help and --version.
            return print_bytes("help", error.to_string().as_bytes());
        }
        Err(error) => {
            eprintln!("nbd-std: {}", one_line(&error.to_string()));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Info(args) => info(args),
        Command::Cp(args) => cp(args),
        Command::Mount(args) => mount(args),
        Command::Check(args) => check(args),
        Command::Bridge(args) => bridge(args),
        Command::Completions { shell } => completions(shell),
        Command::Man { command } => man(command),
    }
}

fn mount(args: MountArgs) -> ExitCode {
    use nbd_std::client::NbdUri;
    use nbd_std::tools::mount::{MountOptions, mount};
    client_command(async move {
        let mut uri = NbdUri::parse(&args.uri).map_err(|e| e.to_string())?;
        if let Some(timeout) = args.reconnect_timeout {
            uri.reconnect_timeout = timeout;
        }
        let options = MountOptions {
            connections: args.connections,
            read_only: args.read_only,
        };
        mount(&uri, &args.file, options)
            .await
            .map_err(|e| format!("mount: {e}"))
    })
}

fn cp(args: CpArgs) -> ExitCode {
    use nbd_std::tools::copy::{CopyOptions, Location, copy, human};
    client_command(async move {
        let mut source = Location::parse(&args.source).map_err(|e| e.to_string())?;
        let mut destination = Location::parse(&args.destination).map_err(|e| e.to_string())?;
        for location in [&mut source, &mut destination] {
            if let (Location::Nbd(uri), Some(timeout)) = (location, args.reconnect_timeout) {
                uri.reconnect_timeout = timeout;
            }
        }
        let options = CopyOptions {
            connections: args.connections,
            requests: args.requests,
            chunk: usize::try_from(args.request_size.min(1 << 30)).unwrap_or(1 << 20),
            flush: !args.no_flush,
            progress: !args.no_progress,
        };
        let started = std::time::Instant::now();
        let stats = copy(&source, &destination, options)
            .await
            .map_err(|e| format!("cp: {e}"))?;
        if args.verbose {
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "nbd-std cp: copied {} bytes in {seconds:.2} s ({}/s), NBD connections: {} source, {} destination",
                stats.total,
                human(stats.total as f64 / seconds.max(0.001)),
                stats.connections.0,
                stats.connections.1
            );
            eprintln!(
                "nbd-std cp: transferred {} bytes of data",
                stats.transferred
            );
            eprintln!(
                "nbd-std cp: skipped {} bytes of zeroes ({} written as zeroes without reading them, {} left as holes)",
                stats.skipped(),
                stats.zeroed,
                stats.holes
            );
        }
        Ok(())
    })
}

/// Runs a client command on a fresh runtime; errors print one line.
fn client_command<F>(work: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), String>>,
{
    // Client logs only when asked for with RUST_LOG.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = init_logging("warn");
    }
    block_on(async move {
        match work.await {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("nbd-std: {message}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Runs `work` on a fresh multi-threaded runtime; a runtime that cannot
/// start is reported on one line.
fn block_on(work: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(work),
        Err(error) => {
            eprintln!("nbd-std: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `info --can`/`--is`: the property does not hold (as nbdinfo).
const PROPERTY_FALSE: u8 = 2;

fn info(args: InfoArgs) -> ExitCode {
    use nbd_std::client::NbdUri;
    use nbd_std::tools::info::{InfoOptions, info};
    use nbd_std::tools::map;
    if let Some(name) = args.can.as_deref().or(args.is.as_deref()) {
        let Some(property) = map::Property::parse(name) else {
            eprintln!("nbd-std: unknown --can or --is flag: {name}");
            return ExitCode::FAILURE;
        };
        let mut holds = false;
        let code = client_command(async {
            let uri = NbdUri::parse(&args.uri).map_err(|e| e.to_string())?;
            holds = map::has(&uri, property).await.map_err(|e| e.to_string())?;
            Ok(())
        });
        return match (code == ExitCode::SUCCESS, holds) {
            (true, true) => ExitCode::SUCCESS,
            (true, false) => ExitCode::from(PROPERTY_FALSE),
            (false, _) => code,
        };
    }
    if args.size {
        return client_command(async move {
            let uri = NbdUri::parse(&args.uri).map_err(|e| e.to_string())?;
            let size = map::size(&uri).await.map_err(|e| e.to_string())?;
            write_stdout(format!("{size}\n").as_bytes())
        });
    }
    if let Some(context) = args.map {
        return client_command(async move {
            if context != map::BASE_ALLOCATION {
                return Err(format!(
                    "--map={context}: only {} maps are read",
                    map::BASE_ALLOCATION
                ));
            }
            let uri = NbdUri::parse(&args.uri).map_err(|e| e.to_string())?;
            let extents = map::allocation_map(&uri)
                .await
                .map_err(|e| format!("--map: {e}"))?;
            let text = match (args.totals, args.json) {
                (false, false) => map::map_text(&extents),
                (false, true) => map::map_json(&extents),
                (true, false) => map::totals_text(&extents),
                (true, true) => map::totals_json(&extents),
            };
            write_stdout(text.as_bytes())
        });
    }
    client_command(async move {
        let uri = NbdUri::parse(&args.uri).map_err(|e| e.to_string())?;
        let options = InfoOptions {
            list: args.list,
            json: args.json,
        };
        let report = info(&uri, options).await.map_err(|e| e.to_string())?;
        write_stdout(report.output.as_bytes())?;
        match report.failures.first() {
            None => Ok(()),
            Some((name, error)) => Err(format!(
                "export {name:?}: {error}{}",
                match report.failures.len() {
                    1 => String::new(),
                    n => format!(" (and {} more exports failed)", n - 1),
                }
            )),
        }
    })
}

/// Exit code for bad arguments, found before anything listens.
const USAGE: u8 = 2;

fn serve(args: ServeArgs) -> ExitCode {
    if let Err(message) = init_logging(&args.log_level) {
        eprintln!("nbd-std: --log-level: {message}");
        return ExitCode::from(USAGE);
    }
    let specs = if args.exports.is_empty() {
        vec![ExportSpec {
            name: "memory".to_owned(),
            storage: StorageSpec::Memory {
                size: args.size,
                huge_pages: false,
            },
            read_only: args.read_only,
            description: String::new(),
            faults: Vec::new(),
            fault_seed: None,
            writers: nbd_std::export::WriterPolicy::Shared,
        }]
    } else {
        args.exports
            .iter()
            .cloned()
            .map(|spec| ExportSpec {
                read_only: spec.read_only || args.read_only,
                ..spec
            })
            .collect()
    };
    let mut exports = Vec::with_capacity(specs.len());
    for spec in &specs {
        match spec.open() {
            Ok(export) => exports.push(export),
            Err(message) => {
                eprintln!("nbd-std: --export: {message}");
                return ExitCode::from(USAGE);
            }
        }
    }
    let tls = match serve_tls(&args) {
        Ok(tls) => tls,
        Err(message) => {
            eprintln!("nbd-std: {message}");
            return ExitCode::from(USAGE);
        }
    };
    block_on(async move {
        // Held until the server exits: the private socket of --run lives in it.
        let mut private_directory = None;
        let listener = match serve_listener(&args, &mut private_directory).await {
            Ok(listener) => listener,
            Err(message) => {
                eprintln!("nbd-std: {message}");
                return ExitCode::from(USAGE);
            }
        };
        let captive = match &args.run {
            Some(command) => match nbd_std::captive::variables(&listener, args.tls.offer()) {
                Ok(variables) => Some((command.clone(), variables)),
                Err(error) => {
                    eprintln!("nbd-std: --run: {error}");
                    return ExitCode::from(USAGE);
                }
            },
            None => None,
        };
        let metrics = match &args.metrics {
            Some(address) => {
                let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
                let metrics = std::sync::Arc::new(nbd_std::metrics::Metrics::new(names));
                match tokio::net::TcpListener::bind(address.as_str()).await {
                    Ok(listener) => {
                        tokio::spawn(nbd_std::metrics::serve(
                            listener,
                            std::sync::Arc::clone(&metrics),
                        ));
                        Some(metrics)
                    }
                    Err(error) => {
                        eprintln!("nbd-std: --metrics {address}: {error}");
                        return ExitCode::from(USAGE);
                    }
                }
            }
            None => None,
        };
        let _pidfile = match args.pidfile.as_deref().map(Pidfile::write).transpose() {
            Ok(pidfile) => pidfile,
            Err(message) => {
                eprintln!("nbd-std: {message}");
                return ExitCode::from(USAGE);
            }
        };
        for export in &exports {
            info!(
                "export `{}`: {} bytes{}{}",
                export.name,
                export.backend.size(),
                if export.read_only { ", read-only" } else { "" },
                if export.description.is_empty() {
                    String::new()
                } else {
                    format!(", \"{}\"", export.description)
                }
            );
        }
        let config = nbd_core::server::Config {
            max_in_flight: usize::from(args.max_in_flight),
            max_option_length: args.max_option_length,
            max_request_length: args.max_request,
            ..nbd_core::server::Config::default()
        };
        let limits = serve_limits(&args);
        let largest = u64::from(args.max_request).max(
            exports
                .iter()
                .map(|e| u64::from(e.backend.block_sizes().maximum).min(e.backend.size()))
                .max()
                .unwrap_or(0),
        );
        if let Err(message) = limits.check(largest) {
            eprintln!("nbd-std: {message}");
            return ExitCode::from(USAGE);
        }
        let server = Server::new(ExportSet::new(exports), config).with_limits(limits);
        let server = match args.io_threads {
            Some(count) => server.with_io_threads(count),
            None => server,
        }
        .with_poll_window(std::time::Duration::from_micros(args.poll_window))
        .with_gather_wait(std::time::Duration::from_micros(args.gather_wait));
        let server = match metrics {
            Some(metrics) => server.with_metrics(metrics),
            None => server,
        };
        let server = match tls {
            Some(tls) => {
                info!(
                    "TLS {}{}",
                    if args.tls == TlsMode::Require {
                        "required"
                    } else {
                        "offered"
                    },
                    if tls.mutual() {
                        ", client certificates required"
                    } else {
                        ""
                    }
                );
                server.with_tls(tls, args.tls == TlsMode::Require)
            }
            None => server,
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stop_captive = stop.clone();
        let signal = wait_for_signal();
        tokio::spawn(async move {
            signal.await;
            info!("signal received: finishing requests in flight, then exiting");
            let _ = stop.send(true);
        });
        let Some((command, variables)) = captive else {
            return server_ended(server.run(listener, stopped).await);
        };
        let mut child = match nbd_std::captive::spawn(&command, &variables) {
            Ok(child) => child,
            Err(error) => {
                eprintln!("nbd-std: --run: cannot start /bin/sh: {error}");
                return ExitCode::FAILURE;
            }
        };
        let mut running = tokio::spawn(async move { server.run(listener, stopped).await });
        tokio::select! {
            status = child.wait() => {
                let _ = stop_captive.send(true);
                let server = running.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match status {
                    Ok(status) => {
                        info!("--run command exited: {status}");
                        if server_ended(server) != ExitCode::SUCCESS {
                            return ExitCode::FAILURE;
                        }
                        ExitCode::from(nbd_std::captive::exit_code(status))
                    }
                    Err(error) => {
                        error!("--run command: {error}");
                        ExitCode::FAILURE
                    }
                }
            }
            server = &mut running => {
                // Stopped by a signal before the command ended: so is it.
                let _ = child.start_kill();
                let _ = child.wait().await;
                server_ended(server.unwrap_or_else(|e| Err(std::io::Error::other(e))))
            }
        }
    })
}

fn server_ended(result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => {
            info!("server stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            error!("server failed: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Where `serve` listens: the socket systemd passed, --unix, a private
/// unix socket for --run without an address, or TCP.
async fn serve_listener(
    args: &ServeArgs,
    private_directory: &mut Option<nbd_std::captive::PrivateDirectory>,
) -> Result<Listener, String> {
    if let Some(listener) = nbd_std::activation::passed_listener().map_err(|e| e.to_string())? {
        info!("socket activation: serving the socket systemd passed");
        return Ok(listener);
    }
    let private = args.run.is_some() && args.unix.is_none() && args.port.is_none();
    let unix = if private {
        let directory = nbd_std::captive::PrivateDirectory::create()
            .map_err(|e| format!("--run: cannot create a private directory: {e}"))?;
        Some(private_directory.insert(directory).socket())
    } else {
        args.unix.clone()
    };
    match unix {
        Some(path) => {
            Listener::bind_unix(&path).map_err(|e| format!("--unix {}: {e}", path.display()))
        }
        None => {
            let port = args.port.unwrap_or(nbd_std::DEFAULT_PORT);
            Listener::bind_tcp(&args.bind, port)
                .await
                .map_err(|e| format!("--bind {} --port {port}: {e}", args.bind))
        }
    }
}

/// `--pidfile`: written once the server listens, removed when it exits.
struct Pidfile(PathBuf);

impl Pidfile {
    fn write(path: &std::path::Path) -> Result<Self, String> {
        // Written whole under another name, then renamed: a reader never
        // sees a partial id.
        let partial = path.with_extension("partial");
        std::fs::write(&partial, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&partial, path))
            .map_err(|e| format!("--pidfile {}: {e}", path.display()))?;
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bridge(args: BridgeArgs) -> ExitCode {
    use nbd_std::bridge::{Bridge, BridgeConfig};
    if let Err(message) = init_logging(&args.log_level) {
        eprintln!("nbd-std: --log-level: {message}");
        return ExitCode::from(USAGE);
    }
    let config = BridgeConfig {
        // Brackets so an IPv6 address parses as HOST:PORT.
        clients: if args.bind.contains(':') && !args.bind.starts_with('[') {
            format!("[{}]:{}", args.bind, args.port)
        } else {
            format!("{}:{}", args.bind, args.port)
        },
        websocket: args.ws,
        providers: args.providers,
        wait: args.wait,
    };
    block_on(async move {
        let bridge = match Bridge::bind(&config).await {
            Ok(bridge) => bridge,
            Err(error) => {
                eprintln!("nbd-std: {error}");
                return ExitCode::from(USAGE);
            }
        };
        let show = |addr: Option<std::io::Result<std::net::SocketAddr>>| match addr {
            Some(Ok(addr)) => addr.to_string(),
            Some(Err(error)) => format!("? ({error})"),
            None => "off".to_owned(),
        };
        info!(
            "bridge: NBD clients on {}, WebSocket providers on {}, TCP providers on {}, clients wait {:.1} s",
            show(Some(bridge.clients_addr())),
            show(Some(bridge.websocket_addr())),
            show(bridge.providers_addr()),
            config.wait.as_secs_f64()
        );
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let signal = wait_for_signal();
        tokio::spawn(async move {
            signal.await;
            info!("signal received: closing every session, then exiting");
            let _ = stop.send(true);
        });
        bridge.run(stopped).await;
        info!("bridge stopped");
        ExitCode::SUCCESS
    })
}

/// Waits for SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a spawned task may start
/// after the server has served a client, and a signal before then would
/// kill the process instead of stopping it cleanly.
fn wait_for_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move { signalled(signals).await }
}

async fn signalled(
    signals: (
        std::io::Result<tokio::signal::unix::Signal>,
        std::io::Result<tokio::signal::unix::Signal>,
    ),
) {
    match signals {
        (Ok(mut interrupt), Ok(mut terminate)) => {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        _ => {
            error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

fn init_logging(level: &str) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => {
            EnvFilter::try_new(directives).map_err(|e| format!("RUST_LOG: {e}"))?
        }
        _ => {
            let level: tracing::Level = level.parse().map_err(|_| {
                format!("`{level}` is not a level (error, warn, info, debug, trace)")
            })?;
            // rustls warns on every handshake whose client sends an IP
            // address as SNI, which libnbd and qemu do for nbds://IP URIs;
            // the server ignores it correctly, so it is not worth a line
            // per connection. RUST_LOG still shows it.
            EnvFilter::new(format!("{level},rustls::msgs::handshake=error"))
        }
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| e.to_string())
}

/// A clap error on one line: its message and the arguments it names,
/// without the usage and help hints.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_owned()
}
