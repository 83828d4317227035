//! Structured replies, DF and block status (spec: "Structured reply chunk
//! message", "Structured reply types", "Request types: NBD_CMD_READ",
//! "Request types: NBD_CMD_BLOCK_STATUS", "Metadata querying").

use super::conn::{self, Reply, be16, be32, be64, cflag, chunk, cmd, errno_name};
use super::transmission::{EINVAL, EOVERFLOW, expect_error, past_end};
use super::{Ctx, Level, Outcome, Result, Rule, Setup, assemble, fail, skip, tflag};

/// The rules of this file.
pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            id: "sr.read-not-simple",
            level: Level::Must,
            section: "Structured reply chunk message",
            description: "With structured replies negotiated, a read never gets a simple reply (not even an early error: bad flag, past the end)",
            check: read_not_simple,
        },
        Rule {
            id: "sr.read-chunks-valid",
            level: Level::Must,
            section: "Structured reply types",
            description: "Read chunks are well formed, inside the request, not overlapping, DONE on the last only",
            check: read_chunks_valid,
        },
        Rule {
            id: "sr.read-covers-range",
            level: Level::Must,
            section: "Request types: NBD_CMD_READ",
            description: "A successful structured read covers exactly the requested range with the data a simple read returns",
            check: read_covers_range,
        },
        Rule {
            id: "sr.read-error-chunk",
            level: Level::Must,
            section: "Structured reply chunk message",
            description: "A failed read gets a well-formed error chunk (not a simple reply), and the connection goes on",
            check: read_error_chunk,
        },
        Rule {
            id: "sr.unknown-flag-einval",
            level: Level::Should,
            section: "Error values",
            description: "With structured replies, a read with an unknown flag gets NBD_EINVAL in an error chunk",
            check: unknown_flag_einval,
        },
        Rule {
            id: "sr.df-one-chunk",
            level: Level::Must,
            section: "Request types: NBD_CMD_READ",
            description: "With SEND_DF, a 64 KiB read with DF gets at most one content chunk and no EOVERFLOW",
            check: df_one_chunk,
        },
        Rule {
            id: "bs.no-context-einval",
            level: Level::Should,
            section: "Metadata querying",
            description: "BLOCK_STATUS without a selected context gets NBD_EINVAL",
            check: no_context_einval,
        },
        Rule {
            id: "bs.reply",
            level: Level::Must,
            section: "Request types: NBD_CMD_BLOCK_STATUS",
            description: "BLOCK_STATUS gets one well-formed chunk per selected context, descriptors non-zero and within the request",
            check: block_status_reply,
        },
        Rule {
            id: "bs.req-one",
            level: Level::Must,
            section: "Structured reply types: NBD_REPLY_TYPE_BLOCK_STATUS",
            description: "With REQ_ONE, each chunk holds exactly one descriptor no longer than the request",
            check: req_one,
        },
        Rule {
            id: "bs.past-end-einval",
            level: Level::Should,
            section: "Request types: NBD_CMD_BLOCK_STATUS",
            description: "BLOCK_STATUS beyond the end of the export gets NBD_EINVAL",
            check: past_end_einval,
        },
    ]
}

fn need_structured(ctx: &Ctx) -> Option<Outcome> {
    if !ctx.probe.structured {
        return Some(Outcome::Skip("no structured replies".into()));
    }
    if !ctx.probe.go {
        return Some(Outcome::Skip("no NBD_OPT_GO".into()));
    }
    None
}

fn need_base_allocation(ctx: &Ctx) -> Option<Outcome> {
    need_structured(ctx).or_else(|| {
        (!ctx.probe.base_allocation)
            .then(|| Outcome::Skip("base:allocation is not supported".into()))
    })
}

