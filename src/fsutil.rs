//! Small file helpers for secrets kept on disk (keys, credentials): created 0600, checked for loose modes.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to a new file readable only by its owner (mode 0600 on Unix), replacing none.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        private_dir(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Creates a directory (and parents) that only its owner may enter (mode 0700 on Unix); an existing one is kept.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(path)
}

/// Makes `path` a file only its owner may read or write (mode 0600 on Unix): created empty when missing,
/// tightened when it exists with a looser mode.
pub fn private_file(path: &Path) -> std::io::Result<()> {
    if path.exists() && !path.is_file() {
        // Not a regular file (a directory, a device): whoever opens it next reports what is wrong with it.
        return Ok(());
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let f = opts.open(path)?;
        if f.metadata()?.permissions().mode() & 0o077 != 0 {
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    {
        opts.open(path)?;
    }
    Ok(())
}

/// True when a file's mode lets group or others read it.
/// Whether the user running this process could change `path`: it is group- or world-writable, or it is owned by
/// this process's user and owner-writable, or this process runs as root. A path that does not exist counts as
/// not writable (loading it fails anyway). Unix only; elsewhere always `false`.
pub fn writable_by_us_or_others(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(m) = std::fs::metadata(path) else { return false };
        // The owner of /proc/self is this process's effective user (Linux); without /proc, only the mode counts.
        let me = std::fs::metadata("/proc/self").map(|p| p.uid()).ok();
        m.mode() & 0o022 != 0 || me == Some(0) || (me == Some(m.uid()) && m.mode() & 0o200 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// `path` with `..` and symbolic links resolved, for comparing paths: the canonical path when it exists, else
/// its resolved parent joined with its name, else the path as written.
pub fn resolved(path: &Path) -> std::path::PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => resolved(parent).join(name),
        _ => path.to_path_buf(),
    }
}

pub fn readable_by_others(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Ok(m) => m.permissions().mode() & 0o044 != 0,
            Err(_) => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn private_file_creates_0600_and_tightens_a_loose_mode_keeping_the_content() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fresh = dir.path().join("fresh.db");
        private_file(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o600);
        let loose = dir.path().join("loose.db");
        std::fs::write(&loose, b"kept").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        private_file(&loose).unwrap();
        assert_eq!(mode(&loose), 0o600);
        assert_eq!(std::fs::read(&loose).unwrap(), b"kept");
    }

    #[test]
    fn private_files_are_0600_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_private(&p, b"x").unwrap();
        assert!(!readable_by_others(&p));
        assert!(write_private(&p, b"y").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
