//! Certificates for the TLS tests, made by the `openssl` command at test
//! time: a CA, a server certificate for `localhost` and 127.0.0.1, and a
//! client certificate for mutual TLS.

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use super::{have_tools, run_ok, temp_dir, tool};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Certificates for one test, in the layouts servers and clients expect.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// Makes the certificates with `openssl` (ECDSA P-256, valid 2 days);
    /// `None` (test skipped) if openssl is missing.
    pub fn new() -> Option<Pki> {
        if !have_tools(&["openssl"]) {
            return None;
        }
        let dir = temp_dir();
        let root = dir.path();
        let openssl = |args: &[&str]| {
            run_ok(tool("openssl").current_dir(root).args(args), TIMEOUT);
        };
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut args = vec!["req", "-x509"];
        args.extend(new_key);
        args.extend([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=nbd-std test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&args);
        // GnuTLS (qemu) checks key usage and purpose: give both.
        let leaf = |name: &str, subject: &str, extensions: &str, serial: &str| {
            std::fs::write(root.join(format!("{name}.ext")), extensions).expect("write extensions");
            let mut args = vec!["req"];
            args.extend(new_key);
            let key = format!("{name}-key.pem");
            let csr = format!("{name}.csr");
            args.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
            openssl(&args);
            let cert = format!("{name}-cert.pem");
            let ext = format!("{name}.ext");
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-set_serial",
                serial,
                "-days",
                "2",
                "-out",
                &cert,
                "-extfile",
                &ext,
            ]);
        };
        leaf(
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
            "2",
        );
        leaf(
            "client",
            "/CN=nbd-std test client",
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
            "3",
        );
        // Client directories as libnbd's tls-certificates and qemu's
        // tls-creds-x509 dir= read them: with and without a client identity.
        for (sub, files) in [
            ("trust", &["ca-cert.pem"][..]),
            (
                "identity",
                &["ca-cert.pem", "client-cert.pem", "client-key.pem"][..],
            ),
        ] {
            std::fs::create_dir(root.join(sub)).expect("create client directory");
            for file in files {
                std::fs::copy(root.join(file), root.join(sub).join(file)).expect("copy");
            }
        }
        // A directory trusting the wrong certificate (not the CA).
        std::fs::create_dir(root.join("mistrust")).expect("create client directory");
        std::fs::copy(
            root.join("client-cert.pem"),
            root.join("mistrust/ca-cert.pem"),
        )
        .expect("copy");
        Some(Pki { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Client directory with the CA only.
    pub fn trust(&self) -> PathBuf {
        self.path("trust")
    }

    /// Client directory with the CA and a client certificate.
    pub fn identity(&self) -> PathBuf {
        self.path("identity")
    }

    /// `serve` arguments for `--tls MODE` with this PKI's server identity.
    pub fn serve_args(&self, mode: &str) -> Vec<String> {
        vec![
            "--size".into(),
            "64M".into(),
            "--tls".into(),
            mode.into(),
            "--tls-cert".into(),
            self.path("server-cert.pem").display().to_string(),
            "--tls-key".into(),
            self.path("server-key.pem").display().to_string(),
        ]
    }

    /// The same with client certificates required (mutual TLS).
    pub fn mutual_args(&self) -> Vec<String> {
        let mut args = self.serve_args("require");
        args.push("--tls-client-ca".into());
        args.push(self.path("ca-cert.pem").display().to_string());
        args
    }
}
