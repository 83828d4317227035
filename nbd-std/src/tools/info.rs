//! `nbd-std info`: what `nbdinfo` prints about an export (or, with
//! `--list`, every export), as text or JSON of the same shape.
//!
//! The export is described with `NBD_OPT_INFO` (and its metadata contexts
//! with `NBD_OPT_LIST_META_CONTEXT`), without entering transmission, as
//! `nbdinfo` does; a server whose `NBD_OPT_INFO` reply is wrong (Debian's
//! nbd-server reports size 0) is shown as it answered. Unlike `nbdinfo`,
//! the content is not probed with `file(1)`.

use std::fmt::Write as _;

use nbd_core::wire::TransmissionFlags;
use serde_json::{Map, Value, json};

use crate::client::{Error, ExportDetails, NbdUri, export_info, list_exports};

/// What to show.
#[derive(Clone, Copy, Debug, Default)]
pub struct InfoOptions {
    /// Every export (`NBD_OPT_LIST`), not just the URI's.
    pub list: bool,
    /// JSON instead of text.
    pub json: bool,
}

/// What `info` found: the text to print and the exports that could not be
/// described (in list mode, the others are still shown).
#[derive(Debug)]
pub struct InfoReport {
    /// Text or JSON, ending with a newline.
    pub output: String,
    /// Exports whose description failed, with why.
    pub failures: Vec<(String, Error)>,
}

/// One export as shown.
struct Shown {
    details: ExportDetails,
    /// From `NBD_OPT_LIST`, preferred to `NBD_INFO_DESCRIPTION` as nbdinfo does.
    listed_description: Option<String>,
    uri: String,
}

/// Describes the export `uri` names, or every export with `--list`.
pub async fn info(uri: &NbdUri, options: InfoOptions) -> Result<InfoReport, Error> {
    let mut shown = Vec::new();
    let mut failures = Vec::new();
    if options.list {
        for listed in list_exports(uri).await? {
            let export_uri = uri.with_export(&listed.name);
            match export_info(&export_uri).await {
                Ok(details) => shown.push(Shown {
                    details,
                    listed_description: Some(listed.description).filter(|d| !d.is_empty()),
                    uri: export_uri.to_string(),
                }),
                Err(error) => failures.push((listed.name, error)),
            }
        }
    } else {
        shown.push(Shown {
            details: export_info(uri).await?,
            listed_description: None,
            uri: uri.to_string(),
        });
    }
    // nbds URIs insist on TLS: a session without it never gets this far.
    let tls = uri.tls.is_some();
    let output = if options.json {
        json_output(&shown, tls)
    } else {
        text_output(&shown, tls)
    };
    Ok(InfoReport { output, failures })
}

/// nbdinfo's size abbreviation: the largest binary unit dividing the
/// size exactly (`1G`, `64K`), or the plain number; and whether a unit
/// was used.
pub fn human_size(bytes: u64) -> (String, bool) {
    const UNITS: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    let mut value = bytes;
    let mut unit = 0;
    while value != 0 && value.is_multiple_of(1024) && unit < UNITS.len() - 1 {
        value /= 1024;
        unit += 1;
    }
    (format!("{value}{}", UNITS[unit]), unit > 0)
}

fn packets(details: &ExportDetails) -> &'static str {
    if details.extended_headers() {
        "extended"
    } else if details.structured_replies() {
        "structured"
    } else {
        "simple"
    }
}

