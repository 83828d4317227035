//! `nbd-std check URI`: a conformance suite for any NBD server, written
//! from the MUST and SHOULD rules of the NBD protocol specification
//! (`doc/proto.md` of NetworkBlockDevice/nbd, with its extended-headers
//! text).
//!
//! Every [`Rule`] names the spec section it comes from and its level
//! (MUST or SHOULD), opens its own connections (so one failure cannot
//! taint the next rule), and ends in [`Outcome::Pass`], [`Outcome::Fail`]
//! with the reason, or [`Outcome::Skip`] when the server does not
//! advertise the feature. Every socket operation has a timeout, and every
//! rule a time budget.
//!
//! Rules that write (`tx.write-read-back`, `tx.write-zeroes`, ...) only
//! touch a scratch region at the end of the export and write its old
//! contents back; `--no-write` skips them. Writes the server must refuse
//! (past the end, on a read-only export) change nothing.
//!
//! The files: [`conn`] (sockets and message shapes), one file of rules per
//! area ([`handshake`], [`options`], [`info`], [`meta`], [`transmission`],
//! [`structured`], [`extended`]) and [`report`] (text and JSON output).

pub mod conn;
pub mod extended;
pub mod handshake;
pub mod info;
pub mod meta;
pub mod options;
pub mod report;
pub mod structured;
pub mod transmission;

use std::fmt;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use crate::client::NbdUri;
use conn::{CheckError, Conn, OptReply, Reply, Result, Style, be16, be32, be64, opt, rep};

/// How binding a rule is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// The spec says MUST (or MUST NOT).
    Must,
    /// The spec says SHOULD (or SHOULD NOT).
    Should,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Must => "MUST",
            Self::Should => "SHOULD",
        })
    }
}

/// What a rule found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server follows the rule.
    Pass,
    /// The server breaks it; why.
    Fail(String),
    /// The rule does not apply (feature not advertised, no writes, ...).
    Skip(String),
}

/// One rule of the suite.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// Stable identifier, `area.name`.
    pub id: &'static str,
    /// MUST or SHOULD.
    pub level: Level,
    /// The spec section it comes from.
    pub section: &'static str,
    /// One line: what the server must do.
    pub description: &'static str,
    /// The check.
    pub check: fn(&Ctx) -> Result<Outcome>,
}

/// `return Ok(Outcome::Fail(format!(...)))`.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Ok($crate::check::Outcome::Fail(format!($($arg)*)))
    };
}
/// `return Ok(Outcome::Skip(format!(...)))`.
macro_rules! skip {
    ($($arg:tt)*) => {
        return Ok($crate::check::Outcome::Skip(format!($($arg)*)))
    };
}
pub(crate) use {fail, skip};

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// Limit for each socket operation; each rule gets twice this.
    pub timeout: Duration,
    /// Run the rules that write (to a scratch region, restored).
    pub write: bool,
    /// Run only rules whose id starts with one of these (all if empty).
    pub only: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            write: true,
            only: Vec::new(),
        }
    }
}

/// What a first look at the server found; rules skip what it lacks.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    /// Handshake flags of the greeting.
    pub handshake_flags: u16,
    /// `NBD_OPT_GO` works (else the checker falls back to EXPORT_NAME).
    pub go: bool,
    /// `NBD_OPT_INFO` works.
    pub info: bool,
    /// Export size.
    pub size: u64,
    /// Transmission flags without structured replies.
    pub flags: u16,
    /// Block size constraints (minimum, preferred, maximum) if sent.
    pub block: Option<BlockSizes>,
    /// `NBD_OPT_STRUCTURED_REPLY` is acknowledged.
    pub structured: bool,
    /// Transmission flags with structured replies negotiated.
    pub structured_flags: u16,
    /// `base:allocation` can be selected.
    pub base_allocation: bool,
    /// `NBD_OPT_EXTENDED_HEADERS` is acknowledged.
    pub extended: bool,
}

