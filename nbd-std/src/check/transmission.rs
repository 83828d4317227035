//! Requests and simple replies (spec: "Transmission", "Request types",
//! "Error values", "Block size constraints", "Command flags").

use nbd_core::wire::ErrorCode;

use super::conn::{self, cflag, cmd, errno_name, reply_error};
use super::{Ctx, Level, Outcome, Result, Rule, Session, Setup, fail, skip, tflag};

/// `NBD_EPERM`
pub const EPERM: u32 = ErrorCode::Perm.to_wire();
/// `NBD_EINVAL`
pub const EINVAL: u32 = ErrorCode::Invalid.to_wire();
/// `NBD_ENOSPC`
pub const ENOSPC: u32 = ErrorCode::NoSpace.to_wire();
/// `NBD_EOVERFLOW`
pub const EOVERFLOW: u32 = ErrorCode::Overflow.to_wire();
/// A command flag no spec version defines.
pub const UNKNOWN_FLAG: u16 = 1 << 14;
/// A command no spec version defines.
pub const UNKNOWN_COMMAND: u16 = 0x4242;

/// The rules of this file.
pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            id: "tx.cookie-echoed",
            level: Level::Must,
            section: "Transmission",
            description: "Every reply carries the cookie (handle) of its request",
            check: cookie_echoed,
        },
        Rule {
            id: "tx.simple-read-length",
            level: Level::Must,
            section: "Request types: NBD_CMD_READ",
            description: "Without structured replies a read gets a simple reply with exactly `length` bytes",
            check: simple_read_length,
        },
        Rule {
            id: "tx.read-past-end-einval",
            level: Level::Should,
            section: "Error values",
            description: "A read beyond the end of the export gets NBD_EINVAL",
            check: read_past_end_einval,
        },
        Rule {
            id: "tx.error-no-payload",
            level: Level::Must,
            section: "Request types: NBD_CMD_READ",
            description: "A simple error reply to a read carries no payload: the next reply parses",
            check: error_no_payload,
        },
        Rule {
            id: "tx.write-past-end-enospc",
            level: Level::Should,
            section: "Error values",
            description: "A write beyond the end of the export gets NBD_ENOSPC",
            check: write_past_end_enospc,
        },
        Rule {
            id: "tx.rejected-write-payload",
            level: Level::Must,
            section: "Request types: NBD_CMD_WRITE",
            description: "A rejected write's payload is still consumed: the next request parses",
            check: rejected_write_payload,
        },
        Rule {
            id: "tx.unknown-command-einval",
            level: Level::Should,
            section: "Error values",
            description: "An unknown command gets NBD_EINVAL and the connection goes on",
            check: unknown_command_einval,
        },
        Rule {
            id: "tx.unknown-flag-einval",
            level: Level::Should,
            section: "Error values",
            description: "A read with an unknown command flag gets NBD_EINVAL",
            check: unknown_flag_einval,
        },
        Rule {
            id: "tx.misaligned-einval",
            level: Level::Should,
            section: "Block size constraints",
            description: "A read not aligned to the advertised minimum block size gets NBD_EINVAL",
            check: misaligned_einval,
        },
        Rule {
            id: "tx.over-maximum-einval",
            level: Level::Should,
            section: "Block size constraints",
            description: "A read longer than the advertised maximum block size gets NBD_EINVAL",
            check: over_maximum_einval,
        },
        Rule {
            id: "tx.zero-length-read",
            level: Level::Should,
            section: "Request types: NBD_CMD_READ",
            description: "A read of length 0 does not make the server disconnect",
            check: zero_length_read,
        },
        Rule {
            id: "tx.disc-in-flight",
            level: Level::Must,
            section: "Request types: NBD_CMD_DISC",
            description: "DISC after requests in flight: they are all answered, then the server closes without replying to DISC",
            check: disc_in_flight,
        },
        Rule {
            id: "tx.flush",
            level: Level::Must,
            section: "Request types: NBD_CMD_FLUSH",
            description: "FLUSH, when advertised, succeeds",
            check: flush,
        },
        Rule {
            id: "tx.fua-any-command",
            level: Level::Must,
            section: "Command flags",
            description: "With SEND_FUA, the FUA flag is accepted on every command (here a read)",
            check: fua_any_command,
        },
        Rule {
            id: "tx.read-only-refused",
            level: Level::Must,
            section: "Transmission flags",
            description: "On a read-only export a write gets an error",
            check: read_only_refused,
        },
        Rule {
            id: "tx.read-only-eperm",
            level: Level::Should,
            section: "Error values",
            description: "On a read-only export the write's error is NBD_EPERM",
            check: read_only_eperm,
        },
        Rule {
            id: "tx.write-read-back",
            level: Level::Must,
            section: "Request types: NBD_CMD_WRITE",
            description: "Written data reads back (scratch region, restored)",
            check: write_read_back,
        },
        Rule {
            id: "tx.trim",
            level: Level::Must,
            section: "Request types: NBD_CMD_TRIM",
            description: "TRIM, when advertised, is answered and the connection goes on",
            check: trim,
        },
        Rule {
            id: "tx.write-zeroes",
            level: Level::Must,
            section: "Request types: NBD_CMD_WRITE_ZEROES",
            description: "WRITE_ZEROES, when advertised, makes the range read back as zeroes",
            check: write_zeroes,
        },
        Rule {
            id: "tx.write-zeroes-no-hole",
            level: Level::Must,
            section: "Command flags",
            description: "With SEND_WRITE_ZEROES, the NO_HOLE flag is supported",
            check: write_zeroes_no_hole,
        },
        Rule {
            id: "tx.fast-zero-unadvertised",
            level: Level::Should,
            section: "Request types: NBD_CMD_WRITE_ZEROES",
            description: "FAST_ZERO when SEND_FAST_ZERO is not advertised gets NBD_EINVAL",
            check: fast_zero_unadvertised,
        },
        Rule {
            id: "tx.fua-write",
            level: Level::Must,
            section: "Command flags",
            description: "With SEND_FUA, a write with FUA succeeds (scratch region, restored)",
            check: fua_write,
        },
        Rule {
            id: "tx.write-zeroes-past-end-enospc",
            level: Level::Should,
            section: "Request types: NBD_CMD_WRITE_ZEROES",
            description: "WRITE_ZEROES beyond the end of the export gets NBD_ENOSPC",
            check: write_zeroes_past_end_enospc,
        },
        Rule {
            id: "tx.trim-past-end-einval",
            level: Level::Should,
            section: "Error values",
            description: "TRIM beyond the end of the export gets NBD_EINVAL",
            check: trim_past_end_einval,
        },
        Rule {
            id: "tx.cache-unknown-flag",
            level: Level::Must,
            section: "Request types: NBD_CMD_CACHE",
            description: "With SEND_CACHE, CACHE with an unknown flag is rejected",
            check: cache_unknown_flag,
        },
    ]
}

