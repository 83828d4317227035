//! The byte stream under a connection: TCP (with `TCP_NODELAY`, as request
//! headers are small and latency-bound) or a unix-domain socket.
//!
//! TLS: the driver works on socket readiness (`ready`, `try_read`,
//! `try_write_vectored`), which a TLS session does not have (decrypted
//! bytes may wait inside rustls with the socket idle). So after the
//! handshake a relay task moves bytes between the TLS stream and one end
//! of a socket pair, and the connection goes on over the other end as a
//! plain unix socket. It costs a copy per byte, on the client side only.

use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

#[cfg(feature = "tls")]
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest, Ready};
use tokio::net::{TcpStream, UnixStream};
#[cfg(feature = "tls")]
use tracing::debug;

use super::error::{Error, Result};
use super::uri::{Endpoint, NbdUri};

/// How long opening the transport and negotiating may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes the TLS relay moves at once each way: large requests in few
/// TLS records and syscalls.
#[cfg(feature = "tls")]
const RELAY_BUFFER: usize = 256 * 1024;

/// An open connection to a server.
#[derive(Debug)]
pub(crate) enum Transport {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// The plain end of a TLS relay, and why the relay failed, if it did
    /// (never made without the `tls` feature).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Tls(UnixStream, RelayFailure),
}

/// Why a TLS relay stopped early (a TLS alert, say), recorded before it
/// closes the driver's socket so the driver's error can name it.
pub(crate) type RelayFailure = Arc<Mutex<Option<String>>>;

/// The rustls configuration of one URI's TLS options, built at the first
/// TLS handshake and shared by every connection opened with this value
/// (the connections of one [`Client`](super::Client)): the certificates
/// and trust store are read once, not once per connection.
#[derive(Clone, Debug, Default)]
pub(crate) struct TlsConfig(
    #[cfg(feature = "tls")] Arc<std::sync::OnceLock<Arc<rustls::ClientConfig>>>,
);

#[cfg(feature = "tls")]
impl TlsConfig {
    fn get(
        &self,
        uri: &NbdUri,
    ) -> std::result::Result<Arc<rustls::ClientConfig>, crate::tls::TlsError> {
        if let Some(config) = self.0.get() {
            return Ok(Arc::clone(config));
        }
        let options = uri.tls.clone().unwrap_or_default();
        let config = crate::tls::client_config(&options)?;
        // Connections racing here build equal configurations: keep one.
        Ok(Arc::clone(self.0.get_or_init(|| config)))
    }
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
            Self::Unix(s) | Self::Tls(s, _) => s.write_all(bytes).await,
        }
    }

    pub(crate) async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf).await,
            Self::Unix(s) | Self::Tls(s, _) => s.read(buf).await,
        }
    }

    /// Waits until the socket is ready for any of `interest`.
    pub(crate) async fn ready(&self, interest: Interest) -> io::Result<Ready> {
        match self {
            Self::Tcp(s) => s.ready(interest).await,
            Self::Unix(s) | Self::Tls(s, _) => s.ready(interest).await,
        }
    }

    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_read(buf),
            Self::Unix(s) | Self::Tls(s, _) => s.try_read(buf),
        }
    }

    pub(crate) fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write_vectored(slices),
            Self::Unix(s) | Self::Tls(s, _) => s.try_write_vectored(slices),
        }
    }

    /// Without the `tls` feature there is no TLS to start: the server
    /// acknowledged `NBD_OPT_STARTTLS` for an `nbds://` URI in vain.
    #[cfg(not(feature = "tls"))]
    pub(crate) async fn start_tls(&mut self, uri: &NbdUri, _tls: &TlsConfig) -> Result<()> {
        Err(Error::TlsHandshake {
            address: uri.address(),
            reason: "this build of nbd-std has no TLS (the `tls` feature is off)".into(),
        })
    }

    /// Runs the TLS handshake on this transport (after the server
    /// acknowledged `NBD_OPT_STARTTLS`) and goes on over TLS.
    #[cfg(feature = "tls")]
    pub(crate) async fn start_tls(&mut self, uri: &NbdUri, tls: &TlsConfig) -> Result<()> {
        let setup = |error: crate::tls::TlsError| Error::TlsSetup(Arc::new(error));
        let config = tls.get(uri).map_err(setup)?;
        let name = crate::tls::server_name(uri.tls_server_name()).map_err(setup)?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let (near, far) = UnixStream::pair().map_err(Error::io)?;
        let failure = RelayFailure::default();
        let handshake_failed = |error: io::Error| Error::TlsHandshake {
            address: uri.address(),
            reason: crate::tls::tls_reason(&error),
        };
        match std::mem::replace(self, Self::Tls(near, Arc::clone(&failure))) {
            Self::Tcp(stream) => {
                let tls = connector
                    .connect(name, stream)
                    .await
                    .map_err(handshake_failed)?;
                tokio::spawn(relay(tls, far, failure));
            }
            Self::Unix(stream) => {
                let tls = connector
                    .connect(name, stream)
                    .await
                    .map_err(handshake_failed)?;
                tokio::spawn(relay(tls, far, failure));
            }
            Self::Tls(..) => {
                return Err(Error::TlsHandshake {
                    address: uri.address(),
                    reason: "TLS is already active".into(),
                });
            }
        }
        Ok(())
    }

    /// `error`, or the TLS failure behind it: with TLS 1.3 a server that
    /// refuses the client's certificate says so only after the client's
    /// handshake is done, so the first sign is a broken connection.
    pub(crate) fn explain(&self, error: Error, address: &str) -> Error {
        let Self::Tls(_, failure) = self else {
            return error;
        };
        let reason = failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match reason {
            Some(reason) => Error::TlsHandshake {
                address: address.to_owned(),
                reason,
            },
            None => error,
        }
    }

    /// Closes the sending side (the server sees end of input).
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown().await,
            Self::Unix(s) | Self::Tls(s, _) => s.shutdown().await,
        }
    }
}

/// Moves bytes between the TLS session and the driver's socket until both
/// directions end. An end of input on one side is passed on as a shutdown
/// (a TLS close_notify towards the server); when it ends, dropping both
/// closes the driver's end, so the driver sees the connection end.
#[cfg(feature = "tls")]
async fn relay<T>(mut tls: T, mut plain: UnixStream, failure: RelayFailure)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut plain, RELAY_BUFFER, RELAY_BUFFER)
        .await
    {
        Ok((from_server, to_server)) => {
            debug!("TLS relay done: {to_server} bytes to the server, {from_server} from it");
        }
        Err(error) => {
            let reason = crate::tls::tls_reason(&error);
            debug!("TLS relay ended: {reason}");
            *failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
        }
    }
}