/// Checks the chunks of a read reply; with `df`, at most one content
/// chunk. Returns the bytes covered when no error chunk came.
pub fn validate_read(
    replies: &[Reply],
    offset: u64,
    len: u64,
    df: bool,
) -> std::result::Result<Option<u64>, String> {
    let end = offset + len;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut errored = false;
    let mut content = 0;
    for (i, r) in replies.iter().enumerate() {
        if r.is_simple() {
            return Err("a simple reply".into());
        }
        let last = i + 1 == replies.len();
        if (r.flags & conn::DONE != 0) != last {
            return Err(format!("chunk {i} of {} has DONE {}", replies.len(), !last));
        }
        let p = &r.payload;
        let range = match r.kind {
            chunk::NONE => {
                if !p.is_empty() || r.flags & conn::DONE == 0 {
                    return Err("NBD_REPLY_TYPE_NONE with a payload or without DONE".into());
                }
                None
            }
            chunk::OFFSET_DATA => {
                if p.len() < 9 {
                    return Err(format!("OFFSET_DATA of length {}", p.len()));
                }
                content += 1;
                Some((be64(p), p.len() as u64 - 8))
            }
            chunk::OFFSET_HOLE => {
                if p.len() != 12 || be32(&p[8..12]) == 0 {
                    return Err("OFFSET_HOLE not 12 bytes with a non-zero size".into());
                }
                content += 1;
                Some((be64(p), u64::from(be32(&p[8..12]))))
            }
            chunk::ERROR | chunk::ERROR_OFFSET => {
                let min = if r.kind == chunk::ERROR { 6 } else { 14 };
                if p.len() < min {
                    return Err(format!("error chunk of length {}", p.len()));
                }
                if be32(p) == 0 {
                    return Err("error chunk with error 0".into());
                }
                let message = usize::from(be16(&p[4..6]));
                if message > p.len() - min {
                    return Err("error chunk's message runs past its length".into());
                }
                errored = true;
                if r.kind == chunk::ERROR_OFFSET {
                    let at = be64(&p[p.len() - 8..]);
                    if at < offset || at >= end {
                        return Err(format!("ERROR_OFFSET {at} outside the request"));
                    }
                }
                None
            }
            other if other & nbd_core::wire::CHUNK_ERROR_BIT != 0 => {
                errored = true;
                None
            }
            other => return Err(format!("chunk type {other} in a read reply")),
        };
        if let Some((at, size)) = range {
            if at < offset || at.saturating_add(size) > end {
                return Err(format!("content chunk [{at}, +{size}) outside the request"));
            }
            if ranges.iter().any(|&(a, s)| at < a + s && a < at + size) {
                return Err(format!(
                    "content chunk [{at}, +{size}) overlaps an earlier one"
                ));
            }
            ranges.push((at, size));
        }
    }
    if df && content > 1 {
        return Err(format!("{content} content chunks despite DF"));
    }
    Ok((!errored).then(|| ranges.iter().map(|&(_, s)| s).sum()))
}

/// [`validate_read`] for a read that must succeed: no error chunk, and
/// the chunks cover the whole request.
pub fn validate_full_read(
    replies: &[Reply],
    offset: u64,
    len: u64,
    df: bool,
) -> std::result::Result<(), String> {
    match validate_read(replies, offset, len, df)? {
        None => Err("the read got an error chunk".into()),
        Some(covered) if covered != len => Err(format!("chunks cover {covered} of {len} bytes")),
        Some(_) => Ok(()),
    }
}

/// A read across the end of the export on a session set up as `setup`:
/// `headers` checks the replies first, then they must form a well-formed
/// error reply, and a following read must succeed.
pub fn read_error_then_read(
    ctx: &Ctx,
    setup: Setup,
    headers: impl Fn(&[Reply]) -> std::result::Result<(), String>,
) -> Result<Outcome> {
    let mut s = ctx.session(setup)?;
    let (offset, len) = past_end(ctx);
    let replies = s.conn.exchange(0, cmd::READ, offset, len, &[])?;
    if let Err(why) = headers(&replies) {
        fail!("{why}");
    }
    match validate_read(&replies, offset, len, false) {
        Err(why) => fail!("{why}"),
        Ok(Some(_)) => skip!("the read past the end succeeded"),
        Ok(None) => {}
    }
    let replies = s.conn.exchange(0, cmd::READ, 0, ctx.io_len(), &[])?;
    if let Some(e) = conn::reply_error(&replies) {
        fail!("the next read got {}", errno_name(e));
    }
    Ok(Outcome::Pass)
}

