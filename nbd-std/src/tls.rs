//! TLS for `NBD_OPT_STARTTLS` (spec: "TLS support"), with rustls and its
//! `ring` provider.
//!
//! - Server: [`ServerTls::load`] reads a PEM certificate chain and key,
//!   and optionally a client CA: with one, every client must present a
//!   certificate that CA signed (mutual TLS).
//! - Client: [`client_config`] follows libnbd's and qemu's conventions: a
//!   directory holding `ca-cert.pem` (trusted CA; the system's trust store
//!   when absent) and optionally `client-cert.pem` with `client-key.pem`
//!   (a client certificate for mutual TLS).
//!
//! The provider is passed explicitly everywhere, so nothing depends on a
//! process-wide default being installed.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(feature = "client")]
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
#[cfg(feature = "client")]
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
#[cfg(feature = "client")]
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls::{RootCertStore, ServerConfig};

/// File names in a client's certificate directory (libnbd's
/// `tls-certificates`, qemu's `tls-creds-x509 dir=`).
pub const CA_CERT: &str = "ca-cert.pem";
/// The client certificate in a certificate directory.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client certificate's key in a certificate directory.
pub const CLIENT_KEY: &str = "client-key.pem";

#[cfg(feature = "client")]
/// System CA bundles tried, in order, when no CA is given (Debian/Ubuntu,
/// Fedora/RHEL, Alpine/macOS-style). `SSL_CERT_FILE` comes first.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {}: {reason}", path.display())]
    Pem {
        /// What the file should hold (`certificate`, `private key`, …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A certificate file holds no certificate.
    #[error("no PEM certificate in {} (expected -----BEGIN CERTIFICATE-----)", .0.display())]
    NoCertificate(PathBuf),
    /// rustls refused the certificate, key or CA (a key that does not match
    /// the certificate, an unsupported key type, a bad CA).
    #[error("{what}: {reason}")]
    Rejected {
        /// Which part was refused.
        what: &'static str,
        /// rustls's reason.
        reason: String,
    },
    /// `client-cert.pem` without `client-key.pem`, or the other way round.
    #[error("{} has {} but not {}: both are needed for a client certificate", dir.display(), present, missing)]
    HalfClientIdentity {
        /// The certificate directory.
        dir: PathBuf,
        /// The file present.
        present: &'static str,
        /// The file missing.
        missing: &'static str,
    },
    /// No CA given and no system trust store found.
    #[error(
        "no CA to verify the server with: put {CA_CERT} in the tls-certificates directory, or install the system CA bundle"
    )]
    NoTrustRoots,
    /// The name to verify the server's certificate against is not a valid
    /// DNS name or IP address.
    #[error("`{0}` is not a valid server name for TLS")]
    BadServerName(String),
}

/// The crypto provider every configuration here uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let failed = |error: pem::Error| TlsError::Pem {
        what,
        path: path.to_owned(),
        reason: pem_reason(error),
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(failed)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed)?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certificates)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        reason: match error {
            pem::Error::NoItemsFound => {
                "no PEM private key (expected -----BEGIN PRIVATE KEY-----, RSA or EC PRIVATE KEY)"
                    .to_owned()
            }
            other => pem_reason(other),
        },
    })
}

/// `pem::Error` in words: the I/O error itself, not its debug form.
fn pem_reason(error: pem::Error) -> String {
    match error {
        pem::Error::Io(error) => error.to_string(),
        pem::Error::NoItemsFound => "no PEM items found".to_owned(),
        other => other.to_string(),
    }
}

fn roots(
    what: &'static str,
    certificates: Vec<CertificateDer<'static>>,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(TlsError::Rejected {
            what,
            reason: format!("none of its {ignored} certificates is a usable CA certificate"),
        });
    }
    Ok(roots)
}