/// Why the checker could not start.
#[derive(Debug)]
pub enum SetupError {
    /// Cannot connect or not an NBD server.
    Connect(String, CheckError),
    /// The server insists on TLS, which the checker does not speak.
    TlsRequired,
    /// The export cannot be opened.
    Export(String),
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(address, error) => write!(f, "{address}: {error}"),
            Self::TlsRequired => write!(
                f,
                "the server requires TLS (NBD_REP_ERR_TLS_REQD); the checker speaks plain NBD only"
            ),
            Self::Export(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for SetupError {}

/// What every rule gets: where the server is, what the probe found, the
/// options.
#[derive(Debug)]
pub struct Ctx {
    /// The server and export.
    pub uri: NbdUri,
    /// The user's options.
    pub options: Options,
    /// The probe's findings.
    pub probe: Probe,
}

/// How a rule's session should be set up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Setup {
    /// The replies to negotiate: structured replies (`NBD_OPT_STRUCTURED_REPLY`),
    /// extended headers (`NBD_OPT_EXTENDED_HEADERS`) or neither.
    pub style: Style,
    /// Select `base:allocation`.
    pub base_allocation: bool,
    /// Ask for `NBD_INFO_BLOCK_SIZE` in GO (binds the checker to them).
    pub block_size: bool,
}

impl Setup {
    /// Structured replies, nothing else.
    pub const STRUCTURED: Setup = Setup {
        style: Style::Structured,
        base_allocation: false,
        block_size: false,
    };
    /// Extended headers, nothing else.
    pub const EXTENDED: Setup = Setup {
        style: Style::Extended,
        ..Setup::STRUCTURED
    };
}

/// A connection in transmission.
#[derive(Debug)]
pub struct Session {
    /// The connection.
    pub conn: Conn,
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Selected contexts (id, name).
    pub contexts: Vec<(u32, String)>,
}

/// Transmission flag bits.
pub mod tflag {
    use nbd_core::wire::TransmissionFlags as F;
    /// `NBD_FLAG_HAS_FLAGS`
    pub const HAS_FLAGS: u16 = F::HAS_FLAGS.bits();
    /// `NBD_FLAG_READ_ONLY`
    pub const READ_ONLY: u16 = F::READ_ONLY.bits();
    /// `NBD_FLAG_SEND_FLUSH`
    pub const SEND_FLUSH: u16 = F::SEND_FLUSH.bits();
    /// `NBD_FLAG_SEND_FUA`
    pub const SEND_FUA: u16 = F::SEND_FUA.bits();
    /// `NBD_FLAG_SEND_TRIM`
    pub const SEND_TRIM: u16 = F::SEND_TRIM.bits();
    /// `NBD_FLAG_SEND_WRITE_ZEROES`
    pub const SEND_WRITE_ZEROES: u16 = F::SEND_WRITE_ZEROES.bits();
    /// `NBD_FLAG_SEND_DF`
    pub const SEND_DF: u16 = F::SEND_DF.bits();
    /// `NBD_FLAG_SEND_CACHE`
    pub const SEND_CACHE: u16 = F::SEND_CACHE.bits();
    /// `NBD_FLAG_SEND_FAST_ZERO`
    pub const SEND_FAST_ZERO: u16 = F::SEND_FAST_ZERO.bits();
}

/// Size and transmission flags, from `NBD_INFO_EXPORT`.
pub type ExportInfo = (u64, u16);
/// Minimum, preferred and maximum block size, from `NBD_INFO_BLOCK_SIZE`.
pub type BlockSizes = (u32, u32, u32);

/// Parses `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE` out of INFO/GO
/// replies: (size, flags) and the block sizes.
pub fn parse_infos(replies: &[OptReply]) -> Result<(Option<ExportInfo>, Option<BlockSizes>)> {
    let mut export = None;
    let mut block = None;
    for r in replies.iter().filter(|r| r.kind == rep::INFO) {
        if r.data.len() < 2 {
            return conn::protocol(format!("NBD_REP_INFO of {} bytes", r.data.len()));
        }
        match be16(&r.data) {
            conn::info::EXPORT if r.data.len() == 12 => {
                export = Some((be64(&r.data[2..10]), be16(&r.data[10..12])));
            }
            conn::info::BLOCK_SIZE if r.data.len() == 14 => {
                block = Some((
                    be32(&r.data[2..6]),
                    be32(&r.data[6..10]),
                    be32(&r.data[10..14]),
                ));
            }
            conn::info::EXPORT | conn::info::BLOCK_SIZE => {
                return conn::protocol(format!(
                    "NBD_INFO type {} with length {}",
                    be16(&r.data),
                    r.data.len()
                ));
            }
            _ => {}
        }
    }
    Ok((export, block))
}

impl Ctx {
    /// A fresh connection ready for options.
    pub fn open(&self) -> Result<Conn> {
        Conn::open(&self.uri, self.options.timeout)
    }

