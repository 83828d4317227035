//! A backend layer that makes requests fail on purpose, so client authors
//! can see how their code copes with storage errors (smoltcp's fault
//! injector, for storage).
//!
//! Rules come from the export specification (`fail=eio:0.01`,
//! `fail=eio@1M-2M`, `fail=enospc@0-4K/write`, `fail-seed=7`; see
//! [`FaultRule::parse`]). A rule fails a request either at random with a
//! given probability or whenever the request touches a byte range. Faults
//! hit `read_at`, `write_at` and `write_zeroes` (NBD_CMD_READ, WRITE and
//! WRITE_ZEROES); flush, trim, cache, block status and resize always pass
//! through, so a client can still flush, discard and map the export while
//! its data requests fail. `ENOSPC` is only ever given to writes: the spec
//! reserves it for requests that store data.
//!
//! The layer reports [`may_block`](Backend::may_block) as true whatever
//! it wraps: the server then hands it each write whole, in one call, so a
//! rule decides once per request and the client gets the error for
//! exactly the requests the rule chose (a non-blocking backend is fed a
//! write's payload piece by piece as it arrives).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nbd_core::export::Capabilities;
use nbd_core::wire::{BlockSizeConstraints, ExtDescriptor};

use super::{Backend, ZeroFlags};
use crate::size::parse_size;

/// `EIO` on Linux (and `NBD_EIO` on the wire).
const EIO: i32 = 5;
/// `ENOSPC` on Linux (and `NBD_ENOSPC` on the wire).
const ENOSPC: i32 = 28;

/// The error a rule injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// `EIO`: the client sees `NBD_EIO` (5).
    Io,
    /// `ENOSPC`: the client sees `NBD_ENOSPC` (28). Writes only.
    NoSpace,
}

impl FaultError {
    fn os_error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            Self::Io => EIO,
            Self::NoSpace => ENOSPC,
        })
    }
}

/// Which requests a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultTarget {
    /// Reads and writes (the default; `ENOSPC` rules only ever hit writes).
    All,
    /// Reads only (`/read`).
    Read,
    /// Writes and write-zeroes only (`/write`).
    Write,
}

/// When a rule fires. Rates compare by their bits, so equality is an
/// equivalence (and export specifications can be `Eq`).
#[derive(Clone, Copy, Debug)]
pub enum FaultTrigger {
    /// At random, with this probability per request (0 to 1).
    Rate(f64),
    /// Whenever the request touches bytes `start..end`.
    Range {
        /// First byte of the range.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
}

impl PartialEq for FaultTrigger {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Rate(a), Self::Rate(b)) => a.to_bits() == b.to_bits(),
            (
                Self::Range { start, end },
                Self::Range {
                    start: other_start,
                    end: other_end,
                },
            ) => start == other_start && end == other_end,
            _ => false,
        }
    }
}

impl Eq for FaultTrigger {}

/// One `fail=` option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRule {
    /// The error given.
    pub error: FaultError,
    /// When.
    pub trigger: FaultTrigger,
    /// To which requests.
    pub target: FaultTarget,
}

/// Why a `fail=` or `fail-seed=` value was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultSpecError {
    /// Neither `KIND:RATE` nor `KIND@START-END`.
    Shape(String),
    /// The error is not `eio` or `enospc`.
    Kind(String),
    /// The rate is not a number from 0 to 1.
    Rate(String),
    /// A range bound is not a size, or the range is empty.
    Range(String),
    /// The suffix after `/` is not `read` or `write`.
    Target(String),
    /// `enospc` asked for reads.
    NoSpaceOnRead,
    /// The seed is not a 64-bit unsigned number.
    Seed(String),
}

