//! Compiled policies kept on disk, so a restart or a reload of a component compiled before
//! loads its machine code instead of compiling again (an interpreter's component takes
//! seconds to minutes to compile; loading its artifact, milliseconds).
//!
//! Loading an artifact runs its machine code as is, so only artifacts this user wrote are
//! trusted: the directory must belong to the user edgeproxy runs as and be closed to
//! everyone else (it is created so; one found otherwise is not used), and each file
//! carries the SHA-256 of what follows it. Files are named by the component's SHA-256 and
//! the engine's compatibility hash (wasmtime version and every setting that changes code),
//! and wasmtime checks the latter again on load. Any mismatch, or any error, compiles.

use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

pub struct CompileCache {
    dir: PathBuf,
    /// The engine's part of every file name.
    engine_key: String,
}

/// Where a cached artifact comes from, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    Compiled,
    FromCache,
}

impl CompileCache {
    /// The cache at `dir` (created if missing, mode 0700), or why it cannot be used.
    pub fn open(dir: &Path, engine: &Engine) -> Result<Self, String> {
        let fail = |e: std::io::Error| format!("policy cache {}: {e}", dir.display());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(fail)?;
        let meta = std::fs::metadata(dir).map_err(fail)?;
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(format!(
                "policy cache {}: owned by uid {}, not by this process's user ({me}); not used",
                dir.display(),
                meta.uid()
            ));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "policy cache {}: open to other users (mode {:o}); not used (chmod 700 it)",
                dir.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(Self {
            dir: dir.to_owned(),
            engine_key: format!("{:016x}", h.finish()),
        })
    }

    fn path(&self, bytes: &[u8]) -> PathBuf {
        let hash = crate::domain::rollout::content_hash(bytes);
        self.dir.join(format!("{hash}-{}.cwasm", self.engine_key))
    }

    /// The component compiled from `bytes` by `compile`, from the cache when it holds a
    /// sound artifact of it, else compiled and stored.
    pub fn get_or_compile<E>(
        &self,
        engine: &Engine,
        bytes: &[u8],
        compile: impl FnOnce() -> Result<Component, E>,
    ) -> Result<(Component, Compiled), E> {
        let path = self.path(bytes);
        match load(engine, &path) {
            Ok(Some(c)) => return Ok((c, Compiled::FromCache)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cached policy artifact unusable; compiling");
                let _ = std::fs::remove_file(&path);
            }
        }
        let component = compile()?;
        if let Err(e) = store(&path, &component) {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache the compiled policy");
        }
        Ok((component, Compiled::Compiled))
    }
}

#[allow(unsafe_code)]
fn load(engine: &Engine, path: &Path) -> Result<Option<Component>, String> {
    let file = match std::fs::read(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let (sum, artifact) = file
        .split_at_checked(32)
        .ok_or("shorter than its checksum")?;
    if Sha256::digest(artifact).as_slice() != sum {
        return Err("checksum does not match (truncated or altered)".into());
    }
    // SAFETY: the artifact was written by this user (the directory admits no one else),
    // its checksum holds, and wasmtime refuses one from another version or configuration.
    unsafe { Component::deserialize(engine, artifact) }
        .map(Some)
        .map_err(|e| format!("{e:#}"))
}

fn store(path: &Path, component: &Component) -> Result<(), String> {
    let artifact = component.serialize().map_err(|e| format!("{e:#}"))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&Sha256::digest(&artifact))?;
        f.write_all(&artifact)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        e.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::outbound::wasm_policy::DEFAULT_POLICY;
    use crate::adapters::outbound::wasm_policy::runtime::{Limits, Runtime};

    fn compile(runtime: &Runtime) -> Result<Component, String> {
        runtime
            .compile_uncached(DEFAULT_POLICY)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_known_component_loads_from_the_cache_and_a_damaged_artifact_is_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("cache");
        let runtime = Runtime::new(Limits::default()).unwrap();
        let engine = runtime.engine();
        let cache = CompileCache::open(&at, engine).unwrap();
        let mode = std::fs::metadata(&at).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let get = || cache.get_or_compile(engine, DEFAULT_POLICY, || compile(&runtime));
        assert_eq!(get().unwrap().1, Compiled::Compiled);
        assert_eq!(get().unwrap().1, Compiled::FromCache);

        // One byte changed in the artifact: refused, compiled, stored again.
        let file = cache.path(DEFAULT_POLICY);
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(get().unwrap().1, Compiled::Compiled);
        assert_eq!(get().unwrap().1, Compiled::FromCache);
        // Another engine with the same settings finds the same file.
        let other = Runtime::new(Limits::default()).unwrap();
        let other_cache = CompileCache::open(&at, other.engine()).unwrap();
        assert_eq!(other_cache.path(DEFAULT_POLICY), file);
    }

    #[test]
    fn a_cache_directory_open_to_others_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let runtime = Runtime::new(Limits::default()).unwrap();
        let err = CompileCache::open(dir.path(), runtime.engine())
            .err()
            .unwrap();
        assert!(err.contains("open to other users"), "{err}");
    }
}