    /// The export name under test.
    pub fn export(&self) -> &str {
        &self.uri.export
    }

    /// The minimum block size (1 if none advertised).
    pub fn min_block(&self) -> u64 {
        self.probe
            .block
            .map_or(1, |(min, _, _)| u64::from(min.max(1)))
    }

    /// A length for ordinary requests: 4 KiB or the minimum block size,
    /// never past the export.
    pub fn io_len(&self) -> u64 {
        let len = self.min_block().max(4096);
        if len <= self.probe.size {
            len
        } else {
            self.probe.size - self.probe.size % self.min_block()
        }
    }

    /// `max` bytes, or the whole export if smaller, rounded down to the
    /// minimum block size: the length of a large request from offset 0.
    pub fn aligned_len(&self, max: u64) -> u64 {
        max.min(self.probe.size) / self.min_block() * self.min_block()
    }

    /// The scratch region writing rules may use (offset, length), or why
    /// there is none.
    pub fn scratch(&self) -> std::result::Result<(u64, u64), String> {
        if !self.options.write {
            return Err("writes disabled (--no-write)".into());
        }
        if self.probe.flags & tflag::READ_ONLY != 0 {
            return Err("the export is read-only".into());
        }
        let unit = self.min_block().max(4096);
        let len = unit * 2;
        if self.probe.size < len * 2 {
            return Err(format!(
                "export of {} bytes is too small for a scratch region",
                self.probe.size
            ));
        }
        let offset = (self.probe.size - len) / unit * unit;
        Ok((offset, len))
    }

