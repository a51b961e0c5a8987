//! Cluster credentials: a cluster CA, node certificates signed by it (`edgeproxy cluster ca`,
//! `edgeproxy cluster cert NODE`), and the mutual-TLS configs both QUIC endpoints use.
//!
//! Every node presents its certificate and accepts only peers whose certificate chains to
//! the cluster CA, in both directions. The ALPN names the protocol version and the cluster,
//! so a node of another cluster (or another protocol version) fails the handshake itself,
//! before any byte of SWIM or rows is read. The ALPN is only what a node says of itself, so
//! the certificate names the cluster too (a URI, `urn:edgeproxy:cluster:NAME`), and each side
//! checks the other's once the handshake is done: two clusters sharing a CA stay apart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::wire;
use crate::adapters::net::tls::provider;

/// The name every node certificate carries and every client checks: peers are many, their
/// addresses change, and trust comes from the cluster CA, not from a host name.
pub const SERVER_NAME: &str = "edgeproxy";

/// Where a node's credentials live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

fn validity(params: &mut CertificateParams, years: i32) {
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

/// Writes `ca.pem` and `ca.key` into `dir` (refusing to overwrite a CA).
pub fn make_ca(dir: &Path, cluster: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.exists() || key_path.exists() {
        bail!(
            "{} or {} exists already; a new CA would lock out every node signed by the old one",
            cert_path.display(),
            key_path.display()
        );
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(
        DnType::CommonName,
        format!("edgeproxy cluster {cluster} CA"),
    );
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, 10);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_secret(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    Ok((cert_path, key_path))
}

/// The name a certificate gives its cluster.
fn cluster_uri(cluster: &str) -> String {
    let mut out = String::from("urn:edgeproxy:cluster:");
    for b in cluster.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The cluster the CA in `ca_dir` was made for (`cluster ca --name`), from its subject.
pub fn ca_cluster(ca_dir: &Path) -> anyhow::Result<String> {
    let path = ca_dir.join("ca.pem");
    let der = CertificateDer::from_pem_file(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default();
    cn.strip_prefix("edgeproxy cluster ")
        .and_then(|rest| rest.strip_suffix(" CA"))
        .map(str::to_owned)
        .with_context(|| {
            format!(
                "{} names no edgeproxy cluster (subject {cn:?}); pass --cluster",
                path.display()
            )
        })
}

/// Why the certificate a peer presented does not belong to `cluster`, if it does not.
pub fn wrong_cluster(identity: Option<Box<dyn std::any::Any>>, cluster: &str) -> Option<String> {
    let certs = identity?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let Some(leaf) = certs.first() else {
        return Some("no certificate".into());
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Some("an unreadable certificate".into());
    };
    let uris: Vec<&str> = crate::adapters::net::tls::alt_names(&cert, |n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let want = cluster_uri(cluster);
    match uris
        .iter()
        .find(|u| u.starts_with("urn:edgeproxy:cluster:"))
    {
        Some(u) if *u == want => None,
        Some(u) => Some(format!(
            "its certificate is for another cluster ({u}, not {want})"
        )),
        None => Some(format!(
            "its certificate names no cluster (made before edgeproxy checked it): re-issue it \
             with `edgeproxy cluster cert NODE --cluster {cluster}`"
        )),
    }
}

/// The POP a certificate was made for (its subject's common name, as `cluster cert NODE`
/// writes it).
fn leaf_name(leaf: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The POP the certificate a peer presented names, or None where there is none
/// (plaintext mode): what the peer may speak for.
pub fn peer_name(identity: Option<Box<dyn std::any::Any>>) -> Option<String> {
    let certs = identity?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    leaf_name(certs.first()?)
}

/// How long until the certificate a peer presented expires (zero if it has), or None
/// where there is none (plaintext mode).
pub fn expires_in(identity: Option<Box<dyn std::any::Any>>) -> Option<std::time::Duration> {
    let certs = identity?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Some(std::time::Duration::from_secs(
        not_after.saturating_sub(now).max(0) as u64,
    ))
}

/// Writes `NODE.pem` and `NODE.key` into `dir`, signed by the CA in `ca_dir`, for `cluster`.
pub fn make_node_cert(
    ca_dir: &Path,
    dir: &Path,
    node: &str,
    cluster: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if node.is_empty()
        || !node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("node name {node:?} must be letters, digits, '-', '_' or '.'");
    }
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .with_context(|| format!("reading the cluster CA {}", p.display()))
    };
    let ca_key = KeyPair::from_pem(&read(ca_dir.join("ca.key"))?).context("ca.key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&read(ca_dir.join("ca.pem"))?, ca_key).context("ca.pem")?;
    let mut params = CertificateParams::new(vec![
        SERVER_NAME.to_string(),
        format!("{node}.{SERVER_NAME}"),
    ])?;
    params.distinguished_name.push(DnType::CommonName, node);
    params.subject_alt_names.push(rcgen::SanType::URI(
        cluster_uri(cluster)
            .try_into()
            .context("the cluster name as a URI")?,
    ));
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One certificate serves both ends of every connection.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, 5);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert_path, key_path) = (
        dir.join(format!("{node}.pem")),
        dir.join(format!("{node}.key")),
    );
    write_secret(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    Ok((cert_path, key_path))
}

fn write_secret(path: &Path, pem: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(pem.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The QUIC server and client configs for one node: mutual TLS pinned to the cluster CA,
/// ALPN naming protocol and cluster.
///
/// `node` is this POP's name: the certificate must be made for it, since peers take a POP
/// to be the name its certificate carries.
pub fn quic_configs(
    files: &TlsFiles,
    cluster: &str,
    node: &str,
) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let pem_err = |p: &Path| format!("reading {} (PEM)", p.display());
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.ca)
        .with_context(|| pem_err(&files.ca))?
        .collect::<Result<_, _>>()
        .with_context(|| pem_err(&files.ca))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .with_context(|| pem_err(&files.cert))?
        .collect::<Result<_, _>>()
        .with_context(|| pem_err(&files.cert))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).with_context(|| pem_err(&files.key))?;
    if ca.is_empty() || chain.is_empty() {
        bail!(
            "{} or {} holds no certificate",
            files.ca.display(),
            files.cert.display()
        );
    }
    match leaf_name(&chain[0]) {
        Some(name) if name == node => {}
        other => bail!(
            "{} is made for POP {:?}, but this POP is named {node:?} (node_id, \
             EDGEPROXY_REPLICATION_NODE_ID): peers know a POP by the name in its certificate; \
             make one with `edgeproxy cluster cert {node}` or set the name to the certificate's",
            files.cert.display(),
            other.unwrap_or_default()
        ),
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots
            .add(c)
            .with_context(|| format!("{} is not a usable CA certificate", files.ca.display()))?;
    }
    let roots = Arc::new(roots);

    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .context("building the client-certificate verifier")?;
    let mismatch = || {
        format!(
            "{} does not match {}",
            files.key.display(),
            files.cert.display()
        )
    };
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .with_context(mismatch)?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .with_context(mismatch)?;
    quic(server, client, cluster)
}

/// The QUIC configs from the TLS ones, with the ALPN naming protocol and cluster (each
/// endpoint sets its own transport limits).
fn quic(
    mut server: rustls::ServerConfig,
    mut client: rustls::ClientConfig,
    cluster: &str,
) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    server.alpn_protocols = vec![wire::alpn(cluster)];
    client.alpn_protocols = vec![wire::alpn(cluster)];
    let server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server)?));
    let client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client)?));
    Ok((server, client))
}

