//! `serve --metrics ADDR`: Prometheus metrics (OpenMetrics text, with
//! `prometheus-client`) served over HTTP at `/metrics`.
//!
//! What is counted (every name starts with `nbd_`):
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `nbd_connections_accepted_total` | | connections accepted (before any limit) |
//! | `nbd_connections_total` | `export` | connections that selected the export |
//! | `nbd_connections_active` | `export` | connections serving the export now |
//! | `nbd_handshake_failures_total` | `reason` | connections ended by an error before selecting an export (`tls`, `protocol`, `io`, `timeout`) |
//! | `nbd_limit_refusals_total` | `limit` | connections closed by a limit (`max_clients`, `handshake_timeout`) |
//! | `nbd_requests_total` | `export`, `command` | requests the storage answered |
//! | `nbd_request_bytes_total` | `export`, `command` | bytes the requests cover (read, write, trim, zero, cache, block status lengths) |
//! | `nbd_request_errors_total` | `export`, `command`, `error` | requests answered with an NBD error (`EIO`, `ENOSPC`, …) |
//! | `nbd_request_duration_seconds` | `export`, `command` | histogram: from the request's arrival to the storage's answer (sending the reply not included) |
//!
//! Requests the protocol core refuses itself (out of range, writes to a
//! read-only export) never reach the storage and are not counted.
//!
//! The request path takes no global lock: each connection holds the
//! counters of its export, resolved once at export selection; a request
//! costs two atomic additions, a histogram update (its own lock, one per
//! export and command) and a small map entry for its start time.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_core::server::{Request, RequestId};
use nbd_core::shape::RequestMap;
use nbd_core::wire::ErrorCode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

/// NBD commands that reach the storage, as label values.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Command {
    /// `NBD_CMD_READ`.
    read,
    /// `NBD_CMD_WRITE`.
    write,
    /// `NBD_CMD_FLUSH`.
    flush,
    /// `NBD_CMD_TRIM`.
    trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    write_zeroes,
    /// `NBD_CMD_CACHE`.
    cache,
    /// `NBD_CMD_BLOCK_STATUS`.
    block_status,
    /// `NBD_CMD_RESIZE`.
    resize,
}

impl Command {
    const ALL: [Command; 8] = [
        Self::read,
        Self::write,
        Self::flush,
        Self::trim,
        Self::write_zeroes,
        Self::cache,
        Self::block_status,
        Self::resize,
    ];

