//! Extended headers (spec: "Option types: NBD_OPT_EXTENDED_HEADERS",
//! "Extended reply", "Structured reply types: NBD_REPLY_TYPE_BLOCK_STATUS_EXT").

use nbd_core::wire::EXTENDED_REPLY_MAGIC;

use super::conn::{self, Reply, chunk, cmd, errno_name, opt, rep, rep_name};
use super::structured::{read_error_then_read, validate_block_status, validate_full_read};
use super::transmission::{pattern, with_scratch};
use super::{Ctx, Level, Outcome, Result, Rule, Setup, assemble, fail, skip};

/// The rules of this file.
pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            id: "ext.option",
            level: Level::Must,
            section: "Option types: NBD_OPT_EXTENDED_HEADERS",
            description: "EXTENDED_HEADERS gets NBD_REP_ACK or an error, and negotiation continues",
            check: option,
        },
        Rule {
            id: "ext.option-with-data",
            level: Level::Should,
            section: "Option types: NBD_OPT_EXTENDED_HEADERS",
            description: "EXTENDED_HEADERS with data is rejected with NBD_REP_ERR_INVALID",
            check: option_with_data,
        },
        Rule {
            id: "ext.read-reply",
            level: Level::Must,
            section: "Option types: NBD_OPT_EXTENDED_HEADERS",
            description: "With extended headers every reply uses the 32-byte extended header; a read covers its range",
            check: read_reply,
        },
        Rule {
            id: "ext.reply-offset",
            level: Level::Should,
            section: "Extended reply",
            description: "The extended reply header echoes the request's offset",
            check: reply_offset,
        },
        Rule {
            id: "ext.error-reply",
            level: Level::Must,
            section: "Option types: NBD_OPT_EXTENDED_HEADERS",
            description: "A failed read gets an extended error chunk, and the connection goes on",
            check: error_reply,
        },
        Rule {
            id: "ext.write",
            level: Level::Must,
            section: "Extended request",
            description: "A write with the 32-byte request header (its length the payload's) reads back (scratch, restored)",
            check: write,
        },
        Rule {
            id: "ext.block-status",
            level: Level::Must,
            section: "Structured reply types: NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
            description: "With extended headers, BLOCK_STATUS gets a well-formed NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk",
            check: block_status,
        },
        Rule {
            id: "ext.block-status-64bit",
            level: Level::Must,
            section: "Request types: NBD_CMD_BLOCK_STATUS",
            description: "With extended headers, BLOCK_STATUS with a length over 4 GiB succeeds",
            check: block_status_64bit,
        },
    ]
}

fn need_extended(ctx: &Ctx) -> Option<Outcome> {
    (!ctx.probe.extended).then(|| Outcome::Skip("no extended headers".into()))
}

fn all_extended(replies: &[Reply]) -> std::result::Result<(), String> {
    match replies.iter().find(|r| r.magic != EXTENDED_REPLY_MAGIC) {
        Some(r) => Err(format!("a reply with magic {:#010x}", r.magic)),
        None => Ok(()),
    }
}

fn option(ctx: &Ctx) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    let r = conn.option_final(opt::EXTENDED_HEADERS, &[])?;
    if r.kind != rep::ACK && !r.is_error() {
        fail!("EXTENDED_HEADERS got {}", rep_name(r.kind));
    }
    if let Err(why) = conn.still_negotiating()? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn option_with_data(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_extended(ctx) {
        return Ok(o);
    }
    let mut conn = ctx.open()?;
    let r = conn.option_final(opt::EXTENDED_HEADERS, b"data")?;
    if r.kind != rep::ERR_INVALID {
        fail!("EXTENDED_HEADERS with data got {}", rep_name(r.kind));
    }
    Ok(Outcome::Pass)
}

fn read_reply(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_extended(ctx) {
        return Ok(o);
    }
    let mut s = ctx.session(Setup::EXTENDED)?;
    let len = ctx.io_len();
    let replies = s.conn.exchange(0, cmd::READ, 0, len, &[])?;
    if let Err(why) = all_extended(&replies) {
        fail!("{why}");
    }
    if let Err(why) = validate_full_read(&replies, 0, len, false) {
        fail!("{why}");
    }
    if s.flags & super::tflag::SEND_FLUSH != 0 {
        let replies = s.conn.exchange(0, cmd::FLUSH, 0, 0, &[])?;
        if let Err(why) = all_extended(&replies) {
            fail!("FLUSH: {why}");
        }
    }
    Ok(Outcome::Pass)
}

fn reply_offset(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_extended(ctx) {
        return Ok(o);
    }
    let mut s = ctx.session(Setup::EXTENDED)?;
    let len = ctx.io_len();
    let offset = if ctx.probe.size >= 2 * len { len } else { 0 };
    let replies = s.conn.exchange(0, cmd::READ, offset, len, &[])?;
    if let Some(r) = replies.iter().find(|r| r.offset != offset) {
        fail!("request offset {offset}, reply offset {}", r.offset);
    }
    Ok(Outcome::Pass)
}

fn error_reply(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_extended(ctx) {
        return Ok(o);
    }
    read_error_then_read(ctx, Setup::EXTENDED, all_extended)
}

fn write(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_extended(ctx) {
        return Ok(o);
    }
    with_scratch(ctx, Setup::EXTENDED, |s, offset, len| {
        let data = pattern(len, 11);
        let replies = s.conn.exchange(0, cmd::WRITE, offset, len, &data)?;
        if let Err(why) = all_extended(&replies) {
            fail!("{why}");
        }
        if let Some(e) = conn::reply_error(&replies) {
            fail!("the write got {}", errno_name(e));
        }
        let replies = s.conn.exchange(0, cmd::READ, offset, len, &[])?;
        match assemble(&replies, offset, len)? {
            Ok(back) if back == data => Ok(Outcome::Pass),
            Ok(_) => fail!("read back different bytes"),
            Err(e) => fail!("the read got {}", errno_name(e)),
        }
    })
}

fn block_status_common(ctx: &Ctx, len: u64) -> Result<Outcome> {
    if let Some(o) = need_extended(ctx) {
        return Ok(o);
    }
    if !ctx.probe.base_allocation {
        skip!("base:allocation is not supported");
    }
    let mut s = ctx.session(Setup {
        base_allocation: true,
        ..Setup::EXTENDED
    })?;
    let replies = s.conn.exchange(0, cmd::BLOCK_STATUS, 0, len, &[])?;
    if let Err(why) = all_extended(&replies) {
        fail!("{why}");
    }
    if replies.iter().any(|r| r.kind == chunk::BLOCK_STATUS) {
        fail!("NBD_REPLY_TYPE_BLOCK_STATUS (32-bit) instead of BLOCK_STATUS_EXT");
    }
    if let Err(why) = validate_block_status(&replies, &s.contexts, len, false, ctx.min_block()) {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn block_status(ctx: &Ctx) -> Result<Outcome> {
    let len = ctx.aligned_len(1 << 20);
    block_status_common(ctx, len)
}

fn block_status_64bit(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.size <= 1 << 32 {
        skip!("the export is not larger than 4 GiB");
    }
    let len = ctx.aligned_len(u64::MAX);
    block_status_common(ctx, len)
}