/// Configs for `plaintext` mode, chosen only for a network that authenticates every peer
/// itself (WireGuard): QUIC still needs TLS, so each node makes a throwaway certificate and
/// no side checks the other's. The ALPN still keeps other clusters and protocol versions
/// out; nothing keeps out a process that reaches the ports and knows the cluster name.
pub fn plaintext_configs(
    cluster: &str,
) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
    let key = PrivateKeyDer::try_from(signing_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("throwaway key: {e}"))?;
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
        .with_no_client_auth();
    quic(server, client, cluster)
}

/// Accepts any server certificate (plaintext mode only); the handshake signature is still
/// checked, so the session is at least bound to the key the peer showed.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // Both ends allow TLS 1.3 only.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_made_once_and_checked_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        make_ca(&ca, "test").unwrap();
        let err = make_ca(&ca, "test").unwrap_err().to_string();
        assert!(err.contains("exists already"), "{err}");
        let err = make_node_cert(&ca, dir.path(), "../evil", "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be letters"), "{err}");
        let (a_cert, a_key) = make_node_cert(&ca, dir.path(), "a", "test").unwrap();
        let (_, b_key) = make_node_cert(&ca, dir.path(), "b", "test").unwrap();
        assert_eq!(ca_cluster(&ca).unwrap(), "test");
        let chain = |p: &Path| -> Option<Box<dyn std::any::Any>> {
            let der = CertificateDer::from_pem_file(p).unwrap();
            Some(Box::new(vec![der]))
        };
        let left = expires_in(chain(&a_cert)).unwrap().as_secs() / 86_400;
        assert!((4 * 365..=6 * 366).contains(&left), "{left} days");
        // One that has expired: no time left.
        let mut params = CertificateParams::new(vec!["x".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        let old = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let old: Option<Box<dyn std::any::Any>> = Some(Box::new(vec![old.der().clone()]));
        assert_eq!(expires_in(old), Some(std::time::Duration::ZERO));
        assert_eq!(expires_in(None), None);
        assert_eq!(cluster_uri("a b/ü"), "urn:edgeproxy:cluster:a%20b%2F%C3%BC");
        let files = |cert: &Path, key: &Path| TlsFiles {
            ca: ca.join("ca.pem"),
            cert: cert.to_owned(),
            key: key.to_owned(),
        };
        quic_configs(&files(&a_cert, &a_key), "test", "a").unwrap();
        assert_eq!(peer_name(chain(&a_cert)).as_deref(), Some("a"));
        assert_eq!(peer_name(None), None);
        // A's certificate for a POP named otherwise: refused, naming both.
        let err = format!(
            "{:#}",
            quic_configs(&files(&a_cert, &a_key), "test", "b").unwrap_err()
        );
        assert!(
            err.contains(r#"for POP "a""#) && err.contains(r#"named "b""#),
            "{err}"
        );
        // A's certificate with B's key, and a CA file that is not PEM: named errors.
        let err = format!(
            "{:#}",
            quic_configs(&files(&a_cert, &b_key), "test", "a").unwrap_err()
        );
        assert!(err.contains("does not match"), "{err}");
        std::fs::write(ca.join("ca.pem"), "not a certificate").unwrap();
        let err = format!(
            "{:#}",
            quic_configs(&files(&a_cert, &a_key), "test", "a").unwrap_err()
        );
        assert!(err.contains("ca.pem"), "{err}");
    }
}
