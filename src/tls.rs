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

/// What can go wrong preparing TLS, naming the setting and file and keeping the underlying error.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: the production profile needs `tls.cert_file` and `tls.key_file`")]
    NotConfigured,
    #[error("TLS: cannot read the certificate {} (`tls.cert_file`)", path.display())]
    Cert {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS: the certificate file {} (`tls.cert_file`) holds no certificate", path.display())]
    NoCert { path: PathBuf },
    #[error("TLS: cannot read the private key {} (`tls.key_file`)", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS: the private key {} (`tls.key_file`) is readable by other users; chmod 600 it", path.display())]
    KeyPermissions { path: PathBuf },
    #[error("TLS: the certificate and key do not form a usable pair")]
    Pair(#[source] rustls::Error),
    #[error("TLS: cannot generate the development certificate in {}", dir.display())]
    Generate {
        dir: PathBuf,
        #[source]
        source: crate::error::BoxError,
    },
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
        _ if cfg.profile == Profile::Production => Err(TlsError::NotConfigured),
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
    let failed = |e: crate::error::BoxError| TlsError::Generate { dir: dir.to_owned(), source: e };
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(|e| failed(e.into()))?;
    crate::fsutil::private_dir(dir).map_err(|e| failed(e.into()))?;
    crate::fsutil::write_private(key, pair.signing_key.serialize_pem().as_bytes()).map_err(|e| failed(e.into()))?;
    std::fs::write(cert, pair.cert.pem()).map_err(|e| failed(e.into()))?;
    Ok(())
}

/// Builds the rustls server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path, profile: Profile) -> Result<ServerConfig, TlsError> {
    if profile == Profile::Production && crate::fsutil::readable_by_others(key) {
        return Err(TlsError::KeyPermissions { path: key.to_owned() });
    }
    let cert_error = |source| TlsError::Cert { path: cert.to_owned(), source };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).map_err(cert_error)?.collect::<Result<_, _>>().map_err(cert_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { path: cert.to_owned() });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key { path: key.to_owned(), source })?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Pair)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Pair)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Chain;

    #[test]
    fn a_missing_key_file_names_the_file_and_the_cause() {
        let dir = std::env::temp_dir().join(format!("carevault-tls-{}", uuid::Uuid::new_v4()));
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        generate_dev_cert(&dir, &cert, &key).unwrap();
        let missing = dir.join("missing-key.pem");
        let err = server_config(&cert, &missing, Profile::Development).unwrap_err();
        let text = Chain(&err).to_string();
        assert!(text.starts_with("TLS: cannot read the private key"), "{text}");
        assert!(text.contains("missing-key.pem"), "names the file: {text}");
        assert!(text.contains(": caused by "), "keeps the cause: {text}");
        assert!(text.to_lowercase().contains("no such file"), "the underlying cause: {text}");
        // Through the startup error the server reports, the cause is still there.
        let start = crate::app::StartError::from(err);
        assert_eq!(Chain(&start).to_string(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_server_with_a_missing_key_file_does_not_start_and_says_why() {
        let dir = std::env::temp_dir().join(format!("carevault-start-{}", uuid::Uuid::new_v4()));
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        generate_dev_cert(&dir, &cert, &key).unwrap();
        let over = crate::config::Overrides {
            data_dir: dir.clone(),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let mut cfg = Config::load(&over).unwrap();
        cfg.tls.cert_file = Some(cert);
        cfg.tls.key_file = Some(dir.join("gone.pem"));
        let err = crate::app::Application::build(cfg, crate::clock::system()).err().expect("must not start");
        let text = Chain(&err).to_string();
        assert!(text.contains("TLS: cannot read the private key") && text.contains("gone.pem"), "{text}");
        assert!(text.to_lowercase().contains("caused by i/o error: no such file"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