impl fmt::Display for FaultSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shape(text) => write!(
                f,
                "`fail={text}`: expected fail=KIND:RATE or fail=KIND@START-END, optionally followed by /read or /write"
            ),
            Self::Kind(kind) => write!(f, "`{kind}`: unknown fault (expected eio or enospc)"),
            Self::Rate(rate) => write!(f, "`{rate}`: the rate must be a number from 0 to 1"),
            Self::Range(range) => write!(
                f,
                "`{range}`: expected START-END, two sizes (bytes or with K, M, G, T) with START below END"
            ),
            Self::Target(target) => {
                write!(f, "`/{target}`: unknown target (expected /read or /write)")
            }
            Self::NoSpaceOnRead => {
                write!(
                    f,
                    "enospc faults apply to writes only (NBD_ENOSPC is for writes)"
                )
            }
            Self::Seed(seed) => write!(f, "`fail-seed={seed}`: expected a number"),
        }
    }
}

impl std::error::Error for FaultSpecError {}

impl FaultRule {
    /// Parses the value of a `fail=` option: `KIND:RATE` or
    /// `KIND@START-END`, then optionally `/read` or `/write`. `KIND` is
    /// `eio` or `enospc`; `RATE` a probability from 0 to 1; `START` and
    /// `END` sizes (bytes, or with K, M, G, T), `END` excluded.
    pub fn parse(text: &str) -> Result<Self, FaultSpecError> {
        let (body, target) = match text.split_once('/') {
            Some((body, "read")) => (body, FaultTarget::Read),
            Some((body, "write")) => (body, FaultTarget::Write),
            Some((_, other)) => return Err(FaultSpecError::Target(other.to_owned())),
            None => (text, FaultTarget::All),
        };
        let (kind, trigger) = if let Some((kind, rate)) = body.split_once(':') {
            (kind, parse_rate(rate)?)
        } else if let Some((kind, range)) = body.split_once('@') {
            (kind, parse_range(range)?)
        } else {
            return Err(FaultSpecError::Shape(text.to_owned()));
        };
        let error = match kind {
            "eio" => FaultError::Io,
            "enospc" => FaultError::NoSpace,
            other => return Err(FaultSpecError::Kind(other.to_owned())),
        };
        if error == FaultError::NoSpace && target == FaultTarget::Read {
            return Err(FaultSpecError::NoSpaceOnRead);
        }
        Ok(Self {
            error,
            trigger,
            target,
        })
    }

    fn hits(&self, op: Op) -> bool {
        match (self.target, op) {
            (FaultTarget::Read, Op::Write) | (FaultTarget::Write, Op::Read) => false,
            (_, Op::Read) => self.error != FaultError::NoSpace,
            (_, Op::Write) => true,
        }
    }
}

impl fmt::Display for FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.error {
            FaultError::Io => "eio",
            FaultError::NoSpace => "enospc",
        })?;
        match self.trigger {
            FaultTrigger::Rate(rate) => write!(f, ":{rate}")?,
            FaultTrigger::Range { start, end } => write!(f, "@{start}-{end}")?,
        }
        match self.target {
            FaultTarget::All => Ok(()),
            FaultTarget::Read => f.write_str("/read"),
            FaultTarget::Write => f.write_str("/write"),
        }
    }
}

/// Parses the value of a `fail-seed=` option.
pub fn parse_seed(text: &str) -> Result<u64, FaultSpecError> {
    text.parse()
        .map_err(|_| FaultSpecError::Seed(text.to_owned()))
}

fn parse_rate(text: &str) -> Result<FaultTrigger, FaultSpecError> {
    match text.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(FaultTrigger::Rate(rate)),
        _ => Err(FaultSpecError::Rate(text.to_owned())),
    }
}

fn parse_range(text: &str) -> Result<FaultTrigger, FaultSpecError> {
    let bad = || FaultSpecError::Range(text.to_owned());
    let (start, end) = text.split_once('-').ok_or_else(bad)?;
    // Offsets, unlike export sizes, may be 0.
    let offset = |text: &str| text.parse::<u64>().ok().or_else(|| parse_size(text).ok());
    let start = offset(start).ok_or_else(bad)?;
    let end = offset(end).ok_or_else(bad)?;
    if start >= end {
        return Err(bad());
    }
    Ok(FaultTrigger::Range { start, end })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

/// A backend whose reads and writes fail as its rules say.
pub struct FaultBackend {
    inner: Arc<dyn Backend>,
    rules: Vec<FaultRule>,
    /// SplitMix64 counter: each draw takes the next value, so a run is
    /// reproducible from the seed (given the same order of requests).
    state: AtomicU64,
}

impl fmt::Debug for FaultBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultBackend")
            .field("rules", &self.rules)
            .field("size", &self.inner.size())
            .finish_non_exhaustive()
    }
}