/// A server's TLS identity: certificate chain, key, and the CA client
/// certificates must chain to (mutual TLS), if any.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    mutual: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the certificate chain `cert` (PEM, leaf first) and its key
    /// `key` (PEM: PKCS#8, PKCS#1 or SEC1), and with `client_ca` requires
    /// clients to present a certificate that CA signed.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let chain = read_certificates("certificate", cert)?;
        let key = read_key(key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Rejected {
                what: "TLS setup",
                reason: error.to_string(),
            })?;
        let builder = match client_ca {
            Some(path) => {
                let roots = roots("client CA", read_certificates("client CA", path)?)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|error| TlsError::Rejected {
                            what: "client CA",
                            reason: error.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|error| TlsError::Rejected {
                what: "server certificate and key",
                reason: error.to_string(),
            })?;
        Ok(Self {
            config: Arc::new(config),
            mutual: client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.mutual
    }

    // A client-only build loads server identities (tests, tools) but
    // never accepts.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }
}

#[cfg(feature = "client")]
pub use crate::client::uri::ClientTlsOptions;

/// `host` (an IP address or DNS name) as the name a server's certificate
/// is checked against.
#[cfg(feature = "client")]
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::BadServerName(host.to_owned()))
}

/// The rustls client configuration `options` describe.
#[cfg(feature = "client")]
pub fn client_config(options: &ClientTlsOptions) -> Result<Arc<ClientConfig>, TlsError> {
    let dir = options.certificates.as_deref();
    let file = |name: &str| dir.map(|d| d.join(name)).filter(|p| p.exists());
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Rejected {
            what: "TLS setup",
            reason: error.to_string(),
        })?;
    let builder = if options.verify_peer {
        let roots = match file(CA_CERT) {
            Some(path) => roots(
                "CA certificate",
                read_certificates("CA certificate", &path)?,
            )?,
            None => system_roots()?,
        };
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoPeerVerification(provider())))
    };
    let half = |present, missing| TlsError::HalfClientIdentity {
        dir: dir.map(Path::to_owned).unwrap_or_default(),
        present,
        missing,
    };
    let config = match (file(CLIENT_CERT), file(CLIENT_KEY)) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                read_certificates("client certificate", &cert)?,
                read_key(&key)?,
            )
            .map_err(|error| TlsError::Rejected {
                what: "client certificate and key",
                reason: error.to_string(),
            })?,
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => return Err(half(CLIENT_CERT, CLIENT_KEY)),
        (None, Some(_)) => return Err(half(CLIENT_KEY, CLIENT_CERT)),
    };
    Ok(Arc::new(config))
}

/// The system's CA bundle (`SSL_CERT_FILE`, else the usual places).
#[cfg(feature = "client")]
fn system_roots() -> Result<RootCertStore, TlsError> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let path = from_env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or(TlsError::NoTrustRoots)?;
    roots(
        "system CA bundle",
        read_certificates("system CA bundle", &path)?,
    )
}

/// `tls-verify-peer=false`: any certificate is accepted, but handshake
/// signatures are still checked so the session keys belong to whoever
/// presented the certificate.
#[cfg(feature = "client")]
#[derive(Debug)]
struct NoPeerVerification(Arc<CryptoProvider>);

#[cfg(feature = "client")]
impl ServerCertVerifier for NoPeerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An I/O error from a TLS handshake, in words: rustls's alert or
/// certificate error when there is one.
pub fn tls_reason(error: &io::Error) -> String {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(tls) => tls.to_string(),
        None if error.kind() == io::ErrorKind::UnexpectedEof => {
            "the peer closed the connection during the TLS handshake".to_owned()
        }
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not PEM\n").expect("write");
        let error = ServerTls::load(&missing, &missing, None).expect_err("missing file");
        assert!(matches!(error, TlsError::Pem { .. }), "{error:?}");
        assert!(error.to_string().contains("missing.pem"), "{error}");
        let error = ServerTls::load(&empty, &empty, None).expect_err("no certificate");
        assert!(matches!(error, TlsError::NoCertificate(_)), "{error:?}");
    }

    #[cfg(feature = "client")]
    #[test]
    fn client_setup_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        // A client certificate without its key.
        std::fs::write(dir.path().join(CLIENT_CERT), "").expect("write");
        let options = ClientTlsOptions {
            certificates: Some(dir.path().to_owned()),
            verify_peer: false,
            hostname: None,
        };
        let error = client_config(&options).expect_err("half identity");
        assert!(
            matches!(
                error,
                TlsError::HalfClientIdentity {
                    missing: CLIENT_KEY,
                    ..
                }
            ),
            "{error:?}"
        );
        // No directory, no verification: nothing to read.
        let options = ClientTlsOptions {
            verify_peer: false,
            ..ClientTlsOptions::default()
        };
        assert!(client_config(&options).is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("bad name!").is_err());
    }
}