    /// Opens a session in transmission as `setup` says.
    pub fn session(&self, setup: Setup) -> Result<Session> {
        let mut conn = self.open()?;
        let negotiate = match setup.style {
            Style::Simple => None,
            Style::Structured => Some((opt::STRUCTURED_REPLY, "NBD_OPT_STRUCTURED_REPLY")),
            Style::Extended => Some((opt::EXTENDED_HEADERS, "NBD_OPT_EXTENDED_HEADERS")),
        };
        if let Some((option, name)) = negotiate {
            let r = conn.option_final(option, &[])?;
            if r.kind != rep::ACK {
                return conn::protocol(format!(
                    "{name} got {} (the probe saw it acknowledged)",
                    conn::rep_name(r.kind)
                ));
            }
        }
        let mut contexts = Vec::new();
        if setup.base_allocation {
            let replies = conn.option(
                opt::SET_META_CONTEXT,
                &conn::meta_payload(self.export(), &["base:allocation"]),
            )?;
            for r in &replies {
                if r.kind == rep::META_CONTEXT && r.data.len() >= 4 {
                    contexts.push((
                        be32(&r.data),
                        String::from_utf8_lossy(&r.data[4..]).into_owned(),
                    ));
                }
            }
        }
        let requests: &[u16] = if setup.block_size {
            &[conn::info::BLOCK_SIZE]
        } else {
            &[]
        };
        let (size, flags) = if self.probe.go {
            let replies = conn.option(opt::GO, &conn::info_payload(self.export(), requests))?;
            let last = replies.last().map_or(0, |r| r.kind);
            if last != rep::ACK {
                return conn::protocol(format!("NBD_OPT_GO got {}", conn::rep_name(last)));
            }
            match parse_infos(&replies)?.0 {
                Some(export) => export,
                None => return conn::protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"),
            }
        } else {
            conn.send_option(opt::EXPORT_NAME, self.export().as_bytes())?;
            let n = if conn.handshake_flags & conn::NO_ZEROES != 0 {
                10
            } else {
                134
            };
            let data = conn.read_exact(n)?;
            (be64(&data[0..8]), be16(&data[8..10]))
        };
        conn.style = setup.style;
        Ok(Session {
            conn,
            size,
            flags,
            contexts,
        })
    }
}

impl Session {
    /// Reads `len` bytes at `offset` and assembles them (holes as zeroes);
    /// an error reply is returned as `Err(value)`.
    pub fn read(&mut self, offset: u64, len: u64) -> Result<std::result::Result<Vec<u8>, u32>> {
        let replies = self.conn.exchange(0, conn::cmd::READ, offset, len, &[])?;
        assemble(&replies, offset, len)
    }

    /// Writes `data` at `offset`; `Err(value)` on an error reply.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<std::result::Result<(), u32>> {
        let replies = self
            .conn
            .exchange(0, conn::cmd::WRITE, offset, data.len() as u64, data)?;
        Ok(match conn::reply_error(&replies) {
            Some(e) => Err(e),
            None => Ok(()),
        })
    }
}

/// Puts the content chunks of a read reply together (or takes a simple
/// reply's data), checking they stay inside the request.
pub fn assemble(
    replies: &[Reply],
    offset: u64,
    len: u64,
) -> Result<std::result::Result<Vec<u8>, u32>> {
    if let Some(e) = conn::reply_error(replies) {
        return Ok(Err(e));
    }
    if let [only] = replies
        && only.is_simple()
    {
        return Ok(Ok(only.payload.clone()));
    }
    let mut data = vec![0u8; len as usize];
    for r in replies {
        match r.kind {
            conn::chunk::OFFSET_DATA if r.payload.len() >= 8 => {
                let at = be64(&r.payload);
                let bytes = &r.payload[8..];
                let end = at.saturating_add(bytes.len() as u64);
                if at < offset || end > offset + len {
                    return conn::protocol("data chunk outside the request");
                }
                let start = (at - offset) as usize;
                data[start..start + bytes.len()].copy_from_slice(bytes);
            }
            conn::chunk::OFFSET_HOLE if r.payload.len() == 12 => {
                let at = be64(&r.payload);
                let size = u64::from(be32(&r.payload[8..12]));
                if at < offset || at.saturating_add(size) > offset + len {
                    return conn::protocol("hole chunk outside the request");
                }
                let start = (at - offset) as usize;
                data[start..start + size as usize].fill(0);
            }
            _ => {}
        }
    }
    Ok(Ok(data))
}

/// Every rule, in the order they run.
pub fn rules() -> Vec<Rule> {
    let mut all = Vec::new();
    all.extend(handshake::rules());
    all.extend(options::rules());
    all.extend(info::rules());
    all.extend(meta::rules());
    all.extend(transmission::rules());
    all.extend(structured::rules());
    all.extend(extended::rules());
    all
}

