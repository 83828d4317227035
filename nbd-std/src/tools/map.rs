//! `nbd-std info --map`, `--size`, `--can FLAG` and `--is FLAG`: what
//! `nbdinfo` prints and the exit statuses it gives, for scripts.
//!
//! The map is the export's `base:allocation` block status, adjacent
//! extents of the same type merged, in nbdinfo's text (`--map`), JSON
//! (`--map --json`) and summary (`--totals`) forms.

use std::fmt::Write as _;

use nbd_core::wire::TransmissionFlags;
use serde_json::Value;

use crate::client::{Client, Error, Extent, NbdUri, export_info};

/// The only metadata context `--map` reads.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Bytes asked for per block-status request, so the map of a large export
/// is gathered in bounded steps.
const MAP_STEP: u64 = 1 << 32;

/// A question `--can` or `--is` asks, as nbdinfo names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Property {
    /// `connect`, `read`: answered by connecting at all.
    Connect,
    /// `write`: not read-only.
    Write,
    /// `read-only`.
    ReadOnly,
    /// `rotational`.
    Rotational,
    /// `tls`: the URI is `nbds`.
    Tls,
    /// `structured-reply`.
    StructuredReply,
    /// `cache`, `df`, `fast-zero`, `flush`, `fua`, `multi-conn`, `trim`,
    /// `zero`: a transmission flag.
    Flag(TransmissionFlags),
}

impl Property {
    /// Parses a `--can`/`--is` argument: case, `-`, `_` and spaces as
    /// nbdinfo accepts them (`fast-zero`, `fast_zero`, `Fast Zero`).
    pub fn parse(text: &str) -> Option<Self> {
        let name: String = text
            .chars()
            .map(|c| match c {
                '_' | ' ' => '-',
                c => c.to_ascii_lowercase(),
            })
            .collect();
        Some(match name.as_str() {
            "connect" | "read" => Self::Connect,
            "write" => Self::Write,
            "read-only" | "readonly" => Self::ReadOnly,
            "rotational" => Self::Rotational,
            "tls" => Self::Tls,
            "structured-reply" | "structured-replies" => Self::StructuredReply,
            "cache" => Self::Flag(TransmissionFlags::SEND_CACHE),
            "df" => Self::Flag(TransmissionFlags::SEND_DF),
            "fast-zero" => Self::Flag(TransmissionFlags::SEND_FAST_ZERO),
            "flush" => Self::Flag(TransmissionFlags::SEND_FLUSH),
            "fua" => Self::Flag(TransmissionFlags::SEND_FUA),
            "multi-conn" => Self::Flag(TransmissionFlags::CAN_MULTI_CONN),
            "trim" => Self::Flag(TransmissionFlags::SEND_TRIM),
            "zero" => Self::Flag(TransmissionFlags::SEND_WRITE_ZEROES),
            _ => return None,
        })
    }
}

/// Whether the export `uri` names has `property` (connecting, without
/// entering transmission).
pub async fn has(uri: &NbdUri, property: Property) -> Result<bool, Error> {
    let details = export_info(uri).await?;
    let flags = details.export.flags;
    Ok(match property {
        Property::Connect => true,
        Property::Write => !flags.contains(TransmissionFlags::READ_ONLY),
        Property::ReadOnly => flags.contains(TransmissionFlags::READ_ONLY),
        Property::Rotational => flags.contains(TransmissionFlags::ROTATIONAL),
        Property::Tls => uri.tls.is_some(),
        Property::StructuredReply => details.structured_replies(),
        Property::Flag(flag) => flags.contains(flag),
    })
}

/// The export's size in bytes (`--size`).
pub async fn size(uri: &NbdUri) -> Result<u64, Error> {
    Ok(export_info(uri).await?.size())
}

/// The `base:allocation` map of the whole export, adjacent extents of one
/// type merged.
pub async fn allocation_map(uri: &NbdUri) -> Result<Vec<Extent>, Error> {
    let client = Client::connect_uri(uri, 1).await?;
    let size = client.size();
    let mut map: Vec<Extent> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let length = (size - offset).min(MAP_STEP);
        for extent in client.block_status(offset, length).await? {
            match map.last_mut() {
                Some(last) if last.flags == extent.flags && last.end() == extent.offset => {
                    last.length += extent.length;
                }
                _ => map.push(extent),
            }
        }
        offset += length;
    }
    client.disconnect().await?;
    Ok(map)
}

/// nbdinfo's name for a `base:allocation` type; none for other bits.
fn description(flags: u32) -> Option<&'static str> {
    match flags {
        0 => Some("data"),
        1 => Some("hole"),
        2 => Some("zero"),
        3 => Some("hole,zero"),
        _ => None,
    }
}

