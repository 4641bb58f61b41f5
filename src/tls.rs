//! HTTPS only: rustls with the ring provider, TLS 1.3 and TLS 1.2 with ECDHE + AEAD suites (Mozilla
//! "intermediate"): no TLS ≤ 1.1, no CBC, no RSA key exchange. In development a self-signed certificate for
//! `localhost` and `127.0.0.1` is generated into `DATA_DIR/tls/` (key mode 0600); in production the certificate
//! and key come from files and a key readable by others is refused.

use crate::config::{Config, Profile};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{CipherSuite, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: cannot read the certificate named by `tls.cert_file`")]
    Cert,
    #[error("TLS: cannot read the private key named by `tls.key_file`")]
    Key,
    #[error("TLS: the private key named by `tls.key_file` is readable by other users; chmod 600 it")]
    KeyPermissions,
    #[error("TLS: the certificate and key do not form a usable pair")]
    Pair,
    #[error("TLS: cannot generate the development certificate in the data directory")]
    Generate,
}

/// The cipher suites we accept: AEAD only, forward secret only.
const SUITES: &[CipherSuite] = &[
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// The ring provider narrowed to [`SUITES`].
pub fn provider() -> CryptoProvider {
    let mut p = ring::default_provider();
    p.cipher_suites.retain(|s| SUITES.contains(&s.suite()));
    p
}

/// Paths of the certificate and key in use, generating the development pair when the profile allows.
pub fn cert_paths(cfg: &Config) -> Result<(PathBuf, PathBuf), TlsError> {
    match (&cfg.tls.cert_file, &cfg.tls.key_file) {
        (Some(c), Some(k)) => Ok((c.clone(), k.clone())),
        _ if cfg.profile == Profile::Production => Err(TlsError::Cert),
        _ => {
            let dir = cfg.tls_dir();
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            if !cert.is_file() || !key.is_file() {
                generate_dev_cert(&dir, &cert, &key)?;
            }
            Ok((cert, key))
        }
    }
}

fn generate_dev_cert(dir: &Path, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(|_| TlsError::Generate)?;
    crate::fsutil::private_dir(dir).map_err(|_| TlsError::Generate)?;
    crate::fsutil::write_private(key, pair.signing_key.serialize_pem().as_bytes()).map_err(|_| TlsError::Generate)?;
    std::fs::write(cert, pair.cert.pem()).map_err(|_| TlsError::Generate)?;
    Ok(())
}

/// Builds the rustls server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path, profile: Profile) -> Result<ServerConfig, TlsError> {
    if profile == Profile::Production && crate::fsutil::readable_by_others(key) {
        return Err(TlsError::KeyPermissions);
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|_| TlsError::Cert)?
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Cert)?;
    if certs.is_empty() {
        return Err(TlsError::Cert);
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|_| TlsError::Key)?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|_| TlsError::Pair)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|_| TlsError::Pair)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_aead_ecdhe_suites_remain() {
        let p = provider();
        assert_eq!(p.cipher_suites.len(), SUITES.len());
        for s in &p.cipher_suites {
            let name = format!("{:?}", s.suite());
            assert!(!name.contains("CBC") && !name.contains("_RSA_WITH_") || name.contains("ECDHE"), "{name}");
        }
    }
}