    /// The command and the bytes it covers; `None` for requests added to
    /// the core later.
    fn of(request: &Request) -> Option<(Self, u64)> {
        Some(match *request {
            Request::Read { length, .. } => (Self::read, length),
            Request::Write { length, .. } => (Self::write, length),
            Request::Flush { .. } => (Self::flush, 0),
            Request::Trim { length, .. } => (Self::trim, length),
            Request::WriteZeroes { length, .. } => (Self::write_zeroes, length),
            Request::Cache { length, .. } => (Self::cache, length),
            Request::BlockStatus { length, .. } => (Self::block_status, length),
            Request::Resize { .. } => (Self::resize, 0),
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExportLabel {
    export: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    export: String,
    command: Command,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    export: String,
    command: Command,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

/// Why a connection ended before selecting an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The TLS handshake failed.
    Tls,
    /// The client broke the protocol.
    Protocol,
    /// The socket failed.
    Io,
    /// No export selected within the handshake timeout.
    Timeout,
}

/// A limit that closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `--max-clients`.
    MaxClients,
    /// `--handshake-timeout`.
    HandshakeTimeout,
}

/// The counters of one export and command, shared with the registry.
#[derive(Clone, Debug)]
struct CommandCounters {
    requests: Counter,
    bytes: Counter,
    duration: Histogram,
}

/// The counters of one export, resolved once.
#[derive(Debug)]
pub struct ExportCounters {
    name: String,
    connections: Counter,
    active: Gauge,
    commands: [CommandCounters; Command::ALL.len()],
}

/// Every metric of a server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    exports: Vec<Arc<ExportCounters>>,
    accepted: Counter,
    handshake_failures: Family<ReasonLabel, Counter>,
    limit_refusals: Family<LimitLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
}

/// Request durations from 50 µs to about 6.5 s, doubling.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(50e-6, 2.0, 18)
}

impl Metrics {
    /// The metrics of a server of `exports` (by name, in catalog order).
    pub fn new<'a>(exports: impl IntoIterator<Item = &'a str>) -> Self {
        let mut registry = Registry::with_prefix("nbd");
        let accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Connections accepted, before any limit",
            accepted.clone(),
        );
        let connections = Family::<ExportLabel, Counter>::default();
        registry.register(
            "connections",
            "Connections that selected the export",
            connections.clone(),
        );
        let active = Family::<ExportLabel, Gauge>::default();
        registry.register(
            "connections_active",
            "Connections serving the export now",
            active.clone(),
        );
        let handshake_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "handshake_failures",
            "Connections ended by an error before selecting an export",
            handshake_failures.clone(),
        );
        let limit_refusals = Family::<LimitLabel, Counter>::default();
        registry.register(
            "limit_refusals",
            "Connections closed by a server limit",
            limit_refusals.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered by the storage",
            requests.clone(),
        );
        let bytes = Family::<RequestLabels, Counter>::default();
        registry.register("request_bytes", "Bytes the requests cover", bytes.clone());
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "request_errors",
            "Requests answered with an NBD error",
            errors.clone(),
        );
        let durations =
            Family::<RequestLabels, Histogram>::new_with_constructor(|| -> Histogram {
                Histogram::new(duration_buckets())
            });
        registry.register(
            "request_duration_seconds",
            "Time from request to answer",
            durations.clone(),
        );
        let exports = exports
            .into_iter()
            .map(|name| {
                let export = ExportLabel {
                    export: name.to_owned(),
                };
                let commands = Command::ALL.map(|command| {
                    let labels = RequestLabels {
                        export: name.to_owned(),
                        command,
                    };
                    CommandCounters {
                        requests: requests.get_or_create(&labels).clone(),
                        bytes: bytes.get_or_create(&labels).clone(),
                        duration: durations.get_or_create(&labels).clone(),
                    }
                });
                Arc::new(ExportCounters {
                    name: name.to_owned(),
                    connections: connections.get_or_create(&export).clone(),
                    active: active.get_or_create(&export).clone(),
                    commands,
                })
            })
            .collect();
        Self {
            registry,
            exports,
            accepted,
            handshake_failures,
            limit_refusals,
            errors,
        }
    }

    /// A connection was accepted: its counters.
    pub fn connection(self: &Arc<Self>) -> ConnectionMetrics {
        self.accepted.inc();
        ConnectionMetrics {
            metrics: Arc::clone(self),
            export: None,
            started: RequestMap::new(),
        }
    }

    /// A connection ended with an error before selecting an export.
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        let reason = match reason {
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
            HandshakeFailure::Timeout => "timeout",
        };
        self.handshake_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A limit closed a connection. Those closed by `--max-clients` were
    /// accepted first: they count as accepted too.
    pub fn refused(&self, limit: Limit) {
        let limit = match limit {
            Limit::MaxClients => {
                self.accepted.inc();
                "max_clients"
            }
            Limit::HandshakeTimeout => "handshake_timeout",
        };
        self.limit_refusals
            .get_or_create(&LimitLabel { limit })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The NBD error name of `code`, as label value.
fn error_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Perm => "EPERM",
        ErrorCode::Io => "EIO",
        ErrorCode::NoMemory => "ENOMEM",
        ErrorCode::Invalid => "EINVAL",
        ErrorCode::NoSpace => "ENOSPC",
        ErrorCode::Overflow => "EOVERFLOW",
        ErrorCode::NotSupported => "ENOTSUP",
        ErrorCode::Shutdown => "ESHUTDOWN",
    }
}

/// One connection's view: its export's counters once selected, and the
/// start of each request in flight.
#[derive(Debug)]
pub struct ConnectionMetrics {
    metrics: Arc<Metrics>,
    export: Option<Arc<ExportCounters>>,
    started: RequestMap<(Command, Instant)>,
}

impl ConnectionMetrics {
    /// The connection selected the export at `index` of the catalog.
    pub fn selected(&mut self, index: usize) {
        let Some(export) = self.metrics.exports.get(index) else {
            return;
        };
        if let Some(previous) = self.export.replace(Arc::clone(export)) {
            previous.active.dec();
        }
        export.connections.inc();
        export.active.inc();
    }

