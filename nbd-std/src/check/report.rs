//! Output of `nbd-std check`: one line per rule and a summary line, or
//! JSON.

use serde_json::{Value, json};

use super::{Outcome, Probe, Report, RuleResult};

/// The line for one rule:
/// `PASS  rule-id  description  (LEVEL, section)[: reason]`.
pub fn line(r: &RuleResult) -> String {
    let (status, reason) = match &r.outcome {
        Outcome::Pass => ("PASS", None),
        Outcome::Fail(why) => ("FAIL", Some(why)),
        Outcome::Skip(why) => ("SKIP", Some(why)),
    };
    let mut text = format!(
        "{status}  {:<34}  {}  ({}, {})",
        r.id, r.description, r.level, r.section
    );
    if let Some(why) = reason {
        text.push_str(": ");
        text.push_str(why);
    }
    text
}

/// `N passed, N failed, N skipped`.
pub fn summary(report: &Report) -> String {
    let (passed, failed, skipped) = report.counts();
    format!("{passed} passed, {failed} failed, {skipped} skipped")
}

/// A one-line description of what the probe found, printed first.
pub fn probe_line(uri: &str, p: &Probe) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    format!(
        "nbd-std check {uri}: size {} bytes, flags {:#06x}, block sizes {}, GO {}, structured replies {}, base:allocation {}, extended headers {}",
        p.size,
        p.flags,
        p.block
            .map_or("not sent".to_owned(), |(a, b, c)| format!("{a}/{b}/{c}")),
        yes(p.go),
        yes(p.structured),
        yes(p.base_allocation),
        yes(p.extended)
    )
}

/// The whole report as JSON.
pub fn json(uri: &str, report: &Report) -> Value {
    let (passed, failed, skipped) = report.counts();
    let p = &report.probe;
    let rules: Vec<Value> = report
        .results
        .iter()
        .map(|r| {
            let (status, reason) = match &r.outcome {
                Outcome::Pass => ("pass", None),
                Outcome::Fail(why) => ("fail", Some(why.clone())),
                Outcome::Skip(why) => ("skip", Some(why.clone())),
            };
            json!({
                "id": r.id,
                "status": status,
                "level": r.level.to_string(),
                "section": r.section,
                "description": r.description,
                "reason": reason,
            })
        })
        .collect();
    json!({
        "uri": uri,
        "server": {
            "size": p.size,
            "flags": p.flags,
            "block_size": p.block.map(|(a, b, c)| json!([a, b, c])),
            "go": p.go,
            "structured_replies": p.structured,
            "base_allocation": p.base_allocation,
            "extended_headers": p.extended,
        },
        "rules": rules,
        "passed": passed,
        "failed": failed,
        "skipped": skipped,
    })
}
