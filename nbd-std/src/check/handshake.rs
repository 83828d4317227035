//! Greeting and client flags (spec: "Newstyle negotiation", "Handshake
//! flags", "Client flags", "NBD_OPT_EXPORT_NAME").

use super::conn::{self, C_FIXED_NEWSTYLE, C_NO_ZEROES, Conn, FIXED_NEWSTYLE, NO_ZEROES, opt};
use super::{Ctx, Level, Outcome, Result, Rule, fail, skip};

/// The rules of this file.
pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            id: "hs.newstyle-greeting",
            level: Level::Must,
            section: "Newstyle negotiation",
            description: "The greeting is NBDMAGIC, IHAVEOPT and 16 bits of handshake flags",
            check: newstyle_greeting,
        },
        Rule {
            id: "hs.fixed-newstyle",
            level: Level::Must,
            section: "Handshake flags; Compatibility: Baseline",
            description: "The server sets NBD_FLAG_FIXED_NEWSTYLE (fixed newstyle is baseline)",
            check: fixed_newstyle,
        },
        Rule {
            id: "hs.no-unknown-handshake-flags",
            level: Level::Must,
            section: "Handshake flags",
            description: "The server sets no handshake flags other than FIXED_NEWSTYLE and NO_ZEROES",
            check: no_unknown_handshake_flags,
        },
        Rule {
            id: "hs.unknown-client-flag",
            level: Level::Must,
            section: "Client flags",
            description: "A client flag the server does not know makes it drop the connection",
            check: unknown_client_flag,
        },
        Rule {
            id: "hs.unadvertised-no-zeroes",
            level: Level::Must,
            section: "Client flags",
            description: "NBD_FLAG_C_NO_ZEROES from a client when the server did not offer it makes it drop the connection",
            check: unadvertised_no_zeroes,
        },
        Rule {
            id: "hs.export-name-zeroes",
            level: Level::Must,
            section: "Newstyle negotiation",
            description: "EXPORT_NAME without NO_ZEROES gets size, flags and 124 zero bytes, then transmission works",
            check: export_name_zeroes,
        },
        Rule {
            id: "hs.export-name-no-zeroes",
            level: Level::Must,
            section: "Handshake flags",
            description: "EXPORT_NAME with NO_ZEROES negotiated gets size and flags without the 124 zero bytes",
            check: export_name_no_zeroes,
        },
    ]
}

fn newstyle_greeting(ctx: &Ctx) -> Result<Outcome> {
    // Conn::connect reads the 18 bytes and checks both magics.
    match Conn::connect(&ctx.uri, ctx.options.timeout) {
        Ok(_) => Ok(Outcome::Pass),
        Err(conn::CheckError::Protocol(why)) => fail!("{why}"),
        Err(e) => Err(e),
    }
}

fn fixed_newstyle(ctx: &Ctx) -> Result<Outcome> {
    let conn = Conn::connect(&ctx.uri, ctx.options.timeout)?;
    if conn.handshake_flags & FIXED_NEWSTYLE == 0 {
        fail!("handshake flags {:#06x}", conn.handshake_flags);
    }
    Ok(Outcome::Pass)
}

fn no_unknown_handshake_flags(ctx: &Ctx) -> Result<Outcome> {
    let conn = Conn::connect(&ctx.uri, ctx.options.timeout)?;
    let unknown = conn.handshake_flags & !(FIXED_NEWSTYLE | NO_ZEROES);
    if unknown != 0 {
        fail!("unknown handshake flags {unknown:#06x}");
    }
    Ok(Outcome::Pass)
}

/// Sends `flags`, then NBD_OPT_LIST; the server must close instead of
/// answering.
fn expect_drop(ctx: &Ctx, flags: u32) -> Result<Outcome> {
    let mut conn = Conn::connect(&ctx.uri, ctx.options.timeout)?;
    conn.send(&flags.to_be_bytes())?;
    // The server may already have closed: a failed send is the expected
    // outcome too.
    if conn.send_option(opt::LIST, &[]).is_err() {
        return Ok(Outcome::Pass);
    }
    match conn.closed() {
        Ok(true) => Ok(Outcome::Pass),
        Ok(false) => fail!("the server went on negotiating (answered NBD_OPT_LIST)"),
        Err(e) => fail!("the connection stayed open ({e})"),
    }
}

fn unknown_client_flag(ctx: &Ctx) -> Result<Outcome> {
    expect_drop(ctx, C_FIXED_NEWSTYLE | 1 << 7)
}

fn unadvertised_no_zeroes(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.handshake_flags & NO_ZEROES != 0 {
        skip!("the server offers NBD_FLAG_NO_ZEROES");
    }
    expect_drop(ctx, C_FIXED_NEWSTYLE | C_NO_ZEROES)
}

/// EXPORT_NAME with the given client flags; returns the connection after
/// the `expected` bytes of export data, checking the zero padding.
fn export_name(ctx: &Ctx, flags: u32, expected: usize) -> Result<Outcome> {
    let mut conn = Conn::connect(&ctx.uri, ctx.options.timeout)?;
    conn.send(&flags.to_be_bytes())?;
    conn.send_option(opt::EXPORT_NAME, ctx.export().as_bytes())?;
    let data = conn.read_exact(expected)?;
    if expected > 10 && data[10..].iter().any(|&b| b != 0) {
        fail!("the 124 reserved bytes are not all zero");
    }
    let size = conn::be64(&data);
    if size != ctx.probe.size {
        fail!(
            "EXPORT_NAME reports size {size}, NBD_OPT_GO {}",
            ctx.probe.size
        );
    }
    // The next bytes must be the reply to a request: no extra padding.
    let len = ctx.io_len();
    let replies = conn.exchange(0, conn::cmd::READ, 0, len, &[])?;
    match replies.as_slice() {
        [r] if r.is_simple() => Ok(Outcome::Pass),
        _ => fail!("a read after EXPORT_NAME did not get one simple reply"),
    }
}

fn export_name_zeroes(ctx: &Ctx) -> Result<Outcome> {
    export_name(ctx, C_FIXED_NEWSTYLE, 134)
}

fn export_name_no_zeroes(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.handshake_flags & NO_ZEROES == 0 {
        skip!("the server does not offer NBD_FLAG_NO_ZEROES");
    }
    export_name(ctx, C_FIXED_NEWSTYLE | C_NO_ZEROES, 10)
}
