//! HTTPS on the front door: reading the certificate and key named by
//! `[server.tls]`, and the rustls configuration that serves them.
//!
//! It is separate because certificates live longer than one configuration
//! and change on their own schedule (renewals): the listener is built once
//! around a [`ServedCertificate`], whose certificate a reload swaps, so a
//! renewed certificate needs no restart and no connection is dropped.
//! HTTP/2 and HTTP/1.1 are offered through ALPN by actix-web itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{ConfigError, TlsConfig};

/// The one crypto provider of the process (ring), named once.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `path` as written in the config, or inside the config file's directory
/// when relative.
fn resolve(config_file: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    config_file
        .parent()
        .map(|dir| dir.join(path))
        .unwrap_or_else(|| path.to_path_buf())
}

/// Reads and checks the certificate chain and key of `tls`: both parse, the
/// key is of a supported kind, and it belongs to the leaf certificate.
/// Errors name the config file, the key (`server.tls.cert` or
/// `server.tls.key`) and the PEM file at fault.
pub(crate) fn load(config_file: &Path, tls: &TlsConfig) -> Result<Arc<CertifiedKey>, ConfigError> {
    let file = config_file.display().to_string();
    let fail = |key: &str, path: &Path, message: String| ConfigError {
        file: file.clone(),
        key: key.to_string(),
        message: format!("{}: {message}", path.display()),
    };
    let cert_path = resolve(config_file, &tls.cert);
    let key_path = resolve(config_file, &tls.key);
    let cert_pem = std::fs::read(&cert_path)
        .map_err(|e| fail("server.tls.cert", &cert_path, format!("cannot read: {e}")))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            fail(
                "server.tls.cert",
                &cert_path,
                format!("not a PEM certificate chain: {e}"),
            )
        })?;
    if chain.is_empty() {
        return Err(fail(
            "server.tls.cert",
            &cert_path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let key_pem = std::fs::read(&key_path)
        .map_err(|e| fail("server.tls.key", &key_path, format!("cannot read: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        fail(
            "server.tls.key",
            &key_path,
            format!("holds no PEM private key (PKCS#8, RSA or EC): {e}"),
        )
    })?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => fail(
            "server.tls.key",
            &key_path,
            format!(
                "does not belong to the certificate in {}",
                cert_path.display()
            ),
        ),
        rustls::Error::InvalidCertificate(_) | rustls::Error::InvalidCertRevocationList(_) => fail(
            "server.tls.cert",
            &cert_path,
            format!("not a usable certificate: {e}"),
        ),
        e => fail(
            "server.tls.key",
            &key_path,
            format!("not a usable private key: {e}"),
        ),
    })?;
    Ok(Arc::new(certified))
}

/// The certificate the front door presents, swapped whole on reload:
/// handshakes after a swap get the new one, connections already open keep
/// the session they have.
#[derive(Debug)]
pub(crate) struct ServedCertificate {
    current: ArcSwap<CertifiedKey>,
}

impl ServedCertificate {
    pub(crate) fn new(first: Arc<CertifiedKey>) -> ServedCertificate {
        ServedCertificate {
            current: ArcSwap::new(first),
        }
    }

    /// Presents `next` from the next handshake on.
    pub(crate) fn replace(&self, next: Arc<CertifiedKey>) {
        self.current.store(next);
    }
}

impl ResolvesServerCert for ServedCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The rustls configuration of the public listener: safe default protocol
/// versions, no client certificates, the certificate from `served`.
pub(crate) fn server_config(
    served: Arc<ServedCertificate>,
) -> std::io::Result<rustls::ServerConfig> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_cert_resolver(served);
    Ok(config)
}