/// `nbdinfo --map`: offset, length, type and description per line.
pub fn map_text(map: &[Extent]) -> String {
    let mut out = String::new();
    for extent in map {
        let _ = write!(
            out,
            "{:>10}  {:>10}  {:>3}",
            extent.offset, extent.length, extent.flags
        );
        if let Some(description) = description(extent.flags) {
            let _ = write!(out, "  {description}");
        }
        out.push('\n');
    }
    out
}

/// `nbdinfo --map --json`: one object per line in an array.
pub fn map_json(map: &[Extent]) -> String {
    let lines: Vec<String> = map
        .iter()
        .map(|extent| {
            let mut line = format!(
                "{{ \"offset\": {}, \"length\": {}, \"type\": {}",
                extent.offset, extent.length, extent.flags
            );
            if let Some(description) = description(extent.flags) {
                let _ = write!(line, ", \"description\": {}", Value::from(description));
            }
            line.push('}');
            line
        })
        .collect();
    format!("[\n{}\n]\n", lines.join(",\n"))
}

/// Bytes of each type, by type, with their share of `size`.
fn totals(map: &[Extent]) -> Vec<(u32, u64, f64)> {
    let mut by_type: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    for extent in map {
        *by_type.entry(extent.flags).or_default() += extent.length;
    }
    let size: u64 = by_type.values().sum();
    by_type
        .into_iter()
        .map(|(flags, bytes)| (flags, bytes, 100.0 * bytes as f64 / size.max(1) as f64))
        .collect()
}

/// `nbdinfo --map --totals`.
pub fn totals_text(map: &[Extent]) -> String {
    let mut out = String::new();
    for (flags, bytes, percent) in totals(map) {
        let _ = write!(out, "{bytes:>10} {percent:>5.1}% {flags:>3}");
        if let Some(description) = description(flags) {
            let _ = write!(out, " {description}");
        }
        out.push('\n');
    }
    out
}

/// `nbdinfo --map --totals --json`.
pub fn totals_json(map: &[Extent]) -> String {
    let lines: Vec<String> = totals(map)
        .into_iter()
        .map(|(flags, bytes, percent)| {
            let mut line = format!(
                "{{ \"size\": {bytes}, \"percent\": {}, \"type\": {flags}",
                shortest_g(percent)
            );
            if let Some(description) = description(flags) {
                let _ = write!(line, ", \"description\": {}", Value::from(description));
            }
            line.push_str(" }");
            line
        })
        .collect();
    format!("[\n{}\n]\n", lines.join(",\n"))
}

/// A percentage as C's `%g` prints it (six significant digits, trailing
/// zeros dropped), for the values 0 to 100 a share can take.
fn shortest_g(value: f64) -> String {
    if value == 0.0 {
        return "0".to_owned();
    }
    let magnitude = value.abs().log10().floor() as i32;
    if !(-4..6).contains(&magnitude) {
        return format!("{value:e}");
    }
    let decimals = usize::try_from(5 - magnitude).unwrap_or(0);
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(offset: u64, length: u64, flags: u32) -> Extent {
        Extent {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn text_and_json_as_nbdinfo_prints_them() {
        let map = [extent(0, 196608, 3), extent(196608, 131072, 0)];
        assert_eq!(
            map_text(&map),
            "         0      196608    3  hole,zero\n    196608      131072    0  data\n"
        );
        assert_eq!(
            map_json(&map),
            "[\n{ \"offset\": 0, \"length\": 196608, \"type\": 3, \"description\": \"hole,zero\"},\n\
             { \"offset\": 196608, \"length\": 131072, \"type\": 0, \"description\": \"data\"}\n]\n"
        );
        assert_eq!(map_json(&[]), "[\n\n]\n");
        assert_eq!(
            totals_text(&map),
            "    131072  40.0%   0 data\n    196608  60.0%   3 hole,zero\n"
        );
    }

    #[test]
    fn percentages_as_printf_g() {
        assert_eq!(shortest_g(4.6875), "4.6875");
        assert_eq!(shortest_g(100.0), "100");
        assert_eq!(shortest_g(100.0 / 3.0), "33.3333");
        assert_eq!(shortest_g(0.0), "0");
    }

    #[test]
    fn property_names_as_nbdinfo_accepts_them() {
        assert_eq!(
            Property::parse("Fast_Zero"),
            Some(Property::Flag(TransmissionFlags::SEND_FAST_ZERO))
        );
        assert_eq!(Property::parse("read-only"), Some(Property::ReadOnly));
        assert_eq!(Property::parse("read"), Some(Property::Connect));
        assert_eq!(Property::parse("bogus"), None);
    }
}
