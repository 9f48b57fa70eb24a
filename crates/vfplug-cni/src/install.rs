//! `vfplug install DIR`: copies the running binary into a CNI plugin directory, for the Helm
//! chart's init container (an image needs no shell for it). The copy goes to a hidden name in
//! `DIR` and is renamed into place, so a runtime that runs the plugin meanwhile gets the old
//! binary or the new one, never half of one.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The name the plugin is installed under: the `type` of its network configs.
pub const PLUGIN_NAME: &str = "vfplug";

/// Why an install failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The target is not an existing directory.
    #[error("{0} is not a directory (mount the runtime's CNI bin dir there)")]
    NotADirectory(PathBuf),
    /// Reading the source or writing the copy failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// Copies `source` to `dir/name` (mode 0755, synced, renamed into place) and returns the path.
/// An unchanged binary already there is left as it is.
pub fn install(source: &Path, dir: &Path, name: &str) -> Result<PathBuf, InstallError> {
    if !dir.is_dir() {
        return Err(InstallError::NotADirectory(dir.to_path_buf()));
    }
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { what, path, source }
    };
    let bytes = fs::read(source).map_err(io("read", source))?;
    let target = dir.join(name);
    if fs::read(&target).is_ok_and(|old| old == bytes) {
        return Ok(target);
    }
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.set_permissions(fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        fs::rename(&tmp, &target)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        InstallError::Io {
            what: "install",
            path: target.clone(),
            source: e,
        }
    })?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_executable_and_replaces_an_older_binary() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::write(&src, b"new binary").unwrap();
        let bin = d.path().join("bin");
        fs::create_dir(&bin).unwrap();
        fs::write(bin.join("vfplug"), b"old").unwrap();
        let t = install(&src, &bin, "vfplug").unwrap();
        assert_eq!(t, bin.join("vfplug"));
        assert_eq!(fs::read(&t).unwrap(), b"new binary");
        assert_eq!(
            fs::metadata(&t).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let names: Vec<_> = fs::read_dir(&bin)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["vfplug"], "no temporary file left");
    }

    #[test]
    fn a_missing_dir_is_named_and_nothing_is_created() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::write(&src, b"x").unwrap();
        let missing = d.path().join("no/such");
        let e = install(&src, &missing, "vfplug").unwrap_err();
        assert!(e.to_string().contains("no/such is not a directory"), "{e}");
        assert!(!missing.exists());
    }
}
