//! `serve --run COMMAND`: a command run against the server it started, as
//! nbdkit's captive mode does (`nbdkit-captive(1)`): the shell gets
//! `$uri`, `$port`, `$unixsocket`, `$exportname` and `$tls`, the server
//! stops when the command exits, and the command's status becomes the
//! server's.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::server::Listener;

/// How the server offers TLS, for `$tls` and the URI scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsOffer {
    /// No TLS (`$tls` = 0).
    Off,
    /// Clients choose (`$tls` = 1).
    On,
    /// TLS or nothing (`$tls` = 2; the URI is `nbds://`).
    Required,
}

/// The variables the command sees, in the order nbdkit documents them.
pub fn variables(listener: &Listener, tls: TlsOffer) -> io::Result<Vec<(&'static str, String)>> {
    let secure = if tls == TlsOffer::Required { "s" } else { "" };
    let (uri, port, unix_socket) = match listener {
        Listener::Tcp(listener) => {
            let address = listener.local_addr()?;
            let host = match address.ip() {
                ip if ip.is_unspecified() => "localhost".to_owned(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                std::net::IpAddr::V4(ip) => ip.to_string(),
            };
            let port = address.port();
            (
                format!("nbd{secure}://{host}:{port}/"),
                port.to_string(),
                String::new(),
            )
        }
        Listener::Unix(listener) => {
            let path = listener
                .local_addr()?
                .as_pathname()
                .map(Path::to_path_buf)
                .ok_or_else(|| io::Error::other("the unix socket has no path"))?;
            let text = path.display().to_string();
            (
                format!("nbd{secure}+unix:///?socket={}", percent_encode(&text)),
                String::new(),
                text,
            )
        }
    };
    let tls = match tls {
        TlsOffer::Off => "0",
        TlsOffer::On => "1",
        TlsOffer::Required => "2",
    };
    Ok(vec![
        ("uri", uri),
        ("port", port),
        ("unixsocket", unix_socket),
        // The URIs name no export: the server's default (first) one.
        ("exportname", String::new()),
        ("tls", tls.to_owned()),
    ])
}

/// Characters of a URI query value kept as they are (RFC 3986
/// unreserved, and `/` which paths are made of).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Starts `command` with `sh -c` and `variables` set (and systemd's
/// socket-activation variables removed: the socket is the server's).
pub fn spawn(command: &str, variables: &[(&str, String)]) -> io::Result<tokio::process::Child> {
    let mut child = tokio::process::Command::new("/bin/sh");
    child.arg("-c").arg(command);
    for name in crate::activation::VARIABLES {
        child.env_remove(name);
    }
    child.envs(variables.iter().map(|(name, value)| (name, value)));
    child.kill_on_drop(true).spawn()
}

/// The exit code for the command's status: its own, or 128 + the signal
/// that killed it, as shells report.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from((128 + signal) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}

/// A directory only this user can enter, for the private socket `--run`
/// uses when no address is given; removed with what it holds on drop.
#[derive(Debug)]
pub struct PrivateDirectory(PathBuf);

impl PrivateDirectory {
    /// Creates it under the temporary directory (`$TMPDIR`).
    pub fn create() -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("nbd-std-{}-{nanos}", std::process::id()));
        // Fails if it exists: nobody can have prepared it for us.
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self(path))
    }

    /// The socket's path inside it.
    pub fn socket(&self) -> PathBuf {
        self.0.join("socket")
    }
}

impl Drop for PrivateDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_are_encoded_for_uris() {
        assert_eq!(percent_encode("/tmp/a b/s?k"), "/tmp/a%20b/s%3Fk");
        assert_eq!(percent_encode("/run/nbd.sock"), "/run/nbd.sock");
    }

    #[test]
    fn exit_codes_as_shells_report_them() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        // Killed by SIGTERM (15).
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }
}
