//! `NBD_OPT_INFO` and `NBD_OPT_GO`, and the block size constraints they
//! carry (spec: "NBD_OPT_INFO and NBD_OPT_GO", "Option reply types:
//! NBD_REP_INFO", "Block size constraints", "Transmission flags").

use super::conn::{self, be16, info, info_payload, opt, rep, rep_name};
use super::options::MISSING_EXPORT;
use super::{Ctx, Level, Outcome, Result, Rule, Setup, fail, parse_infos, skip, tflag};

/// The rules of this file.
pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            id: "info.export-info",
            level: Level::Must,
            section: "NBD_OPT_INFO and NBD_OPT_GO",
            description: "A successful INFO sends NBD_INFO_EXPORT before NBD_REP_ACK",
            check: export_info,
        },
        Rule {
            id: "info.reply-lengths",
            level: Level::Must,
            section: "Option reply types: NBD_REP_INFO",
            description: "NBD_REP_INFO lengths fit their type (EXPORT 12, BLOCK_SIZE 14, NAME/DESCRIPTION at least 2)",
            check: reply_lengths,
        },
        Rule {
            id: "info.has-flags",
            level: Level::Must,
            section: "Transmission flags",
            description: "NBD_FLAG_HAS_FLAGS is set in the transmission flags",
            check: has_flags,
        },
        Rule {
            id: "info.flags-consistent",
            level: Level::Must,
            section: "Transmission flags",
            description: "SEND_DF is clear without structured replies; SEND_FAST_ZERO only with SEND_WRITE_ZEROES",
            check: flags_consistent,
        },
        Rule {
            id: "info.stays-negotiating",
            level: Level::Must,
            section: "NBD_OPT_INFO and NBD_OPT_GO",
            description: "After a successful INFO the session is still negotiating options",
            check: stays_negotiating,
        },
        Rule {
            id: "info.unknown-export",
            level: Level::Should,
            section: "NBD_OPT_INFO and NBD_OPT_GO",
            description: "INFO on an export that does not exist gets NBD_REP_ERR_UNKNOWN and no NBD_REP_INFO",
            check: unknown_export,
        },
        Rule {
            id: "info.name-too-long",
            level: Level::Must,
            section: "NBD_OPT_INFO and NBD_OPT_GO; Termination of the session during option haggling",
            description: "INFO whose name length runs past the option gets an error (and negotiation continues) or a hard disconnect, never ACK or a wait for bytes past the option",
            check: name_too_long,
        },
        Rule {
            id: "info.truncated",
            level: Level::Must,
            section: "NBD_OPT_INFO and NBD_OPT_GO; Termination of the session during option haggling",
            description: "INFO shorter than 6 bytes, or missing promised requests, gets an error or a hard disconnect, never ACK or a wait for more bytes",
            check: truncated,
        },
        Rule {
            id: "info.unknown-request-ignored",
            level: Level::Must,
            section: "NBD_OPT_INFO and NBD_OPT_GO",
            description: "An information request the server does not know is ignored (INFO still succeeds)",
            check: unknown_request_ignored,
        },
        Rule {
            id: "info.block-size-valid",
            level: Level::Must,
            section: "Block size constraints",
            description: "Block sizes: minimum a power of 2 <= 64 KiB; preferred a power of 2 >= max(minimum, 512); maximum a multiple of minimum (or 0xffffffff) >= min(preferred, size)",
            check: block_size_valid,
        },
        Rule {
            id: "info.block-size-max-1m",
            level: Level::Should,
            section: "Block size constraints",
            description: "The maximum block size is at least 1 MiB when the export is that large",
            check: block_size_max_1m,
        },
        Rule {
            id: "info.size-multiple-of-minimum",
            level: Level::Should,
            section: "Block size constraints",
            description: "The export size is a multiple of the minimum block size",
            check: size_multiple_of_minimum,
        },
        Rule {
            id: "go.matches-info",
            level: Level::Must,
            section: "NBD_OPT_INFO and NBD_OPT_GO",
            description: "GO right after INFO with the same parameters reports the same size and flags",
            check: go_matches_info,
        },
        Rule {
            id: "go.enters-transmission",
            level: Level::Must,
            section: "NBD_OPT_INFO and NBD_OPT_GO",
            description: "After GO's NBD_REP_ACK transmission starts at once (no padding): a read gets its reply",
            check: go_enters_transmission,
        },
        Rule {
            id: "go.unknown-export",
            level: Level::Must,
            section: "NBD_OPT_INFO and NBD_OPT_GO",
            description: "GO on an export that does not exist gets an error and negotiation continues",
            check: go_unknown_export,
        },
    ]
}

fn need_info(ctx: &Ctx) -> Option<Outcome> {
    (!ctx.probe.info).then(|| Outcome::Skip("the server does not support NBD_OPT_INFO".into()))
}

