//! NBD URIs (the NBD URI specification, `doc/uri.md` of the
//! NetworkBlockDevice/nbd repository): `nbd://host[:port][/export]` and
//! `nbd+unix:///export?socket=PATH`, and their TLS forms `nbds://` and
//! `nbds+unix://`.
//!
//! The export name is the path without its leading `/`, percent-decoded
//! (`nbd://h/hello%20world` selects `hello world`, `nbd://h//disk` selects
//! `/disk`). The port defaults to 10809. With `nbds`, TLS is required
//! (the session ends if the server refuses STARTTLS); libnbd's TLS query
//! parameters tune it: `tls-certificates=DIR` (`ca-cert.pem`,
//! `client-cert.pem`, `client-key.pem`), `tls-verify-peer=false` and
//! `tls-hostname=NAME`. TLS parameters on a plain `nbd` URI, pre-shared
//! keys (`tls-psk-file`) and any other query parameter are diagnosed, as
//! the specification recommends.
//!
//! One parameter of this client's own: `reconnect-timeout=SECONDS`, how
//! long a broken connection is retried before its requests fail (default
//! [`DEFAULT_RECONNECT_TIMEOUT`]; `0` turns reconnecting off); see
//! [`Client`](super::Client).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::DEFAULT_PORT;

/// A client's TLS settings: what `nbds://` URIs carry (libnbd's
/// `tls-certificates`, `tls-verify-peer` and `tls-hostname` parameters).
/// Used by a build with the `tls` feature; without it an `nbds://` URI
/// fails at the TLS hand-over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTlsOptions {
    /// Directory with `ca-cert.pem` and optionally `client-cert.pem` and
    /// `client-key.pem`; `None`: the system's trust store, no client
    /// certificate.
    pub certificates: Option<PathBuf>,
    /// Verify the server's certificate (on unless `tls-verify-peer=false`).
    pub verify_peer: bool,
    /// The name the server's certificate must carry, instead of the URI's
    /// host (`localhost` for unix sockets).
    pub hostname: Option<String>,
}

impl Default for ClientTlsOptions {
    fn default() -> Self {
        Self {
            certificates: None,
            verify_peer: true,
            hostname: None,
        }
    }
}

/// How long a broken connection is retried when the URI does not say
/// (`reconnect-timeout`): long enough for a server to restart, short
/// enough that a server gone for good is reported within a minute.
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a string is not an NBD URI this client can use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UriError {
    /// No `scheme://` at the start.
    #[error(
        "`{0}` is not an NBD URI (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
    )]
    NotAUri(String),
    /// A scheme other than `nbd`, `nbd+unix`, `nbds`, `nbds+unix`.
    #[error("unsupported URI scheme `{0}` (expected nbd, nbd+unix, nbds or nbds+unix)")]
    UnknownScheme(String),
    /// A `tls-*` parameter on a URI without TLS.
    #[error("`{0}`: TLS parameters need the nbds or nbds+unix scheme")]
    TlsParameterWithoutTls(String),
    /// A TLS feature rustls does not offer (pre-shared keys).
    #[error(
        "`{1}`: {0} is not supported (rustls has no TLS-PSK); use X.509 certificates (tls-certificates=DIR)"
    )]
    TlsUnsupported(&'static str, String),
    /// A `tls-verify-peer` value other than true/false.
    #[error("bad tls-verify-peer value `{0}` (expected true or false)")]
    BadBoolean(String),
    /// `nbd://` without a host.
    #[error("no host in `{0}` (expected nbd://HOST[:PORT]/EXPORT)")]
    MissingHost(String),
    /// A port that is not a number from 1 to 65535.
    #[error("bad port `{0}` (expected a number from 1 to 65535)")]
    BadPort(String),
    /// `nbd+unix://` without `?socket=PATH`.
    #[error("`{0}` has no socket parameter (expected nbd+unix:///EXPORT?socket=PATH)")]
    MissingSocket(String),
    /// `nbd+unix://host/...`: unix-socket URIs take no host.
    #[error("`{0}` names a host; nbd+unix URIs take none (nbd+unix:///EXPORT?socket=PATH)")]
    HostInUnixUri(String),
    /// `?socket=` on a TCP URI.
    #[error("`{0}`: the socket parameter needs the nbd+unix scheme")]
    SocketInTcpUri(String),
    /// A query parameter this client does not know.
    #[error("unknown query parameter `{0}` in NBD URI")]
    UnknownParameter(String),
    /// A `reconnect-timeout` that is not a number of seconds.
    #[error(
        "bad reconnect-timeout value `{0}` (expected a number of seconds, 0 to turn reconnecting off)"
    )]
    BadReconnectTimeout(String),
    /// A `#fragment`, which NBD URIs do not use.
    #[error("`{0}`: NBD URIs have no #fragment")]
    Fragment(String),
    /// A `%` not followed by two hex digits, or a name that decodes to
    /// invalid UTF-8 or contains NUL.
    #[error("bad percent-encoding in `{0}`")]
    BadEncoding(String),
}

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP: a host name or address (IPv6 without brackets) and a port.
    Tcp {
        /// Host name, IPv4 address, or IPv6 address without brackets.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A unix-domain socket. A path starting with NUL names a socket in
    /// the abstract namespace (Linux).
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Export name (decoded); empty for the server's default export.
    pub export: String,
    /// TLS settings (`nbds`, `nbds+unix`); `None`: no TLS.
    pub tls: Option<ClientTlsOptions>,
    /// How long a broken connection is retried (`reconnect-timeout`);
    /// zero: not at all.
    pub reconnect_timeout: Duration,
}