    /// Whether an export was selected.
    pub fn has_selected(&self) -> bool {
        self.export.is_some()
    }

    /// A request reached the storage.
    pub fn request(&mut self, request: &Request) {
        let (Some(export), Some((command, bytes))) = (&self.export, Command::of(request)) else {
            return;
        };
        let counters = &export.commands[command as usize];
        counters.requests.inc();
        counters.bytes.inc_by(bytes);
        self.started.insert(request.id(), (command, Instant::now()));
    }

    /// The storage answered request `id`, with `error` if it failed.
    /// Unknown ids (answered already) are ignored.
    pub fn answered(&mut self, id: RequestId, error: Option<ErrorCode>) {
        let (Some(export), Some((command, started))) = (&self.export, self.started.remove(id))
        else {
            return;
        };
        export.commands[command as usize]
            .duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(code) = error {
            self.metrics
                .errors
                .get_or_create(&ErrorLabels {
                    export: export.name.clone(),
                    command,
                    error: error_name(code),
                })
                .inc();
        }
    }

    /// The server-wide metrics.
    pub fn server(&self) -> &Metrics {
        &self.metrics
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        if let Some(export) = &self.export {
            export.active.dec();
        }
    }
}

/// Longest HTTP request head read from a scraper.
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// Time a scraper has to send its request and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes served at once; more wait in the listen backlog.
const MAX_SCRAPERS: usize = 16;

/// Serves `metrics` on `listener` (`GET /metrics`, HTTP/1.x, one request
/// per connection) until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    if let Ok(address) = listener.local_addr() {
        info!("metrics on http://{address}/metrics");
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let metrics = Arc::clone(&metrics);
                tokio::spawn(async move {
                    match tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, &metrics)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => debug!("metrics scrape from {peer}: {error}"),
                        Err(_) => debug!("metrics scrape from {peer}: timed out"),
                    }
                    drop(permit);
                });
            }
            Err(error) => {
                debug!("metrics accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", "").await;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (words.next(), words.next());
    let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
    match (method, path) {
        (Some(b"GET" | b"HEAD"), Some(b"/metrics")) => {
            let body = if method == Some(b"HEAD") {
                String::new()
            } else {
                metrics.encode()
            };
            respond(
                &mut stream,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        (Some(b"GET" | b"HEAD"), _) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "metrics are at /metrics\n",
            )
            .await
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_core::server::Request;

    #[test]
    fn requests_bytes_errors_and_connections_are_counted() {
        let metrics = Arc::new(Metrics::new(["disk", "scratch"]));
        let mut connection = metrics.connection();
        let id = RequestId::from_bits(1);
        // Before selection nothing is attributed.
        connection.request(&Request::Flush { id });
        connection.selected(1);
        connection.request(&Request::Read {
            id,
            offset: 0,
            length: 4096,
        });
        connection.answered(id, None);
        connection.request(&Request::Read {
            id,
            offset: 0,
            length: 512,
        });
        connection.answered(id, Some(ErrorCode::Io));
        // Answered twice (a retried completion): counted once.
        connection.answered(id, Some(ErrorCode::Io));
        metrics.refused(Limit::MaxClients);
        let text = metrics.encode();
        for line in [
            // The connection, and the one --max-clients closed.
            "nbd_connections_accepted_total 2",
            "nbd_connections_total{export=\"scratch\"} 1",
            "nbd_connections_active{export=\"scratch\"} 1",
            "nbd_requests_total{export=\"scratch\",command=\"read\"} 2",
            "nbd_request_bytes_total{export=\"scratch\",command=\"read\"} 4608",
            "nbd_requests_total{export=\"disk\",command=\"flush\"} 0",
            "nbd_request_errors_total{export=\"scratch\",command=\"read\",error=\"EIO\"} 1",
            "nbd_request_duration_seconds_count{export=\"scratch\",command=\"read\"} 2",
            "nbd_limit_refusals_total{limit=\"max_clients\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        drop(connection);
        assert!(
            metrics
                .encode()
                .lines()
                .any(|l| l == "nbd_connections_active{export=\"scratch\"} 0")
        );
    }
}