/// Looks at the server once: greeting, export, what it supports.
pub fn probe(uri: &NbdUri, timeout: Duration) -> std::result::Result<Probe, SetupError> {
    let address = uri.address();
    let connect = |e| SetupError::Connect(address.clone(), e);
    let mut p = Probe::default();
    let mut conn = Conn::open(uri, timeout).map_err(connect)?;
    p.handshake_flags = conn.handshake_flags;
    let replies = conn
        .option(
            opt::INFO,
            &conn::info_payload(&uri.export, &[conn::info::BLOCK_SIZE]),
        )
        .map_err(connect)?;
    let last = replies.last().map_or(0, |r| r.kind);
    if last == rep::ERR_TLS_REQD {
        return Err(SetupError::TlsRequired);
    }
    if last == rep::ACK {
        p.info = true;
        p.go = true;
        let (export, block) = parse_infos(&replies).map_err(connect)?;
        let (size, flags) = export.ok_or_else(|| {
            SetupError::Export("NBD_OPT_INFO succeeded without NBD_INFO_EXPORT".into())
        })?;
        p.size = size;
        p.flags = flags;
        p.block = block;
    }
    // GO tells the truth where INFO may not (some servers report size 0
    // to INFO): take size and flags from a real GO, or EXPORT_NAME.
    let mut conn = Conn::open(uri, timeout).map_err(connect)?;
    let replies = conn
        .option(
            opt::GO,
            &conn::info_payload(&uri.export, &[conn::info::BLOCK_SIZE]),
        )
        .map_err(connect)?;
    match replies.last().map_or(0, |r| r.kind) {
        rep::ACK => {
            p.go = true;
            let (export, block) = parse_infos(&replies).map_err(connect)?;
            if let Some((size, flags)) = export {
                p.size = size;
                p.flags = flags;
            }
            if block.is_some() {
                p.block = block;
            }
        }
        rep::ERR_UNSUP => {
            p.go = false;
            let mut conn = Conn::open(uri, timeout).map_err(connect)?;
            conn.send_option(opt::EXPORT_NAME, uri.export.as_bytes())
                .map_err(connect)?;
            let data = conn.read_exact(10).map_err(|e| {
                SetupError::Export(format!("NBD_OPT_EXPORT_NAME `{}` failed: {e}", uri.export))
            })?;
            p.size = be64(&data);
            p.flags = be16(&data[8..10]);
        }
        other => {
            return Err(SetupError::Export(format!(
                "export `{}`: NBD_OPT_GO got {}",
                uri.export,
                conn::rep_name(other)
            )));
        }
    }
    conn.disconnect();
    // Structured replies and base:allocation.
    let mut conn = Conn::open(uri, timeout).map_err(connect)?;
    let r = conn
        .option_final(opt::STRUCTURED_REPLY, &[])
        .map_err(connect)?;
    p.structured = r.kind == rep::ACK;
    if p.structured {
        let replies = conn
            .option(
                opt::SET_META_CONTEXT,
                &conn::meta_payload(&uri.export, &["base:allocation"]),
            )
            .map_err(connect)?;
        p.base_allocation = replies.iter().any(|r| r.kind == rep::META_CONTEXT)
            && replies.last().is_some_and(|r| r.kind == rep::ACK);
        if p.go {
            let replies = conn
                .option(opt::GO, &conn::info_payload(&uri.export, &[]))
                .map_err(connect)?;
            if let Ok((Some((_, flags)), _)) = parse_infos(&replies) {
                p.structured_flags = flags;
            }
            conn.style = Style::Structured;
            conn.disconnect();
        }
    }
    // Extended headers.
    let mut conn = Conn::open(uri, timeout).map_err(connect)?;
    let r = conn
        .option_final(opt::EXTENDED_HEADERS, &[])
        .map_err(connect)?;
    p.extended = r.kind == rep::ACK && p.go;
    Ok(p)
}

/// One rule's result.
#[derive(Clone, Debug)]
pub struct RuleResult {
    /// The rule.
    pub id: &'static str,
    /// Its level.
    pub level: Level,
    /// Its section.
    pub section: &'static str,
    /// Its description.
    pub description: &'static str,
    /// What it found.
    pub outcome: Outcome,
}