/// The `can_*`/`is_*` lines, from the transmission flags as sent.
fn flag_lines(flags: TransmissionFlags) -> [(&'static str, bool); 10] {
    let has = |flag| flags.contains(flag);
    [
        ("is_rotational", has(TransmissionFlags::ROTATIONAL)),
        ("is_read_only", has(TransmissionFlags::READ_ONLY)),
        ("can_cache", has(TransmissionFlags::SEND_CACHE)),
        ("can_df", has(TransmissionFlags::SEND_DF)),
        ("can_fast_zero", has(TransmissionFlags::SEND_FAST_ZERO)),
        ("can_flush", has(TransmissionFlags::SEND_FLUSH)),
        ("can_fua", has(TransmissionFlags::SEND_FUA)),
        ("can_multi_conn", has(TransmissionFlags::CAN_MULTI_CONN)),
        ("can_trim", has(TransmissionFlags::SEND_TRIM)),
        ("can_zero", has(TransmissionFlags::SEND_WRITE_ZEROES)),
    ]
}

impl Shown {
    fn name(&self) -> &str {
        self.details
            .canonical_name
            .as_deref()
            .unwrap_or(&self.details.name)
    }

    fn description(&self) -> Option<&str> {
        self.listed_description
            .as_deref()
            .or(self.details.description.as_deref())
            .filter(|d| !d.is_empty())
    }

    /// Metadata contexts are shown when the server could list them.
    fn contexts(&self) -> Option<&[String]> {
        self.details
            .structured_replies()
            .then_some(&self.details.meta_contexts[..])
    }

    fn block_sizes(&self) -> Option<[(&'static str, u32); 3]> {
        let export = &self.details.export;
        let sizes = export.block_sizes;
        export.block_sizes_advertised.then_some([
            ("block_size_minimum", sizes.minimum),
            ("block_size_preferred", sizes.preferred),
            ("block_size_maximum", sizes.maximum),
        ])
    }
}

fn protocol_line(shown: &[Shown], tls: bool) -> String {
    let tls = if tls { "with" } else { "without" };
    match shown.first() {
        Some(first) => format!(
            "protocol: newstyle-fixed {tls} TLS, using {} packets\n",
            packets(&first.details)
        ),
        None => format!("protocol: newstyle-fixed {tls} TLS\n"),
    }
}

fn text_output(shown: &[Shown], tls: bool) -> String {
    let mut out = protocol_line(shown, tls);
    for export in shown {
        let quoted = Value::String(export.name().to_owned()).to_string();
        let _ = writeln!(out, "export={quoted}:");
        if let Some(description) = export.description() {
            let _ = writeln!(out, "\tdescription: {description}");
        }
        let size = export.details.size();
        match human_size(size) {
            (human, true) => {
                let _ = writeln!(out, "\texport-size: {size} ({human})");
            }
            (_, false) => {
                let _ = writeln!(out, "\texport-size: {size}");
            }
        }
        let _ = writeln!(out, "\turi: {}", export.uri);
        if let Some(contexts) = export.contexts() {
            out.push_str("\tcontexts:\n");
            for context in contexts {
                let _ = writeln!(out, "\t\t{context}");
            }
        }
        for (name, value) in flag_lines(export.details.export.flags) {
            let _ = writeln!(out, "\t{name}: {value}");
        }
        for (name, value) in export.block_sizes().into_iter().flatten() {
            let _ = writeln!(out, "\t{name}: {value}");
        }
    }
    out
}

fn json_output(shown: &[Shown], tls: bool) -> String {
    let first = shown.first().map(|s| &s.details);
    let exports: Vec<Value> = shown
        .iter()
        .map(|export| {
            let mut map = Map::new();
            map.insert("export-name".into(), json!(export.name()));
            if let Some(description) = export.description() {
                map.insert("description".into(), json!(description));
            }
            map.insert("uri".into(), json!(export.uri));
            if let Some(contexts) = export.contexts() {
                map.insert("contexts".into(), json!(contexts));
            }
            for (name, value) in flag_lines(export.details.export.flags) {
                map.insert(name.into(), json!(value));
            }
            for (name, value) in export.block_sizes().into_iter().flatten() {
                map.insert(name.into(), json!(value));
            }
            let size = export.details.size();
            map.insert("export-size".into(), json!(size));
            map.insert("export-size-str".into(), json!(human_size(size).0));
            Value::Object(map)
        })
        .collect();
    let document = json!({
        "protocol": "newstyle-fixed",
        "TLS": tls,
        "structured": first.is_some_and(|d| d.structured_replies()),
        "extended": first.is_some_and(|d| d.extended_headers()),
        "exports": exports,
    });
    let mut text = serde_json::to_string_pretty(&document).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_as_nbdinfo() {
        assert_eq!(human_size(0), ("0".into(), false));
        assert_eq!(human_size(1000), ("1000".into(), false));
        assert_eq!(human_size(1024), ("1K".into(), true));
        assert_eq!(human_size(65536), ("64K".into(), true));
        assert_eq!(human_size(1 << 30), ("1G".into(), true));
        assert_eq!(human_size(3 << 29), ("1536M".into(), true));
        assert_eq!(human_size(1 << 60), ("1E".into(), true));
    }
}