/// A request that crosses the end of the export: (offset, length).
pub fn past_end(ctx: &Ctx) -> (u64, u64) {
    let unit = ctx.io_len().max(1);
    let offset = ctx.probe.size.saturating_sub(1) / unit * unit;
    (offset, unit * 2)
}

/// An offset wholly beyond the end, aligned.
fn beyond_end(ctx: &Ctx) -> (u64, u64) {
    let unit = ctx.io_len().max(1);
    (ctx.probe.size.div_ceil(unit) * unit, unit)
}

/// Checks the session still answers a read.
pub fn still_serving(s: &mut Session, ctx: &Ctx) -> Result<std::result::Result<(), String>> {
    let len = ctx.io_len();
    let replies = match s.conn.exchange(0, cmd::READ, 0, len, &[]) {
        Ok(r) => r,
        Err(e) => return Ok(Err(format!("a following read failed: {e}"))),
    };
    match reply_error(&replies) {
        None => Ok(Ok(())),
        Some(e) => Ok(Err(format!("a following read got {}", errno_name(e)))),
    }
}

/// Sends one request on a fresh session; it must fail with `wanted` and
/// the session must go on serving.
// The arguments are the request's fields, one for one.
#[allow(clippy::too_many_arguments)]
pub fn expect_error(
    ctx: &Ctx,
    setup: Setup,
    flags: u16,
    command: u16,
    offset: u64,
    len: u64,
    payload: &[u8],
    wanted: u32,
) -> Result<Outcome> {
    let mut s = ctx.session(setup)?;
    let replies = s.conn.exchange(flags, command, offset, len, payload)?;
    match reply_error(&replies) {
        Some(e) if e == wanted => {}
        Some(e) => fail!("got {}", errno_name(e)),
        None => fail!("the request succeeded"),
    }
    if let Err(why) = still_serving(&mut s, ctx)? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn cookie_echoed(ctx: &Ctx) -> Result<Outcome> {
    let mut s = ctx.session(Setup::default())?;
    let len = ctx.io_len();
    for cookie in [0u64, 0xdead_beef_cafe_f00d, u64::MAX] {
        s.conn.request(0, cmd::READ, cookie, 0, len, &[])?;
        let r = s.conn.read_reply(|_| len as usize)?;
        if r.cookie != cookie {
            fail!("sent cookie {cookie:#x}, got {:#x}", r.cookie);
        }
    }
    Ok(Outcome::Pass)
}

fn simple_read_length(ctx: &Ctx) -> Result<Outcome> {
    let mut s = ctx.session(Setup::default())?;
    let len = ctx.io_len();
    let mut batch = s.conn.request_bytes(0, cmd::READ, 1, 0, len, &[]);
    batch.extend(s.conn.request_bytes(0, cmd::READ, 2, 0, len, &[]));
    s.conn.send(&batch)?;
    for _ in 0..2 {
        let r = s.conn.read_reply(|_| len as usize)?;
        if !r.is_simple() {
            fail!("not a simple reply");
        }
        if r.error != 0 {
            fail!("the read got {}", errno_name(r.error));
        }
        if r.cookie != 1 && r.cookie != 2 {
            fail!(
                "a reply with cookie {:#x}: the previous payload was not `length` bytes",
                r.cookie
            );
        }
    }
    Ok(Outcome::Pass)
}

fn read_past_end_einval(ctx: &Ctx) -> Result<Outcome> {
    let (offset, len) = past_end(ctx);
    expect_error(
        ctx,
        Setup::default(),
        0,
        cmd::READ,
        offset,
        len,
        &[],
        EINVAL,
    )
}

fn error_no_payload(ctx: &Ctx) -> Result<Outcome> {
    let mut s = ctx.session(Setup::default())?;
    let (offset, len) = past_end(ctx);
    let ok_len = ctx.io_len();
    let mut batch = s.conn.request_bytes(0, cmd::READ, 1, offset, len, &[]);
    batch.extend(s.conn.request_bytes(0, cmd::READ, 2, 0, ok_len, &[]));
    s.conn.send(&batch)?;
    let mut failed = false;
    for _ in 0..2 {
        let r = match s.conn.read_reply(|c| {
            if c == 1 {
                len as usize
            } else {
                ok_len as usize
            }
        }) {
            Ok(r) => r,
            // The spec lets the server disconnect after a read error.
            Err(conn::CheckError::Closed) if failed => {
                skip!("the server disconnected after the error")
            }
            Err(e) => return Err(e),
        };
        match r.cookie {
            1 if r.error == 0 => skip!("the read past the end succeeded"),
            1 => failed = true,
            2 => {}
            other => fail!("reply with cookie {other:#x}"),
        }
    }
    Ok(Outcome::Pass)
}

fn write_past_end_enospc(ctx: &Ctx) -> Result<Outcome> {
    past_end_command(ctx, None, cmd::WRITE, ENOSPC)
}

fn rejected_write_payload(ctx: &Ctx) -> Result<Outcome> {
    let (offset, len) = if ctx.probe.flags & tflag::READ_ONLY != 0 {
        (0, ctx.io_len())
    } else if ctx.options.write {
        beyond_end(ctx)
    } else {
        skip!("writes disabled (--no-write)");
    };
    let mut s = ctx.session(Setup::default())?;
    // A payload of read requests with cookie 7: a server that parses it
    // as requests answers them.
    let mut payload = Vec::with_capacity(len as usize);
    while payload.len() + 28 <= len as usize {
        payload.extend(s.conn.request_bytes(0, cmd::READ, 7, 0, 512, &[]));
    }
    payload.resize(len as usize, 0);
    let mut batch = s
        .conn
        .request_bytes(0, cmd::WRITE, 1, offset, len, &payload);
    let ok_len = ctx.io_len();
    batch.extend(s.conn.request_bytes(0, cmd::READ, 2, 0, ok_len, &[]));
    s.conn.send(&batch)?;
    let mut seen = 0;
    while seen < 2 {
        let r = match s
            .conn
            .read_reply(|c| if c == 2 { ok_len as usize } else { 512 })
        {
            Ok(r) => r,
            // A write past the end breaks a client MUST: the spec lets the
            // server hang up instead of answering.
            Err(conn::CheckError::Closed) if seen == 0 => {
                skip!("the server disconnected instead of rejecting the write")
            }
            Err(e) => return Err(e),
        };
        match r.cookie {
            1 if r.error == 0 => skip!("the write was not rejected"),
            1 | 2 => seen += 1,
            7 => fail!("the server parsed the write's payload as requests"),
            other => fail!("reply with cookie {other:#x}"),
        }
    }
    Ok(Outcome::Pass)
}

fn unknown_command_einval(ctx: &Ctx) -> Result<Outcome> {
    expect_error(ctx, Setup::default(), 0, UNKNOWN_COMMAND, 0, 0, &[], EINVAL)
}

fn unknown_flag_einval(ctx: &Ctx) -> Result<Outcome> {
    let len = ctx.io_len();
    expect_error(
        ctx,
        Setup::default(),
        UNKNOWN_FLAG,
        cmd::READ,
        0,
        len,
        &[],
        EINVAL,
    )
}

fn misaligned_einval(ctx: &Ctx) -> Result<Outcome> {
    let min = ctx.min_block();
    if min <= 1 {
        skip!("minimum block size 1 (nothing is misaligned)");
    }
    expect_error(ctx, Setup::default(), 0, cmd::READ, 1, min, &[], EINVAL)
}

fn over_maximum_einval(ctx: &Ctx) -> Result<Outcome> {
    let Some((min, _, max)) = ctx.probe.block else {
        skip!("no NBD_INFO_BLOCK_SIZE");
    };
    let len = u64::from(max) + u64::from(min.max(1));
    if max == u32::MAX || len > ctx.probe.size || len >= 1 << 25 {
        skip!("the maximum ({max}) cannot be exceeded below 32 MiB inside the export");
    }
    expect_error(ctx, Setup::default(), 0, cmd::READ, 0, len, &[], EINVAL)
}

fn zero_length_read(ctx: &Ctx) -> Result<Outcome> {
    let mut s = ctx.session(Setup::default())?;
    // Any answer will do; the read after it must work.
    match s.conn.exchange(0, cmd::READ, 0, 0, &[]) {
        Ok(_) => {}
        Err(conn::CheckError::Closed) => fail!("the server closed the connection"),
        Err(e) => return Err(e),
    }
    if let Err(why) = still_serving(&mut s, ctx)? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn disc_in_flight(ctx: &Ctx) -> Result<Outcome> {
    let mut s = ctx.session(Setup::default())?;
    let len = ctx.io_len();
    let mut batch = Vec::new();
    for cookie in 1..=8u64 {
        batch.extend(s.conn.request_bytes(0, cmd::READ, cookie, 0, len, &[]));
    }
    batch.extend(s.conn.request_bytes(0, cmd::DISC, 99, 0, 0, &[]));
    s.conn.send(&batch)?;
    let mut seen = [false; 8];
    for _ in 0..8 {
        let r = match s.conn.read_reply(|_| len as usize) {
            Ok(r) => r,
            Err(conn::CheckError::Closed) => fail!(
                "closed after {} of 8 replies",
                seen.iter().filter(|&&s| s).count()
            ),
            Err(e) => return Err(e),
        };
        match r.cookie {
            1..=8 => seen[(r.cookie - 1) as usize] = true,
            99 => fail!("NBD_CMD_DISC got a reply"),
            other => fail!("reply with cookie {other:#x}"),
        }
        if r.error != 0 {
            fail!("read {} got {}", r.cookie, errno_name(r.error));
        }
    }
    match s.conn.closed() {
        Ok(true) => Ok(Outcome::Pass),
        Ok(false) => fail!("more bytes after the replies (a reply to DISC?)"),
        Err(e) => fail!("the connection stayed open after DISC ({e})"),
    }
}

fn flush(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.flags & tflag::SEND_FLUSH == 0 {
        skip!("NBD_FLAG_SEND_FLUSH not advertised");
    }
    let mut s = ctx.session(Setup::default())?;
    let replies = s.conn.exchange(0, cmd::FLUSH, 0, 0, &[])?;
    if let Some(e) = reply_error(&replies) {
        fail!("FLUSH got {}", errno_name(e));
    }
    Ok(Outcome::Pass)
}

fn fua_any_command(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.flags & tflag::SEND_FUA == 0 {
        skip!("NBD_FLAG_SEND_FUA not advertised");
    }
    let mut s = ctx.session(Setup::default())?;
    let replies = s
        .conn
        .exchange(cflag::FUA, cmd::READ, 0, ctx.io_len(), &[])?;
    if let Some(e) = reply_error(&replies) {
        fail!("a read with FUA got {}", errno_name(e));
    }
    Ok(Outcome::Pass)
}

fn read_only_write(ctx: &Ctx) -> Result<std::result::Result<Option<u32>, Outcome>> {
    if ctx.probe.flags & tflag::READ_ONLY == 0 {
        return Ok(Err(Outcome::Skip("the export is writable".into())));
    }
    let mut s = ctx.session(Setup::default())?;
    let len = ctx.io_len();
    let data = vec![0xa5; len as usize];
    let replies = s.conn.exchange(0, cmd::WRITE, 0, len, &data)?;
    Ok(Ok(reply_error(&replies)))
}

fn read_only_refused(ctx: &Ctx) -> Result<Outcome> {
    match read_only_write(ctx)? {
        Err(o) => Ok(o),
        Ok(None) => fail!("the write succeeded"),
        Ok(Some(_)) => Ok(Outcome::Pass),
    }
}

fn read_only_eperm(ctx: &Ctx) -> Result<Outcome> {
    match read_only_write(ctx)? {
        Err(o) => Ok(o),
        Ok(None) => fail!("the write succeeded"),
        Ok(Some(EPERM)) => Ok(Outcome::Pass),
        Ok(Some(e)) => fail!("got {}", errno_name(e)),
    }
}

/// Runs `f` on the scratch region of a session set up as `setup`, then
/// writes the region's old contents back.
pub fn with_scratch(
    ctx: &Ctx,
    setup: Setup,
    f: impl FnOnce(&mut Session, u64, u64) -> Result<Outcome>,
) -> Result<Outcome> {
    let (offset, len) = match ctx.scratch() {
        Ok(region) => region,
        Err(why) => skip!("{why}"),
    };
    let mut s = ctx.session(setup)?;
    let original = match s.read(offset, len)? {
        Ok(data) => data,
        Err(e) => fail!("reading the scratch region got {}", errno_name(e)),
    };
    let outcome = f(&mut s, offset, len)?;
    // Restore on a fresh session: the rule may have broken this one.
    let mut restore = ctx.session(Setup::default())?;
    if let Err(e) = restore.write(offset, &original)? {
        fail!(
            "restoring the scratch region got {} (rule said {outcome:?})",
            errno_name(e)
        );
    }
    Ok(outcome)
}

/// A recognisable pattern.
pub fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn write_read_back(ctx: &Ctx) -> Result<Outcome> {
    with_scratch(ctx, Setup::default(), |s, offset, len| {
        let data = pattern(len, 7);
        if let Err(e) = s.write(offset, &data)? {
            fail!("the write got {}", errno_name(e));
        }
        match s.read(offset, len)? {
            Ok(back) if back == data => Ok(Outcome::Pass),
            Ok(_) => fail!("read back different bytes"),
            Err(e) => fail!("the read got {}", errno_name(e)),
        }
    })
}

fn trim(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.flags & tflag::SEND_TRIM == 0 {
        skip!("NBD_FLAG_SEND_TRIM not advertised");
    }
    with_scratch(ctx, Setup::default(), |s, offset, len| {
        // The rule asks for an answer, not success: the error is not judged.
        s.conn.exchange(0, cmd::TRIM, offset, len, &[])?;
        if let Err(why) = still_serving(s, ctx)? {
            fail!("{why}");
        }
        Ok(Outcome::Pass)
    })
}

fn zeroes_check(ctx: &Ctx, flags: u16) -> Result<Outcome> {
    if ctx.probe.flags & tflag::SEND_WRITE_ZEROES == 0 {
        skip!("NBD_FLAG_SEND_WRITE_ZEROES not advertised");
    }
    with_scratch(ctx, Setup::default(), |s, offset, len| {
        if let Err(e) = s.write(offset, &pattern(len, 3))? {
            fail!("the write got {}", errno_name(e));
        }
        let replies = s
            .conn
            .exchange(flags, cmd::WRITE_ZEROES, offset, len, &[])?;
        if let Some(e) = reply_error(&replies) {
            fail!("WRITE_ZEROES got {}", errno_name(e));
        }
        match s.read(offset, len)? {
            Ok(back) if back.iter().all(|&b| b == 0) => Ok(Outcome::Pass),
            Ok(_) => fail!("the range does not read back as zeroes"),
            Err(e) => fail!("the read got {}", errno_name(e)),
        }
    })
}

fn write_zeroes(ctx: &Ctx) -> Result<Outcome> {
    zeroes_check(ctx, 0)
}

fn write_zeroes_no_hole(ctx: &Ctx) -> Result<Outcome> {
    zeroes_check(ctx, cflag::NO_HOLE)
}

fn fast_zero_unadvertised(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.flags & tflag::SEND_WRITE_ZEROES == 0 {
        skip!("NBD_FLAG_SEND_WRITE_ZEROES not advertised");
    }
    if ctx.probe.flags & tflag::SEND_FAST_ZERO != 0 {
        skip!("NBD_FLAG_SEND_FAST_ZERO is advertised");
    }
    with_scratch(ctx, Setup::default(), |s, offset, len| {
        let replies = s
            .conn
            .exchange(cflag::FAST_ZERO, cmd::WRITE_ZEROES, offset, len, &[])?;
        match reply_error(&replies) {
            Some(EINVAL) => Ok(Outcome::Pass),
            Some(e) => fail!("got {}", errno_name(e)),
            None => fail!("the request succeeded"),
        }
    })
}

fn cache_unknown_flag(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.flags & tflag::SEND_CACHE == 0 {
        skip!("NBD_FLAG_SEND_CACHE not advertised");
    }
    let mut s = ctx.session(Setup::default())?;
    let replies = s
        .conn
        .exchange(UNKNOWN_FLAG, cmd::CACHE, 0, ctx.io_len(), &[])?;
    if reply_error(&replies).is_none() {
        fail!("CACHE with flag {UNKNOWN_FLAG:#06x} succeeded");
    }
    if let Err(why) = still_serving(&mut s, ctx)? {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn fua_write(ctx: &Ctx) -> Result<Outcome> {
    if ctx.probe.flags & tflag::SEND_FUA == 0 {
        skip!("NBD_FLAG_SEND_FUA not advertised");
    }
    with_scratch(ctx, Setup::default(), |s, offset, len| {
        let data = pattern(len, 5);
        let replies = s
            .conn
            .exchange(cflag::FUA, cmd::WRITE, offset, len, &data)?;
        if let Some(e) = reply_error(&replies) {
            fail!("a write with FUA got {}", errno_name(e));
        }
        match s.read(offset, len)? {
            Ok(back) if back == data => Ok(Outcome::Pass),
            Ok(_) => fail!("read back different bytes"),
            Err(e) => fail!("the read got {}", errno_name(e)),
        }
    })
}

/// A writing command wholly past the end of a writable export (a write
/// with its payload), when the user allows writes and the server
/// advertises `flag` (transmission flag and its name) if the command
/// needs one.
fn past_end_command(
    ctx: &Ctx,
    flag: Option<(u16, &str)>,
    command: u16,
    wanted: u32,
) -> Result<Outcome> {
    if !ctx.options.write {
        skip!("writes disabled (--no-write)");
    }
    if ctx.probe.flags & tflag::READ_ONLY != 0 {
        skip!("the export is read-only");
    }
    if let Some((flag, name)) = flag
        && ctx.probe.flags & flag == 0
    {
        skip!("{name} not advertised");
    }
    let (offset, len) = beyond_end(ctx);
    let payload = if command == cmd::WRITE {
        vec![0x5a; len as usize]
    } else {
        Vec::new()
    };
    expect_error(
        ctx,
        Setup::default(),
        0,
        command,
        offset,
        len,
        &payload,
        wanted,
    )
}

fn write_zeroes_past_end_enospc(ctx: &Ctx) -> Result<Outcome> {
    past_end_command(
        ctx,
        Some((tflag::SEND_WRITE_ZEROES, "NBD_FLAG_SEND_WRITE_ZEROES")),
        cmd::WRITE_ZEROES,
        ENOSPC,
    )
}

fn trim_past_end_einval(ctx: &Ctx) -> Result<Outcome> {
    past_end_command(
        ctx,
        Some((tflag::SEND_TRIM, "NBD_FLAG_SEND_TRIM")),
        cmd::TRIM,
        EINVAL,
    )
}
