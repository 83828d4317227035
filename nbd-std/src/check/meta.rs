//! Metadata context negotiation (spec: "Option types:
//! NBD_OPT_LIST_META_CONTEXT", "NBD_OPT_SET_META_CONTEXT", "Metadata
//! querying: the base: namespace").

use super::conn::{self, OptReply, meta_payload, opt, rep, rep_name};
use super::{Ctx, Level, Outcome, Result, Rule, fail, skip};

/// The rules of this file.
pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            id: "meta.set-needs-structured",
            level: Level::Should,
            section: "Option types: NBD_OPT_SET_META_CONTEXT",
            description: "SET_META_CONTEXT before structured replies gets NBD_REP_ERR_INVALID (or ERR_EXT_HEADER_REQD)",
            check: set_needs_structured,
        },
        Rule {
            id: "meta.list-all",
            level: Level::Must,
            section: "Option types: NBD_OPT_LIST_META_CONTEXT",
            description: "LIST_META_CONTEXT with no queries gets NBD_REP_META_CONTEXT replies then NBD_REP_ACK",
            check: list_all,
        },
        Rule {
            id: "meta.list-base-wildcard",
            level: Level::Must,
            section: "Metadata querying: the base: namespace",
            description: "LIST_META_CONTEXT `base:` is a wildcard: only base: contexts, then NBD_REP_ACK",
            check: list_base_wildcard,
        },
        Rule {
            id: "meta.unknown-namespace-ignored",
            level: Level::Must,
            section: "Option types: NBD_OPT_LIST_META_CONTEXT",
            description: "A query in an unknown namespace is ignored: NBD_REP_ACK and no context",
            check: unknown_namespace_ignored,
        },
        Rule {
            id: "meta.query-past-option",
            level: Level::Must,
            section: "Option types: NBD_OPT_LIST_META_CONTEXT",
            description: "A query length that runs past the option gets NBD_REP_ERR_INVALID",
            check: query_past_option,
        },
        Rule {
            id: "meta.set-base-allocation",
            level: Level::Must,
            section: "Option types: NBD_OPT_SET_META_CONTEXT",
            description: "SET_META_CONTEXT base:allocation selects exactly that context, then NBD_REP_ACK",
            check: set_base_allocation,
        },
        Rule {
            id: "meta.set-zero-queries",
            level: Level::Must,
            section: "Option types: NBD_OPT_SET_META_CONTEXT",
            description: "SET_META_CONTEXT with zero queries selects no context (NBD_REP_ACK only)",
            check: set_zero_queries,
        },
        Rule {
            id: "meta.unknown-base-leaf-ignored",
            level: Level::Must,
            section: "Metadata querying: the base: namespace",
            description: "SET_META_CONTEXT of an unknown base: leaf is ignored, not an error",
            check: unknown_base_leaf_ignored,
        },
    ]
}

/// Sends `option` with `data` on a connection with structured replies and
/// lets `judge` rule on the replies; skips when there are no structured
/// replies or the server has no metadata contexts at all.
fn with_structured(
    ctx: &Ctx,
    option: u32,
    data: &[u8],
    judge: impl FnOnce(&[OptReply]) -> Result<Outcome>,
) -> Result<Outcome> {
    if !ctx.probe.structured {
        skip!("no structured replies");
    }
    let mut conn = ctx.open()?;
    let r = conn.option_final(opt::STRUCTURED_REPLY, &[])?;
    if r.kind != rep::ACK {
        return conn::protocol(format!("STRUCTURED_REPLY got {}", rep_name(r.kind)));
    }
    let replies = conn.option(option, data)?;
    if unsupported(&replies) {
        skip!("no metadata contexts (NBD_REP_ERR_UNSUP)");
    }
    judge(&replies)
}

/// Checks a META_CONTEXT* ACK sequence; returns the context names.
fn contexts(replies: &[OptReply]) -> std::result::Result<Vec<String>, String> {
    let Some((last, rest)) = replies.split_last() else {
        return Err("no reply".into());
    };
    if last.kind != rep::ACK {
        return Err(format!("ended with {}", rep_name(last.kind)));
    }
    let mut names = Vec::new();
    for r in rest {
        if r.kind != rep::META_CONTEXT {
            return Err(format!("{} before the final reply", rep_name(r.kind)));
        }
        if r.data.len() < 5 {
            return Err(format!("NBD_REP_META_CONTEXT of {} bytes", r.data.len()));
        }
        match std::str::from_utf8(&r.data[4..]) {
            Ok(name) => names.push(name.to_owned()),
            Err(_) => return Err("a context name is not UTF-8".into()),
        }
    }
    Ok(names)
}