impl NbdUri {
    /// Parses an NBD URI.
    pub fn parse(text: &str) -> Result<Self, UriError> {
        let owned = || text.to_owned();
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| UriError::NotAUri(owned()))?;
        let (unix, tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(UriError::UnknownScheme(scheme.to_owned())),
        };
        let mut tls = tls.then(ClientTlsOptions::default);
        if rest.contains('#') {
            return Err(UriError::Fragment(owned()));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).ok_or_else(|| UriError::BadEncoding(owned()))?;
        let export = String::from_utf8(export)
            .ok()
            .filter(|name| !name.contains('\0'))
            .ok_or_else(|| UriError::BadEncoding(owned()))?;
        let mut socket = None;
        let mut reconnect_timeout = DEFAULT_RECONNECT_TIMEOUT;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "socket" => {
                    let bytes = decode(value).ok_or_else(|| UriError::BadEncoding(owned()))?;
                    socket = Some(path_from_bytes(bytes));
                }
                "reconnect-timeout" => {
                    reconnect_timeout = parse_seconds(value)
                        .ok_or_else(|| UriError::BadReconnectTimeout(value.to_owned()))?;
                }
                _ if key.starts_with("tls-") => {
                    let Some(options) = tls.as_mut() else {
                        return Err(UriError::TlsParameterWithoutTls(owned()));
                    };
                    let value = decode(value).ok_or_else(|| UriError::BadEncoding(owned()))?;
                    match key {
                        "tls-certificates" => {
                            options.certificates = Some(path_from_bytes(value));
                        }
                        "tls-verify-peer" => {
                            options.verify_peer = match value.to_ascii_lowercase().as_slice() {
                                b"true" | b"1" | b"yes" | b"on" => true,
                                b"false" | b"0" | b"no" | b"off" => false,
                                _ => {
                                    let text = String::from_utf8_lossy(&value).into_owned();
                                    return Err(UriError::BadBoolean(text));
                                }
                            }
                        }
                        "tls-hostname" => {
                            options.hostname = Some(
                                String::from_utf8(value)
                                    .map_err(|_| UriError::BadEncoding(owned()))?,
                            );
                        }
                        "tls-psk-file" | "tls-username" => {
                            return Err(UriError::TlsUnsupported("TLS-PSK", owned()));
                        }
                        _ => return Err(UriError::UnknownParameter(key.to_owned())),
                    }
                }
                _ => return Err(UriError::UnknownParameter(key.to_owned())),
            }
        }
        // Userinfo names a TLS-PSK user, which rustls cannot use: ignored.
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let endpoint = if unix {
            if !host_port.is_empty() {
                return Err(UriError::HostInUnixUri(owned()));
            }
            match socket {
                Some(path) if !path.as_os_str().is_empty() => Endpoint::Unix(path),
                _ => return Err(UriError::MissingSocket(owned())),
            }
        } else {
            if socket.is_some() {
                return Err(UriError::SocketInTcpUri(owned()));
            }
            let (host, port) = split_host_port(host_port)?;
            if host.is_empty() {
                return Err(UriError::MissingHost(owned()));
            }
            Endpoint::Tcp { host, port }
        };
        Ok(Self {
            endpoint,
            export,
            tls,
            reconnect_timeout,
        })
    }

    /// The same server with another export.
    pub fn with_export(&self, export: &str) -> Self {
        Self {
            endpoint: self.endpoint.clone(),
            export: export.to_owned(),
            tls: self.tls.clone(),
            reconnect_timeout: self.reconnect_timeout,
        }
    }

    /// The name the server's TLS certificate must carry: `tls-hostname`,
    /// else the host (`localhost` for unix sockets, as libnbd does).
    pub fn tls_server_name(&self) -> &str {
        let host = match &self.endpoint {
            Endpoint::Tcp { host, .. } => host.as_str(),
            Endpoint::Unix(_) => "localhost",
        };
        self.tls
            .as_ref()
            .and_then(|tls| tls.hostname.as_deref())
            .unwrap_or(host)
    }

    /// The address for messages: `host:port` or the socket path.
    pub fn address(&self) -> String {
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
            Endpoint::Unix(path) => path.display().to_string(),
        }
    }
}

