//! Certificates and trust: the aggregator's self-signed identity (generated once with
//! rcgen, kept in two PEM files), its SHA-256 fingerprint, and the two ways a worker
//! trusts it: the certificate file as the only root (`--ca`), or the fingerprint
//! (`--fingerprint`). There is deliberately no way to skip verification.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::Error;

/// The name the generated certificate is issued to, and the name workers ask for by
/// default (TLS needs one; aggregators are found by address, not by DNS).
pub const DEFAULT_SERVER_NAME: &str = "inagg-aggregator";

/// The ALPN protocol both ends insist on: a QUIC client of something else is refused
/// in the handshake.
pub const ALPN: &[u8] = b"inagg/1";

/// The aggregator's certificate and key.
#[derive(Debug)]
pub struct Identity {
    /// The certificate, DER.
    pub cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    /// Where the certificate is kept: the file workers pass to `--ca`.
    pub cert_path: PathBuf,
    /// Whether this start generated it.
    pub generated: bool,
}

impl Identity {
    /// Loads the certificate and key from `cert_path` and `key_path`, or, when neither
    /// file exists, generates a self-signed pair for [`DEFAULT_SERVER_NAME`],
    /// `localhost` and the loopback addresses and stores it there (the key readable by
    /// its owner only). One file without the other is an error: nothing is overwritten.
    pub fn load_or_generate(cert_path: &Path, key_path: &Path) -> Result<Self, Error> {
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert = CertificateDer::from_pem_file(cert_path).map_err(|e| Error::Pem {
                    path: cert_path.to_owned(),
                    detail: e.to_string(),
                })?;
                let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| Error::Pem {
                    path: key_path.to_owned(),
                    detail: e.to_string(),
                })?;
                Ok(Self {
                    cert,
                    key,
                    cert_path: cert_path.to_owned(),
                    generated: false,
                })
            }
            (false, false) => {
                let names = vec![
                    DEFAULT_SERVER_NAME.to_string(),
                    "localhost".to_string(),
                    "127.0.0.1".to_string(),
                    "::1".to_string(),
                ];
                let ck = rcgen::generate_simple_self_signed(names)
                    .map_err(|e| Error::Generate(e.to_string()))?;
                write_file(cert_path, ck.cert.pem().as_bytes(), 0o644)?;
                write_file(key_path, ck.signing_key.serialize_pem().as_bytes(), 0o600)?;
                let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
                    .map_err(|e| Error::Generate(e.to_string()))?;
                Ok(Self {
                    cert: ck.cert.der().clone(),
                    key,
                    cert_path: cert_path.to_owned(),
                    generated: true,
                })
            }
            (true, false) => Err(Error::HalfIdentity {
                present: cert_path.to_owned(),
                missing: key_path.to_owned(),
            }),
            (false, true) => Err(Error::HalfIdentity {
                present: key_path.to_owned(),
                missing: cert_path.to_owned(),
            }),
        }
    }

    /// The SHA-256 fingerprint of the certificate, lower-case hex.
    pub fn fingerprint(&self) -> String {
        hex(&sha256(&self.cert))
    }

    pub(crate) fn server_crypto(&self) -> Result<rustls::ServerConfig, Error> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        Ok(c)
    }
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let io = |source| Error::File {
        path: path.to_owned(),
        source,
    };
    let mut f = o.open(path).map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)
}

/// How a worker decides that it talks to its aggregator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The aggregator's certificate must chain to the certificate(s) in this PEM file
    /// (the aggregator's own self-signed certificate, or a CA's).
    Ca(PathBuf),
    /// The aggregator's certificate must have this SHA-256 digest.
    Fingerprint([u8; 32]),
}

impl Trust {
    /// Parses a fingerprint as printed by the aggregator: 64 hex digits, optionally
    /// separated by colons, optionally prefixed `sha256:`.
    pub fn fingerprint(text: &str) -> Result<Self, Error> {
        let t = text.trim();
        let t = t.strip_prefix("sha256:").unwrap_or(t);
        let digits: Vec<u8> = t.bytes().filter(|b| *b != b':').collect();
        let bad = || Error::BadFingerprint(text.to_string());
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let s = std::str::from_utf8(pair).map_err(|_| bad())?;
            *o = u8::from_str_radix(s, 16).map_err(|_| bad())?;
        }
        Ok(Self::Fingerprint(out))
    }

    pub(crate) fn client_crypto(&self) -> Result<rustls::ClientConfig, Error> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let mut c = match self {
            Trust::Ca(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .map_err(|e| Error::Pem {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?
                    .collect::<Result<_, _>>()
                    .map_err(|e| Error::Pem {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?;
                if certs.is_empty() {
                    return Err(Error::Pem {
                        path: path.clone(),
                        detail: "no certificate in the file".into(),
                    });
                }
                for cert in certs {
                    roots.add(cert)?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::Fingerprint(fp) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
                    sha256: *fp,
                    provider: provider(),
                }))
                .with_no_client_auth(),
        };
        c.alpn_protocols = vec![ALPN.to_vec()];
        Ok(c)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a certificate's DER bytes.
pub fn sha256(cert: &CertificateDer<'_>) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Certificate pinning: the server's end-entity certificate must have the pinned
/// digest (names and dates do not matter: the digest names the one certificate), and
/// the handshake must still prove that the server holds its key.
#[derive(Debug)]
struct PinnedCertificate {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = sha256(end_entity);
        // A certificate is public: comparing its digest needs no constant time.
        if got == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the aggregator's certificate has fingerprint {}, not the expected {}",
                hex(&got),
                hex(&self.sha256)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