fn read_not_simple(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_structured(ctx) {
        return Ok(o);
    }
    let mut s = ctx.session(Setup::STRUCTURED)?;
    let len = ctx.io_len();
    let replies = s.conn.exchange(0, cmd::READ, 0, len, &[])?;
    if replies.iter().any(Reply::is_simple) {
        fail!("a simple reply to a read");
    }
    // Not even for an early error (spec: "even for the case of an early
    // NBD_EINVAL due to bad flags").
    let flag = super::transmission::UNKNOWN_FLAG;
    let replies = s.conn.exchange(flag, cmd::READ, 0, len, &[])?;
    if replies.iter().any(Reply::is_simple) {
        fail!("a simple reply to a read with an unknown flag");
    }
    let (offset, len) = past_end(ctx);
    let replies = s.conn.exchange(0, cmd::READ, offset, len, &[])?;
    if replies.iter().any(Reply::is_simple) {
        fail!("a simple reply to a read past the end");
    }
    Ok(Outcome::Pass)
}

fn read_chunks_valid(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_structured(ctx) {
        return Ok(o);
    }
    let mut s = ctx.session(Setup::STRUCTURED)?;
    // A large read (1 MiB or the export) to tempt a server into several
    // chunks.
    let len = ctx.aligned_len(1 << 20);
    let replies = s.conn.exchange(0, cmd::READ, 0, len, &[])?;
    if let Err(why) = validate_read(&replies, 0, len, false) {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn read_covers_range(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_structured(ctx) {
        return Ok(o);
    }
    let len = ctx.aligned_len(256 << 10);
    let mut s = ctx.session(Setup::STRUCTURED)?;
    let replies = s.conn.exchange(0, cmd::READ, 0, len, &[])?;
    if let Err(why) = validate_full_read(&replies, 0, len, false) {
        fail!("{why}");
    }
    let structured = match assemble(&replies, 0, len)? {
        Ok(data) => data,
        Err(e) => fail!("read got {}", errno_name(e)),
    };
    let mut plain = ctx.session(Setup::default())?;
    match plain.read(0, len)? {
        Ok(data) if data == structured => Ok(Outcome::Pass),
        Ok(_) => fail!("the structured read returned other bytes than a simple read"),
        Err(e) => fail!("the simple read got {}", errno_name(e)),
    }
}

fn read_error_chunk(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_structured(ctx) {
        return Ok(o);
    }
    read_error_then_read(ctx, Setup::STRUCTURED, |_| Ok(()))
}

fn unknown_flag_einval(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_structured(ctx) {
        return Ok(o);
    }
    let len = ctx.io_len();
    let flag = super::transmission::UNKNOWN_FLAG;
    expect_error(ctx, Setup::STRUCTURED, flag, cmd::READ, 0, len, &[], EINVAL)
}

fn df_one_chunk(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_structured(ctx) {
        return Ok(o);
    }
    let mut s = ctx.session(Setup::STRUCTURED)?;
    if s.flags & tflag::SEND_DF == 0 {
        skip!("NBD_FLAG_SEND_DF not advertised");
    }
    let len = ctx.aligned_len(64 << 10);
    let replies = s.conn.exchange(cflag::DF, cmd::READ, 0, len, &[])?;
    if conn::reply_error(&replies) == Some(EOVERFLOW) {
        fail!("EOVERFLOW for a {len}-byte read (must work up to 64 KiB)");
    }
    if let Err(why) = validate_full_read(&replies, 0, len, true) {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn no_context_einval(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_structured(ctx) {
        return Ok(o);
    }
    expect_error(
        ctx,
        Setup::STRUCTURED,
        0,
        cmd::BLOCK_STATUS,
        0,
        ctx.io_len(),
        &[],
        EINVAL,
    )
}

/// Descriptors (length, flags) of one block status chunk (either type),
/// and its context id.
pub fn descriptors(r: &Reply) -> std::result::Result<(u32, Vec<(u64, u32)>), String> {
    let p = &r.payload;
    match r.kind {
        chunk::BLOCK_STATUS => {
            if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
                return Err(format!("BLOCK_STATUS chunk of length {}", p.len()));
            }
            let list = p[4..]
                .chunks(8)
                .map(|d| (u64::from(be32(d)), be32(&d[4..])))
                .collect();
            Ok((be32(p), list))
        }
        chunk::BLOCK_STATUS_EXT => {
            if p.len() < 24 || !(p.len() - 8).is_multiple_of(16) {
                return Err(format!("BLOCK_STATUS_EXT chunk of length {}", p.len()));
            }
            let n = (p.len() - 8) / 16;
            let count = be32(&p[4..8]) as usize;
            if count != 0 && count != n {
                return Err(format!("descriptor count {count} with {n} descriptors"));
            }
            let mut list = Vec::with_capacity(n);
            for d in p[8..].chunks(16) {
                if be32(&d[8..12]) != 0 {
                    return Err("non-zero padding in a BLOCK_STATUS_EXT descriptor".into());
                }
                list.push((be64(d), be32(&d[12..16])));
            }
            Ok((be32(p), list))
        }
        other => Err(format!("chunk type {other} in a block status reply")),
    }
}

/// Checks a successful block status reply against the selected contexts.
pub fn validate_block_status(
    replies: &[Reply],
    contexts: &[(u32, String)],
    len: u64,
    req_one: bool,
    min_block: u64,
) -> std::result::Result<(), String> {
    if let Some(e) = conn::reply_error(replies) {
        return Err(format!("got {}", errno_name(e)));
    }
    let mut seen = Vec::new();
    for r in replies {
        if r.is_simple() {
            return Err("a simple reply".into());
        }
        if r.kind == chunk::NONE {
            continue;
        }
        let (id, list) = descriptors(r)?;
        if !contexts.iter().any(|(c, _)| *c == id) {
            return Err(format!("chunk for context id {id}, which was not selected"));
        }
        if seen.contains(&id) {
            return Err(format!("two chunks for context id {id}"));
        }
        seen.push(id);
        if list.is_empty() {
            return Err("no descriptor".into());
        }
        if list.iter().any(|&(l, _)| l == 0) {
            return Err("a descriptor of length 0".into());
        }
        // The last may end at an export size that is not a multiple.
        if list[..list.len() - 1]
            .iter()
            .any(|&(l, _)| l % min_block != 0)
        {
            return Err(format!(
                "descriptor lengths are not multiples of the minimum block size {min_block}"
            ));
        }
        if req_one {
            if list.len() != 1 {
                return Err(format!("{} descriptors with REQ_ONE", list.len()));
            }
            if list[0].0 > len {
                return Err(format!(
                    "REQ_ONE descriptor of {} bytes for a {len}-byte request",
                    list[0].0
                ));
            }
        }
        let head: u64 = list[..list.len() - 1].iter().map(|&(l, _)| l).sum();
        if list.len() > 1 && head >= len {
            return Err(format!(
                "the first {} descriptors already cover {head} of {len} bytes",
                list.len() - 1
            ));
        }
    }
    if seen.len() != contexts.len() {
        return Err(format!(
            "{} chunks for {} selected contexts",
            seen.len(),
            contexts.len()
        ));
    }
    Ok(())
}

fn block_status(ctx: &Ctx, flags: u16) -> Result<Outcome> {
    if let Some(o) = need_base_allocation(ctx) {
        return Ok(o);
    }
    let mut s = ctx.session(Setup {
        base_allocation: true,
        ..Setup::STRUCTURED
    })?;
    let len = ctx.aligned_len(1 << 20);
    let replies = s.conn.exchange(flags, cmd::BLOCK_STATUS, 0, len, &[])?;
    if let Err(why) = validate_block_status(
        &replies,
        &s.contexts,
        len,
        flags & cflag::REQ_ONE != 0,
        ctx.min_block(),
    ) {
        fail!("{why}");
    }
    Ok(Outcome::Pass)
}

fn block_status_reply(ctx: &Ctx) -> Result<Outcome> {
    block_status(ctx, 0)
}

fn req_one(ctx: &Ctx) -> Result<Outcome> {
    block_status(ctx, cflag::REQ_ONE)
}

fn past_end_einval(ctx: &Ctx) -> Result<Outcome> {
    if let Some(o) = need_base_allocation(ctx) {
        return Ok(o);
    }
    let setup = Setup {
        base_allocation: true,
        ..Setup::STRUCTURED
    };
    let (offset, len) = past_end(ctx);
    expect_error(ctx, setup, 0, cmd::BLOCK_STATUS, offset, len, &[], EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_core::wire::STRUCTURED_REPLY_MAGIC;

    fn chunk(kind: u16, done: bool, payload: Vec<u8>) -> Reply {
        Reply {
            magic: STRUCTURED_REPLY_MAGIC,
            flags: if done { conn::DONE } else { 0 },
            kind,
            error: 0,
            cookie: 1,
            offset: 0,
            payload,
        }
    }

    fn data(offset: u64, len: usize, done: bool) -> Reply {
        let mut p = offset.to_be_bytes().to_vec();
        p.resize(8 + len, 0xab);
        chunk(chunk::OFFSET_DATA, done, p)
    }

    fn hole(offset: u64, len: u32, done: bool) -> Reply {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        chunk(chunk::OFFSET_HOLE, done, p)
    }

    #[test]
    fn read_chunks_covering_the_request_pass() {
        let replies = [
            data(0, 512, false),
            hole(512, 512, false),
            chunk(0, true, vec![]),
        ];
        assert_eq!(validate_read(&replies, 0, 1024, false), Ok(Some(1024)));
        assert!(
            validate_read(&replies, 0, 1024, true).is_err(),
            "two content chunks with DF"
        );
    }

    #[test]
    fn bad_read_chunks_are_caught() {
        // Overlap.
        let replies = [data(0, 512, false), hole(256, 512, true)];
        assert!(validate_read(&replies, 0, 1024, false).is_err());
        // Outside the request.
        assert!(validate_read(&[data(1024, 512, true)], 0, 1024, false).is_err());
        // DONE before the last chunk, or missing.
        assert!(
            validate_read(&[data(0, 512, true), hole(512, 512, true)], 0, 1024, false).is_err()
        );
        assert!(validate_read(&[data(0, 1024, false)], 0, 1024, false).is_err());
        // Error chunk with error 0; then a good one.
        let mut e = vec![0, 0, 0, 0, 0, 0];
        assert!(validate_read(&[chunk(chunk::ERROR, true, e.clone())], 0, 1024, false).is_err());
        e[3] = 22;
        assert_eq!(
            validate_read(&[chunk(chunk::ERROR, true, e)], 0, 1024, false),
            Ok(None)
        );
    }

    fn status(id: u32, extents: &[(u32, u32)], done: bool) -> Reply {
        let mut p = id.to_be_bytes().to_vec();
        for (len, flags) in extents {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        chunk(chunk::BLOCK_STATUS, done, p)
    }

    #[test]
    fn block_status_replies_are_checked() {
        let contexts = [(7u32, "base:allocation".to_owned())];
        let good = [status(7, &[(4096, 3), (8192, 0)], true)];
        assert_eq!(
            validate_block_status(&good, &contexts, 8192, false, 1),
            Ok(())
        );
        // REQ_ONE wants exactly one descriptor no longer than the request.
        assert!(validate_block_status(&good, &contexts, 8192, true, 1).is_err());
        let one = [status(7, &[(8192, 0)], true)];
        assert_eq!(
            validate_block_status(&one, &contexts, 8192, true, 1),
            Ok(())
        );
        assert!(validate_block_status(&one, &contexts, 4096, true, 1).is_err());
        // Unknown context id, zero-length descriptor, a head past the request.
        assert!(
            validate_block_status(&[status(8, &[(512, 0)], true)], &contexts, 512, false, 1)
                .is_err()
        );
        assert!(
            validate_block_status(&[status(7, &[(0, 0)], true)], &contexts, 512, false, 1).is_err()
        );
        let long_head = [status(7, &[(512, 0), (512, 1)], true)];
        assert!(validate_block_status(&long_head, &contexts, 512, false, 1).is_err());
    }
}