fn export_info(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_info(ctx) {
        return Ok(o);
    }
    let mut conn = ctx.open()?;
    let replies = conn.option(opt::INFO, &info_payload(ctx.export(), &[]))?;
    let (last, infos) = replies.split_last().ok_or(conn::CheckError::Closed)?;
    if last.kind != rep::ACK {
        fail!("INFO got {}", rep_name(last.kind));
    }
    if let Some(r) = infos.iter().find(|r| r.kind != rep::INFO) {
        fail!("INFO sent {} before NBD_REP_ACK", rep_name(r.kind));
    }
    if !infos
        .iter()
        .any(|r| r.data.len() >= 2 && be16(&r.data) == info::EXPORT)
    {
        fail!("no NBD_INFO_EXPORT before NBD_REP_ACK");
    }
    Ok(Outcome::Pass)
}

fn reply_lengths(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_info(ctx) {
        return Ok(o);
    }
    let mut conn = ctx.open()?;
    let requests = [info::NAME, info::DESCRIPTION, info::BLOCK_SIZE];
    let replies = conn.option(opt::INFO, &info_payload(ctx.export(), &requests))?;
    // parse_infos refuses exactly the lengths this rule is about.
    if let Err(why) = parse_infos(&replies) {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn has_flags(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.flags & tflag::HAS_FLAGS == 0 {
        fail!("transmission flags {:#06x}", ctx.probe.flags);
    }
    Ok(Outcome::Pass)
}

fn flags_consistent(ctx: &Ctx) -> Result<Outcome> {
    let s = ctx.session(Setup::default())?;
    if s.flags & tflag::SEND_DF != 0 {
        fail!("NBD_FLAG_SEND_DF set without structured replies");
    }
    for flags in [s.flags, ctx.probe.structured_flags] {
        if flags & tflag::SEND_FAST_ZERO != 0 && flags & tflag::SEND_WRITE_ZEROES == 0 {
            fail!("NBD_FLAG_SEND_FAST_ZERO set without NBD_FLAG_SEND_WRITE_ZEROES");
        }
    }
    Ok(Outcome::Pass)
}

fn stays_negotiating(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_info(ctx) {
        return Ok(o);
    }
    let mut conn = ctx.open()?;
    conn.option(opt::INFO, &info_payload(ctx.export(), &[]))?;
    if let Err(why) = conn.still_negotiating()? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn unknown_export(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_info(ctx) {
        return Ok(o);
    }
    let mut conn = ctx.open()?;
    let replies = conn.option(opt::INFO, &info_payload(MISSING_EXPORT, &[]))?;
    let (last, rest) = replies.split_last().ok_or(conn::CheckError::Closed)?;
    if last.kind == rep::ACK {
        skip!("the server accepts any export name");
    }
    if last.kind != rep::ERR_UNKNOWN {
        fail!("INFO on a missing export got {}", rep_name(last.kind));
    }
    if !rest.is_empty() {
        fail!("{} NBD_REP_INFO sent before the error", rest.len());
    }
    Ok(Outcome::Pass)
}

/// Sends INFO with a crafted payload; the server must answer with an
/// error and keep negotiating.
fn expect_error(ctx: &Ctx, data: &[u8]) -> Result<std::result::Result<(), String>> {
    let mut conn = ctx.open()?;
    let replies = match conn.option(opt::INFO, data) {
        Ok(r) => r,
        // The client broke a MUST: the spec lets the server hang up.
        Err(conn::CheckError::Closed) => return Ok(Ok(())),
        Err(conn::CheckError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Ok(Ok(()));
        }
        Err(e) => {
            return Ok(Err(format!(
                "{e} (the server read past the option's length?)"
            )));
        }
    };
    let last = replies.last().map_or(0, |r| r.kind);
    if last == rep::ACK {
        return Ok(Err("got NBD_REP_ACK".into()));
    }
    if last != rep::ERR_INVALID {
        // Any error keeps the session sane; ERR_INVALID is the one the
        // spec names for syntax errors, so say which came.
        if !replies.last().is_some_and(conn::OptReply::is_error) {
            return Ok(Err(format!("got {}", rep_name(last))));
        }
    }
    conn.still_negotiating()
}

fn name_too_long(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_info(ctx) {
        return Ok(o);
    }
    // Name length 100 in an option of 10 bytes.
    let mut data = Vec::new();
    data.extend_from_slice(&100u32.to_be_bytes());
    data.extend_from_slice(b"abcd");
    data.extend_from_slice(&0u16.to_be_bytes());
    match expect_error(ctx, &data)? {
        Ok(()) => Ok(Outcome::Pass),
        Err(why) => fail!("{why}"),
    }
}

fn truncated(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_info(ctx) {
        return Ok(o);
    }
    if let Err(why) = expect_error(ctx, &[0, 0])? {
        fail!("2-byte INFO: {why}");
    }
    // Promises 3 requests, carries 1.
    let mut data = info_payload(ctx.export(), &[info::BLOCK_SIZE]);
    let count_at = data.len() - 4;
    data[count_at..count_at + 2].copy_from_slice(&3u16.to_be_bytes());
    if let Err(why) = expect_error(ctx, &data)? {
        fail!("INFO promising 3 requests with 1: {why}");
    }
    Ok(Outcome::Pass)
}

fn unknown_request_ignored(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_info(ctx) {
        return Ok(o);
    }
    let mut conn = ctx.open()?;
    let replies = conn.option(opt::INFO, &info_payload(ctx.export(), &[0x7e57]))?;
    let last = replies.last().map_or(0, |r| r.kind);
    if last != rep::ACK {
        fail!("INFO with an unknown request got {}", rep_name(last));
    }
    Ok(Outcome::Pass)
}

fn block_sizes(ctx: &Ctx) -> Option<(u32, u32, u32)> {
    ctx.probe.block
}

fn block_size_valid(ctx: &Ctx) -> Result<Outcome> {
    let Some((min, pref, max)) = block_sizes(ctx) else {
        skip!("no NBD_INFO_BLOCK_SIZE");
    };
    if !min.is_power_of_two() || min > 65536 {
        fail!("minimum {min} is not a power of 2 up to 64 KiB");
    }
    if !pref.is_power_of_two() || pref < min.max(512) {
        fail!("preferred {pref} is not a power of 2 >= max(minimum {min}, 512)");
    }
    if max != u32::MAX && max % min != 0 {
        fail!("maximum {max} is not a multiple of minimum {min} nor 0xffffffff");
    }
    let floor = u64::from(pref).min(ctx.probe.size);
    if u64::from(max) < floor {
        fail!("maximum {max} is below min(preferred, export size) = {floor}");
    }
    Ok(Outcome::Pass)
}

fn block_size_max_1m(ctx: &Ctx) -> Result<Outcome> {
    let Some((_, _, max)) = block_sizes(ctx) else {
        skip!("no NBD_INFO_BLOCK_SIZE");
    };
    if ctx.probe.size >= 1 << 20 && max < 1 << 20 {
        fail!("maximum {max} on an export of {} bytes", ctx.probe.size);
    }
    Ok(Outcome::Pass)
}

fn size_multiple_of_minimum(ctx: &Ctx) -> Result<Outcome> {
    let Some((min, _, _)) = block_sizes(ctx) else {
        skip!("no NBD_INFO_BLOCK_SIZE");
    };
    if min > 0 && !ctx.probe.size.is_multiple_of(u64::from(min)) {
        fail!("size {} is not a multiple of {min}", ctx.probe.size);
    }
    Ok(Outcome::Pass)
}

fn go_matches_info(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_info(ctx) {
        return Ok(o);
    }
    let mut conn = ctx.open()?;
    let payload = info_payload(ctx.export(), &[info::BLOCK_SIZE]);
    let a = conn.option(opt::INFO, &payload)?;
    let b = conn.option(opt::GO, &payload)?;
    let (ia, ba) = parse_infos(&a)?;
    let (ib, bb) = parse_infos(&b)?;
    if b.last().map_or(0, |r| r.kind) != rep::ACK {
        fail!("GO failed after a successful INFO");
    }
    if ia != ib {
        fail!("INFO said (size, flags) {ia:?}, GO {ib:?}");
    }
    if ba != bb {
        fail!("INFO said block sizes {ba:?}, GO {bb:?}");
    }
    Ok(Outcome::Pass)
}

fn go_enters_transmission(ctx: &Ctx) -> Result<Outcome> {
    if !ctx.probe.go {
        skip!("the server does not support NBD_OPT_GO");
    }
    let mut s = ctx.session(Setup::default())?;
    let len = ctx.io_len();
    let cookie = 0x0123_4567_89ab_cdef;
    s.conn.request(0, conn::cmd::READ, cookie, 0, len, &[])?;
    let reply = s.conn.read_reply(|_| len as usize)?;
    if !reply.is_simple() || reply.cookie != cookie {
        fail!("the first message after GO is not the read's simple reply");
    }
    Ok(Outcome::Pass)
}

fn go_unknown_export(ctx: &Ctx) -> Result<Outcome> {
    if !ctx.probe.go {
        skip!("the server does not support NBD_OPT_GO");
    }
    let mut conn = ctx.open()?;
    let replies = match conn.option(opt::GO, &info_payload(MISSING_EXPORT, &[])) {
        Ok(r) => r,
        Err(conn::CheckError::Closed) => fail!("the server closed the connection"),
        Err(e) => return Err(e),
    };
    let last = replies.last().map_or(0, |r| r.kind);
    if last == rep::ACK {
        skip!("the server accepts any export name");
    }
    if !replies.last().is_some_and(conn::OptReply::is_error) {
        fail!("GO on a missing export got {}", rep_name(last));
    }
    if let Err(why) = conn.still_negotiating()? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}
