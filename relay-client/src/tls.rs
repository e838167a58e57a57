//! How the agent checks the relay: the system's trusted roots (plus the
//! Mozilla roots built in), a pinned fingerprint, or (for throwaway local use)
//! nothing. Builds the QUIC client configuration.

use std::sync::{Arc, Mutex};

use hookrelay_shared::ALPN;
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::{Digest, Sha256};

use crate::config::Trust;

/// Why the agent refused the relay's certificate.
#[derive(Clone, Debug)]
pub enum Refusal {
    /// It is not the pinned one; this is its SHA-256 (hex).
    Fingerprint(String),
    /// It failed the check against the trusted roots.
    Untrusted(CertificateError),
}

/// Where the verifier reports why it refused a certificate, so the agent can
/// say what to do instead of printing a bare TLS alert.
pub type RefusalSlot = Arc<Mutex<Option<Refusal>>>;

/// QUIC client configuration for `trust`, and where a refusal is reported.
///
/// # Errors
/// When rustls cannot build a TLS 1.3 configuration.
pub fn client_config(trust: &Trust) -> Result<(quinn::ClientConfig, RefusalSlot), rustls::Error> {
    let (mut tls, mismatch) = rustls_client_config(trust)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Never 0-RTT: the hello carries the token, and early data can be replayed.
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    Ok((quinn::ClientConfig::new(Arc::new(crypto)), mismatch))
}

/// The TLS 1.3 client configuration that checks the relay's certificate as
/// `trust` says, without an application protocol (the benchmark's HTTPS
/// senders use it too), and where a refusal is reported.
///
/// # Errors
/// When rustls cannot build a TLS 1.3 configuration.
pub fn rustls_client_config(
    trust: &Trust,
) -> Result<(rustls::ClientConfig, RefusalSlot), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mismatch: RefusalSlot = Arc::new(Mutex::new(None));
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let tls = match trust {
        Trust::SystemRoots => {
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(trusted_roots()), provider)
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(RootsVerifier {
                    inner: verifier,
                    refusal: mismatch.clone(),
                }))
                .with_no_client_auth()
        }
        Trust::Pinned(fingerprint) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                fingerprint: Some(*fingerprint),
                provider,
                mismatch: mismatch.clone(),
            }))
            .with_no_client_auth(),
        Trust::InsecureSkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                fingerprint: None,
                provider,
                mismatch: mismatch.clone(),
            }))
            .with_no_client_auth(),
    };
    Ok((tls, mismatch))
}

/// The roots a relay's certificate may chain to: the system's (or, when set,
/// those in `SSL_CERT_FILE` / `SSL_CERT_DIR`), and the Mozilla roots built in,
/// so a machine without a CA bundle still trusts public CAs.
fn trusted_roots() -> RootCertStore {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::debug!(error = %err, "skipped part of the system's trusted roots");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "system roots loaded");
    roots
}

/// The standard (WebPKI) check against trusted roots, remembering why it
/// refused a certificate.
#[derive(Debug)]
struct RootsVerifier {
    inner: Arc<WebPkiServerVerifier>,
    refusal: RefusalSlot,
}

impl ServerCertVerifier for RootsVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(rustls::Error::InvalidCertificate(problem)) = &verified {
            *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Refusal::Untrusted(problem.clone()));
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts exactly the certificate whose SHA-256 is `fingerprint` (any, when
/// `None`), and still checks the handshake signature against it, so a pinned
/// relay must hold the private key.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
    mismatch: RefusalSlot,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(expected) = self.fingerprint else {
            return Ok(ServerCertVerified::assertion());
        };
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        let same = expected
            .iter()
            .zip(&got)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if same {
            Ok(ServerCertVerified::assertion())
        } else {
            *self.mismatch.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Refusal::Fingerprint(hex::encode(got)));
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
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