impl FaultBackend {
    /// Wraps `inner`; random draws start from `seed`.
    pub fn new(inner: Arc<dyn Backend>, rules: Vec<FaultRule>, seed: u64) -> Self {
        Self {
            inner,
            rules,
            state: AtomicU64::new(seed),
        }
    }

    /// The rules, in the order they are tried.
    pub fn rules(&self) -> &[FaultRule] {
        &self.rules
    }

    /// A uniform draw in `[0, 1)`.
    fn draw(&self) -> f64 {
        const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut z = self
            .state
            .fetch_add(GOLDEN, Ordering::Relaxed)
            .wrapping_add(GOLDEN);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The error the first matching rule gives, if any. Every rate rule
    /// that applies draws, so one rule's draws do not depend on another's
    /// outcome.
    fn check(&self, op: Op, offset: u64, length: u64) -> io::Result<()> {
        let mut failure = None;
        for rule in self.rules.iter().filter(|rule| rule.hits(op)) {
            let fires = match rule.trigger {
                FaultTrigger::Rate(rate) => self.draw() < rate,
                FaultTrigger::Range { start, end } => {
                    offset < end && offset.saturating_add(length.max(1)) > start
                }
            };
            if fires && failure.is_none() {
                failure = Some(rule.error);
            }
        }
        match failure {
            Some(error) => Err(error.os_error()),
            None => Ok(()),
        }
    }
}

impl Backend for FaultBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn block_sizes(&self) -> BlockSizeConstraints {
        self.inner.block_sizes()
    }