impl std::str::FromStr for NbdUri {
    type Err = UriError;
    fn from_str(text: &str) -> Result<Self, UriError> {
        Self::parse(text)
    }
}

/// The URI in canonical form: port always given, export percent-encoded,
/// TLS parameters that differ from the defaults.
impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use std::os::unix::ffi::OsStrExt;
        let export = encode(self.export.as_bytes(), PATH_SAFE);
        let s = if self.tls.is_some() { "s" } else { "" };
        let mut query = Vec::new();
        match &self.endpoint {
            Endpoint::Tcp { .. } => write!(f, "nbd{s}://{}/{export}", self.address())?,
            Endpoint::Unix(path) => {
                write!(f, "nbd{s}+unix:///{export}")?;
                let socket = encode(path.as_os_str().as_bytes(), QUERY_SAFE);
                query.push(format!("socket={socket}"));
            }
        }
        if let Some(tls) = &self.tls {
            if let Some(dir) = &tls.certificates {
                let dir = encode(dir.as_os_str().as_bytes(), QUERY_SAFE);
                query.push(format!("tls-certificates={dir}"));
            }
            if !tls.verify_peer {
                query.push("tls-verify-peer=false".to_owned());
            }
            if let Some(name) = &tls.hostname {
                let name = encode(name.as_bytes(), QUERY_SAFE);
                query.push(format!("tls-hostname={name}"));
            }
        }
        if self.reconnect_timeout != DEFAULT_RECONNECT_TIMEOUT {
            let seconds = self.reconnect_timeout.as_secs_f64();
            query.push(format!("reconnect-timeout={seconds}"));
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

/// Splits `host[:port]` or `[v6][:port]`.
fn split_host_port(text: &str) -> Result<(String, u16), UriError> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| UriError::MissingHost(text.to_owned()))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(UriError::BadPort(after.to_owned())),
            },
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| UriError::BadPort(port.to_owned()))?,
    };
    let host = decode(host)
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| UriError::BadEncoding(text.to_owned()))?;
    Ok((host, port))
}

/// A non-negative number of seconds, fractions allowed.
pub(crate) fn parse_seconds(text: &str) -> Option<Duration> {
    text.parse::<f64>()
        .ok()
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
}

fn path_from_bytes(bytes: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(bytes))
}

/// Percent-decodes; `None` on a `%` without two hex digits.
fn decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Characters besides unreserved ones left as they are in a path.
const PATH_SAFE: &[u8] = b"/:@!$&'()*+,;=";
/// In a query value (`&` and `=` separate parameters, so they are encoded).
const QUERY_SAFE: &[u8] = b"/:@!$'()*+,;";