/// Skips on NBD_REP_ERR_UNSUP (no metadata contexts at all).
fn unsupported(replies: &[OptReply]) -> bool {
    replies.last().is_some_and(|r| r.kind == rep::ERR_UNSUP)
}

fn set_needs_structured(ctx: &Ctx) -> Result<Outcome> {
    let mut conn = ctx.open()?;
    let replies = conn.option(
        opt::SET_META_CONTEXT,
        &meta_payload(ctx.export(), &["base:allocation"]),
    )?;
    if unsupported(&replies) {
        skip!("no metadata contexts (NBD_REP_ERR_UNSUP)");
    }
    let last = replies.last().map_or(0, |r| r.kind);
    if last != rep::ERR_INVALID && last != rep::ERR_EXT_HEADER_REQD {
        fail!("got {}", rep_name(last));
    }
    Ok(Outcome::Pass)
}

fn list_all(ctx: &Ctx) -> Result<Outcome> {
    let data = meta_payload(ctx.export(), &[]);
    with_structured(ctx, opt::LIST_META_CONTEXT, &data, |replies| {
        if let Err(why) = contexts(replies) {
            fail!("{why}");
        }
        Ok(Outcome::Pass)
    })
}

fn list_base_wildcard(ctx: &Ctx) -> Result<Outcome> {
    let data = meta_payload(ctx.export(), &["base:"]);
    with_structured(ctx, opt::LIST_META_CONTEXT, &data, |replies| {
        match contexts(replies) {
            Err(why) => fail!("{why}"),
            Ok(names) => {
                if let Some(other) = names.iter().find(|n| !n.starts_with("base:")) {
                    fail!("`base:` listed `{other}`");
                }
                if ctx.probe.base_allocation && !names.iter().any(|n| n == "base:allocation") {
                    fail!("`base:` did not list base:allocation, which SET selects");
                }
            }
        }
        Ok(Outcome::Pass)
    })
}

fn unknown_namespace_ignored(ctx: &Ctx) -> Result<Outcome> {
    let data = meta_payload(ctx.export(), &["x-nbd-std-check:nothing"]);
    with_structured(
        ctx,
        opt::LIST_META_CONTEXT,
        &data,
        |replies| match contexts(replies) {
            Err(why) => fail!("{why}"),
            Ok(names) if !names.is_empty() => fail!("listed {names:?}"),
            Ok(_) => Ok(Outcome::Pass),
        },
    )
}

fn query_past_option(ctx: &Ctx) -> Result<Outcome> {
    let mut data = meta_payload(ctx.export(), &["base:allocation"]);
    // The query's length field says 200; 15 bytes follow.
    let at = data.len() - "base:allocation".len() - 4;
    data[at..at + 4].copy_from_slice(&200u32.to_be_bytes());
    with_structured(ctx, opt::LIST_META_CONTEXT, &data, |replies| {
        let last = replies.last().map_or(0, |r| r.kind);
        if last != rep::ERR_INVALID {
            fail!("got {}", rep_name(last));
        }
        Ok(Outcome::Pass)
    })
}

fn set_base_allocation(ctx: &Ctx) -> Result<Outcome> {
    let data = meta_payload(ctx.export(), &["base:allocation"]);
    with_structured(
        ctx,
        opt::SET_META_CONTEXT,
        &data,
        |replies| match contexts(replies) {
            Err(why) => fail!("{why}"),
            Ok(names) if names.is_empty() => skip!("base:allocation is not supported"),
            Ok(names) if names != ["base:allocation"] => fail!("selected {names:?}"),
            Ok(_) => Ok(Outcome::Pass),
        },
    )
}

fn set_zero_queries(ctx: &Ctx) -> Result<Outcome> {
    let data = meta_payload(ctx.export(), &[]);
    with_structured(
        ctx,
        opt::SET_META_CONTEXT,
        &data,
        |replies| match contexts(replies) {
            Err(why) => fail!("{why}"),
            Ok(names) if !names.is_empty() => fail!("selected {names:?}"),
            Ok(_) => Ok(Outcome::Pass),
        },
    )
}

fn unknown_base_leaf_ignored(ctx: &Ctx) -> Result<Outcome> {
    let data = meta_payload(ctx.export(), &["base:nbd-std-check-no-such-leaf"]);
    with_structured(
        ctx,
        opt::SET_META_CONTEXT,
        &data,
        |replies| match contexts(replies) {
            Err(why) => fail!("{why}"),
            Ok(names) if !names.is_empty() => fail!("selected {names:?}"),
            Ok(_) => Ok(Outcome::Pass),
        },
    )
}
