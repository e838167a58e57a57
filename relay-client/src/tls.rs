//! How the agent checks the relay: public roots, a pinned fingerprint, or (for
//! throwaway local use) nothing. Builds the QUIC client configuration.

use std::sync::{Arc, Mutex};

use hookrelay_shared::ALPN;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use sha2::{Digest, Sha256};

use crate::config::Trust;

/// What the pinning verifier saw when it refused a certificate, so the agent can
/// say "fingerprint mismatch" instead of a bare TLS alert.
pub type PinMismatch = Arc<Mutex<Option<String>>>;

/// QUIC client configuration for `trust`, and where a pin mismatch is reported.
///
/// # Errors
/// When rustls cannot build a TLS 1.3 configuration.
pub fn client_config(trust: &Trust) -> Result<(quinn::ClientConfig, PinMismatch), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mismatch: PinMismatch = Arc::new(Mutex::new(None));
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match trust {
        Trust::SystemRoots => {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            builder.with_root_certificates(roots).with_no_client_auth()
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
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Never 0-RTT: the hello carries the token, and early data can be replayed.
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    Ok((quinn::ClientConfig::new(Arc::new(crypto)), mismatch))
}

/// Accepts exactly the certificate whose SHA-256 is `fingerprint` (any, when
/// `None`), and still checks the handshake signature against it, so a pinned
/// relay must hold the private key.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
    mismatch: PinMismatch,
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
            *self.mismatch.lock().unwrap_or_else(|p| p.into_inner()) = Some(hex::encode(got));
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