fn encode(bytes: &[u8], safe: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || safe.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            endpoint: Endpoint::Tcp {
                host: host.to_owned(),
                port,
            },
            export: export.to_owned(),
            tls: None,
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
        }
    }

    #[test]
    fn spec_examples() {
        let cases = [
            ("nbd://example.com/disk", tcp("example.com", 10809, "disk")),
            ("nbd://example.com/", tcp("example.com", 10809, "")),
            ("nbd://example.com", tcp("example.com", 10809, "")),
            (
                "nbd://example.com//disk",
                tcp("example.com", 10809, "/disk"),
            ),
            (
                "nbd://example.com/hello%20world",
                tcp("example.com", 10809, "hello world"),
            ),
            (
                "nbd://example.com:10810/export",
                tcp("example.com", 10810, "export"),
            ),
            ("nbd://[::1]:2000/x", tcp("::1", 2000, "x")),
            ("nbd://[::1]/", tcp("::1", 10809, "")),
            ("nbd://user@127.0.0.1:99/", tcp("127.0.0.1", 99, "")),
            ("NBD://h:1/%e2%82%ac", tcp("h", 1, "€")),
        ];
        for (text, expected) in cases {
            assert_eq!(NbdUri::parse(text), Ok(expected), "{text}");
        }
        assert_eq!(
            NbdUri::parse("nbd+unix:///disk?socket=sock"),
            Ok(NbdUri {
                endpoint: Endpoint::Unix(PathBuf::from("sock")),
                export: "disk".to_owned(),
                tls: None,
                reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
            })
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///?socket=/tmp/a%20b.sock"),
            Ok(NbdUri {
                endpoint: Endpoint::Unix(PathBuf::from("/tmp/a b.sock")),
                export: String::new(),
                tls: None,
                reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
            })
        );
        let abstract_socket = NbdUri::parse("nbd+unix:///?socket=%00/abstract").expect("parse");
        assert_eq!(
            abstract_socket.endpoint,
            Endpoint::Unix(PathBuf::from("\0/abstract"))
        );
    }

    #[test]
    fn errors_name_the_problem() {
        use UriError::*;
        type Check = fn(&UriError) -> bool;
        let cases: [(&str, Check); 15] = [
            ("disk.img", |e| matches!(e, NotAUri(_))),
            ("http://x/", |e| matches!(e, UnknownScheme(_))),
            ("nbd://x/?tls-certificates=/d", |e| {
                matches!(e, TlsParameterWithoutTls(_))
            }),
            ("nbds://x/?tls-psk-file=k", |e| {
                matches!(e, TlsUnsupported(..))
            }),
            ("nbds://x/?tls-verify-peer=maybe", |e| {
                matches!(e, BadBoolean(_))
            }),
            ("nbds://x/?tls-type=x509", |e| {
                matches!(e, UnknownParameter(_))
            }),
            ("nbds+unix:///", |e| matches!(e, MissingSocket(_))),
            ("nbd:///disk", |e| matches!(e, MissingHost(_))),
            ("nbd://x:0/", |e| matches!(e, BadPort(_))),
            ("nbd://x:99999/", |e| matches!(e, BadPort(_))),
            ("nbd+unix:///disk", |e| matches!(e, MissingSocket(_))),
            ("nbd+unix://h/?socket=s", |e| matches!(e, HostInUnixUri(_))),
            ("nbd://x/?foo=1", |e| matches!(e, UnknownParameter(_))),
            ("nbd://x/a%2", |e| matches!(e, BadEncoding(_))),
            ("nbd://x/a%00", |e| matches!(e, BadEncoding(_))),
        ];
        for (text, check) in cases {
            let error = NbdUri::parse(text).expect_err(text);
            assert!(check(&error), "{text}: {error:?}");
            assert!(!error.to_string().is_empty());
        }
        assert!(
            NbdUri::parse("nbd://h/?tls-verify-peer=false")
                .expect_err("tls")
                .to_string()
                .contains("need the nbds or nbds+unix scheme")
        );
    }

    #[test]
    fn reconnect_timeout() {
        let seconds = |text: &str| NbdUri::parse(text).map(|uri| uri.reconnect_timeout);
        assert_eq!(seconds("nbd://h/"), Ok(DEFAULT_RECONNECT_TIMEOUT));
        assert_eq!(seconds("nbd://h/?reconnect-timeout=0"), Ok(Duration::ZERO));
        assert_eq!(
            seconds("nbds://h/x?tls-verify-peer=false&reconnect-timeout=1.5"),
            Ok(Duration::from_millis(1500))
        );
        for bad in ["-1", "soon", "", "inf"] {
            assert_eq!(
                seconds(&format!("nbd://h/?reconnect-timeout={bad}")),
                Err(UriError::BadReconnectTimeout(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn tls_uris() {
        let uri = NbdUri::parse("nbds://127.0.0.1:99/disk").expect("parse");
        assert_eq!(uri.tls, Some(ClientTlsOptions::default()));
        assert_eq!(uri.tls_server_name(), "127.0.0.1");
        let uri = NbdUri::parse(
            "nbds+unix:///disk?socket=/s&tls-certificates=/etc/pki/a%20b&tls-verify-peer=FALSE&tls-hostname=server.example",
        )
        .expect("parse");
        assert_eq!(
            uri.tls,
            Some(ClientTlsOptions {
                certificates: Some(PathBuf::from("/etc/pki/a b")),
                verify_peer: false,
                hostname: Some("server.example".to_owned()),
            })
        );
        assert_eq!(uri.tls_server_name(), "server.example");
        assert_eq!(
            NbdUri::parse("nbds+unix:///?socket=/s")
                .expect("parse")
                .tls_server_name(),
            "localhost"
        );
        assert!(NbdUri::parse("nbd://h/").expect("parse").tls.is_none());
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "nbd://127.0.0.1:10809/",
            "nbd://host:99/hello%20world",
            "nbd://[::1]:2000/a/b",
            "nbd+unix:///disk?socket=/tmp/s%26x",
            "nbds://127.0.0.1:10809/",
            "nbds://h:1/x?tls-certificates=/etc/pki/libnbd&tls-verify-peer=false",
            "nbds+unix:///d?socket=/s&tls-hostname=localhost",
            "nbd://h:1/x?reconnect-timeout=0",
            "nbd+unix:///d?socket=/s&reconnect-timeout=2.5",
        ] {
            let uri = NbdUri::parse(text).expect(text);
            assert_eq!(uri.to_string(), text);
            assert_eq!(NbdUri::parse(&uri.to_string()), Ok(uri));
        }
        assert_eq!(
            NbdUri::parse("nbd://h/x").expect("parse").to_string(),
            "nbd://h:10809/x"
        );
    }
}
