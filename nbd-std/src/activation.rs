//! systemd socket activation (`sd_listen_fds(3)`): a service started for
//! a `.socket` unit receives its listening socket as descriptor 3, with
//! `LISTEN_PID` (this process) and `LISTEN_FDS` (how many) in the
//! environment. Works for TCP (`ListenStream=10809`) and unix sockets
//! (`ListenStream=/run/nbd.sock`), and with `systemd-socket-activate`.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use rustix::net::AddressFamily;

use crate::server::Listener;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_PASSED_FD: RawFd = 3;

/// The environment variables of the protocol, removed from commands the
/// server starts (`--run`) so they do not take the socket for theirs.
pub const VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Why the socket systemd passed cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` is not a count.
    #[error("LISTEN_FDS=`{0}` is not a number of descriptors")]
    BadCount(String),
    /// More than one socket: the server listens on one.
    #[error(
        "systemd passed {0} sockets (LISTEN_FDS); nbd-std serves one: give the .socket unit a single ListenStream="
    )]
    TooMany(usize),
    /// Descriptor 3 is not a socket nbd-std can listen on.
    #[error("descriptor 3 from systemd: {0}")]
    Unusable(String),
}

/// The listener systemd passed, or `None` when this process was not
/// socket-activated (no `LISTEN_PID`, or another process's).
pub fn passed_listener() -> Result<Option<Listener>, ActivationError> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if !for_us {
        return Ok(None);
    }
    let count = std::env::var("LISTEN_FDS").unwrap_or_default();
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(count.clone()))?;
    match count {
        0 => Ok(None),
        1 => {
            // SAFETY: with LISTEN_PID naming this process, sd_listen_fds(3)
            // hands descriptor 3 to it, and nothing in this process opened
            // or took it before: ownership is ours to take, once.
            #[allow(unsafe_code)]
            let socket = unsafe { OwnedFd::from_raw_fd(FIRST_PASSED_FD) };
            listener_from(socket)
                .map(Some)
                .map_err(|e| ActivationError::Unusable(e.to_string()))
        }
        n => Err(ActivationError::TooMany(n)),
    }
}

fn listener_from(socket: OwnedFd) -> std::io::Result<Listener> {
    use std::io::{Error, ErrorKind};
    // systemd passes it inheritable: commands started with --run must not
    // hold the server's socket open.
    rustix::io::fcntl_setfd(&socket, rustix::io::FdFlags::CLOEXEC)?;
    if rustix::net::sockopt::socket_type(&socket)? != rustix::net::SocketType::STREAM {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a stream socket (use ListenStream=)",
        ));
    }
    let family = rustix::net::getsockname(&socket)?.address_family();
    if family == AddressFamily::UNIX {
        let listener = std::os::unix::net::UnixListener::from(socket);
        listener.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(listener).map(Listener::Unix)
    } else if family == AddressFamily::INET || family == AddressFamily::INET6 {
        let listener = std::net::TcpListener::from(socket);
        listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(listener).map(Listener::Tcp)
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("socket family {family:?} is neither TCP nor unix"),
        ))
    }
}
