//! The certificates terminating listeners present, chosen by server name, from files:
//! `tls_cert`/`tls_key` (the default, edgeProxy's `EDGEPROXY_TLS_CERT`/`_KEY`) and
//! `tls_cert_dir`, whose `NAME.pem` + `NAME.key` pairs each serve the DNS names in their
//! certificate. Files are re-read when they change (a renewal by certbot or any ACME
//! client takes effect without a restart; connections in flight keep theirs); a pair that
//! no longer loads is refused, named in the log, and its last good version keeps serving.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Also re-read on this period, for changes no notification reported (network file
/// systems, a watch lost with its directory).
const RECHECK: Duration = Duration::from_secs(60);

/// Where the certificates come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertFiles {
    /// The default certificate and key (for names no pair in `dir` covers).
    pub default: Option<(PathBuf, PathBuf)>,
    pub dir: Option<PathBuf>,
}

/// One certificate and key as loaded, with the bytes they came from.
struct Pair {
    files: (PathBuf, PathBuf),
    bytes: (Vec<u8>, Vec<u8>),
    key: Arc<CertifiedKey>,
    names: Vec<String>,
    /// The leaf certificate's notAfter, seconds since the epoch.
    not_after: i64,
}

#[derive(Default)]
struct CertSet {
    default: Option<Arc<Pair>>,
    /// `tls_cert_dir`'s pairs by the stem of their file names.
    pairs: BTreeMap<String, Arc<Pair>>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by what follows `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSet")
            .field("default", &self.default.as_ref().map(|p| &p.files.0))
            .field("pairs", &self.pairs.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The certificates in use, swapped whole on a reload.
#[derive(Debug)]
pub struct Certificates {
    files: CertFiles,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertSet>,
}

impl Certificates {
    /// Loads every certificate; any that does not load is an error naming its file.
    pub fn load(files: CertFiles, provider: Arc<CryptoProvider>) -> anyhow::Result<Self> {
        let (set, errors) = read(&files, &provider, &CertSet::default());
        if !errors.is_empty() {
            anyhow::bail!("{}", errors.join("; "));
        }
        if set.default.is_none() && set.pairs.is_empty() {
            anyhow::bail!(
                "no certificate: set tls_cert and tls_key, or put NAME.pem and NAME.key pairs in tls_cert_dir"
            );
        }
        Ok(Self {
            files,
            provider,
            current: ArcSwap::from_pointee(set),
        })
    }
}

impl crate::domain::ports::CertificateExpiries for Certificates {
    fn expiries(&self) -> Vec<(String, i64)> {
        let set = self.current.load();
        // The default pair may also be one of the directory's: one series per file.
        let by_file: BTreeMap<String, i64> = set
            .default
            .iter()
            .chain(set.pairs.values())
            .map(|p| (p.files.0.display().to_string(), p.not_after))
            .collect();
        by_file.into_iter().collect()
    }
}

impl Certificates {
    /// Re-reads the files: changed pairs that load replace theirs; the others keep
    /// serving. The problems found, each naming its file.
    pub fn reload(&self) -> Vec<String> {
        let old = self.current.load_full();
        let (set, errors) = read(&self.files, &self.provider, &old);
        let changed = set.default.as_ref().map(Arc::as_ptr)
            != old.default.as_ref().map(Arc::as_ptr)
            || set.pairs.len() != old.pairs.len()
            || set
                .pairs
                .iter()
                .zip(&old.pairs)
                .any(|((a, x), (b, y))| a != b || !Arc::ptr_eq(x, y));
        if changed {
            tracing::info!(
                certificates = set.pairs.len() + usize::from(set.default.is_some()),
                "TLS certificates reloaded"
            );
            self.current.store(Arc::new(set));
        }
        errors
    }

    /// The certificate for `name` (normalised): an exact name, a one-label wildcard (as
    /// TLS clients match them), else the default.
    pub fn for_name(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.load();
        if let Some(name) = name {
            if let Some(k) = set.exact.get(name) {
                return Some(Arc::clone(k));
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(k) = set.wildcard.get(parent)
            {
                return Some(Arc::clone(k));
            }
        }
        set.default.as_ref().map(|p| Arc::clone(&p.key))
    }

    /// Every directory to watch for changes.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let parent = |p: &Path| {
            std::path::absolute(p)
                .ok()
                .and_then(|a| a.parent().map(Path::to_path_buf))
        };
        if let Some((c, k)) = &self.files.default {
            dirs.extend(parent(c));
            dirs.extend(parent(k));
        }
        dirs.extend(self.files.dir.clone());
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// A terminating listener's TLS settings: rustls's defaults (TLS 1.2 and 1.3, no
/// renegotiation, which rustls never does), certificates by name from `certs`, session
/// resumption by ticket and by cache.
pub fn server_config(
    certs: Arc<Certificates>,
    alpn: &[String],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&certs.provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(Arc::new(config))
}

/// The TLS client a re-encrypting listener connects to backends with: their
/// certificates must chain to the CAs in `ca` (PEM).
pub fn backend_client(ca: &Path) -> Result<tokio_rustls::TlsConnector, String> {
    let config = crate::adapters::net::tls::client_trusting(ca)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// TLS 1.2 sessions remembered for resumption (about 100 bytes each).
const SESSION_CACHE: usize = 16_384;

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()
            .map(crate::domain::server_names::normalise);
        self.for_name(name.as_deref())
    }
}

/// Re-reads on every change in the certificates' directories, and every `RECHECK`.
pub async fn watch(certs: Arc<Certificates>, shutdown: CancellationToken) {
    let changed = Arc::new(Notify::new());
    let mut watches = Vec::new();
    for dir in certs.dirs() {
        match super::file_watch::watch_dir(&dir, Arc::clone(&changed)) {
            Ok(w) => watches.push(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch for certificate renewals; re-reading every {RECHECK:?}")
            }
        }
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(RECHECK) => {}
        }
        // A renewal writes several files: read once they are all written.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let c = Arc::clone(&certs);
        let errors = tokio::task::spawn_blocking(move || c.reload())
            .await
            .unwrap_or_default();
        for e in errors {
            tracing::error!("TLS certificate refused, the last good one keeps serving: {e}");
        }
    }
}

/// Reads every pair, reusing `old`'s where the bytes did not change and keeping `old`'s
/// where the new ones do not load.
fn read(files: &CertFiles, provider: &CryptoProvider, old: &CertSet) -> (CertSet, Vec<String>) {
    let mut errors = Vec::new();
    let mut set = CertSet::default();
    if let Some(files) = &files.default {
        match load_pair(files, provider, old.default.as_ref()) {
            Ok(p) => set.default = Some(p),
            Err(e) => {
                errors.push(e);
                set.default = old.default.clone();
            }
        }
    }
    if let Some(dir) = &files.dir {
        match dir_pairs(dir) {
            Ok(found) => {
                // A served pair half gone (a renewal between unlink and create, a copy
                // in progress) keeps serving; one wholly removed is dropped.
                for (stem, pair) in &old.pairs {
                    if found.contains_key(stem) {
                        continue;
                    }
                    let (cert, key) = &pair.files;
                    if cert.exists() || key.exists() {
                        let missing = if cert.exists() { key } else { cert };
                        errors.push(format!("{}: missing (its pair is kept)", missing.display()));
                        set.pairs.insert(stem.clone(), Arc::clone(pair));
                    } else {
                        tracing::warn!(certificate = %cert.display(), "TLS certificate removed; its names are no longer served by it");
                    }
                }
                for (stem, files) in found {
                    let before = old.pairs.get(&stem);
                    match load_pair(&files, provider, before) {
                        Ok(p) => {
                            set.pairs.insert(stem, p);
                        }
                        Err(e) => {
                            errors.push(e);
                            if let Some(b) = before {
                                set.pairs.insert(stem, Arc::clone(b));
                            }
                        }
                    }
                }
            }
            Err(e) => {
                errors.push(format!("{}: {e}", dir.display()));
                set.pairs = old.pairs.clone();
            }
        }
    }
    // Removing every certificate would fail every handshake: refused, as at start.
    if set.default.is_none()
        && set.pairs.is_empty()
        && (old.default.is_some() || !old.pairs.is_empty())
    {
        errors.push("no certificate left; the last ones keep serving".into());
        set.default = old.default.clone();
        set.pairs = old.pairs.clone();
    }
    // Pairs in file-name order: the first to claim a name serves it.
    for pair in set.pairs.values() {
        for name in &pair.names {
            let (map, key) = match name.strip_prefix("*.") {
                Some(parent) => (&mut set.wildcard, parent),
                None => (&mut set.exact, name.as_str()),
            };
            map.entry(key.to_owned())
                .or_insert_with(|| Arc::clone(&pair.key));
        }
    }
    (set, errors)
}

/// `NAME.pem` files with a `NAME.key` beside them, by NAME.
fn dir_pairs(dir: &Path) -> std::io::Result<BTreeMap<String, (PathBuf, PathBuf)>> {
    let mut pairs = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "pem")
            && let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned())
        {
            let key = path.with_extension("key");
            if key.exists() {
                pairs.insert(stem, (path, key));
            } else {
                tracing::debug!(file = %path.display(), "no .key beside it; skipped");
            }
        }
    }
    Ok(pairs)
}

fn load_pair(
    files: &(PathBuf, PathBuf),
    provider: &CryptoProvider,
    old: Option<&Arc<Pair>>,
) -> Result<Arc<Pair>, String> {
    let (cert_path, key_path) = files;
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let bytes = (read(cert_path)?, read(key_path)?);
    if let Some(old) = old.filter(|o| o.bytes == bytes) {
        return Ok(Arc::clone(old));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes.0)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert_path.display()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| format!("{}: no certificate in it", cert_path.display()))?;
    let (names, not_after) =
        leaf_facts(leaf).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&bytes.1)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key_path.display()))?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{}: does not match the certificate in {}",
            key_path.display(),
            cert_path.display()
        ),
        e => format!("{}: {e}", key_path.display()),
    })?;
    Ok(Arc::new(Pair {
        files: files.clone(),
        bytes,
        key: Arc::new(key),
        names,
        not_after,
    }))
}

/// The DNS names a certificate is for (its subject alternative names, lower case), and
/// when it expires (seconds since the epoch).
fn leaf_facts(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let names = crate::adapters::net::tls::alt_names(&cert, |n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => {
            Some(crate::domain::server_names::normalise(d))
        }
        _ => None,
    });
    Ok((names, cert.validity().not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::net::tls::provider;

    /// Writes a self-signed pair for `names` as `dir/stem.pem` and `.key`.
    pub fn write_pair(
        dir: &Path,
        stem: &str,
        names: &[&str],
    ) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let c = rcgen::generate_simple_self_signed(names).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), c.cert.pem()).unwrap();
        std::fs::write(
            dir.join(format!("{stem}.key")),
            c.signing_key.serialize_pem(),
        )
        .unwrap();
        c
    }

    fn served(certs: &Certificates, name: Option<&str>) -> Option<CertificateDer<'static>> {
        certs.for_name(name).map(|k| k.cert[0].clone())
    }

    #[test]
    fn names_pick_their_pair_wildcards_one_label_deep_else_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let api = write_pair(dir.path(), "api", &["api.example.com"]);
        let wild = write_pair(dir.path(), "wild", &["*.example.com"]);
        let default_dir = tempfile::tempdir().unwrap();
        let default = write_pair(default_dir.path(), "default", &["pop.example.net"]);
        let files = CertFiles {
            default: Some((
                default_dir.path().join("default.pem"),
                default_dir.path().join("default.key"),
            )),
            dir: Some(dir.path().to_owned()),
        };
        let certs = Certificates::load(files, provider()).unwrap();
        assert_eq!(
            served(&certs, Some("api.example.com")),
            Some(api.cert.der().clone())
        );
        assert_eq!(
            served(&certs, Some("www.example.com")),
            Some(wild.cert.der().clone())
        );
        // A TLS client would not accept *.example.com for a.b.example.com.
        assert_eq!(
            served(&certs, Some("a.b.example.com")),
            Some(default.cert.der().clone())
        );
        assert_eq!(served(&certs, None), Some(default.cert.der().clone()));
    }

    #[test]
    fn a_bad_or_mismatched_key_is_refused_by_file_and_the_last_good_pair_serves() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_pair(dir.path(), "api", &["api.example.com"]);
        let files = CertFiles {
            default: None,
            dir: Some(dir.path().to_owned()),
        };
        let certs = Certificates::load(files.clone(), provider()).unwrap();
        // A renewal whose key belongs to another certificate.
        let other = rcgen::generate_simple_self_signed(vec!["api.example.com".into()]).unwrap();
        std::fs::write(dir.path().join("api.pem"), other.cert.pem()).unwrap();
        let errors = certs.reload();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("api.key: does not match the certificate in"),
            "{}",
            errors[0]
        );
        assert_eq!(
            served(&certs, Some("api.example.com")),
            Some(first.cert.der().clone())
        );
        // At start the same files are an error naming the file.
        let err = Certificates::load(files.clone(), provider())
            .unwrap_err()
            .to_string();
        assert!(err.contains("api.key"), "{err}");
        // Garbage in the key file too.
        std::fs::write(dir.path().join("api.key"), "not a key").unwrap();
        let errors = certs.reload();
        assert!(
            errors[0].contains("api.key: not a PEM private key"),
            "{errors:?}"
        );
        // A pair half gone (mid-renewal) keeps serving.
        std::fs::remove_file(dir.path().join("api.key")).unwrap();
        let errors = certs.reload();
        assert!(errors[0].contains("api.key: missing"), "{errors:?}");
        assert_eq!(
            served(&certs, Some("api.example.com")),
            Some(first.cert.der().clone())
        );
        // The renewal done right replaces it.
        let renewed = write_pair(dir.path(), "api", &["api.example.com"]);
        assert!(certs.reload().is_empty());
        assert_eq!(
            served(&certs, Some("api.example.com")),
            Some(renewed.cert.der().clone())
        );
    }
}