    /// Always true: see the module docs (one call per write request).
    fn may_block(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(Op::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check(Op::Write, offset, data.len() as u64)?;
        self.inner.write_at(data, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn flush_range(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.flush_range(offset, length)
    }

    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.trim(offset, length)
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check(Op::Write, offset, length)?;
        self.inner.write_zeroes(offset, length, flags)
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.cache(offset, length)
    }

    fn block_status(
        &self,
        offset: u64,
        length: u64,
        extents: &mut Vec<ExtDescriptor>,
    ) -> io::Result<()> {
        self.inner.block_status(offset, length, extents)
    }

    fn resize(&self, size: u64) -> io::Result<()> {
        self.inner.resize(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::backend::error_code;
    use nbd_core::wire::ErrorCode;

    #[test]
    fn parses_rules() {
        assert_eq!(
            FaultRule::parse("eio:0.01"),
            Ok(FaultRule {
                error: FaultError::Io,
                trigger: FaultTrigger::Rate(0.01),
                target: FaultTarget::All,
            })
        );
        assert_eq!(
            FaultRule::parse("eio@1M-2M/read"),
            Ok(FaultRule {
                error: FaultError::Io,
                trigger: FaultTrigger::Range {
                    start: 1 << 20,
                    end: 2 << 20,
                },
                target: FaultTarget::Read,
            })
        );
        assert_eq!(
            FaultRule::parse("enospc@0-4096/write").map(|r| r.error),
            Ok(FaultError::NoSpace)
        );
        assert_eq!(
            FaultRule::parse("eio:1").map(|r| r.trigger),
            Ok(FaultTrigger::Rate(1.0))
        );
        assert_eq!(parse_seed("42"), Ok(42));
        assert_eq!(
            FaultRule::parse("eio@4K-8K").map(|r| r.to_string()),
            Ok("eio@4096-8192".to_owned())
        );
    }

    #[test]
    fn refuses_bad_rules() {
        for (bad, expected) in [
            ("eio", FaultSpecError::Shape("eio".to_owned())),
            ("eperm:0.5", FaultSpecError::Kind("eperm".to_owned())),
            ("eio:1.5", FaultSpecError::Rate("1.5".to_owned())),
            ("eio:-0.1", FaultSpecError::Rate("-0.1".to_owned())),
            ("eio:NaN", FaultSpecError::Rate("NaN".to_owned())),
            ("eio:x", FaultSpecError::Rate("x".to_owned())),
            ("eio@2M-1M", FaultSpecError::Range("2M-1M".to_owned())),
            ("eio@5-5", FaultSpecError::Range("5-5".to_owned())),
            ("eio@5", FaultSpecError::Range("5".to_owned())),
            ("eio@a-9", FaultSpecError::Range("a-9".to_owned())),
            ("eio:0.5/trim", FaultSpecError::Target("trim".to_owned())),
            ("enospc:1/read", FaultSpecError::NoSpaceOnRead),
        ] {
            assert_eq!(FaultRule::parse(bad), Err(expected), "{bad}");
        }
        assert!(parse_seed("-1").is_err());
        // Every refusal says what was expected.
        assert!(
            FaultRule::parse("eio")
                .expect_err("no rate or range")
                .to_string()
                .contains("KIND:RATE")
        );
    }

    fn layer(rules: &[&str], seed: u64) -> FaultBackend {
        let rules = rules
            .iter()
            .map(|r| FaultRule::parse(r).expect("rule"))
            .collect();
        FaultBackend::new(Arc::new(MemoryBackend::new(1 << 20)), rules, seed)
    }

    #[test]
    fn range_rules_fail_exactly_the_requests_touching_the_range() {
        let backend = layer(&["eio@8192-12288"], 0);
        let mut buf = [0u8; 4096];
        assert!(backend.read_at(&mut buf, 4096).is_ok(), "ends at the start");
        assert!(
            backend.read_at(&mut buf, 12288).is_ok(),
            "starts at the end"
        );
        for offset in [6144, 8192, 10240] {
            let error = backend.read_at(&mut buf, offset).expect_err("touches");
            assert_eq!(error_code(&error), ErrorCode::Io);
            let error = backend.write_at(&buf, offset).expect_err("touches");
            assert_eq!(error_code(&error), ErrorCode::Io);
        }
        assert!(
            backend
                .write_zeroes(0, 1 << 20, ZeroFlags::default())
                .is_err()
        );
        // Everything else passes through.
        assert!(backend.trim(0, 1 << 20).is_ok());
        assert!(backend.flush().is_ok());
        let mut extents = Vec::new();
        assert!(backend.block_status(0, 1 << 20, &mut extents).is_ok());
        assert!(!extents.is_empty());
    }

    #[test]
    fn failed_writes_store_nothing() {
        let backend = layer(&["enospc@0-4096/write"], 0);
        let error = backend.write_at(&[7; 8192], 0).expect_err("touches");
        assert_eq!(error_code(&error), ErrorCode::NoSpace);
        let mut buf = [1u8; 8192];
        backend.read_at(&mut buf, 0).expect("reads are not hit");
        assert_eq!(buf, [0; 8192]);
    }

    #[test]
    fn rates_are_honoured_and_reproducible() {
        let mut buf = [0u8; 512];
        let always = layer(&["eio:1"], 1);
        assert!((0..1000).all(|_| always.read_at(&mut buf, 0).is_err()));
        let never = layer(&["eio:0"], 1);
        assert!((0..1000).all(|_| never.read_at(&mut buf, 0).is_ok()));
        let outcomes = |seed| {
            let backend = layer(&["eio:0.25"], seed);
            (0..4000)
                .map(|_| backend.read_at(&mut [0u8; 512], 0).is_err())
                .collect::<Vec<_>>()
        };
        let first = outcomes(9);
        assert_eq!(first, outcomes(9), "same seed, same faults");
        assert_ne!(first, outcomes(10), "another seed, other faults");
        let failed = first.iter().filter(|&&f| f).count();
        assert!((800..1200).contains(&failed), "{failed} of 4000 at 0.25");
    }
}