/// Everything a run found.
#[derive(Clone, Debug)]
pub struct Report {
    /// What the probe saw.
    pub probe: Probe,
    /// One entry per rule run.
    pub results: Vec<RuleResult>,
}

impl Report {
    /// (passed, failed, skipped).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for r in &self.results {
            match r.outcome {
                Outcome::Pass => c.0 += 1,
                Outcome::Fail(_) => c.1 += 1,
                Outcome::Skip(_) => c.2 += 1,
            }
        }
        c
    }
}

/// Runs one rule in its own thread within its time budget.
fn run_rule(rule: Rule, ctx: &Arc<Ctx>) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let thread_ctx = Arc::clone(ctx);
    let spawned = std::thread::Builder::new()
        .name(rule.id.to_owned())
        .spawn(move || {
            let outcome = match (rule.check)(&thread_ctx) {
                Ok(outcome) => outcome,
                Err(error) => Outcome::Fail(error.to_string()),
            };
            let _ = tx.send(outcome);
        });
    if let Err(error) = spawned {
        return Outcome::Fail(format!("cannot start the rule's thread: {error}"));
    }
    let budget = ctx.options.timeout * 2 + Duration::from_secs(1);
    match rx.recv_timeout(budget) {
        Ok(outcome) => outcome,
        // The thread's sockets time out on their own; it is left behind.
        Err(_) => Outcome::Fail(format!("did not finish within {} s", budget.as_secs_f64())),
    }
}

/// Probes the server and runs every selected rule, calling `each` as
/// results come in.
pub fn run(
    uri: &NbdUri,
    options: &Options,
    mut each: impl FnMut(&RuleResult),
) -> std::result::Result<Report, SetupError> {
    let probe = probe(uri, options.timeout)?;
    let ctx = Arc::new(Ctx {
        uri: uri.clone(),
        options: options.clone(),
        probe: probe.clone(),
    });
    let mut results = Vec::new();
    for rule in rules() {
        if !options.only.is_empty() && !options.only.iter().any(|p| rule.id.starts_with(p.as_str()))
        {
            continue;
        }
        let outcome = run_rule(rule, &ctx);
        let result = RuleResult {
            id: rule.id,
            level: rule.level,
            section: rule.section,
            description: rule.description,
            outcome,
        };
        each(&result);
        results.push(result);
    }
    Ok(Report { probe, results })
}

/// `nbd-std check`: runs the suite against `uri` and prints the results
/// (lines as they come, or JSON at the end). Returns the exit status: 0
/// when no rule failed, 1 when one did, 2 when the server could not be
/// checked (bad URI, cannot connect, not an NBD server, TLS required).
pub fn command(uri: &str, options: &Options, json: bool) -> u8 {
    // The rules speak plain NBD; a TLS URI would be checked unencrypted.
    if uri.to_ascii_lowercase().starts_with("nbds") {
        eprintln!(
            "nbd-std: check: `{uri}` asks for TLS; the checker speaks plain NBD only (use nbd:// or nbd+unix://)"
        );
        return 2;
    }
    let parsed = match NbdUri::parse(uri) {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("nbd-std: check: {error}");
            return 2;
        }
    };
    // Not println!, which panics once the reader is gone (`| head`): a
    // line that cannot be written is dropped and the checks go on; the
    // exit status still tells the outcome.
    let print = |text: &str| {
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), "{text}").is_ok()
    };
    let result = run(&parsed, options, |r| {
        if !json {
            print(&report::line(r));
        }
    });
    let report = match result {
        Ok(report) => report,
        Err(error) => {
            eprintln!("nbd-std: check: {error}");
            return 2;
        }
    };
    if json {
        print(&format!("{:#}", report::json(uri, &report)));
    } else {
        print(&report::summary(&report));
        eprintln!("{}", report::probe_line(uri, &report.probe));
    }
    if report.counts().1 > 0 { 1 } else { 0 }
}
