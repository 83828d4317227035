//! Option haggling in general and the simple options (spec: "Fixed
//! newstyle negotiation", "Termination of the session during option
//! haggling", "Option types", "TLS support: NOTLS mode").

use super::conn::{self, be32, opt, rep, rep_name};
use super::{Ctx, Level, Outcome, Result, Rule, fail, skip};

/// An option code no spec version defines.
pub const UNKNOWN_OPTION: u32 = 0x4e43_0042;

/// The rules of this file.
pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            id: "opt.reply-format",
            level: Level::Must,
            section: "Fixed newstyle negotiation",
            description: "Option replies carry the reply magic and echo the option code",
            check: reply_format,
        },
        Rule {
            id: "opt.unknown-option",
            level: Level::Must,
            section: "Termination of the session during option haggling",
            description: "An unknown option gets an error reply and negotiation continues",
            check: unknown_option,
        },
        Rule {
            id: "opt.unknown-option-unsup",
            level: Level::Should,
            section: "Option reply types: NBD_REP_ERR_UNSUP",
            description: "The error for an unknown option is NBD_REP_ERR_UNSUP",
            check: unknown_option_unsup,
        },
        Rule {
            id: "opt.unknown-option-data-skipped",
            level: Level::Must,
            section: "Newstyle negotiation",
            description: "An unknown option's 64 KiB of data is skipped by its length and the next option parses",
            check: unknown_option_data_skipped,
        },
        Rule {
            id: "opt.list",
            level: Level::Must,
            section: "Option types: NBD_OPT_LIST",
            description: "LIST gets well-formed NBD_REP_SERVER replies then NBD_REP_ACK (or an error)",
            check: list,
        },
        Rule {
            id: "opt.list-with-data",
            level: Level::Should,
            section: "Option types: NBD_OPT_LIST",
            description: "LIST with data is rejected with NBD_REP_ERR_INVALID, and negotiation continues",
            check: list_with_data,
        },
        Rule {
            id: "opt.abort",
            level: Level::Must,
            section: "Option types: NBD_OPT_ABORT",
            description: "ABORT gets NBD_REP_ACK",
            check: abort,
        },
        Rule {
            id: "opt.abort-with-data",
            level: Level::Should,
            section: "Option types: NBD_OPT_ABORT",
            description: "ABORT with data is not rejected: the data is ignored and ABORT gets NBD_REP_ACK",
            check: abort_with_data,
        },
        Rule {
            id: "opt.starttls-notls",
            level: Level::Must,
            section: "TLS support: NOTLS mode",
            description: "Without TLS, STARTTLS gets NBD_REP_ERR_POLICY or NBD_REP_ERR_UNSUP, and negotiation continues",
            check: starttls_notls,
        },
        Rule {
            id: "opt.structured-reply",
            level: Level::Must,
            section: "Option types: NBD_OPT_STRUCTURED_REPLY",
            description: "STRUCTURED_REPLY gets NBD_REP_ACK or an error, and negotiation continues",
            check: structured_reply,
        },
        Rule {
            id: "opt.structured-reply-with-data",
            level: Level::Should,
            section: "Option types: NBD_OPT_STRUCTURED_REPLY",
            description: "STRUCTURED_REPLY with data is rejected with NBD_REP_ERR_INVALID",
            check: structured_reply_with_data,
        },
        Rule {
            id: "opt.repeated-option",
            level: Level::Must,
            section: "Fixed newstyle negotiation",
            description: "A repeated STRUCTURED_REPLY gets NBD_REP_ACK or NBD_REP_ERR_INVALID, not a disconnect",
            check: repeated_option,
        },
        Rule {
            id: "opt.export-name-unknown",
            level: Level::Must,
            section: "Option types: NBD_OPT_EXPORT_NAME",
            description: "EXPORT_NAME of an export that does not exist terminates the session",
            check: export_name_unknown,
        },
    ]
}

fn reply_format(ctx: &Ctx) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    conn.send_option(opt::LIST, &[])?;
    // read_option_reply checks the magic; check the option code here.
    let reply = conn.read_option_reply()?;
    if reply.option != opt::LIST {
        fail!("reply to option 3 names option {}", reply.option);
    }
    Ok(Outcome::Pass)
}

fn unknown_option(ctx: &Ctx) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    let r = conn.option_final(UNKNOWN_OPTION, b"checker!")?;
    if !r.is_error() {
        fail!("unknown option got {}", rep_name(r.kind));
    }
    if let Err(why) = conn.still_negotiating()? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn unknown_option_unsup(ctx: &Ctx) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    let r = conn.option_final(UNKNOWN_OPTION, &[])?;
    if r.kind != rep::ERR_UNSUP {
        fail!("unknown option got {}", rep_name(r.kind));
    }
    Ok(Outcome::Pass)
}

