//! What every TLS use of the host shares (the cluster's QUIC, terminating listeners,
//! re-encryption to backends, PostgreSQL): one crypto provider, clients that trust a CA
//! file, and reading a certificate's alternative names.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// rustls on ring, as every TLS endpoint of the host uses it.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client that verifies servers against the CA certificates (PEM) in `ca`, and
/// nothing else. Errors name the file.
pub fn client_trusting(ca: &Path) -> Result<rustls::ClientConfig, String> {
    let bad = |e: &dyn std::fmt::Display| format!("{}: {e}", ca.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no certificate in it"));
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The subject alternative names of `cert` that `pick` keeps.
pub fn alt_names<'a, T>(
    cert: &X509Certificate<'a>,
    pick: impl FnMut(&GeneralName<'a>) -> Option<T>,
) -> Vec<T> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san.value.general_names.iter().filter_map(pick).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_that_is_missing_empty_or_not_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = client_trusting(&missing).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: ", missing.display())),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here").unwrap();
        assert_eq!(
            client_trusting(&empty).unwrap_err(),
            format!("{}: no certificate in it", empty.display())
        );
        let ca = dir.path().join("ca.pem");
        let c = rcgen::generate_simple_self_signed(vec!["a.example.com".into()]).unwrap();
        std::fs::write(&ca, c.cert.pem()).unwrap();
        assert!(client_trusting(&ca).is_ok());
    }
}
