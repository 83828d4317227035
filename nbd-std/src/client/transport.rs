//! The byte stream under a connection: TCP (with `TCP_NODELAY`, as request
//! headers are small and latency-bound) or a unix-domain socket.

use std::io::{self, IoSlice};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest, Ready};
use tokio::net::{TcpStream, UnixStream};

use super::error::{Error, Result};
use super::uri::{Endpoint, NbdUri};

/// How long opening the transport and negotiating may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// An open connection to a server.
#[derive(Debug)]
pub(crate) enum Transport {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Transport {
    /// Opens the transport `uri` names.
    pub(crate) async fn connect(uri: &NbdUri) -> Result<Self> {
        let address = uri.address();
        let failed = |source: io::Error| Error::Connect {
            address: address.clone(),
            source: source.into(),
        };
        match &uri.endpoint {
            Endpoint::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(failed)?;
                stream.set_nodelay(true).map_err(failed)?;
                Ok(Self::Tcp(stream))
            }
            Endpoint::Unix(path) => {
                use std::os::unix::ffi::OsStrExt;
                let bytes = path.as_os_str().as_bytes();
                let stream = if let Some(name) = bytes.strip_prefix(b"\0") {
                    // The abstract namespace (Linux): connecting never blocks.
                    use std::os::linux::net::SocketAddrExt;
                    let addr =
                        std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(failed)?;
                    let stream =
                        std::os::unix::net::UnixStream::connect_addr(&addr).map_err(failed)?;
                    stream.set_nonblocking(true).map_err(failed)?;
                    UnixStream::from_std(stream).map_err(failed)?
                } else {
                    UnixStream::connect(path).await.map_err(failed)?
                };
                Ok(Self::Unix(stream))
            }
        }
    }

    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.write_all(bytes).await,
            Self::Unix(s) => s.write_all(bytes).await,
        }
    }

    pub(crate) async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf).await,
            Self::Unix(s) => s.read(buf).await,
        }
    }

    /// Waits until the socket is ready for any of `interest`.
    pub(crate) async fn ready(&self, interest: Interest) -> io::Result<Ready> {
        match self {
            Self::Tcp(s) => s.ready(interest).await,
            Self::Unix(s) => s.ready(interest).await,
        }
    }

    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_read(buf),
            Self::Unix(s) => s.try_read(buf),
        }
    }

    pub(crate) fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write_vectored(slices),
            Self::Unix(s) => s.try_write_vectored(slices),
        }
    }

    /// Closes the sending side (the server sees end of input).
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown().await,
            Self::Unix(s) => s.shutdown().await,
        }
    }
}