fn unknown_option_data_skipped(ctx: &Ctx) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    // Data that looks like an option header, so a server that does not
    // skip by the length reads it as the next option.
    let mut data = vec![0u8; 64 << 10];
    for chunk in data.chunks_mut(16) {
        chunk[..8].copy_from_slice(&nbd_core::wire::IHAVEOPT.to_be_bytes());
        chunk[8..12].copy_from_slice(&opt::ABORT.to_be_bytes());
    }
    let r = conn.option_final(UNKNOWN_OPTION, &data)?;
    if !r.is_error() {
        fail!("unknown option got {}", rep_name(r.kind));
    }
    if let Err(why) = conn.still_negotiating()? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn list(ctx: &Ctx) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    let replies = conn.option(opt::LIST, &[])?;
    let (last, servers) = replies.split_last().ok_or(conn::CheckError::Closed)?;
    if last.kind != rep::ACK && !last.is_error() {
        fail!("LIST ended with {}", rep_name(last.kind));
    }
    for r in servers {
        if r.kind != rep::SERVER {
            fail!("LIST sent {} before its final reply", rep_name(r.kind));
        }
        if r.data.len() < 4 {
            fail!("NBD_REP_SERVER of {} bytes", r.data.len());
        }
        let name_len = be32(&r.data) as usize;
        if name_len > r.data.len() - 4 {
            fail!(
                "NBD_REP_SERVER name length {name_len} exceeds the reply length - 4 ({})",
                r.data.len() - 4
            );
        }
    }
    Ok(Outcome::Pass)
}

fn list_with_data(ctx: &Ctx) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    let replies = conn.option(opt::LIST, b"data")?;
    let last = replies.last().map_or(0, |r| r.kind);
    if last != rep::ERR_INVALID {
        fail!("LIST with data got {}", rep_name(last));
    }
    if let Err(why) = conn.still_negotiating()? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn abort_common(ctx: &Ctx, data: &[u8]) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    conn.send_option(opt::ABORT, data)?;
    match conn.read_option_reply() {
        Ok(r) if r.option == opt::ABORT && r.kind == rep::ACK => Ok(Outcome::Pass),
        Ok(r) => fail!("ABORT got {}", rep_name(r.kind)),
        Err(conn::CheckError::Closed) => fail!("the server closed without NBD_REP_ACK"),
        Err(e) => Err(e),
    }
}

fn abort(ctx: &Ctx) -> Result<Outcome> {
    abort_common(ctx, &[])
}

fn abort_with_data(ctx: &Ctx) -> Result<Outcome> {
    abort_common(ctx, b"bye")
}

fn starttls_notls(ctx: &Ctx) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    let r = conn.option_final(opt::STARTTLS, &[])?;
    match r.kind {
        rep::ACK => skip!("the server offers TLS"),
        rep::ERR_POLICY | rep::ERR_UNSUP => {}
        rep::ERR_TLS_REQD => fail!("NBD_REP_ERR_TLS_REQD is forbidden in NOTLS mode"),
        other => fail!("STARTTLS got {}", rep_name(other)),
    }
    if let Err(why) = conn.still_negotiating()? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn structured_reply(ctx: &Ctx) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    let r = conn.option_final(opt::STRUCTURED_REPLY, &[])?;
    if r.kind != rep::ACK && !r.is_error() {
        fail!("STRUCTURED_REPLY got {}", rep_name(r.kind));
    }
    if let Err(why) = conn.still_negotiating()? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn structured_reply_with_data(ctx: &Ctx) -> Result<Outcome> {
    if !ctx.probe.structured {
        skip!("no structured replies");
    }
    let mut conn = ctx.open()?;
    let r = conn.option_final(opt::STRUCTURED_REPLY, b"data")?;
    if r.kind != rep::ERR_INVALID {
        fail!("STRUCTURED_REPLY with data got {}", rep_name(r.kind));
    }
    Ok(Outcome::Pass)
}

fn repeated_option(ctx: &Ctx) -> Result<Outcome> {
    if !ctx.probe.structured {
        skip!("no structured replies");
    }
    let mut conn = ctx.open()?;
    conn.option_final(opt::STRUCTURED_REPLY, &[])?;
    let r = match conn.option_final(opt::STRUCTURED_REPLY, &[]) {
        Ok(r) => r,
        Err(conn::CheckError::Closed) => fail!("the server closed the connection"),
        Err(e) => return Err(e),
    };
    if r.kind != rep::ACK && r.kind != rep::ERR_INVALID {
        fail!("the second STRUCTURED_REPLY got {}", rep_name(r.kind));
    }
    if let Err(why) = conn.still_negotiating()? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

/// A name no server should have.
pub const MISSING_EXPORT: &str = "nbd-std-check-no-such-export";

fn export_name_unknown(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.info {
        let mut conn = ctx.open()?;
        let replies = conn.option(opt::INFO, &conn::info_payload(MISSING_EXPORT, &[]))?;
        if replies.last().is_some_and(|r| r.kind == rep::ACK) {
            skip!("the server accepts any export name");
        }
    }
    let mut conn = ctx.open()?;
    conn.send_option(opt::EXPORT_NAME, MISSING_EXPORT.as_bytes())?;
    match conn.closed() {
        Ok(true) => Ok(Outcome::Pass),
        Ok(false) => {
            if !ctx.probe.info {
                skip!("the server accepts any export name");
            }
            fail!("the server sent data instead of closing")
        }
        Err(e) => fail!("the connection stayed open ({e})"),
    }
}
